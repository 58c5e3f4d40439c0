"""The embedded store: SQLite in WAL mode, one file under FACTORY_HOME.

One process writes a run at a time (its coordinator, guarded by a lease); any
number of processes read. Commits use synchronous=NORMAL: a killed process
loses nothing it committed; a power cut may lose the last transactions.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from factory.errors import RunNotFoundError
from factory.store.base import (
    AttemptRecord,
    Change,
    Event,
    RunChange,
    RunRecord,
    RunStatus,
    StepChange,
    StepRecord,
    StepStatus,
)

SCHEMA_VERSION = 1

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
    cancel_requested INTEGER NOT NULL DEFAULT 0
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
"""

_FINAL_RUN = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)
_FINAL_STEP = (StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.CANCELLED)


class SQLiteStore:
    """Store backed by one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.url = f"sqlite:///{self.path}"
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    # -- writing -------------------------------------------------------------------------------

    def _write(self, fn: Any) -> Any:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._conn)
                self._conn.execute("COMMIT")
                return result
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def create_run(
        self, run_id: str, workflow_name: str, spec_json: str, inputs: dict[str, Any], step_ids: list[str]
    ) -> None:
        now = time.time()

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO runs (id, workflow_name, status, spec_json, inputs_json, created_at) VALUES (?,?,?,?,?,?)",
                (run_id, workflow_name, RunStatus.PENDING.value, spec_json, json.dumps(inputs), now),
            )
            conn.executemany(
                "INSERT INTO steps (run_id, step_id, status, position) VALUES (?,?,?,?)",
                [(run_id, step_id, StepStatus.PENDING.value, i) for i, step_id in enumerate(step_ids)],
            )
            conn.execute(
                "INSERT INTO events (run_id, step_id, type, data, ts) VALUES (?,?,?,?,?)",
                (run_id, None, "run.created", json.dumps({"workflow": workflow_name, "steps": len(step_ids)}), now),
            )
            conn.executemany(
                "INSERT INTO events (run_id, step_id, type, data, ts) VALUES (?,?,?,?,?)",
                [(run_id, step_id, "step.created", "{}", now) for step_id in step_ids],
            )

        self._write(write)

    def record(self, changes: list[Change]) -> None:
        if not changes:
            return
        now = time.time()

        def write(conn: sqlite3.Connection) -> None:
            events: list[tuple[Any, ...]] = []
            for change in changes:
                if isinstance(change, StepChange):
                    self._apply_step(conn, change, now)
                    data = dict(change.data)
                    if change.error is not None:
                        data["error"] = change.error
                    if change.attempts is not None:
                        data["attempt"] = change.attempts
                    events.append((change.run_id, change.step_id, change.event, json.dumps(data), now))
                else:
                    self._apply_run(conn, change, now)
                    data = dict(change.data)
                    if change.error is not None:
                        data["error"] = change.error
                    events.append((change.run_id, None, change.event, json.dumps(data), now))
            conn.executemany("INSERT INTO events (run_id, step_id, type, data, ts) VALUES (?,?,?,?,?)", events)

        self._write(write)

    @staticmethod
    def _apply_step(conn: sqlite3.Connection, change: StepChange, now: float) -> None:
        status = change.status
        started = now if status == StepStatus.RUNNING else None
        finished = now if status in _FINAL_STEP else None
        conn.execute(
            """UPDATE steps SET status=?,
                   attempts=COALESCE(?, attempts),
                   output_json=CASE WHEN ? THEN ? ELSE output_json END,
                   error=?,
                   started_at=COALESCE(?, started_at),
                   finished_at=?,
                   cached=?
               WHERE run_id=? AND step_id=?""",
            (
                status.value,
                change.attempts,
                status == StepStatus.SUCCEEDED,
                change.output_json,
                change.error,
                started,
                finished,
                int(change.cached),
                change.run_id,
                change.step_id,
            ),
        )
        if change.attempt_logs is not None and change.attempts is not None:
            conn.execute(
                "INSERT OR REPLACE INTO attempts (run_id, step_id, attempt, status, error, logs, duration, finished_at)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (
                    change.run_id,
                    change.step_id,
                    change.attempts,
                    (StepStatus.SUCCEEDED if status == StepStatus.SUCCEEDED else StepStatus.FAILED).value,
                    change.error,
                    change.attempt_logs,
                    change.attempt_duration,
                    now,
                ),
            )

    @staticmethod
    def _apply_run(conn: sqlite3.Connection, change: RunChange, now: float) -> None:
        status = change.status
        conn.execute(
            """UPDATE runs SET status=?, error=?,
                   started_at=CASE WHEN ? THEN COALESCE(started_at, ?) ELSE started_at END,
                   finished_at=?
               WHERE id=?""",
            (
                status.value,
                change.error,
                status == RunStatus.RUNNING,
                now,
                now if status in _FINAL_RUN else None,
                change.run_id,
            ),
        )

    def claim_run(self, run_id: str, owner: str, lease_seconds: float) -> bool:
        now = time.time()

        def write(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT owner, heartbeat_at FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None:
                raise RunNotFoundError(f"no run {run_id!r} in {self.url}; `factory runs` lists them")
            if row["owner"] and row["owner"] != owner and (row["heartbeat_at"] or 0) > now - lease_seconds:
                return False
            conn.execute("UPDATE runs SET owner=?, heartbeat_at=?, cancel_requested=0 WHERE id=?", (owner, now, run_id))
            return True

        return bool(self._write(write))

    def heartbeat(self, run_id: str, owner: str) -> None:
        self._write(
            lambda conn: conn.execute(
                "UPDATE runs SET heartbeat_at=? WHERE id=? AND owner=?", (time.time(), run_id, owner)
            )
        )

    def release_run(self, run_id: str, owner: str) -> None:
        self._write(
            lambda conn: conn.execute(
                "UPDATE runs SET owner=NULL, heartbeat_at=NULL WHERE id=? AND owner=?", (run_id, owner)
            )
        )

    def reset_unfinished_steps(self, run_id: str) -> list[str]:
        def write(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT step_id FROM steps WHERE run_id=? AND status != ? ORDER BY position",
                (run_id, StepStatus.SUCCEEDED.value),
            ).fetchall()
            conn.execute(
                "UPDATE steps SET status=?, error=NULL, finished_at=NULL WHERE run_id=? AND status != ?",
                (StepStatus.PENDING.value, run_id, StepStatus.SUCCEEDED.value),
            )
            return [row["step_id"] for row in rows]

        return list(self._write(write))

    def request_cancel(self, run_id: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            cursor = conn.execute("UPDATE runs SET cancel_requested=1 WHERE id=?", (run_id,))
            if cursor.rowcount == 0:
                raise RunNotFoundError(f"no run {run_id!r} in {self.url}; `factory runs` lists them")

        self._write(write)

    def cancel_requested(self, run_id: str) -> bool:
        with self._lock:
            row = self._conn.execute("SELECT cancel_requested FROM runs WHERE id=?", (run_id,)).fetchone()
        return bool(row and row[0])

    # -- reading -------------------------------------------------------------------------------

    @staticmethod
    def _run(row: sqlite3.Row) -> RunRecord:
        data = dict(row)
        data["inputs"] = json.loads(data.pop("inputs_json"))
        data["cancel_requested"] = bool(data["cancel_requested"])
        return RunRecord.model_validate(data)

    def get_run(self, run_id: str) -> RunRecord:
        with self._lock:
            row = self._conn.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise RunNotFoundError(f"no run {run_id!r} in {self.url}; `factory runs` lists them")
        return self._run(row)

    def list_runs(self, limit: int = 20, status: RunStatus | None = None) -> list[RunRecord]:
        query = "SELECT * FROM runs"
        args: list[Any] = []
        if status is not None:
            query += " WHERE status=?"
            args.append(status.value)
        query += " ORDER BY created_at DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._conn.execute(query, args).fetchall()
        return [self._run(row) for row in rows]

    def get_steps(self, run_id: str) -> list[StepRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT run_id, step_id, status, attempts, output_json, error, started_at, finished_at, cached"
                " FROM steps WHERE run_id=? ORDER BY position",
                (run_id,),
            ).fetchall()
        return [StepRecord.model_validate({**dict(row), "cached": bool(row["cached"])}) for row in rows]

    def get_attempts(self, run_id: str, step_id: str | None = None) -> list[AttemptRecord]:
        query = "SELECT * FROM attempts WHERE run_id=?"
        args: list[Any] = [run_id]
        if step_id is not None:
            query += " AND step_id=?"
            args.append(step_id)
        query += " ORDER BY finished_at, attempt"
        with self._lock:
            rows = self._conn.execute(query, args).fetchall()
        return [AttemptRecord.model_validate(dict(row)) for row in rows]

    def events(self, after_id: int = 0, run_id: str | None = None, limit: int = 1000) -> list[Event]:
        query = "SELECT * FROM events WHERE id > ?"
        args: list[Any] = [after_id]
        if run_id is not None:
            query += " AND run_id=?"
            args.append(run_id)
        query += " ORDER BY id LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._conn.execute(query, args).fetchall()
        return [Event.model_validate({**dict(row), "data": json.loads(row["data"])}) for row in rows]

    def cache_get(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT output_json FROM cache WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def cache_put(self, key: str, output_json: str) -> None:
        self._write(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO cache (key, output_json, created_at) VALUES (?,?,?)",
                (key, output_json, time.time()),
            )
        )

    def close(self) -> None:
        with self._lock:
            self._conn.close()
