"""What a python step knows of the attempt it runs in, and what it can do with it.

Inside a python step, :func:`factory.step_context` returns the attempt's :class:`StepContext`:

- ``ctx.run_id``, ``ctx.step_id``, ``ctx.attempt`` (1, 2, ...), ``ctx.item`` (the index of a
  ``for_each`` item, else None);
- ``ctx.idempotency_key``: the same for every attempt of this step (or item) in this run,
  different for every other; send it to outside APIs that deduplicate requests with one;
- ``ctx.once(key, fn, *args, **kwargs)``: the first attempt that completes ``fn`` records its
  result durably in the store; a retry, or the run resumed after a crash, gets the recorded
  result and does not call ``fn`` again;
- ``ctx.progress(fraction, message)`` and ``ctx.emit(data)``: ``step.progress`` and
  ``step.emitted`` events while the step runs, at most one of each every
  ``STEP_EVENT_INTERVAL_SECONDS`` (the newest progress, the emitted data batched), the last
  always published when the attempt ends;
- ``ctx.tool_event(ToolCall(...) | ToolResult(...))``: an agent's tool call or its result, as a
  ``step.tool_call`` / ``step.tool_result`` event of its own, published with the emitted data
  (same flushes, same bytes bound, in the order they came), its text on one line, cut to
  ``MAX_TOOL_TEXT`` characters and with anything that looks like a key redacted.

The worker writes once() records and events straight to the store (one connection per worker
process, :func:`factory.livelog.worker_store`). Every input is bounded (factory.limits); a wrong
one raises :class:`StepContextError`, which is not retried. Outside a run (the function called
directly, e.g. in a unit test) the context is detached: once() calls ``fn`` every time and
progress()/emit() go nowhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import inspect
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel, Field

from factory.errors import StepContextError
from factory.limits import (
    DEFAULT_MAX_OUTPUT_BYTES,
    MAX_EMIT_BATCH_BYTES,
    MAX_EMIT_BYTES,
    MAX_ONCE_KEY_CHARS,
    MAX_ONCE_KEYS_PER_STEP,
    MAX_PROGRESS_MESSAGE_CHARS,
    STEP_EVENT_INTERVAL_SECONDS,
)
from factory.safetext import one_line

if TYPE_CHECKING:
    from factory.stepagents import StepAgents

log = logging.getLogger(__name__)

PROGRESS_EVENT = "step.progress"
EMITTED_EVENT = "step.emitted"
TOOL_CALL_EVENT = "step.tool_call"
TOOL_RESULT_EVENT = "step.tool_result"
MAX_TOOL_TEXT = 1000  # characters of a tool call's arguments or a result's text in an event
MAX_TOOL_NAME = 200  # characters of a tool's name or a call's id
NO_ITEM = -1  # the store's item index of a step that is not a for_each item
CONTEXT_META = "_factory_step_context"  # an agent call's meta key carrying its run's context to the replica

_current: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("factory_step_context", default=None)
_process_current: StepContext | None = None  # threads the step starts see it too (one attempt per worker at a time)


def _jsonable(value: Any) -> Any:
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        return model_dump(mode="json")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"a {type(value).__name__} cannot be stored as JSON")


def _size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def encode(value: Any, what: str, max_bytes: int) -> str:
    """JSON text of ``value``, or StepContextError saying what is wrong with it."""
    try:
        text = json.dumps(value, default=_jsonable, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise StepContextError(
            f"{what} is a {type(value).__name__} that cannot be stored as JSON ({exc}); "
            "use dicts, lists, strings, numbers, booleans, None or pydantic models"
        ) from None
    if len(text) * 4 > max_bytes and _size(text) > max_bytes:
        raise StepContextError(f"{what} is {_size(text)} bytes as JSON, more than the limit of {max_bytes} bytes")
    return text


ToolName = Annotated[str, AfterValidator(lambda value: one_line(value, MAX_TOOL_NAME))]
ToolText = Annotated[str, AfterValidator(lambda value: one_line(value, MAX_TOOL_TEXT))]


class ToolCall(BaseModel):
    """A tool call an agent's model made (a ``step.tool_call`` event): ``arguments`` as JSON text.
    Every field is put on one line, cut and redacted when the model is built."""

    id: ToolName = Field(description="The call's id, as the model gave it: its result has the same.")
    name: ToolName = Field(description="The tool's name (fast-agent: SERVER__TOOL).")
    arguments: ToolText = Field(description=f"The arguments as JSON text, cut to {MAX_TOOL_TEXT} characters.")


class ToolResult(BaseModel):
    """What a tool answered (a ``step.tool_result`` event). Put on one line, cut and redacted."""

    id: ToolName = Field(description="The id of the call it answers.")
    error: bool = Field(description="The tool reported an error (the model gets it as text).")
    text: ToolText = Field(description=f"The result's text, cut to {MAX_TOOL_TEXT} characters.")


class _Publisher:
    """The attempt's step.progress and step.emitted events, rate-limited: the first at once,
    then at most one flush per ``interval``; the newest progress wins, emitted data is batched
    (up to MAX_EMIT_BATCH_BYTES, more is counted as dropped); :meth:`close` publishes the rest.
    Tool calls and results wait in the same queue (and bound) and become events of their own
    type, between the batches of emitted data that came before and after them."""

    def __init__(self, store_url: str, run_id: str, step_id: str, base: dict[str, Any], interval: float) -> None:
        self.store_url = store_url
        self.run_id = run_id
        self.step_id = step_id
        self.base = base
        self.interval = interval
        self._lock = threading.Lock()
        self._progress: dict[str, Any] | None = None
        self._emitted: list[tuple[str, Any]] = []  # (event type, data), in order
        self._emitted_bytes = 0
        self._dropped = 0
        self._last = -math.inf
        self._timer: threading.Timer | None = None
        self._failed = False
        self.published = 0

    def progress(self, data: dict[str, Any]) -> None:
        with self._lock:
            self._progress = data
        self._schedule()

    def emit(self, value: Any, size: int, kind: str = EMITTED_EVENT) -> None:
        with self._lock:
            if self._emitted_bytes + size > MAX_EMIT_BATCH_BYTES:
                self._dropped += 1
            else:
                self._emitted.append((kind, value))
                self._emitted_bytes += size
        self._schedule()

    def _schedule(self) -> None:
        with self._lock:
            if self._timer is not None:
                return
            wait = self._last + self.interval - time.monotonic()
            if wait > 0:
                self._timer = threading.Timer(wait, self.flush)
                self._timer.daemon = True
                self._timer.start()
                return
        self.flush()

    def flush(self) -> None:
        with self._lock:
            if self._timer is not None and self._timer is not threading.current_thread():
                self._timer.cancel()
            self._timer = None
            progress, self._progress = self._progress, None
            emitted, self._emitted, self._emitted_bytes = self._emitted, [], 0
            dropped, self._dropped = self._dropped, 0
            if progress is None and not emitted and not dropped:
                return
            self._last = time.monotonic()
        if self._failed:
            return
        try:
            from factory.livelog import worker_store

            store = worker_store(self.store_url)
            if progress is not None:
                store.append_event(self.run_id, self.step_id, PROGRESS_EVENT, {**progress, **self.base})
                self.published += 1
            batch: list[Any] = []
            for kind, value in emitted:
                if kind == EMITTED_EVENT:
                    batch.append(value)
                    continue
                if batch:
                    store.append_event(self.run_id, self.step_id, EMITTED_EVENT, {"items": batch, **self.base})
                    self.published += 1
                    batch = []
                store.append_event(self.run_id, self.step_id, kind, {**value, **self.base})
                self.published += 1
            if batch or dropped:
                data: dict[str, Any] = {"items": batch, **self.base}
                if dropped:
                    data["dropped"] = dropped
                store.append_event(self.run_id, self.step_id, EMITTED_EVENT, data)
                self.published += 1
        except Exception as exc:  # noqa: BLE001 - live events are a convenience: the step goes on without them
            self._failed = True
            log.warning("cannot publish progress of step %s as events: %s", self.step_id, exc)

    def close(self) -> None:
        self.flush()


class StepContext:
    """The attempt a python step runs in. Get it with :func:`factory.step_context`."""

    def __init__(
        self,
        run_id: str | None = None,
        step_id: str | None = None,
        attempt: int = 1,
        item: int | None = None,
        store_url: str | None = None,
        max_result_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        interval: float = STEP_EVENT_INTERVAL_SECONDS,
        once_allowed: bool = True,
        agents: StepAgents | None = None,
    ) -> None:
        self.run_id = run_id
        self.step_id = step_id
        self.attempt = attempt
        self.item = item
        self.max_result_bytes = max_result_bytes
        self.once_allowed = once_allowed  # False in agent steps: their calls do not know attempt and item yet
        self._store_url = store_url if run_id and step_id else None
        self.agents = agents  # the run's agents (python steps of a run with a catalogue)
        self.usage: dict[str, Any] | None = None  # tokens the agents this attempt asked used, summed
        self._usage_lock = threading.Lock()
        base: dict[str, Any] = {"attempt": attempt, **({"item": item} if item is not None else {})}
        self._publisher = (
            _Publisher(self._store_url, run_id, step_id, base, interval)
            if self._store_url and run_id and step_id
            else None
        )

    @property
    def detached(self) -> bool:
        """True outside a run: once() calls its function every time, events go nowhere."""
        return self._store_url is None

    # -- identity ------------------------------------------------------------------------------

    @property
    def idempotency_key(self) -> str:
        """The same for every attempt of this step (or for_each item) in this run, and after a
        resume; different for any other step, item or run. Pass it to APIs that deduplicate."""
        return self.idempotency_key_for("")

    def idempotency_key_for(self, name: str) -> str:
        """A key for one of several outside calls of the step: stable like :attr:`idempotency_key`."""
        if not isinstance(name, str) or len(name) > MAX_ONCE_KEY_CHARS:
            raise StepContextError(f"an idempotency key's name is a string of at most {MAX_ONCE_KEY_CHARS} characters")
        item = NO_ITEM if self.item is None else self.item
        digest = hashlib.sha256(f"{self.run_id}\0{self.step_id}\0{item}\0{name}".encode()).hexdigest()[:24]
        return f"{self.run_id or 'local'}-{digest}"

    # -- once ----------------------------------------------------------------------------------

    def _check_key(self, key: str) -> None:
        if not self.once_allowed:
            raise StepContextError(
                "once() is for python steps; an agent's handle() cannot use it yet: do the side effect in a "
                "python step, or pass ctx.idempotency_key to the outside API"
            )
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_ONCE_KEY_CHARS:
            raise StepContextError(
                f"a once() key is a string of 1 to {MAX_ONCE_KEY_CHARS} characters, not {type(key).__name__} "
                f"{str(key)[:40]!r}"
            )

    def _recorded(self, key: str) -> tuple[bool, Any]:
        from factory.livelog import worker_store

        assert self._store_url and self.run_id and self.step_id
        text = worker_store(self._store_url).once_get(self.run_id, self.step_id, self._item_index, key)
        return (False, None) if text is None else (True, json.loads(text))

    def _record(self, key: str, value: Any) -> Any:
        from factory.livelog import worker_store

        assert self._store_url and self.run_id and self.step_id
        text = encode(value, f"the result of once({key!r})", self.max_result_bytes)
        stored = worker_store(self._store_url).once_put(
            self.run_id, self.step_id, self._item_index, key, text, self.attempt, MAX_ONCE_KEYS_PER_STEP
        )
        return json.loads(stored)

    @property
    def _item_index(self) -> int:
        return NO_ITEM if self.item is None else self.item

    def once(self, key: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` the first time this step (item) of this run gets here with
        ``key``; its result, as recorded (JSON: tuples come back as lists), every later time,
        in a retry or after a resume, without calling ``fn``. A call that raises records
        nothing. In an ``async def`` step, ``await ctx.once_async(...)``."""
        self._check_key(key)
        if self.detached:
            return self._settle(key, fn(*args, **kwargs))
        found, value = self._recorded(key)
        if found:
            return value
        return self._record(key, self._settle(key, fn(*args, **kwargs)))

    async def once_async(self, key: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """:meth:`once` for async steps: ``fn`` may be an ``async def`` function. The store is
        read and written in a thread, so the event loop goes on meanwhile."""
        self._check_key(key)
        if self.detached:
            result = fn(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result
        found, value = await asyncio.to_thread(self._recorded, key)
        if found:
            return value
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return await asyncio.to_thread(self._record, key, result)

    @staticmethod
    def _settle(key: str, result: Any) -> Any:
        if not inspect.isawaitable(result):
            return result
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            from factory.runtime import settle

            return settle(result)
        if inspect.iscoroutine(result):
            result.close()
        raise StepContextError(
            f"once({key!r}) was given an async function inside a running event loop: "
            "use `await ctx.once_async(...)` in an async step"
        )

    # -- agents --------------------------------------------------------------------------------

    def ask(self, agent: str, task: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Send ``task`` to the run's agent ``agent`` (its pool, as an ``agent:`` step would) and
        return its output, ``{agent, replica, route, result}``. A failure raises AgentCallError
        (retryable as the replica said). Not recorded: wrap it in :meth:`once` to ask only once."""
        (answer,) = self.ask_many([(agent, task)], timeout=timeout)
        return answer

    def ask_many(
        self, calls: list[tuple[str, dict[str, Any]]], *, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """Send every ``(agent, task)`` at once, to run in parallel on the pools; the outputs, in order."""
        if self.agents is None:
            raise StepContextError(
                "this step has no agents to ask: run the workflow with a catalogue (--agents agents.yaml)"
            )
        answers = self.agents.ask_many(calls, step_id=self.step_id, timeout=timeout)
        from factory.costs import add_usage

        with self._usage_lock:
            for _, usage in answers:
                self.usage = add_usage(self.usage, usage)
        return [answer for answer, _ in answers]

    # -- live events ---------------------------------------------------------------------------

    def progress(self, fraction: float | None = None, message: str | None = None) -> None:
        """How far the attempt is: ``fraction`` from 0 to 1 (None: unknown), and a short message.
        Published as a ``step.progress`` event; the newest wins when they come faster than
        one per STEP_EVENT_INTERVAL_SECONDS."""
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
                raise StepContextError(f"progress() takes a fraction from 0 to 1 (or None), not {fraction!r}")
            fraction = float(fraction)
        if message is not None and not isinstance(message, str):
            raise StepContextError(f"progress()'s message is a string, not {type(message).__name__}")
        if self._publisher is None:
            return
        data: dict[str, Any] = {"fraction": fraction}
        if message:
            data["message"] = message[:MAX_PROGRESS_MESSAGE_CHARS]
        self._publisher.progress(data)

    def emit(self, data: Any) -> None:
        """Publish ``data`` (JSON, at most MAX_EMIT_BYTES) while the step runs: a partial result,
        streamed tokens. Emits that come faster than one event per STEP_EVENT_INTERVAL_SECONDS
        are batched into one ``step.emitted`` event (``items``, in order); past
        MAX_EMIT_BATCH_BYTES waiting, further ones are dropped and counted (``dropped``)."""
        text = encode(data, "emit()'s data", MAX_EMIT_BYTES)
        if self._publisher is None:
            return
        self._publisher.emit(json.loads(text), _size(text))

    def tool_event(self, event: ToolCall | ToolResult) -> None:
        """Publish an agent's tool call or its result as a ``step.tool_call`` / ``step.tool_result``
        event (data: the model's fields, ``attempt``, ``item``), in order with the emitted data and
        within its bound (past it, counted as dropped on the next ``step.emitted`` event)."""
        if not isinstance(event, ToolCall | ToolResult):
            raise StepContextError(f"tool_event() takes a ToolCall or a ToolResult, not {type(event).__name__}")
        if self._publisher is None:
            return
        kind = TOOL_CALL_EVENT if isinstance(event, ToolCall) else TOOL_RESULT_EVENT
        data = event.model_dump(mode="json")
        self._publisher.emit(data, _size(json.dumps(data, ensure_ascii=False)), kind)

    def flush(self) -> None:
        """Publish what waits now (the worker does it when the attempt ends)."""
        if self._publisher is not None:
            self._publisher.flush()

    @contextlib.contextmanager
    def active(self, process_wide: bool = True) -> Iterator[StepContext]:
        """Make this the context :func:`step_context` returns while the block runs; publish
        what waits when it ends, whether the attempt succeeded or not. ``process_wide``: also
        for threads the code starts (a worker runs one attempt at a time; an agent replica
        that runs several calls at once passes False)."""
        global _process_current
        token = _current.set(self)
        previous = _process_current
        if process_wide:
            _process_current = self
        try:
            yield self
        finally:
            _current.reset(token)
            if process_wide:
                _process_current = previous
            if self._publisher is not None:
                self._publisher.close()


def step_context() -> StepContext:
    """The context of the attempt this code runs in (a detached one outside a run)."""
    ctx = _current.get() or _process_current
    return ctx if ctx is not None else StepContext()
