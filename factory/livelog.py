"""Log lines of a running step, appended to the store's event log as they come.

A container step's output lines (already redacted of secrets by the sandbox) are
written to a :class:`LiveLog`; every ``interval`` seconds, and at the end, the
new lines become one ``step.log`` event, so `factory events --follow`, the SSE
endpoint and Redis consumers see them while the step runs. The worker writes the
events itself, straight to the store (SQLite on one machine, PostgreSQL anywhere).
"""

from __future__ import annotations

import io
import logging
import threading

from factory.store import Store, open_store

log = logging.getLogger(__name__)
MAX_LINES_PER_EVENT = 200
_stores: dict[str, Store] = {}
_stores_lock = threading.Lock()


def worker_store(url: str) -> Store:
    """One store connection per worker process and URL (a worker runs many attempts)."""
    with _stores_lock:
        store = _stores.get(url)
        if store is None:
            store = _stores[url] = open_store(url)
        return store


class LiveLog(io.StringIO):
    """A StringIO that also publishes complete lines as ``step.log`` events."""

    def __init__(self, store_url: str, run_id: str, step_id: str, interval: float = 0.5) -> None:
        super().__init__()
        self.store_url = store_url
        self.run_id = run_id
        self.step_id = step_id
        self.interval = interval
        self._partial = ""
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._failed = False

    def write(self, text: str) -> int:
        written = super().write(text)
        with self._lock:
            self._partial += text
            *complete, self._partial = self._partial.split("\n")
            self._lines += complete
            if complete and self._timer is None:  # publish within `interval`, batching what comes meanwhile
                self._timer = threading.Timer(self.interval, self.flush_events)
                self._timer.daemon = True
                self._timer.start()
        return written

    def flush_events(self, final: bool = False) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if final and self._partial:
                self._lines.append(self._partial)
                self._partial = ""
            lines, self._lines = self._lines, []
        if not lines or self._failed:
            return
        try:
            store = worker_store(self.store_url)
            for start in range(0, len(lines), MAX_LINES_PER_EVENT):
                chunk = lines[start : start + MAX_LINES_PER_EVENT]
                store.append_event(self.run_id, self.step_id, "step.log", {"lines": chunk})
        except Exception as exc:  # noqa: BLE001 - live lines are a convenience; the attempt's log is kept anyway
            self._failed = True
            log.warning("cannot stream log lines of step %s as events: %s", self.step_id, exc)
