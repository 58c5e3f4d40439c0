"""The store's queries for the dashboard (run summaries, counts, activity) on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from typing import Any

from factory.store import RunChange, RunStatus, StepChange, StepStatus
from factory.store.sql import RUN_LAST_EVENT_SQL


def make_runs(store: Any) -> None:
    for i in range(12):
        name = "alpha" if i % 2 else "beta_100%"
        store.create_run(f"run-{i:02d}", name, "{}", {}, ["a", "b", "c"])
        if i % 3 == 0:
            store.record(
                [
                    StepChange(f"run-{i:02d}", "a", StepStatus.SUCCEEDED, "step.succeeded", attempts=1),
                    StepChange(f"run-{i:02d}", "b", StepStatus.FAILED, "step.failed", attempts=2, error="boom"),
                    RunChange(f"run-{i:02d}", RunStatus.FAILED, "run.failed", error=f"oops number {i}"),
                ]
            )


def test_run_summaries_count_steps_filter_and_page(store: Any) -> None:
    make_runs(store)
    first = store.run_summaries(limit=5)
    assert [r.id for r in first] == ["run-11", "run-10", "run-09", "run-08", "run-07"]
    nine = first[2]
    assert (nine.steps_total, nine.steps_done, nine.steps_failed, nine.status) == (3, 1, 1, RunStatus.FAILED)
    assert first[0].steps_done == 0 and first[0].status == RunStatus.PENDING
    rest = store.run_summaries(limit=100, before=(first[-1].created_at, first[-1].id))
    assert [r.id for r in first + rest] == [f"run-{i:02d}" for i in range(11, -1, -1)]

    failed = store.run_summaries(limit=100, status=RunStatus.FAILED)
    assert {r.id for r in failed} == {"run-00", "run-03", "run-06", "run-09"}
    assert {r.id for r in store.run_summaries(limit=100, workflow="alpha")} == {f"run-{i:02d}" for i in range(1, 12, 2)}
    # text: case-insensitive, in the id, the workflow or the error; % and _ are plain characters
    assert [r.id for r in store.run_summaries(limit=100, text="NUMBER 9")] == ["run-09"]
    assert len(store.run_summaries(limit=100, text="100%")) == 6
    assert store.run_summaries(limit=100, text="a_p") == []
    assert store.run_summaries(limit=100, text="1%0") == []  # a % in the text is no wildcard
    assert {r.id for r in store.run_summaries(limit=100, text="run-1")} == {"run-10", "run-11"}


def test_status_counts_and_activity(store: Any) -> None:
    since = time.time() - 1
    make_runs(store)
    counts = store.run_status_counts()
    assert counts[RunStatus.FAILED] == 4 and counts[RunStatus.PENDING] == 8 and counts[RunStatus.SUCCEEDED] == 0
    store.record(
        [
            StepChange(
                "run-01", "a", StepStatus.SUCCEEDED, "step.succeeded", attempts=1, attempt_logs="", attempt_duration=0.5
            ),
            StepChange("run-01", "b", StepStatus.RETRYING, "step.retrying", attempts=1),
        ]
    )
    attempts = store.attempts_since(since)
    assert [(a.run_id, a.step_id, a.duration) for a in attempts] == [("run-01", "a", 0.5)]
    assert store.attempts_since(time.time() + 10) == []
    assert [t for _, t in store.event_times(since, ["step.retrying"])] == ["step.retrying"]
    assert len(store.event_times(since, ["step.failed"])) == 4
    assert store.event_times(time.time() + 10, ["step.failed"]) == []


def test_latest_events_of_a_type(store: Any) -> None:
    make_runs(store)
    for done in range(3):
        store.append_event("run-01", "a", "step.items", {"done": done, "total": 3})
    store.append_event("run-02", "a", "step.items", {"done": 9, "total": 9})
    latest = store.latest_events("run-01", "step.items", 2)
    assert [e.data["done"] for e in latest] == [2, 1] and all(e.run_id == "run-01" for e in latest)
    assert store.latest_events("run-03", "step.items") == []


def test_last_event_id_of_a_run(store: Any) -> None:
    """A run's newest event id, through the (run_id, id) index; the store's newest without a run."""
    assert store.last_event_id() == 0 and store.last_event_id("run-00") == 0
    make_runs(store)
    ids = {f"run-{i:02d}": max(e.id for e in store.events(0, f"run-{i:02d}", 10_000)) for i in range(12)}
    store.append_event("run-03", "a", "step.log", {"lines": ["x"]})
    newest = store.last_event_id()
    assert newest > max(ids.values())
    assert store.last_event_id("run-03") == newest  # the event just appended
    assert store.last_event_id("run-05") == ids["run-05"] < newest  # other runs' events do not move it
    assert store.last_event_id("no-such-run") == 0
    query = RUN_LAST_EVENT_SQL
    if store.url.startswith("sqlite"):
        with store._read() as cur:
            plan = " ".join(str(row[-1]) for row in cur.execute("EXPLAIN QUERY PLAN " + query, ("run-05",)))
        assert "INDEX events_run" in plan and "TEMP B-TREE" not in plan, plan
    else:  # a scan of the events would be possible too: ask whether the index answers it, in order
        with store._write() as cur:
            cur.execute("SET LOCAL enable_seqscan = off")
            plan = " ".join(row[0] for row in cur.execute("EXPLAIN " + query.replace("?", "%s"), ("run-05",)))
        assert "events_run" in plan and "Sort" not in plan, plan
