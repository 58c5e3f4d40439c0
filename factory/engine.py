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
import json
import os
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import ray
from ray.exceptions import NodeDiedError, RayError, TaskCancelledError, WorkerCrashedError

from factory.cache import ResultCache
from factory.callables import import_callable
from factory.costs import price_table
from factory.dag import Graph, build_graph
from factory.errors import LeaseLostError, RunStateError
from factory.lease import LeaseKeeper
from factory.outcome import Outcome
from factory.owner import new_owner_id
from factory.policy import check_python_grants, owner_namespace
from factory.runtime import CallPart, StepCall, execute_part, execute_step
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
        self._token_refs: dict[int, Any] = {}
        self._submitted_at: dict[int, float] = {}
        self._cache_keys: dict[int, str] = {}  # token -> cache key its output is stored under
        self._code: dict[str, str] = {}  # python target -> source, for cache keys
        self._shared: dict[str, Any] = {}  # step id -> its calls' common part in Ray's object store
        self._options_of: dict[str, dict[str, Any]] = {}
        self._start_actions: list[Action] = []  # what start() decided, carried out by execute()
        self._decided: set[str] = set()  # approval gates whose decision the scheduler was given

    # -- carrying out the scheduler's actions ----------------------------------------------------

    def _flush(self) -> None:
        changes = self.scheduler.take_changes()
        if changes:
            self.store.record(changes, owner=self.owner)

    def _apply(self, actions: list[Action]) -> None:
        queue = deque(actions)
        while queue:
            action = queue.popleft()
            if isinstance(action, SubmitStep):
                step = self._steps[action.step_id]
                deps = [self._refs[d] for d in self.graph.deps[step.id]]
                call = self._call(step, self._arguments(step), False)
                state = self.scheduler.states[step.id]  # this attempt's number (step_context().attempt)
                call.attempt = state.attempts + (state.status != StepStatus.RUNNING)  # counted when it runs
                ref = self.backend.submit_step(call, deps, self._options(step))
                self._refs[step.id] = ref
                self._track(ref, action.token)
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
                ref = self._token_refs.pop(action.token, None)
                self._submitted_at.pop(action.token, None)
                self._cache_keys.pop(action.token, None)
                if ref is not None:
                    self._inflight.pop(ref, None)
                    self.backend.stop(ref)

    def _track(self, ref: Any, token: int) -> None:
        self._inflight[ref] = token
        self._token_refs[token] = ref
        self._submitted_at[token] = time.monotonic()

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
            ref = self.backend.submit_part(shared, part, self._options(step))
        self._track(ref, action.token)
        return []

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
        token = self._inflight.pop(ref, None)
        if token is None:
            return
        self._token_refs.pop(token, None)
        started = self._submitted_at.pop(token, time.monotonic())
        key = self._cache_keys.pop(token, None)
        attempt = self.scheduler.tokens.get(token)
        node_lost = False
        if isinstance(result, Outcome):
            outcome = result
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
        ready = self.backend.wait(list(self._inflight), timeout)
        if ready:
            for ref, result in zip(ready, self.backend.get_many(ready), strict=True):
                self._collect(ref, result)

    def _stop_all(self) -> None:
        for ref in list(self._inflight):
            self.backend.stop(ref)
        self._inflight.clear()
        self._token_refs.clear()

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
