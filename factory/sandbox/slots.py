"""Machine-wide slots held with ``flock``: host uids for sandboxes, a concurrency limit for Dagger.

A slot is a lock file; holding its exclusive lock is holding the slot. The lock
goes with the process, so a crashed worker never leaks a slot.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

from factory.errors import ExecutorUnavailableError


class SlotPool:
    """``count`` slots numbered ``0..count-1``, shared by every process that uses ``directory``."""

    def __init__(self, directory: Path, count: int, poll_seconds: float = 0.05) -> None:
        if count < 1:
            raise ValueError("a slot pool needs at least one slot")
        self.directory = directory
        self.count = count
        self.poll_seconds = poll_seconds

    @contextlib.contextmanager
    def acquire(self, wait_seconds: float | None = None) -> Iterator[int]:
        """Hold one free slot; waits up to ``wait_seconds`` (None: forever) for one."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        deadline = None if wait_seconds is None else time.monotonic() + wait_seconds
        order = list(range(self.count))
        while True:
            random.shuffle(order)  # spread processes over the slots: fewer collisions
            for index in order:
                fd = os.open(self.directory / f"{index}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                try:
                    yield index
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise ExecutorUnavailableError(
                    f"all {self.count} slots in {self.directory} stayed busy for {wait_seconds:g}s; "
                    "raise the limit or run fewer steps at once"
                )
            time.sleep(self.poll_seconds)
