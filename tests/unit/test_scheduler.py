"""The scheduler alone: no Ray, no store, no clock.

A fake driver (``FakeRay`` below) carries out the scheduler's actions the way the real one
does on Ray: an eager attempt runs only once the results it was given are there, and returns
``skipped`` when one of them failed; a worker that dies fails every attempt given its result.
Property-based tests drive random DAGs through random outcomes, cancels and coordinator
crashes followed by a resume, and check what the engine promises.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factory.dag import build_graph
from factory.outcome import Outcome
from factory.scheduler import (
    MAX_NODE_LOSSES,
    Action,
    ProposeDecision,
    Publish,
    RunScheduler,
    Stop,
    SubmitCall,
    SubmitStep,
)
from factory.spec import ApprovalSpec, RetryPolicy, Step, Workflow
from factory.store import (
    FINAL_STEP_STATUSES,
    ApprovalRecord,
    Change,
    EventChange,
    ItemChange,
    ItemRecord,
    RunChange,
    RunStatus,
    StepChange,
    StepRecord,
    StepStatus,
)

pytestmark = pytest.mark.unit

_CRASHED = "crashed"  # an eager result whose worker died: every attempt given it fails too


@dataclass
class _Ref:
    value: Outcome | str | None = None  # None: not there yet


@dataclass
class _Task:
    step_id: str
    index: int | None
    ref: _Ref
    deps: list[_Ref] = field(default_factory=list)


class FakeRay:
    """A driver for the scheduler with the semantics of Ray and a store, in memory."""

    def __init__(self, workflow: Workflow, max_items_in_flight: int = 3, max_ahead: int = 4) -> None:
        self.workflow = workflow
        self.graph = build_graph(workflow)
        self.max_items_in_flight = max_items_in_flight
        self.max_ahead = max_ahead
        self.now = 0.0
        self.steps = {s.id: StepRecord(run_id="r", step_id=s.id, status=StepStatus.PENDING) for s in workflow.steps}
        self.items: dict[tuple[str, int], ItemRecord] = {}
        self.log: list[Change] = []  # committed, in order
        self.pending: list[Change] = []  # decided, not yet committed
        self.committed_units: set[tuple[str, int | None]] = set()
        self.runs = Counter[tuple[str, int | None]]()  # user code runs per step / item
        self.twice: list[tuple[str, int | None]] = []  # user code run again after its result was committed
        self.resubmitted_items: list[tuple[str, int]] = []
        self.violations: list[str] = []
        self.decisions: dict[str, ApprovalRecord] = {}  # durable, as the approvals table
        self.sessions = 0
        self._open(resumed=False)

    # -- a coordinator's life --

    def _open(self, resumed: bool) -> None:
        self.sessions += 1
        self.scheduler = RunScheduler(
            self.workflow,
            self.graph,
            "r",
            {},
            max_output_bytes=1_000_000,
            max_for_each_items=1000,
            max_items_in_flight=self.max_items_in_flight,
            max_ahead=self.max_ahead,
        )
        self.refs: dict[str, _Ref] = {}
        self.tasks: dict[int, _Task] = {}
        self.done: list[tuple[int, str, Outcome | str, bool]] = []  # finished in Ray, not yet handed over
        done = 0
        if resumed:
            done = self.scheduler.restore(self.steps.values(), self.items.values())
            used = [c for c in self.log if isinstance(c, EventChange) and c.event == "run.usage"]
            if used:
                self.scheduler.restore_usage(used[-1].data)
        self._apply(self.scheduler.start(self.now, resumed=resumed, already_done=done))
        for decision in self.decisions.values() if resumed else []:
            self._apply(self.scheduler.on_decision(decision, self.now))

    def crash(self) -> None:
        """The coordinator dies: what it decided but did not commit is lost, its attempts die
        with it (Ray kills the tasks of a dead owner); then `factory resume`."""
        self.pending.clear()
        self.scheduler.take_changes()
        self._open(resumed=True)

    def _apply(self, actions: list[Action]) -> None:
        self.pending += self.scheduler.take_changes()
        for action in actions:
            if isinstance(action, SubmitStep):
                deps = [self.refs[d] for d in self.graph.deps[action.step_id]]
                ref = _Ref()
                self.refs[action.step_id] = ref
                self.tasks[action.token] = _Task(action.step_id, None, ref, deps)
            elif isinstance(action, SubmitCall):
                if action.step_id in self.workflow_for_each and (action.step_id, action.index) in self.items:
                    self.resubmitted_items.append((action.step_id, action.index))
                self.tasks[action.token] = _Task(action.step_id, action.index, _Ref())
            elif isinstance(action, Publish):
                self.refs[action.step_id] = _Ref(Outcome(ok=True, output_json=action.output_json))
            elif isinstance(action, ProposeDecision):  # the store keeps the first decision
                standing = self.decisions.setdefault(action.decision.step_id, action.decision)
                self._apply(self.scheduler.on_decision(standing, self.now))
            elif isinstance(action, Stop):
                self.tasks.pop(action.token, None)
                self.done = [d for d in self.done if d[0] != action.token]

    @property
    def workflow_for_each(self) -> set[str]:
        return {s.id for s in self.workflow.steps if s.for_each is not None}

    def flush(self) -> None:
        for change in self.pending:
            self._commit(change)
        self.pending.clear()

    def _commit(self, change: Change) -> None:
        self.log.append(change)
        if isinstance(change, StepChange):
            record = self.steps[change.step_id]
            record.status = change.status
            if change.attempts is not None:
                record.attempts = change.attempts
            if change.status == StepStatus.SUCCEEDED:
                record.output_json = change.output_json
                self.committed_units.add((change.step_id, None))
            if change.status == StepStatus.WAITING and record.started_at is None:
                record.started_at = self.now
        elif isinstance(change, ItemChange):
            self.items[(change.step_id, change.index)] = ItemRecord(
                run_id="r",
                step_id=change.step_id,
                index=change.index,
                total=change.total,
                output_json=change.output_json,
                attempts=change.attempts,
            )
            self.committed_units.add((change.step_id, change.index))

    # -- Ray --

    def ready(self) -> list[int]:
        return [t for t, task in self.tasks.items() if all(d.value is not None for d in task.deps)]

    def complete(self, token: int, kind: str) -> None:
        """Ray finishes an attempt (the driver has not seen it yet): ``kind`` is ok, retryable,
        fatal, crash (its worker dies) or node (its node dies)."""
        task = self.tasks.pop(token)
        node_lost = False
        dep_values = [d.value for d in task.deps]
        if any(v == _CRASHED for v in dep_values):
            value: Outcome | str = _CRASHED
        elif any(isinstance(v, Outcome) and not v.ok for v in dep_values):
            value = Outcome(ok=False, skipped=True)
        else:
            index = task.index if task.index is not None and task.step_id in self.workflow_for_each else None
            unit = (task.step_id, index)
            if unit in self.committed_units:
                self.twice.append(unit)
            self.runs[unit] += 1
            if kind == "ok":
                value = Outcome(ok=True, output_json=json.dumps(f"{task.step_id}:{task.index}"))
            elif kind == "retryable":
                value = Outcome(ok=False, error="RuntimeError: flaky", retryable=True)
            elif kind == "fatal":
                value = Outcome(ok=False, error="ValueError: bad input", retryable=False)
            else:
                value, node_lost = _CRASHED, kind == "node"
        task.ref.value = value
        self.done.append((token, task.step_id, value, node_lost))

    def collect(self, pick: int = 0) -> None:
        """The driver hands one finished attempt's result to the scheduler (in any order: Ray
        returns a sweep of results, a dependant's sometimes before its dependency's)."""
        token, step_id, value, node_lost = self.done.pop(pick % len(self.done))
        if value == _CRASHED:
            outcome = Outcome(ok=False, error="the worker process running the attempt died", retryable=True)
        else:
            assert isinstance(value, Outcome)
            outcome = value
        before = len(self.pending)
        self._apply(self.scheduler.on_result(token, outcome, self.now, node_lost=node_lost))
        if isinstance(value, Outcome) and not value.ok and not value.retryable and not value.skipped:
            for change in self.pending[before:]:
                if isinstance(change, StepChange) and change.step_id == step_id and change.event == "step.retrying":
                    self.violations.append(f"{step_id}: a non-retryable failure was retried")

    def finish_now(self, token: int, kind: str) -> None:
        self.complete(token, kind)
        self.collect(len(self.done) - 1)

    def decide(self, approved: bool) -> None:
        """A person decides at the first gate that waits (the store keeps the first decision)."""
        for step_id in self.scheduler.waiting_gates():
            if step_id in self.decisions:
                continue
            record = ApprovalRecord(run_id="r", step_id=step_id, approved=approved, by="t", decided_at=self.now)
            self.decisions[step_id] = record
            self._apply(self.scheduler.on_decision(record, self.now))
            return

    def tick(self, seconds: float) -> None:
        self.now += seconds
        self._apply(self.scheduler.on_time(self.now))

    def cancel(self) -> None:
        self._apply(self.scheduler.cancel("cancel requested"))
        self.tasks.clear()
        self.done.clear()

    def drive_to_end(self, limit: int = 10_000) -> None:
        """Every attempt from now on succeeds; time passes as needed."""
        for _ in range(limit):
            if self.scheduler.finished:
                break
            ready = self.ready()
            if self.done:
                self.collect(len(self.done) - 1)  # newest first: dependants before dependencies
            elif ready:
                self.complete(ready[0], "ok")
            elif self.scheduler.next_deadline() is not None:
                self.tick(max(0.0, (self.scheduler.next_deadline() or 0) - self.now) + 0.001)
            elif self.scheduler.parked:
                self.decide(True)
            else:
                break
            self.flush()
        self.flush()

    def finish(self) -> RunStatus:
        verdict = self.scheduler.finish()
        self.pending += self.scheduler.take_changes()
        self.flush()
        return verdict.status


# -- workflows ------------------------------------------------------------------------------------


def _step(i: int, needs: list[str], items: int | None, attempts: int, gate: bool = False) -> Step:
    retry = RetryPolicy(max_attempts=attempts, backoff=0.01, jitter=False)
    if gate:
        return Step(id=f"s{i}", needs=needs, approval=ApprovalSpec(message="go?", on_reject="fail"))
    if items is not None:
        return Step(id=f"s{i}", python="m:f", needs=needs, for_each=list(range(items)), retry=retry)
    return Step(id=f"s{i}", python="m:f", needs=needs, retry=retry)


@st.composite
def workflows(draw: st.DrawFn) -> Workflow:
    n = draw(st.integers(min_value=1, max_value=7))
    steps = []
    for i in range(n):
        needs = sorted(draw(st.sets(st.sampled_from([f"s{j}" for j in range(i)]), max_size=3))) if i else []
        items = draw(st.one_of(st.none(), st.integers(min_value=0, max_value=6)))
        attempts = draw(st.integers(min_value=1, max_value=3))
        gate = draw(st.integers(min_value=0, max_value=5)) == 0
        steps.append(_step(i, needs, items, attempts, gate))
    return Workflow(name="w", steps=steps)


OPS = st.sampled_from(
    ["ok"] * 10
    + ["collect"] * 8
    + ["retryable"] * 3
    + ["fatal", "crash", "node", "tick", "tick", "flush", "flush", "cancel", "resume", "approve", "approve", "reject"]
)


def _play(sim: FakeRay, ops: list[str], picks: list[int]) -> None:
    for n, op in enumerate(ops):
        if sim.scheduler.finished:
            break
        if op in ("ok", "retryable", "fatal", "crash", "node"):
            ready = sim.ready()
            if ready:
                sim.complete(ready[picks[n % len(picks)] % len(ready)], op)
        elif op == "collect":
            if sim.done:
                sim.collect(picks[n % len(picks)])
        elif op == "tick":
            sim.tick(0.02)
        elif op == "flush":
            sim.flush()
        elif op == "cancel":
            sim.cancel()
            break
        elif op == "resume":
            sim.crash()
        elif op in ("approve", "reject"):
            sim.decide(op == "approve")


# -- the properties ------------------------------------------------------------------------------


def _check(sim: FakeRay, status: RunStatus) -> None:
    assert not sim.violations, sim.violations
    # a step or an item whose result was committed never runs again, resume or not
    assert not sim.twice, f"ran again after its result was committed: {sim.twice}"
    assert not sim.resubmitted_items
    statuses = {sid: r.status for sid, r in sim.steps.items()}
    assert all(s in FINAL_STEP_STATUSES for s in statuses.values()), statuses
    graph = sim.graph
    # the run's status agrees with its steps
    if status == RunStatus.SUCCEEDED:
        assert all(s == StepStatus.SUCCEEDED for s in statuses.values())
    elif status == RunStatus.FAILED:
        assert StepStatus.FAILED in statuses.values()
        # a failed step skips exactly its descendants (those not finished before)
        failed = {sid for sid, s in statuses.items() if s == StepStatus.FAILED}
        below = set().union(*(graph.descendants(f) for f in failed))
        for sid, s in statuses.items():
            if s == StepStatus.SKIPPED:
                assert sid in below, f"{sid} skipped without a failed ancestor"
            if sid in below:
                assert s in (StepStatus.SKIPPED, StepStatus.FAILED), f"{sid} is {s} below a failed step"
                assert s == StepStatus.SKIPPED or sid in failed
    else:
        assert status == RunStatus.CANCELLED
    # events, in commit order: a step starts only after each dependency succeeded; a step's
    # status moves only along the allowed transitions; retries stay within max_attempts
    succeeded: set[str] = set()
    last: dict[str, StepStatus] = {}
    done_states = {StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.CANCELLED}
    allowed = {
        StepStatus.PENDING: {StepStatus.RUNNING, StepStatus.WAITING, StepStatus.SKIPPED, StepStatus.CANCELLED},
        StepStatus.RUNNING: {StepStatus.RUNNING, StepStatus.RETRYING, *done_states},
        StepStatus.RETRYING: {StepStatus.RUNNING, StepStatus.RETRYING, *done_states},
        # an open gate opens again when the run is resumed (its wait goes on)
        StepStatus.WAITING: {StepStatus.WAITING, StepStatus.SKIPPED, *done_states},
        # a resumed run starts again what had not succeeded
        StepStatus.FAILED: {StepStatus.RUNNING, StepStatus.WAITING, StepStatus.SKIPPED, StepStatus.CANCELLED},
        StepStatus.SKIPPED: {StepStatus.RUNNING, StepStatus.WAITING, StepStatus.SKIPPED, StepStatus.CANCELLED},
        StepStatus.CANCELLED: {StepStatus.RUNNING, StepStatus.WAITING, StepStatus.SKIPPED, StepStatus.CANCELLED},
        StepStatus.SUCCEEDED: set(),
    }
    steps = {s.id: s for s in sim.workflow.steps}
    for change in sim.log:
        if not isinstance(change, StepChange):
            continue
        sid = change.step_id
        if change.event in ("step.started", "step.waiting"):
            missing = [d for d in graph.deps[sid] if d not in succeeded]
            assert not missing, f"{sid} started before {missing} succeeded"
        if change.status == StepStatus.SUCCEEDED:
            succeeded.add(sid)
        if change.event == "step.retrying" and not change.data.get("node_lost"):
            assert change.data["attempt"] < steps[sid].retry.max_attempts, change
        previous = last.get(sid, StepStatus.PENDING)
        assert change.status in allowed[previous], f"{sid}: {previous} -> {change.status}"
        last[sid] = change.status
    # every run change is an event of its own, the last one the run's end
    run_events = [c.event for c in sim.log if isinstance(c, RunChange)]
    assert run_events[0] in ("run.started", "run.resumed") and run_events[-1] == f"run.{status.value}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workflow=workflows(),
    ops=st.lists(OPS, max_size=80),
    picks=st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=20),
)
def test_random_runs_keep_every_promise(workflow: Workflow, ops: list[str], picks: list[int]) -> None:
    sim = FakeRay(workflow)
    _play(sim, ops, picks)
    if not sim.scheduler.cancelled:
        sim.drive_to_end()
    sim.flush()
    assert sim.scheduler.finished, "the run did not reach an end: " + str(
        {sid: s.status for sid, s in sim.scheduler.states.items()}
    )
    _check(sim, sim.finish())


@settings(max_examples=100, deadline=None)
@given(workflow=workflows(), ops=st.lists(OPS.filter(lambda o: o != "cancel"), max_size=60))
def test_after_any_crash_a_run_whose_attempts_succeed_succeeds(workflow: Workflow, ops: list[str]) -> None:
    """Crashes, worker deaths and retryable failures never make a run fail when retries are left:
    every step gets max_attempts, node losses on top."""
    workflow = workflow.model_copy(
        update={
            "steps": [
                s.model_copy(update={"retry": RetryPolicy(max_attempts=100, backoff=0.0)}) for s in workflow.steps
            ]
        }
    )
    sim = FakeRay(workflow)
    _play(sim, [o for o in ops if o not in ("fatal", "reject")], [0, 3, 1, 7])
    sim.drive_to_end()
    assert sim.finish() == RunStatus.SUCCEEDED
    _check(sim, RunStatus.SUCCEEDED)
    assert sim.sessions <= 1 + ops.count("resume")


# -- examples ------------------------------------------------------------------------------------


def test_chain_is_submitted_eagerly_and_started_in_order() -> None:
    wf = Workflow(name="w", steps=[_step(0, [], None, 1), _step(1, ["s0"], None, 1), _step(2, ["s1"], None, 1)])
    sim = FakeRay(wf)
    assert sorted(t.step_id for t in sim.tasks.values()) == ["s0", "s1", "s2"]  # all three at once
    capped = FakeRay(wf, max_ahead=2)  # ahead of their dependencies only while fewer than 2 are in flight
    assert sorted(t.step_id for t in capped.tasks.values()) == ["s0", "s1"]
    capped.drive_to_end()
    assert capped.finish() == RunStatus.SUCCEEDED
    started = [c.step_id for c in sim.pending if isinstance(c, StepChange) and c.event == "step.started"]
    assert started == ["s0"]
    sim.drive_to_end()
    assert sim.finish() == RunStatus.SUCCEEDED
    assert sim.runs == Counter({("s0", None): 1, ("s1", None): 1, ("s2", None): 1})


def test_a_dependant_result_before_its_dependency_is_decided_after_it() -> None:
    """Ray can finish a dependant in the same sweep as its dependency, and the driver may hand
    the dependant's result first: it is held until the dependency's success is recorded."""
    wf = Workflow(name="w", steps=[_step(0, [], None, 1), _step(1, ["s0"], None, 1)])
    sim = FakeRay(wf)
    (t0,) = [t for t, task in sim.tasks.items() if task.step_id == "s0"]
    (t1,) = [t for t, task in sim.tasks.items() if task.step_id == "s1"]
    sim.tasks[t0].ref.value = Outcome(ok=True, output_json="1")
    sim.tasks.pop(t0)
    sim._apply(sim.scheduler.on_result(t1, Outcome(ok=True, output_json="2"), 0.0))
    assert sim.scheduler.step_status("s1") == StepStatus.PENDING
    sim._apply(sim.scheduler.on_result(t0, Outcome(ok=True, output_json="1"), 0.0))
    sim.flush()
    events = [(c.step_id, c.event) for c in sim.log if isinstance(c, StepChange)]
    assert events == [
        ("s0", "step.started"),
        ("s0", "step.succeeded"),
        ("s1", "step.started"),
        ("s1", "step.succeeded"),
    ]


def test_a_worker_death_upstream_does_not_leave_the_dependant_waiting_for_ever() -> None:
    wf = Workflow(name="w", steps=[_step(0, [], None, 2), _step(1, ["s0"], None, 1)])
    sim = FakeRay(wf)
    (t0,) = [t for t, task in sim.tasks.items() if task.step_id == "s0"]
    (t1,) = [t for t, task in sim.tasks.items() if task.step_id == "s1"]
    dead = Outcome(ok=False, error="worker died", retryable=True)
    sim.tasks.clear()
    # the dependant's error (its argument's worker died) is handed over first
    sim._apply(sim.scheduler.on_result(t1, dead, 0.0))
    sim._apply(sim.scheduler.on_result(t0, dead, 0.0))
    sim.drive_to_end()
    assert sim.finish() == RunStatus.SUCCEEDED


def test_retryable_failures_retry_until_max_attempts_then_fail_and_skip_descendants() -> None:
    wf = Workflow(name="w", steps=[_step(0, [], None, 3), _step(1, ["s0"], None, 1), _step(2, [], None, 1)])
    sim = FakeRay(wf)
    for _ in range(3):
        (t0,) = [t for t in sim.ready() if sim.tasks[t].step_id == "s0"]
        sim.finish_now(t0, "retryable")
        sim.tick(1.0)
    sim.drive_to_end()
    assert sim.finish() == RunStatus.FAILED
    assert sim.runs[("s0", None)] == 3 and sim.runs[("s1", None)] == 0
    assert {sid: r.status for sid, r in sim.steps.items()} == {
        "s0": StepStatus.FAILED,
        "s1": StepStatus.SKIPPED,
        "s2": StepStatus.SUCCEEDED,
    }
    assert "gave up after 3 attempts" in (sim.scheduler.verdict().error or "")


def test_node_losses_do_not_spend_the_retry_budget_but_are_bounded() -> None:
    wf = Workflow(name="w", steps=[_step(0, [], None, 1)])
    sim = FakeRay(wf)
    for _ in range(MAX_NODE_LOSSES):
        sim.finish_now(sim.ready()[0], "node")
        sim.tick(0.0)
    assert sim.scheduler.step_status("s0") != StepStatus.FAILED
    sim.finish_now(sim.ready()[0], "node")  # one loss too many: the attempt counts as failed
    sim.flush()
    assert sim.scheduler.step_status("s0") == StepStatus.FAILED


def test_fan_out_items_are_committed_one_by_one_and_resume_runs_only_the_rest() -> None:
    wf = Workflow(name="w", steps=[_step(0, [], 10, 1), _step(1, ["s0"], None, 1)])
    sim = FakeRay(wf, max_items_in_flight=4)
    assert len(sim.tasks) == 4  # the rest wait their turn
    for _ in range(6):
        sim.finish_now(sim.ready()[0], "ok")
    sim.flush()
    assert len(sim.items) == 6 and sim.scheduler.items_progress("s0") == (6, 10)
    progress = [c.data for c in sim.log if isinstance(c, EventChange) and c.event == "step.items"]
    assert progress and progress[0] == {"done": 0, "total": 10}
    sim.crash()
    submitted = sorted(t.index for t in sim.tasks.values() if t.index is not None)
    assert submitted == [6, 7, 8, 9]
    sim.drive_to_end()
    assert sim.finish() == RunStatus.SUCCEEDED
    assert all(sim.runs[("s0", i)] == 1 for i in range(10))
    assert json.loads(sim.steps["s0"].output_json or "[]") == [f"s0:{i}" for i in range(10)]


def test_an_item_failing_for_good_stops_its_siblings_and_fails_the_step() -> None:
    wf = Workflow(name="w", steps=[_step(0, [], 5, 1)])
    sim = FakeRay(wf, max_items_in_flight=5)
    sim.finish_now(sim.ready()[0], "fatal")
    sim.flush()
    assert sim.tasks == {}  # the other items were stopped
    assert sim.scheduler.step_status("s0") == StepStatus.FAILED
    assert "item 0: ValueError: bad input (not retried" in (sim.scheduler.verdict().error or "")


def test_cancel_stops_everything_in_flight() -> None:
    wf = Workflow(name="w", steps=[_step(0, [], 3, 1), _step(1, [], None, 1)])
    sim = FakeRay(wf)
    actions = sim.scheduler.cancel("cancel requested")
    assert sorted(a.token for a in actions if isinstance(a, Stop)) == sorted(sim.tasks)
    sim.pending += sim.scheduler.take_changes()
    assert sim.finish() == RunStatus.CANCELLED
    assert {r.status for r in sim.steps.values()} == {StepStatus.CANCELLED}


def test_a_bad_for_each_list_fails_the_step_with_what_to_fix() -> None:
    wf = Workflow(name="w", steps=[Step(id="a", python="m:f", for_each="${inputs.xs}")], inputs={"xs": 3})
    scheduler = RunScheduler(wf, build_graph(wf), "r", {"xs": 3}, max_output_bytes=1000, max_for_each_items=10)
    assert scheduler.start(0.0) == []
    changes = scheduler.take_changes()
    failed = [c for c in changes if isinstance(c, StepChange) and c.status == StepStatus.FAILED]
    assert failed and "for_each needs a list" in (failed[0].error or "")


def test_too_many_items_are_refused() -> None:
    wf = Workflow(name="w", steps=[Step(id="a", python="m:f", for_each=list(range(11)))])
    scheduler = RunScheduler(wf, build_graph(wf), "r", {}, max_output_bytes=1000, max_for_each_items=10)
    scheduler.start(0.0)
    failed: list[Any] = [c for c in scheduler.take_changes() if isinstance(c, StepChange) and c.error]
    assert "the limit is 10" in failed[0].error


# -- budgets -------------------------------------------------------------------------------------


def _budgeted(sim_budget: dict[str, Any], steps: list[Step], **kw: Any) -> FakeRay:
    from factory.spec import Budget

    wf = Workflow(name="w", steps=steps, budget=Budget.model_validate(sim_budget))
    return FakeRay(wf, **kw)


def test_max_attempts_stops_the_run_before_the_attempt_past_it() -> None:
    chain = [_step(0, [], None, 1)] + [_step(i, [f"s{i - 1}"], None, 1) for i in range(1, 5)]
    sim = _budgeted({"max_attempts": 3}, chain)
    sim.drive_to_end()
    assert sim.finish() == RunStatus.FAILED
    assert sum(sim.runs.values()) == 3  # s3 never ran
    assert {sid: r.status.value for sid, r in sim.steps.items()} == {
        "s0": "succeeded",
        "s1": "succeeded",
        "s2": "succeeded",
        "s3": "cancelled",
        "s4": "cancelled",
    }
    error = sim.scheduler.verdict().error or ""
    assert "budget reached: max_attempts is 3 and the run would start attempt number 4" in error
    (event,) = [c for c in sim.log if isinstance(c, EventChange) and c.event == "run.budget_exceeded"]
    assert event.data["budget"] == "max_attempts" and event.data["used"] == 4


def test_items_are_attempts_and_retries_count() -> None:
    sim = _budgeted({"max_attempts": 5}, [_step(0, [], 5, 3)], max_items_in_flight=5)
    sim.finish_now(sim.ready()[0], "retryable")  # 5 items, then the retry would be the 6th: refused
    sim.tick(1.0)
    sim.drive_to_end()
    assert sim.finish() == RunStatus.FAILED
    # 5 attempts started (the failed one among them); the stop came before the other 4 ran
    assert sim.scheduler.usage.attempts == 5 and sum(sim.runs.values()) == 1


def test_max_steps_counts_steps_started() -> None:
    wide = [_step(i, [], None, 1) for i in range(4)]
    sim = _budgeted({"max_steps": 2}, wide)
    sim.drive_to_end()
    assert sim.finish() == RunStatus.FAILED and sum(sim.runs.values()) <= 2


def test_max_seconds_stops_a_long_run() -> None:
    sim = _budgeted({"max_seconds": 5}, [_step(0, [], None, 1), _step(1, ["s0"], None, 1)])
    sim.finish_now(sim.ready()[0], "ok")
    sim.tick(6.0)
    sim.flush()
    assert sim.scheduler.finished and sim.finish() == RunStatus.FAILED
    assert "max_seconds is 5" in (sim.scheduler.verdict().error or "")
    assert sim.tasks == {}  # the attempt in flight was stopped


def _usage(tokens_in: int, tokens_out: int, model: str = "m1") -> dict[str, Any]:
    return {
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "total_tokens": tokens_in + tokens_out,
        "models": {model: {"input_tokens": tokens_in, "output_tokens": tokens_out}},
    }


def _scheduler_with(budget: dict[str, Any], prices: dict[str, tuple[float, float]] | None = None) -> RunScheduler:
    from factory.spec import Budget

    wf = Workflow(name="w", steps=[_step(0, [], None, 1), _step(1, [], None, 1), _step(2, ["s0", "s1"], None, 1)])
    return RunScheduler(
        wf,
        build_graph(wf),
        "r",
        {},
        max_output_bytes=10_000,
        max_for_each_items=10,
        budget=Budget.model_validate(budget),
        prices=prices,
    )


def test_max_tokens_and_max_cost_count_the_agents_recorded_usage() -> None:
    scheduler = _scheduler_with({"max_tokens": 1000})
    tokens = [a.token for a in scheduler.start(0.0) if isinstance(a, SubmitStep)]
    scheduler.on_result(tokens[0], Outcome(ok=True, output_json="1", extra={"usage": _usage(300, 200)}), 1.0)
    assert not scheduler.finished
    actions = scheduler.on_result(tokens[1], Outcome(ok=False, error="x", extra={"usage": _usage(400, 200)}), 2.0)
    assert scheduler.finished and scheduler.usage.tokens == 1100  # failed attempts' tokens count too
    assert any(isinstance(a, Stop) for a in actions)
    assert "max_tokens is 1000 and the run used tokens 1100" in (scheduler.finish().error or "")

    priced = _scheduler_with({"max_cost_usd": 0.01}, prices={"m1": (2.0, 8.0)})
    tokens = [a.token for a in priced.start(0.0) if isinstance(a, SubmitStep)]
    priced.on_result(tokens[0], Outcome(ok=True, output_json="1", extra={"usage": _usage(1000, 500)}), 1.0)
    assert priced.usage.cost_usd == pytest.approx(0.006) and not priced.finished
    priced.on_result(tokens[1], Outcome(ok=True, output_json="1", extra={"usage": _usage(1000, 500)}), 1.0)
    assert priced.finished and "max_cost_usd is 0.01" in (priced.finish().error or "")

    unpriced = _scheduler_with({"max_cost_usd": 5}, prices={"m1": (2.0, 8.0)})
    tokens = [a.token for a in unpriced.start(0.0) if isinstance(a, SubmitStep)]
    unpriced.on_result(tokens[0], Outcome(ok=True, output_json="1", extra={"usage": _usage(10, 5, "m2")}), 1.0)
    assert unpriced.finished
    assert "used models without a price: m2" in (unpriced.finish().error or "")


def test_what_a_run_used_counts_on_after_a_crash() -> None:
    chain = [_step(0, [], None, 1)] + [_step(i, [f"s{i - 1}"], None, 1) for i in range(1, 6)]
    sim = _budgeted({"max_attempts": 5}, chain)
    for _ in range(3):
        sim.finish_now(sim.ready()[0], "ok")
    sim.tick(2.0)  # a run.usage event is committed
    sim.flush()
    used = [c for c in sim.log if isinstance(c, EventChange) and c.event == "run.usage"][-1]
    assert used.data["attempts"] == 4  # s0, s1, s2 and s3 (in flight) started
    sim.crash()
    assert sim.scheduler.usage.attempts == 5  # counted on: s3 started again
    sim.drive_to_end()
    assert sim.finish() == RunStatus.FAILED
    assert sum(sim.runs.values()) == 4  # s4 was refused: 5 attempts over both sessions


def test_a_budget_passed_by_the_last_result_does_not_fail_a_finished_run() -> None:
    scheduler = _scheduler_with({"max_tokens": 10})
    tokens = [a.token for a in scheduler.start(0.0) if isinstance(a, SubmitStep)]
    scheduler.on_result(tokens[0], Outcome(ok=True, output_json="1"), 1.0)
    actions = scheduler.on_result(tokens[1], Outcome(ok=True, output_json="1"), 1.0)
    (last,) = [a.token for a in actions if isinstance(a, SubmitStep)] or [tokens[2]]
    scheduler.on_result(last, Outcome(ok=True, output_json="1", extra={"usage": _usage(30, 5)}), 2.0)
    assert scheduler.finished and scheduler.finish().status == RunStatus.SUCCEEDED
    assert any(isinstance(c, EventChange) and c.event == "run.budget_exceeded" for c in scheduler.take_changes())


def test_a_budget_of_starts_turns_eager_submission_off() -> None:
    """With max_steps or max_attempts, a dependant is submitted only once it may start: Ray
    cannot run it before the budget is checked."""
    chain = [_step(0, [], None, 1)] + [_step(i, [f"s{i - 1}"], None, 1) for i in range(1, 5)]
    sim = _budgeted({"max_steps": 2}, chain)
    assert [t.step_id for t in sim.tasks.values()] == ["s0"]
    while sim.ready():  # Ray runs whatever was submitted, in any order
        sim.complete(sim.ready()[0], "ok")
        while sim.done:
            sim.collect(0)
    sim.drive_to_end()
    assert sim.finish() == RunStatus.FAILED and sum(sim.runs.values()) == 2
