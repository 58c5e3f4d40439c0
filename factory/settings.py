"""The Factory's settings: one pydantic-settings model.

Sources, highest priority first: arguments given in code, environment variables
(prefix ``FACTORY_``, e.g. ``FACTORY_STORE_URL``), a YAML file (``--config FILE``
on the CLI or ``FACTORY_CONFIG``), then the defaults below. Nothing else in the
package reads ``os.environ`` for configuration.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from factory import limits

_config_file_override: Path | None = None
_SECRET_URL_RE = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@]*):(?P<password>[^@]*)@", re.I)
_SECRET_NAME_RE = re.compile(r"(password|secret|token|key)$", re.I)


def mask_secrets(value: str) -> str:
    """Hide the password part of a URL: postgresql://u:***@host/db."""
    return _SECRET_URL_RE.sub(lambda m: f"{m['scheme']}{m['user']}:***@", value)


class ModelPrice(BaseModel):
    """What a model costs, in USD per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)


class Settings(BaseSettings):
    """Effective configuration of the Factory."""

    model_config = SettingsConfigDict(env_prefix="FACTORY_", extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path.home() / ".factory",
        description="Directory for the embedded state (SQLite database, artifacts, models).",
    )
    store_url: str | None = Field(
        default=None,
        description="Durable state: sqlite:///PATH (default: $FACTORY_HOME/factory.db) or postgresql://...",
    )
    events_url: str | None = Field(
        default=None,
        description="Event bus: empty for the embedded one (the store's event log), or redis://host:port/db.",
    )
    events_stream_maxlen: int = Field(
        default=100_000, ge=0, description="Redis streams are trimmed to about this many entries (0: never)."
    )
    cache_url: str | None = Field(
        default=None, description="Step result cache: empty to keep it in the store, or redis://..."
    )
    cache_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=1, description="How long a Redis-cached result lives.")
    postgres_pool_max: int = Field(default=4, ge=1, description="Connections per process to PostgreSQL.")
    postgres_retry_seconds: float = Field(
        default=30.0,
        ge=0,
        description="How long a PostgreSQL store retries a transaction whose connection dropped before it gives up.",
    )
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster to join; default: RAY_ADDRESS, else a running local one, else a new local Ray.",
    )
    agents_file: Path | None = Field(
        default=None, description="Agent catalogue (agents.yaml) the API routes to and lists."
    )
    router_scorer: str = Field(default="lexical", description="Scorer of the routing API: lexical, embedding or llm.")
    router_llm_model: str | None = Field(default=None, description="fast-agent model for the llm routing scorer.")
    embedding_model_path: Path | None = Field(
        default=None, description="Folder with all-MiniLM-L6-v2 (else $FACTORY_HOME/models; `factory models pull`)."
    )
    embedding_backend: Literal["auto", "numpy", "onnxruntime"] = Field(
        default="auto", description="What runs the embedding model; auto: onnxruntime when installed, else numpy."
    )
    api_url: str | None = Field(default=None, description="Where the CLI's --api commands send requests.")
    api_key: str | None = Field(default=None, description="The CLI's and client's API key (a secret).")
    api_rate_limit: float = Field(default=200.0, gt=0, description="Requests per second per API key and replica.")
    api_rate_burst: int = Field(default=400, ge=1, description="Requests a key may send at once before the limit.")
    api_max_body_bytes: int = Field(default=1_048_576, ge=1024, description="Largest request body accepted.")
    api_max_streams_per_key: int = Field(
        default=16, ge=1, le=10_000, description="Event streams (SSE) one API key may hold open at once, per replica."
    )
    api_stream_max_seconds: float = Field(
        default=3600.0,
        ge=10,
        description="An event stream ends after this long; clients reconnect with Last-Event-ID and miss nothing.",
    )
    api_key_cache_seconds: float = Field(
        default=0.0,
        ge=0,
        description="How long a replica trusts a verified key; 0: every request reads it (revocation is immediate).",
    )
    allowed_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Module prefixes whose functions workflows sent over the API may call as python steps "
            "(comma-separated; empty: none, only registered workflows run python code)."
        ),
    )
    # isolated (container) steps; unset fields keep the executors' own defaults (docs/isolation.md)
    container_executor: Literal["local", "dagger"] = Field(default="local", description="For steps without executor:.")
    secrets_dir: Path | None = Field(
        default=None, description="Folder of secret files (default $FACTORY_HOME/secrets)."
    )
    sandbox_rootfs: dict[str, Path] = Field(default_factory=dict, description="Image name -> root filesystem folder.")
    sandbox_scratch_root: Path | None = Field(default=None, description="Where local workdirs are made.")
    sandbox_uid_base: int | None = Field(default=None, ge=1, description="First host uid of the sandbox pool.")
    sandbox_uid_count: int | None = Field(default=None, ge=1, description="Host uids in the pool.")
    sandbox_default_timeout: float | None = Field(default=None, gt=0, description="Seconds, when a spec sets none.")
    sandbox_default_memory: int | None = Field(default=None, gt=0, description="Bytes, when a spec sets none.")
    sandbox_max_processes: int | None = Field(default=None, ge=4, description="pids.max and RLIMIT_NPROC.")
    sandbox_max_open_files: int | None = Field(default=None, ge=16)
    sandbox_max_file_size: int | None = Field(default=None, gt=0, description="Largest file a step may write.")
    sandbox_network_allow: list[str] = Field(
        default_factory=list,
        description="Private or local destinations network: true steps may reach anyway: host:port, CIDR[:port].",
    )
    sandbox_network_max_connections: int | None = Field(
        default=None, ge=1, description="Egress connections at once per network: true step."
    )
    sandbox_network_idle_timeout: float | None = Field(
        default=None, gt=0, description="Seconds an egress connection of a step may stay idle."
    )
    dagger_cli_bin: str | None = Field(default=None, description="Dagger CLI to start sessions with (no download).")
    dagger_max_concurrency: int | None = Field(default=None, ge=1, description="Dagger runs at once per machine.")
    dagger_allow_network_when_off: bool | None = Field(
        default=None, description="Run network: false specs on Dagger anyway (it cannot turn the network off)."
    )
    breaker_failure_threshold: int = Field(default=5, ge=1)
    breaker_cooldown_seconds: float = Field(default=30.0, gt=0)
    heartbeat_seconds: float = Field(default=1.0, gt=0, description="How often a coordinator renews its lease.")
    model_prices: dict[str, ModelPrice] = Field(
        default_factory=dict,
        description=(
            "USD per million tokens by model name, for cost estimates and max_cost_usd budgets, as JSON: "
            '{"gpt-4.1": {"input": 2.0, "output": 8.0}}'
        ),
    )
    fuse_chains: bool = Field(
        default=True,
        description=(
            "Run a chain of python steps (each the only dependant of the one before, none asking for "
            "resources) in one Ray task, and python steps known to take 1 ms or less (a lattice's) several "
            "to a task; each step's outcome still comes back and is committed as it ends."
        ),
    )
    batch_items: bool = Field(
        default=True,
        description=(
            "Run the for_each items of a python step that prove shorter than a task costs several per Ray "
            "task (sized to about 20 ms); each item's outcome still comes back and is committed as it ends."
        ),
    )
    max_for_each_items: int = Field(
        default=100_000, ge=1, description="Items one for_each step may fan out over (the step fails beyond)."
    )
    supervisor_interval_seconds: float = Field(
        default=5.0, gt=0, description="How often the API's supervisor looks for runs nobody runs."
    )
    supervisor_pending_grace_seconds: float = Field(
        default=15.0, gt=0, description="A pending run nobody started for this long is started by the supervisor."
    )
    supervisor_max_adoptions: int = Field(
        default=3, ge=1, description="Resumes by the supervisor before an orphaned run is failed with the reason."
    )
    scheduler_interval_seconds: float = Field(
        default=10.0, gt=0, le=60, description="How often the scheduler of `factory up` looks for due schedule ticks."
    )
    schedule_grace_seconds: float = Field(
        default=120.0,
        gt=0,
        description="A tick at most this late is on time and runs; an older one was missed (catchup decides).",
    )
    schedule_min_interval_seconds: float = Field(
        default=60.0, ge=60, description="The shortest time allowed between two ticks of one schedule."
    )
    schedules_max_per_key: int = Field(default=20, ge=1, description="Schedules one API key (or local) may hold.")
    lease_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A run whose coordinator has not renewed its lease for this long may be resumed.",
    )
    # bounds on workflow documents (YAML text, JSON bodies, workflows built in Python) and run inputs,
    # checked before anything is built from them (factory.limits, factory.safeyaml), and on step outputs
    workflow_max_bytes: int = Field(
        default=limits.DEFAULT_MAX_BYTES, ge=1024, description="Largest workflow text; also caps its strings in all."
    )
    workflow_max_depth: int = Field(
        default=limits.DEFAULT_MAX_DEPTH,
        ge=4,
        le=limits.MAX_DEPTH_CEILING,
        description="Levels of nested mappings and lists in a workflow or in a run's inputs.",
    )
    workflow_max_aliases: int = Field(
        default=limits.DEFAULT_MAX_ALIASES, ge=0, description="YAML aliases (*name) in one workflow document."
    )
    workflow_max_nodes: int = Field(
        default=limits.DEFAULT_MAX_NODES, ge=100, description="Values in a workflow, YAML aliases expanded."
    )
    workflow_max_steps: int = Field(default=limits.DEFAULT_MAX_STEPS, ge=1, description="Steps in one workflow.")
    max_output_bytes: int = Field(
        default=limits.DEFAULT_MAX_OUTPUT_BYTES,
        ge=1024,
        description="Largest step output (its JSON); a bigger one fails the step: write large results to files.",
    )

    @field_validator("allowed_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        if isinstance(value, list):
            for item in value:
                if (
                    isinstance(item, str)
                    and item
                    and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$", item)
                ):
                    raise ValueError(f"{item!r} is not a module name (like mycompany.steps)")
            return [item for item in value if item]
        return value

    @field_validator("store_url", "events_url", "cache_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        if not re.match(r"^(sqlite:///|postgres(ql)?://|redis://|rediss://)", value):
            raise ValueError(
                f"{mask_secrets(value)!r} is not a supported URL: use sqlite:///PATH, postgresql://... or redis://..."
            )
        return value

    @field_validator("sandbox_network_allow")
    @classmethod
    def _check_network_allow(cls, entries: list[str]) -> list[str]:
        from factory.sandbox.netpolicy import parse_allow

        for entry in entries:
            parse_allow(entry)  # the ValueError names the entry and the accepted forms
        return entries

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = config_file_path()
        if config_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    def resolved_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        return f"sqlite:///{self.home / 'factory.db'}"

    def masked(self) -> dict[str, Any]:
        """The settings as plain data with secrets hidden, for display."""
        data: dict[str, Any] = {}
        for name, value in self.model_dump(mode="json").items():
            if isinstance(value, str):
                value = "***" if _SECRET_NAME_RE.search(name) and value else mask_secrets(value)
            data[name] = value
        data["store_url"] = mask_secrets(self.resolved_store_url())
        return data


CONTAINER_FIELDS = ("home", "container_executor", "secrets_dir")
CONTAINER_PREFIXES = ("sandbox_", "dagger_")


def _is_container_field(name: str) -> bool:
    return name in CONTAINER_FIELDS or name.startswith(CONTAINER_PREFIXES)


# The container fields of Settings as a plain model: validates what a worker is handed (types,
# bounds, field validators) without reading the worker's environment or files.
ContainerSettings: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "ContainerSettings",
    __config__=ConfigDict(extra="forbid"),
    **{name: (field.annotation, field) for name, field in Settings.model_fields.items() if _is_container_field(name)},
)


def container_settings(settings: Settings) -> dict[str, Any]:
    """What a container step's worker needs of the coordinator's settings (executor, sandbox,
    Dagger, secrets folder), as data the coordinator hands it with each call: a worker never
    reads its own environment for them, so --config and the API's settings reach it."""
    return {name: value for name, value in settings.model_dump().items() if _is_container_field(name)}


def settings_from(data: dict[str, Any]) -> Settings:
    """Settings made of the container settings ``data`` (validated: an unknown field or a bad
    value raises ValidationError) and the defaults alone: no environment, no file."""
    checked = ContainerSettings.model_validate(data)
    return Settings.model_construct(**checked.model_dump())


def config_file_path() -> Path | None:
    """The YAML settings file in force: --config, else FACTORY_CONFIG, else none."""
    if _config_file_override is not None:
        return _config_file_override
    env = os.environ.get("FACTORY_CONFIG")
    return Path(env) if env else None


def use_config_file(path: Path | None) -> None:
    """Read settings from this YAML file from now on (the CLI's --config)."""
    global _config_file_override
    if path is not None and not path.is_file():
        from factory.errors import FactoryError

        raise FactoryError(f"settings file {path} does not exist")
    _config_file_override = path


def get_settings() -> Settings:
    """The effective settings; an invalid value raises SettingsError naming the variable."""
    from pydantic import ValidationError

    from factory.errors import SettingsError

    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            problems.append(f"{field} (FACTORY_{field.upper()}): {err['msg'].removeprefix('Value error, ')}")
        source = config_file_path()
        where = f" (from the environment or {source})" if source else " (from the environment)"
        raise SettingsError("invalid settings" + where + ": " + "; ".join(problems)) from None
