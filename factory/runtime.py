"""What runs inside a Ray worker for one attempt of a python step.

The worker resolves the step's ``${...}`` references against the outcomes of its
dependencies (which Ray hands over as resolved task arguments, so a chain of
steps is pipelined by Ray without a round trip to the coordinator), calls the
function with a per-attempt timeout, captures its printed output, and returns
an :class:`Outcome` carrying the output as JSON text. User errors never escape
as Ray errors: they come back in the Outcome, classified as retryable or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import faulthandler
import inspect
import io
import json
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import ray

from factory.callables import bind_arguments, import_callable
from factory.errors import OutputNotSerializableError, OutputTooLargeError, StepInputError, StepTimeoutError
from factory.limits import DEFAULT_MAX_OUTPUT_BYTES
from factory.livelog import LiveLog
from factory.outcome import Outcome as Outcome  # re-exported: workers and pools build it here
from factory.outcome import json_size
from factory.outcome import limit_outcome as limit_outcome
from factory.policy import check_python_grants
from factory.refs import Context, resolve
from factory.retry import is_retryable
from factory.spec import RetryPolicy
from factory.stepagents import StepAgents
from factory.stepcontext import StepContext
from factory.store import RunGrants

# After the timeout, the attempt gets an interrupt (StepTimeoutError raised in it).
# If it is stuck in native code and ignores that, the worker process is killed
# this many seconds later: the timeout always stops the attempt.
HARD_KILL_GRACE_SECONDS = 2.0
MAX_LOG_CHARS = 64_000


@dataclass(slots=True)
class StepCall:
    """Everything a worker needs to run one attempt."""

    step_id: str
    target: str  # python steps: module:function
    arguments: dict[str, Any]  # python steps: keyword arguments; container steps: the container spec
    resolved: bool  # arguments already resolved by the coordinator (for_each items, cached steps)
    inputs: dict[str, Any]
    dep_ids: tuple[str, ...]
    search_path: tuple[str, ...]
    timeout: float | None
    retry: RetryPolicy
    item: Any = None
    has_item: bool = False
    action: str = "python"  # or "container"
    executor: str | None = None  # container steps: local or dagger
    home: str | None = None  # the coordinator's FACTORY_HOME (container steps keep artifacts there)
    container_settings: dict[str, Any] | None = None  # container steps: the coordinator's executor settings
    base_dir: str | None = None  # the workflow's folder: the only host files a container step may mount
    store_url: str | None = None  # where container steps' log lines and python steps' context (once, events) go
    run_id: str | None = None
    grants: RunGrants | None = None  # what the run may use (API runs); None: anything (started here)
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES  # the max_output_bytes setting: larger outputs fail
    attempt: int = 1  # this attempt's number (of the step, or of the for_each item)
    item_index: int | None = None  # a for_each item's index
    agents: StepAgents | None = None  # python steps: the run's agents, for step_context().ask()


def _to_jsonable(value: Any) -> Any:
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        return model_dump(mode="json")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"a {type(value).__name__} cannot be stored as JSON")


def encode_output(value: Any, max_bytes: int | None = None) -> str:
    """JSON text of a step's output, or OutputNotSerializableError saying what to return instead;
    OutputTooLargeError when the text is longer than ``max_bytes`` (None: no limit)."""
    try:
        text = json.dumps(value, default=_to_jsonable, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise OutputNotSerializableError(
            f"the step returned {type(value).__name__} that cannot be stored as JSON ({exc}); "
            "return dicts, lists, strings, numbers, booleans, None or pydantic models"
        ) from None
    if max_bytes is not None and len(text) * 4 > max_bytes:  # else it fits whatever the characters
        size = json_size(text)
        if size > max_bytes:
            raise OutputTooLargeError(size, max_bytes)
    return text


def _real_stderr() -> Any:
    stream = sys.__stderr__
    try:
        if stream is not None:
            stream.fileno()
            return stream
    except (OSError, ValueError):
        pass
    return 2


class _Timeout:
    """Interrupt the main thread after ``seconds``, kill the process if that does not work."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._armed = False
        self._previous: Any = None

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        raise StepTimeoutError(f"the attempt ran past its timeout of {self.seconds:g}s and was stopped")

    def __enter__(self) -> _Timeout:
        if self.seconds and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGALRM, self._interrupt)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
            # The traceback goes to the process's real stderr (the worker log), not the captured one.
            faulthandler.dump_traceback_later(self.seconds + HARD_KILL_GRACE_SECONDS, exit=True, file=_real_stderr())
            self._armed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            faulthandler.cancel_dump_traceback_later()
            signal.signal(signal.SIGALRM, self._previous)


_LOG_FORMAT = logging.Formatter("%(levelname)s %(name)s: %(message)s")


class _LogCapture(logging.Handler):
    def __init__(self, sink: io.StringIO) -> None:
        super().__init__(logging.INFO)
        self.sink = sink
        self.formatter = _LOG_FORMAT

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.write(self.format(record) + "\n")


def settle(value: Any) -> Any:
    """The value itself, or, for an awaitable (an ``async def`` step or agent), what it returns."""
    if not inspect.isawaitable(value):
        return value
    awaitable = value

    async def wait() -> Any:
        return await awaitable

    return asyncio.run(wait())


def _call(func: Any, kwargs: dict[str, Any]) -> Any:
    return settle(func(**kwargs))


def _run_container(call: StepCall, spec: dict[str, Any], logs: io.StringIO) -> Any:
    """A container step: the resolved spec goes to the isolated executor (factory.sandbox)."""
    from factory.sandbox import run_container_step

    return run_container_step(call, spec, logs)


def step_context_of(call: StepCall) -> StepContext:
    """The context a python step's code sees (``factory.step_context()``) in this attempt."""
    return StepContext(
        run_id=call.run_id,
        step_id=call.step_id,
        attempt=call.attempt,
        item=call.item_index,
        store_url=call.store_url,
        max_result_bytes=call.max_output_bytes,
        agents=call.agents if call.action == "python" else None,
    )


def run_attempt(call: StepCall, deps: tuple[Outcome, ...]) -> Outcome:
    """Run one attempt in this process. Never raises for a user error."""
    for dep in deps:
        if not dep.ok:
            return Outcome(ok=False, skipped=True, error="a dependency did not succeed")
    started = time.perf_counter()
    live = _live_log(call)
    buffer = live if live is not None else io.StringIO()
    try:
        return _run_attempt(call, deps, buffer, started)
    finally:
        if live is not None:  # before the outcome goes back: its last lines come before the step's end
            live.flush_events(final=True)


def _live_log(call: StepCall) -> LiveLog | None:
    """Where the attempt's printed lines go: a LiveLog that publishes them as ``step.log`` events
    while the attempt runs (a python step's only once it has run for the interval), or None
    outside a run with a store."""
    if not (call.store_url and call.run_id):
        return None
    base: dict[str, Any] = {"attempt": call.attempt}
    if call.item_index is not None:
        base["item"] = call.item_index
    return LiveLog(call.store_url, call.run_id, call.step_id, base=base, hold_short=call.action != "container")


def _run_attempt(call: StepCall, deps: tuple[Outcome, ...], buffer: io.StringIO, started: float) -> Outcome:
    ctx: StepContext | None = None
    root = logging.getLogger()
    handler = _LogCapture(buffer)
    try:
        if call.resolved:
            kwargs = call.arguments
        else:
            outputs = {
                dep_id: json.loads(dep.output_json or "null") for dep_id, dep in zip(call.dep_ids, deps, strict=True)
            }
            kwargs = resolve(call.arguments, Context(call.inputs, outputs, call.item, call.has_item))
        if call.action == "container":
            value = _run_container(call, kwargs, buffer)
        else:
            check_python_grants(call.grants, call.target)
            try:
                func = import_callable(call.target, call.search_path)
            except (ImportError, AttributeError, TypeError) as exc:
                raise StepInputError(str(exc)) from exc
            check_python_grants(call.grants, call.target, func)
            bind_arguments(func, kwargs, call.target)
            root.addHandler(handler)
            ctx = step_context_of(call)
            with (
                ctx.active(),
                contextlib.redirect_stdout(buffer),
                contextlib.redirect_stderr(buffer),
                _Timeout(call.timeout),
            ):
                value = _call(func, kwargs)
        output_json = encode_output(value, call.max_output_bytes)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):  # ray.cancel() interrupts the task this way
            raise
        root.removeHandler(handler)
        tail = "".join(traceback.format_exception(exc)[-6:])
        logs = buffer.getvalue()
        return Outcome(
            ok=False,
            error=f"{type(exc).__name__}: {exc}",
            error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            retryable=is_retryable(exc, call.retry),
            logs=(logs + ("\n" if logs and not logs.endswith("\n") else "") + tail)[-MAX_LOG_CHARS:],
            duration=time.perf_counter() - started,
            extra=_usage_extra(ctx),
        )
    root.removeHandler(handler)
    return Outcome(
        ok=True,
        output_json=output_json,
        logs=buffer.getvalue()[-MAX_LOG_CHARS:],
        duration=time.perf_counter() - started,
        extra=_usage_extra(ctx),
    )


def _usage_extra(ctx: StepContext | None) -> dict[str, Any]:
    """The tokens of the agents a python step asked (``ctx.ask``): counted against the run's budget."""
    return {"usage": ctx.usage} if ctx is not None and ctx.usage is not None else {}


@ray.remote(max_retries=0)
def execute_step(call: StepCall, *deps: Outcome) -> Outcome:
    """Ray task: one attempt of a python step. Dependencies arrive as resolved Outcomes."""
    return run_attempt(call, deps)


@ray.remote(max_retries=0)
def execute_chain(calls: list[StepCall], *deps: Outcome) -> Iterator[Outcome]:
    """Ray streaming generator task: steps that follow one another, each the only dependant of
    the one before (a chain), run one after another in this worker. Each outcome goes back to
    the coordinator as it ends (committed then, as any step's), and the chain stops at the
    first attempt that did not succeed: the coordinator decides what comes next."""
    outcome = run_attempt(calls[0], deps)
    yield outcome
    for call in calls[1:]:
        if not outcome.ok:
            return
        outcome = run_attempt(call, (outcome,))
        yield outcome


@ray.remote(max_retries=0)
def execute_group(
    calls: list[StepCall], sources: list[tuple[int, ...]], budget: float, *deps: Outcome
) -> Iterator[Outcome]:
    """Ray streaming generator task: short python steps of a DAG with joins (a group), run one
    after another in this worker in an order where each comes after what it needs. A step's
    dependencies are the outcomes of earlier steps of the group (a source ``i >= 0``) or the
    task's arguments (``~i``). Every step runs as a task of its own would: one whose
    dependency did not succeed says so without running. Each outcome goes back as it ends.
    Once the group has run for ``budget`` seconds it stops: its steps left go again, each as a
    task of its own (the coordinator sends them), so a step longer than was known costs the
    group's parallelism once, not for every step after it."""
    started = time.perf_counter()
    outcomes: list[Outcome] = []
    for call, source in zip(calls, sources, strict=True):
        if outcomes and time.perf_counter() - started > budget:
            return
        outcome = run_attempt(call, tuple(outcomes[i] if i >= 0 else deps[~i] for i in source))
        outcomes.append(outcome)
        yield outcome


@ray.remote(max_retries=0)
def execute_item(call: StepCall) -> Outcome:
    """Ray task: one item of a for_each step, with arguments the coordinator resolved."""
    return run_attempt(call, ())


@dataclass(slots=True)
class CallPart:
    """What differs between the calls of one step (its items, its attempts); the rest of the
    :class:`StepCall` is shared by all of them through one object in Ray's object store."""

    arguments: dict[str, Any]
    item: Any = None
    has_item: bool = False
    attempt: int = 1
    item_index: int | None = None

    def apply(self, base: StepCall) -> StepCall:
        """The whole call: ``base`` with this part's fields."""
        return dataclasses.replace(
            base,
            arguments=self.arguments,
            item=self.item,
            has_item=self.has_item,
            attempt=self.attempt,
            item_index=self.item_index,
        )


_SHARED_CALLS: dict[str, StepCall] = {}  # this worker's copies of shared calls, by object id
_MAX_SHARED_CALLS = 64


def _shared_call(ref: Any) -> StepCall:
    key = ref.hex()
    call = _SHARED_CALLS.get(key)
    if call is None:
        call = ray.get(ref)
        if len(_SHARED_CALLS) >= _MAX_SHARED_CALLS:
            _SHARED_CALLS.pop(next(iter(_SHARED_CALLS)))
        _SHARED_CALLS[key] = call
    return call


@ray.remote(max_retries=0)
def execute_part(shared: list[Any], part: CallPart) -> Outcome:
    """Ray task: one call of a step whose common part (``shared[0]``, an ObjectRef of a
    StepCall, fetched once per worker) is sent once for all its calls."""
    return run_attempt(part.apply(_shared_call(shared[0])), ())


@ray.remote(max_retries=0)
def execute_parts(shared: list[Any], parts: list[CallPart]) -> Iterator[Outcome]:
    """Ray streaming generator task: several calls of one step (short for_each items), one
    after another in this worker; each outcome goes back as it ends (factory.batches)."""
    base = _shared_call(shared[0])
    for part in parts:
        yield run_attempt(part.apply(base), ())
