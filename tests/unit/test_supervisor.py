"""The supervisor's decisions, from plain records (no Ray, no store, no clock)."""

from __future__ import annotations

from factory.store import RunRecord, RunStatus
from factory.supervisor import decide

NOW = 1_000.0


def run(
    run_id: str, status: RunStatus, owner: str | None = None, heartbeat: float | None = None, **kw: object
) -> RunRecord:
    return RunRecord(
        id=run_id,
        workflow_name="w",
        status=status,
        spec_json="{}",
        inputs={},
        created_at=kw.pop("created_at", NOW - 100),  # type: ignore[arg-type]
        owner=owner,
        heartbeat_at=heartbeat,
        **kw,  # type: ignore[arg-type]
    )


def choose(*runs: RunRecord, adopted: dict[str, int] | None = None, gone: set[str] | None = None) -> dict[str, str]:
    decisions = decide(
        runs,
        now=NOW,
        lease_seconds=10,
        pending_grace=15,
        adopted=adopted or {},
        max_adoptions=3,
        owner_gone=lambda owner: owner in (gone or set()),
    )
    return {d.run_id: d.action for d in decisions}


def test_live_owners_and_finished_runs_are_left_alone() -> None:
    assert (
        choose(
            run("live", RunStatus.RUNNING, "host:1", NOW - 2),
            run("done", RunStatus.SUCCEEDED),
            run("failed", RunStatus.FAILED, "host:1", NOW - 500),
            run("fresh", RunStatus.PENDING, created_at=NOW - 3),
        )
        == {}
    )


def test_expired_leases_dead_owners_and_forgotten_pending_runs_are_adopted() -> None:
    assert choose(
        run("expired", RunStatus.RUNNING, "host:1", NOW - 11),
        run("dead", RunStatus.RUNNING, "host:2", NOW - 1),  # fresh heartbeat, but its process is gone
        run("forgotten", RunStatus.PENDING, created_at=NOW - 20),
        run("claimed-then-died", RunStatus.PENDING, "host:3", NOW - 30),
        gone={"host:2"},
    ) == {"expired": "resume", "dead": "resume", "forgotten": "start", "claimed-then-died": "start"}


def test_a_cancel_asked_meanwhile_is_finished_and_repeat_orphans_fail() -> None:
    decisions = decide(
        [
            run("cancel", RunStatus.RUNNING, "host:1", NOW - 60, cancel_requested=True),
            run("again", RunStatus.RUNNING, "host:1", NOW - 60),
        ],
        now=NOW,
        lease_seconds=10,
        pending_grace=15,
        adopted={"again": 3},
        max_adoptions=3,
        owner_gone=lambda _: False,
    )
    by_id = {d.run_id: d for d in decisions}
    assert by_id["cancel"].action == "cancel"
    assert by_id["again"].action == "fail" and "resumed 3 time(s)" in by_id["again"].reason
