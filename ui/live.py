"""Following the events API (SSE with Last-Event-ID) in a background thread, with bounded memory.

A page asks a follower what came since it last looked (``version``) on each tick of its
timer; the follower keeps only the newest events and log lines, so a page left open for
hours costs the same as one opened a minute ago, and it stops when no page asked for
``idle_stop`` seconds (a tab closed without logging out). The client reconnects with Last-Event-ID
when a stream drops, so no event is missed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from factory.client import FactoryClient
from factory.errors import FactoryError
from ui.render import EmittedLine, LiveLine, emitted_lines, live_lines

MAX_EVENTS = 500
MAX_LOG_LINES = 2000
MAX_EMITTED = 1000  # emitted values kept per step (the newest)
MAX_LOGGED_STEPS = 200
IDLE_STOP_SECONDS = 30.0  # a follower nobody looked at for this long (a closed tab) stops


class EventFollower:
    """The events of one run (``run_id``), or of every run (``None``), after event ``after``."""

    def __init__(
        self,
        client: FactoryClient,
        run_id: str | None,
        after: int = 0,
        idle_stop: float = IDLE_STOP_SECONDS,
        carry: EventFollower | None = None,
    ) -> None:
        """``carry``: a stopped follower of the same run whose events and log lines this one keeps."""
        self.client = client
        self.idle_stop = idle_stop
        self.touched = time.monotonic()
        self.run_id = run_id
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.logs: dict[str, deque[LiveLine]] = {}
        self.emitted: dict[str, deque[EmittedLine]] = {}
        self.version = 0
        self.last_id = after
        self.error: str | None = None
        self.ended = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        if carry is not None:
            self.events.extend(carry.events)
            self.logs = carry.logs
            self.emitted = carry.emitted
        self._thread = threading.Thread(target=self._follow, name=f"ui-events-{run_id or 'all'}", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch_idle, name="ui-events-idle", daemon=True).start()

    def _watch_idle(self) -> None:
        """Stop a follower nobody looked at for ``idle_stop`` s, even on a quiet stream: the
        client sees the stop at the next keep-alive (15 s at most) and closes the stream."""
        while not self._stop.wait(1.0) and not self.ended:
            if time.monotonic() - self.touched > self.idle_stop:
                self._stop.set()

    def _follow(self) -> None:
        try:
            for event in self.client.events(self.run_id, self.last_id, follow=True, stop=self._stop):
                self._add(event)
                if self._stop.is_set() or time.monotonic() - self.touched > self.idle_stop:
                    return
        except FactoryError as exc:
            self.error = str(exc)
        finally:
            self.ended = True
            with self._lock:
                self.version += 1

    def _add(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.last_id = max(self.last_id, int(event["id"]))
            self.events.append(event)
            step = event.get("step_id")
            data = event.get("data")
            if event.get("type") == "step.log" and step and isinstance(data, dict):
                if step not in self.logs and len(self.logs) >= MAX_LOGGED_STEPS:
                    self.logs.pop(next(iter(self.logs)))
                self.logs.setdefault(step, deque(maxlen=MAX_LOG_LINES)).extend(live_lines(data))
            elif event.get("type") == "step.emitted" and step and isinstance(data, dict):
                if step not in self.emitted and len(self.emitted) >= MAX_LOGGED_STEPS:
                    self.emitted.pop(next(iter(self.emitted)))
                self.emitted.setdefault(step, deque(maxlen=MAX_EMITTED)).extend(emitted_lines(data))
            self.version += 1

    def touch(self) -> None:
        """A page still looks: keep following (else it stops after ``idle_stop`` seconds)."""
        self.touched = time.monotonic()

    def snapshot(self) -> tuple[int, list[dict[str, Any]]]:
        with self._lock:
            return self.version, list(self.events)

    def since(self, after: int) -> tuple[int, list[dict[str, Any]]]:
        """The version and the events kept with an id above ``after``, oldest first."""
        with self._lock:
            newer: list[dict[str, Any]] = []
            for event in reversed(self.events):
                if int(event["id"]) <= after:
                    break
                newer.append(event)
            return self.version, newer[::-1]

    def live_lines(self, step: str) -> list[LiveLine]:
        """The step's lines from step.log events, with the attempt and item of each."""
        with self._lock:
            return list(self.logs.get(step, ()))

    def emitted_values(self, step: str) -> list[EmittedLine]:
        """What the step emitted (step.emitted events), oldest first, with the attempt and item of each."""
        with self._lock:
            return list(self.emitted.get(step, ()))

    def stop(self) -> None:
        """Stop following; the thread ends at its next event or keep-alive."""
        self._stop.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
