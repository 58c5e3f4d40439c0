"""agent: and route: steps in workflow runs, through the pools and the router, on a real local Ray."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

import factory
from factory.catalog import AgentSpec, Catalog
from factory.engine import RunResult
from factory.pools import DEFAULT_MANAGER_NAME, Pools, stop_manager
from factory.settings import Settings
from factory.spec import RetryPolicy, RouteSpec, Step, Workflow
from factory.store import RunStatus
from factory.store.sqlite import SQLiteStore

REPO = Path(__file__).parent.parent.parent
FIXTURES = str(Path(__file__).parent.parent / "fixtures")
TRIAGE = REPO / "examples" / "agents_triage"

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture
def store(factory_home: Path) -> Iterator[SQLiteStore]:
    """One store backend is enough here: these tests are about agents, not storage."""
    s = SQLiteStore(factory_home / "factory.db")
    yield s
    s.close()


@pytest.fixture(scope="module", autouse=True)
def default_manager(ray_cluster: str) -> Iterator[None]:
    """factory.run uses the default agent manager; stop it (and its pools) after these tests."""
    yield
    stop_manager(DEFAULT_MANAGER_NAME, drain_timeout=0)


def test_triage_example_records_who_served_each_step_and_why(store: SQLiteStore, settings: Settings) -> None:
    result = factory.run(TRIAGE / "workflow.yaml", store=store, settings=settings, agents=TRIAGE / "agents.yaml")
    assert result.ok, result.error
    out = result.outputs

    assert out["classify"]["agent"] == "classifier" and out["classify"]["route"] is None
    assert out["classify"]["result"]["label"] == "invoice"
    assert out["classify"]["replica"].startswith("classifier-")

    fields = out["fields"]  # a route: step without capabilities: the router chose on the text
    assert fields["agent"] == "extractor"
    decision = fields["route"]
    assert decision["agent"] == "extractor" and decision["scorer"] == "lexical"
    assert decision["score"] > max(c["score"] for c in decision["runners_up"])
    assert "translator" in decision["filtered_out"]  # catalogued without a class: cannot run here
    assert fields["result"]["fields"]["invoice_number"] == "INV-2024-0173"

    assert out["summary"]["agent"] == "summarizer" and out["summary"]["route"]["agent"] == "summarizer"
    assert len(out["summary"]["result"]["sentences"]) == 2

    assert out["check_total"]["result"]["stdout"].strip() == "ok"  # 830 + 166 == 996, checked in the sandbox
    report = out["report"]
    assert report["label"] == "invoice" and report["total"] == 996.0 and report["due_date"] == "2024-04-11"
    assert report["routed"] == {"fields": "extractor", "summary": "summarizer"}

    steps = {s.step_id: s for s in store.get_steps(result.run_id)}
    assert steps["fields"].output["route"]["reason"]  # the decision is durable with the output


def test_unknown_agent_and_unrunnable_route_are_reported(store: SQLiteStore, settings: Settings) -> None:
    catalog = Catalog(agents=[AgentSpec(name="elsewhere", capabilities=["translate"], description="Translate.")])
    with pytest.raises(factory.WorkflowValidationError, match="unknown agent 'nobody'"):
        factory.run(
            Workflow(name="t", steps=[Step(id="a", agent="nobody")]), store=store, settings=settings, agents=catalog
        )
    routed = Workflow(
        name="t", steps=[Step(id="a", route=RouteSpec(text="Translate this.", capabilities=["translate"]))]
    )
    result = factory.run(routed, store=store, settings=settings, agents=catalog)
    assert not result.ok
    assert "NoEligibleAgentError" in (result.error or "") and "elsewhere" in (result.error or "")


def test_agent_step_survives_its_replica_being_killed(store: SQLiteStore, settings: Settings) -> None:
    spec = AgentSpec.model_validate(
        {"name": "sleeper", "class": "agent_fixtures:Sleeper", "pool": {"min_replicas": 2, "max_replicas": 2}}
    )
    wf = Workflow(
        name="kill",
        base_dir=FIXTURES,
        steps=[Step(id="slow", agent="sleeper", with_={"sleep": 1.5, "echo": "done"}, retry=RetryPolicy())],
    )
    results: list[RunResult] = []
    runner = threading.Thread(
        target=lambda: results.append(factory.run(wf, store=store, settings=settings, agents=Catalog(agents=[spec])))
    )
    runner.start()
    watcher = Pools()
    try:
        victim = _serving_replica(watcher, "sleeper")
        ray.kill(watcher.client("sleeper").handles()[victim])
        runner.join(timeout=60)
    finally:
        watcher.close()
    (result,) = results
    assert result.ok, result.error  # one attempt (no step retry): the pool retried on the other replica
    assert result.outputs["slow"]["result"]["echo"] == "done"
    assert result.outputs["slow"]["replica"] != victim


def _serving_replica(pools: Pools, name: str, deadline: float = 30.0) -> str:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            handles: dict[str, Any] = pools.client(name).handles()
        except factory.FactoryError:  # not registered yet
            time.sleep(0.05)
            continue
        for replica_id, handle in handles.items():
            if ray.get(handle.health.remote()).in_flight > 0:
                return replica_id
        time.sleep(0.02)
    raise AssertionError(f"no replica of {name} started serving")


def test_resume_serves_agent_steps_from_the_catalogue(store: SQLiteStore, settings: Settings) -> None:
    spec = AgentSpec.model_validate(
        {"name": "greeter", "class": "agent_fixtures:greeter", "config": {"greeting": "welcome"}}
    )
    wf = Workflow(
        name="greet",
        base_dir=FIXTURES,
        inputs={"who": "Ada"},
        steps=[Step(id="hello", agent="greeter", with_={"name": "${inputs.who}", "times": 2})],
    )
    run_id = factory.api.create_run(wf, store=store, settings=settings)
    result = factory.resume(run_id, store=store, settings=settings, agents=Catalog(agents=[spec]))
    assert result.ok, result.error
    assert result.outputs["hello"]["result"] == {"text": "welcome Ada welcome Ada"}
    assert result.outputs["hello"]["agent"] == "greeter"


def test_an_open_breaker_makes_the_router_prefer_another_pool() -> None:
    from factory.breaker import BreakerConfig
    from factory.pools import PoolDispatcher

    catalog = Catalog.model_validate(
        {
            "agents": [
                {
                    "name": "flaky",
                    "class": "agent_fixtures:Flaky",
                    "capabilities": ["work"],
                    "description": "Flaky worker that processes invoices.",
                },
                {
                    "name": "steady",
                    "class": "agent_fixtures:Sleeper",
                    "capabilities": ["work"],
                    "description": "Steady worker for any chore.",
                },
            ]
        }
    )
    name = f"test-breaker-{uuid.uuid4().hex[:8]}"
    pools = Pools(name, breaker=BreakerConfig(failure_threshold=2, cooldown=60))
    dispatcher = PoolDispatcher(catalog, pools=pools, search_path=[FIXTURES])
    try:
        assert dispatcher.route("process these invoices", ["work"]).agent == "flaky"
        step = Step(id="s", agent="flaky", retry=RetryPolicy(max_attempts=1))
        for _ in range(2):  # two retryable failures open flaky's breaker
            outcome = ray.get(dispatcher.submit(step, {"fail": True}))
            assert not outcome.ok and outcome.retryable
        client = pools.clients["flaky"]
        end = time.monotonic() + 10
        while client.breaker.state.value != "open" and time.monotonic() < end:
            time.sleep(0.01)

        decision = dispatcher.route("process these invoices", ["work"])
        assert decision.agent == "steady"
        assert decision.filtered_out["flaky"].startswith("circuit breaker open")
        refused = ray.get(dispatcher.submit(step, {"fail": False}))  # the pool itself refuses too
        assert not refused.ok and refused.retryable and "CircuitOpenError" in (refused.error or "")
    finally:
        dispatcher.close()
        pools.close()
        stop_manager(name, drain_timeout=0)


def test_route_text_with_item_routes_each_item_on_its_own_text(store: SQLiteStore, settings: Settings) -> None:
    memo = "The board met on Monday. Budgets were approved. Hiring resumes in May. The office moves in June."
    invoice = "Invoice INV-77 from Acme. Total due: 120.50 EUR by 2025-03-01."
    wf = Workflow.model_validate(
        {
            "name": "per-item-routing",
            "steps": [
                {
                    "id": "work",
                    "for_each": [
                        {"ask": "Summarize this memo in two sentences.", "text": memo},
                        {"ask": "Pull the invoice number and the total out of this invoice as JSON.", "text": invoice},
                    ],
                    "route": {"text": "${item.ask}"},
                    "with": {"text": "${item.text}"},
                }
            ],
        }
    )
    result = factory.run(wf, store=store, settings=settings, agents=TRIAGE / "agents.yaml")
    assert result.ok, result.error
    summary, fields = result.outputs["work"]
    assert summary["agent"] == "summarizer" and summary["route"]["agent"] == "summarizer"
    assert fields["agent"] == "extractor" and fields["route"]["agent"] == "extractor"
    assert fields["result"]["fields"]["invoice_number"] == "INV-77"


def test_route_text_with_an_unknown_reference_fails_the_step(store: SQLiteStore, settings: Settings) -> None:
    wf = Workflow.model_validate(
        {
            "name": "bad-ref",
            "inputs": {"ask": "Summarize this."},
            "steps": [
                {"id": "a", "for_each": [{"ask": "x"}], "route": {"text": "${item.missing}"}, "with": {"text": "t"}}
            ],
        }
    )
    result = factory.run(wf, store=store, settings=settings, agents=TRIAGE / "agents.yaml")
    assert not result.ok
    assert "missing" in (result.error or "")


def test_router_passes_over_an_agent_no_node_can_place(store: SQLiteStore, settings: Settings) -> None:
    """The session's Ray has 4 CPUs and no GPU: a pool whose replicas need a GPU would wait for ever."""
    from factory.pools import PoolDispatcher

    catalog = Catalog.model_validate(
        {
            "agents": [
                {"name": "gpu_summarizer", "class": "agents.text:Summarizer", "pool": {"num_gpus": 1}},
                {"name": "summarizer", "class": "agents.text:Summarizer", "pool": {"num_cpus": 0.1}},
                {"name": "hungry", "class": "agents.text:Summarizer", "pool": {"resources": {"tpu_slice": 1}}},
            ]
        }
    )
    dispatcher = PoolDispatcher(catalog)
    try:
        health = dispatcher.health()
        assert health["gpu_summarizer"].unplaceable == "no node has GPU 1 (the largest node has GPU 0)"
        assert health["hungry"].unplaceable == "no node has tpu_slice 1 (the largest node has tpu_slice 0)"
        assert health["summarizer"].unplaceable is None
        decision = dispatcher.route("Summarize this report in two sentences.")
        assert decision.agent == "summarizer"
        assert decision.filtered_out["gpu_summarizer"].startswith("cannot be placed: no node has GPU 1")
    finally:
        dispatcher.close()

    # In a workflow: a route step asking for a GPU finds no agent, and the step says why.
    wf = Workflow.model_validate(
        {
            "name": "needs-gpu",
            "steps": [
                {"id": "s", "route": {"text": "Summarize this.", "resources": {"GPU": 1}}, "with": {"text": "x"}}
            ],
        }
    )
    result = factory.run(wf, store=store, settings=settings, agents=catalog)
    assert not result.ok
    assert "cannot be placed: no node has GPU 1" in (result.error or "")
    assert "lacks resources: GPU 1" in (result.error or "")


def run_in_background(
    wf: Workflow, store: SQLiteStore, settings: Settings, catalog: Catalog
) -> tuple[threading.Thread, list[str], list[RunResult]]:
    """factory.run in a thread of its own: the thread, the run's id once started, its result once done."""
    started: list[str] = []
    results: list[RunResult] = []
    runner = threading.Thread(
        target=lambda: results.append(
            factory.run(wf, store=store, settings=settings, agents=catalog, on_start=started.append)
        )
    )
    runner.start()
    return runner, started, results


def test_cancel_stops_an_agent_step_in_flight(store: SQLiteStore, settings: Settings) -> None:
    spec = AgentSpec.model_validate({"name": "sleeper", "class": "agent_fixtures:Sleeper"})
    wf = Workflow(
        name="cancel-agent",
        base_dir=FIXTURES,
        steps=[
            Step(id="slow", agent="sleeper", with_={"sleep": 30, "echo": "late"}),
            Step(id="after", python="teststeps:echo", with_={"value": "${steps.slow.output}"}),
        ],
    )
    runner, started, results = run_in_background(wf, store, settings, Catalog(agents=[spec]))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
        started and {s.step_id: s.status.value for s in store.get_steps(started[0])}.get("slow") == "running"
    ):
        time.sleep(0.05)
    begun = time.monotonic()
    assert factory.cancel(started[0], store=store)
    runner.join(30)
    assert results and results[0].status.value == "cancelled"
    assert time.monotonic() - begun < 15  # not the 30 s the agent would have slept
    steps = {s.step_id: s.status.value for s in store.get_steps(started[0])}
    assert steps == {"slow": "cancelled", "after": "cancelled"}


def test_an_uncertain_route_step_fails_for_a_person_to_choose(store: SQLiteStore, settings: Settings) -> None:
    """routing: {min_confidence, when_uncertain: fail}: the step fails, naming the two best agents,
    and is not retried (the same text would meet the same doubt)."""
    from factory.catalog import RoutingPolicy

    agents = [
        {"name": name, "class": "tests.fixtures.agent_fixtures:Sleeper", "capabilities": ["work"], "description": text}
        for name, text in (("left", "Handle paperwork for the office."), ("right", "Handle paperwork, the office's."))
    ]
    unsure = Catalog.model_validate({"agents": agents})
    unsure.routing = RoutingPolicy(min_confidence=1.0, when_uncertain="fail")  # two agents: always in doubt
    routed = Workflow(
        name="unsure",
        steps=[Step(id="a", route=RouteSpec(text="Handle this paperwork."), retry=RetryPolicy(max_attempts=3))],
    )
    result = factory.run(routed, store=store, settings=settings, agents=unsure)
    assert not result.ok
    assert "UncertainRouteError" in (result.error or "") and "left or right" in (result.error or "")
    assert store.get_steps(result.run_id)[0].attempts == 1


def test_an_agent_streams_tokens_through_the_step_context(store: SQLiteStore, settings: Settings) -> None:
    spec = AgentSpec.model_validate({"name": "streamer", "class": "agent_fixtures:Streamer"})
    text = "the quick brown fox jumps over the lazy dog"
    wf = Workflow(name="stream", base_dir=FIXTURES, steps=[Step(id="speak", agent="streamer", with_={"text": text})])
    result = factory.run(wf, store=store, settings=settings, agents=Catalog(agents=[spec]))
    assert result.ok, result.error
    assert result.outputs["speak"]["result"] == {"words": 9, "step": "speak", "once": "refused"}
    assert "_factory_step_context" not in result.outputs["speak"]  # the context is not part of the output
    events = store.events(0, result.run_id)
    tokens = [t for e in events if e.type == "step.emitted" and e.step_id == "speak" for t in e.data["items"]]
    assert " ".join(tokens) == text
    progress = [e.data for e in events if e.type == "step.progress"]
    assert progress[-1]["fraction"] == 1.0 and progress[-1]["message"] == "token 9"


def test_a_pool_that_starts_slowly_does_not_cost_the_run_its_lease(store: SQLiteStore, settings: Settings) -> None:
    """Starting the pool blocks the coordinator's loop for longer than the lease; the lease is
    kept meanwhile, so no other coordinator may take the live run over."""
    quick = settings.model_copy(update={"lease_seconds": 1.0, "heartbeat_seconds": 0.25})
    spec = AgentSpec.model_validate(
        {"name": f"slow-{uuid.uuid4().hex[:6]}", "class": "agent_fixtures:SlowStart", "config": {"start_seconds": 4}}
    )
    wf = Workflow(name="slow-start", base_dir=FIXTURES, steps=[Step(id="a", agent=spec.name, with_={"echo": 1})])
    run_id = factory.api.create_run(wf, store=store, settings=quick)
    results: list[RunResult] = []
    catalog = Catalog(agents=[spec])
    runner = threading.Thread(
        target=lambda: results.append(factory.resume(run_id, store=store, settings=quick, agents=catalog))
    )
    runner.start()
    taken = False
    while runner.is_alive() and not taken:  # another coordinator tries to take the run all along
        time.sleep(0.2)
        run = store.get_run(run_id)
        if run is not None and run.owner is not None and store.claim_run(run_id, "intruder", quick.lease_seconds):
            after = store.get_run(run_id)  # (a run that just ended has no lease left to keep)
            taken = after is not None and after.status in (RunStatus.PENDING, RunStatus.RUNNING)
    runner.join(timeout=60)
    assert not taken, "the run was taken over from its live coordinator while its pool started"
    (result,) = results
    assert result.ok, result.error
    assert result.outputs["a"]["result"] == {"echo": 1}


def test_cancelling_a_run_stops_its_async_agents_call_on_the_replica(store: SQLiteStore, settings: Settings) -> None:
    """The run's cancel reaches the replica: the async agent's call is cancelled there (the replica
    has nothing in flight long before the agent's 30 s sleep would end), not left running."""
    spec = AgentSpec.model_validate(
        {"name": f"async-sleeper-{uuid.uuid4().hex[:6]}", "class": "agent_fixtures:AsyncSleeper"}
    )
    wf = Workflow(name="cancel-async", base_dir=FIXTURES, steps=[Step(id="slow", agent=spec.name, with_={"sleep": 30})])
    runner, started, results = run_in_background(wf, store, settings, Catalog(agents=[spec]))
    watcher = Pools()
    try:
        victim = _serving_replica(watcher, spec.name)
        handle = watcher.client(spec.name).handles()[victim]
        assert factory.cancel(started[0], store=store)
        runner.join(30)
        assert results and results[0].status.value == "cancelled"
        deadline = time.monotonic() + 10
        while ray.get(handle.health.remote()).in_flight and time.monotonic() < deadline:
            time.sleep(0.1)
        health = ray.get(handle.health.remote())
    finally:
        watcher.close()
    assert health.in_flight == 0 and health.served == 0  # cancelled: neither served nor still running
