"""Chains: python steps that follow one another, run as one Ray task each.

A step whose only dependant needs nothing but its result (and the dependant likewise) can run
right after it in the same worker: :class:`ChainBook` keeps what the coordinator's driver
needs to know about such tasks while they run (no Ray here). Each step of a chain still
reports on its own as it ends, and is decided and committed then; a chain stops at its first
step that did not succeed, and its steps after that one never ran.

Its dependants outside the chain need its result, which exists only once the chain reports
it: their submissions wait here, with each of their dependencies bound as it was when the
scheduler submitted them (the ref, the chain that will report it, or the waiting submission
it is in), as Ray binds a task's arguments when it is submitted. A submission whose
dependency's chain stopped before it is told the dependency did not succeed, as a task given
a failed result would say.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from factory.outcome import Outcome
from factory.scheduler import SubmitStep

# Steps of a chain run in one Ray task at most (each outcome still comes back as it ends); a
# longer chain is several such tasks, each started as the one before reports its last step.
MAX_CHAIN_STEPS = 1_000

# what a step submitted against a dependency that did not succeed says at once (runtime.run_attempt)
NOT_RUN = Outcome(ok=False, skipped=True, error="a dependency did not succeed")


@dataclass(slots=True)
class Chain:
    """A chain in flight: its steps and their tokens that have not reported, in order; the first
    is the one running."""

    step_ids: deque[str]
    tokens: deque[int]
    group: bool = False  # a group (factory.groups): it goes on past a step that did not succeed


@dataclass(eq=False, slots=True)
class Waiting:
    """Submissions (one step, or a chain) made while a dependency ran in a chain that had not
    reported it yet."""

    actions: list[SubmitStep]
    deps: dict[str, Any]  # dependency -> the ref it is given; None until its chain reports it
    missing: int
    group: bool = False  # a group goes even if a dependency did not succeed (its steps that need it say so)
    settled: bool = False

    def bind(self, step_id: str, ref: Any) -> bool:
        """Its dependency ``step_id`` has a ref now; whether that was the last one missing (it
        is settled then: it goes)."""
        self.deps[step_id] = ref
        self.missing -= 1
        if self.missing == 0:
            self.settled = True
        return self.settled


@dataclass
class ChainBook:
    """The chains in flight and the submissions waiting for their steps."""

    chains: dict[Any, Chain] = field(default_factory=dict)  # stream -> what it has not reported
    pending_in: dict[str, Any] = field(default_factory=dict)  # step id -> the stream that will report it
    parked: dict[str, Waiting] = field(default_factory=dict)  # step id -> the waiting submission it is in
    # (stream or Waiting, step id) -> the submissions waiting for that step from there
    _waiting: dict[tuple[Any, str], list[Waiting]] = field(default_factory=dict)

    def pending(self, step_id: str) -> bool:
        """Whether the step's result is yet to come: a chain has not reported it, or it waits."""
        return step_id in self.pending_in or step_id in self.parked

    def add(self, stream: Any, actions: list[SubmitStep], group: bool = False, claimed: set[str] | None = None) -> None:
        """A chain or group went. Its steps' results are the stream's to report (those in
        ``claimed``, when given: the others' attempts no longer count, and a newer submission of
        theirs may be in flight); a step's latest submission is the one its dependants wait for."""
        self.chains[stream] = Chain(deque(a.step_id for a in actions), deque(a.token for a in actions), group)
        for action in actions:
            if claimed is None or action.step_id in claimed:
                self.pending_in[action.step_id] = stream
                self.parked.pop(action.step_id, None)

    def wait(self, actions: list[SubmitStep], deps: dict[str, Any], group: bool = False) -> None:
        """Submissions whose dependencies with no ref (None) are :meth:`pending`."""
        missing = [d for d, ref in deps.items() if ref is None]
        waiting = Waiting(actions, deps, len(missing), group)
        for dep in missing:
            where = self.pending_in[dep] if dep in self.pending_in else self.parked[dep]
            self._waiting.setdefault((where, dep), []).append(waiting)
        for action in actions:
            self.parked[action.step_id] = waiting
            self.pending_in.pop(action.step_id, None)  # an older submission's stream no longer reports it

    def went(
        self, waiting: Waiting, refs: dict[str, Any], not_run: Any, claimed: set[str] | None = None
    ) -> tuple[list[Waiting], list[Waiting]]:
        """A waiting submission went to Ray: each of its steps has a ref now (``refs``), or is
        pending in the chain it went in; but a step not in ``claimed`` (when given), whose
        attempt no longer counts: what waited for it is told it did not run (``not_run``).
        Returns the submissions that can go now, and those that will not go."""
        ready: list[Waiting] = []
        gone: list[Waiting] = []
        for action in waiting.actions:
            step_id = action.step_id
            if self.parked.get(step_id) is waiting:
                del self.parked[step_id]
            counts = claimed is None or step_id in claimed
            for other in self._waiting.pop((waiting, step_id), []):
                if other.settled:
                    continue
                if not counts and not other.group:
                    other.settled = True
                    gone.append(other)
                elif not counts:
                    if other.bind(step_id, not_run):
                        ready.append(other)
                elif step_id in self.pending_in:
                    self._waiting.setdefault((self.pending_in[step_id], step_id), []).append(other)
                elif other.bind(step_id, refs[step_id]):
                    ready.append(other)
        return ready, gone

    def dropped(self, waiting: Waiting, not_run: Any) -> tuple[list[Waiting], list[Waiting]]:
        """A waiting submission will not go: nor will those that waited for its steps, but
        groups, given ``not_run`` (the ref of a step that did not run) for them instead. Returns
        the submissions that can go now, and those that will not."""
        ready: list[Waiting] = []
        gone: list[Waiting] = []
        for action in waiting.actions:
            if self.parked.get(action.step_id) is waiting:
                del self.parked[action.step_id]
            for other in self._waiting.pop((waiting, action.step_id), []):
                if other.settled:
                    continue
                if other.group:
                    if other.bind(action.step_id, not_run):
                        ready.append(other)
                else:
                    other.settled = True
                    gone.append(other)
        return ready, gone

    def sent_alone(self, step_id: str) -> None:
        """The step went to Ray as a task of its own: its result is no chain's to report."""
        self.pending_in.pop(step_id, None)
        self.parked.pop(step_id, None)

    def reported(self, stream: Any, step_id: str, ref: Any, ok: bool = True) -> tuple[list[Waiting], list[Waiting]]:
        """``stream`` reported ``step_id``, held by ``ref``: it succeeded (``ok``), or not (or did
        not run). Returns the submissions that can go now (those waiting only for it; groups go
        either way, as tasks given its result would) and those that will not go (a step or a
        chain that needs a result that did not succeed)."""
        if self.pending_in.get(step_id) is stream:
            del self.pending_in[step_id]
        ready: list[Waiting] = []
        gone: list[Waiting] = []
        for waiting in self._waiting.pop((stream, step_id), []):
            if waiting.settled:
                continue
            if ok or waiting.group:
                if waiting.bind(step_id, ref):
                    ready.append(waiting)
            else:
                waiting.settled = True
                gone.append(waiting)
        return ready, gone

    def end(self, stream: Any, not_run: Any) -> tuple[list[int], list[Waiting], list[Waiting]]:
        """A chain or group stopped: the tokens of its steps that did not report, in order; the
        submissions that waited for one of them and go now (groups, given ``not_run`` for it);
        and those that will not go."""
        chain = self.chains.pop(stream)
        ready: list[Waiting] = []
        gone: list[Waiting] = []
        for step_id in chain.step_ids:
            now, never = self.reported(stream, step_id, not_run, ok=False)
            ready += now
            gone += never
        return list(chain.tokens), ready, gone

    def clear(self) -> None:
        self.chains.clear()
        self.pending_in.clear()
        self.parked.clear()
        self._waiting.clear()
