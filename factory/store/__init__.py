"""Durable state. ``open_store(url)`` picks the backend from the URL."""

from __future__ import annotations

from factory.errors import FactoryError
from factory.store.base import (
    FINAL_RUN_STATUSES,
    FINAL_STEP_STATUSES,
    ApiKeyRecord,
    AttemptRecord,
    Change,
    Event,
    RegisteredWorkflow,
    RunChange,
    RunGrants,
    RunRecord,
    RunStatus,
    StepChange,
    StepRecord,
    StepStatus,
    Store,
)

__all__ = [
    "FINAL_RUN_STATUSES",
    "FINAL_STEP_STATUSES",
    "ApiKeyRecord",
    "AttemptRecord",
    "Change",
    "Event",
    "RegisteredWorkflow",
    "RunChange",
    "RunGrants",
    "RunRecord",
    "RunStatus",
    "StepChange",
    "StepRecord",
    "StepStatus",
    "Store",
    "open_store",
]


def open_store(url: str) -> Store:
    """Open the store a URL names: ``sqlite:///path/to/file.db`` or ``postgresql://...``."""
    if url.startswith("sqlite:///"):
        from factory.store.sqlite import SQLiteStore

        return SQLiteStore(url[len("sqlite:///") :])
    if url.startswith(("postgresql://", "postgres://")):
        from factory.settings import get_settings
        from factory.store.postgres import PostgresStore

        settings = get_settings()
        return PostgresStore(url, pool_max=settings.postgres_pool_max, retry_seconds=settings.postgres_retry_seconds)
    raise FactoryError(f"unsupported store URL {url!r}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
