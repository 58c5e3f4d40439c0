"""The agents as ``factory agents`` and ``GET /v1/agents`` show them: the catalogue, joined
with the live pools' state when the agent manager runs."""

from __future__ import annotations

from typing import Any

from factory.catalog import Catalog, load_catalog
from factory.settings import Settings


def live_pools() -> dict[str, Any]:
    """Pool state from the agent manager, by agent name; empty when no manager runs."""
    try:
        import ray

        from factory.pools import DEFAULT_MANAGER_NAME, NAMESPACE
    except ImportError:
        return {}
    try:
        manager = ray.get_actor(DEFAULT_MANAGER_NAME, namespace=NAMESPACE)
    except ValueError:
        return {}
    infos: list[Any] = ray.get(manager.discover.remote(None, None, False), timeout=5)
    return {info.name: info for info in infos}


MAX_PROBLEMS = 5


def pool_view(info: Any) -> dict[str, Any]:
    """A pool's state for people: its counters, and why its unhealthy replicas are unhealthy."""
    view: dict[str, Any] = info.model_dump(mode="json", exclude={"replica_details"})
    problems = sorted({r.detail for r in info.replica_details if not r.healthy and r.detail})
    view["problems"] = [p[:500] for p in problems[:MAX_PROBLEMS]]
    return view


def agents_view(settings: Settings, with_pools: bool = True) -> dict[str, Any]:
    """``with_pools=False``: the catalogue alone (this process is not on a Ray cluster)."""
    catalog = load_catalog(settings.agents_file) if settings.agents_file else Catalog()
    pools = live_pools() if with_pools else {}
    agents = []
    for spec in catalog.agents:
        info = pools.get(spec.name)
        agents.append(
            {
                "name": spec.name,
                "capabilities": spec.capabilities,
                "description": spec.description,
                "runnable": spec.class_ is not None,
                "pool": pool_view(info) if info is not None else None,
            }
        )
    for name, info in pools.items():
        if all(a["name"] != name for a in agents):
            agents.append(
                {
                    "name": name,
                    "capabilities": info.capabilities,
                    "description": info.description,
                    "runnable": True,
                    "pool": pool_view(info),
                }
            )
    return {"agents": agents, "catalogue": str(settings.agents_file) if settings.agents_file else None}
