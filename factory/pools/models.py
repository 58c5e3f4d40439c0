"""Pydantic models the pools, the agent manager and their callers exchange."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from factory.catalog import AgentSpec


class ManagerConfig(BaseModel):
    """How the agent manager watches and sizes its pools."""

    model_config = ConfigDict(extra="forbid")

    check_interval: float = Field(default=1.0, gt=0, description="Seconds between health checks and scaling.")
    health_timeout: float = Field(default=3.0, gt=0, description="A health check slower than this counts as failed.")
    unhealthy_after: int = Field(default=2, ge=1, description="Failed checks in a row before a replica is replaced.")
    start_timeout: float = Field(default=60.0, gt=0, description="Seconds a new replica may take to start.")
    drain_timeout: float = Field(default=30.0, ge=0, description="Seconds to let in-flight work finish on removal.")
    drain_grace: float = Field(
        default=1.0, ge=0, description="Seconds a removed replica stays up so callers learn the new membership."
    )
    scale_down_after: int = Field(default=5, ge=1, description="Quiet checks in a row before one replica is removed.")
    report_ttl: float = Field(default=5.0, gt=0, description="Seconds a caller's load report counts.")


class ReplicaHealth(BaseModel):
    """What a replica says about itself."""

    replica_id: str
    healthy: bool
    detail: str = ""
    in_flight: int = 0
    served: int = 0
    failed: int = 0
    pid: int = 0
    node_id: str = ""  # the Ray node it runs on


class ReplicaRef(BaseModel):
    """A replica as callers see it: its id and actor handle."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    replica_id: str
    handle: Any
    batched: bool = False  # it takes several calls in one actor call (call_batch): async replicas


class PoolSnapshot(BaseModel):
    """The membership of one pool at a version; callers refresh it when the version moves."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    version: int
    spec: AgentSpec
    replicas: list[ReplicaRef]
    draining: bool = False


class ClientPoolStats(BaseModel):
    """One caller's view of one pool, reported to the manager every half second or so."""

    in_flight: int = 0
    queued: int = 0
    breaker: str = "closed"
    rejected: int = 0


class ReplicaInfo(BaseModel):
    replica_id: str
    healthy: bool
    in_flight: int
    served: int
    failed: int
    detail: str = ""
    node_id: str = ""


class AgentInfo(BaseModel):
    """What ``discover`` tells about one agent and its pool."""

    name: str
    capabilities: list[str]
    description: str
    replicas: int
    min_replicas: int
    max_replicas: int
    max_concurrency: int
    in_flight: int = Field(description="Requests callers have in flight (their reports), else what replicas say.")
    queued: int = Field(description="Requests beyond the pool's concurrent capacity.")
    health: str = Field(
        description="healthy, degraded (some replicas unhealthy), down (no healthy replica) "
        "or idle (scaled to zero; the next request starts a replica)."
    )
    breaker: str = Field(description="The worst circuit-breaker state callers report: closed, half_open or open.")
    draining: bool = False
    replica_details: list[ReplicaInfo] = Field(default_factory=list)
