"""What only the PostgreSQL store promises: concurrent migrations, LISTEN/NOTIFY tailing,
and one coordinator per run when two processes race for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg

import factory
from factory.events import tail
from factory.spec import Step, Workflow
from factory.store import Event
from factory.store.postgres import MIGRATIONS, PostgresStore, migrate

FIXTURES = str(Path(__file__).parent.parent / "fixtures")
REPO = Path(__file__).parent.parent.parent


def test_migrations_are_safe_twice_and_concurrently(postgres_url: str) -> None:
    def run_migrations(_: int) -> list[int]:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            return migrate(conn)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run_migrations, range(4)))
    latest = [version for version, _ in MIGRATIONS]
    assert sorted(v for applied in results for v in applied) == latest  # each applied exactly once
    assert run_migrations(0) == []
    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert [r[0] for r in rows] == latest


def test_listen_notify_wakes_a_tailer_without_polling(postgres_url: str) -> None:
    writer = PostgresStore(postgres_url)
    reader = PostgresStore(postgres_url)
    writer.create_run("r1", "wf", "{}", {}, ["a"])
    seen: list[tuple[Event, float]] = []

    def follow() -> None:
        # poll_seconds is long: only a notification can deliver the event quickly
        for event in tail(reader, writer.last_event_id(), "r1", follow=True, poll_seconds=30):
            seen.append((event, time.monotonic()))
            if event.type == "run.succeeded":
                return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    time.sleep(0.5)
    from factory.store import RunChange, RunStatus

    sent = time.monotonic()
    writer.record([RunChange("r1", RunStatus.SUCCEEDED, "run.succeeded")])
    thread.join(20)
    assert [e.type for e, _ in seen] == ["run.succeeded"]
    assert seen[0][1] - sent < 10  # far below the 30 s poll interval
    writer.close()
    reader.close()


def test_two_processes_racing_for_one_run(postgres_url: str, ray_cluster: str, tmp_path: Path) -> None:
    """Two `factory resume` processes start on the same pending run at the same moment:
    one runs it, the other is refused, and no step runs twice."""
    log = tmp_path / "executions.txt"
    steps = [
        Step(
            id=f"s{i}",
            python="teststeps:slow_record",
            needs=[f"s{i - 1}"] if i else [],
            with_={"path": str(log), "value": i, "seconds": 0.3},
        )
        for i in range(5)
    ]
    store = PostgresStore(postgres_url)
    run_id = factory.api.create_run(Workflow(name="race", steps=steps, base_dir=FIXTURES), store=store)
    env = {**os.environ, "FACTORY_STORE_URL": postgres_url, "RAY_ADDRESS": ray_cluster}
    command = [sys.executable, "-m", "factory.cli", "resume", run_id, "--json"]
    procs = [
        subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(120), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    winners = [out for code, out, _ in results if code == 0]
    losers = [err for code, _, err in results if code != 0]
    assert codes == [0, 2], results
    assert json.loads(winners[0])["status"] == "succeeded"
    assert "being run by a live process" in losers[0] or "already succeeded" in losers[0]
    executions = [int(x) for x in log.read_text().split()]
    assert sorted(executions) == [0, 1, 2, 3, 4]  # every step exactly once
    assert store.get_run(run_id).status.value == "succeeded"
    store.close()
