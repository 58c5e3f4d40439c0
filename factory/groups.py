"""Groups: short python steps of a DAG with joins, several to a Ray task.

A chain (factory.chains) fuses steps that follow one another. A DAG whose steps join (a
step needing two others, as in a lattice) has no chain, and Ray's cost per task (a fraction
of a millisecond, most of it in the coordinator) is more than such steps take to run. So
python steps whose function is known to be short go several to a task: consecutive
submissions of the scheduler (an order in which each step comes after what it needs, so
groups never wait for one another in a circle), as many as take about
:data:`GROUP_TASK_SECONDS` by what their functions took last, at most
:data:`MAX_GROUP_STEPS`. In the task every step runs as a task of its own would (one whose
dependency did not succeed says so without running), and each outcome comes back and is
committed as it ends.

What a function takes is learned from its attempts' outcomes in this process
(:class:`StepTimes`, keyed by :func:`timed_as`): a function seen taking longer than
:data:`SHORT_STEP_SECONDS` runs in a task of its own. Of a function never seen, steps that can
run now (their dependencies succeeded) go alone as probes, at most twice as many as the
cluster has CPUs (as for the items of a for_each); while a probe runs, the function's other
steps, and the steps that need them, wait (:class:`HeldSteps`) until a probe's outcome tells
its time (or a probe ended without one, and another may go). A group takes no more steps than
its share of those that go at once, by the cluster's CPUs, so that a wide DAG still spreads.
A guess can be wrong (the same function given other arguments): a group stops once it has
run for :data:`GROUP_BUDGET_SECONDS`, and its steps left go again, each in a task of its own.

:func:`plan` lays a group out (no Ray here); the driver (factory.engine) carries it out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from factory.scheduler import Action, SubmitStep

GROUP_TASK_SECONDS = 0.02  # what one task of several steps should take, about
GROUP_BUDGET_SECONDS = 0.1  # a group that has run this long stops; its steps left go alone
MAX_GROUP_STEPS = 64
# A function whose attempts take longer runs alone. A task costs the coordinator about half a
# millisecond, one after another; so a step this short in a group costs no more time than it
# saves even if the group runs while the cluster has idle CPUs.
SHORT_STEP_SECONDS = 0.001
RECENT_ATTEMPTS = 5  # what a function takes is the median of its last attempts
MAX_KNOWN_FUNCTIONS = 4_096


class StepTimes:
    """What each python function takes (seconds): the median of its last attempts, for the
    functions seen last; shared by the coordinators of one process (threads). The median keeps
    one slow attempt (a busy machine, a first import) from deciding alone."""

    def __init__(self, capacity: int = MAX_KNOWN_FUNCTIONS) -> None:
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()
        self._median: dict[str, float] = {}
        self._capacity = capacity
        self._lock = threading.Lock()

    def learn(self, target: str, seconds: float) -> None:
        with self._lock:
            recent = self._recent.get(target)
            if recent is None:
                recent = self._recent[target] = deque(maxlen=RECENT_ATTEMPTS)
                if len(self._recent) > self._capacity:
                    self._median.pop(self._recent.popitem(last=False)[0], None)
            else:
                self._recent.move_to_end(target)
            recent.append(seconds)
            self._median[target] = sorted(recent)[len(recent) // 2]

    def known(self, target: str) -> bool:
        return target in self._median

    def clear(self) -> None:
        with self._lock:
            self._recent.clear()
            self._median.clear()

    def short(self, target: str) -> float | None:
        """What ``target`` takes, if that is short; None if not, or never seen."""
        seconds = self._median.get(target)
        return seconds if seconds is not None and seconds <= SHORT_STEP_SECONDS else None


STEP_TIMES = StepTimes()  # this process's


def timed_as(target: str, base_dir: str | None) -> str:
    """What a python function's time is known by: the function and the folder its workflow
    imports from (two workflows' ``steps:work`` need not be the same function)."""
    return f"{target} {base_dir or ''}"


def plan(step_ids: Sequence[str], deps: Mapping[str, Sequence[str]]) -> tuple[list[str], list[tuple[int, ...]]]:
    """A group's task: what it is given (the dependencies outside the group, in order of first
    need) and, for each step, where each of its dependencies comes from, in the order of
    ``deps[step]``: ``i >= 0`` is the outcome of the group's ``i``-th step, ``~i`` (negative)
    the task's ``i``-th argument. Every dependency inside the group comes before its step."""
    position = {step_id: i for i, step_id in enumerate(step_ids)}
    given: dict[str, int] = {}
    sources: list[tuple[int, ...]] = []
    for i, step_id in enumerate(step_ids):
        source = []
        for dep in deps[step_id]:
            at = position.get(dep)
            if at is not None:
                if at >= i:
                    raise ValueError(f"step {step_id!r} comes before {dep!r}, which it needs")
                source.append(at)
            else:
                source.append(~given.setdefault(dep, len(given)))
        sources.append(tuple(source))
    return list(given), sources


@dataclass
class HeldSteps:
    """Steps of functions whose time is not known yet: the probes in flight, the steps that
    wait for them (in the order they came: each after what it needs), and whether they may go
    now. Decides only; the driver sends."""

    probe: int  # steps of a function sent alone while its time is not known
    probing: dict[str, int] = field(default_factory=dict)  # function -> its probes in flight
    probes: dict[int, str] = field(default_factory=dict)  # token -> the function it probes
    held: dict[int, SubmitStep] = field(default_factory=dict)  # token -> its submission, in order
    held_ids: set[str] = field(default_factory=set)
    due: bool = False  # a probe ended: what is held may go now (:meth:`take`)

    def waits_for_held(self, action: SubmitStep, deps: Sequence[str]) -> bool:
        """Whether ``action`` needs a step that is held: then it is held too."""
        if self.held_ids and any(dep in self.held_ids for dep in deps):
            self._hold(action)
            return True
        return False

    def probes_or_holds(self, action: SubmitStep, target: str, ready: bool) -> bool:
        """``action``'s function's time is not known: whether it is held (True) until a probe of
        the function ends. A step that can run now (``ready``: its dependencies succeeded)
        goes alone as a probe while there are fewer than :attr:`probe`; the others wait while a
        probe of it runs (a probe can run: it ends), and go as before when none does."""
        probing = self.probing.get(target, 0)
        if ready and probing < self.probe:
            self.probing[target] = probing + 1
            self.probes[action.token] = target
            return False
        if probing:
            self._hold(action)
            return True
        return False

    def ended(self, token: int) -> None:
        """An attempt ended (or was stopped, or will not run). A probe's end frees its place:
        its function's time is known now, or another probe may go."""
        target = self.probes.pop(token, None)
        if target is not None:
            self.probing[target] -= 1
            self.due = bool(self.held)
        elif self.held.pop(token, None) is not None:  # a held step stopped: it never goes
            self.held_ids = {a.step_id for a in self.held.values()}

    def take(self) -> list[Action]:
        """Everything held, in order, to be decided again (what must still wait is held again)."""
        actions: list[Action] = list(self.held.values())
        self.held.clear()
        self.held_ids.clear()
        self.due = False
        return actions

    def _hold(self, action: SubmitStep) -> None:
        self.held[action.token] = action
        self.held_ids.add(action.step_id)
