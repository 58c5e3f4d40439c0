"""The router's boundary types: what a caller asks, what it tells about health, what it gets back."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict, Field, field_validator

from factory.catalog import check_resource_amounts
from factory.routing.corrections import Recalled


class RouteRequest(BaseModel):
    """A task to place: its text, the capabilities an agent must have, and what one replica must hold."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="What the task asks, in plain language.")
    capabilities: list[str] = Field(default_factory=list, description="Every one is required of the agent.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Resources one replica of the agent must hold, in Ray's names: CPU, GPU, memory (bytes) "
        "or a custom resource; e.g. {GPU: 1}.",
    )

    @field_validator("capabilities")
    @classmethod
    def _strip(cls, value: list[str]) -> list[str]:
        return [c.strip() for c in value if c.strip()]

    @field_validator("resources")
    @classmethod
    def _not_negative(cls, value: dict[str, float]) -> dict[str, float]:
        return check_resource_amounts(value)


class AgentHealth(BaseModel):
    """What the pools know about an agent right now. An agent missing from the map counts as healthy and idle."""

    model_config = ConfigDict(extra="forbid")

    healthy: bool = True
    breaker_open: bool = False
    unplaceable: str | None = Field(
        default=None, description="Why no node of the cluster can hold one of its replicas; None if one can."
    )
    in_flight: int = Field(default=0, ge=0, description="Requests being served or queued.")
    capacity: int = Field(default=1, ge=1, description="replicas * max_concurrency.")

    @property
    def utilisation(self) -> float:
        return self.in_flight / self.capacity


class Candidate(BaseModel):
    """One eligible agent and how it scored."""

    agent: str
    score: float
    breakdown: dict[str, float] = Field(description="semantic, load (penalty, >= 0) and total.")


class RouteDecision(BaseModel):
    """The router's choice, with everything needed to see why."""

    agent: str
    scorer: str
    score: float
    breakdown: dict[str, float]
    reason: str = Field(description="One sentence on why this agent won.")
    runners_up: list[Candidate] = Field(default_factory=list, description="The next best eligible agents, best first.")
    filtered_out: dict[str, str] = Field(default_factory=dict, description="Agent -> why a hard filter removed it.")
    confidence: float = Field(
        default=1.0,
        description="How likely the chosen agent is the right one: a softmax of the eligible agents' scores at "
        "the scorer's temperature, fitted on the development task sets (docs/routing.md).",
    )
    uncertain: bool = Field(
        default=False, description="The confidence is below the catalogue's routing.min_confidence."
    )
    recalled: list[Recalled] = Field(
        default_factory=list, description="Corrections close to this task that weighed in (closest first)."
    )
    decision_id: str = Field(
        default_factory=lambda: uuid.uuid4().hex[:16], description="Quote it when correcting the decision."
    )
    latency_ms: float
