"""One scripted CLI session, run on this machine's state and again with ``--api`` against a
real API server: every command must answer the same (run ids, key ids, times and durations
aside). This is what "one CLI, two backends" promises."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import FIXTURES, ApiServer

pytestmark = pytest.mark.e2e

REPO = Path(__file__).parent.parent.parent
FACTORY = [sys.executable, "-m", "factory.cli"]
TIMES = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|\d+\.\d+s\b|\b\d+\.\d{3}\b")
HEX_ID = re.compile(r"\b[0-9a-f]{12}\b")
HTTP_STATUS = re.compile(r"HTTP \d{3}: ")


@dataclass
class Way:
    """How to call the CLI one way: its environment and the options before the command."""

    name: str
    env: dict[str, str]
    prefix: list[str]
    work: Path

    def __call__(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*FACTORY, *self.prefix, *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )


def _workflows(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    docs: dict[str, dict[str, Any]] = {
        "ok": {
            "name": "both-ways",
            "inputs": {"n": 1},
            "steps": [
                {"id": "sum", "python": "tests.fixtures.teststeps:add", "with": {"a": "${inputs.n}", "b": 10}},
                {"id": "talk", "python": "tests.fixtures.teststeps:chatty", "with": {"x": "${steps.sum.output}"}},
            ],
        },
        "flaky": {
            "name": "flaky-once",
            "inputs": {"counter": ""},
            "steps": [
                {
                    "id": "first",
                    "python": "tests.fixtures.teststeps:flaky",
                    "with": {"counter": "${inputs.counter}", "fail_times": 1, "error": "ValueError"},
                    "retry": {"max_attempts": 1},
                },
                {"id": "after", "python": "tests.fixtures.teststeps:echo", "with": {"value": "${steps.first.output}"}},
            ],
        },
        "slow": {
            "name": "slow",
            "steps": [{"id": "nap", "python": "tests.fixtures.teststeps:sleepy", "with": {"seconds": 20}}],
        },
        "bad": {
            "name": "broken",
            "steps": [
                # (arguments complete: the API never imports a step module, so it cannot check them)
                {"id": "a", "python": "tests.fixtures.teststeps:add", "with": {"a": "${steps.nowhere.output}", "b": 1}},
                {"id": "a", "python": "tests.fixtures.teststeps:echo", "with": {"value": 1}},
            ],
        },
    }
    paths = {}
    for name, doc in docs.items():
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(doc, sort_keys=False))
    return paths


def _plain(text: str, run_ids: list[str]) -> str:
    text = HTTP_STATUS.sub("", text)  # an error over the API also names its HTTP status
    for n, run_id in enumerate(run_ids):
        text = text.replace(run_id, f"<run{n}>")
    text = TIMES.sub("<t>", text)
    return HEX_ID.sub("<id>", text)


def _session(way: Way) -> dict[str, Any]:
    """The scripted session; returns what each step printed, made comparable."""
    wf = _workflows(way.work / "wf")
    seen: dict[str, Any] = {}

    valid = way("validate", str(wf["ok"]))
    seen["validate"] = (valid.returncode, valid.stdout)
    invalid = way("validate", str(wf["bad"]))
    seen["validate bad"] = (invalid.returncode, sorted(line for line in invalid.stderr.splitlines() if "  - " in line))

    ran = way("run", str(wf["ok"]), "--input", "n=5", "--json")
    assert ran.returncode == 0, f"{way.name}: {ran.stderr}"
    result = json.loads(ran.stdout)
    run_id = result.pop("run_id")
    seen["run"] = result
    ids = [run_id]

    status = way("status", run_id, "--json")
    data = json.loads(status.stdout)
    for field in ("id", "created_at", "started_at", "finished_at"):
        assert data.pop(field)
    for step in data["steps"]:
        assert step.pop("started_at") and step.pop("finished_at")
    assert data["spent"].pop("seconds") >= 0  # each run's own running time
    seen["status"] = data
    seen["status table"] = _plain(way("status", run_id).stdout, ids)

    logs = way("logs", run_id)
    seen["logs"] = (logs.returncode, _plain(logs.stdout, ids))
    seen["logs one step"] = _plain(way("logs", run_id, "talk").stdout, ids)

    events = way("events", run_id)
    seen["events"] = [(e["type"], e["step_id"]) for e in map(json.loads, events.stdout.splitlines())]

    listed = json.loads(way("runs", "--limit", "1", "--json").stdout)
    seen["runs"] = [(r["id"] == run_id, r["workflow_name"], r["status"], r["stalled"]) for r in listed]

    cancel = way("cancel", run_id)
    seen["cancel finished"] = (cancel.returncode, _plain(cancel.stdout, ids))

    counter = way.work / "flaky.counter"
    failed = way("run", str(wf["flaky"]), "--input", f"counter={counter}", "--json")
    failed_result = json.loads(failed.stdout)
    ids.append(failed_result["run_id"])
    seen["run failing"] = (failed.returncode, failed_result["status"], failed_result["outputs"])
    resumed = way("resume", failed_result["run_id"], "--json")
    seen["resume"] = (resumed.returncode, _plain(resumed.stdout, ids))

    timed_out = way("run", str(wf["slow"]), "--timeout", "2")
    seen["timeout"] = timed_out.returncode
    slow_id = json.loads(way("runs", "--limit", "1", "--json").stdout)[0]["id"]
    if way.name != "local":  # the server runs it on after the client's --timeout: cancel it first
        way("cancel", slow_id)
        deadline = time.monotonic() + 60
        while json.loads(way("status", slow_id, "--json").stdout)["status"] != "cancelled":
            assert time.monotonic() < deadline, "the slow run was not cancelled"
            time.sleep(0.5)
    again = way("resume", slow_id, "--timeout", "1")
    seen["resume timeout"] = again.returncode
    if way.name == "local":  # it ran in this process: the deadline cancelled it, even while Ray started
        assert json.loads(way("status", slow_id, "--json").stdout)["status"] == "cancelled"
    else:  # the server runs it on: stop it
        way("cancel", slow_id)
    missing = way("status", "000000000000")
    seen["unknown run"] = (missing.returncode, _plain(missing.stderr, ids))

    created = way("keys", "create", "--scope", "read", "--name", "both-ways")
    key_id = re.search(r"created key (\S+)", created.stderr)
    assert created.returncode == 0 and key_id, f"{way.name}: {created.stderr}"
    seen["keys create"] = _plain(created.stderr, ids).replace(key_id[1], "<key>")
    listing = way("keys", "list")
    seen["keys list has it"] = "both-ways" in listing.stdout and "read" in listing.stdout
    revoked = way("keys", "revoke", key_id[1])
    seen["keys revoke"] = (revoked.returncode, revoked.stdout.replace(key_id[1], "<key>"))
    seen["keys revoke unknown"] = way("keys", "revoke", "nosuchkey").returncode

    route = way("route", "Render this paragraph in French.", "--json")
    decision = json.loads(route.stdout)
    seen["route"] = (decision["agent"], sorted(decision["filtered_out"]), [c["agent"] for c in decision["runners_up"]])
    agents = json.loads(way("agents", "--json").stdout)
    seen["agents"] = sorted((a["name"], tuple(a["capabilities"])) for a in agents["agents"])
    return seen


def test_the_same_session_locally_and_over_the_api(
    api_server: ApiServer, cli_env: dict[str, str], tmp_path: Path
) -> None:
    local_env = {**cli_env, "FACTORY_AGENTS_FILE": str(FIXTURES / "api_agents.yaml")}
    local = Way("local", local_env, [], tmp_path / "local")
    remote_env = {k: v for k, v in cli_env.items() if not k.startswith("FACTORY_API")}
    remote_env["FACTORY_HOME"] = str(tmp_path / "client-home")  # nothing local is used with --api
    remote = Way(
        "api", remote_env, ["--api", api_server.base_url, "--api-key", api_server.keys["admin"]], tmp_path / "api"
    )

    mine, theirs = _session(local), _session(remote)

    assert mine.keys() == theirs.keys()
    for step in mine:
        assert mine[step] == theirs[step], f"{step}: locally {mine[step]!r}, over the API {theirs[step]!r}"
    # and the session did what it says (the same wrong answer both ways would pass the comparison)
    assert mine["validate"] == (0, "valid: both-ways (2 steps)\n")
    assert mine["validate bad"][0] == 2 and any("nowhere" in line for line in mine["validate bad"][1])
    assert mine["run"] == {"status": "succeeded", "outputs": {"sum": 15, "talk": 30}, "error": None}
    assert "printing 15" in mine["logs"][1] and "logging 15" in mine["logs one step"]
    assert mine["events"][-1] == ("run.succeeded", None)
    assert mine["runs"] == [(True, "both-ways", "succeeded", False)]
    assert "already finished" in mine["cancel finished"][1]
    assert mine["run failing"] == (1, "failed", {})
    assert mine["resume"][0] == 0 and "succeeded" in mine["resume"][1]
    assert mine["timeout"] == 3 and mine["resume timeout"] == 3
    assert mine["unknown run"][0] == 2
    assert mine["keys list has it"] and mine["keys revoke"][0] == 0 and mine["keys revoke unknown"] == 2
    assert mine["route"][0] == "translator"
    assert ("translator", ("translate",)) in mine["agents"]
