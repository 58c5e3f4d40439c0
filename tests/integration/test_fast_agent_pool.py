"""fast-agent agents in pools of Ray actor replicas, on a real local Ray, with no hosted model.

The models are fast-agent's own offline ones (``passthrough`` answers with the message it got,
or with what follows ``***FIXED_RESPONSE``; ``slow`` is passthrough after 3 s) and its ``generic``
OpenAI-compatible provider pointed at ``ChatStandIn`` (tests/fixtures/chat_standin.py), a local
stand-in for a paid provider that also plays the provider's failures: a rate limit, a malformed
answer and a hang. Not tested here: a real hosted model (no key, no network).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from typer.testing import CliRunner

import factory
from factory.agents_view import pool_view
from factory.catalog import AgentSpec, Catalog
from factory.cli import app
from factory.pools import DEFAULT_MANAGER_NAME, ManagerConfig, PoolClient, Pools, stop_manager
from factory.runtime import Outcome
from factory.spec import RetryPolicy, Step, Workflow
from factory.store.sqlite import SQLiteStore
from tests.fixtures.chat_standin import COMPLETION_TOKENS, PROMPT_TOKENS, ChatStandIn

if importlib.util.find_spec("fast_agent") is None:
    pytest.skip("fast-agent is not installed (pip install -e '.[fast-agent]')", allow_module_level=True)

REPO = Path(__file__).parent.parent.parent
FIXTURES = str(Path(__file__).parent.parent / "fixtures")
CHAIN = REPO / "examples" / "fast_agent_chain"
FIXED = "***FIXED_RESPONSE"

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def pools(ray_cluster: str) -> Iterator[Pools]:
    name = f"test-fa-{uuid.uuid4().hex[:8]}"
    connection = Pools(name, config=ManagerConfig(check_interval=0.5, drain_grace=0.1, drain_timeout=2))
    try:
        yield connection
    finally:
        connection.close()
        stop_manager(name, drain_timeout=0)


def fast_pool(pools: Pools, name: str, config: dict[str, Any], **pool: Any) -> PoolClient:
    spec = AgentSpec.model_validate(
        {
            "name": name,
            "class": "factory.fastagent:FastAgent",
            "pool": {"num_cpus": 0.1, "max_concurrency": 4, **pool},
            "config": config,
        }
    )
    return pools.ensure(spec, search_path=[FIXTURES])


def result(outcome: Outcome) -> Any:
    assert outcome.ok, outcome.error
    return json.loads(outcome.output_json or "null")


def test_a_passthrough_agent_serves_concurrent_jobs_with_structured_output(pools: Pools) -> None:
    client = fast_pool(pools, "fa-pass", {"model": "passthrough", "outputs": {"invoice": "fa_outputs:Invoice"}})
    texts = [f"job number {i} {uuid.uuid4().hex[:6]}" for i in range(8)]
    outcomes: list[Outcome] = ray.get([client.submit({"text": t}) for t in texts], timeout=120)
    assert [result(o)["text"] for o in outcomes] == texts
    assert all(result(o)["usage"] is None for o in outcomes)  # passthrough reports no tokens

    answer = json.dumps({"number": "INV-7", "total": 12.5})
    data = client.ask({"text": f"{FIXED} {answer}", "output": "invoice"}, timeout=60)
    assert data["data"] == {"number": "INV-7", "total": 12.5}

    bad: Outcome = ray.get(client.submit({"text": f"{FIXED} not an invoice", "output": "invoice"}), timeout=60)
    assert not bad.ok and bad.retryable
    assert bad.error_type == "factory.errors.ModelOutputError" and "Invoice" in (bad.error or "")

    unknown: Outcome = ray.get(client.submit({"text": "x", "output": "receipt"}), timeout=60)
    assert not unknown.ok and not unknown.retryable and "invoice" in (unknown.error or "")


def test_playback_shows_each_job_has_an_agent_of_its_own(pools: Pools) -> None:
    """fast-agent's playback model loads the first message list it sees and answers with its size, then
    plays it back: on an agent shared between jobs, every job after the first would get a played-back turn."""
    client = fast_pool(pools, "fa-playback", {"model": "playback"}, max_concurrency=6)
    sizes = [1, 2, 3, 4, 5, 6]
    outcomes: list[Outcome] = ray.get(
        [client.submit({"messages": [f"m{i}" for i in range(n)]}) for n in sizes], timeout=120
    )
    assert [result(o)["text"] for o in outcomes] == [f"HISTORY LOADED ({n}) messages" for n in sizes]


def test_fast_agents_systemexit_is_a_config_error_and_the_process_lives(monkeypatch: pytest.MonkeyPatch) -> None:
    """fast-agent reports some configuration errors with SystemExit; in this process (as in a replica) it
    becomes a ModelConfigError (not retried) and an unhealthy report, and fast-agent's loop keeps running."""
    import asyncio

    from fast_agent.llm.model_factory import ModelFactory

    from factory.errors import ModelConfigError
    from factory.fastagent import FastAgent
    from factory.fastagent.runtime import FastAgentRuntime

    def exits(*args: Any, **kwargs: Any) -> Any:
        raise SystemExit(1)

    monkeypatch.setattr(ModelFactory, "create_factory", staticmethod(exits))
    agent = FastAgent({"model": "passthrough", "instruction": "exit test"})
    health = asyncio.run(agent.health())
    assert not isinstance(health, bool) and not health.healthy and "exit code 1" in health.detail
    with pytest.raises(ModelConfigError, match="exit code 1") as caught:
        asyncio.run(agent.handle(agent.prepare_task({"text": "hi"})))
    assert caught.value.retryable is False
    monkeypatch.undo()
    assert FastAgentRuntime.get().thread.is_alive()
    again = FastAgent({"model": "passthrough", "instruction": "after the exit"})
    assert asyncio.run(again.handle(again.prepare_task({"text": "still here"})))["text"] == "still here"


def test_jobs_on_one_replica_never_share_a_conversation_and_usage_is_per_job(
    pools: Pools, standin: ChatStandIn
) -> None:
    standin.mode = "ok"
    standin.requests.clear()
    config = {"model": "generic.tiny-local", "base_url": standin.url, "instruction": "Be brief.", "use_history": True}
    client = fast_pool(pools, "fa-generic", config, max_replicas=1)
    texts = [f"question {i}" for i in range(5)]
    outcomes: list[Outcome] = ray.get([client.submit({"text": t}) for t in texts], timeout=120)
    for outcome in outcomes:
        out = result(outcome)
        assert out["text"] == standin.reply
        usage = out["usage"]
        assert (usage["input_tokens"], usage["output_tokens"], usage["requests"]) == (
            PROMPT_TOKENS,
            COMPLETION_TOKENS,
            1,
        )
        assert usage["models"]["tiny-local"]["input_tokens"] == PROMPT_TOKENS
    # Every request the provider saw is one system message and this job's message: no other job's turns.
    asked = sorted(r["messages"][-1]["content"] for r in standin.requests[-5:])
    assert sorted(texts) == [a if isinstance(a, str) else a[0]["text"] for a in asked]
    assert all([m["role"] for m in r["messages"]] == ["system", "user"] for r in standin.requests[-5:])
    assert {r["model"] for r in standin.requests} == {"tiny-local"}


@pytest.mark.parametrize(
    ("mode", "error_type"),
    [
        ("rate_limit", "factory.errors.ModelRateLimitError"),
        ("malformed", "factory.errors.ModelProviderError"),
        ("hang", "factory.errors.ModelTimeoutError"),
    ],
)
def test_provider_failures_become_retryable_factory_errors_and_the_replica_lives(
    pools: Pools, standin: ChatStandIn, mode: str, error_type: str
) -> None:
    config = {"model": "generic.tiny-local", "base_url": standin.url, "timeout_seconds": 2}
    client = fast_pool(pools, "fa-failing", config, max_replicas=1)
    (replica,) = client.handles().values()
    pid = ray.get(replica.ready.remote())
    standin.mode = mode  # type: ignore[assignment]
    standin.hang_seconds = 5
    try:
        outcome: Outcome = ray.get(client.submit({"text": "anything"}), timeout=60)
    finally:
        standin.mode = "ok"
    assert not outcome.ok and outcome.retryable
    assert outcome.error_type == error_type, outcome.error
    assert "tiny-local" in (outcome.error or "")
    # The same replica (same process) still serves, and says it is healthy.
    assert ray.get(replica.ready.remote()) == pid
    assert result(ray.get(client.submit({"text": "again"}), timeout=60))["text"] == standin.reply
    assert ray.get(replica.health.remote()).healthy


def test_a_replicas_mcp_server_is_started_once_and_serves_every_job(pools: Pools) -> None:
    """The replica opens its MCP servers once; concurrent jobs' agents call tools through them."""
    server = {"command": sys.executable, "args": [str(Path(FIXTURES) / "mcp_pid_server.py")]}
    client = fast_pool(pools, "fa-tools", {"model": "passthrough", "servers": {"tools": server}}, max_concurrency=4)
    batches = []
    for _ in range(2):
        refs = [client.submit({"text": "***CALL_TOOL tools__whoami {}"}) for _ in range(4)]
        batches.append([result(o)["text"] for o in ray.get(refs, timeout=120)])
    pids = {pid for batch in batches for pid in batch}
    assert len(pids) == 1 and next(iter(pids)).isdigit()  # one server process for all eight jobs
    call = "***CALL_TOOL tools__echo " + json.dumps({"text": "through MCP"})
    echoed: Outcome = ray.get(client.submit({"text": call}), timeout=60)
    assert result(echoed)["text"] == "echo: through MCP"
    replica_id = echoed.extra["replica"]

    # The server process dies: the replica reports it unhealthy, the manager replaces the replica, and
    # the new replica's server answers. (Meanwhile fast-agent gives the model the failed tool call as text.)
    (before,) = pids
    os.kill(int(before), signal.SIGKILL)
    seen: list[str] = []
    deadline = time.monotonic() + 60
    answers: list[str | None] = []
    while time.monotonic() < deadline:
        outcome: Outcome = ray.get(client.submit({"text": "***CALL_TOOL tools__whoami {}"}), timeout=60)
        answers.append(result(outcome)["text"] if outcome.ok else outcome.error)
        for info in pools.discover("fa-tools", refresh=True):
            seen += [r.detail for r in info.replica_details if not r.healthy]
        if outcome.ok and answers[-1] != before and str(answers[-1]).isdigit():
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"no new MCP server process served after the old one died: {answers}")
    assert outcome.extra["replica"] != replica_id
    assert "MCP server(s) not answering: tools" in seen


def test_the_slow_model_past_the_timeout_is_a_retryable_timeout(pools: Pools) -> None:
    client = fast_pool(pools, "fa-slow", {"model": "slow", "timeout_seconds": 0.5})
    started = time.monotonic()
    outcome: Outcome = ray.get(client.submit({"text": "hello"}), timeout=60)
    assert time.monotonic() - started < 3
    assert not outcome.ok and outcome.retryable and outcome.error_type == "factory.errors.ModelTimeoutError"


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"model": "nosuchprovider.some-model"}, "not a fast-agent model"),
        ({"model": "passthrough", "servers": {"tools": {"command": "/nonexistent/mcp-server"}}}, "MCP server"),
    ],
)
def test_a_replica_whose_fast_agent_cannot_start_is_unhealthy_with_the_reason(
    pools: Pools, config: dict[str, Any], reason: str
) -> None:
    name = f"fa-broken-{uuid.uuid4().hex[:4]}"
    client = fast_pool(pools, name, config, max_replicas=1)
    outcome: Outcome = ray.get(client.submit({"text": "hello"}), timeout=60)
    assert not outcome.ok and reason in (outcome.error or "")
    expected_retry = "servers" in config  # a bad model never gets better; a server may come back
    assert outcome.retryable is expected_retry
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (info,) = pools.discover(name, refresh=True)
        details = [r.detail for r in info.replica_details if not r.healthy]
        if details:
            break
        time.sleep(0.2)
    assert info.health in ("down", "degraded") and reason in details[0] and "cannot start" in details[0]
    assert any(reason in p for p in pool_view(info)["problems"])  # what `factory agents` and GET /v1/agents show
    pools.unregister(name, drain_timeout=0)


def test_the_fast_agent_chain_example_runs_offline(factory_home: Path, settings: Any) -> None:
    store = SQLiteStore(factory_home / "factory.db")
    try:
        run = factory.run(CHAIN / "workflow.yaml", store=store, settings=settings, agents=CHAIN / "agents.yaml")
        assert run.ok, run.error
        out = run.outputs
        topic = "the release notes of version 1.2"
        outline = out["outline"]["result"]["text"]
        assert outline == f"Write an outline of {topic}, in at most 3 points."
        assert out["draft"]["result"]["text"] == f"Write an outline of {outline}, in at most 3 points."
        assert out["facts"]["result"]["data"] == {"title": topic, "points": 3}
        assert out["facts"]["agent"] == "facts" and out["draft"]["replica"].startswith("writer-")
    finally:
        store.close()
        stop_manager(DEFAULT_MANAGER_NAME, drain_timeout=0)


def test_a_workflow_step_retries_a_rate_limit_and_status_shows_its_tokens(
    factory_home: Path, settings: Any, standin: ChatStandIn
) -> None:
    """The first attempt meets a 429 from the stand-in provider, the retry succeeds; usage is durable."""
    config = {"model": "generic.tiny-local", "base_url": standin.url}
    spec = AgentSpec.model_validate(
        {"name": "fa-step", "class": "factory.fastagent:FastAgent", "pool": {"num_cpus": 0.1}, "config": config}
    )
    standin.mode = "ok"
    standin.limit_next = 3  # the first attempt's request and the SDK's own two retries
    flow = Workflow(
        name="fa-retry",
        steps=[Step(id="ask", agent="fa-step", with_={"text": "hello"}, retry=RetryPolicy(max_attempts=3, backoff=0))],
    )
    store = SQLiteStore(factory_home / "factory.db")
    try:
        run = factory.run(flow, store=store, settings=settings, agents=Catalog(agents=[spec]))
        assert run.ok, run.error
        assert run.outputs["ask"]["result"]["usage"]["input_tokens"] == PROMPT_TOKENS
        events = [(e.type, e.data) for e in store.events(run_id=run.run_id)]
        retried = [data for kind, data in events if kind == "step.retrying"]
        assert len(retried) == 1 and "ModelRateLimitError" in retried[0]["error"]
        assert [data["attempt"] for kind, data in events if kind == "step.succeeded"] == [2]
    finally:
        store.close()
        stop_manager(DEFAULT_MANAGER_NAME, drain_timeout=0)
        standin.limit_next = 0
    shown = CliRunner().invoke(app, ["status", run.run_id], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert f"{PROMPT_TOKENS} in / {COMPLETION_TOKENS} out" in shown.output
    assert f"tokens: {PROMPT_TOKENS} in / {COMPLETION_TOKENS} out" in shown.output


def test_an_agent_steps_answer_streams_as_emitted_events(
    factory_home: Path, settings: Any, standin: ChatStandIn
) -> None:
    """The stand-in provider streams its reply word by word; the step publishes each piece as it comes
    (step.emitted events, `{delta}`), then commits the whole answer; `stream: false` publishes none."""
    standin.mode = "ok"
    store = SQLiteStore(factory_home / "factory.db")
    try:
        for stream in (True, False):
            config = {"model": "generic.tiny-local", "base_url": standin.url, "stream": stream}
            spec = AgentSpec.model_validate(
                {"name": f"fa-stream-{stream}".lower(), "class": "factory.fastagent:FastAgent", "config": config}
            )
            flow = Workflow(name="fa-stream", steps=[Step(id="ask", agent=spec.name, with_={"text": "hi"})])
            run = factory.run(flow, store=store, settings=settings, agents=Catalog(agents=[spec]))
            assert run.ok, run.error
            assert run.outputs["ask"]["result"]["text"] == standin.reply
            emitted = [e for e in store.events(run_id=run.run_id) if e.type == "step.emitted"]
            deltas = [item["delta"] for e in emitted for item in e.data["items"]]
            if stream:
                assert len(deltas) == len(standin.reply.split()) > 1
                assert "".join(deltas) == standin.reply and all(e.step_id == "ask" for e in emitted)
            else:
                assert deltas == []
    finally:
        store.close()
        stop_manager(DEFAULT_MANAGER_NAME, drain_timeout=0)


def test_an_agent_steps_tool_calls_and_results_are_published_as_events(factory_home: Path, settings: Any) -> None:
    """A passthrough agent calls a tool of its MCP server (***CALL_TOOL): the call and its result are
    step.tool_call and step.tool_result events of the step (not step.emitted items), with a key in the
    arguments redacted, and the answer is the tool's result."""
    server = {"command": sys.executable, "args": [str(Path(FIXTURES) / "mcp_pid_server.py")]}
    spec = AgentSpec.model_validate(
        {
            "name": "fa-tool-events",
            "class": "factory.fastagent:FastAgent",
            "pool": {"num_cpus": 0.1},
            "config": {"model": "passthrough", "servers": {"tools": server}},
        }
    )
    secret = "sk-test-0123456789abcdef"
    call = "***CALL_TOOL tools__echo " + json.dumps({"text": f"through MCP, key {secret}"})
    flow = Workflow(name="fa-tools", steps=[Step(id="ask", agent=spec.name, with_={"text": call})])
    store = SQLiteStore(factory_home / "factory.db")
    try:
        run = factory.run(flow, store=store, settings=settings, agents=Catalog(agents=[spec]))
        assert run.ok, run.error
        assert run.outputs["ask"]["result"]["text"] == f"echo: through MCP, key {secret}"
        events = [e for e in store.events(run_id=run.run_id) if e.step_id == "ask"]
        calls = [e.data for e in events if e.type == "step.tool_call"]
        results = [e.data for e in events if e.type == "step.tool_result"]
        assert [c["name"] for c in calls] == ["tools__echo"], events
        assert json.loads(calls[0]["arguments"]) == {"text": "through MCP, key [redacted]"}
        assert results == [
            {"id": calls[0]["id"], "error": False, "text": "echo: through MCP, key [redacted]", "attempt": 1}
        ]
        kinds = [e.type for e in events]
        assert kinds.index("step.tool_call") < kinds.index("step.tool_result") < kinds.index("step.succeeded")
        items = [i for e in events if e.type == "step.emitted" for i in e.data["items"]]
        assert not any("tool_call" in i or "tool_result" in i for i in items)
        assert secret not in json.dumps(calls + results)
    finally:
        store.close()
        stop_manager(DEFAULT_MANAGER_NAME, drain_timeout=0)
