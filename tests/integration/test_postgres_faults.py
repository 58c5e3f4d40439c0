"""The PostgreSQL store through database faults: terminated backends, a lost COMMIT
acknowledgement, a server restart. Runs finish, no committed step runs twice, no event is
written twice.

The shared server (127.0.0.1:5432) serves other tests at the same time: the tests here
terminate only the backends of their own store (found by a unique application_name), and
the restart test restarts a private PostgreSQL of its own (initdb in a temporary folder),
never the shared one.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

import factory
from factory.engine import RunResult
from factory.errors import StoreUnavailableError
from factory.settings import Settings
from factory.spec import Step, Workflow
from factory.store import RunChange, RunStatus, StepChange, StepStatus
from factory.store.postgres import PostgresStore
from factory.store.sql import Cursor, RecordRows
from tests.conftest import POSTGRES_URL
from tests.fixtures.private_postgres import PrivatePostgres

FIXTURES = str(Path(__file__).parent.parent / "fixtures")


def chain(log: Path, n: int, seconds: float) -> Workflow:
    """n steps one after the other; each appends its number to ``log`` when it runs."""
    steps = [
        Step(
            id=f"s{i}",
            python="teststeps:slow_record",
            needs=[f"s{i - 1}"] if i else [],
            with_={"path": str(log), "value": i, "seconds": seconds},
        )
        for i in range(n)
    ]
    return Workflow(name="faults", steps=steps, base_dir=FIXTURES)


def executions(log: Path) -> list[int]:
    return sorted(int(line) for line in log.read_text().split())


def run_in_thread(call: Callable[[], RunResult]) -> tuple[threading.Thread, list[RunResult | BaseException]]:
    outcome: list[RunResult | BaseException] = []

    def target() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def committed_steps(store: PostgresStore, run_id: str | None) -> int:
    if run_id is None:
        return 0
    return sum(s.status == StepStatus.SUCCEEDED for s in store.get_steps(run_id))


def wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


@pytest.fixture
def own_app(postgres_url: str) -> tuple[str, str]:
    """(URL, application_name): a store on the test's schema whose backends only it has."""
    name = f"factory_faults_{uuid.uuid4().hex[:10]}"
    return f"{postgres_url}&application_name={name}", name


def terminate(admin: psycopg.Connection[Any], application_name: str) -> int:
    row = admin.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
        (application_name,),
    ).fetchone()
    return int(row[0]) if row else 0


def test_terminated_backends_mid_run(
    own_app: tuple[str, str], ray_cluster: str, factory_home: Path, tmp_path: Path
) -> None:
    """The store's connections are terminated five times while a run goes on: the run succeeds
    and every step ran exactly once (no step's committed work was done again)."""
    url, app = own_app
    store = PostgresStore(url, retry_seconds=30)
    admin = psycopg.connect(POSTGRES_URL, autocommit=True)
    log = tmp_path / "executions.txt"
    run_ids: list[str] = []
    settings = Settings(home=factory_home)
    thread, outcome = run_in_thread(
        lambda: factory.run(chain(log, 16, 0.3), store=store, settings=settings, on_start=run_ids.append)
    )
    try:
        recoveries: list[float] = []
        wait_until(lambda: bool(run_ids), 60)
        for _ in range(5):
            before = committed_steps(store, run_ids[0])
            time.sleep(0.4)
            if outcome:
                break
            assert terminate(admin, app) >= 1
            fault = time.monotonic()
            store.get_run(run_ids[0])  # through the same pool: a checked, new connection
            recoveries.append(time.monotonic() - fault)
            wait_until(lambda b=before: bool(outcome) or committed_steps(store, run_ids[0]) > b, 30)  # type: ignore[misc]
        assert len(recoveries) >= 3, "the run ended before the faults"
        thread.join(120)
        assert outcome, "the run did not end"
        result = outcome[0]
        assert isinstance(result, RunResult), result
        assert result.ok, result.error
        assert executions(log) == list(range(16))  # each step once
        events = store.events(0, result.run_id)
        assert len({e.id for e in events}) == len(events)
        assert [e.type for e in events].count("step.succeeded") == 16  # no event written twice
        print(
            f"{len(recoveries)} faults; the store answered again {max(recoveries) * 1000:.0f} ms (worst) "
            "after its backends were terminated"
        )
    finally:
        thread.join(60)
        admin.close()
        store.close()


class DroppingStore(PostgresStore):
    """Terminates its own backend in a record's transaction, before it writes (its transaction
    has begun and has its id), ``drops`` times."""

    drops = 0
    admin: psycopg.Connection[Any]

    def _apply_record(self, cur: Cursor, rows: RecordRows, owner: str | None) -> None:
        if self.drops:
            self.drops -= 1
            pid = cur.connection.info.backend_pid  # type: ignore[attr-defined]
            self.admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            time.sleep(0.1)
        super()._apply_record(cur, rows, owner)


def test_a_transaction_cut_off_mid_way_is_run_again_once(postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    store = DroppingStore(postgres_url, retry_seconds=10)
    store.admin = psycopg.connect(POSTGRES_URL, autocommit=True)
    try:
        store.create_run("r1", "wf", "{}", {}, ["a"])
        store.drops = 2
        with caplog.at_level(logging.WARNING, logger="factory.store.postgres"):
            store.record([StepChange("r1", "a", StepStatus.RUNNING, "step.started", attempts=1)])
        assert store.drops == 0 and "retrying" in caplog.text
        assert [e.type for e in store.events(0, "r1")] == ["run.created", "step.created", "step.started"]
    finally:
        store.admin.close()
        store.close()


def test_a_lost_commit_acknowledgement_is_not_applied_twice(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """COMMIT succeeded but its answer never came: the store asks the server (pg_xact_status),
    finds the transaction committed, and does not run it again (that would add its events twice)."""
    store = PostgresStore(postgres_url, retry_seconds=10)
    store.create_run("r1", "wf", "{}", {}, ["a"])
    real_exit = psycopg.Transaction.__exit__
    lose: list[bool] = []

    def exit_then_lose_the_answer(self: psycopg.Transaction, *exc: Any) -> Any:
        result = real_exit(self, *exc)
        if lose and exc[0] is None:
            lose.pop()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return result

    monkeypatch.setattr(psycopg.Transaction, "__exit__", exit_then_lose_the_answer)
    try:
        lose.append(True)
        with caplog.at_level(logging.WARNING, logger="factory.store.postgres"):
            store.record([RunChange("r1", RunStatus.RUNNING, "run.started")])
        assert "it did commit" in caplog.text and not lose
        assert [e.type for e in store.events(0, "r1")] == ["run.created", "step.created", "run.started"]
        lose.append(True)
        assert store.claim_run("r1", "me", 10) is True  # the call's own answer is kept
        assert store.get_run("r1").owner == "me"

        def unknown(xid: str, backend_pid: int) -> None:
            return None

        monkeypatch.setattr(store, "_commit_outcome", unknown)
        lose.append(True)
        with pytest.raises(StoreUnavailableError, match="could not be established") as caught:
            store.record([RunChange("r1", RunStatus.SUCCEEDED, "run.succeeded")])
        assert not caught.value.retryable  # never run again blindly
    finally:
        monkeypatch.undo()
        store.close()


# -- a server restart, on a private PostgreSQL ---------------------------------------------------


def test_a_server_restart_mid_run(
    private_postgres: PrivatePostgres, ray_cluster: str, factory_home: Path, tmp_path: Path
) -> None:
    """PostgreSQL stops (fast shutdown: connections cut) for two seconds, then starts again,
    while a run goes on: the run finishes, each step ran once."""
    store = PostgresStore(private_postgres.url, retry_seconds=60)
    log = tmp_path / "executions.txt"
    run_ids: list[str] = []
    settings = Settings(home=factory_home)
    thread, outcome = run_in_thread(
        lambda: factory.run(chain(log, 10, 0.3), store=store, settings=settings, on_start=run_ids.append)
    )
    try:
        wait_until(lambda: committed_steps(store, run_ids[0] if run_ids else None) >= 2, 60)
        fault = time.time()
        private_postgres.stop("fast")
        time.sleep(2.0)
        private_postgres.start()
        back = time.time()
        thread.join(120)
        assert outcome, "the run did not end"
        result = outcome[0]
        assert isinstance(result, RunResult), result
        assert result.ok, result.error
        assert executions(log) == list(range(10))
        events = store.events(0, result.run_id)
        moving = min(e.ts for e in events if e.ts > back)
        print(
            f"server down at {0:.2f}s, up at {back - fault:.2f}s; "
            f"the run's next event {moving - fault:.2f}s after the fault ({moving - back:.2f}s after the server was up)"
        )
        assert moving - back < 10
    finally:
        thread.join(60)
        store.close()
