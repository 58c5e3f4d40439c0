"""`factory up` as a user runs it: Ray, the API and the routing API; Ctrl-C stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.fixtures.ports import free_port
from tests.fixtures.up_process import start_up

REPO = Path(__file__).parent.parent.parent
FIXTURES = Path(__file__).parent.parent / "fixtures"


def test_up_serves_then_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "FACTORY_HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, as on a laptop
    proc = subprocess.Popen(
        [sys.executable, "-m", "factory.cli", "up", "--port", str(port), "--agents", str(FIXTURES / "api_agents.yaml")],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        output = "".join(lines)
        assert "admin key  fk_" in output, output
        key = output.split("admin key  ")[1].split()[0]
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
        assert httpx.get(f"{base}/v1/runs", timeout=30).status_code == 401
        decision = httpx.post(
            f"{base}/v1/route",
            json={"text": "Translate this note into French"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert decision.status_code == 200 and decision.json()["agent"] == "translator"
        assert f"dashboard  {base}/ui/" in output, output
        page = httpx.get(f"{base}/ui/", timeout=30)
        assert page.status_code == 200 and "gradio" in page.text.lower()
        assert httpx.get(f"{base}/favicon.ico", timeout=30).status_code == 200
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(120) == 0
        try:
            httpx.get(f"{base}/healthz", timeout=5)
            raise AssertionError("the API still answers after Ctrl-C")
        except httpx.TransportError:
            pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_open_mode_refuses_other_addresses(tmp_path: Path) -> None:
    env = {**os.environ, "FACTORY_HOME": str(tmp_path / "home")}
    result = subprocess.run(
        [sys.executable, "-m", "factory.cli", "up", "--open", "--host", "0.0.0.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "only allowed with --host 127.0.0.1" in result.stderr


def test_up_after_a_kill_cleans_up_and_down_stops_it(tmp_path: Path) -> None:
    import json

    import psutil

    home = tmp_path / "home"
    env = {**os.environ, "FACTORY_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    first, _ = start_up(env, free_port())
    second = None
    try:
        state = json.loads((home / "up.json").read_text())
        ray_pids = [p["pid"] for p in state["ray"]]
        assert state["owner"]["pid"] == first.pid and any(p["name"] == "raylet" for p in state["ray"])
        os.kill(first.pid, signal.SIGKILL)  # no clean stop: the raylet's agents outlive it
        first.wait(30)
        time.sleep(5)  # gcs_server and the raylet die with their driver; what is left now stays
        left = [pid for pid in ray_pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        assert left, "every Ray process went away with its driver; nothing to test"

        port = free_port()
        second, output = start_up(env, port)
        assert "stopped the Ray left behind by an earlier factory up" in output, output
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in ray_pids)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        again = subprocess.run(
            [sys.executable, "-m", "factory.cli", "up", "--port", str(free_port())],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert again.returncode == 2 and "factory down" in again.stderr

        down = subprocess.run(
            [sys.executable, "-m", "factory.cli", "down"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
        assert second.wait(60) == 0
        assert not (home / "up.json").exists()
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            raise AssertionError("the API still answers after factory down")
        except httpx.TransportError:
            pass
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(
            [sys.executable, "-m", "factory.cli", "down"], env=env, cwd=REPO, capture_output=True, timeout=120
        )
