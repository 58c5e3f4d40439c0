"""The store contract: the same tests on SQLite and PostgreSQL (the `store` fixture)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from factory.errors import LeaseLostError, RunNotFoundError
from factory.events import tail
from factory.store import (
    ApprovalRecord,
    Change,
    EventChange,
    ItemChange,
    RouteCorrection,
    RunChange,
    RunStatus,
    StepChange,
    StepStatus,
    Store,
    open_store,
)


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


def test_a_new_runs_steps_and_events_keep_their_order_and_event_rows_are_the_events_as_stored(db: Store) -> None:
    ids = [f"s{(i * 7) % 30}" for i in range(30)]  # not in sorted order
    db.create_run("r1", "wf", "{}", {}, ids)
    db.record([StepChange("r1", "s3", StepStatus.RUNNING, "step.started", attempts=1, data={"why": "é \u2603"})])
    assert [s.step_id for s in db.get_steps("r1")] == ids
    events = db.events(0, "r1")
    assert [e.step_id for e in events] == [None, *ids, "s3"]
    rows = db.event_rows(0, 1000)
    assert [(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5]) for r in rows] == [
        (e.id, e.run_id, e.step_id, e.type, e.data, e.ts) for e in events
    ]
    assert rows[-1][4] == json.dumps({"why": "é \u2603", "attempt": 1})  # the data's text as written
    assert db.event_rows(rows[2][0], 3) == rows[3:6]


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


def test_a_dead_owner_holds_no_lease(db: Store) -> None:
    """claim_run's dead_owner: the caller found that owner's process gone (factory.owner)."""
    db.create_run("r1", "wf", "{}", {}, ["a"])
    assert db.claim_run("r1", "dead", lease_seconds=60)
    assert not db.claim_run("r1", "new", lease_seconds=60, dead_owner="someone-else")
    assert db.claim_run("r1", "new", lease_seconds=60, dead_owner="dead")  # fresh lease, but its owner died
    assert not db.claim_run("r1", "third", lease_seconds=60, dead_owner="dead")  # "new" owns it now


def test_a_start_that_came_late_does_not_claim_a_run_that_is_no_longer_pending(db: Store) -> None:
    """A submitted run's start claims it only while it is pending, in the claim's transaction: the
    supervisor may have failed it meanwhile (nobody started it in time), and it must not run after."""
    db.create_run("r1", "wf", "{}", {}, ["a"])
    db.create_run("r2", "wf", "{}", {}, ["a"])
    db.record([RunChange("r1", RunStatus.FAILED, "run.failed", error="nobody started it within 3s")])
    assert not db.claim_run("r1", "late", lease_seconds=60, pending_only=True)
    assert db.get_run("r1").owner is None and db.get_run("r1").status == RunStatus.FAILED
    assert db.claim_run("r1", "resumer", lease_seconds=60)  # resuming a failed run on purpose still claims it
    assert db.claim_run("r2", "starter", lease_seconds=60, pending_only=True)  # pending: claimed


def test_store_id_is_made_once_and_kept_in_the_store(db: Store) -> None:
    store_id = db.store_id()
    assert store_id and store_id == db.store_id()
    again = open_store(db.url)
    assert again.store_id() == store_id  # another process, same store: same id
    again.close()


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


def test_run_grants_round_trip(db: Store) -> None:
    from factory.store import RunGrants

    grants = RunGrants(principal="key:ab12", modules=["steps"], secrets=["TOKEN"], workflow_ref="wf@2")
    db.create_run("g1", "wf", "{}", {}, ["a"], grants=grants)
    db.create_run("g2", "wf", "{}", {}, ["a"])
    assert db.get_run("g1").grants == grants
    assert db.get_run("g2").grants is None
    assert [r.grants for r in db.list_runs(10) if r.id == "g1"] == [grants]


def test_keys_keep_expiry_grants_and_last_use(db: Store) -> None:
    from factory.auth import Scope, create_key, verify_key
    from factory.errors import AuthenticationError

    key, record = create_key(db, [Scope.SUBMIT], "ci", expires_in=3600, secrets_granted=["B_TOKEN", "A_TOKEN"])
    found = verify_key(db, key)
    assert found.secrets == ["A_TOKEN", "B_TOKEN"] and found.expires_at == pytest.approx(time.time() + 3600, abs=5)
    assert found.last_used_at is None
    db.touch_api_key(record.id, 1234.5)
    assert db.list_api_keys()[0].last_used_at == 1234.5
    short, _ = create_key(db, [Scope.READ], expires_in=0.05)
    time.sleep(0.1)
    with pytest.raises(AuthenticationError, match="expired"):
        verify_key(db, short)


def test_registered_workflows_are_versioned(db: Store) -> None:
    from factory.store import RegisteredWorkflow

    def version(spec: str) -> RegisteredWorkflow:
        return RegisteredWorkflow(name="report", spec_json=spec, base_dir="/opt/x", secrets=["T"], created_at=1.0)

    assert db.register_workflow(version('{"v": 1}')).version == 1
    assert db.register_workflow(version('{"v": 2}')).version == 2
    db.register_workflow(RegisteredWorkflow(name="other", spec_json="{}", created_at=2.0))
    latest = db.get_registered_workflow("report")
    assert latest is not None and latest.version == 2 and latest.spec_json == '{"v": 2}' and latest.secrets == ["T"]
    first = db.get_registered_workflow("report", 1)
    assert first is not None and first.spec_json == '{"v": 1}'
    assert db.get_registered_workflow("report", 3) is None and db.get_registered_workflow("nope") is None
    assert [(w.name, w.version) for w in db.list_registered_workflows()] == [("other", 1), ("report", 2)]


def test_a_version_2_sqlite_database_gains_the_new_columns(tmp_path: object) -> None:
    import sqlite3
    from pathlib import Path

    from factory.store.sqlite import SQLiteStore

    path = Path(str(tmp_path)) / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE runs (id TEXT PRIMARY KEY, workflow_name TEXT NOT NULL, status TEXT NOT NULL,
            spec_json TEXT NOT NULL, inputs_json TEXT NOT NULL, error TEXT, created_at REAL NOT NULL,
            started_at REAL, finished_at REAL, owner TEXT, heartbeat_at REAL,
            cancel_requested INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
            scopes TEXT NOT NULL, created_at REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
        INSERT INTO runs VALUES ('old', 'wf', 'succeeded', '{}', '{}', NULL, 1.0, NULL, NULL, NULL, NULL, 0);
        INSERT INTO api_keys VALUES ('k1', 'old key', 'hash', 'admin', 1.0, 0);
        PRAGMA user_version=2;
        """
    )
    conn.close()
    store = SQLiteStore(path)
    try:
        assert store.get_run("old").grants is None
        assert store.list_api_keys()[0].secrets == [] and store.list_api_keys()[0].expires_at is None
    finally:
        store.close()


def test_route_corrections_are_kept_in_order(db: Store) -> None:
    from factory.store import RouteCorrection

    before = db.route_corrections()
    first = db.add_route_correction(RouteCorrection(text="a task", agent="sql", who="key:k1", created_at=time.time()))
    second = db.add_route_correction(
        RouteCorrection(text="another one", agent="coder", decision_id="d-1", created_at=time.time())
    )
    assert 0 < first.id < second.id
    seen = db.route_corrections(after_id=before[-1].id if before else 0)
    assert [(c.text, c.agent, c.decision_id, c.who) for c in seen] == [
        ("a task", "sql", None, "key:k1"),
        ("another one", "coder", "d-1", ""),
    ]
    assert db.route_corrections(after_id=first.id) == [second]
    assert db.route_corrections(after_id=0, limit=1)[0].id <= first.id


def test_the_newest_attempts_only_when_asked(db: Store) -> None:
    db.create_run("r-att", "wf", "{}", {}, ["a"])
    for attempt in (1, 2, 3):
        db.record(
            [
                StepChange(
                    "r-att", "a", StepStatus.RETRYING, "step.retrying", attempts=attempt, error=f"e{attempt}",
                    attempt_logs=f"try {attempt}", attempt_duration=0.1,
                )
            ]
        )  # fmt: skip
    assert [a.attempt for a in db.get_attempts("r-att")] == [1, 2, 3]
    assert [a.attempt for a in db.get_attempts("r-att", limit=2)] == [2, 3]
    assert [a.attempt for a in db.get_attempts("r-att", "a", limit=5)] == [1, 2, 3]


def test_correction_sync_learns_a_lower_id_committed_late(db: Store) -> None:
    """On PostgreSQL a lower id can commit after a higher one was read: the sync reads a window
    of recent ids again and learns what it had not, once."""
    from factory.routing.corrections import CorrectionSync
    from factory.store import RouteCorrection

    learnt: list[tuple[str, str]] = []

    class Recorder:
        def learn_many(self, pairs: list[tuple[str, str]]) -> int:
            learnt.extend(pairs)
            return len(pairs)

    sync = CorrectionSync()
    sync.pull(Recorder(), db)  # type: ignore[arg-type]
    learnt.clear()
    first = db.add_route_correction(RouteCorrection(text="one", agent="a", created_at=time.time()))
    second = db.add_route_correction(RouteCorrection(text="two", agent="b", created_at=time.time()))
    seen_late = [c for c in db.route_corrections(first.id - 1) if c.id == first.id]
    # a pull that saw only `second` (as if `first` had not committed yet) ...
    sync.seen, sync._recent = second.id, {second.id}
    assert sync.pull(Recorder(), db) == len(seen_late)  # type: ignore[arg-type]
    assert learnt == [("a", "one")]  # ... learns `first` at the next pull, and `second` not twice
    assert sync.pull(Recorder(), db) == 0  # type: ignore[arg-type]


# -- schedules --------------------------------------------------------------------------------------


def _schedule(name: str = "nightly", by: str = "key:k1", after: float = 1000.0) -> object:
    from factory.store import ScheduleRecord

    return ScheduleRecord(
        name=name,
        workflow_name="wf",
        workflow_version=1,
        cron="0 6 * * *",
        timezone="Europe/Paris",
        inputs={"n": 1},
        created_at=after,
        created_by=by,
        after=after,
    )


def test_schedules_are_added_once_by_name_and_bounded_per_owner(db: Store) -> None:
    from factory.errors import ScheduleConflictError

    db.add_schedule(_schedule("a"), max_per_owner=2)  # type: ignore[arg-type]
    with pytest.raises(ScheduleConflictError, match="exists already"):
        db.add_schedule(_schedule("a", by="key:k2"))  # type: ignore[arg-type]
    db.add_schedule(_schedule("b"), max_per_owner=2)  # type: ignore[arg-type]
    with pytest.raises(ScheduleConflictError, match="holds 2 schedules"):
        db.add_schedule(_schedule("c"), max_per_owner=2)  # type: ignore[arg-type]
    db.add_schedule(_schedule("c", by="key:k2"), max_per_owner=2)  # type: ignore[arg-type]
    assert [s.name for s in db.list_schedules()] == ["a", "b", "c"]
    got = db.get_schedule("a")
    assert got is not None and got.inputs == {"n": 1} and got.timezone == "Europe/Paris" and not got.paused
    assert db.get_schedule("nope") is None


def test_pause_keeps_a_reason_and_resume_skips_the_paused_time(db: Store) -> None:
    db.add_schedule(_schedule(after=1000.0))  # type: ignore[arg-type]
    assert db.set_schedule_paused("nightly", True, "key:k1 was revoked", 2000.0)
    paused = db.get_schedule("nightly")
    assert paused is not None and paused.paused and paused.paused_reason == "key:k1 was revoked"
    assert db.set_schedule_paused("nightly", False, None, 5000.0)
    resumed = db.get_schedule("nightly")
    assert resumed is not None and not resumed.paused and resumed.paused_reason is None and resumed.after == 5000.0
    assert not db.set_schedule_paused("nope", True, "x", 1.0)


def test_a_tick_is_decided_once_with_its_run_in_the_same_transaction(db: Store) -> None:
    from factory.store import NewRun, TickRecord

    db.add_schedule(_schedule(after=1000.0))  # type: ignore[arg-type]
    tick = TickRecord(schedule="nightly", tick=1200, action="run", reason="on time", decided_at=1201.0)
    first = NewRun("run-1", "wf", "{}", {"n": 1}, ["a"])
    assert db.decide_tick(tick.model_copy(update={"run_id": "run-1", "decided_by": "s1"}), first)
    # a second scheduler deciding the same tick changes nothing: no second run, no second row
    second = NewRun("run-2", "wf", "{}", {"n": 1}, ["a"])
    assert not db.decide_tick(tick.model_copy(update={"run_id": "run-2", "decided_by": "s2"}), second)
    assert not db.decide_tick(tick.model_copy(update={"action": "skip"}))
    with pytest.raises(RunNotFoundError):
        db.get_run("run-2")
    run = db.get_run("run-1")
    assert run.status == RunStatus.PENDING and [s.step_id for s in db.get_steps("run-1")] == ["a"]
    ticks = db.schedule_ticks("nightly")
    assert [(t.tick, t.run_id, t.decided_by) for t in ticks] == [(1200, "run-1", "s1")]
    record = db.get_schedule("nightly")
    assert record is not None and record.after == 1200 and record.last_run_id == "run-1"
    # a skip moves the schedule on without a run; an older tick decided late never moves it back
    assert db.decide_tick(TickRecord(schedule="nightly", tick=1500, action="skip", missed=3, decided_at=1600.0))
    assert db.decide_tick(TickRecord(schedule="nightly", tick=1100, action="skip", decided_at=1600.0))
    record = db.get_schedule("nightly")
    assert record is not None and record.after == 1500 and record.last_run_id == "run-1"
    assert [t.tick for t in db.schedule_ticks("nightly", 2)] == [1500, 1200]
    assert db.schedule_ticks("nightly")[0].missed == 3


def test_removing_a_schedule_forgets_its_ticks_but_keeps_its_runs(db: Store) -> None:
    from factory.store import NewRun, TickRecord

    db.add_schedule(_schedule())  # type: ignore[arg-type]
    tick = TickRecord(schedule="nightly", tick=1200, action="run", run_id="run-1", decided_at=1.0)
    assert db.decide_tick(tick, NewRun("run-1", "wf", "{}", {}, ["a"]))
    assert db.remove_schedule("nightly") and not db.remove_schedule("nightly")
    assert db.get_schedule("nightly") is None and db.schedule_ticks("nightly") == []
    assert db.get_run("run-1").status == RunStatus.PENDING
    db.add_schedule(_schedule())  # type: ignore[arg-type]  # the name is free again, its ticks decided anew
    assert db.decide_tick(tick, NewRun("run-2", "wf", "{}", {}, ["a"]))


def _every_kind_of_change(run_id: str) -> list[list[Change]]:
    """Record calls with each kind of change, a step's several changes in one batch (started,
    failed, started again, succeeded), items written twice, outputs, logs and errors with quotes,
    a backslash, non-ASCII text, a JSON-escaped NUL and a NUL character (which a step may print),
    and times given (``at``) where a change has one."""
    t = 1_733_600_000.123456
    odd = 'quote " back \\ é 日本 \\u0000 and a NUL \x00 end'
    return [
        [RunChange(run_id, RunStatus.RUNNING, "run.started", at=t)],
        [
            StepChange(run_id, "a", StepStatus.RUNNING, "step.started", attempts=1, at=t + 1),
            StepChange(
                run_id,
                "a",
                StepStatus.RETRYING,
                "step.retrying",
                attempts=1,
                error="E: " + odd,
                attempt_logs=odd,
                attempt_duration=0.25,
                at=t + 2,
            ),
            StepChange(run_id, "a", StepStatus.RUNNING, "step.started", attempts=2, at=t + 3),
            StepChange(
                run_id,
                "a",
                StepStatus.SUCCEEDED,
                "step.succeeded",
                attempts=2,
                output_json=json.dumps(odd),
                attempt_logs="",
                attempt_duration=0.5,
                data={"why": odd},
                at=t + 4,
            ),
            StepChange(run_id, "w", StepStatus.WAITING, "step.waiting", at=t + 5),
            ItemChange(run_id, "b", 0, 2, "1", logs=odd),
            ItemChange(run_id, "b", 1, 2, "[2]", attempts=2),
            EventChange(run_id, "b", "step.progress", {"done": 1}),
        ],
        [
            ItemChange(run_id, "b", 1, 2, '"again"', attempts=3, cached=True),
            StepChange(run_id, "w", StepStatus.WAITING, "step.waiting", at=t + 6),  # reopened: keeps its start
            StepChange(
                run_id,
                "b",
                StepStatus.SUCCEEDED,
                "step.succeeded",
                attempts=1,
                output_json="[1]",
                cached=True,
                at=t + 7,
            ),
            StepChange(run_id, "c", StepStatus.SKIPPED, "step.skipped", error="a dependency did not succeed"),
            RunChange(run_id, RunStatus.FAILED, "run.failed", error=odd, at=t + 8),
        ],
    ]


def _what_is_kept(store: Store, run_id: str) -> dict[str, object]:
    run = store.get_run(run_id)
    return {
        "run": (run.status, run.error, run.started_at, run.finished_at),
        "steps": [
            (s.step_id, s.status, s.attempts, s.output_json, s.error, s.started_at, s.finished_at, s.cached)
            for s in store.get_steps(run_id)
            if s.step_id != "c"  # its times are those of the commit
        ],
        "c": [(s.status, s.error) for s in store.get_steps(run_id) if s.step_id == "c"],
        "attempts": [(a.step_id, a.attempt, a.status, a.error, a.logs, a.duration) for a in store.get_attempts(run_id)],
        "items": [
            (i.step_id, i.index, i.total, i.output_json, i.attempts, i.logs, i.cached) for i in store.get_items(run_id)
        ],
        "events": [(e.step_id, e.type, e.data) for e in store.events(0, run_id)],
    }


def test_postgresql_writes_a_batch_as_sqlite_does_in_one_statement_or_row_by_row(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL records a batch with one call of factory_record (a statement a table), its
    steps' rows folded to one a step or not (as a client older than the fold sends them: the
    function goes row by row then), or row by row from the client when its rows are large: each
    keeps what SQLite keeps, change for change."""
    from factory.store import postgres
    from factory.store.postgres import PostgresStore
    from factory.store.sql import SQLStore
    from factory.store.sqlite import SQLiteStore

    def not_row_by_row(*args: object) -> None:
        raise AssertionError("this batch should have gone in one call of factory_record")

    sqlite, pg = SQLiteStore(tmp_path / "f.db"), PostgresStore(postgres_url)
    try:
        kept = []
        ways = ((sqlite, "r", ""), (pg, "one", "one"), (pg, "unfolded", "one"), (pg, "rows", "rows"))
        for store, run_id, how in ways:
            with monkeypatch.context() as patch:
                if how == "rows":
                    patch.setattr(postgres, "MAX_RECORD_JSON_CHARS", 0)
                elif how == "one":
                    patch.setattr(SQLStore, "_apply_record", not_row_by_row)
                if run_id == "unfolded":
                    patch.setattr(postgres, "fold_step_rows", list)
                store.create_run(run_id, "wf", "{}", {}, ["a", "b", "c", "w"])
                for batch in _every_kind_of_change(run_id):
                    store.record(batch)
            kept.append(_what_is_kept(store, run_id))
        assert kept[0]["run"] == (
            RunStatus.FAILED,
            'quote " back \\ é 日本 \\u0000 and a NUL \ufffd end',
            1_733_600_000.123456,
            1_733_600_008.123456,
        )
        assert [e[1] for e in kept[0]["events"]][-3:] == ["step.succeeded", "step.skipped", "run.failed"]
        assert kept[1] == kept[0]
        assert kept[2] == kept[0]
        assert kept[3] == kept[0]
    finally:
        sqlite.close()
        pg.close()


_STEPS = ("a", "b", "c")
_random_changes = st.lists(
    st.one_of(
        st.builds(
            StepChange,
            run_id=st.just(""),
            step_id=st.sampled_from(_STEPS),
            status=st.sampled_from(list(StepStatus)),
            event=st.sampled_from(["step.started", "step.retrying", "step.succeeded", "step.waiting"]),
            attempts=st.none() | st.integers(1, 2),
            output_json=st.none() | st.sampled_from(['"x"', "[1, 2]", '{"k": "\\u00e9"}']),
            error=st.none() | st.sampled_from(["boom", 'a "quoted" error']),
            attempt_logs=st.sampled_from([None, "", "line\n", "more"]),
            attempt_duration=st.none() | st.floats(0, 10),
            cached=st.booleans(),
            data=st.sampled_from([{}, {"why": "é"}]),
            at=st.floats(1e9, 2e9),
        ),
        st.builds(
            ItemChange,
            run_id=st.just(""),
            step_id=st.sampled_from(_STEPS),
            index=st.integers(0, 2),
            total=st.just(3),
            output_json=st.sampled_from(["1", '"two"']),
            attempts=st.integers(1, 3),
            logs=st.sampled_from(["", "log"]),
            cached=st.booleans(),
        ),
        st.builds(
            RunChange,
            run_id=st.just(""),
            status=st.sampled_from(list(RunStatus)),
            event=st.just("run.changed"),
            error=st.none() | st.just("failed"),
            at=st.floats(1e9, 2e9),
        ),
    ),
    max_size=16,
)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    from factory.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "f.db")
    yield store
    store.close()


@pytest.fixture
def postgres_store(postgres_url: str) -> Iterator[Store]:
    from factory.store.postgres import PostgresStore

    store = PostgresStore(postgres_url)
    yield store
    store.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=_random_changes, cuts=st.lists(st.integers(0, 16), max_size=4))
@example(  # an attempt ended twice in one batch (its last row wins), and a step started and ended
    changes=[
        StepChange("", "a", StepStatus.RUNNING, "step.started", attempts=1, at=4.0),
        StepChange("", "a", StepStatus.RETRYING, "step.retrying", attempts=1, attempt_logs="one", at=5.0),
        StepChange("", "a", StepStatus.SUCCEEDED, "step.succeeded", attempts=1, attempt_logs="two", at=6.0),
    ],
    cuts=[],
)
def test_postgresql_keeps_what_sqlite_keeps_for_any_batches_of_changes(
    postgres_store: Store, sqlite_store: Store, changes: list[Change], cuts: list[int]
) -> None:
    """Random changes (a step's several in a batch, an item or an attempt written twice in one),
    cut into random batches: PostgreSQL (a statement a table, steps folded) keeps what SQLite
    (a statement a row) keeps."""
    import dataclasses
    import itertools
    import uuid

    bounds = sorted({0, len(changes), *(c for c in cuts if c < len(changes))})
    kept = []
    for store in (sqlite_store, postgres_store):
        run_id = uuid.uuid4().hex[:12]
        store.create_run(run_id, "wf", "{}", {}, list(_STEPS))
        mine = [dataclasses.replace(change, run_id=run_id) for change in changes]
        for lo, hi in itertools.pairwise(bounds):
            store.record(mine[lo:hi])
        what = _what_is_kept(store, run_id)
        what["steps"] = [
            (s.step_id, s.status, s.attempts, s.output_json, s.error, s.started_at, s.finished_at, s.cached)
            for s in store.get_steps(run_id)
        ]
        kept.append(what)
    assert kept[1] == kept[0]


def test_a_database_made_before_the_record_function_went_a_table_at_a_time_is_migrated(postgres_url: str) -> None:
    """Migration 11 remakes factory_record in a database where 10 made it (here: one that only fails)."""
    import psycopg

    from factory.store.postgres import PostgresStore

    PostgresStore(postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DELETE FROM schema_migrations WHERE version = 11")
        conn.execute(
            "CREATE OR REPLACE FUNCTION factory_record(p_owner TEXT, p_run_ids TEXT[], p_steps JSONB,"
            " p_attempts JSONB, p_runs JSONB, p_items JSONB, p_events JSONB, OUT problem TEXT, OUT problem_run TEXT,"
            " OUT run_owner TEXT) LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'the old function'; END $$"
        )
    pg = PostgresStore(postgres_url)
    try:
        assert pg.applied_migrations == [11]
        pg.create_run("r", "wf", "{}", {}, ["a"])
        pg.record([StepChange("r", "a", StepStatus.RUNNING, "step.started", attempts=1)])
        assert pg.get_steps("r")[0].status == StepStatus.RUNNING
    finally:
        pg.close()


def test_postgresql_writes_row_by_row_what_jsonb_cannot_carry(postgres_url: str) -> None:
    """A NUL character in an id (JSONB refuses it; the store's text parameters turn it into
    U+FFFD) or a NaN duration (not JSON): the batch goes row by row instead of failing."""
    from factory.store.postgres import PostgresStore

    pg = PostgresStore(postgres_url)
    try:
        pg.create_run("r\x001", "wf", "{}", {}, ["s\x00a", "b"])
        pg.record(
            [
                StepChange(
                    "r\x001",
                    "s\x00a",
                    StepStatus.SUCCEEDED,
                    "step.succeeded",
                    attempts=1,
                    output_json="1",
                    attempt_logs="",
                    attempt_duration=0.5,
                ),
                StepChange(
                    "r\x001",
                    "b",
                    StepStatus.SUCCEEDED,
                    "step.succeeded",
                    attempts=1,
                    output_json="2",
                    attempt_logs="",
                    attempt_duration=float("nan"),
                ),
            ]
        )
        steps = {s.step_id: s for s in pg.get_steps("r\ufffd1")}
        assert steps["s\ufffda"].status == StepStatus.SUCCEEDED and steps["b"].output_json == "2"
        durations = {a.step_id: a.duration for a in pg.get_attempts("r\ufffd1")}
        assert durations["s\ufffda"] == 0.5 and durations["b"] != durations["b"]  # NaN
    finally:
        pg.close()


@pytest.mark.parametrize("row_by_row", [False, True])
def test_postgresql_checks_every_runs_lease_before_it_writes(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, row_by_row: bool
) -> None:
    from factory.store import postgres
    from factory.store.postgres import PostgresStore

    if row_by_row:
        monkeypatch.setattr(postgres, "MAX_RECORD_JSON_CHARS", 0)
    pg = PostgresStore(postgres_url)
    try:
        for run_id in ("r1", "r2"):
            pg.create_run(run_id, "wf", "{}", {}, ["a"])
        assert pg.claim_run("r1", "me", 30) and pg.claim_run("r2", "other", 30)
        before = pg.events(0)
        batch: list[Change] = [
            StepChange("r1", "a", StepStatus.RUNNING, "step.started", attempts=1),
            StepChange("r2", "a", StepStatus.RUNNING, "step.started", attempts=1),
        ]
        with pytest.raises(LeaseLostError, match="run r2 is now owned by another coordinator \\(other\\)"):
            pg.record(batch, owner="me")
        with pytest.raises(RunNotFoundError, match="no run 'r3'"):
            pg.record([StepChange("r3", "a", StepStatus.RUNNING, "step.started")], owner="me")
        assert pg.events(0) == before and pg.get_steps("r1")[0].status == StepStatus.PENDING
        pg.record(batch[:1], owner="me")
        assert pg.get_steps("r1")[0].status == StepStatus.RUNNING
    finally:
        pg.close()


def test_text_with_a_nul_character_is_kept_or_replaced_never_refused(db: Store) -> None:
    """PostgreSQL's text cannot hold NUL: its store turns one into U+FFFD (psycopg refused the
    statement, so a comment, a name or a search given to the API with a NUL failed with an
    internal error); SQLite keeps it."""

    def same(kept: str | None, given: str) -> bool:
        return kept is not None and kept.replace("\x00", "\ufffd") == given.replace("\x00", "\ufffd")

    db.create_run("r1", "wf\x00name", "{}", {"x": "in\x00put"}, ["a"])
    assert same(db.get_run("r1").workflow_name, "wf\x00name") and db.get_run("r1").inputs == {"x": "in\x00put"}
    decided, _ = db.decide_approval(
        ApprovalRecord(run_id="r1", step_id="a", approved=True, by="me\x00", comment="ok\x00then", decided_at=1.0)
    )
    assert same(decided.comment, "ok\x00then") and same(decided.by, "me\x00")
    kept = db.add_route_correction(RouteCorrection(text="route\x00me", agent="writer", created_at=1.0))
    assert same(kept.text, "route\x00me") and same(db.route_corrections()[-1].text, "route\x00me")
    assert [r.id for r in db.run_summaries(text="wf")] == ["r1"]
    assert db.run_summaries(text="no\x00such") == []
    with pytest.raises(RunNotFoundError):
        db.get_run("r\x001")
