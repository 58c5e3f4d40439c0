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


def ui_available() -> bool:
    """The dashboard's extra (gradio) is installed."""
    import importlib.util

    return importlib.util.find_spec("gradio") is not None and importlib.util.find_spec("ui") is not None


def run_local(settings: Settings, host: str, port: int, open_mode: bool, ui: bool = True) -> bool:
    """Start Serve's proxy on host:port and deploy the applications (Ray must be initialised):
    the API, routing, and the dashboard at /ui when ``ui`` and the ui extra is installed.
    Returns whether the dashboard was deployed."""
    from ray import serve

    args = {"settings": settings.model_dump(mode="json"), "open_mode": open_mode, "host": host}
    serve.start(http_options={"host": host, "port": port})
    serve.run(route_app(args), name="factory-route", route_prefix=ROUTE_PREFIX)
    with_ui = ui and ui_available()
    if with_ui:
        from deployments.ui import UI_PREFIX, ui_deployment

        api_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        serve.run(ui_deployment(f"http://{api_host}:{port}"), name="factory-ui", route_prefix=UI_PREFIX)
    serve.run(api_app(args), name="factory-api", route_prefix="/")
    return with_ui
