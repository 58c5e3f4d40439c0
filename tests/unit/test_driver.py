"""The coordinator (the scheduler's driver) without Ray: an in-process backend stands in for
Ray behind the driver's seam (engine.RayBackend), the way httpx's MockTransport stands in for
the network. Attempts run the real worker code (runtime.run_attempt) in this process, and
the store is a real SQLite file."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from factory.engine import Coordinator, RayBackend
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


class InProcessRay(RayBackend):
    """Ray's semantics, in this process: an attempt runs once the results it was given are
    there; stopping one drops it. Counts what it was asked to do."""

    def __init__(self) -> None:
        self.submitted = 0
        self.stopped = 0
        self._ids = itertools.count()

    def submit_step(self, call: StepCall, deps: list[Any], options: dict[str, Any]) -> Any:
        self.submitted += 1
        return _Ref(call, list(deps))

    def share(self, call: StepCall) -> Any:
        return call

    def submit_part(self, shared: Any, part: CallPart, options: dict[str, Any]) -> Any:
        self.submitted += 1
        return _Ref(part.apply(shared))

    def put(self, outcome: Outcome) -> Any:
        return _Ref(value=outcome)

    def wait(self, refs: list[Any], timeout: float) -> list[Any]:
        ready = []
        for ref in refs:
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


def run(tmp_path: Path, workflow: Workflow) -> tuple[Any, SQLiteStore, InProcessRay]:
    store = SQLiteStore(tmp_path / "factory.db")
    backend = InProcessRay()
    graph_order = [s.id for s in workflow.steps]
    store.create_run("r1", workflow.name, workflow.model_dump_json(by_alias=True), {}, graph_order)
    coordinator = Coordinator(store, workflow, "r1", {}, Settings(home=tmp_path), backend=backend)
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
        assert backend.submitted == 1 + 2 + 3 + 1  # a, flaky twice, three items, total
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
