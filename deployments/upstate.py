"""What a running ``factory up`` leaves on disk, so the next one (or ``factory down``)
can find it: its pid and, when it started Ray itself, the Ray processes it started.

``$FACTORY_HOME/up.json`` is written once the API is up and removed on a clean stop.
If ``factory up`` is killed (SIGKILL, a crash), its Ray processes (gcs_server, raylet,
dashboard, ...) stay behind; the next ``factory up`` finds the file, sees that its
owner is gone, and stops exactly those processes (each recorded with its start time,
so a reused pid is never killed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel

STATE_FILE = "up.json"


class RecordedProcess(BaseModel):
    pid: int
    started: float  # psutil's create_time: a reused pid has another one
    name: str = ""

    def alive(self) -> psutil.Process | None:
        try:
            process = psutil.Process(self.pid)
            if abs(process.create_time() - self.started) > 1.0 or process.status() == psutil.STATUS_ZOMBIE:
                return None
            return process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None


class UpState(BaseModel):
    owner: RecordedProcess
    host: str
    port: int
    session_dir: str | None = None
    ray: list[RecordedProcess] = []


def state_path(home: Path) -> Path:
    return home / STATE_FILE


def _recorded(pid: int, name: str = "") -> RecordedProcess | None:
    try:
        return RecordedProcess(pid=pid, started=psutil.Process(pid).create_time(), name=name)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def ray_processes_started_here() -> tuple[str | None, list[RecordedProcess]]:
    """The session folder and the processes of the Ray this process started (none if it joined one)."""
    import ray

    node: Any = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return None, []
    found = []
    for name, infos in getattr(node, "all_processes", {}).items():
        for info in infos:
            process = getattr(info, "process", None)
            recorded = _recorded(process.pid, name) if process is not None else None
            if recorded is None:
                continue
            found.append(recorded)
            # the raylet's agents (DashboardAgent, RuntimeEnvAgent) outlive it when it is killed
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(recorded.pid).children(recursive=True):
                    kept = _recorded(child.pid, f"{name} child {child.name()}")
                    if kept is not None:
                        found.append(kept)
    if not found:
        return None, []
    return str(node.get_session_dir_path()), found


def record(home: Path, host: str, port: int) -> None:
    session_dir, processes = ray_processes_started_here()
    owner = _recorded(os.getpid(), "factory up")
    assert owner is not None
    state = UpState(owner=owner, host=host, port=port, session_dir=session_dir, ray=processes)
    path = state_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.model_dump_json(indent=2))
    tmp.replace(path)


def read(home: Path) -> UpState | None:
    try:
        return UpState.model_validate_json(state_path(home).read_text())
    except (OSError, ValueError):
        return None


def forget(home: Path) -> None:
    with contextlib.suppress(OSError):
        state_path(home).unlink()


def stop_processes(processes: list[RecordedProcess], grace: float = 5.0) -> list[int]:
    """Stop the recorded processes that still live (and their children): SIGTERM, then SIGKILL
    after ``grace`` seconds (gcs_server and raylet may ignore SIGTERM). Returns the pids stopped."""
    victims: dict[int, psutil.Process] = {}
    for recorded in processes:
        process = recorded.alive()
        if process is None:
            continue
        victims[process.pid] = process
        with contextlib.suppress(psutil.Error):
            for child in process.children(recursive=True):
                victims[child.pid] = child
    for process in victims.values():
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    _, remaining = psutil.wait_procs(list(victims.values()), timeout=grace)
    for process in remaining:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(remaining, timeout=grace)
    return sorted(victims)


def stop_running(state: UpState, timeout: float = 60.0) -> bool:
    """Ask a live ``factory up`` to stop (SIGTERM: it shuts Serve and its Ray down) and wait.
    Returns False if it had to be killed."""
    owner = state.owner.alive()
    if owner is None:
        return True
    owner.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.owner.alive() is None:
            return True
        time.sleep(0.2)
    with contextlib.suppress(psutil.Error):
        owner.kill()
    return False
