"""Runs submitted over HTTP to `factory up` reach their end through a PostgreSQL restart and
through `factory up` itself being stopped and started again: no run is left `running`, no
committed step runs twice. Prints the time from each fault to the run moving again
(docs/reliability.md quotes it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from factory.client import FactoryClient
from tests.fixtures.ports import free_port
from tests.fixtures.private_postgres import PrivatePostgres
from tests.fixtures.up_process import REPO, start_up

pytestmark = pytest.mark.e2e

STEPS = 12


GATE = 8  # the step that waits for the test's gate file (in flight when factory up stops)


def chain(log: Path, gate: Path) -> dict[str, Any]:
    """STEPS steps one after the other; each appends its number to ``log`` when it runs, and
    step GATE then waits until ``gate`` exists."""
    steps: list[dict[str, Any]] = []
    for i in range(STEPS):
        steps.append(
            {
                "id": f"s{i}",
                "python": "tests.fixtures.teststeps:slow_record",
                "needs": [f"s{i - 1}" if i != GATE + 1 else "gate"] if i else [],
                "with": {"path": str(log), "value": i, "seconds": 0.4},
            }
        )
        if i == GATE:
            steps.append(
                {
                    "id": "gate",
                    "python": "tests.fixtures.teststeps:wait_for_file",
                    "needs": [f"s{i}"],
                    "with": {"path": str(gate), "seconds": 300},
                }
            )
    return {"name": "through-faults", "steps": steps}


def committed(client: FactoryClient, run_id: str) -> set[str]:
    return {s["step_id"] for s in client.get_run(run_id)["steps"] if s["status"] == "succeeded"}


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - the API is restarting: ask again
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def first_event_after(client: FactoryClient, run_id: str, when: float, kinds: tuple[str, ...]) -> float:
    return min(e["ts"] for e in client.events(run_id, 0, follow=False) if e["ts"] > when and e["type"] in kinds)


def test_runs_survive_a_postgres_restart_and_a_restart_of_factory_up(
    private_postgres: PrivatePostgres, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "FACTORY_HOME": str(tmp_path / "home"),
        "FACTORY_STORE_URL": private_postgres.url,
        "FACTORY_ALLOWED_MODULES": "tests.fixtures.teststeps",
        "FACTORY_LEASE_SECONDS": "3",
        "FACTORY_SUPERVISOR_INTERVAL_SECONDS": "1",
        "FACTORY_POSTGRES_RETRY_SECONDS": "60",
    }
    env.pop("RAY_ADDRESS", None)  # its own local Ray, which stops with it
    log = tmp_path / "executions.txt"
    first, output = start_up(env, free_port())
    second = None
    try:
        key = output.split("admin key  ")[1].split()[0]
        base = output.split("API        ")[1].split("/v1/")[0]
        client = FactoryClient(base, key, timeout=60)
        gate = tmp_path / "gate"
        run_id = client.submit(chain(log, gate))

        # fault 1: PostgreSQL stops (fast: connections cut) for 2 s while the run goes on
        wait_for(lambda: len(committed(client, run_id)) >= 3, 120, "3 committed steps")
        down = time.time()
        private_postgres.stop("fast")
        time.sleep(2.0)
        private_postgres.start()
        back = time.time()
        wait_for(lambda: len(committed(client, run_id)) >= 6, 120, "the run to go on after PostgreSQL came back")
        moved = first_event_after(client, run_id, back, ("step.succeeded", "step.started"))
        print(f"PostgreSQL down {back - down:.1f}s; the run's next step event {moved - back:.2f}s after it was back")

        # fault 2: factory up stopped (Ctrl-C: Serve and its Ray go, the runner with them) and started again
        wait_for(lambda: f"s{GATE}" in committed(client, run_id), 120, "the run to reach its gate")
        done_before_stop = committed(client, run_id)
        first.send_signal(signal.SIGINT)
        assert first.wait(120) == 0
        stopped = time.time()
        assert client.http.base_url  # the old API is gone; a new one comes up on another port
        second, output = start_up(env, free_port())
        ready = time.time()
        base = output.split("API        ")[1].split("/v1/")[0]
        client = FactoryClient(base, key, timeout=60)
        gate.touch()
        run = client.wait(run_id, timeout=180)
        assert run["status"] == "succeeded", run
        adopted = first_event_after(client, run_id, stopped, ("run.adopted",))
        print(
            f"factory up stopped, started again in {ready - stopped:.1f}s; the supervisor adopted the run "
            f"{adopted - ready:.2f}s after the new API was up"
        )
        assert adopted - ready < 30

        runs = Counter(int(line) for line in log.read_text().split())
        assert sorted(runs) == list(range(STEPS)), runs  # every step ran
        twice = {f"s{value}" for value, n in runs.items() if n > 1}
        assert not twice & done_before_stop, f"committed steps ran again: {twice & done_before_stop}"
        assert len(twice) <= 1, f"more than the step in flight at the PostgreSQL restart ran twice: {twice}"
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(
            [sys.executable, "-m", "factory.cli", "down"], env=env, cwd=REPO, capture_output=True, timeout=120
        )
