"""Durable state. ``open_store(url)`` picks the backend from the URL."""

from __future__ import annotations

from factory.errors import FactoryError
from factory.store.base import (
    FINAL_RUN_STATUSES,
    FINAL_STEP_STATUSES,
    ApiKeyRecord,
    ApprovalRecord,
    AttemptRecord,
    Change,
    Event,
    EventChange,
    EventRow,
    ItemChange,
    ItemRecord,
    NewRun,
    RegisteredWorkflow,
    RouteCorrection,
    RunChange,
    RunGrants,
    RunRecord,
    RunStatus,
    RunSummary,
    ScheduleRecord,
    StepChange,
    StepRecord,
    StepStatus,
    Store,
    TickRecord,
)

__all__ = [
    "FINAL_RUN_STATUSES",
    "FINAL_STEP_STATUSES",
    "ApiKeyRecord",
    "ApprovalRecord",
    "AttemptRecord",
    "Change",
    "Event",
    "EventChange",
    "EventRow",
    "ItemChange",
    "ItemRecord",
    "NewRun",
    "RegisteredWorkflow",
    "RouteCorrection",
    "RunChange",
    "RunGrants",
    "RunRecord",
    "RunStatus",
    "RunSummary",
    "ScheduleRecord",
    "StepChange",
    "StepRecord",
    "StepStatus",
    "Store",
    "TickRecord",
    "open_store",
]


def open_store(url: str, *, pool_max: int = 4, retry_seconds: float = 30.0) -> Store:
    """Open the store a URL names: ``sqlite:///path/to/file.db`` or ``postgresql://...``.
    ``pool_max`` and ``retry_seconds``: PostgreSQL's connections per process and how long a
    dropped connection's transaction is retried (the settings postgres_pool_max and
    postgres_retry_seconds; ``factory.api.store_for`` passes them)."""
    if url.startswith("sqlite:///"):
        from factory.store.sqlite import SQLiteStore

        return SQLiteStore(url[len("sqlite:///") :])
    if url.startswith(("postgresql://", "postgres://")):
        from factory.store.postgres import PostgresStore

        return PostgresStore(url, pool_max=pool_max, retry_seconds=retry_seconds)
    raise FactoryError(f"unsupported store URL {url!r}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
