"""The `factory` command as a user runs it: real subprocesses on the session's Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from factory.store.sqlite import SQLiteStore

REPO = Path(__file__).parent.parent.parent
FIXTURES = Path(__file__).parent.parent / "fixtures"
FACTORY = [sys.executable, "-m", "factory.cli"]


def factory(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FACTORY, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_help_explains_the_commands() -> None:
    result = subprocess.run([*FACTORY, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("validate", "run", "resume", "runs", "status", "logs", "cancel", "events"):
        assert command in result.stdout


def test_run_json_then_inspect_the_run(cli_env: dict[str, str], tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    result = factory(cli_env, "run", "examples/doc_report/workflow.yaml", "--input", f"out={report}", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"run_id", "status", "outputs", "error"}
    assert data["status"] == "succeeded" and data["error"] is None
    assert data["outputs"]["report"]["path"] == str(report) and report.exists()
    run_id = data["run_id"]

    runs = factory(cli_env, "runs", "--json")
    assert [r["id"] for r in json.loads(runs.stdout)] == [run_id]
    status = factory(cli_env, "status", run_id)
    assert status.returncode == 0
    assert "summarize" in status.stdout and "succeeded" in status.stdout
    events = factory(cli_env, "events", run_id)
    types = [json.loads(line)["type"] for line in events.stdout.splitlines()]
    assert types[0] == "run.created" and types[-1] == "run.succeeded"
    missing = factory(cli_env, "status", "nosuchrun")
    assert missing.returncode == 2 and "no run 'nosuchrun'" in missing.stderr


def test_input_values_are_yaml_scalars(cli_env: dict[str, str], tmp_path: Path) -> None:
    wf = tmp_path / "wf.yaml"
    wf.write_text(
        yaml.safe_dump(
            {
                "name": "typed",
                "inputs": {"n": 1, "flag": False},
                "steps": [
                    {"id": "sum", "python": "teststeps:add", "with": {"a": "${inputs.n}", "b": 1}},
                    {"id": "flag", "python": "teststeps:echo", "with": {"value": "${inputs.flag}"}},
                ],
            }
        )
    )
    (tmp_path / "teststeps.py").write_text((FIXTURES / "teststeps.py").read_text())
    result = factory(cli_env, "run", str(wf), "--input", "n=6", "-i", "flag=true", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outputs"] == {"sum": 7, "flag": True}
    bad = factory(cli_env, "run", str(wf), "--input", "nope=1")
    assert bad.returncode == 2 and "unknown input 'nope'" in bad.stderr


def test_failed_run_exits_1_with_the_error_and_logs(cli_env: dict[str, str], tmp_path: Path) -> None:
    wf = tmp_path / "wf.yaml"
    wf.write_text(
        yaml.safe_dump(
            {
                "name": "fails",
                "steps": [{"id": "boom", "python": "teststeps:always_fails", "with": {"message": "disk on fire"}}],
            }
        )
    )
    (tmp_path / "teststeps.py").write_text((FIXTURES / "teststeps.py").read_text())
    result = factory(cli_env, "run", str(wf), "--json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["status"] == "failed" and "ValueError: disk on fire" in data["error"]
    logs = factory(cli_env, "logs", data["run_id"], "boom")
    assert "Traceback" in logs.stdout and "disk on fire" in logs.stdout


def test_invalid_workflow_exits_2(cli_env: dict[str, str], tmp_path: Path) -> None:
    wf = tmp_path / "wf.yaml"
    wf.write_text("name: x\nsteps: [{id: a, python: 'm:f', with: {v: '${steps.a.output}'}}]\n")
    result = factory(cli_env, "run", str(wf))
    assert result.returncode == 2
    assert "references its own output" in result.stderr


def _wait_for(predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def test_sigkill_mid_run_then_resume(cli_env: dict[str, str], tmp_path: Path, factory_home: Path) -> None:
    """Kill `factory run` with SIGKILL after some steps committed; `factory resume` finishes the
    run and steps that had committed their output do not run again."""
    log = tmp_path / "executions.txt"
    steps = [{"id": "s0", "python": "teststeps:slow_record", "with": {"path": str(log), "value": 0, "seconds": 0.4}}]
    for i in range(1, 8):
        steps.append(
            {
                "id": f"s{i}",
                "python": "teststeps:slow_record",
                "needs": [f"s{i - 1}"],
                "with": {"path": str(log), "value": i, "seconds": 0.4},
            }
        )
    steps.append({"id": "plus", "python": "teststeps:add", "with": {"a": "${steps.s7.output}", "b": 1}})
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump({"name": "killable", "steps": steps}))
    (tmp_path / "teststeps.py").write_text((FIXTURES / "teststeps.py").read_text())
    env = {**cli_env, "FACTORY_LEASE_SECONDS": "2"}

    proc = subprocess.Popen(
        [*FACTORY, "run", str(wf)], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    store = SQLiteStore(factory_home / "factory.db")
    try:

        def committed() -> set[str]:
            runs = store.list_runs()
            if not runs:
                return set()
            return {s.step_id for s in store.get_steps(runs[0].id) if s.status.value == "succeeded"}

        _wait_for(lambda: len(committed()) >= 3, 90)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        run = store.list_runs()[0]
        done_before = committed()
        assert run.status.value == "running"  # nobody got to record anything else
        assert 3 <= len(done_before) < 9

        time.sleep(2.5)  # let the dead coordinator's lease expire
        resumed = factory(env, "resume", run.id, "--json")
        assert resumed.returncode == 0, resumed.stderr
        data = json.loads(resumed.stdout)
        assert data["status"] == "succeeded" and data["outputs"]["plus"] == 8
        executions = [int(line) for line in log.read_text().split()]
        # steps that had committed ran exactly once (s_k writes k)
        for step_id in done_before:
            assert executions.count(int(step_id[1:])) == 1, (step_id, executions)
        assert sorted(set(executions)) == list(range(8))  # and every step ran
    finally:
        if proc.poll() is None:
            proc.kill()
        store.close()


def test_sigkill_after_a_once_then_resume_does_not_repeat_it(
    cli_env: dict[str, str], tmp_path: Path, factory_home: Path
) -> None:
    """A step did its side effect through step_context().once(), then `factory run` was
    SIGKILLed: `factory resume` runs the step again, and the side effect is not repeated."""
    counter = tmp_path / "charges"
    steps = [{"id": "charge", "python": "teststeps:once_then_sleep", "with": {"counter": str(counter), "seconds": 60}}]
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump({"name": "once-killed", "steps": steps}))
    (tmp_path / "teststeps.py").write_text((FIXTURES / "teststeps.py").read_text())
    proc = subprocess.Popen(
        [*FACTORY, "run", str(wf)], env=cli_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _wait_for(lambda: Path(f"{counter}.attempts").exists(), 90)  # once() recorded, now it sleeps
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        store = SQLiteStore(factory_home / "factory.db")
        run = store.list_runs()[0]
        store.close()
        resumed = factory(cli_env, "resume", run.id, "--json")
        assert resumed.returncode == 0, resumed.stderr
        data = json.loads(resumed.stdout)
        assert data["outputs"]["charge"] == {"charged": 1, "attempt": 2}
        assert len(counter.read_text()) == 1  # the side effect ran once
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigkill_mid_fan_out_then_resume_runs_only_the_items_not_committed(
    cli_env: dict[str, str], tmp_path: Path, factory_home: Path
) -> None:
    """for_each items are committed one by one: after a SIGKILL in the middle of a fan-out,
    `factory resume` runs only the items whose output was not committed, and no committed
    item runs twice."""
    log = tmp_path / "items.txt"
    n = 40
    steps = [
        {
            "id": "fan",
            "python": "teststeps:slow_record",
            "for_each": list(range(n)),
            "with": {"path": str(log), "value": "${item}", "seconds": 0.25},
        },
        {"id": "count", "python": "teststeps:echo", "with": {"value": "${steps.fan.output}"}},
    ]
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump({"name": "fan-killable", "steps": steps}))
    (tmp_path / "teststeps.py").write_text((FIXTURES / "teststeps.py").read_text())
    env = {**cli_env, "FACTORY_LEASE_SECONDS": "2"}
    proc = subprocess.Popen(
        [*FACTORY, "run", str(wf)], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    store = SQLiteStore(factory_home / "factory.db")
    try:

        def committed() -> set[int]:
            runs = store.list_runs()
            return {item.index for item in store.get_items(runs[0].id, "fan")} if runs else set()

        _wait_for(lambda: len(committed()) >= 10, 120)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        run = store.list_runs()[0]
        done_before = committed()
        assert 10 <= len(done_before) < n
        status = factory(env, "status", run.id, "--json")
        fan = next(s for s in json.loads(status.stdout)["steps"] if s["step_id"] == "fan")
        assert fan["items_done"] == len(done_before) and fan["items_total"] == n

        resumed = factory(env, "resume", run.id, "--json")
        assert resumed.returncode == 0, resumed.stderr
        data = json.loads(resumed.stdout)
        assert data["status"] == "succeeded" and data["outputs"]["count"] == list(range(n))
        executions = [int(line) for line in log.read_text().split()]
        twice = sorted(i for i in done_before if executions.count(i) != 1)
        assert twice == [], f"committed items that ran again: {twice}"
        assert sorted(set(executions)) == list(range(n))  # and every item ran
        redone = len(executions) - n
        print(f"killed after {len(done_before)}/{n} items committed; items run twice: {redone} (none committed)")
        assert redone <= n - len(done_before)
    finally:
        if proc.poll() is None:
            proc.kill()
        store.close()


def test_sigkill_then_resume_at_once_without_waiting_for_the_lease(
    cli_env: dict[str, str], tmp_path: Path, factory_home: Path
) -> None:
    """The killed coordinator ran on this machine: `factory resume` sees that its process is gone
    (owner id: boot id, pid, process start time) and takes the run over while the lease is still
    fresh, instead of refusing until it lapses."""
    log = tmp_path / "executions.txt"
    steps = [
        {
            "id": f"s{i}",
            "python": "teststeps:slow_record",
            **({"needs": [f"s{i - 1}"]} if i else {}),
            "with": {"path": str(log), "value": i, "seconds": 0.4},
        }
        for i in range(6)
    ]
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump({"name": "killable", "steps": steps}))
    (tmp_path / "teststeps.py").write_text((FIXTURES / "teststeps.py").read_text())
    lease = 60.0  # far longer than the whole test: only the dead-owner check can let resume in
    env = {**cli_env, "FACTORY_LEASE_SECONDS": str(lease)}
    command = [*FACTORY, "run", str(wf)]
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = SQLiteStore(factory_home / "factory.db")
    try:

        def committed() -> set[str]:
            runs = store.list_runs()
            if not runs:
                return set()
            return {s.step_id for s in store.get_steps(runs[0].id) if s.status.value == "succeeded"}

        _wait_for(lambda: len(committed()) >= 2, 90)
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.time()
        proc.wait(30)
        run = store.list_runs()[0]
        done_before = committed()
        assert run.status.value == "running" and run.owner and str(proc.pid) in run.owner
        assert (run.heartbeat_at or 0) > time.time() - lease  # the dead coordinator's lease is still fresh

        resumed = factory(env, "resume", run.id, "--json")
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads(resumed.stdout)["status"] == "succeeded"
        took_over = next(e for e in store.events(0, run.id) if e.type == "run.resumed").ts - killed_at
        print(f"resume took the run over {took_over:.2f}s after the SIGKILL (lease {lease:g}s)")
        assert took_over < 20  # process start-up and joining Ray; nowhere near the lease
        executions = [int(line) for line in log.read_text().split()]
        for step_id in done_before:
            assert executions.count(int(step_id[1:])) == 1, (step_id, executions)
        assert sorted(set(executions)) == list(range(6))
    finally:
        if proc.poll() is None:
            proc.kill()
        store.close()


def test_sigkill_mid_loop_then_resume_goes_on_at_the_round_it_was_in(
    cli_env: dict[str, str], tmp_path: Path, factory_home: Path
) -> None:
    """`factory run` of an evaluator-optimizer loop (factory.patterns) SIGKILLed while round 3 waits for
    its writer: `factory resume` reads rounds 1 and 2 back and asks round 3 again, nothing before it."""
    from factory.pools import DEFAULT_MANAGER_NAME, stop_manager

    writes, rates = tmp_path / "writes", tmp_path / "rates"
    (tmp_path / "pattern_agents.py").write_text((FIXTURES / "pattern_agents.py").read_text())
    pool = {"num_cpus": 0.1, "max_replicas": 1, "max_concurrency": 4}  # the lost call may still sleep there
    agents = {
        "agents": [
            {
                "name": "e2e-writer",
                "class": "pattern_agents:NumberedWriter",
                "pool": pool,
                "config": {"log": str(writes), "slow_from": 3, "sleep": 30},  # the first time only
            },
            {
                "name": "e2e-critic",
                "class": "pattern_agents:DraftCritic",
                "pool": pool,
                "config": {"log": str(rates), "accept": 3},
            },
        ]
    }
    (tmp_path / "agents.yaml").write_text(yaml.safe_dump(agents))
    step = {
        "id": "refine",
        "python": "factory.patterns:evaluator_optimizer",
        "with": {"generator": "e2e-writer", "evaluator": "e2e-critic", "task": "Write.", "max_rounds": 5},
    }
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump({"name": "loop-killed", "steps": [step]}))
    env = {**cli_env, "FACTORY_LEASE_SECONDS": "2"}
    args = [str(wf), "--agents", str(tmp_path / "agents.yaml")]
    proc = subprocess.Popen([*FACTORY, "run", *args], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: writes.exists() and len(writes.read_text().split()) >= 3, 120)  # round 3 is asked
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert len(rates.read_text().split()) == 2
        store = SQLiteStore(factory_home / "factory.db")
        run = store.list_runs()[0]
        store.close()
        time.sleep(2.5)  # let the dead coordinator's lease expire
        resumed = factory(env, "resume", run.id, "--json", "--agents", str(tmp_path / "agents.yaml"))
        assert resumed.returncode == 0, resumed.stderr
        out = json.loads(resumed.stdout)["outputs"]["refine"]
        assert out["accepted"] is True and out["rounds"] == 3 and out["text"] == "draft 3"
        # rounds 1 and 2 asked once each; round 3's writer twice (its first answer was lost with the run)
        assert len(writes.read_text().split()) == 4 and len(rates.read_text().split()) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_manager(DEFAULT_MANAGER_NAME, drain_timeout=0)
