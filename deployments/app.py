"""Building the Factory's Serve applications, for ``serve run``/``serve deploy`` and ``factory up``.

    serve run deployments/serve.yaml      # with FACTORY_* settings in the environment

Two applications: ``factory-api`` at ``/`` and ``factory-route`` at ``/v1/route``.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.api import FactoryAPI
from deployments.route import RouteAPI
from factory.errors import FactoryError
from factory.settings import Settings, get_settings

ROUTE_PREFIX = "/v1/route"


def _settings(args: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    settings = Settings.model_validate(args["settings"]) if "settings" in args else get_settings()
    open_mode = bool(args.get("open_mode", False))
    if open_mode and args.get("host") != "127.0.0.1":  # a missing host may be Serve's 0.0.0.0
        raise FactoryError("open mode (no API keys) is only allowed when the API listens on 127.0.0.1")
    return settings.model_dump(mode="json"), open_mode


def api_app(args: dict[str, Any]) -> Application:
    """Builder for the main API application (serve config: import_path deployments.app:api_app)."""
    settings, open_mode = _settings(args)
    return FactoryAPI.bind(settings, open_mode)  # type: ignore[attr-defined,no-any-return]


def route_app(args: dict[str, Any]) -> Application:
    """Builder for the routing application (import_path deployments.app:route_app)."""
    settings, open_mode = _settings(args)
    return RouteAPI.bind(settings, open_mode)  # type: ignore[attr-defined,no-any-return]


def run_local(settings: Settings, host: str, port: int, open_mode: bool) -> None:
    """Start Serve's proxy on host:port and deploy both applications (Ray must be initialised)."""
    from ray import serve

    args = {"settings": settings.model_dump(mode="json"), "open_mode": open_mode, "host": host}
    serve.start(http_options={"host": host, "port": port})
    serve.run(route_app(args), name="factory-route", route_prefix=ROUTE_PREFIX)
    serve.run(api_app(args), name="factory-api", route_prefix="/")
