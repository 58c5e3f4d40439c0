"""The engine's AgentDispatcher: ``agent:`` steps to their pool, ``route:`` steps through the router.

A step's output records who served it and why::

    {"agent": "summarizer", "replica": "summarizer-2-ab12", "route": null | <RouteDecision>, "result": ...}

``route`` is the router's decision (chosen agent, scores, runners-up, filtered
agents) for ``route:`` steps and null for ``agent:`` steps. Pools start on
first use (the manager keeps them for later runs). A refusal (saturated pool,
open breaker, no eligible agent) comes back as a failed attempt the step's
retry policy may retry, never as an exception in the coordinator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray

from factory.agent import load_agent_class
from factory.breaker import BreakerConfig, BreakerState
from factory.catalog import Catalog, load_catalog
from factory.errors import (
    AgentError,
    CircuitOpenError,
    FactoryError,
    NoEligibleAgentError,
    PoolSaturated,
    StepInputError,
    UncertainRouteError,
)
from factory.pools.client import PoolClient
from factory.pools.connection import Pools
from factory.pools.placement import ClusterView
from factory.refs import find_references
from factory.runtime import Outcome
from factory.settings import Settings
from factory.spec import Step
from factory.stepagents import StepAgents
from factory.stepcontext import CONTEXT_META

TRANSIENT: tuple[type[BaseException], ...] = (PoolSaturated, CircuitOpenError)


def _as_dict(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _refused(exc: BaseException, retryable: bool) -> Any:
    return ray.put(
        Outcome(
            ok=False,
            error=f"{type(exc).__name__}: {exc}",
            error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            retryable=retryable,
        )
    )


def complete_catalog(catalog: Catalog, search_path: Sequence[str] = ()) -> Catalog:
    """Fill an entry's empty capabilities, description and examples from its agent class.

    A class that cannot be imported is left alone: the error shows when the agent is first used.
    """
    agents = []
    for spec in catalog.agents:
        if spec.class_ and not (spec.capabilities and spec.description and spec.examples):
            try:
                cls = load_agent_class(spec.class_, search_path)
            except AgentError:
                agents.append(spec)
                continue
            spec = spec.model_copy(
                update={
                    "capabilities": spec.capabilities or list(cls.capabilities),
                    "description": spec.description or cls.description,
                    "examples": spec.examples or list(cls.examples),
                }
            )
        agents.append(spec)
    return catalog.model_copy(update={"agents": agents})


class PoolDispatcher:
    """Implements ``factory.engine.AgentDispatcher`` on top of :class:`Pools` and the router."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        pools: Pools | None = None,
        router: Any = None,
        scorer: str | None = None,
        search_path: Sequence[str] = (),
        breaker: BreakerConfig | None = None,
        settings: Settings | None = None,
    ) -> None:
        """``breaker``: the pools' circuit breakers (default: BreakerConfig's defaults).
        ``scorer`` of ``route:`` steps: default ``settings.router_scorer`` (lexical without
        settings); ``settings`` also tell the scorer where its model and cache are."""
        self.search_path = tuple(p for p in search_path if p)
        self.catalog = complete_catalog(catalog, self.search_path)
        self._own_pools = pools is None
        self.pools = pools if pools is not None else Pools(breaker=breaker)
        self._router = router
        self.settings = settings
        self.scorer = scorer or (settings.router_scorer if settings is not None else "lexical")
        self.cluster = ClusterView()
        # (store URL, run id) of the run this dispatcher serves: agents then publish step.progress
        # and step.emitted events through factory.step_context() (set by factory.api for a run)
        self.run_context: tuple[str, str] | None = None

    @classmethod
    def from_catalog(
        cls, agents: Catalog | str | Path, *, search_path: Sequence[str | None] = (), **kwargs: Any
    ) -> PoolDispatcher:
        """From a Catalog or an agents.yaml path (whose folder is searched for agent classes)."""
        paths = [p for p in search_path if p]
        if isinstance(agents, Catalog):
            catalog = agents
            if catalog.base_dir:
                paths.insert(0, catalog.base_dir)
        else:
            catalog = load_catalog(agents)
            paths.insert(0, str(Path(agents).resolve().parent))
        return cls(catalog, search_path=paths, **kwargs)

    @property
    def router(self) -> Any:
        if self._router is None:
            try:
                from factory.routing import Router
            except ImportError as exc:
                raise AgentError(
                    f"route steps need the router (factory.routing), which failed to import: {exc}"
                ) from None
            from factory.routing import fallback_for, make_scorer

            self._router = Router(
                self.catalog,
                scorer=make_scorer(self.scorer, self.catalog, self.settings),
                fallback=fallback_for(self.catalog, self.settings),
            )
            if self.settings is not None:  # what people corrected (factory route --correct) counts here too
                from factory.api import store_for
                from factory.routing.corrections import CorrectionSync

                store = store_for(self.settings)
                try:
                    CorrectionSync().pull(self._router, store)
                finally:
                    store.close()
        return self._router

    # -- routing -------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """What the router needs to filter and weigh pools: the caller's own counts and breaker states."""
        from factory.routing import AgentHealth

        health: dict[str, Any] = {}
        for spec in self.catalog.agents:
            client = self.pools.clients.get(spec.name)
            unplaceable = self.cluster.unplaceable_agent(spec)
            if unplaceable:
                health[spec.name] = AgentHealth(unplaceable=unplaceable)
            elif spec.class_ is None:  # catalogued for routing elsewhere, cannot run here
                health[spec.name] = AgentHealth(healthy=False, breaker_open=False, in_flight=0, capacity=1)
            elif client is None:  # not started yet: it starts on first use
                capacity = max(spec.pool.min_replicas, 1) * spec.pool.max_concurrency
                health[spec.name] = AgentHealth(healthy=True, breaker_open=False, in_flight=0, capacity=capacity)
            else:
                health[spec.name] = AgentHealth(
                    healthy=client.replicas > 0 or client.manager is not None,
                    breaker_open=client.breaker.state == BreakerState.OPEN,
                    in_flight=client.in_flight,
                    capacity=max(client.capacity, 1),
                )
        return health

    def route(self, text: str, capabilities: Sequence[str] = (), resources: Mapping[str, float] | None = None) -> Any:
        """The router's decision for a task (raises NoEligibleAgentError when none fits)."""
        from factory.routing import RouteRequest

        request = RouteRequest(text=text, capabilities=list(capabilities), resources=dict(resources or {}))
        return self.router.route(request, health=self.health())

    @staticmethod
    def _route_text(step: Step, route_text: str | None) -> str:
        assert step.route is not None
        if route_text is not None:
            return route_text
        if find_references(step.route.text):
            raise StepInputError(
                f"step {step.id!r}: the route text has ${{...}} references; the engine resolves them "
                "and passes route_text= (a direct caller must too)"
            )
        return step.route.text

    # -- dispatch ------------------------------------------------------------------------------

    def client(self, name: str) -> PoolClient:
        try:
            spec = self.catalog.get(name)
        except KeyError as exc:
            raise StepInputError(str(exc.args[0])) from None
        return self.pools.ensure(spec, search_path=self.search_path)

    def submit(self, step: Step, task: dict[str, Any], route_text: str | None = None) -> Any:
        """Start the step's task on a pool; returns ObjectRef[Outcome] (the engine's AgentDispatcher)."""
        try:
            decision: Any = None
            if step.route is not None:
                text = self._route_text(step, route_text)
                decision = self.route(text, step.route.capabilities, step.route.resources)
                if decision.uncertain and self.catalog.routing.when_uncertain == "fail":
                    best = [decision.agent, *(c.agent for c in decision.runners_up[:1])]
                    raise UncertainRouteError(text, best, decision.confidence)
                name = str(decision.agent)
            elif step.agent is not None:
                name = step.agent
            else:
                raise StepInputError(f"step {step.id!r} is neither an agent: nor a route: step")
            client = self.client(name)
            meta = {"agent": name, "route": _as_dict(decision) if decision is not None else None}
            if self.run_context is not None:  # the replica gives the agent a step context (progress, emit)
                store_url, run_id = self.run_context
                meta[CONTEXT_META] = {"store_url": store_url, "run_id": run_id, "step_id": step.id}
            return client.submit(task, meta=meta, retry=step.retry, timeout=step.timeout)
        except TRANSIENT as exc:
            return _refused(exc, retryable=True)
        except NoEligibleAgentError as exc:
            return _refused(exc, retryable=exc.retryable)
        except FactoryError as exc:
            return _refused(exc, retryable=False)

    def step_agents(self) -> StepAgents:
        """The agents python steps of the run may ask (``step_context().ask``): those with a class."""
        context = {}
        if self.run_context is not None:
            store_url, run_id = self.run_context
            context = {"store_url": store_url, "run_id": run_id}
        return StepAgents(
            specs=tuple(spec for spec in self.catalog.agents if spec.class_),
            search_path=self.search_path,
            manager_name=self.pools.manager_name,
            namespace=self.pools.namespace,
            context=context,
        )

    def close(self) -> None:
        if self._own_pools:
            self.pools.close()
