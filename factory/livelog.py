"""Log lines of a running step, appended to the store's event log as they come.

What a step prints goes to a :class:`LiveLog`: a container step's output lines (already
redacted of secrets by the sandbox), and what a python step prints or logs. ``interval``
seconds after a write, the complete lines written since the last publication become
``step.log`` events (``{"lines": [...], "attempt": N}``, with ``"item"`` for a for_each
item), so `factory events --follow`, the SSE endpoint, Redis consumers and the dashboard
see them while the step runs; the rest is published when the attempt ends. The worker
writes the events itself, straight to the store (SQLite on one machine, PostgreSQL anywhere).

A python step's LiveLog holds its lines back (``hold_short``): an attempt that ends before
its first publication publishes nothing, since its lines come with its outcome anyway (the
attempt's log); only an attempt still running ``interval`` seconds after it first printed
publishes, and then its last lines too when it ends. Writing costs a ``StringIO.write`` and
one flag test; the lines are cut from the buffer only when they are published, by one thread
per worker process, and a step that prints nothing costs nothing more.
"""

from __future__ import annotations

import heapq
import io
import itertools
import logging
import threading
import time
from typing import Any

from factory.store import Store, open_store

log = logging.getLogger(__name__)
MAX_LINES_PER_EVENT = 200
MAX_LINES_PER_PUBLISH = 1000  # a step printing faster: the newest lines of each publication, the others counted
MAX_LINE_CHARS = 4000  # a longer line is cut (the attempt's log keeps it)
LIVE_LOG_INTERVAL_SECONDS = 0.5
_stores: dict[str, Store] = {}
_stores_lock = threading.Lock()


def worker_store(url: str) -> Store:
    """One store connection per worker process and URL (a worker runs many attempts)."""
    with _stores_lock:
        store = _stores.get(url)
        if store is None:
            store = _stores[url] = open_store(url)
        return store


class _Ticker:
    """One daemon thread per process that publishes each LiveLog when its time comes
    (rather than a timer thread per LiveLog and interval)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._due: list[tuple[float, int, LiveLog]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def schedule(self, live: LiveLog, delay: float) -> None:
        with self._cond:
            entry = (time.monotonic() + delay, next(self._order), live)
            heapq.heappush(self._due, entry)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="factory-livelog", daemon=True)
                self._thread.start()
            elif self._due[0] is entry:  # sooner than what the thread waits for
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._due and self._due[0][0] <= now:
                        live = heapq.heappop(self._due)[2]
                        break
                    self._cond.wait(self._due[0][0] - now if self._due else None)
            try:
                live.tick()
            except Exception:  # one log's trouble must not stop the others'
                log.exception("publishing live log lines failed")


_TICKER = _Ticker()


class LiveLog(io.StringIO):
    """A StringIO whose complete lines are also published as ``step.log`` events."""

    # Class defaults, set on an instance by its first publication: a log nobody writes to
    # (a step that prints nothing) costs its construction and a ``tell()`` at the end.
    published = 0  # events written
    _sent = 0  # characters of the buffer published (or dropped), up to a line's end
    _armed = False  # a publication is scheduled
    _closed = False
    _failed = False

    def __init__(
        self,
        store_url: str,
        run_id: str,
        step_id: str,
        interval: float = LIVE_LOG_INTERVAL_SECONDS,
        base: dict[str, Any] | None = None,
        hold_short: bool = False,
    ) -> None:
        """``base``: added to each event's data (the attempt, the item); ``hold_short``: publish
        nothing when the attempt ends before its first publication (see the module's text)."""
        super().__init__()
        self._target = (store_url, run_id, step_id, base)
        self.interval = interval
        self.hold_short = hold_short
        self._lock = threading.Lock()  # one publication at a time, in the buffer's order

    def write(self, text: str) -> int:
        written = super().write(text)
        if not self._armed and not self._closed:
            self._armed = True
            _TICKER.schedule(self, self.interval)
        return written

    def tick(self) -> None:
        """The interval passed: publish the complete lines written since the last time."""
        self._armed = False  # a write from now on schedules the next publication
        self._publish(final=False)

    def flush_events(self, final: bool = False) -> None:
        """Publish the complete lines now; ``final``: the attempt ended, publish the rest too
        (nothing, for a ``hold_short`` log that has published nothing) and stop publishing."""
        if final and not self.tell():  # never written to: nothing scheduled, nothing to publish
            self._closed = True
            return
        self._publish(final)

    def _publish(self, final: bool) -> None:
        with self._lock:
            if self._closed:
                return
            if final:
                self._closed = True
                if self.hold_short and not self.published:
                    return  # its lines arrive with the attempt's outcome
            elif self.tell() <= self._sent:
                return
            text = self.getvalue()
            end = len(text) if final else text.rfind("\n", self._sent) + 1
            if end <= self._sent:
                return
            chunk = text[self._sent : end]
            self._sent = end
            if self._failed:
                return
            store_url, run_id, step_id, base = self._target
            lines = chunk.removesuffix("\n").split("\n")
            skipped = max(0, len(lines) - MAX_LINES_PER_PUBLISH)
            lines = [
                line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS] + " [cut]" for line in lines[skipped:]
            ]
            try:
                store = worker_store(store_url)
                for start in range(0, len(lines), MAX_LINES_PER_EVENT):
                    data: dict[str, Any] = {"lines": lines[start : start + MAX_LINES_PER_EVENT], **(base or {})}
                    if skipped and start == 0:
                        data["skipped"] = skipped
                    store.append_event(run_id, step_id, "step.log", data)
                    self.published += 1
            except Exception as exc:  # noqa: BLE001 - live lines are a convenience; the attempt's log is kept anyway
                self._failed = True
                log.warning("cannot stream log lines of step %s as events: %s", step_id, exc)
