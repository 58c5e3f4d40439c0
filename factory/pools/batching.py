"""Calls to one replica made in the same turn of an event loop go to it as one actor call.

Through Ray, most of a fast agent's cost is the actor call itself (submitting it, and
awaiting its result in the caller's event loop), not the agent. A :class:`Batcher` belongs
to one event loop: a call to a replica that batches (an async replica, ``call_batch``) waits
for the end of the current turn of the loop, and every call to the same replica made in that
turn is sent with it. A turn without other calls sends the call alone, as before, so a lone
request pays nothing. The replica answers a batch with the outcomes of the calls that finished
quickly and a token for each still running, which the caller then collects on its own
(``result``): a slow call never holds back the others of its batch.

Each caller gets an asyncio future; Ray's errors (a dead replica: ``RayActorError``) reach
every caller of the batch, and each handles them as it would for a call sent alone.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from factory.runtime import Outcome

MAX_BATCH = 64  # calls in one actor call at most

CallArgs = tuple[Any, Any, Any, Any]  # task, meta, retry, timeout: the arguments of a replica's call


def send_alone(handle: Any, args: CallArgs) -> Any:
    """One call as one actor call (an ObjectRef[Outcome])."""
    task, meta, retry, timeout = args
    if meta is None and retry is None and timeout is None:
        return handle.call.remote(task)
    return handle.call.remote(task, meta, retry, timeout)


class Batcher:
    """Groups the calls of one event-loop turn by replica. Use from its loop's thread only."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_batch: int = MAX_BATCH) -> None:
        self.loop = loop
        self.max_batch = max_batch
        self._pending: dict[str, tuple[Any, list[tuple[CallArgs, asyncio.Future[Outcome]]]]] = {}
        self._refs: dict[asyncio.Future[Outcome], Any] = {}  # the ObjectRef each caller now awaits
        self._tasks: set[asyncio.Task[None]] = set()
        self.actor_calls = 0  # call, call_batch and result calls sent (for tests and benchmarks)

    def send(self, replica_id: str, handle: Any, args: CallArgs) -> asyncio.Future[Outcome]:
        """The future of one call's Outcome; it may raise Ray's errors (``RayActorError``...)."""
        future: asyncio.Future[Outcome] = self.loop.create_future()
        entry = self._pending.get(replica_id)
        if entry is None:
            entry = self._pending[replica_id] = (handle, [])
            self.loop.call_soon(self._flush, replica_id)
        entry[1].append((args, future))
        if len(entry[1]) >= self.max_batch:
            self._flush(replica_id)
        future.add_done_callback(self._cancel_if_abandoned)
        return future

    def cancel(self, future: asyncio.Future[Outcome]) -> None:
        """Stop the call behind ``future`` if it runs alone or is parked (a caller's timeout)."""
        ref = self._refs.pop(future, None)
        if ref is not None:
            ray.cancel(ref)

    def _cancel_if_abandoned(self, future: asyncio.Future[Outcome]) -> None:
        if future.cancelled():  # the caller was cancelled (a cancelled run): stop its work too
            self.cancel(future)
        else:
            self._refs.pop(future, None)

    def _flush(self, replica_id: str) -> None:
        entry = self._pending.pop(replica_id, None)
        if entry is None:
            return
        handle, calls = entry
        calls = [(args, future) for args, future in calls if not future.done()]
        if not calls:
            return
        self.actor_calls += 1
        if len(calls) == 1:
            args, future = calls[0]
            ref = send_alone(handle, args)
            self._refs[future] = ref
            self._spawn(self._deliver(ref, future))
        else:
            ref = handle.call_batch.remote([args for args, _ in calls])
            self._spawn(self._deliver_batch(handle, ref, [future for _, future in calls]))

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, ref: Any, future: asyncio.Future[Outcome]) -> None:
        try:
            outcome = await ref
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who decides
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(outcome)

    async def _deliver_batch(self, handle: Any, ref: Any, futures: list[asyncio.Future[Outcome]]) -> None:
        try:
            answers: list[Outcome | int] = await ref
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except BaseException as exc:  # noqa: BLE001 - every caller of the batch sees it
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for answer, future in zip(answers, futures, strict=True):
            if isinstance(answer, Outcome):
                if not future.done():
                    future.set_result(answer)
            elif future.cancelled():  # its caller stopped waiting meanwhile: stop the call too
                self.actor_calls += 1
                handle.drop.remote(answer)
            elif not future.done():
                self.actor_calls += 1
                parked = handle.result.remote(answer)
                self._refs[future] = parked
                self._spawn(self._deliver(parked, future))
