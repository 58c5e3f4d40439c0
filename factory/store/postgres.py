"""The production store: PostgreSQL through psycopg 3 and a psycopg_pool connection pool.

- Versioned migrations run at start under an advisory lock: safe to run twice,
  and from several processes at once.
- Event ids follow commit order: transactions that append events take one
  transaction-scoped advisory lock first, so a reader that has seen id N has
  seen every event below N (the Redis publisher relies on it).
- A run's lease is checked with ``SELECT ... FOR UPDATE``: two coordinators can
  never both own a run, and a coordinator that lost its lease cannot write.
- ``NOTIFY factory_events`` at each commit wakes event tailers (LISTEN), so they
  do not poll.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from factory.errors import FactoryError
from factory.store.sql import Cursor, SQLStore, iter_statements

_MIGRATION_LOCK = 7_240_001
_EVENTS_LOCK = 7_240_002
CHANNEL = "factory_events"

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            workflow_name TEXT NOT NULL,
            status TEXT NOT NULL,
            spec_json TEXT NOT NULL,
            inputs_json TEXT NOT NULL,
            error TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            started_at DOUBLE PRECISION,
            finished_at DOUBLE PRECISION,
            owner TEXT,
            heartbeat_at DOUBLE PRECISION,
            cancel_requested BOOLEAN NOT NULL DEFAULT FALSE
        );
        CREATE INDEX runs_created ON runs (created_at);
        CREATE INDEX runs_status ON runs (status, created_at);
        CREATE TABLE steps (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            step_id TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            output_json TEXT,
            error TEXT,
            started_at DOUBLE PRECISION,
            finished_at DOUBLE PRECISION,
            cached BOOLEAN NOT NULL DEFAULT FALSE,
            position INTEGER NOT NULL,
            PRIMARY KEY (run_id, step_id)
        );
        CREATE TABLE attempts (
            run_id TEXT NOT NULL,
            step_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            status TEXT NOT NULL,
            error TEXT,
            logs TEXT NOT NULL DEFAULT '',
            duration DOUBLE PRECISION,
            finished_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (run_id, step_id, attempt)
        );
        CREATE TABLE events (
            id BIGSERIAL PRIMARY KEY,
            run_id TEXT NOT NULL,
            step_id TEXT,
            type TEXT NOT NULL,
            data TEXT NOT NULL,
            ts DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX events_run ON events (run_id, id);
        CREATE TABLE cache (
            key TEXT PRIMARY KEY,
            output_json TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )
        """,
    ),
    (
        2,
        """
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            scopes TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            revoked BOOLEAN NOT NULL DEFAULT FALSE
        )
        """,
    ),
]


def migrate(conn: Any) -> list[int]:
    """Apply the migrations this database lacks; returns the versions applied now."""
    applied_now: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations").fetchall()}
        for version, script in MIGRATIONS:
            if version in done:
                continue
            for statement in iter_statements(script):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            applied_now.append(version)
    return applied_now


class PostgresStore(SQLStore):
    """Store backed by PostgreSQL."""

    placeholder = "%s"

    def __init__(self, url: str, pool_max: int = 4) -> None:
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise FactoryError("the PostgreSQL store needs psycopg: pip install 'factory[postgres]'") from exc
        self.url = url
        self._psycopg = psycopg
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                self.applied_migrations = migrate(conn)
        except psycopg.OperationalError as exc:
            from factory.settings import mask_secrets

            raise FactoryError(
                f"cannot connect to PostgreSQL at {mask_secrets(url)}: {str(exc).strip()}; "
                "check FACTORY_STORE_URL and that the server is running"
            ) from None
        self._pool = ConnectionPool(
            url, min_size=1, max_size=pool_max, kwargs={"autocommit": True}, open=True, name="factory-store"
        )
        self._listen_lock = threading.Lock()
        self._listener: Any = None

    @contextmanager
    def _write(self) -> Iterator[Cursor]:
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            yield cur

    @contextmanager
    def _read(self) -> Iterator[Cursor]:
        with self._pool.connection() as conn, conn.cursor() as cur:
            yield cur

    def _lock_run(self, cur: Cursor, run_id: str) -> Any:
        return cur.execute("SELECT owner, heartbeat_at FROM runs WHERE id=%s FOR UPDATE", (run_id,)).fetchone()

    def _before_events(self, cur: Cursor) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_EVENTS_LOCK,))

    def _after_events(self, cur: Cursor) -> None:
        cur.execute(f"NOTIFY {CHANNEL}")

    def wait_for_events(self, timeout: float) -> None:
        """LISTEN for commits that appended events. The first call starts listening and
        returns at once, so the caller looks again and misses nothing in between."""
        with self._listen_lock:
            if self._listener is None:
                self._listener = self._psycopg.connect(self.url, autocommit=True)
                self._listener.execute(f"LISTEN {CHANNEL}")
                return
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                pass

    def close(self) -> None:
        self._pool.close()
        with self._listen_lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
