"""The store contract: the same tests on SQLite and PostgreSQL (the `store` fixture)."""

from __future__ import annotations

import time

import pytest

from factory.errors import LeaseLostError, RunNotFoundError
from factory.events import tail
from factory.store import RunChange, RunStatus, StepChange, StepStatus, Store, open_store


@pytest.fixture
def db(store: Store) -> Store:
    return store


def test_run_lifecycle_with_events_in_order(db: Store) -> None:
    db.create_run("r1", "wf", "{}", {"n": 1}, ["a", "b"])
    db.record(
        [
            RunChange("r1", RunStatus.RUNNING, "run.started"),
            StepChange("r1", "a", StepStatus.RUNNING, "step.started", attempts=1),
        ]
    )
    db.record(
        [
            StepChange(
                "r1",
                "a",
                StepStatus.SUCCEEDED,
                "step.succeeded",
                attempts=1,
                output_json="[1, 2]",
                attempt_logs="hi",
                attempt_duration=0.1,
            ),
            StepChange(
                "r1", "b", StepStatus.FAILED, "step.failed", attempts=1, error="ValueError: x", attempt_logs="tb"
            ),
            RunChange("r1", RunStatus.FAILED, "run.failed", error="step 'b' failed"),
        ]
    )
    run = db.get_run("r1")
    assert run.status == RunStatus.FAILED and run.error == "step 'b' failed" and run.finished_at
    assert run.inputs == {"n": 1}
    steps = {s.step_id: s for s in db.get_steps("r1")}
    assert steps["a"].output == [1, 2] and steps["a"].status == StepStatus.SUCCEEDED
    assert steps["b"].error == "ValueError: x"
    attempts = db.get_attempts("r1")
    assert [(a.step_id, a.status.value, a.logs) for a in attempts] == [("a", "succeeded", "hi"), ("b", "failed", "tb")]
    events = db.events(0, "r1")
    types = [e.type for e in events]
    assert types == [
        "run.created",
        "step.created",
        "step.created",
        "run.started",
        "step.started",
        "step.succeeded",
        "step.failed",
        "run.failed",
    ]
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert events[-2].data["error"] == "ValueError: x"


def test_a_failed_transaction_leaves_nothing_behind(db: Store) -> None:
    db.create_run("r1", "wf", "{}", {}, ["a"])
    before = db.events(0)
    with pytest.raises(Exception):  # noqa: B017 - any error must roll the whole batch back
        db.record([StepChange("r1", "a", StepStatus.RUNNING, "step.started"), StepChange("r1", "a", "bogus", "x")])  # type: ignore[arg-type]
    assert db.events(0) == before
    assert db.get_steps("r1")[0].status == StepStatus.PENDING


def test_tail_from_an_id_through_another_connection(db: Store) -> None:
    writer = db
    reader = open_store(db.url)
    writer.create_run("r1", "wf", "{}", {}, ["a"])
    writer.create_run("r2", "wf", "{}", {}, ["a"])
    all_events = list(tail(reader, 0))
    assert len(all_events) == 4
    later = list(tail(reader, all_events[1].id))
    assert later == all_events[2:]
    assert [e.run_id for e in tail(reader, 0, "r2")] == ["r2", "r2"]
    reader.close()


def test_a_coordinator_that_lost_its_lease_cannot_write(db: Store) -> None:
    db.create_run("r1", "wf", "{}", {}, ["a"])
    assert db.claim_run("r1", "old", lease_seconds=60)
    assert db.heartbeat("r1", "old")
    assert db.claim_run("r1", "new", lease_seconds=0)  # the old lease is treated as lapsed
    assert not db.heartbeat("r1", "old")
    before = db.events(0)
    with pytest.raises(LeaseLostError, match="owned by another coordinator"):
        db.record([StepChange("r1", "a", StepStatus.RUNNING, "step.started", attempts=1)], owner="old")
    assert db.events(0) == before and db.get_steps("r1")[0].status == StepStatus.PENDING
    db.record([StepChange("r1", "a", StepStatus.RUNNING, "step.started", attempts=1)], owner="new")
    assert db.get_steps("r1")[0].status == StepStatus.RUNNING


def test_lease_keeps_a_second_coordinator_out(db: Store) -> None:
    db.create_run("r1", "wf", "{}", {}, ["a"])
    assert db.claim_run("r1", "one", lease_seconds=60)
    assert not db.claim_run("r1", "two", lease_seconds=60)
    assert db.claim_run("r1", "two", lease_seconds=0)  # a stale lease can be taken over
    db.release_run("r1", "two")
    assert db.claim_run("r1", "three", lease_seconds=60)


def test_cancel_flag_and_unknown_runs(db: Store) -> None:
    db.create_run("r1", "wf", "{}", {}, ["a"])
    assert not db.cancel_requested("r1")
    db.request_cancel("r1")
    assert db.cancel_requested("r1")
    with pytest.raises(RunNotFoundError, match="factory runs"):
        db.get_run("nope")
    with pytest.raises(RunNotFoundError):
        db.request_cancel("nope")


def test_reset_unfinished_steps_keeps_committed_outputs(db: Store) -> None:
    db.create_run("r1", "wf", "{}", {}, ["a", "b", "c"])
    db.record(
        [
            StepChange("r1", "a", StepStatus.SUCCEEDED, "step.succeeded", attempts=1, output_json="1"),
            StepChange("r1", "b", StepStatus.RUNNING, "step.started", attempts=1),
        ]
    )
    assert db.reset_unfinished_steps("r1") == ["b", "c"]
    steps = {s.step_id: s for s in db.get_steps("r1")}
    assert steps["a"].output == 1 and steps["b"].status == StepStatus.PENDING


def test_cache_and_list_runs(db: Store) -> None:
    assert db.cache_get("k") is None
    db.cache_put("k", '{"v": 1}')
    assert db.cache_get("k") == '{"v": 1}'
    db.create_run("r1", "wf", "{}", {}, ["a"])
    time.sleep(0.01)
    db.create_run("r2", "wf", "{}", {}, ["a"])
    db.record([RunChange("r2", RunStatus.SUCCEEDED, "run.succeeded")])
    assert [r.id for r in db.list_runs()] == ["r2", "r1"]
    assert [r.id for r in db.list_runs(status=RunStatus.PENDING)] == ["r1"]
