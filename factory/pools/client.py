"""The caller's side of a pool: power-of-two-choices, a bounded queue, a breaker, failover.

A :class:`PoolClient` lives in the process that sends requests (a workflow
coordinator, the API, a benchmark). It holds the pool's membership (a
snapshot from the agent manager, refreshed in the background when its version
moves) and counts its own requests in flight per replica. To send one it picks
two live replicas at random and takes the one with fewer requests in flight
(power of two choices), so no shared state and no manager sits on the
request path.

Capacity is ``replicas x max_concurrency``; up to ``max_queued`` requests more
are sent and wait in the replicas' queues; beyond that the client raises
:class:`PoolSaturated` at once instead of growing memory without bound. The
engine's :class:`CircuitBreaker` wraps the pool: failures the agent reports as
retryable (and dead replicas) count against it; an open breaker refuses calls.

If a replica dies while it serves a request (killed, out of memory), the
request goes to another replica; if none is left, the client waits (up to
``failover_wait`` seconds) for the manager to start a replacement.

Two ways to call:
- ``await client.call(task)`` runs in the caller's event loop and talks to the
  replicas directly (the fast path, used by the benchmark and async services);
- ``client.submit(task)`` returns an ``ObjectRef[Outcome]`` at once, as the
  workflow engine needs; a small async actor of this process (the relay)
  awaits the replica and does the failover, and the client's counters are
  settled by a callback when that reference is ready.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
import weakref
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, TaskCancelledError

from factory.breaker import CircuitBreaker
from factory.errors import AgentError, CircuitOpenError, PoolSaturated, StepTimeoutError
from factory.pools.batching import Batcher, CallArgs, send_alone
from factory.pools.models import ClientPoolStats, PoolSnapshot
from factory.runtime import Outcome
from factory.spec import RetryPolicy

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_FAILOVER_WAIT = 15.0
RELAY_UPDATE_WAIT = 5.0  # seconds the relay waits for a membership its caller sent just before
TIMEOUT_GRACE = 1.0  # the caller waits this much past a step's timeout for the replica's own answer


@dataclass(eq=False, slots=True)
class _Member:
    replica_id: str
    handle: Any
    batched: bool = False
    in_flight: int = 0
    dead: bool = False


def _timeout_outcome(pool: str, timeout: float, retry: RetryPolicy | None) -> Outcome:
    from factory.retry import is_retryable

    exc = StepTimeoutError(f"agent pool {pool!r} did not answer within the step's timeout of {timeout:g}s")
    return Outcome(
        ok=False,
        error=f"StepTimeoutError: {exc}",
        error_type="factory.errors.StepTimeoutError",
        retryable=is_retryable(exc, retry or RetryPolicy()),
    )


def _broken_outcome(pool: str, exc: BaseException) -> Outcome:
    first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return Outcome(
        ok=False,
        error=f"AgentError: the call to agent pool {pool!r} failed outside the agent: {first}",
        error_type="factory.errors.AgentError",
        retryable=False,
    )


def _lost_outcome(pool: str, dead: list[str]) -> Outcome:
    return Outcome(
        ok=False,
        error=(
            f"AgentError: every replica of agent pool {pool!r} that took this request died "
            f"({', '.join(dead)}) and no replacement came up in time; see `factory agents` / the manager's logs"
        ),
        error_type="factory.errors.AgentError",
        retryable=True,
        extra={"dead": dead},
    )


def _send(
    batcher: Batcher, replica_id: str, handle: Any, batched: bool, args: CallArgs
) -> tuple[Awaitable[Outcome], Any]:
    """Send one call: with the others of this loop turn to a replica that batches, else alone.
    Returns what to await, and what to cancel when the caller stops waiting."""
    if batched:
        future = batcher.send(replica_id, handle, args)
        return future, future
    ref = send_alone(handle, args)
    return ref, ref


def _cancel(batcher: Batcher, pending: Any) -> None:
    if isinstance(pending, asyncio.Future):
        batcher.cancel(pending)
    else:
        ray.cancel(pending)


class RelayActor:
    """Awaits a replica for a caller that needs an ObjectRef now, and fails over if the replica dies.

    It keeps each pool's actor handles (sent by the caller when the membership changes), so a
    request names its candidate replicas by id instead of carrying handles.
    """

    def __init__(self, manager: Any = None) -> None:
        self.manager = manager
        self.members: dict[str, tuple[int, dict[str, tuple[Any, bool]]]] = {}
        self._batcher: Batcher | None = None

    async def update(self, pool: str, version: int, replicas: list[tuple[str, Any, bool]]) -> None:
        if self.members.get(pool, (-1, {}))[0] <= version:
            self.members[pool] = (version, {rid: (handle, batched) for rid, handle, batched in replicas})

    async def _known(self, pool: str, version: int) -> dict[str, tuple[Any, bool]]:
        """The pool's handles at ``version`` or later. An async actor may start ``forward`` before the
        ``update`` the caller sent first, so wait a little for it."""
        deadline = time.monotonic() + RELAY_UPDATE_WAIT
        while self.members.get(pool, (-1, {}))[0] < version and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        return self.members.get(pool, (-1, {}))[1]

    async def forward(
        self,
        pool: str,
        version: int,
        candidate_ids: list[str],
        task: Any,
        meta: dict[str, Any] | None,
        retry: RetryPolicy | None,
        timeout: float | None,
        max_attempts: int,
        failover_wait: float,
    ) -> Outcome:
        manager = self.manager
        if self._batcher is None:
            self._batcher = Batcher(asyncio.get_running_loop())
        batcher = self._batcher
        known = await self._known(pool, version)
        candidates = [(rid, *known[rid]) for rid in candidate_ids if rid in known]
        dead: list[str] = []
        queue = list(candidates)
        for _ in range(max_attempts):
            if not queue and manager is not None:
                try:
                    snapshot: PoolSnapshot = await asyncio.wait_for(
                        manager.await_replicas.remote(pool, dead, failover_wait), failover_wait + 5
                    )
                    replicas = [(r.replica_id, r.handle, r.batched) for r in snapshot.replicas]
                    await self.update(pool, snapshot.version, replicas)
                    queue = [replica for replica in replicas if replica[0] not in dead]
                except Exception:
                    log.warning("agent manager did not answer for pool %s", pool, exc_info=True)
            if not queue:
                break
            replica_id, handle, batched = queue.pop(0)
            answer, pending = _send(batcher, replica_id, handle, batched, (task, meta, retry, timeout))
            try:
                if timeout is not None:
                    outcome: Outcome = await asyncio.wait_for(answer, timeout + TIMEOUT_GRACE)
                else:
                    outcome = await answer
            except RayActorError:
                dead.append(replica_id)
                if manager is not None:
                    manager.replica_died.remote(pool, replica_id)
                continue
            except TimeoutError:
                _cancel(batcher, pending)
                outcome = _timeout_outcome(pool, timeout or 0, retry)
            except RayError as exc:
                outcome = _broken_outcome(pool, exc)
            outcome.extra = {**outcome.extra, "replica": replica_id, "dead": dead}
            return outcome
        return _lost_outcome(pool, dead)


Relay: Any = ray.remote(num_cpus=0, max_concurrency=10_000)(RelayActor)  # type: ignore[call-overload]


class PoolClient:
    """Sends requests to one pool's replicas. Thread-safe; see the module docstring."""

    def __init__(
        self,
        snapshot: PoolSnapshot,
        *,
        manager: Any = None,
        relay: Any = None,
        breaker: CircuitBreaker | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        failover_wait: float = DEFAULT_FAILOVER_WAIT,
        seed: int | None = None,
    ) -> None:
        self.name = snapshot.name
        self.spec = snapshot.spec
        self.manager = manager
        self._relay = relay
        self.breaker = breaker or CircuitBreaker(f"pool:{snapshot.name}")
        self.max_attempts = max_attempts
        self.failover_wait = failover_wait
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._members: list[_Member] = []
        self._live: list[_Member] = []
        self._total = 0
        self.version = -1
        self.rejected = 0
        self.stale = False  # a replica died: the membership should be refreshed
        self._relay_version = -1
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Batcher] = weakref.WeakKeyDictionary()
        self.apply(snapshot)

    # -- membership ----------------------------------------------------------------------------

    def apply(self, snapshot: PoolSnapshot) -> None:
        """Take a new membership; in-flight counts of replicas that stay are kept."""
        with self._lock:
            old = {m.replica_id: m for m in self._members}
            members = []
            for ref in snapshot.replicas:
                # ids are never reused: a replica seen dead stays dead until the manager drops it
                members.append(old.get(ref.replica_id) or _Member(ref.replica_id, ref.handle, ref.batched))
            self._members = members
            self._live = [m for m in members if not m.dead]
            self.spec = snapshot.spec
            self.version = snapshot.version
            self.stale = False

    def _mark_dead(self, replica_id: str) -> None:
        with self._lock:
            for member in self._members:
                if member.replica_id == replica_id:
                    member.dead = True
            self._live = [m for m in self._members if not m.dead]
            self.stale = True
        if self.manager is not None:
            self.manager.replica_died.remote(self.name, replica_id)

    @property
    def replicas(self) -> int:
        return len(self._live)

    @property
    def capacity(self) -> int:
        return len(self._live) * self.spec.pool.max_concurrency

    @property
    def in_flight(self) -> int:
        return self._total

    @property
    def queued(self) -> int:
        return max(0, self._total - self.capacity)

    def handles(self) -> dict[str, Any]:
        """Live replicas' actor handles by replica id."""
        with self._lock:
            return {m.replica_id: m.handle for m in self._live}

    def in_flight_by_replica(self) -> dict[str, int]:
        with self._lock:
            return {m.replica_id: m.in_flight for m in self._members}

    def stats(self) -> ClientPoolStats:
        return ClientPoolStats(
            in_flight=self._total, queued=self.queued, breaker=self.breaker.state.value, rejected=self.rejected
        )

    # -- choosing ------------------------------------------------------------------------------

    def _pick(self, exclude: tuple[str, ...] = ()) -> _Member | None:
        """Power of two choices among live replicas; counts the request on the one chosen. Holds the lock."""
        live = self._live if not exclude else [m for m in self._live if m.replica_id not in exclude]
        n = len(live)
        if n == 0:
            return None
        if n == 1:
            member = live[0]
        else:
            i = self._rng.randrange(n)
            j = self._rng.randrange(n - 1)
            if j >= i:
                j += 1
            a, b = live[i], live[j]
            member = a if a.in_flight <= b.in_flight else b
        member.in_flight += 1
        self._total += 1
        return member

    def _start(self) -> _Member | None:
        """Admission: the bounded queue, then the breaker; then pick a replica (None: none is live)."""
        with self._lock:
            limit = len(self._live) * self.spec.pool.max_concurrency + self.spec.pool.max_queued
            if self._total >= limit and self._live:
                self.rejected += 1
                raise PoolSaturated(
                    self.name, self._total, limit - self.spec.pool.max_queued, self.spec.pool.max_queued
                )
        if not self.breaker.allow():
            raise CircuitOpenError(self.breaker.name, self.breaker.retry_after())
        with self._lock:
            member = self._pick()
            if member is None:
                self._total += 1  # counted while it waits for a replica
            return member

    def _release(self, member: _Member | None) -> None:
        with self._lock:
            if member is not None:
                member.in_flight -= 1
            self._total -= 1

    def _settle(self, outcome: Outcome) -> None:
        if outcome.ok or not outcome.retryable:
            self.breaker.record_success()
        else:
            self.breaker.record_failure()

    async def _await_member(self, dead: list[str]) -> _Member | None:
        """No live replica: ask the manager (off the hot path) for one that is not among ``dead``."""
        if self.manager is None:
            return None
        try:
            snapshot = await asyncio.wait_for(
                self.manager.await_replicas.remote(self.name, dead, self.failover_wait), self.failover_wait + 5
            )
        except Exception:
            log.warning("agent manager did not answer for pool %s", self.name, exc_info=True)
            return None
        self.apply(snapshot)
        with self._lock:
            member = self._pick(tuple(dead))
            if member is not None:
                self._total -= 1  # _pick counted it again; the request was already counted
            return member

    # -- calling -------------------------------------------------------------------------------

    def _batcher(self) -> Batcher:
        """This event loop's batcher (a client may be used from several threads, each its loop)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            batcher = self._batchers.get(loop)
            if batcher is None:
                batcher = self._batchers[loop] = Batcher(loop)
            return batcher

    async def call(
        self,
        task: Any,
        *,
        meta: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> Outcome:
        """Send one task and await its Outcome. Raises PoolSaturated or CircuitOpenError when refused."""
        member = self._start()
        batcher = self._batcher()
        dead: list[str] = []
        counted = True
        try:
            for _ in range(self.max_attempts):
                if member is None:
                    member = await self._await_member(dead)
                    if member is None:
                        break
                args = (task, meta, retry, timeout)
                answer, pending = _send(batcher, member.replica_id, member.handle, member.batched, args)
                try:
                    if timeout is None:
                        outcome: Outcome = await answer
                    else:
                        outcome = await asyncio.wait_for(answer, timeout + TIMEOUT_GRACE)
                except RayActorError:
                    dead.append(member.replica_id)
                    self._mark_dead(member.replica_id)
                    with self._lock:
                        member.in_flight -= 1
                        member = self._pick(tuple(dead))
                        if member is not None:
                            self._total -= 1
                    continue
                except TimeoutError:
                    _cancel(batcher, pending)
                    outcome = _timeout_outcome(self.name, timeout or 0, retry)
                except RayError as exc:
                    outcome = _broken_outcome(self.name, exc)
                if dead:
                    outcome.extra = {**outcome.extra, "dead": dead}
                self._release(member)
                counted = False
                self._settle(outcome)
                return outcome
            outcome = _lost_outcome(self.name, dead)
            self._settle(outcome)
            return outcome
        finally:
            if counted:
                self._release(member)

    def submit(
        self,
        task: Any,
        *,
        meta: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send one task; return an ObjectRef[Outcome] at once (through this process's relay actor)."""
        if self._relay is None:
            raise AgentError("this PoolClient has no relay actor; use `await client.call(task)` or Pools.ensure()")
        member = self._start()
        with self._lock:
            others = sorted((m for m in self._live if m is not member), key=lambda m: m.in_flight)
            members = list(self._members)
            version = self.version
        chosen = [member, *others][: self.max_attempts] if member is not None else others
        if self._relay_version != version:  # the relay learns the handles once per membership
            self._relay.update.remote(self.name, version, [(m.replica_id, m.handle, m.batched) for m in members])
            self._relay_version = version
        ref = self._relay.forward.remote(
            self.name,
            version,
            [m.replica_id for m in chosen],
            task,
            meta,
            retry,
            timeout,
            self.max_attempts,
            self.failover_wait,
        )
        ref.future().add_done_callback(lambda fut: self._done(member, fut))
        return ref

    def _done(self, member: _Member | None, fut: Any) -> None:
        self._release(member)
        try:
            outcome: Outcome = fut.result()
        except (TaskCancelledError, asyncio.CancelledError):
            return  # the caller cancelled it (a cancelled run): not the pool's failure
        except Exception as exc:  # noqa: BLE001 - the relay itself failed
            self.breaker.record_failure()
            log.warning("relay for pool %s failed: %s", self.name, exc)
            return
        for replica_id in outcome.extra.get("dead", []):
            self._mark_dead(replica_id)
        self._settle(outcome)

    def ask(self, task: Any, *, timeout: float | None = None) -> Any:
        """Blocking convenience: send a task, return the agent's result (decoded JSON) or raise AgentError."""
        outcome: Outcome = ray.get(self.submit(task, timeout=timeout))
        if not outcome.ok:
            raise AgentError(f"agent {self.name!r} failed: {outcome.error}")
        return json.loads(outcome.output_json or "null")


class Reporter:
    """A daemon thread: reports each client's load to the manager and refreshes stale memberships."""

    def __init__(self, manager: Any, clients: dict[str, PoolClient], client_id: str, interval: float) -> None:
        self.manager = manager
        self.clients = clients
        self.client_id = client_id
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"factory-pools-{client_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:
                log.debug("pool report failed", exc_info=True)

    def tick(self) -> None:
        clients = dict(self.clients)
        if not clients:
            return
        stats = {name: client.stats() for name, client in clients.items()}
        versions: dict[str, int] = ray.get(self.manager.report.remote(self.client_id, stats), timeout=10)
        for name, client in clients.items():
            version = versions.get(name, -1)
            if version >= 0 and (version != client.version or client.stale):
                client.apply(ray.get(self.manager.snapshot.remote(name), timeout=10))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
