"""The coordinator (the scheduler's driver) without Ray: an in-process backend stands in for
Ray behind the driver's seam (engine.RayBackend), the way httpx's MockTransport stands in for
the network. Attempts run the real worker code (runtime.run_attempt) in this process, and
the store is a real SQLite file."""

from __future__ import annotations

import collections
import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray.exceptions import WorkerCrashedError

from factory import batches
from factory.engine import Coordinator, RayBackend
from factory.groups import StepTimes, timed_as
from factory.outcome import Outcome
from factory.runtime import CallPart, StepCall, run_attempt
from factory.settings import Settings
from factory.spec import RetryPolicy, Step, Workflow
from factory.store import RunStatus
from factory.store.sqlite import SQLiteStore

pytestmark = pytest.mark.unit

FIXTURES = str(Path(__file__).parent.parent / "fixtures")


@dataclass(eq=False)
class _Ref:
    call: StepCall | None = None
    deps: list[_Ref] = field(default_factory=list)
    value: Outcome | None = None


@dataclass(eq=False)
class _Stream:
    """A chain's task (RayBackend.submit_chain): its steps run one after another, each outcome
    taken as it ends, stopping at the first that did not succeed (as runtime.execute_chain)."""

    calls: list[StepCall]
    deps: list[_Ref]
    taken: int = 0
    last: Outcome | None = None

    def ready(self) -> bool:
        return all(d.value is not None for d in self.deps)


@dataclass(eq=False)
class _GroupStream:
    """A group's task (RayBackend.submit_group): its steps run in turn, each given the outcomes
    it needs from the task's arguments or the steps before it (as runtime.execute_group); it
    stops after ``stop_after`` steps, as a group past its budget does."""

    calls: list[StepCall]
    sources: list[tuple[int, ...]]
    deps: list[_Ref]
    stop_after: int | None = None
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def taken(self) -> int:
        return len(self.outcomes)

    def ready(self) -> bool:
        return all(d.value is not None for d in self.deps)

    def next(self) -> Outcome | None:
        if self.taken == len(self.calls) or (self.stop_after is not None and self.taken >= self.stop_after):
            return None
        given = [self.outcomes[i] if i >= 0 else self.deps[~i].value for i in self.sources[self.taken]]
        outcome = run_attempt(self.calls[self.taken], tuple(o for o in given if o is not None))
        self.outcomes.append(outcome)
        return outcome


@dataclass(eq=False)
class _PartsStream:
    """A task of several items of one step (RayBackend.submit_parts): each runs in turn."""

    calls: list[StepCall]
    taken: int = 0

    def ready(self) -> bool:
        return True


class InProcessRay(RayBackend):
    """Ray's semantics, in this process: an attempt runs once the results it was given are
    there; stopping one drops it. Counts what it was asked to do."""

    def __init__(self) -> None:
        self.submitted = 0
        self.stopped = 0
        self.chains: list[list[str]] = []  # the steps of each chain submitted as one task
        self.groups: list[list[str]] = []  # the steps of each group submitted as one task
        self.group_stops_after: int | None = None  # groups stop after this many steps (their budget)
        self.cpus = 1
        self.item_tasks: list[int] = []  # items in each task of several items
        self._ids = itertools.count()

    def submit_step(self, call: StepCall, deps: list[Any], options: dict[str, Any]) -> Any:
        self.submitted += 1
        return _Ref(call, list(deps))

    def share(self, call: StepCall) -> Any:
        return call

    def submit_part(self, shared: Any, part: CallPart, options: dict[str, Any]) -> Any:
        self.submitted += 1
        return _Ref(part.apply(shared))

    def submit_chain(self, calls: list[StepCall], deps: list[Any], options: dict[str, Any]) -> Any:
        self.submitted += 1
        self.chains.append([call.step_id for call in calls])
        return _Stream(calls, list(deps))

    def submit_group(self, calls: list[StepCall], sources: list[tuple[int, ...]], deps: list[Any]) -> Any:
        self.submitted += 1
        self.groups.append([call.step_id for call in calls])
        return _GroupStream(calls, sources, list(deps), self.group_stops_after)

    def submit_parts(self, shared: Any, parts: list[CallPart], options: dict[str, Any]) -> Any:
        self.submitted += 1
        self.item_tasks.append(len(parts))
        return _PartsStream([part.apply(shared) for part in parts])

    def parallelism(self) -> int:
        return self.cpus

    def next_result(self, stream: Any) -> tuple[Any, Outcome] | None:
        if isinstance(stream, _GroupStream):
            outcome = stream.next()
            return None if outcome is None else (_Ref(value=outcome), outcome)
        if isinstance(stream, _PartsStream):
            if stream.taken == len(stream.calls):
                return None
            outcome = run_attempt(stream.calls[stream.taken], ())
            stream.taken += 1
            return _Ref(value=outcome), outcome
        if stream.taken == len(stream.calls) or (stream.last is not None and not stream.last.ok):
            return None
        given = tuple(d.value for d in stream.deps) if stream.taken == 0 else (stream.last,)
        stream.last = run_attempt(stream.calls[stream.taken], given)
        stream.taken += 1
        return _Ref(value=stream.last), stream.last

    def put(self, outcome: Outcome) -> Any:
        return _Ref(value=outcome)

    def wait(self, refs: list[Any], timeout: float) -> list[Any]:
        ready = []
        for ref in refs:
            if isinstance(ref, (_Stream, _PartsStream, _GroupStream)):
                if ref.ready():
                    ready.append(ref)
                continue
            if ref.value is None and all(d.value is not None for d in ref.deps):
                assert ref.call is not None
                ref.value = run_attempt(ref.call, tuple(d.value for d in ref.deps))
            if ref.value is not None:
                ready.append(ref)
        return ready

    def get_many(self, refs: list[Any]) -> list[Any]:
        return [ref.value for ref in refs]

    def stop(self, ref: Any) -> None:
        self.stopped += 1


def run(
    tmp_path: Path,
    workflow: Workflow,
    fuse_chains: bool = True,
    backend: InProcessRay | None = None,
    step_times: StepTimes | None = None,
) -> tuple[Any, SQLiteStore, InProcessRay]:
    """``step_times``: what the steps' functions are known to take (by default nothing: the
    first steps of a function go alone as probes, and short ones after them in groups)."""
    store = SQLiteStore(tmp_path / "factory.db")
    backend = backend or InProcessRay()
    graph_order = [s.id for s in workflow.steps]
    store.create_run("r1", workflow.name, workflow.model_dump_json(by_alias=True), {}, graph_order)
    settings = Settings(home=tmp_path, fuse_chains=fuse_chains, batch_items=fuse_chains)
    coordinator = Coordinator(
        store, workflow, "r1", {}, settings, backend=backend, step_times=step_times or StepTimes()
    )
    coordinator.start()
    return coordinator.execute(), store, backend


def test_a_dag_with_a_retry_and_a_fan_out_runs_without_ray(tmp_path: Path) -> None:
    counter = tmp_path / "flaky"
    workflow = Workflow(
        name="no-ray",
        base_dir=FIXTURES,
        steps=[
            Step(id="a", python="teststeps:add", with_={"a": 1, "b": 2}),
            Step(
                id="flaky",
                python="teststeps:flaky",
                with_={"counter": str(counter), "fail_times": 1},
                retry=RetryPolicy(max_attempts=3, backoff=0.0),
            ),
            Step(
                id="fan", python="teststeps:add", for_each=[1, 2, 3], with_={"a": "${item}", "b": "${steps.a.output}"}
            ),
            Step(
                id="total", python="teststeps:echo", with_={"value": ["${steps.fan.output}", "${steps.flaky.output}"]}
            ),
        ],
    )
    result, store, backend = run(tmp_path, workflow)
    try:
        assert result.status == RunStatus.SUCCEEDED, result.error
        assert result.outputs["total"] == [[4, 5, 6], "ok after 2 attempts"]
        assert [i.output_json for i in store.get_items("r1", "fan")] == ["4", "5", "6"]
        types = [e.type for e in store.events(0, "r1")]
        assert types.count("step.retrying") == 1 and types[-1] == "run.succeeded"
        assert backend.submitted == 1 + 2 + 2 + 1 + 1  # a, flaky twice, two items alone then one task, total
    finally:
        store.close()


def test_a_fatal_failure_skips_descendants_without_ray(tmp_path: Path) -> None:
    workflow = Workflow(
        name="no-ray-fail",
        base_dir=FIXTURES,
        steps=[
            Step(id="bad", python="teststeps:always_fails", with_={"message": "no"}),
            Step(id="after", python="teststeps:echo", with_={"value": "${steps.bad.output}"}),
            Step(id="other", python="teststeps:add", with_={"a": 1, "b": 1}),
        ],
    )
    result, store, _ = run(tmp_path, workflow)
    try:
        assert result.status == RunStatus.FAILED and "ValueError: no" in (result.error or "")
        assert {s.step_id: s.status.value for s in store.get_steps("r1")} == {
            "bad": "failed",
            "after": "skipped",
            "other": "succeeded",
        }
    finally:
        store.close()


class CountingRay(InProcessRay):
    """Records how many refs each wait was given."""

    def __init__(self) -> None:
        super().__init__()
        self.waited: list[int] = []

    def wait(self, refs: list[Any], timeout: float) -> list[Any]:
        self.waited.append(len(refs))
        return super().wait(refs, timeout)


def _run_counting(tmp_path: Path, workflow: Workflow) -> tuple[Any, CountingRay]:
    store = SQLiteStore(tmp_path / f"{workflow.name}.db")
    backend = CountingRay()
    store.create_run("r1", workflow.name, workflow.model_dump_json(by_alias=True), {}, [s.id for s in workflow.steps])
    settings = Settings(home=tmp_path, fuse_chains=False, batch_items=False)  # each step its own task
    coordinator = Coordinator(store, workflow, "r1", {}, settings, backend=backend)
    coordinator.start()
    try:
        return coordinator.execute(), backend
    finally:
        store.close()


def test_the_driver_waits_only_for_attempts_whose_dependencies_came_back(tmp_path: Path) -> None:
    """A chain is submitted at once (each step ahead of its dependencies), but a step cannot finish
    before them: each wait is given the one attempt that can, not the whole chain. A dependency
    that failed and is retried releases the steps submitted behind it all the same."""
    chain = [Step(id="s0", python="teststeps:add", with_={"a": 0, "b": 1})] + [
        Step(id=f"s{i}", python="teststeps:add", with_={"a": f"${{steps.s{i - 1}.output}}", "b": 1})
        for i in range(1, 30)
    ]
    result, backend = _run_counting(tmp_path, Workflow(name="chain", base_dir=FIXTURES, steps=chain))
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert result.outputs["s29"] == 30
    assert backend.submitted == 30
    assert max(backend.waited) == 1, backend.waited  # 30 when every ref in flight was waited for

    flaky = Step(
        id="flaky",
        python="teststeps:flaky",
        with_={"counter": str(tmp_path / "flaky"), "fail_times": 1},
        retry=RetryPolicy(max_attempts=2, backoff=0.0),
    )
    after = [Step(id="s1", python="teststeps:echo", with_={"value": "${steps.flaky.output}"})] + [
        Step(id=f"s{i}", python="teststeps:echo", with_={"value": f"${{steps.s{i - 1}.output}}"}) for i in range(2, 20)
    ]
    result, backend = _run_counting(tmp_path, Workflow(name="retried", base_dir=FIXTURES, steps=[flaky, *after]))
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert result.outputs["s19"] == "ok after 2 attempts"
    assert max(backend.waited) < 19, backend.waited


def _chain(n: int, first: Step | None = None) -> list[Step]:
    steps = [first or Step(id="s0", python="teststeps:add", with_={"a": 0, "b": 1})]
    for i in range(1, n):
        steps.append(Step(id=f"s{i}", python="teststeps:add", with_={"a": f"${{steps.s{i - 1}.output}}", "b": 1}))
    return steps


def test_a_chain_runs_as_one_task_and_each_step_is_committed_as_it_ends(tmp_path: Path) -> None:
    """Steps that follow one another (each the only dependant of the one before) go to Ray as one
    task; each step's outcome still comes back on its own, with its own state change and event."""
    after = Step(id="after", python="teststeps:echo", with_={"value": ["${steps.s29.output}", "${steps.side.output}"]})
    side = Step(id="side", python="teststeps:add", with_={"a": 100, "b": 1})
    result, store, backend = run(tmp_path, Workflow(name="chain", base_dir=FIXTURES, steps=[*_chain(30), side, after]))
    try:
        assert result.status == RunStatus.SUCCEEDED, result.error
        assert result.outputs["after"] == [30, 101]  # the step after the chain had the chain's last result
        assert backend.chains == [[f"s{i}" for i in range(30)]]  # `after` needs two results: not in it
        assert backend.submitted == 3
        succeeded = [e.step_id for e in store.events(0, "r1") if e.type == "step.succeeded"]
        assert [s for s in succeeded if s and s.startswith("s") and s != "side"] == [f"s{i}" for i in range(30)]
        assert {s.step_id: s.output_json for s in store.get_steps("r1")}["s17"] == "18"
    finally:
        store.close()


def test_a_chain_is_not_fused_where_a_result_is_needed_twice_or_a_step_asks_for_resources(tmp_path: Path) -> None:
    steps = _chain(6)
    steps.append(Step(id="branch", python="teststeps:echo", with_={"value": "${steps.s2.output}"}))
    steps[4] = Step(
        id="s4", python="teststeps:add", with_={"a": "${steps.s3.output}", "b": 1}, resources={"num_cpus": 0.5}
    )
    result, store, backend = run(tmp_path, Workflow(name="forks", base_dir=FIXTURES, steps=steps))
    try:
        assert result.status == RunStatus.SUCCEEDED, result.error
        assert result.outputs["s5"] == 6 and result.outputs["branch"] == 3
        # s2's result goes to s3 and to branch: the chain ends at s2; s4 asks Ray for CPUs: alone
        assert backend.chains == [["s0", "s1", "s2"]]
        assert backend.submitted == 1 + 1 + 1 + 1 + 1  # s0-s2, s3, s4, s5, branch
    finally:
        store.close()


def test_a_step_that_fails_in_a_chain_is_retried_and_the_steps_after_it_run_once(tmp_path: Path) -> None:
    """The chain's task stops at the failed attempt (the steps after it never ran); the retry
    and the steps after it go again as one chain, and each step runs once it succeeded."""
    seen = tmp_path / "seen"
    flaky = Step(
        id="s0",
        python="teststeps:flaky",
        with_={"counter": str(tmp_path / "flaky"), "fail_times": 1},
        retry=RetryPolicy(max_attempts=2, backoff=0.0),
    )
    steps = [
        flaky,
        Step(id="s1", python="teststeps:count_and_echo", with_={"counter": str(seen), "value": "${steps.s0.output}"}),
        Step(id="s2", python="teststeps:echo", with_={"value": "${steps.s1.output}"}),
    ]
    result, store, backend = run(tmp_path, Workflow(name="retry-in-chain", base_dir=FIXTURES, steps=steps))
    try:
        assert result.status == RunStatus.SUCCEEDED, result.error
        assert result.outputs["s2"] == "ok after 2 attempts"
        assert backend.chains == [["s0", "s1", "s2"], ["s0", "s1", "s2"]]
        assert seen.read_text() == "x"  # s1 ran once: not after the failed attempt
        assert {s.step_id: s.attempts for s in store.get_steps("r1")} == {"s0": 2, "s1": 1, "s2": 1}
        events = [(e.type, e.step_id) for e in store.events(0, "r1")]
        assert ("step.retrying", "s0") in events and events.count(("step.started", "s1")) == 1
    finally:
        store.close()


def test_a_fatal_failure_in_a_chain_skips_the_rest_of_it(tmp_path: Path) -> None:
    steps = _chain(3)
    steps.append(Step(id="s3", python="teststeps:always_fails", with_={"message": "${steps.s2.output}"}))
    steps += [Step(id=f"s{i}", python="teststeps:echo", with_={"value": f"${{steps.s{i - 1}.output}}"}) for i in (4, 5)]
    result, store, backend = run(tmp_path, Workflow(name="fatal-in-chain", base_dir=FIXTURES, steps=steps))
    try:
        assert result.status == RunStatus.FAILED and "ValueError: 3" in (result.error or "")
        assert backend.submitted == 1
        assert {s.step_id: s.status.value for s in store.get_steps("r1")} == {
            "s0": "succeeded",
            "s1": "succeeded",
            "s2": "succeeded",
            "s3": "failed",
            "s4": "skipped",
            "s5": "skipped",
        }
    finally:
        store.close()


def test_without_fusion_each_step_is_its_own_task(tmp_path: Path) -> None:
    result, store, backend = run(tmp_path, Workflow(name="unfused", base_dir=FIXTURES, steps=_chain(10)), False)
    try:
        assert result.status == RunStatus.SUCCEEDED and result.outputs["s9"] == 10
        assert backend.chains == [] and backend.submitted == 10
    finally:
        store.close()


GROUPED: collections.Counter[int] = collections.Counter()  # sizes of the groups the examples made


@st.composite
def chained_dags(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Mostly chains (a step given the one before), with forks, joins and steps on their own;
    each step fails retryably a few times, and some fail for good."""
    shapes = []
    for i in range(draw(st.integers(2, 14))):
        shape = draw(st.sampled_from(["after", "after", "after", "join", "alone"])) if i else "alone"
        needs = (
            [] if shape == "alone" else [i - 1] if shape == "after" or i < 2 else [i - 1, draw(st.integers(0, i - 2))]
        )
        shapes.append(
            {
                "needs": needs,
                "fail_times": draw(st.sampled_from([0, 0, 0, 1, 2])),
                "max_attempts": draw(st.sampled_from([1, 2, 3])),
                "fatal": draw(st.integers(0, 9)) == 0,
                "resources": draw(st.integers(0, 9)) == 0,
                "items": draw(st.sampled_from([None, None, None, 0, 1, 5, 90])),
            }
        )
    return shapes


def _run_shapes(
    shapes: list[dict[str, Any]], fuse: bool, group_stops_after: int | None = None, known: bool = True
) -> tuple[Any, dict[str, Any], dict[str, int], InProcessRay]:
    """``known``: the steps' function is known short before the run (else its first steps go
    alone as probes, and the others wait for their outcome)."""
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder)
        steps = [
            Step(
                id=f"s{i}",
                python="teststeps:tally",
                with_={
                    "counter": str(home / f"s{i}") + ("" if shape["items"] is None else "-${item}"),
                    "fail_times": shape["fail_times"],
                    "fatal": shape["fatal"],
                    "given": [f"${{steps.s{n}.output}}" for n in shape["needs"]]
                    + ([] if shape["items"] is None else ["${item}"]),
                },
                retry=RetryPolicy(max_attempts=shape["max_attempts"], backoff=0.0),
                resources={"num_cpus": 0.5} if shape["resources"] else {},
                for_each=None if shape["items"] is None else list(range(shape["items"])),
            )
            for i, shape in enumerate(shapes)
        ]
        backend = InProcessRay()
        backend.group_stops_after = group_stops_after
        times = StepTimes()
        if known:
            times.learn(
                timed_as("teststeps:tally", FIXTURES), 0.0001
            )  # short: steps that are not in a chain go in groups
        result, store, _ = run(home, Workflow(name="shapes", base_dir=FIXTURES, steps=steps), fuse, backend, times)
        try:
            states = {s.step_id: (s.status.value, s.attempts, s.output_json) for s in store.get_steps("r1")}
            ran = {
                f"s{i}": sum(len(c.read_text()) for c in [*home.glob(f"s{i}"), *home.glob(f"s{i}-*")])
                for i in range(len(shapes))
            }
            events = [(e.type, e.step_id) for e in store.events(0, "r1")]
            assert events[-1][0] in ("run.succeeded", "run.failed")
            for step_id, (status, attempts, _) in states.items():
                if shapes[int(step_id[1:])]["items"] is not None:
                    assert all(i.attempts >= 1 for i in store.get_items("r1", step_id))
                    continue
                assert ran[step_id] == attempts  # every attempt counted ran once, none ran uncounted
                started = events.count(("step.started", step_id))
                assert started == (attempts if status != "skipped" else 0), (step_id, events)
            return result, states, ran, backend
        finally:
            store.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=chained_dags(), stops_after=st.sampled_from([None, None, 1, 2, 3]), known=st.booleans())
def test_chains_and_groups_in_one_task_do_what_a_task_a_step_does(
    shapes: list[dict[str, Any]], stops_after: int | None, known: bool
) -> None:
    """Chains run as one task each, short steps with joins in groups, and short items several
    per task (groups stopping early, as past their budget, after ``stops_after`` steps; the
    steps' function known short, or probed first), or every step and item as its own task: the
    same run, step by step (statuses, attempts, outputs), each attempt's code run once."""
    fused, fused_states, fused_ran, backend = _run_shapes(shapes, True, stops_after, known)
    alone, alone_states, alone_ran, _ = _run_shapes(shapes, False)
    GROUPED.update(len(g) for g in backend.groups)
    assert (fused.status, fused.outputs) == (alone.status, alone.outputs)
    for step_id in [s for s, (status, _, _) in alone_states.items() if status == "failed"]:
        if shapes[int(step_id[1:])]["items"] is not None:
            # a for_each step failing for good stops its other items: how many ran before is a race
            fused_states[step_id] = alone_states[step_id] = ("failed", 0, None)
            fused_ran[step_id] = alone_ran[step_id] = 0
    assert fused_states == alone_states
    assert fused_ran == alone_ran


@st.composite
def joined_dags(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Steps that each need any of the steps before them (joins, forks, steps on their own),
    some failing retryably a few times, a few for good."""
    shapes = []
    for i in range(draw(st.integers(2, 24))):
        needs = sorted(draw(st.sets(st.integers(0, i - 1), max_size=min(i, 3)))) if i else []
        shapes.append(
            {
                "needs": needs,
                "fail_times": draw(st.sampled_from([0, 0, 0, 0, 1, 2])),
                "max_attempts": draw(st.sampled_from([1, 2, 3])),
                "fatal": draw(st.integers(0, 19)) == 0,
                "resources": draw(st.integers(0, 19)) == 0,
                "items": None,
            }
        )
    return shapes


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=joined_dags(), stops_after=st.sampled_from([None, None, 1, 2, 3]), known=st.booleans())
def test_groups_of_steps_with_joins_do_what_a_task_a_step_does(
    shapes: list[dict[str, Any]], stops_after: int | None, known: bool
) -> None:
    """DAGs with joins, their short steps in groups (stopping early, as past their budget, after
    ``stops_after`` steps; their function known short, or probed first), or each step its own
    task: the same run, step by step, each attempt's code run once."""
    fused, fused_states, fused_ran, backend = _run_shapes(shapes, True, stops_after, known)
    alone, alone_states, alone_ran, _ = _run_shapes(shapes, False)
    GROUPED.update(len(g) for g in backend.groups)
    assert (fused.status, fused.outputs) == (alone.status, alone.outputs)
    assert fused_states == alone_states
    assert fused_ran == alone_ran


def _lattice(n: int, counters: Path) -> Workflow:
    steps = []
    for i in range(n):
        for j in range(n):
            given = [f"${{steps.n{i - 1}_{j}.output}}" if i else 1, f"${{steps.n{i}_{j - 1}.output}}" if j else 1]
            steps.append(_tally(f"n{i}_{j}", counters, given))
    return Workflow(name="lattice", base_dir=FIXTURES, steps=steps)


def test_short_steps_with_joins_go_in_groups_once_their_time_is_known(tmp_path: Path) -> None:
    """A lattice's function is not known at first: its first step, the only one that can run,
    goes alone (a probe), the others wait for its outcome, then go in groups. The next run (the function
    known short in this process) sends every step in groups, a group at most a quarter of the
    steps that go at once. The same outputs, each step run once, every step's events."""
    times = StepTimes()
    outputs, tasks = [], []
    for attempt in ("first", "second"):
        folder = tmp_path / attempt
        (folder / "counters").mkdir(parents=True)
        backend = InProcessRay()
        backend.cpus = 4
        result, store, _ = run(folder, _lattice(6, folder / "counters"), backend=backend, step_times=times)
        try:
            assert result.status == RunStatus.SUCCEEDED, result.error
            assert {p.name: len(p.read_text()) for p in (folder / "counters").iterdir()} == {
                f"n{i}_{j}": 1 for i in range(6) for j in range(6)
            }
            events = [(e.type, e.step_id) for e in store.events(0, "r1")]
            for step_id in result.outputs:
                assert events.count(("step.started", step_id)) == events.count(("step.succeeded", step_id)) == 1
            outputs.append(result.outputs)
            tasks.append((backend.submitted, backend.groups))
        finally:
            store.close()
    expected: dict[str, int] = {}
    for i in range(6):
        for j in range(6):
            expected[f"n{i}_{j}"] = (
                1 + (expected[f"n{i - 1}_{j}"] if i else 1) + (expected[f"n{i}_{j - 1}"] if j else 1)
            )
    assert outputs[0] == outputs[1] == expected
    submitted, groups = tasks[0]
    assert sorted(s for g in groups for s in g) == sorted(set(expected) - {"n0_0"}) and submitted == 1 + len(groups)
    submitted, groups = tasks[1]
    assert sorted(step for group in groups for step in group) == sorted(outputs[1])  # all in groups
    assert submitted == len(groups) == 4 and max(len(group) for group in groups) == 9


def test_a_step_known_to_be_long_does_not_go_in_a_group(tmp_path: Path) -> None:
    times = StepTimes()
    times.learn(timed_as("teststeps:tally", FIXTURES), 0.5)
    (tmp_path / "counters").mkdir()
    result, store, backend = run(tmp_path, _lattice(3, tmp_path / "counters"), step_times=times)
    store.close()
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert backend.groups == [] and backend.submitted == 9


@pytest.fixture
def items_always_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks of items sized as if every item were short, whatever this machine's load makes of
    their time (at 20 ms a task, an item slowed past 1 ms on a busy machine made smaller tasks)."""
    monkeypatch.setattr(batches, "TARGET_TASK_SECONDS", 60.0)


@pytest.mark.usefixtures("items_always_short")
def test_short_items_go_several_per_task_once_their_time_is_known(tmp_path: Path) -> None:
    """A for_each of quick items: the first ones go alone (twice the cluster's CPUs: 2 here);
    once one came back, the others go in tasks of up to 64, and each item is committed on its own."""
    workflow = Workflow(
        name="items",
        base_dir=FIXTURES,
        steps=[
            Step(id="fan", python="teststeps:add", for_each=list(range(300)), with_={"a": "${item}", "b": 1}),
            Step(id="total", python="teststeps:echo", with_={"value": "${steps.fan.output}"}),
        ],
    )
    result, store, backend = run(tmp_path, workflow)
    try:
        assert result.status == RunStatus.SUCCEEDED, result.error
        assert result.outputs["total"] == list(range(1, 301))
        assert backend.item_tasks and max(backend.item_tasks) == 64 and sum(backend.item_tasks) == 298
        assert [i.output_json for i in store.get_items("r1", "fan")] == [str(n) for n in range(1, 301)]
        assert {i.attempts for i in store.get_items("r1", "fan")} == {1}
    finally:
        store.close()

    result, store, backend = run(tmp_path / "alone", workflow, False)
    try:
        assert result.outputs["total"] == list(range(1, 301)) and backend.item_tasks == []
    finally:
        store.close()


def test_items_that_fail_in_a_task_of_several_are_retried_alone(tmp_path: Path) -> None:
    workflow = Workflow(
        name="items-retry",
        base_dir=FIXTURES,
        steps=[
            Step(
                id="fan",
                python="teststeps:tally",
                for_each=list(range(40)),
                with_={"counter": str(tmp_path / "c") + "-${item}", "fail_times": 1, "given": ["${item}"]},
                retry=RetryPolicy(max_attempts=2, backoff=0.0),
            )
        ],
    )
    result, store, _ = run(tmp_path, workflow)
    try:
        assert result.status == RunStatus.SUCCEEDED, result.error
        assert result.outputs["fan"] == list(range(1, 41))
        assert {i.attempts for i in store.get_items("r1", "fan")} == {2}
        assert sum(len(c.read_text()) for c in tmp_path.glob("c-*")) == 80  # each item twice, no more
    finally:
        store.close()


class DyingRay(InProcessRay):
    """A task of several (a chain, or items of one step) whose worker dies at the first call that
    ``killer`` picks, once: the calls before it in that task ran, but their outcomes were lost on
    the way (as when the worker is killed before Ray delivered what it yielded), and the task
    reports the death."""

    def __init__(self, killer: Any) -> None:
        super().__init__()
        self.killer = killer
        self.killed = False

    def next_result(self, stream: Any) -> tuple[Any, Any] | None:
        if not self.killed:
            rest = stream.calls[stream.taken :]
            hit = next((i for i, call in enumerate(rest) if self.killer(call)), None)
            if hit is not None:
                self.killed = True
                for _ in range(hit):  # they run; what they yield never arrives
                    super().next_result(stream)
                return _Ref(), WorkerCrashedError()
        return super().next_result(stream)


def test_a_chain_whose_worker_dies_charges_no_step_and_runs_the_unreported_ones_alone(tmp_path: Path) -> None:
    """Steps a and b ended but their outcomes were lost with the worker that c killed: none of the
    three is charged a failed attempt (which one was running is not known); all four unreported
    steps go again, a task each, as the attempts they were, and the run succeeds."""
    counters = {name: tmp_path / name for name in "abcd"}
    steps = [Step(id="a", python="teststeps:count_and_echo", with_={"counter": str(counters["a"]), "value": 1})]
    for before, name in zip("abc", "bcd", strict=False):
        value = "${steps." + before + ".output}"
        steps.append(
            Step(id=name, python="teststeps:count_and_echo", with_={"counter": str(counters[name]), "value": value})
        )
    backend = DyingRay(lambda call: call.step_id == "c")
    result, store, _ = run(tmp_path, Workflow(name="dies", base_dir=FIXTURES, steps=steps), backend=backend)
    try:
        assert result.status == RunStatus.SUCCEEDED, result.error
        assert result.outputs["d"] == 1
        assert backend.killed and backend.chains == [["a", "b", "c", "d"]]
        assert {s.step_id: s.attempts for s in store.get_steps("r1")} == dict.fromkeys("abcd", 1)
        assert {name: len(path.read_text()) for name, path in counters.items()} == {"a": 2, "b": 2, "c": 1, "d": 1}
        assert backend.submitted == 1 + 4  # the chain, then each step alone
        assert not [e for e in store.events(0, "r1") if e.type in ("step.retrying", "step.failed")]
    finally:
        store.close()


@pytest.mark.usefixtures("items_always_short")
def test_items_whose_worker_dies_in_a_task_of_several_are_charged_nothing_and_go_alone(tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    fan = Step(
        id="fan",
        python="teststeps:die_once_at",
        for_each=list(range(40)),
        with_={"folder": str(folder), "item": "${item}", "at": -1},
    )
    backend = DyingRay(lambda call: call.item == 10)
    result, store, _ = run(tmp_path, Workflow(name="items-die", base_dir=FIXTURES, steps=[fan]), backend=backend)
    try:
        assert result.status == RunStatus.SUCCEEDED, result.error
        assert result.outputs["fan"] == [2 * i for i in range(40)]
        assert backend.killed and backend.item_tasks[0] > 10  # item 10 was in a task of several
        runs = {int(p.name): len(p.read_text()) for p in folder.iterdir()}
        lost = {i for i, n in runs.items() if n == 2}
        assert lost and max(lost) == 9 and lost == set(range(min(lost), 10))  # the ones before 10 in its task
        assert set(runs) == set(range(40)) and set(runs.values()) <= {1, 2}
        assert [i.attempts for i in store.get_items("r1", "fan")] == [1] * 40
        # two probed alone, the other 38 in two tasks of 19 (spread over as many tasks as were probed),
        # then the 19 items of the task that died again, each alone
        assert backend.item_tasks == [19, 19] and backend.submitted == 2 + 2 + 19
    finally:
        store.close()


def test_a_group_whose_worker_dies_charges_no_step_and_runs_the_unreported_ones_alone(tmp_path: Path) -> None:
    """A lattice in groups; the worker of one dies at n1_1, after running the steps before it
    in its group, whose outcomes were lost: none is charged, each unreported step goes again
    alone as the same attempt, and the run succeeds."""
    times = StepTimes()
    times.learn(timed_as("teststeps:tally", FIXTURES), 0.0001)
    (tmp_path / "counters").mkdir()
    backend = DyingRay(lambda call: call.step_id == "n1_1")
    result, store, _ = run(tmp_path, _lattice(3, tmp_path / "counters"), backend=backend, step_times=times)
    try:
        assert result.status == RunStatus.SUCCEEDED, result.error
        assert backend.killed and any("n1_1" in group for group in backend.groups)
        assert {s.step_id: s.attempts for s in store.get_steps("r1")} == {
            f"n{i}_{j}": 1 for i in range(3) for j in range(3)
        }
        runs = {p.name: len(p.read_text()) for p in (tmp_path / "counters").iterdir()}
        group = next(g for g in backend.groups if "n1_1" in g)
        lost = group[: group.index("n1_1")]
        assert lost and all(runs[step] == 2 for step in lost)  # ran, lost with the worker, ran again
        assert sum(runs.values()) == 9 + len(lost)
        assert not [e for e in store.events(0, "r1") if e.type in ("step.retrying", "step.failed")]
    finally:
        store.close()


class GatedRay(InProcessRay):
    """Steps named in ``gated`` cannot finish before the driver's ``turns``-th wait (they are
    slow), whatever they were given."""

    def __init__(self, gated: set[str], turns: int) -> None:
        super().__init__()
        self.gated, self.turns, self.turn = gated, turns, 0

    def wait(self, refs: list[Any], timeout: float) -> list[Any]:
        self.turn += 1
        if self.turn < self.turns:
            refs = [r for r in refs if not (isinstance(r, _Ref) and r.call and r.call.step_id in self.gated)]
        return super().wait(refs, timeout)


def _tally(name: str, counters: Path, given: list[Any] | None = None) -> Step:
    return Step(
        id=name,
        python="teststeps:tally",
        with_={"counter": str(counters / name), "fail_times": 0, "given": given or []},
    )


def test_held_steps_whose_dependency_failed_meanwhile_never_go(tmp_path: Path) -> None:
    """t1 and t2 probe tally (slow); s1..s3 (tally, needing a) wait for them. a fails and is
    retried at once: the s that waited were submitted against the failed attempt and no longer
    count; when the probes end, only the s submitted after the retry go. Each runs once."""
    counters = tmp_path / "counters"
    counters.mkdir()
    a = Step(
        id="a",
        python="teststeps:square_or_fail",
        with_={"x": 3, "bad": 3, "counter": str(counters / "a")},
        retry=RetryPolicy(max_attempts=2, backoff=0.0),
    )
    steps = [_tally("t1", counters), _tally("t2", counters), a]
    steps += [_tally(f"s{i}", counters, ["${steps.a.output}"]) for i in (1, 2, 3)]
    backend = GatedRay({"t1", "t2"}, turns=6)
    result, store, _ = run(tmp_path, Workflow(name="held", base_dir=FIXTURES, steps=steps), backend=backend)
    store.close()
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert result.outputs["s1"] == 10 and backend.turn >= 6
    assert {p.name: len(p.read_text()) for p in counters.iterdir()} == {
        "a": 2,
        **{name: 1 for name in ("t1", "t2", "s1", "s2", "s3")},
    }


def test_steps_that_can_run_are_not_held_behind_probes_that_cannot(tmp_path: Path) -> None:
    """a1..a3 (tally) need prep, which is slow; b1..b3 (tally) need nothing. The probes of tally
    are b1 and b2, which can run (not a1, a2, stuck behind prep): b3 waits for them only, and
    all the b end long before prep."""
    counters = tmp_path / "counters"
    counters.mkdir()
    prep = Step(id="prep", python="teststeps:count_and_echo", with_={"counter": str(counters / "prep"), "value": 1})
    steps = [prep, *(_tally(f"a{i}", counters, ["${steps.prep.output}"]) for i in (1, 2, 3))]
    steps += [_tally(f"b{i}", counters) for i in (1, 2, 3)]
    backend = GatedRay({"prep"}, turns=20)
    result, store, _ = run(tmp_path, Workflow(name="behind", base_dir=FIXTURES, steps=steps), backend=backend)
    try:
        assert result.status == RunStatus.SUCCEEDED, result.error
        ended = [e.step_id for e in store.events(0, "r1") if e.type == "step.succeeded"]
        assert max(ended.index(f"b{i}") for i in (1, 2, 3)) < ended.index("prep")
        assert {p.name: len(p.read_text()) for p in counters.iterdir()} == dict.fromkeys(
            ["prep", "a1", "a2", "a3", "b1", "b2", "b3"], 1
        )
    finally:
        store.close()


def test_the_property_tests_made_groups_of_every_size() -> None:
    """The random DAGs above went in groups, small and large (run in this module first)."""
    if not GROUPED:
        pytest.skip("the property tests did not run in this session")
    assert min(GROUPED) == 2 and max(GROUPED) >= 8 and sum(GROUPED.values()) >= 50


class LosingRay(InProcessRay):
    """The first attempt of step ``lost`` dies with its worker (Ray's error in place of its
    outcome); a task given that result fails with it before running anything, as Ray fails a
    task whose argument is lost."""

    def __init__(self, lost: str) -> None:
        super().__init__()
        self.lost = lost
        self.done = False

    def wait(self, refs: list[Any], timeout: float) -> list[Any]:
        for ref in refs:
            if isinstance(ref, _Ref) and ref.call and ref.call.step_id == self.lost and not self.done:
                self.done = True
                ref.value = WorkerCrashedError()  # type: ignore[assignment]
        return super().wait(refs, timeout)

    def next_result(self, stream: Any) -> tuple[Any, Any] | None:
        if isinstance(stream, (_Stream, _GroupStream)) and stream.taken == 0:
            failed = next((d.value for d in stream.deps if isinstance(d.value, Exception)), None)
            if failed is not None:
                return _Ref(), failed
        return super().next_result(stream)


def _after_a_lost_step(counters: Path, chained: bool) -> Workflow:
    """a (alone: it asks for resources; its first attempt lost with its worker, retried), then b
    and c: a group [b, c] where b needs a and c needs nothing, or a chain b -> c after a."""
    a = Step(
        id="a",
        python="teststeps:square_or_fail",
        with_={"x": 3, "bad": -1, "counter": str(counters / "unused")},
        retry=RetryPolicy(max_attempts=2, backoff=0.0),
        resources={"num_cpus": 0.5},
    )
    b = _tally("b", counters, ["${steps.a.output}"])
    c = _tally("c", counters, ["${steps.b.output}"] if chained else [])
    return Workflow(name="lost", base_dir=FIXTURES, steps=[a, b, c])


def test_a_group_failed_by_a_lost_argument_charges_none_of_its_steps(tmp_path: Path) -> None:
    """Ray fails the group [b, c] because a's result was lost; b no longer counts (a is retried)
    and c, which needs nothing, is not charged: it goes again alone and the run succeeds."""
    counters = tmp_path / "counters"
    counters.mkdir()
    times = StepTimes()
    times.learn(timed_as("teststeps:tally", FIXTURES), 0.0001)
    backend = LosingRay("a")
    result, store, _ = run(tmp_path, _after_a_lost_step(counters, False), backend=backend, step_times=times)
    try:
        assert result.status == RunStatus.SUCCEEDED, result.error
        assert backend.done and backend.groups == [["b", "c"]]
        assert {s.step_id: s.attempts for s in store.get_steps("r1")} == {"a": 2, "b": 1, "c": 1}
        assert {p.name: len(p.read_text()) for p in counters.iterdir()} == {"b": 1, "c": 1}
        assert [e.step_id for e in store.events(0, "r1") if e.type == "step.retrying"] == ["a"]
    finally:
        store.close()


def test_a_chain_failed_by_a_lost_argument_runs_only_after_the_retry(tmp_path: Path) -> None:
    """Ray fails the chain b -> c because a's result was lost: neither counts any more (a is
    retried), so neither goes again from that chain; they run once, after a's retry."""
    counters = tmp_path / "counters"
    counters.mkdir()
    backend = LosingRay("a")
    result, store, _ = run(tmp_path, _after_a_lost_step(counters, True), backend=backend)
    try:
        assert result.status == RunStatus.SUCCEEDED, result.error
        assert backend.done and backend.chains[0] == ["b", "c"]
        assert {s.step_id: s.attempts for s in store.get_steps("r1")} == {"a": 2, "b": 1, "c": 1}
        assert {p.name: len(p.read_text()) for p in counters.iterdir()} == {"b": 1, "c": 1}
    finally:
        store.close()
