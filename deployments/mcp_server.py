"""``factory mcp``: the Factory as an MCP server, a thin face over its HTTP API.

Every tool is one call of :class:`factory.client.FactoryClient` to a running Factory API
(``factory up`` or a cluster's Serve app), so an MCP client can do what an API key allows
and nothing more: the API checks the key's scope as for any other caller.

- stdio (``factory mcp``): for an MCP client that starts the server itself (fast-agent,
  Claude Desktop, an IDE). The API URL and key come from ``--api``/``--api-key`` or the
  settings ``api_url``/``api_key`` (FACTORY_API_URL, FACTORY_API_KEY).
- streamable HTTP (``factory mcp --http``): every request must carry its own key
  (``Authorization: Bearer fk_...``), which is passed to the API; the server holds none.
  A request without one is refused with 401 before any MCP handling.

Tools: submit_workflow, run_status, run_events, cancel_run, resume_run, route_task,
list_agents, list_runs. Resources: ``factory://runs/{run_id}`` (a run) and
``factory://runs/{run_id}/outputs`` (its steps' outputs). Their inputs are bounded; an API
error comes back as a tool error carrying the API's message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from pydantic import Field

from factory.client import ApiError, FactoryClient
from factory.errors import FactoryError

RUN_ID_CHARS = r"[A-Za-z0-9_-]+"
MAX_RUN_ID = 64
RunId = Annotated[str, Field(min_length=1, max_length=MAX_RUN_ID, pattern=f"^{RUN_ID_CHARS}$", description="A run id.")]
MAX_EVENTS = 500
MAX_TEXT = 100_000
MAX_DOCUMENT = 2_000_000

ClientFactory = Callable[[str | None], FactoryClient]


class McpKeyMissing(FactoryError):
    """An MCP request over HTTP came without an API key."""


def _bearer(ctx: Any) -> str | None:
    """The caller's API key, from the HTTP request under this tool call (None over stdio)."""
    try:
        request = ctx.request_context.request
    except (AttributeError, ValueError):
        return None
    if request is None:
        return None
    header = str(request.headers.get("authorization", ""))
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _resource_run_id(value: str) -> str:
    """The run id of a resource URI, checked as a tool's ``RunId`` is."""
    if len(value) > MAX_RUN_ID or not re.fullmatch(RUN_ID_CHARS, value):
        raise ToolError(f"{value[:80]!r} is not a run id")
    return value


def build_server(api_url: str, api_key: str | None = None, *, per_request_keys: bool = False) -> Any:
    """The MCP server. ``per_request_keys``: each call uses the key of the HTTP request that carried it
    (streamable HTTP), never ``api_key``; else every call uses ``api_key`` (stdio)."""
    server: Any = MCPServer(
        name="factory",
        instructions=(
            "The Factory runs AI workflows durably on Ray. Submit a workflow (its mapping: name, inputs, "
            "steps), follow it with run_status and run_events, steer it with cancel_run and resume_run; "
            "route_task says which agent would take a task; list_agents and list_runs show what exists."
        ),
    )

    async def call(ctx: Context | None, fn: Callable[[FactoryClient], Any]) -> Any:
        if per_request_keys:
            key = _bearer(ctx)
            if key is None:
                raise ToolError("this MCP server needs an API key on every request: Authorization: Bearer fk_...")
        else:
            key = api_key

        def blocking() -> Any:
            with FactoryClient(api_url, key) as client:
                return fn(client)

        try:
            return await anyio.to_thread.run_sync(blocking)
        except ApiError as exc:
            raise ToolError(f"the Factory API refused ({exc.status}): {exc}") from None
        except FactoryError as exc:
            raise ToolError(str(exc)) from None

    def _tool(fn: Callable[..., Awaitable[Any]]) -> None:
        server.tool(structured_output=False)(fn)

    async def submit_workflow(
        ctx: Context,
        workflow: Annotated[
            dict[str, Any] | None,
            Field(description="The workflow as a mapping (name, inputs, steps), as workflow.yaml would hold it."),
        ] = None,
        registered: Annotated[
            str | None,
            Field(default=None, max_length=200, description="Or: the name of a workflow registered by an operator."),
        ] = None,
        inputs: Annotated[dict[str, Any] | None, Field(description="Inputs of the run.")] = None,
    ) -> str:
        """Start a run of a workflow; returns its run id. Give `workflow` or `registered`, not both."""
        if (workflow is None) == (registered is None):
            raise ToolError("give either `workflow` (a mapping) or `registered` (a registered workflow's name)")
        size = len(json.dumps([workflow, inputs], default=str))
        if size > MAX_DOCUMENT:
            raise ToolError(f"the workflow and its inputs are {size} bytes as JSON, more than {MAX_DOCUMENT}")
        if registered is not None:
            run_id = await call(ctx, lambda c: c.start(registered, inputs or {}))
        else:
            run_id = await call(ctx, lambda c: c.submit(workflow or {}, inputs or {}))
        return json.dumps({"run_id": run_id})

    async def run_status(ctx: Context, run_id: RunId) -> str:
        """A run: its status, error, and each step's status, attempts and output."""
        return json.dumps(await call(ctx, lambda c: c.get_run(run_id)))

    async def run_events(
        ctx: Context,
        run_id: RunId,
        after: Annotated[int, Field(ge=0, description="Only events after this event id.")] = 0,
        limit: Annotated[int, Field(ge=1, le=MAX_EVENTS, description="At most this many events.")] = 100,
    ) -> str:
        """A run's events so far (after event `after`): what happened, in order. Does not wait for more."""

        def events(client: FactoryClient) -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = []
            for event in client.events(run_id, after=after, follow=False):
                found.append(event)
                if len(found) >= limit:
                    break
            return found

        return json.dumps({"events": await call(ctx, events)})

    async def cancel_run(ctx: Context, run_id: RunId) -> str:
        """Cancel a run: running steps are stopped, no new step starts."""
        return json.dumps(await call(ctx, lambda c: c.cancel(run_id)))

    async def resume_run(ctx: Context, run_id: RunId) -> str:
        """Resume a failed or cancelled run: committed steps are kept, the rest run again."""
        return json.dumps(await call(ctx, lambda c: c.resume(run_id)))

    async def route_task(
        ctx: Context,
        text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT, description="The task, in plain language.")],
        capabilities: Annotated[
            list[Annotated[str, Field(max_length=100)]] | None,
            Field(max_length=50, description="Capabilities the agent must have."),
        ] = None,
    ) -> str:
        """Which agent would take this task, and why (scores, runners-up, agents filtered out)."""
        return json.dumps(await call(ctx, lambda c: c.route(text, capabilities or [])))

    async def list_agents(ctx: Context) -> str:
        """The agents of the catalogue and their pools (replicas, load, health and why a replica is unhealthy)."""
        return json.dumps(await call(ctx, lambda c: c.agents()))

    async def list_runs(
        ctx: Context,
        status: Annotated[
            str | None,
            Field(default=None, pattern=r"^(pending|running|succeeded|failed|cancelled)$", description="Only these."),
        ] = None,
        limit: Annotated[int, Field(ge=1, le=200)] = 20,
        cursor: Annotated[str | None, Field(default=None, max_length=200, description="From a previous page.")] = None,
    ) -> str:
        """Recent runs, newest first, a page at a time."""
        return json.dumps(await call(ctx, lambda c: c.list_runs(status, limit, cursor)))

    async def read_run(ctx: Context, run_id: str) -> dict[str, Any]:
        """A run for a resource: the errors a client sees as the resource's (with the API's message)."""
        try:
            return dict(await call(ctx, lambda c: c.get_run(_resource_run_id(run_id))))
        except ToolError as exc:
            raise ResourceError(str(exc)) from None

    async def run_resource(run_id: str, ctx: Context) -> str:
        """A run as JSON: its status, error and steps (status, attempts, output)."""
        return json.dumps(await read_run(ctx, run_id))

    async def outputs_resource(run_id: str, ctx: Context) -> str:
        """The outputs of a run's steps that succeeded, by step id, and the run's status."""
        run = await read_run(ctx, run_id)
        steps = run.get("steps") or []
        outputs = {s["step_id"]: s.get("output") for s in steps if s.get("status") == "succeeded"}
        return json.dumps({"run_id": run.get("id", run_id), "status": run.get("status"), "outputs": outputs})

    server.resource(
        "factory://runs/{run_id}", name="run", mime_type="application/json", description=run_resource.__doc__
    )(run_resource)
    server.resource(
        "factory://runs/{run_id}/outputs",
        name="run_outputs",
        mime_type="application/json",
        description=outputs_resource.__doc__,
    )(outputs_resource)

    for tool in (
        submit_workflow,
        run_status,
        run_events,
        cancel_run,
        resume_run,
        route_task,
        list_agents,
        list_runs,
    ):
        _tool(tool)
    return server


def require_bearer(app: Any) -> Any:
    """An ASGI wrapper refusing (401) every HTTP request that carries no ``Authorization: Bearer`` key."""

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                body = json.dumps(
                    {"title": "Unauthorized", "status": 401, "detail": "send an API key: Authorization: Bearer fk_..."}
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/problem+json"),
                            (b"www-authenticate", b"Bearer"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


def http_app(api_url: str) -> Any:
    """The streamable HTTP app (at /mcp): each request's own key goes to the API."""
    server = build_server(api_url, per_request_keys=True)
    return require_bearer(server.streamable_http_app(stateless_http=True, json_response=True))


def serve_stdio(api_url: str, api_key: str | None) -> None:
    build_server(api_url, api_key).run("stdio")


def serve_http(api_url: str, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(http_app(api_url), host=host, port=port, log_level="warning")
