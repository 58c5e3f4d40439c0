"""A replica: one Ray actor wrapping one Agent instance.

Two actor classes, one per kind of ``handle``: a threaded actor for a sync
``handle`` (``max_concurrency`` threads) and an async actor for an async one
(``max_concurrency`` coroutines). Both keep health checks in their own
concurrency group, so a busy replica still answers them. ``call`` never raises
for an agent's error: it comes back in the Outcome, classified as retryable or not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import json
import os
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

import ray

from factory.agent import Agent, HealthReport, load_agent_class
from factory.catalog import AgentSpec
from factory.errors import StepTimeoutError
from factory.pools.models import ReplicaHealth
from factory.retry import is_retryable
from factory.runtime import MAX_LOG_CHARS, Outcome, encode_output, settle
from factory.spec import RetryPolicy
from factory.stepcontext import CONTEXT_META, StepContext

CONTROL_GROUP = "control"
RESULTS_GROUP = "results"  # awaiting a batch's parked calls never waits behind new work
# A batch answers when its calls have finished, or earlier when none finished for BATCH_LINGER
# seconds (BATCH_FIRST_WAIT before the first: calls running side by side tend to finish together)
BATCH_FIRST_WAIT = 0.05
BATCH_LINGER = 0.005
PARKED_TTL = 60.0  # seconds a parked call's outcome waits for its caller to collect it
_DEFAULT_RETRY = RetryPolicy()


class ReplicaCore:
    """The agent instance and its counters; shared by both actor classes (and usable without Ray)."""

    def __init__(self, replica_id: str, spec: AgentSpec, agent: type[Agent] | str, search_path: Sequence[str]) -> None:
        agent_cls = load_agent_class(agent, search_path) if isinstance(agent, str) else agent
        self.replica_id = replica_id
        self.agent_name = spec.name
        self.agent = agent_cls(spec.config)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.served = 0
        self.failed = 0
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def begin(self) -> float:
        with self._lock:
            self.in_flight += 1
        return time.perf_counter()

    def abandon(self) -> None:
        """A call stopped from outside (cancelled): no longer in flight, neither served nor failed."""
        with self._lock:
            self.in_flight -= 1

    def succeed(self, value: Any, meta: dict[str, Any] | None, started: float) -> Outcome:
        try:
            wrapped = value if meta is None else {**meta, "replica": self.replica_id, "result": value}
            output_json = encode_output(wrapped)
        except Exception as exc:  # noqa: BLE001 - reported in the Outcome
            return self.fail(exc, None, started)
        with self._lock:
            self.in_flight -= 1
            self.served += 1
        usage = value.get("usage") if isinstance(value, dict) else None
        return Outcome(
            ok=True,
            output_json=output_json,
            duration=time.perf_counter() - started,
            extra={
                "agent": self.agent_name,
                "replica": self.replica_id,
                **({"usage": usage} if isinstance(usage, dict) else {}),  # counted against budgets
            },
        )

    def fail(self, exc: BaseException, retry: RetryPolicy | None, started: float) -> Outcome:
        with self._lock:
            self.in_flight -= 1
            self.failed += 1
        tail = "".join(traceback.format_exception(exc)[-6:])
        usage = getattr(exc, "usage", None)
        if isinstance(usage, dict):  # tokens a failed model call spent: kept with the attempt's logs
            tail += f"usage: {json.dumps(usage, default=str)[:2000]}\n"
        return Outcome(
            ok=False,
            error=f"{type(exc).__name__}: {exc}",
            error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            retryable=is_retryable(exc, retry or _DEFAULT_RETRY),
            logs=f"agent {self.agent_name!r} replica {self.replica_id}:\n{tail}"[-MAX_LOG_CHARS:],
            duration=time.perf_counter() - started,
            extra={
                "agent": self.agent_name,
                "replica": self.replica_id,
                **({"usage": usage} if isinstance(usage, dict) else {}),
            },
        )

    def report(self, result: Any) -> ReplicaHealth:
        if isinstance(result, HealthReport):
            healthy, detail = result.healthy, result.detail
        else:
            healthy, detail = bool(result), ""
        return ReplicaHealth(
            replica_id=self.replica_id,
            healthy=healthy,
            detail=detail,
            in_flight=self.in_flight,
            served=self.served,
            failed=self.failed,
            pid=os.getpid(),
            node_id=self.node_id,
        )

    def broken(self, exc: BaseException) -> ReplicaHealth:
        return ReplicaHealth(
            replica_id=self.replica_id,
            healthy=False,
            detail=f"health() raised {type(exc).__name__}: {exc}",
            in_flight=self.in_flight,
            served=self.served,
            failed=self.failed,
            pid=os.getpid(),
            node_id=self.node_id,
        )


def _agent_context(meta: dict[str, Any] | None) -> tuple[contextlib.AbstractContextManager[Any], dict[str, Any] | None]:
    """The step context an agent's ``handle`` sees (progress and emit; its once() is refused, an
    agent call not knowing its attempt and item yet), and the meta without it."""
    if not meta or CONTEXT_META not in meta:
        return contextlib.nullcontext(), meta
    info = meta[CONTEXT_META]
    rest = {k: v for k, v in meta.items() if k != CONTEXT_META}
    ctx = StepContext(
        run_id=info.get("run_id"), step_id=info.get("step_id"), store_url=info.get("store_url"), once_allowed=False
    )
    return ctx.active(process_wide=False), rest


class SyncReplicaActor:
    """A replica for an agent whose ``handle`` is a plain function (runs on up to max_concurrency threads)."""

    def __init__(self, replica_id: str, spec: AgentSpec, agent: type[Agent] | str, search_path: Sequence[str]) -> None:
        self._core = ReplicaCore(replica_id, spec, agent, search_path)

    def call(
        self,
        task: Any,
        meta: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> Outcome:
        """Run the task on this thread. A thread cannot be stopped: the caller stops waiting at ``timeout``."""
        core = self._core
        started = core.begin()
        context, meta = _agent_context(meta)
        try:
            with context:
                value = settle(core.agent.handle(core.agent.prepare_task(task)))
        except Exception as exc:  # noqa: BLE001 - an agent's error goes back in the Outcome
            return core.fail(exc, retry, started)
        return core.succeed(value, meta, started)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def health(self) -> ReplicaHealth:
        try:
            result: Any = settle(self._core.agent.health())
        except Exception as exc:  # noqa: BLE001 - an unhealthy replica
            return self._core.broken(exc)
        return self._core.report(result)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def ready(self) -> int:
        return os.getpid()


class AsyncReplicaActor:
    """A replica for an agent whose ``handle`` is ``async def`` (up to max_concurrency coroutines at once).

    Besides ``call``, callers may send several calls at once with ``call_batch`` (one actor call
    instead of many: most of a fast agent's cost through Ray is the call, not the agent). A batch
    answers when its calls have finished, or earlier when none of them finished for a moment
    (``BATCH_FIRST_WAIT``, then ``BATCH_LINGER``): a call still running then is parked, and its
    caller collects it with ``result`` (or stops it with ``drop``), so a slow call never holds
    back the others. Calls sent alone and batched calls share the replica's ``max_concurrency``.
    """

    def __init__(self, replica_id: str, spec: AgentSpec, agent: type[Agent] | str, search_path: Sequence[str]) -> None:
        self._core = ReplicaCore(replica_id, spec, agent, search_path)
        self._slots = asyncio.Semaphore(spec.pool.max_concurrency)
        self._parked: dict[int, asyncio.Task[Outcome]] = {}
        self._next_token = 0

    async def call_batch(self, calls: list[tuple[Any, ...]]) -> list[Outcome | int]:
        """Run the calls (each the arguments of ``call``): an Outcome for each that finished, a
        token for ``result`` for each still running when the batch answers."""
        tasks = [asyncio.ensure_future(self.call(*args)) for args in calls]
        running, wait = set(tasks), BATCH_FIRST_WAIT
        while running:
            done, running = await asyncio.wait(running, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break
            wait = BATCH_LINGER
        answers: list[Outcome | int] = []
        for task in tasks:
            if task.done():
                answers.append(task.result())  # call() never raises for an agent's error
            else:
                answers.append(self._park(task))
        return answers

    def _park(self, task: asyncio.Task[Outcome]) -> int:
        self._next_token += 1
        token = self._next_token
        self._parked[token] = task
        loop = asyncio.get_running_loop()

        def expire(_: object) -> None:  # a caller that never collects (it was cancelled)
            loop.call_later(PARKED_TTL, self._parked.pop, token, None)

        task.add_done_callback(expire)
        return token

    @ray.method(concurrency_group=RESULTS_GROUP)
    async def result(self, token: int) -> Outcome:
        """The outcome of a parked call. Cancelling this cancels the call.

        Ray runs each concurrency group in an event loop of its own: the parked call lives in
        the default group's loop, and its outcome crosses to this one through a thread-safe future.
        """
        task = self._parked.get(token)
        if task is None:
            raise KeyError(f"no parked call {token} on replica {self._core.replica_id} (collected, or expired)")
        crossing: concurrent.futures.Future[Outcome] = concurrent.futures.Future()

        def pass_on(done: asyncio.Task[Outcome]) -> None:
            if crossing.done():  # the caller stopped waiting
                return
            if done.cancelled():
                crossing.cancel()
            elif done.exception() is not None:
                crossing.set_exception(done.exception())
            else:
                crossing.set_result(done.result())

        home = task.get_loop()
        home.call_soon_threadsafe(task.add_done_callback, pass_on)
        try:
            return await asyncio.wrap_future(crossing)
        except asyncio.CancelledError:
            home.call_soon_threadsafe(task.cancel)
            raise
        finally:
            self._parked.pop(token, None)

    @ray.method(concurrency_group=RESULTS_GROUP)
    async def drop(self, token: int) -> None:
        """Cancel a parked call whose caller stopped waiting before the batch answered."""
        task = self._parked.pop(token, None)
        if task is not None:
            task.get_loop().call_soon_threadsafe(task.cancel)

    async def call(
        self,
        task: Any,
        meta: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> Outcome:
        async with self._slots:  # calls sent alone and batched calls share max_concurrency
            return await self._run(task, meta, retry, timeout)

    async def _run(
        self, task: Any, meta: dict[str, Any] | None, retry: RetryPolicy | None, timeout: float | None
    ) -> Outcome:
        core = self._core
        started = core.begin()
        context, meta = _agent_context(meta)
        try:
            with context:
                pending = core.agent.handle(core.agent.prepare_task(task))
                if timeout is not None:
                    try:
                        value = await asyncio.wait_for(pending, timeout)
                    except TimeoutError:
                        raise StepTimeoutError(
                            f"agent {core.agent_name!r} ran past the step's timeout of {timeout:g}s and was stopped"
                        ) from None
                else:
                    value = await pending
        except asyncio.CancelledError:  # ray.cancel(): the caller stopped waiting, or the run was cancelled
            core.abandon()
            raise
        except Exception as exc:  # noqa: BLE001 - an agent's error goes back in the Outcome
            return core.fail(exc, retry, started)
        return core.succeed(value, meta, started)

    @ray.method(concurrency_group=CONTROL_GROUP)
    async def health(self) -> ReplicaHealth:
        try:
            result: Any = self._core.agent.health()
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:  # noqa: BLE001 - an unhealthy replica
            return self._core.broken(exc)
        return self._core.report(result)

    @ray.method(concurrency_group=CONTROL_GROUP)
    async def ready(self) -> int:
        return os.getpid()


# ray.remote's type hints do not know actor options such as concurrency_groups.
SyncReplica: Any = ray.remote(concurrency_groups={CONTROL_GROUP: 1}, max_restarts=0)(  # type: ignore[call-overload]
    SyncReplicaActor
)
AsyncReplica: Any = ray.remote(  # type: ignore[call-overload]
    concurrency_groups={CONTROL_GROUP: 1, RESULTS_GROUP: 10_000}, max_restarts=0
)(AsyncReplicaActor)


def replica_actor_options(spec: AgentSpec) -> dict[str, Any]:
    """Ray options of one replica, from the catalogue's pool config."""
    pool = spec.pool
    options: dict[str, Any] = {"max_concurrency": pool.max_concurrency, "num_cpus": pool.num_cpus}
    if pool.num_gpus:
        options["num_gpus"] = pool.num_gpus
    if pool.memory:
        options["memory"] = pool.memory
    if pool.resources:
        options["resources"] = dict(pool.resources)
    if pool.spread:
        options["scheduling_strategy"] = "SPREAD"
    return options
