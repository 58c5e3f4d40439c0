"""cgroup v1 limits for one sandbox: ``memory``, ``pids`` and ``cpu``, where they are writable.

Each sandbox gets its own cgroup in each controller, nested under the cgroup of
the Factory process (so the limits of whatever runs the Factory still apply),
at ``<controller>/<own path>/factory-sandbox/<id>``. The launcher moves itself
in before it starts bubblewrap, so every process of the sandbox is counted.
A controller that is missing or read-only is skipped and not reported as enforced.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT_NAME = "factory-sandbox"
CPU_PERIOD_US = 100_000


def own_cgroup_paths() -> dict[str, str]:
    """Controller name -> this process's path in it (cgroup v1 lines of /proc/self/cgroup)."""
    paths: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[1]:
                for controller in parts[1].split(","):
                    paths[controller] = parts[2]
    return paths


def _read_key(path: Path, key: str) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


class SandboxCgroups:
    """The cgroups of one sandbox. Use :meth:`create`, then :meth:`procs_files`, then :meth:`remove`."""

    def __init__(self, name: str, root: Path = CGROUP_ROOT) -> None:
        self.name = name
        self.root = root
        self.dirs: dict[str, Path] = {}

    def _make(self, controller: str) -> Path | None:
        base = self.root / controller
        if not (base / "cgroup.procs").exists():
            return None
        own = own_cgroup_paths().get(controller, "/").lstrip("/")
        path = base / own / PARENT_NAME / self.name
        try:
            path.mkdir(parents=True)
        except OSError:
            return None
        self.dirs[controller] = path
        return path

    def create(self, memory: int | None, pids: int | None, cpus: float | None, owner_uid: int | None) -> list[str]:
        """Create the cgroups and set the limits; returns what is enforced (e.g. ``cgroup memory``)."""
        enforced: list[str] = []
        path = self._make("memory") if memory is not None else None
        if path is not None and memory is not None and self._write(path / "memory.limit_in_bytes", memory):
            self._write(path / "memory.memsw.limit_in_bytes", memory)  # no swapping past the limit
            self._write(path / "memory.swappiness", 0)
            enforced.append("cgroup memory")
        if pids is not None and (path := self._make("pids")) is not None and self._write(path / "pids.max", pids):
            enforced.append("cgroup pids")
        if cpus is not None and (path := self._make("cpu")) is not None:
            quota = max(1000, int(cpus * CPU_PERIOD_US))
            if self._write(path / "cpu.cfs_period_us", CPU_PERIOD_US) and self._write(path / "cpu.cfs_quota_us", quota):
                enforced.append("cgroup cpu")
        for path in self.dirs.values():
            if owner_uid is not None:
                with contextlib.suppress(OSError):
                    os.chown(path / "cgroup.procs", owner_uid, -1)
        return enforced

    @staticmethod
    def _write(path: Path, value: int) -> bool:
        try:
            path.write_text(str(value))
        except OSError:
            return False
        return True

    def procs_files(self) -> list[Path]:
        return [path / "cgroup.procs" for path in self.dirs.values()]

    def oom_kills(self) -> int:
        path = self.dirs.get("memory")
        if path is None:
            return 0
        kills = _read_key(path / "memory.oom_control", "oom_kill")
        if kills == 0 and _read_key(path / "memory.oom_control", "under_oom"):
            kills = 1
        return kills

    def memory_failures(self) -> int:
        path = self.dirs.get("memory")
        if path is None:
            return 0
        with contextlib.suppress(OSError, ValueError):
            return int((path / "memory.failcnt").read_text())
        return 0

    def pids_refused(self) -> int:
        path = self.dirs.get("pids")
        return 0 if path is None else _read_key(path / "pids.events", "max")

    def pids(self) -> list[int]:
        found: set[int] = set()
        for path in self.dirs.values():
            with contextlib.suppress(OSError, ValueError):
                found.update(int(p) for p in (path / "cgroup.procs").read_text().split())
        return sorted(found)

    def kill_all(self, wait_seconds: float = 2.0) -> None:
        """SIGKILL every process still in the sandbox's cgroups, until none is left."""
        deadline = time.monotonic() + wait_seconds
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def remove(self) -> None:
        self.kill_all()
        for path in self.dirs.values():
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
            # Leave no empty factory-sandbox folder behind in a cgroup that is not ours to keep
            # (a busy one, still used by another sandbox, refuses and stays).
            with contextlib.suppress(OSError):
                path.parent.rmdir()
        self.dirs.clear()
