"""``factory --config FILE`` reaches every component of a run: the CLI, the coordinator, and
the Ray workers that run container steps (which never read their own environment for it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="the local executor needs bubblewrap"),
]

REPO = Path(__file__).parent.parent.parent
SECRET = "s3cr3t-from-the-config-folder"
WRITE_BIG_FILE = (
    "import errno\n"
    "try:\n"
    "    open('big.bin', 'wb').write(b'x' * 300000)\n"
    "    print('wrote')\n"
    "except OSError as exc:\n"
    "    print('EFBIG' if exc.errno == errno.EFBIG else exc)\n"
)


def test_a_config_file_reaches_coordinator_and_workers(cli_env: dict[str, str], tmp_path: Path) -> None:
    secrets = tmp_path / "config-secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "TOKEN").write_text(SECRET)
    config = tmp_path / "factory.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "secrets_dir": str(secrets),  # read by the worker that runs the container step
                "sandbox_max_file_size": 100_000,  # the worker's executor
                "max_output_bytes": 2048,  # the coordinator
            }
        )
    )
    workflow = tmp_path / "wf.yaml"
    workflow.write_text(
        yaml.safe_dump(
            {
                "name": "configured",
                "steps": [
                    {
                        "id": "secret",
                        "container": {
                            "image": "host",
                            "command": ["/bin/sh", "-c", "wc -c < /run/secrets/TOKEN"],
                            "secrets": ["TOKEN"],
                        },
                    },
                    {
                        "id": "big_file",
                        "container": {"image": "host", "command": ["/usr/bin/python3", "-c", WRITE_BIG_FILE]},
                    },
                    {"id": "small", "python": "tests.fixtures.teststeps:echo", "with": {"value": "x" * 1000}},
                    {"id": "large", "python": "tests.fixtures.teststeps:echo", "with": {"value": "x" * 3000}},
                ],
            }
        )
    )
    env = {k: v for k, v in cli_env.items() if not k.startswith(("FACTORY_SECRETS", "FACTORY_SANDBOX", "FACTORY_MAX"))}
    factory = [sys.executable, "-m", "factory.cli", "--config", str(config)]
    done = subprocess.run(
        [*factory, "run", str(workflow), "--json"], env=env, cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 1, done.stderr  # the large output fails its step, as the config says
    run_id = json.loads(done.stdout)["run_id"]
    status = subprocess.run(
        [*factory, "status", run_id, "--json"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    steps = {s["step_id"]: s for s in json.loads(status.stdout)["steps"]}

    assert steps["secret"]["status"] == "succeeded"
    assert steps["secret"]["output"]["stdout"].strip() == str(len(SECRET))  # the config's secrets folder
    assert steps["big_file"]["output"]["stdout"].strip() == "EFBIG"  # the config's file size limit
    assert steps["small"]["status"] == "succeeded"
    assert steps["large"]["status"] == "failed" and "2048" in steps["large"]["error"]

    # and without the config, the same run uses the environment's defaults: no such secret, no such limits
    plain = subprocess.run(
        [sys.executable, "-m", "factory.cli", "run", str(workflow), "--json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    plain_run = json.loads(plain.stdout)
    assert plain_run["status"] == "failed" and "TOKEN" in (plain_run["error"] or "")
