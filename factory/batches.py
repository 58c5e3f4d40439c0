"""for_each items that prove short, several per Ray task.

Ray's own cost per task is a fraction of a millisecond: an item that runs for less costs more
to schedule than to run. The first items of a python for_each step go one per task, twice as
many as the cluster has CPUs (enough to keep it busy); its other items wait for the first
outcome. Once an item's time is known, the others go in tasks sized to take about
:data:`TARGET_TASK_SECONDS` each (at most :data:`MAX_ITEMS_PER_TASK` items), or one per task
when an item takes longer than that. Two guards keep a wrong guess cheap: the items that go
at once are spread over at least as many tasks as were probed (a fan-out too small to fill
every worker with full tasks still uses them all), and an item seen to take longer than the
first makes the tasks sent after it smaller (never larger).

In such a task the items run one after another and each one's outcome comes back as it ends,
committed like any item's. A task that dies with several items unreported charges none of
them (the outcomes of items that ended just before can be lost with the worker): the driver
sends them again, each alone, as the same attempts (factory.engine).

:class:`ItemBatcher` decides and keeps the bookkeeping (no Ray here); the driver carries it out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from factory.runtime import CallPart

TARGET_TASK_SECONDS = 0.02  # what one task of several items should take, about
MAX_ITEMS_PER_TASK = 64


def items_per_task(seconds: float) -> int:
    """How many items of ``seconds`` each make a task of about TARGET_TASK_SECONDS."""
    if seconds <= 0:
        return 1
    return max(1, min(MAX_ITEMS_PER_TASK, int(TARGET_TASK_SECONDS / seconds)))


@dataclass(slots=True)
class Batch:
    """Items of one step in one task, that have not reported, in order (the first is running)."""

    step_id: str
    tokens: deque[int]
    parts: deque[CallPart]
    stopped: set[int] = field(default_factory=set)

    def all_stopped(self) -> bool:
        return all(token in self.stopped for token in self.tokens)


@dataclass
class ItemBatcher:
    """Which items go now and how many a task; the batches in flight."""

    probe: int  # items of a step sent one per task before any outcome of the step is known
    size: dict[str, int] = field(default_factory=dict)  # step id -> items per task, once known
    probed: dict[str, int] = field(default_factory=dict)  # step id -> items sent while it was not
    held: dict[str, dict[int, CallPart]] = field(default_factory=dict)  # step id -> token -> part, in order
    _held_by: dict[int, str] = field(default_factory=dict)  # token -> step id
    batches: dict[Any, Batch] = field(default_factory=dict)  # stream -> what it has not reported

    def take(self, step_id: str, token: int, part: CallPart) -> bool:
        """Whether the item goes now, alone; else it is held (:meth:`ready` gives it back)."""
        size = self.size.get(step_id)
        if size == 1:
            return True
        if size is None and self.probed.get(step_id, 0) < self.probe:
            self.probed[step_id] = self.probed.get(step_id, 0) + 1
            return True
        self._hold(step_id, token, part)
        return False

    def _hold(self, step_id: str, token: int, part: CallPart) -> None:
        self.held.setdefault(step_id, {})[token] = part
        self._held_by[token] = step_id

    def learn(self, step_id: str, seconds: float | None) -> None:
        """An item of the step took ``seconds`` (None: unknown, its worker died). The first
        sets the step's items per task; a slower one later lowers it."""
        if step_id not in self.size:
            self.size[step_id] = items_per_task(seconds) if seconds is not None else 1
        elif seconds is not None:
            self.size[step_id] = min(self.size[step_id], items_per_task(seconds))

    def ready(self) -> list[tuple[str, list[tuple[int, CallPart]]]]:
        """Held items that can go now, in tasks: (step id, the task's items)."""
        tasks = []
        for step_id in [s for s in self.held if s in self.size]:
            items = list(self.held.pop(step_id).items())
            for token, _ in items:
                del self._held_by[token]
            # never fewer tasks than were probed: the cluster's workers all get some
            size = min(self.size[step_id], max(1, -(-len(items) // self.probe)))
            tasks += [(step_id, items[i : i + size]) for i in range(0, len(items), size)]
        return tasks

    def drop(self, token: int) -> bool:
        """Forget a held item (stopped before it went); whether it was held."""
        step_id = self._held_by.pop(token, None)
        if step_id is None:
            return False
        items = self.held[step_id]
        del items[token]
        if not items:
            del self.held[step_id]
        return True

    def hold_again(self, step_id: str, items: list[tuple[int, CallPart]]) -> None:
        """Items of a task that stopped before they started: they go again with the next tasks."""
        for token, part in items:
            self._hold(step_id, token, part)

    def add(self, stream: Any, step_id: str, items: list[tuple[int, CallPart]]) -> None:
        self.batches[stream] = Batch(step_id, deque(t for t, _ in items), deque(p for _, p in items))

    def clear(self) -> None:
        self.held.clear()
        self._held_by.clear()
        self.batches.clear()
