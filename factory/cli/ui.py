"""``factory ui``: the dashboard on its own, against any Factory API (needs the ``ui`` extra)."""

from __future__ import annotations

from typing import Annotated

import typer

from factory.cli.output import EXIT_INVALID, err, fail, out


def ui(
    api: Annotated[str, typer.Option("--api", help="The Factory API's URL (the dashboard's only way in).")] = (
        "http://127.0.0.1:8000"
    ),
    host: Annotated[str, typer.Option(help="Address the dashboard listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the dashboard.")] = 7860,
) -> None:
    """Serve the dashboard at http://HOST:PORT/ui for the Factory API at --api; log in with an API key."""
    try:
        import uvicorn

        from ui.server import build_asgi
    except ModuleNotFoundError as exc:
        raise fail(f"the dashboard needs the ui extra (pip install 'factory[ui]'): {exc}", EXIT_INVALID) from None
    if not api.startswith(("http://", "https://")):
        raise fail(f"--api {api!r} is not an http(s) URL", EXIT_INVALID)
    err.print("starting the dashboard…")
    out.print(f"dashboard  http://{host}:{port}/ui   (API {api})")
    uvicorn.run(build_asgi(api), host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    app.command("ui")(ui)
