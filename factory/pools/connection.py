"""``Pools``: one process's connection to the agent manager and its pool clients."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from factory.agent import Agent, load_agent_class
from factory.breaker import BreakerConfig, CircuitBreaker
from factory.catalog import AgentSpec
from factory.errors import AgentError, FactoryError
from factory.pools.client import DEFAULT_FAILOVER_WAIT, DEFAULT_MAX_ATTEMPTS, PoolClient, Relay, Reporter
from factory.pools.manager import DEFAULT_MANAGER_NAME, NAMESPACE, get_manager
from factory.pools.models import AgentInfo, ManagerConfig

REPORT_INTERVAL = 0.5


def _unwrap(exc: RayTaskError) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, FactoryError) else exc


class Pools:
    """Register agents with the manager and send them work::

    pools = Pools()                               # finds or starts the detached manager
    client = pools.ensure(Summarizer.spec(pool={"min_replicas": 2}))
    outcome = await client.call({"text": "..."})
    pools.close()                                 # the pools live on in the manager
    """

    def __init__(
        self,
        manager_name: str = DEFAULT_MANAGER_NAME,
        namespace: str = NAMESPACE,
        *,
        config: ManagerConfig | None = None,
        breaker: BreakerConfig | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        failover_wait: float = DEFAULT_FAILOVER_WAIT,
        report_interval: float = REPORT_INTERVAL,
    ) -> None:
        self.manager_name = manager_name
        self.namespace = namespace
        self.manager = get_manager(manager_name, namespace, config=config)
        self.breaker_config = breaker
        self.max_attempts = max_attempts
        self.failover_wait = failover_wait
        self.clients: dict[str, PoolClient] = {}
        self.client_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._pool_locks: dict[str, threading.Lock] = {}  # one registration per pool at a time
        self._relay: Any = None
        self._reporter = Reporter(self.manager, self.clients, self.client_id, report_interval)

    def _get_relay(self) -> Any:
        with self._lock:
            if self._relay is None:
                # on this process's own node: it dies only with its caller (a relay on another
                # node would fail every call of this process once that node is gone)
                here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
                self._relay = Relay.options(scheduling_strategy=here).remote(self.manager)
            return self._relay

    def _breaker(self, name: str) -> CircuitBreaker:
        return CircuitBreaker(f"pool:{name}", self.breaker_config)

    def _client(self, snapshot: Any) -> PoolClient:
        return PoolClient(
            snapshot,
            manager=self.manager,
            relay=self._get_relay(),
            breaker=self._breaker(snapshot.name),
            max_attempts=self.max_attempts,
            failover_wait=self.failover_wait,
        )

    def ensure(self, spec: AgentSpec, agent: type[Agent] | None = None, search_path: Sequence[str] = ()) -> PoolClient:
        """The client of ``spec``'s pool, registering the pool with the manager if needed.

        ``agent`` is the class to run (default: import ``spec.class_``, looked up on ``search_path``).
        """
        existing = self.clients.get(spec.name)
        if existing is not None and existing.spec == spec:
            return existing
        # Threads that ask at once (a maker's samples) share one client: clients of their own
        # would each count only their own calls, and power of two choices would not spread them
        with self._pool_lock(spec.name):
            existing = self.clients.get(spec.name)
            if existing is not None and existing.spec == spec:
                return existing
            return self._register(spec, agent, search_path)

    def _pool_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._pool_locks.setdefault(name, threading.Lock())

    def _register(self, spec: AgentSpec, agent: type[Agent] | None, search_path: Sequence[str]) -> PoolClient:
        if agent is None:
            if spec.class_ is None:
                raise AgentError(
                    f"agent {spec.name!r} has no `class:` in the catalogue, so it can be routed to but not run; "
                    "add `class: module:Class` to its entry"
                )
            agent_cls = load_agent_class(spec.class_, search_path)
            shipped: type[Agent] | str = spec.class_
        else:
            agent_cls = shipped = agent
        try:
            snapshot = ray.get(
                self.manager.register.remote(spec, shipped, list(search_path), agent_cls.is_async(), self.client_id)
            )
        except RayTaskError as exc:
            raise _unwrap(exc) from None
        client = self._client(snapshot)
        with self._lock:
            self.clients[spec.name] = client
        return client

    def client(self, name: str) -> PoolClient:
        """The client of a pool someone already registered."""
        existing = self.clients.get(name)
        if existing is not None:
            return existing
        with self._pool_lock(name):
            existing = self.clients.get(name)
            if existing is not None:
                return existing
            try:
                snapshot = ray.get(self.manager.snapshot.remote(name, self.client_id))
            except RayTaskError as exc:
                raise _unwrap(exc) from None
            client = self._client(snapshot)
            with self._lock:
                self.clients[name] = client
            return client

    def discover(
        self, name: str | None = None, capability: str | None = None, refresh: bool = False
    ) -> list[AgentInfo]:
        infos: list[AgentInfo] = ray.get(self.manager.discover.remote(name, capability, refresh))
        return infos

    def unregister(self, name: str, drain_timeout: float | None = None) -> int:
        with self._lock:
            self.clients.pop(name, None)
        try:
            count: int = ray.get(self.manager.unregister.remote(name, drain_timeout))
        except RayTaskError as exc:
            raise _unwrap(exc) from None
        return count

    def report_now(self) -> None:
        """Report load and refresh memberships now (the background thread does it every half second)."""
        self._reporter.tick()

    def close(self) -> None:
        """Stop this process's reporting and relay; the pools stay up in the manager."""
        self._reporter.stop()
        with self._lock:
            if self._relay is not None:
                ray.kill(self._relay)
                self._relay = None

    def __enter__(self) -> Pools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
