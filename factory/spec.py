"""Workflow and step models: the one source of truth for the workflow format.

YAML is only a serialisation of these models; the same workflow can be built
in Python. A step has exactly one action. Today that is ``python:``; the
``agent:``/``route:`` and ``container:`` actions extend the same model.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from factory.catalog import check_resource_amounts

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
STEP_ID_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
FUNCTION_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def parse_size(value: Any) -> int:
    """Parse a byte size such as ``500MB``, ``1GiB`` or ``1048576``."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '500MB'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return int(value)
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ValueError(f"{value!r} is not a size: write bytes (1048576) or a unit (500MB, 1GiB)")


ByteSize = Annotated[int, BeforeValidator(parse_size)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RetryPolicy(_Model):
    """How a failed attempt is retried: exponential backoff with optional jitter."""

    max_attempts: int = Field(default=1, ge=1, le=100, description="Attempts in all, the first included.")
    backoff: float = Field(default=0.5, ge=0, description="Delay before the second attempt, in seconds.")
    max_backoff: float = Field(default=30.0, ge=0, description="Upper bound of any delay, in seconds.")
    jitter: bool = Field(
        default=True,
        description="Randomise each delay in [delay/2, delay] (equal jitter) to spread retries.",
    )
    on: list[str] | None = Field(
        default=None,
        description=(
            "Names of the exceptions to retry (class name or module.Class; subclasses match). "
            "Default: every error except validation errors."
        ),
    )


MAX_CUSTOM_RESOURCES = 16
_RESOURCE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,99}$")
_BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


class Resources(_Model):
    """Ray resources one attempt needs: ``num_cpus``, ``num_gpus``, ``memory``, and any custom
    resource of the cluster's nodes by name (``resources: {node_a: 1}`` places the step on a
    node started with ``--resources '{"node_a": 1}'``)."""

    num_cpus: float | None = Field(default=None, ge=0)
    num_gpus: float | None = Field(default=None, ge=0)
    memory: ByteSize | None = Field(default=None, description="Bytes, or a string like 500MB.")
    custom: dict[str, float] = Field(
        default_factory=dict, description="Custom resources by name (written beside num_cpus in YAML)."
    )

    @model_validator(mode="before")
    @classmethod
    def _gather_custom(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = {"num_cpus", "num_gpus", "memory", "custom"}
        extra = {k: v for k, v in data.items() if k not in known}
        if not extra:
            return data
        return {**{k: v for k, v in data.items() if k in known}, "custom": {**data.get("custom", {}), **extra}}

    @field_validator("custom")
    @classmethod
    def _check_custom(cls, custom: dict[str, float]) -> dict[str, float]:
        if len(custom) > MAX_CUSTOM_RESOURCES:
            raise ValueError(f"at most {MAX_CUSTOM_RESOURCES} custom resources")
        for name, amount in custom.items():
            if name in _BUILTIN_RESOURCES:
                raise ValueError(f"{name!r}: write num_cpus, num_gpus or memory for Ray's own resources")
            if not _RESOURCE_NAME.match(name):
                raise ValueError(f"{name!r} is not a resource name (letters, digits, _ . : / -)")
            if not 0 <= amount <= 1e12:
                raise ValueError(f"{name!r}: the amount must be between 0 and 1e12")
        return custom

    def ray_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.num_cpus is not None:
            options["num_cpus"] = self.num_cpus
        if self.num_gpus is not None:
            options["num_gpus"] = self.num_gpus
        if self.memory is not None:
            options["memory"] = self.memory
        if self.custom:
            options["resources"] = dict(self.custom)
        return options


class ContainerResources(_Model):
    """Limits of an isolated step."""

    cpus: float | None = Field(default=None, gt=0, description="CPU share (Dagger/podman) or CPU-time bound (local).")
    memory: ByteSize | None = Field(default=None, description="Memory limit: bytes, or a string like 512MB.")


class ContainerSpec(_Model):
    """An isolated step: a command in an image (Dagger) or in an isolated process (local executor)."""

    image: str = Field(description="Image for Dagger; for the local executor, a configured rootfs for it or the host.")
    command: list[str] = Field(min_length=1, description="argv to run.")
    env: dict[str, str] = Field(default_factory=dict)
    secrets: list[str] = Field(default_factory=list, description="Names resolved from the secret source; never logged.")
    mounts: dict[str, Any] = Field(
        default_factory=dict, description="Container path -> host path or ${steps.ID.artifacts}; read-only."
    )
    outputs: list[str] = Field(default_factory=list, description="Files (container paths) kept as artifacts.")
    caches: dict[str, Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]+$")]] = Field(
        default_factory=dict,
        description=(
            "Container path -> cache name: a writable folder kept between runs (Dagger cache volumes; "
            "local executor: <scratch root>/caches/NAME). The one place outside the workdir a step may write."
        ),
    )
    network: bool = Field(default=False, description="Reach the network (default: no network at all).")
    resources: ContainerResources = Field(default_factory=ContainerResources)
    timeout: float | None = Field(default=None, gt=0, description="Seconds; the command is killed after it.")
    workdir: str = Field(default="/work", description="Writable scratch directory the command starts in.")


class RouteSpec(_Model):
    """Let the router choose the agent: hard filters on capabilities, then fit of the text."""

    text: str = Field(min_length=1, description="The task, in words; may hold ${...} references.")
    capabilities: list[str] = Field(default_factory=list, description="Every one of these is required.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="What one replica of the agent must hold (Ray's names: CPU, GPU, memory, custom), e.g. {GPU: 1}.",
    )

    @field_validator("resources")
    @classmethod
    def _not_negative(cls, value: dict[str, float]) -> dict[str, float]:
        return check_resource_amounts(value)


MAX_APPROVAL_MESSAGE = 4000
MAX_APPROVERS = 50
_APPROVER_RE = re.compile(r"^(scope:(submit|admin)|key:[A-Za-z0-9_.@-]{1,100}|local)$")


class ApprovalSpec(_Model):
    """A person decides before the workflow goes on. The run waits durably: nothing runs
    meanwhile, the coordinator may exit, and the run goes on when the decision comes."""

    message: str = Field(
        min_length=1,
        max_length=MAX_APPROVAL_MESSAGE,
        description="What the approver is asked; may hold ${...} references (resolved when the gate opens).",
    )
    approvers: list[str] = Field(
        default_factory=lambda: ["scope:admin"],
        max_length=MAX_APPROVERS,
        description=(
            "Who may decide: scope:admin or scope:submit (API keys with that scope), key:NAME (the API key "
            "of that name), local (the CLI on the Factory's own machine, which may always decide)."
        ),
    )
    timeout: float | None = Field(
        default=None, gt=0, description="Seconds to wait for a decision; none: wait for ever."
    )
    on_timeout: Literal["reject", "approve", "fail"] = Field(
        default="reject", description="When the timeout passes: decide reject or approve, or fail the step."
    )
    on_reject: Literal["fail", "continue"] = Field(
        default="fail",
        description="A rejection fails the step (its descendants are skipped), or continues with approved: false.",
    )

    @field_validator("approvers")
    @classmethod
    def _check_approvers(cls, value: list[str]) -> list[str]:
        bad = [a for a in value if not _APPROVER_RE.match(a)]
        if bad:
            raise ValueError(f"unknown approver {bad[0]!r}: use scope:admin, scope:submit, key:NAME or local")
        if not value:
            raise ValueError("an approval needs at least one approver (default: scope:admin)")
        return value


EXECUTORS = ("local", "dagger")
StepKind = Literal["python", "container", "agent", "route", "approval"]
_ACTIONS: tuple[StepKind, ...] = ("python", "container", "agent", "route", "approval")


class Step(_Model):
    """One node of the workflow DAG."""

    id: str = Field(description="Unique id within the workflow; letters, digits, '_' and '-'.")
    python: str | None = Field(default=None, description="'module:function' to call with `with` as keyword arguments.")
    container: ContainerSpec | None = Field(default=None, description="Run a command isolated (see executor).")
    executor: str | None = Field(
        default=None, description="For container steps: local or dagger (default from settings)."
    )
    agent: str | None = Field(default=None, description="Send the step to this agent's pool; `with` is the task.")
    route: RouteSpec | None = Field(default=None, description="Let the router pick the agent for this task.")
    approval: ApprovalSpec | None = Field(
        default=None, description="Wait for a person's decision; the decision is the step's output."
    )
    with_: dict[str, Any] = Field(
        default_factory=dict, alias="with", description="Keyword arguments; may hold ${...} references."
    )
    needs: list[str] = Field(
        default_factory=list, description="Steps that must finish first (references imply this too)."
    )
    for_each: str | list[Any] | None = Field(
        default=None, description="Fan out over a list: one call per item, available as ${item}."
    )
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout: float | None = Field(
        default=None, gt=0, description="Seconds per attempt; the attempt is stopped after it."
    )
    resources: Resources = Field(default_factory=Resources)
    cache: bool = Field(
        default=False, description="Reuse the output of an earlier run with the same function and inputs."
    )

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not STEP_ID_RE.match(value):
            raise ValueError(
                f"{value!r} is not a valid step id: use letters, digits, '_' and '-', starting with a letter"
            )
        return value

    @field_validator("python")
    @classmethod
    def _check_python(cls, value: str | None) -> str | None:
        if value is not None and not FUNCTION_RE.match(value):
            raise ValueError(f"{value!r} is not 'module:function' (for example mypkg.steps:load_texts)")
        return value

    @field_validator("executor")
    @classmethod
    def _check_executor(cls, value: str | None) -> str | None:
        if value is not None and value not in EXECUTORS:
            raise ValueError(f"unknown executor {value!r}: use {' or '.join(EXECUTORS)}")
        return value

    @model_validator(mode="after")
    def _check_action(self) -> Step:
        given = [name for name in _ACTIONS if getattr(self, name) is not None]
        if not given:
            raise ValueError(
                "a step needs one action: python: 'module:function', container: {...}, agent: NAME, "
                "route: {...} or approval: {...}"
            )
        if len(given) > 1:
            raise ValueError(f"a step has exactly one action; this one has {' and '.join(given)}")
        if self.executor is not None and self.container is None:
            raise ValueError("executor: applies to container steps only")
        if self.approval is not None:
            extra = [name for name, on in (("for_each", self.for_each is not None), ("cache", self.cache)) if on]
            if extra or self.with_:
                raise ValueError(
                    f"an approval step takes no {(extra or ['with'])[0]}: it waits for a decision (put what the "
                    "approver needs to know in approval.message)"
                )
        return self

    @property
    def kind(self) -> StepKind:
        for name in _ACTIONS:
            if getattr(self, name) is not None:
                return name
        raise AssertionError("validated steps have an action")


BUDGET_FIELDS = ("max_seconds", "max_steps", "max_attempts", "max_tokens", "max_cost_usd")


class Budget(_Model):
    """Limits a run stops at, cleanly: attempts in flight are stopped, unfinished steps are
    cancelled, and the run fails saying which limit it reached. Counted over the whole run,
    across resumes; `factory resume --budget` continues a run with a new one."""

    max_seconds: float | None = Field(
        default=None, gt=0, description="Seconds the run may run (time parked at approval gates not counted)."
    )
    max_steps: int | None = Field(default=None, ge=1, description="Steps the run may start.")
    max_attempts: int | None = Field(
        default=None, ge=1, description="Attempts in all: every try of every step, each for_each item counted."
    )
    max_tokens: int | None = Field(default=None, ge=1, description="Model tokens (in + out) the agents may use.")
    max_cost_usd: float | None = Field(
        default=None,
        gt=0,
        description="Estimated model cost in USD, from the agents' recorded usage and the model_prices setting.",
    )

    def merged(self, other: Budget | None) -> Budget:
        """This budget with the limits ``other`` sets replacing its own."""
        if other is None:
            return self
        return self.model_copy(update=other.model_dump(exclude_none=True))

    @classmethod
    def parse(cls, items: list[str]) -> Budget:
        """From ``name=value`` texts (``max_attempts=20``): the CLI's --budget."""
        data: dict[str, str] = {}
        for item in items:
            name, sep, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if not name.startswith("max_"):
                name = "max_" + name
            if not sep or name not in BUDGET_FIELDS:
                raise ValueError(f"--budget {item!r}: write NAME=VALUE with NAME one of {', '.join(BUDGET_FIELDS)}")
            data[name] = value.strip()
        return cls.model_validate(data)


class Schedule(_Model):
    """When a registered workflow runs by itself (``factory schedules add``): a cron expression
    in a time zone, with the inputs of its runs. See docs/schedules.md."""

    cron: str = Field(description="Five cron fields (minute hour day-of-month month day-of-week) or @daily, @hourly...")
    timezone: str = Field(default="UTC", description="IANA time zone the cron fields are read in (DST handled).")
    inputs: dict[str, Any] = Field(default_factory=dict, description="Input values of each run, over the defaults.")
    catchup: Literal["skip", "run_once"] = Field(
        default="skip",
        description="Ticks missed while no scheduler ran: skip them, or run the latest of them once.",
    )
    overlap: Literal["skip", "allow"] = Field(
        default="skip", description="A tick while the schedule's previous run still goes on: skip it, or run anyway."
    )

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str) -> str:
        from factory.cron import check_cron

        return check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        from factory.cron import check_timezone

        return check_timezone(value)


MAX_REQUIREMENTS = 200
MAX_PY_MODULES = 20
MAX_RUNTIME_ENTRY_CHARS = 500


class Runtime(_Model):
    """What a Ray job of this workflow installs on the cluster's nodes before its steps run
    (``factory submit`` puts it in the job's runtime_env, beside the workflow's folder as the
    working_dir). ``factory run`` and the HTTP API run steps in the environment they are in."""

    requirements: list[Annotated[str, Field(min_length=1, max_length=MAX_RUNTIME_ENTRY_CHARS)]] | str | None = Field(
        default=None,
        description="pip requirement specifiers, or the path of a requirements file relative to the workflow's folder.",
    )
    py_modules: list[Annotated[str, Field(min_length=1, max_length=MAX_RUNTIME_ENTRY_CHARS)]] = Field(
        default_factory=list,
        max_length=MAX_PY_MODULES,
        description="Local packages (folders), .py or .whl files, relative to the workflow's folder, for every node.",
    )

    @field_validator("requirements")
    @classmethod
    def _bounded(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, list) and len(value) > MAX_REQUIREMENTS:
            raise ValueError(f"at most {MAX_REQUIREMENTS} requirements")
        if isinstance(value, str) and not 0 < len(value) <= MAX_RUNTIME_ENTRY_CHARS:
            raise ValueError(f"a requirements file's path has 1 to {MAX_RUNTIME_ENTRY_CHARS} characters")
        return value


class Workflow(_Model):
    """A named DAG of steps with input defaults."""

    name: str = Field(min_length=1)
    description: str = ""
    inputs: dict[str, Any] = Field(default_factory=dict, description="Input names and their default values.")
    steps: list[Step] = Field(min_length=1)
    budget: Budget | None = Field(default=None, description="Limits every run of this workflow stops at.")
    schedule: Schedule | None = Field(
        default=None, description="Run it on a cron schedule once added with `factory schedules add`."
    )
    runtime: Runtime | None = Field(
        default=None, description="pip requirements and py_modules of a Ray job of it (`factory submit`)."
    )
    base_dir: str | None = Field(
        default=None,
        description="Directory step modules are imported from (set to the YAML file's folder by load_workflow).",
    )

    def step(self, step_id: str) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)
