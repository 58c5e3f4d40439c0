"""The agent catalogue: which agents exist, what they can do, and how their pools are sized.

Read from ``agents.yaml``::

    agents:
      - name: summarizer
        class: agents.text:Summarizer      # optional: without it the agent can be routed to but not run
        capabilities: [summarize]
        description: Condense long documents into short abstracts and key points.
        examples: ["Summarize this article in three sentences."]
        pool: {min_replicas: 1, max_replicas: 4, max_concurrency: 8, num_cpus: 0.5}
        config: {max_sentences: 5}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from factory.errors import WorkflowValidationError


def check_resource_amounts(resources: dict[str, float]) -> dict[str, float]:
    """``resources`` unchanged if no amount is negative; else ValueError naming them (for validators)."""
    negative = sorted(k for k, v in resources.items() if v < 0)
    if negative:
        raise ValueError(f"resource amounts cannot be negative: {', '.join(negative)}")
    return resources


class PoolConfig(BaseModel):
    """How many replicas (Ray actors) serve an agent, and how much each takes."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    max_concurrency: int = Field(default=1, ge=1, description="Requests one replica works on at once.")
    max_queued: int = Field(default=1000, ge=0, description="Requests waiting per pool before PoolSaturated.")
    num_cpus: float = Field(default=0.1, ge=0)
    num_gpus: float = Field(default=0, ge=0)
    memory: int | None = Field(default=None, ge=0, description="Bytes of memory one replica reserves.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources one replica takes, e.g. {accelerator_x: 1}."
    )
    spread: bool = Field(
        default=True,
        description=(
            "Place the replicas on different nodes where possible (Ray's SPREAD scheduling strategy), "
            "so that one node's loss takes few of them; false packs them as Ray's default does."
        ),
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> PoolConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        reserved = sorted({"CPU", "GPU", "memory"} & set(self.resources))
        if reserved:
            raise ValueError(f"set {', '.join(reserved)} with num_cpus, num_gpus and memory, not in resources")
        check_resource_amounts(self.resources)
        return self

    def replica_resources(self) -> dict[str, float]:
        """What one replica takes, in Ray's resource names: CPU, GPU, memory (bytes) and custom ones."""
        needs: dict[str, float] = {"CPU": self.num_cpus, "GPU": self.num_gpus}
        if self.memory:
            needs["memory"] = float(self.memory)
        needs.update(self.resources)
        return needs


def describe_amount(resource: str, amount: float) -> str:
    """An amount of a Ray resource for people: memory in MiB or GiB, the others as plain numbers."""
    if resource == "memory":
        gib = amount / 2**30
        return f"memory {gib:.3g} GiB" if gib >= 1 else f"memory {amount / 2**20:.3g} MiB"
    return f"{resource} {amount:g}"


class AgentSpec(BaseModel):
    """One agent of the catalogue."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    class_: str | None = Field(default=None, alias="class", description="'module:Class' of the agent, if it runs here.")
    capabilities: list[str] = Field(default_factory=list)
    description: str = ""
    examples: list[str] = Field(default_factory=list, description="Sample tasks this agent is good at.")
    pool: PoolConfig = Field(default_factory=PoolConfig)
    config: dict[str, Any] = Field(default_factory=dict)


class RoutingPolicy(BaseModel):
    """How sure the router must be, and what happens when it is not (docs/routing.md)."""

    model_config = ConfigDict(extra="forbid")

    min_confidence: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Below this confidence a decision is uncertain (0: never)."
    )
    when_uncertain: Literal["best", "llm", "fail"] = Field(
        default="best",
        description="best: take the best agent anyway (flagged uncertain); llm: ask the llm scorer to decide "
        "(router_llm_model); fail: a route step fails with the two best candidates, for a person to choose.",
    )


class Catalog(BaseModel):
    """All agents, by name."""

    model_config = ConfigDict(extra="forbid")

    agents: list[AgentSpec] = Field(default_factory=list)
    routing: RoutingPolicy = Field(default_factory=RoutingPolicy)
    _base_dir: str | None = PrivateAttr(default=None)  # the agents.yaml's folder: agent classes are found there

    @property
    def base_dir(self) -> str | None:
        return self._base_dir

    @model_validator(mode="after")
    def _unique_names(self) -> Catalog:
        seen: set[str] = set()
        for agent in self.agents:
            if agent.name in seen:
                raise ValueError(f"agent {agent.name!r} is defined twice")
            seen.add(agent.name)
        return self

    def get(self, name: str) -> AgentSpec:
        for agent in self.agents:
            if agent.name == name:
                return agent
        known = ", ".join(a.name for a in self.agents) or "none"
        raise KeyError(f"no agent named {name!r} in the catalogue (agents: {known})")


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate an agents.yaml; every problem names the agent and field."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise WorkflowValidationError([f"cannot read the catalogue: {exc.strerror or exc}"], str(path)) from exc
    except yaml.YAMLError as exc:
        raise WorkflowValidationError([f"malformed YAML: {exc}"], str(path)) from exc
    try:
        catalog = Catalog.model_validate(data)
        catalog._base_dir = str(file.resolve().parent)
        return catalog
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = err["loc"]
            where = ".".join(str(p) for p in loc)
            if len(loc) >= 2 and loc[0] == "agents" and isinstance(loc[1], int):
                agents = data.get("agents") if isinstance(data, dict) else None
                if isinstance(agents, list) and loc[1] < len(agents) and isinstance(agents[loc[1]], dict):
                    name = agents[loc[1]].get("name", loc[1])
                    where = f"agent {name!r} field " + ".".join(str(p) for p in loc[2:])
            problems.append(f"{where}: {err['msg']}")
        raise WorkflowValidationError(problems, str(path)) from None
