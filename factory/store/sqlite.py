"""The embedded store: SQLite in WAL mode, one file under FACTORY_HOME.

One coordinator writes a run at a time (it holds the run's lease); any number of
processes read. ``BEGIN IMMEDIATE`` takes the database's write lock at the start
of every write transaction, so checks made inside one (the lease owner) hold
until it commits. Commits use synchronous=NORMAL: a killed process loses nothing
it committed; a power cut may lose the last transactions.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from factory.store.sql import Cursor, SQLStore, iter_statements

SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    workflow_name TEXT NOT NULL,
    status TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    inputs_json TEXT NOT NULL,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    owner TEXT,
    heartbeat_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    principal TEXT,
    grants_json TEXT
);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created_at);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL REFERENCES runs (id),
    step_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    output_json TEXT,
    error TEXT,
    started_at REAL,
    finished_at REAL,
    cached INTEGER NOT NULL DEFAULT 0,
    position INTEGER NOT NULL,
    PRIMARY KEY (run_id, step_id)
);
CREATE TABLE IF NOT EXISTS attempts (
    run_id TEXT NOT NULL,
    step_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    logs TEXT NOT NULL DEFAULT '',
    duration REAL,
    finished_at REAL NOT NULL,
    PRIMARY KEY (run_id, step_id, attempt)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    step_id TEXT,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_run ON events (run_id, id);
CREATE TABLE IF NOT EXISTS cache (
    key TEXT PRIMARY KEY,
    output_json TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS store_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    expires_at REAL,
    last_used_at REAL,
    secrets TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS registered_workflows (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    spec_json TEXT NOT NULL,
    base_dir TEXT,
    secrets TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS step_items (
    run_id TEXT NOT NULL,
    step_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    total INTEGER NOT NULL,
    output_json TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    logs TEXT NOT NULL DEFAULT '',
    cached INTEGER NOT NULL DEFAULT 0,
    finished_at REAL NOT NULL,
    PRIMARY KEY (run_id, step_id, idx)
);
CREATE TABLE IF NOT EXISTS approvals (
    run_id TEXT NOT NULL,
    step_id TEXT NOT NULL,
    approved INTEGER NOT NULL,
    decided_by TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    decided_at REAL NOT NULL,
    PRIMARY KEY (run_id, step_id)
);
CREATE TABLE IF NOT EXISTS route_corrections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT NOT NULL,
    agent TEXT NOT NULL,
    decision_id TEXT,
    who TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS step_once (
    run_id TEXT NOT NULL,
    step_id TEXT NOT NULL,
    item INTEGER NOT NULL,
    key TEXT NOT NULL,
    result_json TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (run_id, step_id, item, key)
);
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY,
    workflow_name TEXT NOT NULL,
    workflow_version INTEGER NOT NULL,
    cron TEXT NOT NULL,
    timezone TEXT NOT NULL,
    inputs_json TEXT NOT NULL,
    catchup TEXT NOT NULL,
    overlap TEXT NOT NULL,
    paused INTEGER NOT NULL DEFAULT 0,
    paused_reason TEXT,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    after_ts REAL NOT NULL,
    last_run_id TEXT
);
CREATE INDEX IF NOT EXISTS schedules_created_by ON schedules (created_by);
CREATE TABLE IF NOT EXISTS schedule_ticks (
    schedule TEXT NOT NULL,
    tick INTEGER NOT NULL,
    run_id TEXT,
    action TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    missed INTEGER NOT NULL DEFAULT 0,
    decided_at REAL NOT NULL,
    decided_by TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (schedule, tick)
)
"""

# Columns added after version 2: an older database gets them with ALTER TABLE.
_ADDED_COLUMNS = {
    "runs": {"principal": "TEXT", "grants_json": "TEXT"},
    "api_keys": {"expires_at": "REAL", "last_used_at": "REAL", "secrets": "TEXT NOT NULL DEFAULT '[]'"},
}


class SQLiteStore(SQLStore):
    """Store backed by one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.url = f"sqlite:///{self.path}"
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        with self._write() as cur:
            for statement in iter_statements(_SCHEMA):
                cur.execute(statement)
            for table, columns in _ADDED_COLUMNS.items():
                have = {row[1] for row in cur.execute(f"PRAGMA table_info({table})").fetchall()}
                for name, declaration in columns.items():
                    if name not in have:
                        cur.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
            cur.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _write(self) -> Iterator[Cursor]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn.cursor()
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[Cursor]:
        with self._lock:
            yield self._conn.cursor()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
