"""Keys and registered workflows from the command line, locally and over the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import ApiServer

REPO = Path(__file__).parent.parent.parent
FACTORY = [sys.executable, "-m", "factory.cli"]


def factory(env: dict[str, str] | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**(env or os.environ), "COLUMNS": "250"}  # tables wide enough not to wrap ids
    return subprocess.run([*FACTORY, *args], env=env, capture_output=True, text=True, timeout=180, cwd=REPO)


def test_keys_show_scopes_expiry_grants_and_last_use(cli_env: dict[str, str]) -> None:
    created = factory(cli_env, "keys", "create", "--scope", "submit", "--name", "[bold]ci", "--expires-in", "30d",
                      "--secret", "API_TOKEN")  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "with scopes [submit]" in created.stderr and "[bold]ci" in created.stderr  # rich markup is escaped
    assert "secrets API_TOKEN" in created.stderr and "expires " in created.stderr
    key = created.stdout.strip()
    assert key.startswith("fk_") and len(created.stdout.splitlines()) == 1
    listed = factory(cli_env, "keys", "list")
    assert "[bold]ci" in listed.stdout and "submit" in listed.stdout and "API_TOKEN" in listed.stdout
    assert "active" in listed.stdout and "never" in listed.stdout  # never used yet
    bad = factory(cli_env, "keys", "create", "--scope", "read", "--expires-in", "soon")
    assert bad.returncode == 2 and "is not a duration" in bad.stderr
    key_id = key.split("_")[1]
    assert factory(cli_env, "keys", "revoke", key_id).returncode == 0
    assert "revoked" in factory(cli_env, "keys", "list").stdout


def test_register_then_start_by_name_locally(cli_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "mysteps.py").write_text("def add(a: int, b: int) -> int:\n    return a + b\n")
    wf = tmp_path / "wf.yaml"
    wf.write_text(
        yaml.safe_dump(
            {
                "name": "adder",
                "inputs": {"x": 1},
                "steps": [{"id": "s", "python": "mysteps:add", "with": {"a": "${inputs.x}", "b": 1}}],
            }
        )
    )
    for version in (1, 2):
        registered = factory(cli_env, "workflows", "register", str(wf))
        assert registered.returncode == 0, registered.stderr
        assert f"registered adder version {version}" in registered.stdout
    listed = factory(cli_env, "workflows", "list")
    assert "adder" in listed.stdout and "2" in listed.stdout
    started = factory(cli_env, "workflows", "start", "adder", "--input", "x=41")
    assert started.returncode == 0, started.stderr + started.stdout
    assert "succeeded" in started.stdout
    unknown = factory(cli_env, "workflows", "start", "nope")
    assert unknown.returncode == 2 and "no registered workflow 'nope'" in unknown.stderr
    evil = tmp_path / "evil.yaml"
    evil_step = {"id": "s", "python": "os:system", "with": {"command": "id"}}
    evil.write_text(yaml.safe_dump({"name": "evil", "steps": [evil_step]}))
    refused = factory(cli_env, "workflows", "register", str(evil))
    assert refused.returncode == 2 and "never callable" in refused.stderr

    # locally nothing would start a run left behind: --no-wait is refused before a run exists
    runs_before = factory(cli_env, "runs", "--json").stdout
    no_wait = factory(cli_env, "workflows", "start", "adder", "--no-wait")
    assert no_wait.returncode == 2 and "--no-wait needs a Factory service" in no_wait.stderr
    assert factory(cli_env, "runs", "--json").stdout == runs_before

    # --base-dir: the modules come from that folder, not the YAML's
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libsteps.py").write_text("def triple(a: int) -> int:\n    return 3 * a\n")
    (tmp_path / "wf2").mkdir()
    elsewhere = tmp_path / "wf2" / "wf.yaml"
    elsewhere.write_text(
        yaml.safe_dump({"name": "tripler", "steps": [{"id": "t", "python": "libsteps:triple", "with": {"a": 5}}]})
    )
    missing = factory(cli_env, "workflows", "register", str(elsewhere))
    assert missing.returncode == 2 and "libsteps" in missing.stderr
    found = factory(cli_env, "workflows", "register", str(elsewhere), "--base-dir", str(tmp_path / "lib"))
    assert found.returncode == 0, found.stderr
    tripled = factory(cli_env, "workflows", "start", "tripler")
    assert tripled.returncode == 0 and "succeeded" in tripled.stdout, tripled.stderr + tripled.stdout


def test_keys_and_workflows_over_the_api(api_server: ApiServer) -> None:
    admin = ["--api", api_server.base_url, "--api-key", api_server.keys["admin"]]
    created = factory(None, *admin, "keys", "create", "--scope", "read", "--name", "over-http")
    assert created.returncode == 0, created.stderr
    assert "with scopes [read]" in created.stderr
    key_id = created.stdout.strip().split("_")[1]
    listed = factory(None, *admin, "keys", "list")
    assert key_id in listed.stdout and "over-http" in listed.stdout
    submit = ["--api", api_server.base_url, "--api-key", api_server.keys["submit"]]
    denied = factory(None, *submit, "keys", "list")
    assert denied.returncode == 2 and "403" in denied.stderr
    assert factory(None, *admin, "keys", "revoke", key_id).returncode == 0
    name = f"cli-{time.time_ns()}"
    wf = {
        "name": name,
        "inputs": {"x": 1},
        "steps": [{"id": "s", "python": "tests.fixtures.teststeps:add", "with": {"a": "${inputs.x}", "b": 1}}],
    }
    path = Path(api_server.settings.home) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(wf))
    registered = factory(None, *admin, "workflows", "register", str(path))
    assert registered.returncode == 0, registered.stderr
    started = factory(None, *submit, "workflows", "start", name, "--input", "x=9")
    assert started.returncode == 0 and "succeeded" in started.stdout, started.stderr
    view = json.loads(
        subprocess.run(
            ["curl", "-s", "-H", f"Authorization: Bearer {api_server.keys['read']}", f"{api_server.base_url}/v1/runs"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    )
    newest = view["runs"][0]
    assert newest["workflow_ref"] == f"{name}@1" and newest["started_by"].startswith("key:")
