"""The coordinator: runs one workflow run on Ray, durably.

Python steps are submitted eagerly as Ray tasks whose arguments are the
ObjectRefs of their dependencies' outcomes, so Ray pipelines a chain without a
round trip through the coordinator. The coordinator waits on everything in
flight, commits each batch of finished steps (state change and event in one
transaction), schedules retries with backoff, expands for_each steps once their
list is known, answers cancellation, and keeps a lease on the run so that a
second coordinator cannot take it over while this one lives.

When an attempt fails and will be retried, dependants that were already
submitted against it are superseded (their generation is bumped); those tasks
return at once without running user code, and the dependants are submitted
again against the retry.
"""

from __future__ import annotations

import hashlib
import heapq
import inspect
import json
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray
from ray.exceptions import NodeDiedError, RayError, TaskCancelledError, WorkerCrashedError

from factory.cache import ResultCache
from factory.callables import import_callable
from factory.dag import Graph, build_graph
from factory.errors import LeaseLostError, RunStateError, StepInputError
from factory.owner import new_owner_id
from factory.policy import check_python_grants, owner_namespace
from factory.refs import Context, resolve
from factory.retry import backoff_delay
from factory.runtime import Outcome, StepCall, execute_item, execute_step, limit_outcome
from factory.settings import Settings, container_settings
from factory.spec import Step, Workflow
from factory.store import (
    FINAL_STEP_STATUSES,
    Change,
    RunChange,
    RunGrants,
    RunStatus,
    StepChange,
    StepStatus,
    Store,
)

CANCEL_POLL_SECONDS = 0.25


class AgentDispatcher(Protocol):
    """Sends an agent or route step's task to an agent pool (factory.pools implements it)."""

    def submit(self, step: Step, task: dict[str, Any], route_text: str | None = None) -> Any:
        """Start the task; return an ObjectRef that resolves to a runtime.Outcome.

        ``route_text`` is a route step's text with its ``${...}`` resolved (for this item of a for_each).
        """


MAX_WAIT_SECONDS = 0.1
ITEM_PROGRESS_SECONDS = 0.5  # a running for_each step says how many items are done at most this often
_ACTIVE = (StepStatus.RUNNING, StepStatus.RETRYING)
# An attempt (a step's, or a for_each item's) lost with its Ray node runs again this many
# times at most, beside its retry policy: Ray's own default max_retries for system failures.
MAX_NODE_LOSSES = 3


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
    items_done: int = 0
    items_total: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.skipped + self.cancelled


@dataclass
class _ItemState:
    attempts: int = 0
    node_losses: int = 0
    output_json: str | None = None
    logs: str = ""


@dataclass
class _StepState:
    step: Step
    status: StepStatus = StepStatus.PENDING
    generation: int = 0
    submitted: bool = False
    attempts: int = 0
    ref: Any = None  # ObjectRef[Outcome] that dependants consume
    output_json: str | None = None
    items: list[_ItemState] = field(default_factory=list)
    items_left: int = 0
    cache_keys: list[str | None] = field(default_factory=list)
    started_at: float = 0.0
    progress_at: float = 0.0  # when a step.items event last told how many items are done
    progress_done: int = -1  # and what it told
    node_losses: int = 0  # attempts lost with their Ray node (MAX_NODE_LOSSES)


def _stop_attempt(ref: Any) -> None:
    """Stop an attempt in flight: kill its worker (a task), or cancel the call (an actor task,
    e.g. an agent step, whose replica must not be killed with it)."""
    try:
        ray.cancel(ref, force=True)
    except ValueError:  # "force=True is not supported for actor tasks"
        ray.cancel(ref)


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
        self.cache: ResultCache = cache or store
        self.owner = _owner_id()
        # a run submitted over the API imports only from its workflow's folder and installed packages
        here = _current_dir() if grants is None else None
        self.search_path = tuple(p for p in (workflow.base_dir, here) if p)
        self.states: dict[str, _StepState] = {s.id: _StepState(s) for s in workflow.steps}
        self.inflight: dict[Any, tuple[str, int, int | None]] = {}
        self.retry_heap: list[tuple[float, int, str, int | None, int]] = []
        self._seq = 0
        self._pending: list[Change] = []
        self._values: dict[str, Any] = {}
        self._item_calls: dict[str, tuple[list[Any], list[dict[str, Any]]]] = {}  # for_each items and their arguments
        self._rng = random.Random()
        self._cancelled = False
        self._first_error: str | None = None

    # -- helpers -------------------------------------------------------------------------------

    def _emit(self, change: Change) -> None:
        self._pending.append(change)

    def _flush(self) -> None:
        if self._pending:
            changes, self._pending = self._pending, []
            self.store.record(changes, owner=self.owner)

    def _step_change(self, state: _StepState, status: StepStatus, event: str, **kw: Any) -> None:
        state.status = status
        self._emit(StepChange(self.run_id, state.step.id, status, event, **kw))

    def _value(self, step_id: str) -> Any:
        if step_id not in self._values:
            self._values[step_id] = json.loads(self.states[step_id].output_json or "null")
        return self._values[step_id]

    def _deps_succeeded(self, step_id: str) -> bool:
        return all(self.states[d].status == StepStatus.SUCCEEDED for d in self.graph.deps[step_id])

    def _needs_values(self, step: Step) -> bool:
        return step.for_each is not None or step.cache or step.kind in ("agent", "route")

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
        )

    def _step_arguments(self, step: Step) -> dict[str, Any]:
        """What a step's attempt resolves: a container step's spec, else its `with` mapping."""
        if step.container is not None:
            return step.container.model_dump()
        return step.with_

    def _options(self, step: Step) -> dict[str, Any]:
        return step.resources.ray_options()

    def _track(self, ref: Any, step_id: str, item: int | None = None) -> None:
        self.inflight[ref] = (step_id, self.states[step_id].generation, item)

    def _context(self, step: Step, item: Any = None, has_item: bool = False) -> Context:
        outputs = {d: self._value(d) for d in self.graph.deps[step.id]}
        return Context(self.inputs, outputs, item, has_item)

    def _cache_key(self, step: Step, arguments: dict[str, Any]) -> str:
        """Same action, same code, same resolved inputs -> same key."""
        code = ""
        if step.python is not None:
            check_python_grants(self.grants, step.python)  # import nothing the run may not run
            try:
                code = inspect.getsource(import_callable(step.python, self.search_path))
            except (OSError, TypeError):
                code = ""
        # a run of one key never reuses (or plants) a result that another key's run stored
        namespace = owner_namespace(self.grants)
        payload = json.dumps(
            [step.kind, step.python, step.agent, code, arguments, *([namespace] if namespace else [])],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    # -- submission ----------------------------------------------------------------------------

    def _mark_running(self, state: _StepState) -> None:
        state.attempts += 1
        state.started_at = time.monotonic()
        self._step_change(state, StepStatus.RUNNING, "step.started", attempts=state.attempts)

    def _try_submit(self, step_id: str) -> None:
        state = self.states[step_id]
        if state.submitted or state.status in FINAL_STEP_STATUSES or state.status == StepStatus.RETRYING:
            return
        deps = self.graph.deps[step_id]
        if any(self.states[d].ref is None for d in deps):
            return
        step = state.step
        if self._needs_values(step):
            if not self._deps_succeeded(step_id):
                return
            self._submit_with_values(state)
            return
        dep_refs = [self.states[d].ref for d in deps]
        call = self._call(step, self._step_arguments(step), False)
        call.attempt = state.attempts + 1  # the number _mark_running gives it
        ref = execute_step.options(**self._options(step)).remote(call, *dep_refs)
        state.submitted = True
        state.ref = ref
        self._track(ref, step_id)
        if self._deps_succeeded(step_id):
            self._mark_running(state)

    def _submit_with_values(self, state: _StepState) -> None:
        step = state.step
        try:
            if step.for_each is not None:
                items = resolve(step.for_each, self._context(step))
                if not isinstance(items, list):
                    raise StepInputError(f"for_each needs a list, but {step.for_each} is a {type(items).__name__}")
                if len(items) > self.settings.max_for_each_items:
                    raise StepInputError(
                        f"for_each over {len(items)} items; the limit is {self.settings.max_for_each_items} "
                        "(FACTORY_MAX_FOR_EACH_ITEMS): split the list, or batch items into one call each"
                    )
                arguments = [resolve(self._step_arguments(step), self._context(step, item, True)) for item in items]
            else:
                items = [None]
                arguments = [resolve(self._step_arguments(step), self._context(step))]
            keys: list[str | None] = [None] * len(items)
            if step.cache:
                keys = [self._cache_key(step, args) for args in arguments]
        except Exception as exc:  # noqa: BLE001 - user data; reported on the step
            state.submitted = True
            self._mark_running(state)
            self._fail_step(state, f"{type(exc).__name__}: {exc}", logs="")
            return
        state.submitted = True
        self._mark_running(state)
        state.items = [_ItemState() for _ in items]
        state.items_left = len(items)
        state.cache_keys = keys
        self._item_calls[step.id] = (items, arguments)
        if not items:
            self._finish_items(state)
            return
        for index in range(len(items)):
            self._submit_item(state, index)
        if state.items_left == 0:
            self._finish_items(state)
        else:
            self._item_progress(state, force=True)

    def _item_progress(self, state: _StepState, force: bool = False) -> None:
        """A ``step.items`` event (done, total) for a running for_each step, at most every
        ITEM_PROGRESS_SECONDS: how far it is, for those who watch (the dashboard)."""
        if state.step.for_each is None or not state.items or state.status not in _ACTIVE:
            return
        now = time.monotonic()
        total = len(state.items)
        done = total - state.items_left
        if done == state.progress_done or (not force and now - state.progress_at < ITEM_PROGRESS_SECONDS):
            return
        state.progress_at, state.progress_done = now, done
        self._flush()  # after the step's own events
        self.store.append_event(self.run_id, state.step.id, "step.items", {"done": done, "total": total})

    def _submit_item(self, state: _StepState, index: int) -> None:
        step = state.step
        items, arguments = self._item_calls[step.id]
        key = state.cache_keys[index]
        if key is not None and state.items[index].attempts == 0:
            cached = self.cache.cache_get(key)
            if cached is not None:
                state.items[index].output_json = cached
                state.items[index].logs = "(cached)"
                state.items_left -= 1
                return
        state.items[index].attempts += 1
        has_item = step.for_each is not None
        if step.kind in ("agent", "route"):
            ref = self._dispatch_to_agent(step, arguments[index], items[index] if has_item else None, has_item)
        else:
            call = self._call(step, arguments[index], True, items[index] if has_item else None, has_item)
            call.attempt, call.item_index = state.items[index].attempts, (index if has_item else None)
            ref = execute_item.options(**self._options(step)).remote(call)
        self._track(ref, step.id, index)

    def _dispatch_to_agent(self, step: Step, task: dict[str, Any], item: Any = None, has_item: bool = False) -> Any:
        """An agent or route step: the resolved task goes to an agent pool; returns ObjectRef[Outcome].

        A route step's text is resolved here, per item, so ``${item}`` routes each item on its own text.
        """
        if self.agent_dispatcher is None:
            return ray.put(
                Outcome(
                    ok=False,
                    error=f"step {step.id!r} is an {step.kind} step but no agent catalogue was given to this run",
                    error_type="factory.errors.StepInputError",
                )
            )
        if step.route is None:
            return self.agent_dispatcher.submit(step, task)
        try:
            text = resolve(step.route.text, self._context(step, item, has_item))
        except StepInputError as exc:
            return ray.put(Outcome(ok=False, error=str(exc), error_type="factory.errors.StepInputError"))
        if not isinstance(text, str):
            text = json.dumps(text, default=str)
        return self.agent_dispatcher.submit(step, task, route_text=text)

    def _finish_items(self, state: _StepState) -> None:
        step = state.step
        if step.for_each is not None:
            output_json = "[" + ",".join(item.output_json or "null" for item in state.items) + "]"
        else:
            output_json = state.items[0].output_json or "null"
        all_cached = bool(state.items) and all(item.logs == "(cached)" for item in state.items)
        logs = "\n".join(
            (f"[item {i}] " if step.for_each is not None else "") + item.logs
            for i, item in enumerate(state.items)
            if item.logs and item.logs != "(cached)"
        )
        state.attempts = max([state.attempts] + [item.attempts for item in state.items])
        what = "the list of its items' outputs" if step.for_each is not None else "the step's output"
        whole = limit_outcome(Outcome(ok=True, output_json=output_json), self.settings.max_output_bytes, what)
        if not whole.ok:  # each item fits, all of them together do not (or a result cached before the limit)
            self._fail_step(state, f"{whole.error} (not retried: fix the input or the code)", logs)
            return
        self._succeed(state, output_json, logs, time.monotonic() - state.started_at, cached=all_cached)

    # -- completion ----------------------------------------------------------------------------

    def _succeed(self, state: _StepState, output_json: str, logs: str, duration: float, cached: bool = False) -> None:
        state.output_json = output_json
        if state.ref is None or state.step.for_each is not None or self._needs_values(state.step):
            state.ref = ray.put(Outcome(ok=True, output_json=output_json))
        self._step_change(
            state,
            StepStatus.SUCCEEDED,
            "step.cached" if cached else "step.succeeded",
            attempts=state.attempts,
            output_json=output_json,
            cached=cached,
            attempt_logs=logs,
            attempt_duration=duration,
            data={"duration": round(duration, 6)},
        )
        for dependant in self.graph.dependants.get(state.step.id, []):
            dep_state = self.states[dependant]
            if dep_state.submitted:
                if dep_state.status == StepStatus.PENDING and self._deps_succeeded(dependant):
                    self._mark_running(dep_state)
            else:
                self._try_submit(dependant)

    def _supersede(self, step_id: str) -> None:
        """Dependants submitted against an attempt that failed: forget them, they go again later."""
        for desc in self.graph.descendants(step_id):
            state = self.states[desc]
            if state.status in FINAL_STEP_STATUSES:
                continue
            state.generation += 1
            state.submitted = False
            state.ref = None
            if state.status == StepStatus.RUNNING:
                state.status = StepStatus.PENDING

    def _fail_step(self, state: _StepState, error: str, logs: str, duration: float = 0.0) -> None:
        step_id = state.step.id
        self._supersede(step_id)
        state.ref = None
        self._step_change(
            state,
            StepStatus.FAILED,
            "step.failed",
            attempts=state.attempts,
            error=error,
            attempt_logs=logs,
            attempt_duration=duration,
        )
        if self._first_error is None:
            self._first_error = f"step {step_id!r} failed: {error}"
        for desc in self.graph.descendants(step_id):
            desc_state = self.states[desc]
            if desc_state.status not in FINAL_STEP_STATUSES:
                self._step_change(desc_state, StepStatus.SKIPPED, "step.skipped", data={"because": step_id})
        for ref, (sid, _, item) in list(self.inflight.items()):
            if sid == step_id and item is not None:
                _stop_attempt(ref)
                del self.inflight[ref]

    def _on_failure(self, state: _StepState, outcome: Outcome, item: int | None, node_lost: bool = False) -> None:
        """``node_lost``: the attempt died with its Ray node; it runs again at once on the nodes
        that remain, whatever the step's retry policy (the step itself did not fail), as Ray's
        own ``max_retries`` does for system failures."""
        step = state.step
        attempts = state.items[item].attempts if item is not None else state.attempts
        label = f"item {item}: " if item is not None and step.for_each is not None else ""
        error = f"{label}{outcome.error}"
        if node_lost or (outcome.retryable and attempts < step.retry.max_attempts):
            delay = 0.0 if node_lost else backoff_delay(step.retry, attempts, self._rng)
            self._seq += 1
            heapq.heappush(self.retry_heap, (time.monotonic() + delay, self._seq, step.id, item, state.generation))
            if item is None:
                self._supersede(step.id)
                state.ref = None
                state.submitted = False
            self._step_change(
                state,
                StepStatus.RETRYING,
                "step.retrying",
                attempts=state.attempts if item is None else None,
                error=error,
                attempt_logs=outcome.logs if item is None else None,
                attempt_duration=outcome.duration,
                data={
                    "delay": round(delay, 3),
                    "attempt": attempts,
                    **({"item": item} if item is not None else {}),
                    **({"node_lost": True} if node_lost else {}),
                },
            )
            return
        if not outcome.retryable:
            error += " (not retried: fix the input or the code)"
        elif step.retry.max_attempts > 1:
            error += f" (gave up after {attempts} attempts)"
        self._fail_step(state, error, outcome.logs, outcome.duration)

    def _handle(self, ref: Any, outcome: Outcome | None, exc: BaseException | None) -> None:
        step_id, generation, item = self.inflight.pop(ref)
        state = self.states[step_id]
        if generation != state.generation or state.status in (
            StepStatus.FAILED,
            StepStatus.SKIPPED,
            StepStatus.CANCELLED,
        ):
            return
        node_lost = False
        if outcome is None:
            assert exc is not None
            elapsed = time.monotonic() - state.started_at
            outcome = Outcome(
                ok=False,
                error=_describe_ray_error(exc, state.step, elapsed),
                retryable=not isinstance(exc, TaskCancelledError),
            )
            unit: _StepState | _ItemState = state if item is None else state.items[item]
            if isinstance(exc, NodeDiedError) and unit.node_losses < MAX_NODE_LOSSES:
                unit.node_losses += 1
                node_lost = True
        # agent steps' outputs come from their pools, not through the worker's limit
        outcome = limit_outcome(outcome, self.settings.max_output_bytes)
        if item is not None:
            if outcome.ok:
                item_state = state.items[item]
                item_state.output_json = outcome.output_json
                item_state.logs = outcome.logs
                key = state.cache_keys[item]
                if key is not None and outcome.output_json is not None:
                    self.cache.cache_put(key, outcome.output_json)
                state.items_left -= 1
                if state.items_left == 0:
                    self._finish_items(state)
                else:
                    self._item_progress(state)
            else:
                self._on_failure(state, outcome, item, node_lost)
            return
        if outcome.skipped:
            state.submitted = False
            state.ref = None
            state.status = StepStatus.PENDING if state.status == StepStatus.RUNNING else state.status
            return
        if outcome.ok:
            assert outcome.output_json is not None
            self._succeed(state, outcome.output_json, outcome.logs, outcome.duration)
        else:
            self._on_failure(state, outcome, None, node_lost)

    def _submit_due_retries(self) -> None:
        now = time.monotonic()
        while self.retry_heap and self.retry_heap[0][0] <= now:
            _, _, step_id, item, generation = heapq.heappop(self.retry_heap)
            state = self.states[step_id]
            if state.status != StepStatus.RETRYING or generation != state.generation:
                continue
            if item is None:
                state.status = StepStatus.PENDING
                self._try_submit(step_id)
            else:
                state.status = StepStatus.RUNNING
                self._submit_item(state, item)
                if any(entry[2] == step_id for entry in self.retry_heap):
                    state.status = StepStatus.RETRYING

    # -- the loop ------------------------------------------------------------------------------

    def progress(self) -> Progress:
        p = Progress(total=len(self.states))
        for state in self.states.values():
            status = state.status
            if status == StepStatus.SUCCEEDED:
                p.succeeded += 1
            elif status == StepStatus.RUNNING:
                p.running += 1
            elif status == StepStatus.RETRYING:
                p.retrying += 1
            elif status == StepStatus.FAILED:
                p.failed += 1
            elif status == StepStatus.SKIPPED:
                p.skipped += 1
            elif status == StepStatus.CANCELLED:
                p.cancelled += 1
            if state.step.for_each is not None and state.items and status in (StepStatus.RUNNING, StepStatus.RETRYING):
                p.items_total += len(state.items)
                p.items_done += len(state.items) - state.items_left
        return p

    def _unfinished(self) -> bool:
        return any(s.status not in FINAL_STEP_STATUSES for s in self.states.values())

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop every attempt in flight and mark the unfinished steps cancelled."""
        self._cancelled = True
        for ref in list(self.inflight):
            _stop_attempt(ref)
        self.inflight.clear()
        self.retry_heap.clear()
        for state in self.states.values():
            if state.status not in FINAL_STEP_STATUSES:
                self._step_change(state, StepStatus.CANCELLED, "step.cancelled", data={"reason": reason})

    def _wait(self) -> None:
        timeout = MAX_WAIT_SECONDS
        if self.retry_heap:
            timeout = max(0.0, min(timeout, self.retry_heap[0][0] - time.monotonic()))
        if not self.inflight:
            time.sleep(timeout)
            return
        refs = list(self.inflight)
        ready, rest = ray.wait(refs, num_returns=1, timeout=timeout)
        if not ready:
            return
        if rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        for ref in ready:
            try:
                outcome: Outcome | None = ray.get(ref)
                exc: BaseException | None = None
            except RayError as err:
                outcome, exc = None, err
            self._handle(ref, outcome, exc)

    def start(self, resumed: bool = False) -> None:
        """Take the run's lease and record that it runs."""
        if not self.store.claim_run(self.run_id, self.owner, self.settings.lease_seconds):
            raise RunStateError(
                f"run {self.run_id} is being run by another live process; wait for it, or `factory cancel` it first"
            )
        if resumed:
            done = 0
            for record in self.store.get_steps(self.run_id):
                if record.status == StepStatus.SUCCEEDED and record.step_id in self.states:
                    state = self.states[record.step_id]
                    state.status = StepStatus.SUCCEEDED
                    state.output_json = record.output_json
                    state.attempts = record.attempts
                    state.ref = ray.put(Outcome(ok=True, output_json=record.output_json))
                    done += 1
                elif record.step_id in self.states:
                    self.states[record.step_id].attempts = record.attempts
            self._emit(RunChange(self.run_id, RunStatus.RUNNING, "run.resumed", data={"already_done": done}))
        else:
            self._emit(RunChange(self.run_id, RunStatus.RUNNING, "run.started"))

    def execute(self) -> RunResult:
        """Run until every step is final; returns the result."""
        try:
            for step_id in self.graph.order:
                self._try_submit(step_id)
            self._flush()
            last_poll = last_beat = time.monotonic()
            while self._unfinished():
                self._submit_due_retries()
                self._wait()
                self._flush()
                now = time.monotonic()
                if now - last_poll >= CANCEL_POLL_SECONDS:
                    last_poll = now
                    if self.store.cancel_requested(self.run_id):
                        self.cancel("cancel requested")
                        break
                    if self.on_progress is not None:
                        self.on_progress(self.progress())
                    for state in self.states.values():  # items done since the last step.items event
                        self._item_progress(state)
                if now - last_beat >= self.settings.heartbeat_seconds:
                    last_beat = now
                    if not self.store.heartbeat(self.run_id, self.owner):
                        raise LeaseLostError(f"run {self.run_id} was taken over by another coordinator; this one stops")
        except LeaseLostError:
            # Someone else owns the run now: stop our attempts, write nothing more.
            for ref in list(self.inflight):
                _stop_attempt(ref)
            self.inflight.clear()
            self._pending.clear()
            raise
        except KeyboardInterrupt:
            self.cancel("interrupted (Ctrl-C)")
            self._flush()
            return self._finish()
        except BaseException:
            # the coordinator itself failed: stop its attempts so that a resume cannot overlap them
            for ref in list(self.inflight):
                _stop_attempt(ref)
            self.inflight.clear()
            self._pending.clear()
            self.store.release_run(self.run_id, self.owner)
            raise
        return self._finish()

    def _finish(self) -> RunResult:
        if self._cancelled:
            status, error = RunStatus.CANCELLED, "the run was cancelled"
        elif all(s.status == StepStatus.SUCCEEDED for s in self.states.values()):
            status, error = RunStatus.SUCCEEDED, None
        else:
            status, error = RunStatus.FAILED, self._first_error or "a step did not succeed"
        event = {
            RunStatus.SUCCEEDED: "run.succeeded",
            RunStatus.FAILED: "run.failed",
            RunStatus.CANCELLED: "run.cancelled",
        }[status]
        self._emit(RunChange(self.run_id, status, event, error=error))
        self._flush()
        self.store.release_run(self.run_id, self.owner)
        if self.on_progress is not None:
            self.on_progress(self.progress())
        outputs = {sid: self._value(sid) for sid, s in self.states.items() if s.status == StepStatus.SUCCEEDED}
        return RunResult(self.run_id, status, outputs, error)
