"""The agent manager: a named, detached Ray actor that owns the pools.

It registers, unregisters and describes agents (``discover``), starts their
replicas, checks each replica's health every ``check_interval`` seconds
(``Agent.health()``, answered in the replica's control concurrency group even
when it is busy), replaces a replica that died or failed ``unhealthy_after``
checks in a row, scales each pool between ``min_replicas`` and
``max_replicas`` on the queue depth its callers report, and drains replicas
(no new requests, then wait for in-flight work) before it stops them.

A pool with ``min_replicas: 0`` scales to zero: it starts with one replica
(a pool is registered when it is first used), and its last replica stops after
``scale_down_after`` quiet checks. The next request finds no replica and asks
the manager for one (``await_replicas``), which starts it: the request waits
for a replica's start-up, about a second on a warm node.

It is never on the per-request path: callers hold the pool's membership and
send requests to replicas themselves (see :mod:`factory.pools.client`). They
call the manager to register a pool, every half second to report their load
and learn the membership's version, and when a replica dies under them.

Replicas are owned by the manager (they are not detached), so killing the
manager stops every pool with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError

from factory.agent import Agent
from factory.catalog import AgentSpec
from factory.errors import AgentError
from factory.pools.models import (
    AgentInfo,
    ClientPoolStats,
    ManagerConfig,
    PoolSnapshot,
    ReplicaHealth,
    ReplicaInfo,
    ReplicaRef,
)
from factory.pools.replica import AsyncReplica, SyncReplica, replica_actor_options

log = logging.getLogger(__name__)

NAMESPACE = "factory"
DEFAULT_MANAGER_NAME = "factory-agent-manager"
_BREAKER_RANK = {"closed": 0, "half_open": 1, "open": 2}


@dataclass
class _Replica:
    replica_id: str
    handle: Any
    failures: int = 0
    health: ReplicaHealth | None = None


@dataclass
class _Pool:
    spec: AgentSpec
    agent: type[Agent] | str
    search_path: tuple[str, ...]
    is_async: bool
    replicas: dict[str, _Replica] = field(default_factory=dict)
    version: int = 0
    started: int = 0
    quiet_checks: int = 0
    draining: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def floor(self) -> int:
        """Fewest replicas the pool keeps: min_replicas, which may be 0 (scale to zero)."""
        return self.spec.pool.min_replicas

    @property
    def initial(self) -> int:
        """Replicas started at registration: at least one, since a pool is registered when first used."""
        return max(self.spec.pool.min_replicas, 1)


def _pool_health(healthy: int, replicas: int) -> str:
    """healthy, degraded, down (replicas but none healthy) or idle (scaled to zero: starts on the next request)."""
    if replicas == 0:
        return "idle"
    if healthy == 0:
        return "down"
    return "healthy" if healthy == replicas else "degraded"


def _cause(exc: BaseException) -> str:
    """The useful line of a replica's start-up failure."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":", 1)[0]:
            return line
    return lines[-1] if lines else type(exc).__name__


class AgentManager:
    """See the module docstring. Create it with :func:`get_manager`."""

    def __init__(self, config: ManagerConfig | None = None) -> None:
        self.config = config or ManagerConfig()
        self.pools: dict[str, _Pool] = {}
        self.reports: dict[str, tuple[float, dict[str, ClientPoolStats]]] = {}
        self._register_locks: dict[str, asyncio.Lock] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = False

    # -- lifecycle -----------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None and not self._stopping:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.config.check_interval)
            for pool in list(self.pools.values()):
                try:
                    await self._check(pool)
                except Exception:
                    log.exception("checking pool %s failed", pool.spec.name)

    async def ping(self) -> str:
        self._ensure_loop()
        return "ok"

    # -- replicas ------------------------------------------------------------------------------

    async def _start_replica(self, pool: _Pool) -> _Replica:
        pool.started += 1
        replica_id = f"{pool.spec.name}-{pool.started}-{uuid.uuid4().hex[:4]}"
        actor_cls: Any = AsyncReplica if pool.is_async else SyncReplica
        handle = actor_cls.options(**replica_actor_options(pool.spec)).remote(
            replica_id, pool.spec, pool.agent, pool.search_path
        )
        try:
            await asyncio.wait_for(handle.ready.remote(), self.config.start_timeout)
        except RayActorError as exc:
            ray.kill(handle)
            raise AgentError(f"a replica of agent {pool.spec.name!r} failed to start: {_cause(exc)}") from None
        except TimeoutError:
            ray.kill(handle)
            raise AgentError(
                f"a replica of agent {pool.spec.name!r} did not start within {self.config.start_timeout:g}s; "
                f"the cluster may lack the resources it asks for (num_cpus={pool.spec.pool.num_cpus}, "
                f"num_gpus={pool.spec.pool.num_gpus}): lower them in the catalogue or add nodes"
            ) from None
        return _Replica(replica_id, handle)

    async def _add(self, pool: _Pool, count: int) -> None:
        results = await asyncio.gather(*(self._start_replica(pool) for _ in range(count)), return_exceptions=True)
        for result in results:
            if isinstance(result, _Replica):
                pool.replicas[result.replica_id] = result
                pool.version += 1
            else:
                log.warning("pool %s: %s", pool.spec.name, result)

    async def _probe(self, replica: _Replica) -> ReplicaHealth | None:
        """The replica's health; None if it is dead."""
        try:
            health: ReplicaHealth = await asyncio.wait_for(replica.handle.health.remote(), self.config.health_timeout)
            return health
        except RayActorError:
            return None
        except TimeoutError:
            return ReplicaHealth(
                replica_id=replica.replica_id,
                healthy=False,
                detail=f"no answer to a health check within {self.config.health_timeout:g}s",
            )

    def _remove(self, pool: _Pool, replica_id: str) -> _Replica | None:
        replica = pool.replicas.pop(replica_id, None)
        if replica is not None:
            pool.version += 1
        return replica

    async def _drain(self, replica: _Replica, timeout: float) -> None:
        """Out of the membership already: let callers notice, wait for its work to end, stop it."""
        await asyncio.sleep(self.config.drain_grace)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = await self._probe(replica)
            if health is None or health.in_flight == 0:
                break
            await asyncio.sleep(0.1)
        ray.kill(replica.handle)

    async def _replace(self, pool: _Pool, replica_id: str, reason: str) -> None:
        async with pool.lock:
            replica = self._remove(pool, replica_id)
            if replica is None:
                return
            log.warning("pool %s: replacing replica %s (%s)", pool.spec.name, replica_id, reason)
            self._spawn(self._drain(replica, self.config.drain_timeout if reason != "dead" else 0))
            if not pool.draining:
                await self._add(pool, 1)

    async def _check(self, pool: _Pool) -> None:
        if pool.draining:
            return
        replicas = list(pool.replicas.values())
        healths = await asyncio.gather(*(self._probe(r) for r in replicas))
        for replica, health in zip(replicas, healths, strict=True):
            if health is None:
                await self._replace(pool, replica.replica_id, "dead")
                continue
            replica.health = health
            replica.failures = 0 if health.healthy else replica.failures + 1
            if replica.failures >= self.config.unhealthy_after:
                await self._replace(pool, replica.replica_id, f"unhealthy: {health.detail or 'health() said no'}")
        async with pool.lock:
            if len(pool.replicas) < pool.floor:
                await self._add(pool, pool.floor - len(pool.replicas))
            await self._scale(pool)

    def _load(self, pool: _Pool) -> tuple[int, int, str]:
        """In flight (as callers report it, else as replicas do), queued, worst breaker state."""
        now = time.monotonic()
        in_flight, queued, breaker, fresh = 0, 0, "closed", False
        for at, stats in self.reports.values():
            pool_stats = stats.get(pool.spec.name)
            if pool_stats is None or now - at > self.config.report_ttl:
                continue
            fresh = True
            in_flight += pool_stats.in_flight
            queued += pool_stats.queued
            if _BREAKER_RANK.get(pool_stats.breaker, 0) > _BREAKER_RANK[breaker]:
                breaker = pool_stats.breaker
        if not fresh:
            in_flight = sum(r.health.in_flight for r in pool.replicas.values() if r.health is not None)
        capacity = len(pool.replicas) * pool.spec.pool.max_concurrency
        return in_flight, max(queued, in_flight - capacity, 0), breaker

    async def _scale(self, pool: _Pool) -> None:
        """Up on queue depth; down by one after ``scale_down_after`` quiet checks. Holds pool.lock."""
        limits = pool.spec.pool
        in_flight, queued, _ = self._load(pool)
        count = len(pool.replicas)
        if queued > 0 and count < limits.max_replicas:
            pool.quiet_checks = 0
            add = min(limits.max_replicas - count, math.ceil(queued / limits.max_concurrency))
            log.info("pool %s: %d queued, adding %d replica(s)", pool.spec.name, queued, add)
            await self._add(pool, add)
            return
        if count > pool.floor and in_flight <= (count - 1) * limits.max_concurrency // 2:
            pool.quiet_checks += 1
            if pool.quiet_checks >= self.config.scale_down_after:
                pool.quiet_checks = 0
                victim = min(pool.replicas.values(), key=lambda r: r.health.in_flight if r.health is not None else 0)
                log.info("pool %s: quiet, removing replica %s", pool.spec.name, victim.replica_id)
                self._remove(pool, victim.replica_id)
                self._spawn(self._drain(victim, self.config.drain_timeout))
            return
        pool.quiet_checks = 0

    # -- the API callers use -------------------------------------------------------------------

    def _pool(self, name: str) -> _Pool:
        pool = self.pools.get(name)
        if pool is None:
            known = ", ".join(sorted(self.pools)) or "none"
            raise AgentError(f"no agent pool named {name!r} is registered (registered: {known})")
        return pool

    def _snapshot(self, pool: _Pool) -> PoolSnapshot:
        return PoolSnapshot(
            name=pool.spec.name,
            version=pool.version,
            spec=pool.spec,
            replicas=[
                ReplicaRef(replica_id=r.replica_id, handle=r.handle, batched=pool.is_async)
                for r in pool.replicas.values()
            ],
            draining=pool.draining,
        )

    def _caller(self, client_id: str | None, name: str) -> None:
        """Note a caller of the pool, so a drain waits for its first report on it."""
        if client_id is not None:
            at, stats = self.reports.get(client_id, (time.monotonic(), {}))
            stats = {**stats, name: stats.get(name, ClientPoolStats())}
            self.reports[client_id] = (at, stats)

    async def register(
        self,
        spec: AgentSpec,
        agent: type[Agent] | str,
        search_path: Sequence[str] = (),
        is_async: bool = False,
        client_id: str | None = None,
    ) -> PoolSnapshot:
        """Start a pool for ``spec`` (idempotent for the same spec; a changed spec replaces the replicas)."""
        self._ensure_loop()
        self._caller(client_id, spec.name)
        lock = self._register_locks.setdefault(spec.name, asyncio.Lock())
        async with lock:
            existing = self.pools.get(spec.name)
            if existing is not None and existing.spec == spec and not existing.draining:
                return self._snapshot(existing)
            pool = _Pool(spec, agent, tuple(search_path), is_async)
            started = await asyncio.gather(
                *(self._start_replica(pool) for _ in range(pool.initial)), return_exceptions=True
            )
            first = [r for r in started if isinstance(r, _Replica)]
            if len(first) < len(started):
                for replica in first:
                    ray.kill(replica.handle)
                error = next(r for r in started if not isinstance(r, _Replica))
                raise error if isinstance(error, AgentError) else AgentError(str(error))
            for replica in first:
                pool.replicas[replica.replica_id] = replica
            if existing is not None:
                pool.version = existing.version + 1
                pool.started = existing.started
                for old in list(existing.replicas.values()):
                    self._remove(existing, old.replica_id)
                    self._spawn(self._drain(old, self.config.drain_timeout))
            pool.version += 1
            self.pools[spec.name] = pool
            log.info("registered agent %s with %d replica(s)", spec.name, len(first))
            return self._snapshot(pool)

    async def unregister(self, name: str, drain_timeout: float | None = None) -> int:
        """Stop a pool: no new requests, in-flight ones finish (up to drain_timeout), replicas stop."""
        pool = self._pool(name)
        pool.draining = True
        replicas = list(pool.replicas.values())
        for replica in replicas:
            self._remove(pool, replica.replica_id)
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        started = time.monotonic()
        while time.monotonic() - started < timeout and not self._callers_idle(name, started):
            await asyncio.sleep(0.05)
        left = max(0.0, timeout - (time.monotonic() - started))
        await asyncio.gather(*(self._drain(r, left) for r in replicas))
        self.pools.pop(name, None)
        return len(replicas)

    def _callers_idle(self, name: str, since: float) -> bool:
        """Has every live caller of this pool reported, since ``since``, that it has nothing in flight?"""
        now = time.monotonic()
        for at, stats in self.reports.values():
            pool_stats = stats.get(name)
            if pool_stats is None or now - at > self.config.report_ttl:
                continue
            if at < since or pool_stats.in_flight > 0:
                return False
        return True

    async def snapshot(self, name: str, client_id: str | None = None) -> PoolSnapshot:
        self._ensure_loop()
        self._caller(client_id, name)
        return self._snapshot(self._pool(name))

    async def await_replicas(self, name: str, exclude: Sequence[str], timeout: float) -> PoolSnapshot:
        """The pool's membership once it has a replica not in ``exclude`` (replacing dead ones), or after timeout."""
        pool = self._pool(name)
        for replica_id in exclude:
            if replica_id in pool.replicas:
                await self.replica_died(name, replica_id)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not pool.draining:
            if any(rid not in exclude for rid in pool.replicas):
                break
            async with pool.lock:
                if not any(rid not in exclude for rid in pool.replicas):
                    await self._add(pool, 1)
            await asyncio.sleep(0.05)
        return self._snapshot(pool)

    async def replica_died(self, name: str, replica_id: str) -> bool:
        """A caller saw this replica die: check, and replace it at once. True if it was replaced."""
        pool = self.pools.get(name)
        if pool is None or replica_id not in pool.replicas:
            return False
        if await self._probe(pool.replicas[replica_id]) is not None:
            return False
        await self._replace(pool, replica_id, "dead")
        return True

    def report(self, client_id: str, stats: dict[str, ClientPoolStats]) -> dict[str, int]:
        """A caller's load per pool; returns the current membership version of each (-1: unknown pool)."""
        self.reports[client_id] = (time.monotonic(), stats)
        cutoff = time.monotonic() - 10 * self.config.report_ttl
        for key in [k for k, (at, _) in self.reports.items() if at < cutoff]:
            del self.reports[key]
        return {name: (self.pools[name].version if name in self.pools else -1) for name in stats}

    async def discover(
        self, name: str | None = None, capability: str | None = None, refresh: bool = False
    ) -> list[AgentInfo]:
        """What runs: each agent, its replicas, load, health and breaker state (refresh: probe now)."""
        self._ensure_loop()
        found = []
        for pool in list(self.pools.values()):
            spec = pool.spec
            if (name is not None and spec.name != name) or (
                capability is not None and capability not in spec.capabilities
            ):
                continue
            if refresh:
                replicas = list(pool.replicas.values())
                for replica, health in zip(
                    replicas, await asyncio.gather(*(self._probe(r) for r in replicas)), strict=True
                ):
                    replica.health = health or ReplicaHealth(
                        replica_id=replica.replica_id, healthy=False, detail="dead"
                    )
            details = [
                ReplicaInfo(
                    replica_id=r.replica_id,
                    healthy=r.health.healthy if r.health is not None else True,
                    in_flight=r.health.in_flight if r.health is not None else 0,
                    served=r.health.served if r.health is not None else 0,
                    failed=r.health.failed if r.health is not None else 0,
                    detail=r.health.detail if r.health is not None else "not checked yet",
                    node_id=r.health.node_id if r.health is not None else "",
                )
                for r in pool.replicas.values()
            ]
            healthy = sum(1 for d in details if d.healthy)
            in_flight, queued, breaker = self._load(pool)
            found.append(
                AgentInfo(
                    name=spec.name,
                    capabilities=list(spec.capabilities),
                    description=spec.description,
                    replicas=len(details),
                    min_replicas=spec.pool.min_replicas,
                    max_replicas=spec.pool.max_replicas,
                    max_concurrency=spec.pool.max_concurrency,
                    in_flight=in_flight,
                    queued=queued,
                    health=_pool_health(healthy, len(details)),
                    breaker=breaker,
                    draining=pool.draining,
                    replica_details=details,
                )
            )
        return found

    async def shutdown(self, drain_timeout: float | None = None) -> dict[str, int]:
        """Drain every pool and stop its replicas; returns how many replicas each pool had."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        names = list(self.pools)
        counts = await asyncio.gather(*(self.unregister(n, drain_timeout) for n in names))
        return dict(zip(names, counts, strict=True))


AgentManagerActor: Any = ray.remote(num_cpus=0, max_concurrency=1000, max_restarts=0)(  # type: ignore[call-overload]
    AgentManager
)


def get_manager(
    name: str = DEFAULT_MANAGER_NAME,
    namespace: str = NAMESPACE,
    *,
    config: ManagerConfig | None = None,
    create: bool = True,
) -> Any:
    """The named, detached manager: found if it runs, else started (unless ``create`` is False)."""
    if not create:
        try:
            return ray.get_actor(name, namespace=namespace)
        except ValueError:
            raise AgentError(
                f"no agent manager named {name!r} runs in namespace {namespace!r}; start one with get_manager()"
            ) from None
    handle = AgentManagerActor.options(name=name, namespace=namespace, lifetime="detached", get_if_exists=True).remote(
        config
    )
    ray.get(handle.ping.remote())
    return handle


def stop_manager(
    name: str = DEFAULT_MANAGER_NAME, namespace: str = NAMESPACE, drain_timeout: float | None = None
) -> dict[str, int]:
    """Drain every pool of the named manager, then stop the manager. Returns replicas stopped per pool."""
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return {}
    try:
        stopped: Any = ray.get(handle.shutdown.remote(drain_timeout))
    finally:
        ray.kill(handle)
    return dict(stopped)
