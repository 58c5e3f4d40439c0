"""Budgets on a real local Ray and SQLite: a run stops cleanly at its budget, says which
and by how much, and `resume --budget` continues it with what it used still counted."""

from __future__ import annotations

from pathlib import Path

import pytest

import factory
from factory.settings import Settings
from factory.spec import Budget, RetryPolicy, Step, Workflow
from factory.store import RunStatus
from factory.store.sqlite import SQLiteStore

FIXTURES = str(Path(__file__).parent.parent / "fixtures")

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_a_run_stops_at_max_attempts_and_resume_with_a_new_budget_finishes_it(
    settings: Settings, factory_home: Path, tmp_path: Path
) -> None:
    counter = tmp_path / "flaky"
    wf = Workflow(
        name="budgeted",
        base_dir=FIXTURES,
        budget=Budget(max_attempts=3),
        steps=[
            Step(id="first", python="teststeps:add", with_={"a": 1, "b": 1}),
            Step(
                id="flaky",
                python="teststeps:flaky",
                with_={"counter": str(counter), "fail_times": 3},
                retry=RetryPolicy(max_attempts=5, backoff=0.01, jitter=False),
                needs=["first"],
            ),
            Step(id="last", python="teststeps:add", with_={"a": "${steps.first.output}", "b": 1}, needs=["flaky"]),
        ],
    )
    store = SQLiteStore(factory_home / "factory.db")
    try:
        stopped = factory.run(wf, store=store, settings=settings)
        assert stopped.status == RunStatus.FAILED
        assert "budget reached: max_attempts is 3 and the run would start attempt number 4" in (stopped.error or "")
        steps = {s.step_id: s.status.value for s in store.get_steps(stopped.run_id)}
        assert steps == {"first": "succeeded", "flaky": "cancelled", "last": "cancelled"}
        assert counter.read_text() == "xx"  # 1 + 2 attempts: the third of flaky was never started
        (event,) = store.latest_events(stopped.run_id, "run.budget_exceeded")
        assert event.data["budget"] == "max_attempts" and event.data["used"] == 4

        still = factory.resume(stopped.run_id, store=store, settings=settings)  # same budget: stops at once
        assert still.status == RunStatus.FAILED and counter.read_text() == "xx"

        done = factory.resume(stopped.run_id, store=store, settings=settings, budget=Budget(max_attempts=10))
        assert done.ok, done.error
        assert done.outputs["last"] == 3 and counter.read_text() == "xxxx"
        assert Workflow.model_validate_json(store.get_run(stopped.run_id).spec_json).budget == Budget(max_attempts=10)
    finally:
        store.close()


def test_max_seconds_stops_a_slow_run(settings: Settings, factory_home: Path) -> None:
    wf = Workflow(
        name="slow",
        base_dir=FIXTURES,
        steps=[Step(id="nap", python="teststeps:sleepy", with_={"seconds": 30})],
    )
    store = SQLiteStore(factory_home / "factory.db")
    try:
        result = factory.run(wf, store=store, settings=settings, budget=Budget(max_seconds=1.5))
        assert result.status == RunStatus.FAILED and "max_seconds is 1.5" in (result.error or "")
        run = store.get_run(result.run_id)
        assert run.finished_at is not None and run.finished_at - (run.started_at or 0) < 15  # not the 30 s nap
    finally:
        store.close()
