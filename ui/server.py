"""The dashboard as an ASGI app: Gradio mounted at /ui on a small FastAPI app."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response

UI_PATH = "/ui"
FAVICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    '<rect width="16" height="16" rx="3" fill="#3b82f6"/><path d="M4 12V4h7v2H6v1h4v2H6v3z" fill="white"/></svg>'
)


def favicon() -> Response:
    return Response(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


def build_asgi(api_url: str, *, behind_prefix: bool = False) -> FastAPI:
    """FastAPI with the dashboard at /ui for the API at ``api_url``. Standalone, the app also
    answers / (a redirect to /ui/) and /favicon.ico. ``behind_prefix``: a proxy (Ray Serve's,
    route prefix /ui) hands it the requests under /ui with that root path; Gradio is then
    mounted at the app's root."""
    import gradio as gr

    from ui.app import CSS, build_app

    app = FastAPI(title="The Factory dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    if behind_prefix:
        return gr.mount_gradio_app(app, build_app(api_url), path="", css=CSS, footer_links=[])  # type: ignore[no-any-return]
    app.add_api_route("/favicon.ico", favicon, include_in_schema=False)
    app.add_api_route("/", lambda: RedirectResponse(UI_PATH + "/"), include_in_schema=False)
    return gr.mount_gradio_app(app, build_app(api_url), path=UI_PATH, css=CSS, footer_links=[])  # type: ignore[no-any-return]
