"""Approval gates through the `factory` command: the run parks and the process exits (exit 4),
`factory approve` finishes it; a coordinator SIGKILLed while its gate waits loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

from factory.store.sqlite import SQLiteStore
from tests.e2e.test_cli import FACTORY, FIXTURES, REPO, factory


def _write(tmp_path: Path, extra: list[dict[str, object]]) -> Path:
    steps: list[dict[str, object]] = [
        {"id": "plan", "python": "teststeps:add", "with": {"a": 40, "b": 2}},
        {"id": "gate", "approval": {"message": "Deploy build ${steps.plan.output}?"}},
        {"id": "deploy", "python": "teststeps:echo", "with": {"value": "${steps.gate.output.approved}"}},
        *extra,
    ]
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump({"name": "gated", "steps": steps}))
    (tmp_path / "teststeps.py").write_text((FIXTURES / "teststeps.py").read_text())
    return wf


def test_run_parks_then_approve_finishes_it(cli_env: dict[str, str], tmp_path: Path) -> None:
    wf = _write(tmp_path, [])
    parked = factory(cli_env, "run", str(wf), "--json")
    assert parked.returncode == 4, parked.stderr  # waiting: the process is gone, nothing is held
    data = json.loads(parked.stdout)
    assert data["status"] == "waiting" and data["outputs"] == {"plan": 42}
    status = factory(cli_env, "status", data["run_id"])
    assert "waiting" in status.stdout
    no = factory(cli_env, "approve", data["run_id"], "plan")
    assert no.returncode == 2 and "is not an approval gate" in no.stderr
    approved = factory(cli_env, "approve", data["run_id"], "gate", "--comment", "looks good", "--json")
    assert approved.returncode == 0, approved.stderr
    answer = json.loads(approved.stdout)
    assert answer["decision"]["by"] == "local" and answer["decision"]["comment"] == "looks good"
    assert answer["result"]["status"] == "succeeded" and answer["result"]["outputs"]["deploy"] is True


def test_sigkill_while_a_gate_waits_then_approve_finishes_the_run(
    cli_env: dict[str, str], tmp_path: Path, factory_home: Path
) -> None:
    """The coordinator still runs (a slow branch beside the gate) when it is SIGKILLed; the
    approval is recorded, `factory approve` takes the dead coordinator's run over and finishes
    it; the steps that had committed do not run again."""
    log = tmp_path / "runs.txt"
    slow = {"id": "slow", "python": "teststeps:slow_record", "with": {"path": str(log), "value": 1, "seconds": 15}}
    once = {"id": "once", "python": "teststeps:slow_record", "with": {"path": str(log), "value": 7, "seconds": 0}}
    wf = _write(tmp_path, [slow, once])
    proc = subprocess.Popen(
        [*FACTORY, "run", str(wf)], env=cli_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    store = SQLiteStore(factory_home / "factory.db")
    try:
        deadline = time.monotonic() + 120
        run_id = None
        while time.monotonic() < deadline and run_id is None:
            runs = store.list_runs()
            steps = {s.step_id: s.status.value for s in store.get_steps(runs[0].id)} if runs else {}
            if steps.get("gate") == "waiting" and steps.get("once") == "succeeded":
                run_id = runs[0].id
            time.sleep(0.1)
        assert run_id is not None, "the gate did not open"
        assert store.get_run(run_id).status.value == "running"  # not parked: "slow" is running
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        approved = factory(cli_env, "approve", run_id, "gate", "--json", timeout=240)
        assert approved.returncode == 0, approved.stderr
        result = json.loads(approved.stdout)["result"]
        assert result["status"] == "succeeded" and result["outputs"]["deploy"] is True
        assert [line for line in log.read_text().split() if line == "7"] == ["7"]  # committed: ran once
        events = [e.type for e in store.events(0, run_id, limit=10_000)]
        assert events.count("step.approved") == 1 and events[-1] == "run.succeeded"
    finally:
        if proc.poll() is None:
            proc.kill()
        store.close()


def test_budget_option(cli_env: dict[str, str], tmp_path: Path) -> None:
    wf = tmp_path / "two.yaml"
    steps = [
        {"id": "one", "python": "teststeps:add", "with": {"a": 1, "b": 1}},
        {"id": "two", "python": "teststeps:add", "with": {"a": "${steps.one.output}", "b": 1}},
    ]
    wf.write_text(yaml.safe_dump({"name": "two", "steps": steps}))
    (tmp_path / "teststeps.py").write_text((FIXTURES / "teststeps.py").read_text())
    bad = factory(cli_env, "run", str(wf), "--budget", "max_wishes=3")
    assert bad.returncode == 2 and "NAME one of max_seconds, max_steps" in bad.stderr
    negative = factory(cli_env, "run", str(wf), "--budget", "attempts=0")
    assert negative.returncode == 2 and "--budget max_attempts" in negative.stderr
    stopped = factory(cli_env, "run", str(wf), "--budget", "steps=1", "--json")
    assert stopped.returncode == 1, stopped.stderr
    data = json.loads(stopped.stdout)
    assert data["status"] == "failed" and "budget reached: max_steps is 1" in data["error"]
    assert f"factory resume {data['run_id']} --budget max_steps=N" in data["error"]
    status = json.loads(factory(cli_env, "status", data["run_id"], "--json").stdout)
    assert {s["step_id"]: s["status"] for s in status["steps"]} == {"one": "succeeded", "two": "cancelled"}
    assert {s["step_id"]: s["attempts"] for s in status["steps"]}["two"] == 0  # never started
