"""The coordinator: runs one workflow run on Ray, durably.

It is a thin driver around :class:`factory.scheduler.RunScheduler`, which holds the run's state
and makes every decision (what to submit, retry, skip, stop; what to record). The driver
carries the decisions out: attempts go to Ray through a :class:`RayBackend` (a small seam,
the way an HTTP client talks to a transport), state changes go to the store in batches (one
transaction each: state, events and finished for_each items together), and it keeps the
run's lease so that a second coordinator cannot take the run over while this one lives.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import os
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import ray
from ray.exceptions import NodeDiedError, RayError, TaskCancelledError, WorkerCrashedError

from factory.batches import ItemBatcher
from factory.cache import ResultCache
from factory.callables import import_callable
from factory.chains import MAX_CHAIN_STEPS, NOT_RUN, ChainBook, Waiting
from factory.costs import price_table
from factory.dag import Graph, build_graph
from factory.errors import LeaseLostError, RunStateError
from factory.groups import (
    GROUP_BUDGET_SECONDS,
    GROUP_TASK_SECONDS,
    MAX_GROUP_STEPS,
    STEP_TIMES,
    HeldSteps,
    StepTimes,
    plan,
    timed_as,
)
from factory.lease import LeaseKeeper
from factory.outcome import Outcome
from factory.owner import new_owner_id
from factory.policy import check_python_grants, owner_namespace
from factory.runtime import (
    CallPart,
    StepCall,
    execute_chain,
    execute_group,
    execute_part,
    execute_parts,
    execute_step,
)
from factory.scheduler import (
    ITEM_PROGRESS_SECONDS,
    MAX_NODE_LOSSES,
    Action,
    ProposeDecision,
    Publish,
    RunScheduler,
    Stop,
    SubmitCall,
    SubmitStep,
)
from factory.settings import Settings, container_settings
from factory.spec import Step, Workflow
from factory.stepagents import StepAgents
from factory.store import RunGrants, RunStatus, StepStatus, Store

__all__ = [
    "ITEM_PROGRESS_SECONDS",
    "MAX_NODE_LOSSES",
    "AgentDispatcher",
    "Coordinator",
    "Progress",
    "RayBackend",
    "RunResult",
    "new_run_id",
]

CANCEL_POLL_SECONDS = 0.25
MAX_WAIT_SECONDS = 0.1


class AgentDispatcher(Protocol):
    """Sends an agent or route step's task to an agent pool (factory.pools implements it)."""

    def submit(self, step: Step, task: dict[str, Any], route_text: str | None = None) -> Any:
        """Start the task; return an ObjectRef that resolves to a runtime.Outcome.

        ``route_text`` is a route step's text with its ``${...}`` resolved (for this item of a for_each).
        """

    def step_agents(self) -> StepAgents | None:
        """The run's agents as its python steps reach them (``step_context().ask``), or None."""


class RayBackend:
    """The driver's seam to Ray: submit an attempt, put a value, wait, stop. Tests of the
    driver's logic may pass another implementation to :class:`Coordinator`."""

    def submit_step(self, call: StepCall, deps: list[Any], options: dict[str, Any]) -> Any:
        task = execute_step.options(**options) if options else execute_step  # .options() costs, even empty
        return task.remote(call, *deps)

    def share(self, call: StepCall) -> Any:
        """Keep the common part of a step's calls once (see :meth:`submit_part`)."""
        return ray.put(call)

    def submit_part(self, shared: Any, part: CallPart, options: dict[str, Any]) -> Any:
        """A call made of a shared StepCall (from :meth:`share`) and what is its own: the many
        items of a for_each cost one pickled StepCall, not one each."""
        task = execute_part.options(**options) if options else execute_part
        return task.remote([shared], part)

    def submit_parts(self, shared: Any, parts: list[CallPart], options: dict[str, Any]) -> Any:
        """Several calls of one step in one task (runtime.execute_parts): a stream of their
        outcomes in order, taken like a chain's (:meth:`next_result`)."""
        task = execute_parts.options(**options) if options else execute_parts
        return task.remote([shared], parts)

    def parallelism(self) -> int:
        """The CPUs of the cluster, as Ray counts them now."""
        return max(1, int(ray.cluster_resources().get("CPU", 1)))  # type: ignore[no-untyped-call]

    def submit_chain(self, calls: list[StepCall], deps: list[Any], options: dict[str, Any]) -> Any:
        """Steps that follow one another, in one task (runtime.execute_chain): a stream of their
        outcomes in order, waited for like a ref; :meth:`next_result` takes each one."""
        task = execute_chain.options(**options) if options else execute_chain
        return task.remote(calls, *deps)

    def submit_group(self, calls: list[StepCall], sources: list[tuple[int, ...]], deps: list[Any]) -> Any:
        """Short steps of a DAG with joins, in one task (runtime.execute_group; factory.groups):
        a stream of their outcomes in order, taken like a chain's; it may end before its last."""
        return execute_group.remote(calls, sources, GROUP_BUDGET_SECONDS, *deps)

    def next_result(self, stream: Any) -> tuple[Any, Outcome | RayError] | None:
        """A ready stream's next outcome with the ref that holds it (what dependants are given);
        None once the stream has ended."""
        try:
            ref = next(stream)
        except StopIteration:
            return None
        try:
            return ref, ray.get(ref)
        except RayError as exc:
            return ref, exc

    def get_many(self, refs: list[Any]) -> list[Outcome | RayError]:
        """The outcomes of ready refs in one call; one by one when one of them failed."""
        try:
            outcomes: list[Outcome] = ray.get(refs)
            return list(outcomes)
        except RayError:
            results: list[Outcome | RayError] = []
            for ref in refs:
                try:
                    results.append(ray.get(ref))
                except RayError as exc:
                    results.append(exc)
            return results

    def put(self, outcome: Outcome) -> Any:
        return ray.put(outcome)

    def wait(self, refs: list[Any], timeout: float) -> list[Any]:
        """The refs that are ready within ``timeout`` (at least one, unless none is)."""
        ready, rest = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return list(ready)

    def stop(self, ref: Any) -> None:
        """Stop an attempt in flight: kill its worker (a task), or cancel the call (an actor task,
        e.g. an agent step, whose replica must not be killed with it)."""
        try:
            ray.cancel(ref, force=True)
        except ValueError:  # "force=True is not supported for actor tasks"
            ray.cancel(ref)


class _Queue(deque[Action]):
    """The actions a driver carries out, in order, and (with ``chains``) its steps' submissions by
    step: a chain takes the submissions of its next steps wherever they are in the queue."""

    def __init__(self, actions: list[Action], chains: bool) -> None:
        super().__init__(actions)
        self._chains = chains
        self._submits: dict[str, SubmitStep] = {}  # step id -> its first submission still queued
        self._taken: set[int] = set()  # id() of submissions that went out in a chain
        # short steps that go at once, as counted by the first of their groups, and the size of each
        self.share_left = 0
        self.share = 1
        if chains:
            self._index(actions)

    def _index(self, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, SubmitStep):
                self._submits.setdefault(action.step_id, action)

    def extend(self, actions: Iterable[Action]) -> None:
        actions = list(actions)
        super().extend(actions)
        if self._chains:
            self._index(actions)

    def take_submit(self, step_id: str) -> SubmitStep | None:
        """The submission of ``step_id`` still queued, taken out of its turn (None: none is)."""
        action = self._submits.pop(step_id, None) if self._chains else None
        if action is not None:
            self._taken.add(id(action))
        return action

    def taken(self, action: SubmitStep) -> bool:
        """Whether ``action`` (still queued) went out in a chain already."""
        return id(action) in self._taken

    def went_out(self, action: SubmitStep) -> bool:
        """Whether ``action`` (just popped) went out in a chain already; else it goes now."""
        if id(action) in self._taken:
            self._taken.discard(id(action))
            return True
        if self._submits.get(action.step_id) is action:
            del self._submits[action.step_id]
        return False


@dataclass
class RunResult:
    """What a finished (or stopped) run produced."""

    run_id: str
    status: RunStatus
    outputs: dict[str, Any]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == RunStatus.SUCCEEDED

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "status": self.status.value, "outputs": self.outputs, "error": self.error}


@dataclass
class Progress:
    """Counts shown by a progress bar."""

    total: int
    succeeded: int = 0
    running: int = 0
    retrying: int = 0
    failed: int = 0
    skipped: int = 0
    cancelled: int = 0
    waiting: int = 0  # approval gates waiting for a decision
    items_done: int = 0
    items_total: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.skipped + self.cancelled


def _current_dir() -> str | None:
    """The process's working directory, or None when it is gone (a Ray job's removed working_dir)."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        return None


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _owner_id() -> str:
    """host, pid, nonce, process start time, boot id, pid namespace: see factory.owner."""
    return str(new_owner_id())


def _describe_ray_error(exc: BaseException, step: Step, elapsed: float) -> str:
    if isinstance(exc, WorkerCrashedError) or "worker died" in str(exc).lower():
        if step.timeout and elapsed >= step.timeout:
            return (
                f"the attempt did not stop at its timeout of {step.timeout:g}s "
                "(stuck outside Python) and its worker process was killed"
            )
        return "the worker process running the attempt died (killed, out of memory, or crashed)"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class Coordinator:
    """Drives one run to a final state. Use :func:`factory.api.run` / :func:`factory.api.resume`."""

    def __init__(
        self,
        store: Store,
        workflow: Workflow,
        run_id: str,
        inputs: dict[str, Any],
        settings: Settings,
        on_progress: Callable[[Progress], None] | None = None,
        graph: Graph | None = None,
        agent_dispatcher: AgentDispatcher | None = None,
        cache: ResultCache | None = None,
        grants: RunGrants | None = None,
        backend: RayBackend | None = None,
        step_times: StepTimes | None = None,
    ) -> None:
        self.store = store
        self.grants = grants  # what the run may use (runs submitted over the API); None: started here
        self.workflow = workflow
        self.run_id = run_id
        self.inputs = inputs
        self.settings = settings
        self._container_settings = container_settings(settings)
        self.on_progress = on_progress
        self.graph = graph or build_graph(workflow)
        self.agent_dispatcher = agent_dispatcher
        self._step_agents = agent_dispatcher.step_agents() if agent_dispatcher is not None else None
        self.cache: ResultCache = cache or store
        self.backend = backend or RayBackend()
        self.step_times = step_times if step_times is not None else STEP_TIMES  # what python steps took
        self.owner = _owner_id()
        self._lease = LeaseKeeper(store, run_id, self.owner, settings.heartbeat_seconds)
        # a run submitted over the API imports only from its workflow's folder and installed packages
        here = _current_dir() if grants is None else None
        self.search_path = tuple(p for p in (workflow.base_dir, here) if p)
        self.scheduler = RunScheduler(
            workflow,
            self.graph,
            run_id,
            inputs,
            max_output_bytes=settings.max_output_bytes,
            max_for_each_items=settings.max_for_each_items,
            rng=random.Random(),
            prices=price_table(settings.model_prices),
        )
        self._steps = {s.id: s for s in workflow.steps}
        self._refs: dict[str, Any] = {}  # step id -> the result its dependants receive
        self._inflight: dict[Any, int] = {}  # ref -> scheduler token
        # Refs worth waiting for: those whose dependencies' attempts were collected. A step submitted
        # ahead of its dependencies cannot finish before them, and ray.wait costs as many refs as it is
        # given: a chain of 500 submitted at once would be 500 refs a turn instead of one.
        self._waitable: dict[Any, None] = {}
        self._blocked: dict[Any, set[Any]] = {}  # ref -> its dependencies' refs still in flight
        self._dependants: dict[Any, list[Any]] = {}  # ref in flight -> refs blocked on it
        self._token_refs: dict[int, Any] = {}
        self._submitted_at: dict[int, float] = {}
        self._cache_keys: dict[int, str] = {}  # token -> cache key its output is stored under
        self._code: dict[str, str] = {}  # python target -> source, for cache keys
        self._shared: dict[str, Any] = {}  # step id -> its calls' common part in Ray's object store
        self._options_of: dict[str, dict[str, Any]] = {}
        self._start_actions: list[Action] = []  # what start() decided, carried out by execute()
        self._decided: set[str] = set()  # approval gates whose decision the scheduler was given
        self._agent_steps_sent: set[str] = set()  # agent and route steps with a task sent to a pool
        self._book = ChainBook()  # chains in flight (one task each), and submissions waiting for their steps
        self._given: dict[Any, dict[str, Any]] = {}  # group in flight -> step id -> the result its steps had
        self._cpus: int | None = None  # the cluster's, once a group is made
        self._held: HeldSteps | None = None  # steps waiting for their function's time (made when needed)
        self._not_run_ref: Any = None  # NOT_RUN in Ray's object store, once needed (see _not_run_result)
        self._items: ItemBatcher | None = None  # short for_each items, several per task (made when needed)

    # -- carrying out the scheduler's actions ----------------------------------------------------

    def _flush(self) -> None:
        changes = self.scheduler.take_changes()
        if changes:
            self.store.record(changes, owner=self.owner)

    def _apply(self, actions: list[Action]) -> None:
        queue: _Queue = _Queue(actions, self.settings.fuse_chains)
        while queue:
            action = queue.popleft()
            if isinstance(action, SubmitStep):
                if queue.went_out(action):  # already submitted in a chain
                    continue
                if self._held is not None and self._held.waits_for_held(action, self.graph.deps[action.step_id]):
                    continue  # it needs a step that waits for its function's time to be known
                chain = [action]
                while len(chain) < MAX_CHAIN_STEPS:
                    after = self._successor(chain[-1].step_id)
                    follow = queue.take_submit(after) if after is not None else None
                    if follow is None:
                        break
                    chain.append(follow)
                if len(chain) == 1 and self.settings.fuse_chains:
                    group = self._group_from(action, queue)
                    if len(group) > 1:
                        queue.extend(self._submit_steps(group, group=True))
                        continue
                    if self._probes_or_holds(action):
                        continue
                queue.extend(self._submit_steps(chain))
            elif isinstance(action, SubmitCall):
                queue.extend(self._submit_call(action))
            elif isinstance(action, Publish):
                self._refs[action.step_id] = self.backend.put(Outcome(ok=True, output_json=action.output_json))
            elif isinstance(action, ProposeDecision):
                # a gate's timeout: recorded unless a person decided first; the decision that stands goes on
                standing, _ = self.store.decide_approval(action.decision)
                self._decided.add(standing.step_id)
                queue.extend(self.scheduler.on_decision(standing, time.monotonic()))
            elif isinstance(action, Stop):
                if self._held is not None:
                    self._held.ended(action.token)
                ref = self._token_refs.pop(action.token, None)
                self._submitted_at.pop(action.token, None)
                self._cache_keys.pop(action.token, None)
                if ref is None and self._items is not None:
                    self._items.drop(action.token)  # a held item: it never goes
                elif self._items is not None and ref in self._items.batches:
                    self._stop_in_batch(ref, action.token)
                elif ref is not None and ref in self._book.chains:
                    if self._book.chains[ref].group and self._book.chains[ref].tokens[0] == action.token:
                        self.backend.stop(ref)  # the step it runs: the task stops, the steps left that count go alone
                        queue.extend(self._not_run(*self._left_alone(ref)))
                    elif self._book.chains[ref].tokens[0] == action.token:  # the step it runs: the task stops
                        tokens, dropped = self._end_chain(ref)
                        queue.extend(self._not_run(tokens[1:], dropped))  # the steps after it never ran
                        self.backend.stop(ref)
                    # else a step it has not reached: its outcome, if it comes, is for a forgotten token
                elif ref is not None:
                    self._untrack(ref)
                    self.backend.stop(ref)
        self._send_items()

    def _stop_in_batch(self, stream: Any, token: int) -> None:
        """An item of a task of several is stopped; the task stops once all its items left are."""
        assert self._items is not None
        batch = self._items.batches[stream]
        batch.stopped.add(token)
        if batch.all_stopped():
            self._end_batch(stream)  # none to hold again
            self.backend.stop(stream)

    def _runs_next(self, stream: Any, token: int) -> None:
        """A task of several steps or items goes on: ``token``'s attempt starts as the one before ends."""
        self._inflight[stream] = token
        self._submitted_at[token] = time.monotonic()

    def _forget(self, tokens: Iterable[int]) -> None:
        """Attempts no longer in the task they were sent in (it ended, or they go again)."""
        for token in tokens:
            self._token_refs.pop(token, None)
            self._submitted_at.pop(token, None)

    def _successor(self, before: str) -> str | None:
        """The step that may run in the same task as ``before``, right after it: it needs
        ``before``'s result only, nothing else needs that result, and both are python steps that
        ask Ray for nothing in particular (no resources: any worker will do)."""
        dependants = self.graph.dependants.get(before)
        if not dependants or len(dependants) > 1:
            return None
        after = dependants[0]
        if self.graph.deps[after] == [before] and self._chainable(before) and self._chainable(after):
            return after
        return None

    def _chainable(self, step_id: str) -> bool:
        step = self._steps[step_id]
        return step.python is not None and not self._options(step)

    def _short(self, step_id: str) -> float | None:
        """What the step's function took last, if it may go in a group (factory.groups): a
        python step that asks Ray for nothing in particular, whose function was short."""
        timed = self._timed(step_id)
        return self.step_times.short(timed) if timed is not None else None

    def _timed(self, step_id: str) -> str | None:
        """What the step's function's time is known by (factory.groups.timed_as), if the step
        may go in a group or probe its function: a python step asking Ray for nothing."""
        step = self._steps[step_id]
        if step.python is None or self._options(step):
            return None
        return timed_as(step.python, self.workflow.base_dir)

    def _group_from(self, first: SubmitStep, queue: _Queue) -> list[SubmitStep]:
        """``first`` and the submissions right after it in the queue, while their steps are
        short and the group takes about GROUP_TASK_SECONDS at most. The queue is in an order
        where each step comes after what it needs, so groups cut from it never wait for one
        another in a circle."""
        seconds = self._short(first.step_id)
        if seconds is None:
            return [first]
        if queue.share_left <= 0:  # the first group of short steps that go at once: their share
            cpus = self._parallelism()
            ahead = 1  # (looked for as far as every CPU's full group)
            for follow in itertools.islice(queue, cpus * MAX_GROUP_STEPS - 1):
                if not isinstance(follow, SubmitStep) or self._short(follow.step_id) is None:
                    break
                ahead += 1
            queue.share_left, queue.share = ahead, min(MAX_GROUP_STEPS, -(-ahead // cpus))
        most = queue.share
        group, left = [first], GROUP_TASK_SECONDS - seconds
        while queue and len(group) < most:
            follow = queue[0]
            if not isinstance(follow, SubmitStep):
                break
            held = self._held.held_ids if self._held is not None else ()
            if held and any(dep in held for dep in self.graph.deps[follow.step_id]):
                break  # it needs a step that waits
            if not queue.taken(follow):
                seconds = self._short(follow.step_id)
                if seconds is None or seconds > left:
                    break
                group.append(follow)
                left -= seconds
            queue.popleft()
            queue.went_out(follow)
        queue.share_left -= len(group)
        return group

    def _parallelism(self) -> int:
        if self._cpus is None:
            self._cpus = self.backend.parallelism()
        return self._cpus

    def _probes_or_holds(self, action: SubmitStep) -> bool:
        """A python step whose function's time is not known goes alone as a probe (False), or
        waits for a probe of it to end (True): then it may go in a group (factory.groups)."""
        timed = self._timed(action.step_id)
        if timed is None or self.step_times.known(timed):
            return False
        if self._held is None:
            self._held = HeldSteps(probe=2 * self._parallelism())
        ready = self.scheduler.step_status(action.step_id) == StepStatus.RUNNING  # its dependencies succeeded
        return self._held.probes_or_holds(action, timed, ready)

    def _release_held(self) -> list[Action]:
        """Held steps, to be decided again now that a probe ended; those whose attempt no longer
        counts (a dependency failed meanwhile) are told they did not run, and never go."""
        assert self._held is not None
        actions: list[Action] = []
        now = time.monotonic()
        for action in self._held.take():
            assert isinstance(action, SubmitStep)
            if self.scheduler.current(action.token):
                actions.append(action)
            else:
                actions += self.scheduler.on_result(action.token, NOT_RUN, now)
        return actions

    def _not_run_result(self) -> Any:
        """The result a step that did not run gives its dependants (a group given it goes, and
        its steps that needed it say so without running)."""
        if self._not_run_ref is None:
            self._not_run_ref = self.backend.put(NOT_RUN)
        return self._not_run_ref

    def _step_call(self, action: SubmitStep) -> StepCall:
        step = self._steps[action.step_id]
        call = self._call(step, self._arguments(step), False)
        state = self.scheduler.states[step.id]  # this attempt's number (step_context().attempt)
        call.attempt = state.attempts + (state.status != StepStatus.RUNNING)  # counted when it runs
        return call

    def _submit_steps(self, actions: list[SubmitStep], group: bool = False) -> list[Action]:
        """One step's attempt as a task; a chain of steps (each the only dependant of the one
        before) as one task whose outcomes stream back one by one (RayBackend.submit_chain); or
        a group of short steps (RayBackend.submit_group). A dependency pending in a chain or
        group that has not reported it: they go once it has."""
        if group:
            dep_ids, _ = plan([a.step_id for a in actions], self.graph.deps)
        else:
            dep_ids = self.graph.deps[actions[0].step_id]
        deps: dict[str, Any] = {}
        for dep_id in dep_ids:
            pending = self._book.pending(dep_id)
            deps[dep_id] = None if pending else self._refs.get(dep_id)
            if deps[dep_id] is None and not pending:  # its chain stopped before it
                if not group:
                    return self._not_run([a.token for a in actions], [])
                deps[dep_id] = self._not_run_result()  # its steps that need it say so
        if any(ref is None for ref in deps.values()):
            self._book.wait(actions, deps, group)
            return []
        self._send(actions, list(deps.values()), group)
        return []

    def _send(
        self, actions: list[SubmitStep], deps: list[Any], group: bool = False, claimed: set[str] | None = None
    ) -> None:
        """``deps``: the results the task is given (of the dependencies outside it, in order).
        ``claimed``: a group's steps whose attempts count (when not all do): only their results
        are the group's to give (the others may have a newer submission in flight)."""
        first = self._steps[actions[0].step_id]
        calls = [self._step_call(action) for action in actions]
        if len(actions) == 1 and not group:
            ref = self.backend.submit_step(calls[0], deps, self._options(first))
            self._refs[first.id] = ref
            self._book.sent_alone(first.id)
            self._track(ref, actions[0].token, deps)
            return
        if group:
            given, sources = plan([a.step_id for a in actions], self.graph.deps)
            stream = self.backend.submit_group(calls, sources, deps)
        else:
            given = self.graph.deps[first.id]
            stream = self.backend.submit_chain(calls, deps, self._options(first))
        self._given[stream] = dict(zip(given, deps, strict=True))
        self._track(stream, actions[0].token, deps)
        for action in actions:
            if claimed is None or action.step_id in claimed:
                self._refs.pop(action.step_id, None)  # each result is known as it comes back
            self._token_refs[action.token] = stream
        self._book.add(stream, actions, group, claimed)

    def _send_waiting(self, waiting: list[Waiting]) -> None:
        """Waiting submissions whose dependencies are all known go; then those waiting for them.
        Those none of whose attempts counts any more do not (nor what waited for them)."""
        stale = self._settle(waiting, [])
        if stale:
            self._apply(self._tell_not_run(stale))

    def _settle(self, ready: list[Waiting], never: list[Waiting]) -> list[int]:
        """Waiting submissions: those in ``ready`` go, and then those that waited for them; those
        in ``never`` will not go, nor will those that waited for them (but groups, which go given
        that the step did not run). A submission none of whose attempts counts any more does
        not go either, and a group goes with its steps that count only. Returns the tokens of
        the attempts that will not run."""
        go, stop = deque(ready), deque(never)
        tokens: list[int] = []
        while go or stop:
            if go:
                each = go.popleft()
                counting = {a.step_id for a in each.actions if self.scheduler.current(a.token)}
                if counting:
                    claimed = counting if each.group and len(counting) < len(each.actions) else None
                    self._send(each.actions, list(each.deps.values()), each.group, claimed)
                    not_run = self._not_run_result() if claimed is not None else None  # (only then needed)
                    more, gone = self._book.went(each, self._refs, not_run, claimed)
                    go.extend(more)
                    stop.extend(gone)
                    continue
                stop.append(each)
                continue
            each = stop.popleft()
            tokens += [a.token for a in each.actions]
            more, gone = self._book.dropped(each, self._not_run_result())
            go.extend(more)
            stop.extend(gone)
        return tokens

    def _tell_not_run(self, tokens: list[int]) -> list[Action]:
        """The scheduler is told these attempts did not run (as a task given a failed result
        would say); the actions it decides."""
        actions: list[Action] = []
        now = time.monotonic()
        for token in tokens:
            if self._held is not None:
                self._held.ended(token)
            actions += self.scheduler.on_result(token, NOT_RUN, now)
        return actions

    def _take_from_chain(self, stream: Any) -> None:
        """The next outcome of a chain or group in flight: the step it is for is decided. A
        chain stops at its first step that did not succeed, and the steps after it never ran;
        a group goes on (its steps that needed that one say so). A task that died (a RayError:
        its worker or node) with several steps unreported charges none of them: the outcomes of
        steps that ended just before the death can be lost on the way, so which one was running
        is not known. They go again, each as a task of its own (the same attempts): a step that
        kills its worker then dies alone, and is charged."""
        chain = self._book.chains[stream]
        taken = self.backend.next_result(stream)
        if taken is None and chain.group:  # it stopped at its budget: the steps left go alone
            self._apply(self._not_run(*self._left_alone(stream)))
            return
        if taken is None:  # it ended without a word for the step it ran (cannot happen with execute_chain)
            tokens, waiting = self._end_chain(stream)
            self._deliver(tokens[0], Outcome(ok=False, error="its task ended without its outcome", retryable=True))
            self._apply(self._not_run(tokens[1:], waiting))
            return
        ref, result = taken
        if not isinstance(result, Outcome) and (chain.group or len(chain.tokens) > 1):
            # charged only if it was the last one left (as a task of its own would be), and counts
            first = chain.tokens[0]
            charged = first if len(chain.tokens) == 1 and self.scheduler.current(first) else None
            self.backend.stop(stream)  # (an error that is not its worker's death: it must not run on)
            left = self._left_alone(stream, charged)
            if charged is not None:
                self._deliver(charged, result)
            self._apply(self._not_run(*left))
            return
        token, step_id = chain.tokens.popleft(), chain.step_ids.popleft()
        self._token_refs.pop(token, None)
        ok = isinstance(result, Outcome) and result.ok
        if ok and self._book.pending_in.get(step_id) is stream:  # (not if the step went again since)
            self._refs[step_id] = ref
        settled, dropped = self._book.reported(stream, step_id, ref, ok)
        if chain.group:
            self._given[stream][step_id] = ref
        else:  # the next step of a chain needs only this one's result
            self._given[stream] = {step_id: ref}
        rest: list[int] = []
        if chain.tokens and (ok or chain.group):
            self._runs_next(stream, chain.tokens[0])
        else:
            rest, ended = self._end_chain(stream)
            dropped += ended
        self._send_waiting(settled)  # its dependants outside the chain go, as on Ray they would have
        self._deliver(token, result)  # first: the scheduler then knows the attempts after it are stale
        self._apply(self._not_run(rest, dropped))

    def _left_alone(self, stream: Any, charged: int | None = None) -> tuple[list[int], list[Waiting]]:
        """A chain or group that stopped before its end (a group's budget or Stop, its worker's
        death): its unreported steps whose attempts still count go again in order, a task
        each, as the attempts they were, given what they had (or the new result of a step
        before them that goes again); but ``charged``, whose outcome the caller delivers.
        Returns the tokens of the others (they will not run) and the submissions that will not
        go with them, for :meth:`_not_run` once ``charged``'s outcome is delivered."""
        chain = self._book.chains.pop(stream)
        given = self._given.pop(stream)  # each step is given again what it had (or its step's new result)
        self._untrack(stream)
        self._forget(token for token in chain.tokens if token != charged)
        if charged is not None:
            self._token_refs.pop(charged, None)  # (its start stays: what Ray said is told with its time)
        gone: list[int] = []
        dropped: list[Waiting] = []
        for token, step_id in zip(chain.tokens, chain.step_ids, strict=True):
            if token != charged and self.scheduler.current(token):
                self._send([SubmitStep(token, step_id)], [given[d] for d in self.graph.deps[step_id]])
                given[step_id] = self._refs[step_id]
                ready, never = self._book.reported(stream, step_id, given[step_id])
            else:
                if token != charged:
                    gone.append(token)
                given[step_id] = self._not_run_result()
                ready, never = self._book.reported(stream, step_id, given[step_id], ok=False)
            self._send_waiting(ready)
            dropped += never
        return gone, dropped

    def _end_chain(self, stream: Any) -> tuple[list[int], list[Waiting]]:
        """Forget a chain or group that stopped: the tokens of its steps that did not report, in
        order, and the submissions that waited for one of them and will not go (groups that
        waited for one go now, given that it did not run)."""
        not_run = self._not_run_result() if self._book.chains[stream].step_ids else None
        self._given.pop(stream, None)
        tokens, ready, dropped = self._book.end(stream, not_run)
        self._untrack(stream)
        self._forget(tokens)
        self._send_waiting(ready)
        return tokens, dropped

    def _not_run(self, tokens: list[int], dropped: list[Waiting]) -> list[Action]:
        """Attempts that will not run, for a dependency of theirs did not succeed (or its chain
        stopped before it): the scheduler is told so, as it would be by a task given that result
        (they are stale by then: the scheduler retried or failed that dependency). Groups that
        waited for one of them go, given that it did not run."""
        return self._tell_not_run([*tokens, *self._settle([], dropped)])

    def _track(self, ref: Any, token: int, deps: Sequence[Any] = ()) -> None:
        self._inflight[ref] = token
        self._token_refs[token] = ref
        self._submitted_at[token] = time.monotonic()
        pending = {dep for dep in deps if dep in self._inflight}
        if pending:
            self._blocked[ref] = pending
            for dep in pending:
                self._dependants.setdefault(dep, []).append(ref)
        else:
            self._waitable[ref] = None

    def _untrack(self, ref: Any) -> int | None:
        """Forget a ref that left flight (collected or stopped); the refs waiting on it may be waited for."""
        token = self._inflight.pop(ref, None)
        self._waitable.pop(ref, None)
        for dep in self._blocked.pop(ref, ()):
            dependants = self._dependants.get(dep)
            if dependants is not None and ref in dependants:
                dependants.remove(ref)
        for dependant in self._dependants.pop(ref, ()):
            pending = self._blocked.get(dependant)
            if pending is None:
                continue
            pending.discard(ref)
            if not pending:
                del self._blocked[dependant]
                self._waitable[dependant] = None
        return token

    def _submit_call(self, action: SubmitCall) -> list[Action]:
        step = self._steps[action.step_id]
        if action.cacheable:
            try:
                key = self._cache_key(step, action.arguments)
                cached = self.cache.cache_get(key)
            except Exception as exc:  # noqa: BLE001 - the step's code cannot be read or may not run
                failed = Outcome(
                    ok=False, error=f"the step's cache key: {type(exc).__name__}: {exc}", error_type=type(exc).__name__
                )
                return self.scheduler.on_result(action.token, failed, time.monotonic())
            if cached is not None:
                outcome = Outcome(ok=True, output_json=cached, logs="(cached)", extra={"cached": True})
                return self.scheduler.on_result(action.token, outcome, time.monotonic())
            self._cache_keys[action.token] = key
        if step.kind in ("agent", "route"):
            if self.agent_dispatcher is None:
                failed = Outcome(
                    ok=False,
                    error=f"step {step.id!r} is an {step.kind} step but no agent catalogue was given to this run",
                    error_type="factory.errors.StepInputError",
                )
                return self.scheduler.on_result(action.token, failed, time.monotonic())
            if step.id not in self._agent_steps_sent:
                # the first task to a pool may wait for its replicas to start: what was decided before
                # (the run and this step running) is committed first, to be seen meanwhile
                self._agent_steps_sent.add(step.id)
                self._flush()
            with self._lease.blocking():  # the first task to a pool starts its replicas
                if step.route is None:
                    ref = self.agent_dispatcher.submit(step, action.arguments)
                else:
                    ref = self.agent_dispatcher.submit(step, action.arguments, route_text=action.route_text)
        else:
            item = self.scheduler.states[step.id].items[action.index]  # this attempt's number, the item's index
            shared = self._shared.get(step.id)
            if shared is None:
                shared = self._shared[step.id] = self.backend.share(self._call(step, {}, True))
            part = CallPart(
                arguments=action.arguments,
                item=action.item,
                has_item=action.has_item,
                attempt=item.attempts,
                item_index=action.index if action.has_item else None,
            )
            if self._batchable(step, action) and not self._batcher().take(step.id, action.token, part):
                return []  # held: it goes in a task of several, once an item's time is known
            ref = self.backend.submit_part(shared, part, self._options(step))
        self._track(ref, action.token)
        return []

    def _batchable(self, step: Step, action: SubmitCall) -> bool:
        return (
            self.settings.batch_items
            and action.has_item
            and not action.cacheable
            and step.python is not None
            and not self._options(step)
        )

    def _batcher(self) -> ItemBatcher:
        if self._items is None:
            self._items = ItemBatcher(probe=2 * self.backend.parallelism())
        return self._items

    def _send_items(self) -> None:
        """Held items whose step's item time is known go, several per task (or one each)."""
        if self._items is None or not self._items.held:
            return
        for step_id, items in self._items.ready():
            step = self._steps[step_id]
            shared = self._shared[step_id]
            if len(items) == 1:
                token, part = items[0]
                self._track(self.backend.submit_part(shared, part, self._options(step)), token)
                continue
            stream = self.backend.submit_parts(shared, [part for _, part in items], self._options(step))
            self._track(stream, items[0][0])
            for token, _ in items:
                self._token_refs[token] = stream
                self._submitted_at[token] = time.monotonic()
            self._items.add(stream, step_id, items)

    def _take_from_batch(self, stream: Any) -> None:
        """The next outcome of a task of several items. A task that died (a RayError: its worker
        or node) with several items unreported charges none of them (as for a chain: the outcomes
        of items that ended just before can be lost on the way): they go again, each in a task
        of its own (the same attempts), and so do the step's later items."""
        assert self._items is not None
        batch = self._items.batches[stream]
        taken = self.backend.next_result(stream)
        if taken is None:  # ended without a word for the item it ran (cannot happen with execute_parts)
            result: Outcome | RayError = Outcome(ok=False, error="its task ended without its outcome", retryable=True)
        else:
            result = taken[1]
        if taken is not None and not isinstance(result, Outcome) and len(batch.tokens) > 1:
            self._items.size[batch.step_id] = 1  # a step whose items can kill their worker: one a task
            self._end_batch(stream)
            self._send_items()
            return
        token = batch.tokens.popleft()
        batch.parts.popleft()
        self._token_refs.pop(token, None)
        if taken is not None and isinstance(result, Outcome) and batch.tokens:
            self._runs_next(stream, batch.tokens[0])
        else:
            self._end_batch(stream)  # its items left are sent once the scheduler has this outcome
        self._deliver(token, result)

    def _end_batch(self, stream: Any) -> None:
        """Forget a task of several items that ended early: its items left that were not stopped
        are held again, to go in new tasks (the same attempts)."""
        assert self._items is not None
        batch = self._items.batches.pop(stream)
        self._untrack(stream)
        self._forget(batch.tokens)
        again = [(t, p) for t, p in zip(batch.tokens, batch.parts, strict=True) if t not in batch.stopped]
        self._items.hold_again(batch.step_id, again)

    def _call(
        self, step: Step, arguments: dict[str, Any], resolved: bool, item: Any = None, has_item: bool = False
    ) -> StepCall:
        return StepCall(
            step_id=step.id,
            target=step.python or "",
            arguments=arguments,
            resolved=resolved,
            inputs=self.inputs,
            dep_ids=tuple(self.graph.deps[step.id]),
            search_path=self.search_path,
            timeout=step.timeout,
            retry=step.retry,
            item=item,
            has_item=has_item,
            action=step.kind,
            executor=step.executor,
            home=str(self.settings.home) if step.container is not None else None,
            container_settings=self._container_settings if step.container is not None else None,
            base_dir=self.workflow.base_dir if step.container is not None else None,
            store_url=self.store.url,  # container steps' live log lines; python steps' context (once, events)
            run_id=self.run_id,
            grants=self.grants,
            max_output_bytes=self.settings.max_output_bytes,
            agents=self._step_agents if step.python is not None else None,
        )

    @staticmethod
    def _arguments(step: Step) -> dict[str, Any]:
        """What a step's attempt resolves: a container step's spec, else its `with` mapping."""
        if step.container is not None:
            return step.container.model_dump()
        return step.with_

    def _options(self, step: Step) -> dict[str, Any]:
        options = self._options_of.get(step.id)
        if options is None:
            options = self._options_of[step.id] = step.resources.ray_options()
        return options

    def _cache_key(self, step: Step, arguments: dict[str, Any]) -> str:
        """Same action, same code, same resolved inputs -> same key."""
        code = ""
        if step.python is not None:
            if step.python not in self._code:
                check_python_grants(self.grants, step.python)  # import nothing the run may not run
                try:
                    self._code[step.python] = inspect.getsource(import_callable(step.python, self.search_path))
                except (OSError, TypeError):
                    self._code[step.python] = ""
            code = self._code[step.python]
        # a run of one key never reuses (or plants) a result that another key's run stored
        namespace = owner_namespace(self.grants)
        payload = json.dumps(
            [step.kind, step.python, step.agent, code, arguments, *([namespace] if namespace else [])],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    # -- results ---------------------------------------------------------------------------------

    def _collect(self, ref: Any, result: Outcome | RayError) -> None:
        token = self._untrack(ref)
        if token is None:
            return
        self._token_refs.pop(token, None)
        self._deliver(token, result)

    def _deliver(self, token: int, result: Outcome | RayError) -> None:
        """An attempt's outcome (or what Ray raised for it) to the scheduler."""
        started = self._submitted_at.pop(token, time.monotonic())
        key = self._cache_keys.pop(token, None)
        if self._held is not None:
            self._held.ended(token)
        attempt = self.scheduler.tokens.get(token)
        if self._items is not None and attempt is not None and attempt.step_id in self._items.probed:
            self._items.learn(attempt.step_id, result.duration if isinstance(result, Outcome) else None)
        node_lost = False
        if isinstance(result, Outcome):
            outcome = result
            if attempt is not None and attempt.index is None and not outcome.skipped:
                target = self._steps[attempt.step_id].python
                if target is not None:
                    timed = timed_as(target, self.workflow.base_dir)
                    self.step_times.learn(timed, outcome.duration)  # may it go in a group
        else:
            exc = result
            step = self._steps[attempt.step_id] if attempt is not None else None
            outcome = Outcome(
                ok=False,
                error=_describe_ray_error(exc, step, time.monotonic() - started) if step else str(exc),
                retryable=not isinstance(exc, TaskCancelledError),
            )
            node_lost = isinstance(exc, NodeDiedError)
        if key is not None and outcome.ok and outcome.output_json is not None:
            self.cache.cache_put(key, outcome.output_json)
        self._apply(self.scheduler.on_result(token, outcome, time.monotonic(), node_lost=node_lost))

    def _wait(self) -> None:
        timeout = MAX_WAIT_SECONDS
        deadline = self.scheduler.next_deadline()
        if deadline is not None:
            timeout = max(0.0, min(timeout, deadline - time.monotonic()))
        if not self._inflight:
            time.sleep(timeout)
            return
        # none waitable cannot happen in a DAG; waiting for all of them then is merely slower
        ready = self.backend.wait(list(self._waitable or self._inflight), timeout)
        if ready:
            batches = self._items.batches if self._items is not None else {}
            refs = [ref for ref in ready if ref not in self._book.chains and ref not in batches]
            if refs:
                for ref, result in zip(refs, self.backend.get_many(refs), strict=True):
                    self._collect(ref, result)
            for stream in ready:
                # what a task of several has reported since the last turn, all in this turn's commit
                while stream in self._book.chains or stream in batches:
                    if stream in batches:
                        self._take_from_batch(stream)
                    else:
                        self._take_from_chain(stream)
                    if not (stream in self._book.chains or stream in batches) or not self.backend.wait([stream], 0.0):
                        break

    def _stop_all(self) -> None:
        for ref in list(self._inflight):
            self.backend.stop(ref)
        self._inflight.clear()
        self._waitable.clear()
        self._blocked.clear()
        self._dependants.clear()
        self._token_refs.clear()
        self._book.clear()
        self._given.clear()
        if self._items is not None:
            self._items.clear()
        if self._held is not None:
            self._held.take()

    # -- the loop ------------------------------------------------------------------------------

    def progress(self) -> Progress:
        counts = self.scheduler.counts()
        return Progress(
            total=counts["total"],
            succeeded=counts.get(StepStatus.SUCCEEDED.value, 0),
            running=counts.get(StepStatus.RUNNING.value, 0),
            retrying=counts.get(StepStatus.RETRYING.value, 0),
            failed=counts.get(StepStatus.FAILED.value, 0),
            skipped=counts.get(StepStatus.SKIPPED.value, 0),
            cancelled=counts.get(StepStatus.CANCELLED.value, 0),
            waiting=counts.get(StepStatus.WAITING.value, 0),
            items_done=counts["items_done"],
            items_total=counts["items_total"],
        )

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop every attempt in flight and mark the unfinished steps cancelled."""
        self._apply(self.scheduler.cancel(reason))
        self._stop_all()

    def start(self, resumed: bool = False) -> None:
        """Take the run's lease and record that it runs (a resumed run: what is committed stays done)."""
        if not self.store.claim_run(self.run_id, self.owner, self.settings.lease_seconds):
            raise RunStateError(
                f"run {self.run_id} is being run by another live process; wait for it, or `factory cancel` it first"
            )
        done = 0
        if resumed:
            done = self.scheduler.restore(self.store.get_steps(self.run_id), self.store.get_items(self.run_id))
            for used in self.store.latest_events(self.run_id, "run.usage", limit=1):
                self.scheduler.restore_usage(used.data)
            # decisions taken while it waited: known before its gates open (before a timeout applies)
            for decision in self.store.get_approvals(self.run_id):
                self._decided.add(decision.step_id)
                self.scheduler.on_decision(decision, time.monotonic())
        self._start_actions = self.scheduler.start(
            time.monotonic(), resumed=resumed, already_done=done, wall=time.time()
        )

    def execute(self) -> RunResult:
        """Run until every step is final, or until only people can move the run on (approval
        gates wait: the run is parked as ``waiting``); returns the result."""
        try:
            actions, self._start_actions = self._start_actions, []
            self._apply(actions)
            self._flush()
            while True:
                self._loop()
                if self.scheduler.parked:
                    self._poll_decisions()  # a decision may have come as the gate opened
                    self._flush()
                    if not self.scheduler.parked:
                        continue
                break
        except LeaseLostError:
            # Someone else owns the run now: stop our attempts, write nothing more.
            self._stop_all()
            self.scheduler.take_changes()
            raise
        except KeyboardInterrupt:
            self.cancel("interrupted (Ctrl-C)")
            self._flush()
            return self._finish()
        except BaseException:
            # the coordinator itself failed: stop its attempts so that a resume cannot overlap them
            self._stop_all()
            self.scheduler.take_changes()
            self.store.release_run(self.run_id, self.owner)
            raise
        finally:
            self._lease.close()
        return self._finish()

    def _loop(self) -> None:
        last_poll = last_beat = time.monotonic()
        while not self.scheduler.finished:
            self._apply(self.scheduler.on_time(time.monotonic(), time.time()))
            if self.scheduler.parked:
                if self.store.cancel_requested(self.run_id):  # asked while it was still ours
                    self.cancel("cancel requested")
                return  # only people can move the run on: stop here, hold nothing while they decide
            self._wait()
            if self._held is not None and self._held.due:  # a probe ended: its function's time is known
                self._apply(self._release_held())
            self._flush()
            now = time.monotonic()
            if now - last_poll >= CANCEL_POLL_SECONDS:
                last_poll = now
                if self.store.cancel_requested(self.run_id):
                    self.cancel("cancel requested")
                    return
                if self.scheduler.waiting_gates():
                    self._poll_decisions()
                if self.on_progress is not None:
                    self.on_progress(self.progress())
            if now - last_beat >= self.settings.heartbeat_seconds:
                last_beat = now
                if self._lease.lost or not self.store.heartbeat(self.run_id, self.owner):
                    raise LeaseLostError(f"run {self.run_id} was taken over by another coordinator; this one stops")

    def _poll_decisions(self) -> None:
        for decision in self.store.get_approvals(self.run_id):
            if decision.step_id not in self._decided:
                self._decided.add(decision.step_id)
                self._apply(self.scheduler.on_decision(decision, time.monotonic()))

    def _finish(self) -> RunResult:
        verdict = self.scheduler.finish()
        self._flush()
        self.store.release_run(self.run_id, self.owner)
        if self.on_progress is not None:
            self.on_progress(self.progress())
        return RunResult(self.run_id, verdict.status, self.scheduler.outputs(), verdict.error)
