"""``factory mcp``: a real ``mcp.ClientSession`` against the Factory's MCP server, itself talking to a
real Factory API (the session's ``api_server`` fixture: Ray Serve on the session's Ray).

Over stdio the server is the real ``factory mcp`` command, started by the MCP client as a subprocess;
over streamable HTTP it is the same server app under uvicorn, in a thread of this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import ApiServer
from tests.fixtures.ports import free_port

if importlib.util.find_spec("mcp") is None:
    pytest.skip("the mcp package is not installed (the fast-agent extra)", allow_module_level=True)

from mcp import ClientSession, StdioServerParameters, stdio_client

REPO = Path(__file__).parent.parent.parent
TOOLS = {
    "submit_workflow",
    "run_status",
    "run_events",
    "cancel_run",
    "resume_run",
    "route_task",
    "list_agents",
    "list_runs",
}


def workflow(x: int, seconds: float = 0.0) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [
        {"id": "a", "python": "tests.fixtures.teststeps:add", "with": {"a": "${inputs.x}", "b": 1}}
    ]
    if seconds:
        steps.append({"id": "wait", "python": "tests.fixtures.teststeps:sleepy", "with": {"seconds": seconds}})
    return {"name": "mcp-test", "inputs": {"x": x}, "steps": steps}


def text_of(result: Any) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


async def call(session: ClientSession, name: str, **arguments: Any) -> Any:
    result = await session.call_tool(name, arguments)
    assert not result.is_error, text_of(result)
    return json.loads(text_of(result))


async def wait_for(session: ClientSession, run_id: str, statuses: set[str], deadline: float = 90) -> dict[str, Any]:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        run: dict[str, Any] = await call(session, "run_status", run_id=run_id)
        if run["status"] in statuses:
            return run
        await anyio.sleep(0.3)
    raise AssertionError(f"run {run_id} did not reach {statuses}")


@asynccontextmanager
async def stdio_session(api_server: ApiServer, scope: str) -> AsyncIterator[ClientSession]:
    env = {
        "PYTHONPATH": str(REPO),
        "FACTORY_HOME": str(api_server.settings.home),
        "PATH": os.environ.get("PATH", ""),
    }
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "factory.cli", "--api", api_server.base_url, "--api-key", api_server.keys[scope], "mcp"],
        env=env,
        cwd=str(REPO),
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


def test_over_stdio_an_mcp_client_runs_follows_cancels_and_resumes(api_server: ApiServer) -> None:
    async def scenario() -> None:
        async with stdio_session(api_server, "submit") as session:
            tools = {tool.name: tool for tool in (await session.list_tools()).tools}
            assert set(tools) == TOOLS
            assert tools["run_status"].input_schema["required"] == ["run_id"]
            assert tools["run_events"].input_schema["properties"]["limit"]["maximum"] == 500

            run_id = (await call(session, "submit_workflow", workflow=workflow(41)))["run_id"]
            run = await wait_for(session, run_id, {"succeeded", "failed"})
            assert run["status"] == "succeeded"
            assert {s["step_id"]: s["output"] for s in run["steps"]} == {"a": 42}
            events = (await call(session, "run_events", run_id=run_id))["events"]
            assert events[0]["type"] == "run.created" and events[-1]["type"] == "run.succeeded"
            later = (await call(session, "run_events", run_id=run_id, after=events[1]["id"], limit=1))["events"]
            assert [e["id"] for e in later] == [events[2]["id"]]

            templates = {t.uri_template for t in (await session.list_resource_templates()).resource_templates}
            assert templates == {"factory://runs/{run_id}", "factory://runs/{run_id}/outputs"}
            read = await session.read_resource(f"factory://runs/{run_id}/outputs")
            assert json.loads(read.contents[0].text) == {"run_id": run_id, "status": "succeeded", "outputs": {"a": 42}}
            whole = json.loads((await session.read_resource(f"factory://runs/{run_id}")).contents[0].text)
            assert whole["status"] == "succeeded" and whole["steps"][0]["step_id"] == "a"
            with pytest.raises(Exception, match="404"):
                await session.read_resource("factory://runs/no-such-run/outputs")

            listed = await call(session, "list_runs", limit=50)
            assert run_id in [r["id"] for r in listed["runs"]]
            agents = await call(session, "list_agents")
            assert {"summarizer", "translator"} <= {a["name"] for a in agents["agents"]}
            decision = await call(session, "route_task", text="Render this paragraph in French, please.")
            assert decision["agent"] == "translator"

            slow = (await call(session, "submit_workflow", workflow=workflow(1, seconds=30)))["run_id"]
            await wait_for(session, slow, {"running"})
            await call(session, "cancel_run", run_id=slow)
            assert (await wait_for(session, slow, {"cancelled"}))["status"] == "cancelled"
            await call(session, "resume_run", run_id=slow)
            assert (await wait_for(session, slow, {"running", "succeeded"}))["status"] in {"running", "succeeded"}
            await call(session, "cancel_run", run_id=slow)

            bad = await session.call_tool("run_status", {"run_id": "no-such-run"})
            assert bad.is_error and "404" in text_of(bad)
            both = await session.call_tool("submit_workflow", {})
            assert both.is_error and "either `workflow`" in text_of(both)

    anyio.run(scenario)


def test_over_stdio_the_keys_scope_is_enforced_by_the_api(api_server: ApiServer) -> None:
    async def scenario() -> None:
        async with stdio_session(api_server, "read") as session:
            refused = await session.call_tool("submit_workflow", {"workflow": workflow(1)})
            assert refused.is_error and "403" in text_of(refused) and "submit" in text_of(refused)
            assert "runs" in await call(session, "list_runs")  # reading is allowed

    anyio.run(scenario)


@pytest.fixture
def mcp_http(api_server: ApiServer) -> Iterator[str]:
    import uvicorn

    from deployments.mcp_server import http_app

    port = free_port()
    config = uvicorn.Config(http_app(api_server.base_url), host="127.0.0.1", port=port, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started and time.monotonic() < end:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        server.should_exit = True
        thread.join(10)


def test_over_http_every_request_brings_its_own_key(mcp_http: str, api_server: ApiServer) -> None:
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    bare = httpx2.post(mcp_http, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert bare.status_code == 401

    async def session_with(scope: str) -> tuple[str, str, set[str]]:
        headers = {"Authorization": f"Bearer {api_server.keys[scope]}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=30) as http,
            streamable_http_client(mcp_http, http_client=http) as (read, write, *_),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            names = {tool.name for tool in (await session.list_tools()).tools}
            submitted = await session.call_tool("submit_workflow", {"workflow": workflow(5)})
            listed = await session.call_tool("list_runs", {})
            if submitted.is_error:  # a read key: refused, nothing to read
                return text_of(submitted), text_of(listed), names
            run_id = json.loads(text_of(submitted))["run_id"]
            try:  # the resource is read with the same key
                read = await session.read_resource(f"factory://runs/{run_id}")
                names.add("read:" + json.loads(read.contents[0].text)["id"])
            except Exception as exc:  # noqa: BLE001 - the MCP client raises McpError
                names.add(f"read failed: {exc}")
            return text_of(submitted), text_of(listed), names

    async def scenario() -> None:
        submitted, listed, names = await session_with("submit")
        run_id = json.loads(submitted)["run_id"]
        assert names == TOOLS | {f"read:{run_id}"}
        assert run_id in listed
        refused, _, _ = await session_with("read")
        assert "403" in refused

    anyio.run(scenario)


def test_a_fast_agent_agent_in_a_pool_calls_the_factorys_tools(api_server: ApiServer) -> None:
    """A FastAgent replica (a Ray actor) with `factory mcp` as its MCP server, on the passthrough model,
    which turns `***CALL_TOOL name {args}` into a real tool call and answers with the tool's result."""
    import uuid

    import ray

    from factory.catalog import AgentSpec
    from factory.pools import ManagerConfig, Pools, stop_manager
    from factory.runtime import Outcome

    if importlib.util.find_spec("fast_agent") is None:
        pytest.skip("fast-agent is not installed")
    server = {
        "command": sys.executable,
        "args": ["-m", "factory.cli", "--api", api_server.base_url, "--api-key", api_server.keys["submit"], "mcp"],
        "env": {"PYTHONPATH": str(REPO), "FACTORY_HOME": str(api_server.settings.home)},
        "cwd": str(REPO),
    }
    spec = AgentSpec.model_validate(
        {
            "name": "fa-caller",
            "class": "factory.fastagent:FastAgent",
            "pool": {"num_cpus": 0.1, "max_concurrency": 2},
            "config": {"model": "passthrough", "servers": {"factory": server}, "start_timeout_seconds": 90},
        }
    )
    name = f"test-fa-mcp-{uuid.uuid4().hex[:8]}"
    pools = Pools(name, config=ManagerConfig(check_interval=0.5, drain_grace=0.1, start_timeout=120))
    try:
        client = pools.ensure(spec)
        listed: Outcome = ray.get(client.submit({"text": "***CALL_TOOL factory__list_agents {}"}), timeout=180)
        assert listed.ok, listed.error
        agents = json.loads(json.loads(listed.output_json or "null")["text"])
        assert {"summarizer", "translator"} <= {a["name"] for a in agents["agents"]}

        call = "***CALL_TOOL factory__submit_workflow " + json.dumps({"workflow": workflow(9)})
        submitted: Outcome = ray.get(client.submit({"text": call}), timeout=180)
        assert submitted.ok, submitted.error
        run_id = json.loads(json.loads(submitted.output_json or "null")["text"])["run_id"]
        from factory.client import FactoryClient

        with FactoryClient(api_server.base_url, api_server.keys["read"]) as api:
            run = api.wait(run_id, timeout=90)
        assert run["status"] == "succeeded" and run["steps"][0]["output"] == 10
    finally:
        pools.close()
        stop_manager(name, drain_timeout=0)
