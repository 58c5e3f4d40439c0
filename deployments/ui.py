"""The dashboard as a Serve application: Gradio mounted at /ui, one replica.

One replica on purpose: Gradio's queue speaks SSE in two requests (join, then data) that
must reach the same process; the dashboard keeps nothing else (state is the API's).
The app is built in the replica by a builder function: a FastAPI app with Gradio already
mounted cannot be pickled.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve

UI_PREFIX = "/ui"


def _build() -> FastAPI:
    import os

    from ui.server import build_asgi

    return build_asgi(os.environ.get("FACTORY_UI_API_URL", "http://127.0.0.1:8000"), behind_prefix=True)


def ui_deployment(api_url: str) -> Any:
    """The dashboard's deployment, talking to the API at ``api_url`` (bound, ready for serve.run)."""

    @serve.deployment(
        name="FactoryUI",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {"FACTORY_UI_API_URL": api_url}}},
        max_ongoing_requests=200,
    )
    @serve.ingress(_build)
    class FactoryUI:
        pass

    return FactoryUI.bind()  # type: ignore[attr-defined]
