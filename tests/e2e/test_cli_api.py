"""The CLI against the HTTP API (`--api`), the way a user on another machine would use it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ApiServer

REPO = Path(__file__).parent.parent.parent


def factory(api_server: ApiServer, *args: str, key: str = "submit") -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "factory.cli", "--api", api_server.base_url, "--api-key", api_server.keys[key]]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=180, cwd=REPO)


def test_run_status_runs_over_the_api(api_server: ApiServer, tmp_path: Path) -> None:
    wf = tmp_path / "wf.yaml"
    wf.write_text(
        yaml.safe_dump(
            {
                "name": "over-http",
                "inputs": {"n": 1},
                "steps": [
                    {"id": "sum", "python": "tests.fixtures.teststeps:add", "with": {"a": "${inputs.n}", "b": 10}},
                    {
                        "id": "twice",
                        "python": "tests.fixtures.teststeps:add",
                        "with": {"a": "${steps.sum.output}", "b": "${steps.sum.output}"},
                    },
                ],
            }
        )
    )
    result = factory(api_server, "run", str(wf), "--input", "n=5", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["status"] == "succeeded" and data["outputs"] == {"sum": 15, "twice": 30}
    status = factory(api_server, "status", data["run_id"], key="read")
    assert status.returncode == 0 and "twice" in status.stdout and "succeeded" in status.stdout
    runs = factory(api_server, "runs", "--limit", "200", "--json", key="read")
    assert data["run_id"] in {r["id"] for r in json.loads(runs.stdout)}
    denied = factory(api_server, "run", str(wf), key="read")
    assert denied.returncode == 2 and "403" in denied.stderr and "--scope submit" in denied.stderr
