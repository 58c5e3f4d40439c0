"""Can the cluster hold a replica? The router's placement filter, from Ray's view of the nodes.

A replica is placeable when one alive node has, in total (not only free right
now), every resource one replica takes. A pool whose replicas no node can hold
would wait for ever; the router passes such an agent over and says why.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import ray

from factory.catalog import AgentSpec, describe_amount

NodeResources = list[dict[str, float]]


def alive_node_resources() -> NodeResources:
    """Total resources of each alive node of the connected Ray cluster."""
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return [dict(node.get("Resources", {})) for node in nodes if node.get("Alive")]


def unplaceable_reason(needs: Mapping[str, float], nodes: NodeResources) -> str | None:
    """Why no node can hold a replica that takes ``needs``, or None when one can."""
    wanted = {name: amount for name, amount in needs.items() if amount > 0}
    if not wanted or any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in wanted.items()) for node in nodes):
        return None
    if not nodes:
        return "the cluster has no alive node"
    best = {k: max(node.get(k, 0.0) for node in nodes) for k in wanted}
    lacking = [k for k, v in wanted.items() if best[k] + 1e-9 < v]
    if lacking:
        detail = ", ".join(
            f"{describe_amount(k, wanted[k])} (the largest node has {describe_amount(k, best[k])})"
            for k in sorted(lacking)
        )
        return f"no node has {detail}"
    need = ", ".join(describe_amount(k, v) for k, v in sorted(wanted.items()))
    return f"no single node has all of {need} at once"


class ClusterView:
    """The alive nodes' resources, read at most every ``ttl`` seconds (ray.nodes() asks the GCS)."""

    def __init__(self, ttl: float = 5.0, read: Callable[[], NodeResources] = alive_node_resources) -> None:
        self.ttl = ttl
        self._read = read
        self._lock = threading.Lock()
        self._nodes: NodeResources = []
        self._at = float("-inf")

    def nodes(self) -> NodeResources:
        with self._lock:
            if time.monotonic() - self._at > self.ttl:
                self._nodes = self._read()
                self._at = time.monotonic()
            return self._nodes

    def unplaceable(self, needs: Mapping[str, float]) -> str | None:
        return unplaceable_reason(needs, self.nodes())

    def unplaceable_agent(self, spec: AgentSpec) -> str | None:
        """Why no node can hold a replica of ``spec``; None if one can, or if it does not run here (no class)."""
        return self.unplaceable(spec.pool.replica_resources()) if spec.class_ else None
