"""The Factory's settings: one pydantic-settings model, env prefix ``FACTORY_``.

Nothing else in the package reads ``os.environ`` for configuration.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Effective configuration, from the environment (``FACTORY_*``) and defaults."""

    model_config = SettingsConfigDict(env_prefix="FACTORY_", extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path.home() / ".factory",
        description="Directory for the embedded state (SQLite database, artifacts).",
    )
    store_url: str | None = Field(
        default=None,
        description="Where durable state lives; default sqlite:///$FACTORY_HOME/factory.db.",
    )
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster to join; default: a reachable one (RAY_ADDRESS), else a new local Ray.",
    )
    breaker_failure_threshold: int = Field(default=5, ge=1)
    breaker_cooldown_seconds: float = Field(default=30.0, gt=0)
    heartbeat_seconds: float = Field(
        default=1.0, gt=0, description="How often a coordinator renews its lease on a run."
    )
    lease_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A run whose coordinator has not renewed its lease for this long may be resumed.",
    )

    def resolved_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        return f"sqlite:///{self.home / 'factory.db'}"


def get_settings() -> Settings:
    return Settings()
