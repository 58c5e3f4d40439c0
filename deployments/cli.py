"""``factory up``: Ray, the HTTP API, the routing API and the dashboard on this machine, until Ctrl-C."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from factory.cli.output import EXIT_INVALID, cli_settings, err, fail, out


def up(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port of the API.")] = 8000,
    agents: Annotated[
        Path | None, typer.Option("--agents", help="Agent catalogue (agents.yaml) for routing and /v1/agents.")
    ] = None,
    open_mode: Annotated[
        bool, typer.Option("--open", help="No API keys: every request is admin. Only with --host 127.0.0.1.")
    ] = False,
) -> None:
    """Start Ray, the HTTP API, the routing API and the scheduler of schedules locally; print the URLs and a
    first admin key."""
    from factory.api import store_for
    from factory.auth import Scope, create_key
    from factory.errors import FactoryError
    from factory.raysession import ensure_ray
    from factory.settings import mask_secrets

    if open_mode and host != "127.0.0.1":
        raise fail("--open (no API keys) is only allowed with --host 127.0.0.1", EXIT_INVALID)
    try:
        settings = cli_settings()
        if agents is not None:
            settings = settings.model_copy(update={"agents_file": agents.resolve()})
        store = store_for(settings)
    except FactoryError as exc:
        raise fail(str(exc), EXIT_INVALID) from None
    from deployments import upstate

    previous = upstate.read(settings.home)
    if previous is not None and previous.owner.alive() is not None:
        raise fail(
            f"factory up already runs here (pid {previous.owner.pid}, http://{previous.host}:{previous.port}); "
            "`factory down` stops it",
            EXIT_INVALID,
        )
    if previous is not None:
        stopped = upstate.stop_processes(previous.ray)
        upstate.forget(settings.home)
        if stopped:
            err.print(
                f"stopped the Ray left behind by an earlier factory up (pid {previous.owner.pid}, "
                f"which did not stop cleanly): {len(stopped)} process(es)"
            )
    first_key = None
    if not open_mode and not any(not k.revoked for k in store.list_api_keys()):
        first_key, _ = create_key(store, [Scope.ADMIN], name="first admin key (factory up)")
    active_schedules = sum(1 for s in store.list_schedules() if not s.paused)
    store.close()

    import ray
    from ray import serve

    from deployments.app import ROUTE_PREFIX, run_local

    ensure_ray(settings.ray_address)
    err.print("starting the API on Ray Serve…")
    try:
        with_ui = run_local(settings, host, port, open_mode)
    except FactoryError as exc:
        raise fail(str(exc), EXIT_INVALID) from None
    upstate.record(settings.home, host, port)
    base = f"http://{host}:{port}"
    out.print(f"API        {base}/v1/  (docs {base}/docs, OpenAPI {base}/openapi.json)")
    out.print(f"routing    {base}{ROUTE_PREFIX}")
    if with_ui:
        out.print(f"dashboard  {base}/ui/  (log in with an API key)")
    else:
        out.print("dashboard  not installed (pip install 'factory[ui]')")
    out.print(f"health     {base}/healthz")
    out.print(f"schedules  {active_schedules} active, run by the scheduler (`factory schedules list`)")
    out.print(f"state      {escape(mask_secrets(settings.resolved_store_url()))}")
    if open_mode:
        out.print("[yellow]open mode: no API key needed (127.0.0.1 only)[/yellow]")
    elif first_key:
        out.print(f"admin key  {first_key}   (shown once; more with `factory keys create`)")
    else:
        out.print("API keys   use an existing key, or `factory keys create --scope submit`")
    out.print("Ctrl-C stops everything.")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    err.print("stopping…")
    try:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    finally:
        upstate.forget(settings.home)


def down() -> None:
    """Stop the `factory up` running on this machine (same FACTORY_HOME), or clean up the Ray
    processes one left behind when it was killed."""
    from deployments import upstate

    home = cli_settings().home
    state = upstate.read(home)
    if state is None:
        out.print(f"no factory up recorded in {escape(str(home))}; nothing to stop")
        return
    if state.owner.alive() is not None:
        err.print(f"stopping factory up (pid {state.owner.pid}, http://{escape(state.host)}:{state.port})…")
        clean = upstate.stop_running(state)
        leftover = upstate.stop_processes(state.ray)
        upstate.forget(home)
        out.print("stopped" + ("" if clean and not leftover else f" (killed {len(leftover)} leftover process(es))"))
        return
    stopped = upstate.stop_processes(state.ray)
    upstate.forget(home)
    out.print(f"factory up (pid {state.owner.pid}) was gone; stopped {len(stopped)} Ray process(es) it left behind")


def mcp(
    http: Annotated[bool, typer.Option("--http", help="Serve streamable HTTP (at /mcp) instead of stdio.")] = False,
    host: Annotated[str, typer.Option(help="With --http: address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="With --http: port.", min=1, max=65535)] = 8765,
) -> None:
    """Serve the Factory over MCP: tools to submit, follow, cancel and resume runs, route tasks, list agents.

    Talks to the Factory API named by --api (or FACTORY_API_URL). Over stdio with the key of
    --api-key (or FACTORY_API_KEY); over --http every request brings its own key as
    `Authorization: Bearer`, and the API checks its scope."""
    from factory.cli.output import OPTIONS

    settings = cli_settings()
    api_url = OPTIONS.api_url or settings.api_url
    if not api_url:
        raise fail("factory mcp needs the Factory API's URL: --api URL or FACTORY_API_URL", EXIT_INVALID)
    try:
        from deployments import mcp_server
    except ModuleNotFoundError as exc:
        raise fail(f"factory mcp needs the `mcp` package (the fast-agent extra): {exc}", EXIT_INVALID) from None
    if http:
        err.print(f"MCP over streamable HTTP at http://{host}:{port}/mcp -> {api_url}")
        mcp_server.serve_http(api_url, host, port)
    else:
        mcp_server.serve_stdio(api_url, OPTIONS.api_key or settings.api_key)


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("down")(down)
    app.command("mcp")(mcp)
