"""The store's logic in SQL, shared by the SQLite and PostgreSQL backends.

A backend supplies connections and transactions (``_write`` / ``_read``), its
schema, and a few hooks (row locking, notifying tailers). Statements are written
with ``?`` placeholders and translated for drivers that use ``%s``.
"""

from __future__ import annotations

import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from factory.errors import LeaseLostError, RunNotFoundError, ScheduleConflictError, StepContextError
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
    TickRecord,
)

# The statements of Store.record (the commit path), each run for its rows of a batch (executemany).
_UPDATE_STEP = """UPDATE steps SET status=?,
       attempts=COALESCE(?, attempts),
       output_json=CASE WHEN ? THEN ? ELSE output_json END,
       error=?,
       started_at=CASE WHEN ? THEN COALESCE(started_at, ?) ELSE COALESCE(?, started_at) END,
       finished_at=?,
       cached=?
   WHERE run_id=? AND step_id=?"""
_UPSERT_ATTEMPT = (
    "INSERT INTO attempts (run_id, step_id, attempt, status, error, logs, duration, finished_at)"
    " VALUES (?,?,?,?,?,?,?,?)"
    " ON CONFLICT (run_id, step_id, attempt) DO UPDATE SET status=excluded.status,"
    " error=excluded.error, logs=excluded.logs, duration=excluded.duration,"
    " finished_at=excluded.finished_at"
)
_UPDATE_RUN = """UPDATE runs SET status=?, error=?,
       started_at=CASE WHEN ? THEN COALESCE(started_at, ?) ELSE started_at END,
       finished_at=?
   WHERE id=?"""
_UPSERT_ITEM = (
    "INSERT INTO step_items (run_id, step_id, idx, total, output_json, attempts, logs, cached, finished_at)"
    " VALUES (?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (run_id, step_id, idx) DO UPDATE SET total=excluded.total,"
    " output_json=excluded.output_json, attempts=excluded.attempts, logs=excluded.logs,"
    " cached=excluded.cached, finished_at=excluded.finished_at"
)


def _text(value: str | None) -> str | None:
    """Logs and errors as stored: a NUL character (a step may print one) becomes U+FFFD on every
    store, as PostgreSQL's text cannot hold it (it refused the whole batch, and the run with it)."""
    return value.replace("\x00", "\ufffd") if value and "\x00" in value else value


def _step_row(change: StepChange, now: float) -> tuple[Any, ...]:
    """The change's row for _UPDATE_STEP."""
    now = change.at if change.at is not None else now
    status = change.status
    return (
        status.value,
        change.attempts,
        status == StepStatus.SUCCEEDED,
        change.output_json,
        _text(change.error),
        # an approval gate's wait starts once: reopened after a resume, it keeps its deadline
        status == StepStatus.WAITING,
        now,
        now if status == StepStatus.RUNNING else None,
        now if status in FINAL_STEP_STATUSES else None,
        change.cached,
        change.run_id,
        change.step_id,
    )


def fold_step_rows(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """_UPDATE_STEP's rows with one row a step: each step's rows, composed in order, as one row
    whose update leaves the step as its rows applied one after another do (a batch often holds
    a step's start and its end). For a statement that updates a row once, whatever the order.

    Composing a later row ``b`` onto an earlier ``a``: status, error, finished_at and cached are
    ``b``'s; attempts and the output are ``b``'s if it sets them, else ``a``'s. started_at is
    what the two do to it in turn: each sets it (a start), sets it only if unset (a wait), or
    keeps it; a set followed by anything but a set stays that set, as does an only-if-unset
    followed by an only-if-unset; a keep is the identity."""
    folded: dict[tuple[Any, Any], tuple[Any, ...]] = {}
    for row in rows:
        key = (row[10], row[11])
        a = folded.get(key)
        if a is None:
            folded[key] = row
            continue
        attempts = row[1] if row[1] is not None else a[1]
        has_output, output = (row[2], row[3]) if row[2] else (a[2], a[3])
        if row[7] is not None and not row[5]:  # b sets started_at
            waits, wait_at, start_at = False, row[6], row[7]
        elif not row[5]:  # b keeps it: a's
            waits, wait_at, start_at = a[5], a[6], a[7]
        elif a[5]:  # b sets it only if unset, after a that did the same: a's value comes first
            waits, wait_at, start_at = True, a[6], None
        elif a[7] is not None:  # after a that set it: still set
            waits, wait_at, start_at = False, a[6], a[7]
        else:  # after a that kept it: b's
            waits, wait_at, start_at = True, row[6], None
        folded[key] = (row[0], attempts, has_output, output, row[4], waits, wait_at, start_at, *row[8:])
    return list(folded.values())


def _attempt_row(change: StepChange, now: float) -> tuple[Any, ...]:
    """The row for _UPSERT_ATTEMPT of a change that ends an attempt."""
    now = change.at if change.at is not None else now
    succeeded = change.status == StepStatus.SUCCEEDED
    return (
        change.run_id,
        change.step_id,
        change.attempts,
        (StepStatus.SUCCEEDED if succeeded else StepStatus.FAILED).value,
        _text(change.error),
        _text(change.attempt_logs),
        change.attempt_duration,
        now,
    )


def _run_row(change: RunChange, now: float) -> tuple[Any, ...]:
    """The change's row for _UPDATE_RUN."""
    now = change.at if change.at is not None else now
    status = change.status
    return (
        status.value,
        _text(change.error),
        status == RunStatus.RUNNING,
        now,
        now if status in FINAL_RUN_STATUSES else None,
        change.run_id,
    )


def _item_row(change: ItemChange, now: float) -> tuple[Any, ...]:
    """The change's row for _UPSERT_ITEM."""
    return (
        change.run_id,
        change.step_id,
        change.index,
        change.total,
        change.output_json,
        change.attempts,
        _text(change.logs),
        change.cached,
        now,
    )


@dataclass(slots=True)
class RecordRows:
    """What one ``Store.record`` call writes: each table's rows in the order of the changes, and
    the runs whose lease it checks (sorted, the order their rows are locked in)."""

    run_ids: list[str]
    steps: list[tuple[Any, ...]] = field(default_factory=list)
    attempts: list[tuple[Any, ...]] = field(default_factory=list)
    runs: list[tuple[Any, ...]] = field(default_factory=list)
    items: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)

    @classmethod
    def of(cls, changes: list[Change], now: float) -> RecordRows:
        rows = cls(sorted({c.run_id for c in changes}))
        for change in changes:
            if isinstance(change, ItemChange):
                rows.items.append(_item_row(change, now))
                continue
            if isinstance(change, EventChange):
                rows.events.append((change.run_id, change.step_id, change.event, json.dumps(change.data), now))
                continue
            data = dict(change.data)
            if change.error is not None:
                data["error"] = _text(change.error)
            if isinstance(change, StepChange):
                rows.steps.append(_step_row(change, now))
                if change.attempt_logs is not None and change.attempts is not None:
                    rows.attempts.append(_attempt_row(change, now))
                if change.attempts is not None:
                    data["attempt"] = change.attempts
                rows.events.append((change.run_id, change.step_id, change.event, json.dumps(data), now))
            else:
                rows.runs.append(_run_row(change, now))
                rows.events.append((change.run_id, None, change.event, json.dumps(data), now))
        return rows


class Cursor(Protocol):
    def execute(self, sql: str, args: Sequence[Any] = ...) -> Any: ...

    def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    @property
    def rowcount(self) -> int: ...


class SQLStore(ABC):
    """Runs, steps, attempts, events and the cache, in SQL tables."""

    url: str
    placeholder = "?"

    # -- what a backend provides ---------------------------------------------------------------

    @abstractmethod
    def _write(self) -> AbstractContextManager[Cursor]:
        """A cursor inside a write transaction, committed when the block ends without error."""

    @abstractmethod
    def _read(self) -> AbstractContextManager[Cursor]:
        """A cursor for reading."""

    def _lock_run(self, cur: Cursor, run_id: str) -> Any:
        """Select the run's owner, heartbeat and status for update (the transaction holds the row until it ends)."""
        return cur.execute(self._sql("SELECT owner, heartbeat_at, status FROM runs WHERE id=?"), (run_id,)).fetchone()

    def _before_events(self, cur: Cursor) -> None:
        """Called in a transaction before it appends events (PostgreSQL serialises them here)."""
        return None

    def _after_events(self, cur: Cursor) -> None:
        """Called in a transaction after it appended events (PostgreSQL notifies tailers here)."""
        return None

    def close(self) -> None:
        """Release connections."""
        return None

    # -- helpers ---------------------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def _not_found(self, run_id: str) -> RunNotFoundError:
        return RunNotFoundError(f"no run {run_id!r}; `factory runs` lists the runs")

    def _insert_steps(self, cur: Cursor, run_id: str, step_ids: list[str]) -> None:
        """A new run's steps, pending, in the order given."""
        cur.executemany(
            self._sql("INSERT INTO steps (run_id, step_id, status, position) VALUES (?,?,?,?)"),
            [(run_id, step_id, StepStatus.PENDING.value, i) for i, step_id in enumerate(step_ids)],
        )

    def _insert_events(self, cur: Cursor, rows: list[tuple[Any, ...]]) -> None:
        """Events (run_id, step_id, type, data JSON, ts), their ids in the order of the rows."""
        self._before_events(cur)
        cur.executemany(self._sql("INSERT INTO events (run_id, step_id, type, data, ts) VALUES (?,?,?,?,?)"), rows)
        self._after_events(cur)

    # -- identity ------------------------------------------------------------------------------

    _store_id: str | None = None

    def store_id(self) -> str:
        if self._store_id is None:
            query = self._sql("SELECT value FROM store_meta WHERE key=?")
            with self._read() as cur:
                row = cur.execute(query, ("store_id",)).fetchone()
            if row is None:  # the first time: make it; of two processes racing, the first insert wins
                with self._write() as cur:
                    cur.execute(
                        self._sql("INSERT INTO store_meta (key, value) VALUES (?,?) ON CONFLICT (key) DO NOTHING"),
                        ("store_id", uuid.uuid4().hex[:16]),
                    )
                    row = cur.execute(query, ("store_id",)).fetchone()
            self._store_id = str(row[0])
        return self._store_id

    # -- writing -------------------------------------------------------------------------------

    def create_run(
        self,
        run_id: str,
        workflow_name: str,
        spec_json: str,
        inputs: dict[str, Any],
        step_ids: list[str],
        grants: RunGrants | None = None,
    ) -> None:
        with self._write() as cur:
            self._insert_run(cur, NewRun(run_id, workflow_name, spec_json, inputs, step_ids, grants))

    def _insert_run(self, cur: Cursor, run: NewRun) -> None:
        now = time.time()
        run_id, workflow_name, step_ids, grants = run.run_id, run.workflow_name, run.step_ids, run.grants
        cur.execute(
            self._sql(
                "INSERT INTO runs (id, workflow_name, status, spec_json, inputs_json, created_at, cancel_requested,"
                " principal, grants_json) VALUES (?,?,?,?,?,?,?,?,?)"
            ),
            (
                run_id,
                workflow_name,
                RunStatus.PENDING.value,
                run.spec_json,
                json.dumps(run.inputs),
                now,
                False,
                grants.principal if grants else "local",
                grants.model_dump_json() if grants else None,
            ),
        )
        self._insert_steps(cur, run_id, step_ids)
        rows: list[tuple[Any, ...]] = [
            (run_id, None, "run.created", json.dumps({"workflow": workflow_name, "steps": len(step_ids)}), now)
        ]
        rows += [(run_id, step_id, "step.created", "{}", now) for step_id in step_ids]
        self._insert_events(cur, rows)

    def record(self, changes: list[Change], owner: str | None = None) -> None:
        if not changes:
            return
        rows = RecordRows.of(changes, time.time())
        with self._write() as cur:
            self._apply_record(cur, rows, owner)

    def _apply_record(self, cur: Cursor, rows: RecordRows, owner: str | None) -> None:
        """Check the lease of each run the changes touch (when ``owner`` is given), then write
        them: each statement for its rows, in the order of the changes (a row's later change lands
        after its earlier one; the tables' rows do not depend on one another)."""
        if owner is not None:
            for run_id in rows.run_ids:
                row = self._lock_run(cur, run_id)
                if row is None:
                    raise self._not_found(run_id)
                if row[0] != owner:
                    raise self._lease_lost(run_id, row[0])
        for statement, table_rows in (
            (_UPDATE_STEP, rows.steps),
            (_UPSERT_ATTEMPT, rows.attempts),
            (_UPDATE_RUN, rows.runs),
            (_UPSERT_ITEM, rows.items),
        ):
            if table_rows:
                cur.executemany(self._sql(statement), table_rows)
        self._insert_events(cur, rows.events)

    def _lease_lost(self, run_id: str, now_owner: str | None) -> LeaseLostError:
        return LeaseLostError(
            f"run {run_id} is now owned by another coordinator ({now_owner or 'none'}); "
            "this one lost its lease and stops"
        )

    def set_run_spec(self, run_id: str, spec_json: str) -> None:
        with self._write() as cur:
            cur.execute(self._sql("UPDATE runs SET spec_json=? WHERE id=?"), (spec_json, run_id))
            if cur.rowcount == 0:
                raise self._not_found(run_id)

    def decide_approval(self, record: ApprovalRecord) -> tuple[ApprovalRecord, bool]:
        with self._write() as cur:
            cur.execute(
                self._sql(
                    "INSERT INTO approvals (run_id, step_id, approved, decided_by, comment, decided_at)"
                    " VALUES (?,?,?,?,?,?) ON CONFLICT (run_id, step_id) DO NOTHING"
                ),
                (record.run_id, record.step_id, record.approved, record.by, record.comment, record.decided_at),
            )
            inserted = cur.rowcount == 1
            row = cur.execute(
                self._sql(
                    "SELECT approved, decided_by, comment, decided_at FROM approvals WHERE run_id=? AND step_id=?"
                ),
                (record.run_id, record.step_id),
            ).fetchone()
        standing = ApprovalRecord(
            run_id=record.run_id,
            step_id=record.step_id,
            approved=bool(row[0]),
            by=row[1],
            comment=row[2] or "",
            decided_at=float(row[3]),
        )
        return standing, inserted

    def get_approvals(self, run_id: str) -> list[ApprovalRecord]:
        with self._read() as cur:
            rows = cur.execute(
                self._sql(
                    "SELECT step_id, approved, decided_by, comment, decided_at FROM approvals"
                    " WHERE run_id=? ORDER BY decided_at"
                ),
                (run_id,),
            ).fetchall()
        return [
            ApprovalRecord(
                run_id=run_id,
                step_id=row[0],
                approved=bool(row[1]),
                by=row[2],
                comment=row[3] or "",
                decided_at=float(row[4]),
            )
            for row in rows
        ]

    def get_items(self, run_id: str, step_id: str | None = None) -> list[ItemRecord]:
        query = "SELECT step_id, idx, total, output_json, attempts, logs, cached FROM step_items WHERE run_id=?"
        args: list[Any] = [run_id]
        if step_id is not None:
            query += " AND step_id=?"
            args.append(step_id)
        with self._read() as cur:
            rows = cur.execute(self._sql(query + " ORDER BY step_id, idx"), args).fetchall()
        return [
            ItemRecord(
                run_id=run_id,
                step_id=row[0],
                index=int(row[1]),
                total=int(row[2]),
                output_json=row[3],
                attempts=int(row[4]),
                logs=row[5] or "",
                cached=bool(row[6]),
            )
            for row in rows
        ]

    def append_event(self, run_id: str, step_id: str | None, type: str, data: dict[str, Any]) -> None:
        with self._write() as cur:
            self._insert_events(cur, [(run_id, step_id, type, json.dumps(data), time.time())])

    def claim_run(
        self,
        run_id: str,
        owner: str,
        lease_seconds: float,
        dead_owner: str | None = None,
        pending_only: bool = False,
    ) -> bool:
        now = time.time()
        with self._write() as cur:
            row = self._lock_run(cur, run_id)
            if row is None:
                raise self._not_found(run_id)
            current, heartbeat, status = row[0], row[1], row[2]
            if pending_only and status != RunStatus.PENDING.value:
                return False
            lease_fresh = (heartbeat or 0) > now - lease_seconds
            if current and current != owner and current != dead_owner and lease_fresh:
                return False
            cur.execute(self._sql("UPDATE runs SET owner=?, heartbeat_at=? WHERE id=?"), (owner, now, run_id))
            return True

    def heartbeat(self, run_id: str, owner: str) -> bool:
        with self._write() as cur:
            cur.execute(
                self._sql("UPDATE runs SET heartbeat_at=? WHERE id=? AND owner=?"), (time.time(), run_id, owner)
            )
            return bool(cur.rowcount)

    def release_run(self, run_id: str, owner: str) -> None:
        with self._write() as cur:
            cur.execute(
                self._sql("UPDATE runs SET owner=NULL, heartbeat_at=NULL WHERE id=? AND owner=?"), (run_id, owner)
            )

    def reset_unfinished_steps(self, run_id: str) -> list[str]:
        with self._write() as cur:
            # approval gates that wait stay waiting: their wait (and its deadline) goes on
            rows = cur.execute(
                self._sql("SELECT step_id FROM steps WHERE run_id=? AND status NOT IN (?,?) ORDER BY position"),
                (run_id, StepStatus.SUCCEEDED.value, StepStatus.WAITING.value),
            ).fetchall()
            cur.execute(
                self._sql(
                    "UPDATE steps SET status=?, error=NULL, started_at=NULL, finished_at=NULL"
                    " WHERE run_id=? AND status NOT IN (?,?)"
                ),
                (StepStatus.PENDING.value, run_id, StepStatus.SUCCEEDED.value, StepStatus.WAITING.value),
            )
            return [row[0] for row in rows]

    def request_cancel(self, run_id: str) -> None:
        with self._write() as cur:
            cur.execute(self._sql("UPDATE runs SET cancel_requested=? WHERE id=?"), (True, run_id))
            if cur.rowcount == 0:
                raise self._not_found(run_id)

    def clear_cancel(self, run_id: str) -> None:
        with self._write() as cur:
            cur.execute(self._sql("UPDATE runs SET cancel_requested=? WHERE id=?"), (False, run_id))

    def cancel_requested(self, run_id: str) -> bool:
        with self._read() as cur:
            row = cur.execute(self._sql("SELECT cancel_requested FROM runs WHERE id=?"), (run_id,)).fetchone()
        return bool(row and row[0])

    # -- reading -------------------------------------------------------------------------------

    _RUN_COLUMNS = (
        "id, workflow_name, status, spec_json, inputs_json, error, created_at, started_at, finished_at,"
        " owner, heartbeat_at, cancel_requested, grants_json"
    )

    @staticmethod
    def _run(row: Sequence[Any]) -> RunRecord:
        keys = SQLStore._RUN_COLUMNS.replace(" ", "").split(",")
        data = dict(zip(keys, row, strict=True))
        data["inputs"] = json.loads(data.pop("inputs_json"))
        data["cancel_requested"] = bool(data["cancel_requested"])
        grants = data.pop("grants_json")
        data["grants"] = RunGrants.model_validate_json(grants) if grants else None
        return RunRecord.model_validate(data)

    def get_run(self, run_id: str) -> RunRecord:
        with self._read() as cur:
            row = cur.execute(self._sql(f"SELECT {self._RUN_COLUMNS} FROM runs WHERE id=?"), (run_id,)).fetchone()
        if row is None:
            raise self._not_found(run_id)
        return self._run(row)

    def list_runs(
        self, limit: int = 20, status: RunStatus | None = None, before: tuple[float, str] | None = None
    ) -> list[RunRecord]:
        query = f"SELECT {self._RUN_COLUMNS} FROM runs WHERE 1=1"
        args: list[Any] = []
        if status is not None:
            query += " AND status=?"
            args.append(status.value)
        if before is not None:  # keyset pagination: runs older than (created_at, id)
            query += " AND (created_at < ? OR (created_at = ? AND id < ?))"
            args += [before[0], before[0], before[1]]
        query += " ORDER BY created_at DESC, id DESC LIMIT ?"
        args.append(limit)
        with self._read() as cur:
            rows = cur.execute(self._sql(query), args).fetchall()
        return [self._run(row) for row in rows]

    def run_summaries(
        self,
        limit: int = 50,
        status: RunStatus | None = None,
        workflow: str | None = None,
        text: str | None = None,
        before: tuple[float, str] | None = None,
    ) -> list[RunSummary]:
        query = (
            "SELECT r.id, r.workflow_name, r.status, r.error, r.created_at, r.started_at, r.finished_at, r.principal,"
            " (SELECT COUNT(*) FROM steps s WHERE s.run_id = r.id),"
            " (SELECT COUNT(*) FROM steps s WHERE s.run_id = r.id AND s.status IN (?, ?)),"
            " (SELECT COUNT(*) FROM steps s WHERE s.run_id = r.id AND s.status = ?),"
            " (SELECT COUNT(*) FROM steps s WHERE s.run_id = r.id AND s.status IN (?, ?))"
            " FROM runs r WHERE 1=1"
        )
        args: list[Any] = [
            StepStatus.SUCCEEDED.value,
            StepStatus.SKIPPED.value,
            StepStatus.FAILED.value,
            StepStatus.RUNNING.value,
            StepStatus.RETRYING.value,
        ]
        if status is not None:
            query += " AND r.status=?"
            args.append(status.value)
        if workflow:
            query += " AND r.workflow_name=?"
            args.append(workflow)
        if text:
            pattern = "%" + text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            query += (
                " AND (LOWER(r.id) LIKE ? ESCAPE '\\' OR LOWER(r.workflow_name) LIKE ? ESCAPE '\\'"
                " OR LOWER(COALESCE(r.error, '')) LIKE ? ESCAPE '\\')"
            )
            args += [pattern, pattern, pattern]
        if before is not None:
            query += " AND (r.created_at < ? OR (r.created_at = ? AND r.id < ?))"
            args += [before[0], before[0], before[1]]
        query += " ORDER BY r.created_at DESC, r.id DESC LIMIT ?"
        args.append(limit)
        with self._read() as cur:
            rows = cur.execute(self._sql(query), args).fetchall()
        return [
            RunSummary(
                id=row[0],
                workflow_name=row[1],
                status=RunStatus(row[2]),
                error=row[3],
                created_at=row[4],
                started_at=row[5],
                finished_at=row[6],
                started_by=row[7] or "local",
                steps_total=int(row[8]),
                steps_done=int(row[9]),
                steps_failed=int(row[10]),
                steps_running=int(row[11]),
            )
            for row in rows
        ]

    def run_status_counts(self) -> dict[RunStatus, int]:
        with self._read() as cur:
            rows = cur.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
        counts = dict.fromkeys(RunStatus, 0)
        for row in rows:
            counts[RunStatus(row[0])] = int(row[1])
        return counts

    def attempts_since(self, since: float, limit: int = 50_000) -> list[AttemptRecord]:
        with self._read() as cur:
            rows = cur.execute(
                self._sql(
                    "SELECT run_id, step_id, attempt, status, error, duration, finished_at FROM attempts"
                    " WHERE finished_at >= ? ORDER BY finished_at DESC LIMIT ?"
                ),
                (since, limit),
            ).fetchall()
        keys = ("run_id", "step_id", "attempt", "status", "error", "duration", "finished_at")
        return [AttemptRecord.model_validate(dict(zip(keys, row, strict=True))) for row in rows]

    def event_times(self, since: float, types: list[str], scan: int = 200_000) -> list[tuple[float, str]]:
        if not types:
            return []
        marks = ",".join("?" for _ in types)
        with self._read() as cur:
            rows = cur.execute(
                self._sql(  # the newest events only, by the primary key: no scan of the whole log
                    f"SELECT ts, type FROM (SELECT ts, type FROM events ORDER BY id DESC LIMIT ?) recent"
                    f" WHERE ts >= ? AND type IN ({marks})"
                ),
                (scan, since, *types),
            ).fetchall()
        return [(float(row[0]), str(row[1])) for row in rows]

    def get_steps(self, run_id: str) -> list[StepRecord]:
        with self._read() as cur:
            rows = cur.execute(
                self._sql(
                    "SELECT run_id, step_id, status, attempts, output_json, error, started_at, finished_at, cached"
                    " FROM steps WHERE run_id=? ORDER BY position"
                ),
                (run_id,),
            ).fetchall()
            counts = {
                row[0]: (int(row[1]), int(row[2] or 0))
                for row in cur.execute(
                    self._sql("SELECT step_id, COUNT(*), MAX(total) FROM step_items WHERE run_id=? GROUP BY step_id"),
                    (run_id,),
                ).fetchall()
            }
        keys = ("run_id", "step_id", "status", "attempts", "output_json", "error", "started_at", "finished_at")
        records = []
        for row in rows:
            done, total = counts.get(row[1], (0, 0))
            records.append(
                StepRecord.model_validate(
                    {
                        **dict(zip(keys, row, strict=False)),
                        "cached": bool(row[8]),
                        "items_done": done,
                        "items_total": total,
                    }
                )
            )
        return records

    def get_attempts(self, run_id: str, step_id: str | None = None, limit: int | None = None) -> list[AttemptRecord]:
        query = (
            "SELECT run_id, step_id, attempt, status, error, logs, duration, finished_at FROM attempts WHERE run_id=?"
        )
        args: list[Any] = [run_id]
        if step_id is not None:
            query += " AND step_id=?"
            args.append(step_id)
        if limit is None:
            query += " ORDER BY finished_at, step_id, attempt"  # ties (one commit) read the same either way
        else:  # the newest ``limit``, read newest first and turned round: no more rows than asked leave the store
            query += " ORDER BY finished_at DESC, step_id DESC, attempt DESC LIMIT ?"
            args.append(limit)
        with self._read() as cur:
            rows = cur.execute(self._sql(query), args).fetchall()
        if limit is not None:
            rows = rows[::-1]
        keys = ("run_id", "step_id", "attempt", "status", "error", "logs", "duration", "finished_at")
        return [AttemptRecord.model_validate(dict(zip(keys, row, strict=True))) for row in rows]

    def events(self, after_id: int = 0, run_id: str | None = None, limit: int = 1000) -> list[Event]:
        return [
            Event(id=row[0], run_id=row[1], step_id=row[2], type=row[3], data=json.loads(row[4]), ts=row[5])
            for row in self._event_rows(after_id, run_id, limit)
        ]

    def event_rows(self, after_id: int, limit: int) -> list[EventRow]:
        return self._event_rows(after_id, None, limit)

    def _event_rows(self, after_id: int, run_id: str | None, limit: int) -> list[EventRow]:
        query = "SELECT id, run_id, step_id, type, data, ts FROM events WHERE id > ?"
        args: list[Any] = [after_id]
        if run_id is not None:
            query += " AND run_id=?"
            args.append(run_id)
        query += " ORDER BY id LIMIT ?"
        args.append(limit)
        with self._read() as cur:
            rows = cur.execute(self._sql(query), args).fetchall()
        return [(row[0], row[1], row[2], row[3], row[4], row[5]) for row in rows]

    def latest_events(self, run_id: str, type: str, limit: int = 1000) -> list[Event]:
        with self._read() as cur:
            rows = cur.execute(
                self._sql(
                    "SELECT id, run_id, step_id, type, data, ts FROM events WHERE run_id=? AND type=?"
                    " ORDER BY id DESC LIMIT ?"
                ),
                (run_id, type, limit),
            ).fetchall()
        return [
            Event(id=row[0], run_id=row[1], step_id=row[2], type=row[3], data=json.loads(row[4]), ts=row[5])
            for row in rows
        ]

    def last_event_id(self, run_id: str | None = None) -> int:
        with self._read() as cur:
            if run_id is None:
                row = cur.execute("SELECT MAX(id) FROM events").fetchone()
            else:
                row = cur.execute(self._sql(RUN_LAST_EVENT_SQL), (run_id,)).fetchone()
        return int(row[0] or 0) if row else 0

    def wait_for_events(self, timeout: float) -> None:
        """Block until new events may exist or ``timeout`` passes (polling by default)."""
        time.sleep(timeout)

    # -- API keys ------------------------------------------------------------------------------

    _KEY_COLUMNS = "id, name, key_hash, scopes, created_at, revoked, expires_at, last_used_at, secrets"

    def create_api_key(self, record: ApiKeyRecord) -> None:
        with self._write() as cur:
            cur.execute(
                self._sql(f"INSERT INTO api_keys ({self._KEY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)"),
                (
                    record.id,
                    record.name,
                    record.key_hash,
                    ",".join(record.scopes),
                    record.created_at,
                    record.revoked,
                    record.expires_at,
                    record.last_used_at,
                    json.dumps(record.secrets),
                ),
            )

    @staticmethod
    def _api_key(row: Sequence[Any]) -> ApiKeyRecord:
        return ApiKeyRecord(
            id=row[0],
            name=row[1],
            key_hash=row[2],
            scopes=[s for s in str(row[3]).split(",") if s],
            created_at=row[4],
            revoked=bool(row[5]),
            expires_at=row[6],
            last_used_at=row[7],
            secrets=json.loads(row[8] or "[]"),
        )

    def find_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        with self._read() as cur:
            row = cur.execute(
                self._sql(f"SELECT {self._KEY_COLUMNS} FROM api_keys WHERE key_hash=?"), (key_hash,)
            ).fetchone()
        return None if row is None else self._api_key(row)

    def list_api_keys(self) -> list[ApiKeyRecord]:
        with self._read() as cur:
            rows = cur.execute(f"SELECT {self._KEY_COLUMNS} FROM api_keys ORDER BY created_at").fetchall()
        return [self._api_key(row) for row in rows]

    def revoke_api_key(self, key_id: str) -> bool:
        with self._write() as cur:
            cur.execute(self._sql("UPDATE api_keys SET revoked=? WHERE id=?"), (True, key_id))
            return bool(cur.rowcount)

    def touch_api_key(self, key_id: str, when: float) -> None:
        with self._write() as cur:
            cur.execute(self._sql("UPDATE api_keys SET last_used_at=? WHERE id=?"), (when, key_id))

    # -- registered workflows ------------------------------------------------------------------

    _WORKFLOW_COLUMNS = "name, version, spec_json, base_dir, secrets, created_at, created_by"

    @staticmethod
    def _registered(row: Sequence[Any]) -> RegisteredWorkflow:
        return RegisteredWorkflow(
            name=row[0],
            version=row[1],
            spec_json=row[2],
            base_dir=row[3],
            secrets=json.loads(row[4] or "[]"),
            created_at=row[5],
            created_by=row[6] or "",
        )

    def register_workflow(self, record: RegisteredWorkflow) -> RegisteredWorkflow:
        with self._write() as cur:
            row = cur.execute(
                self._sql("SELECT MAX(version) FROM registered_workflows WHERE name=?"), (record.name,)
            ).fetchone()
            stored = record.model_copy(update={"version": int(row[0] or 0) + 1})
            cur.execute(
                self._sql(f"INSERT INTO registered_workflows ({self._WORKFLOW_COLUMNS}) VALUES (?,?,?,?,?,?,?)"),
                (
                    stored.name,
                    stored.version,
                    stored.spec_json,
                    stored.base_dir,
                    json.dumps(stored.secrets),
                    stored.created_at,
                    stored.created_by,
                ),
            )
        return stored

    def get_registered_workflow(self, name: str, version: int | None = None) -> RegisteredWorkflow | None:
        query = f"SELECT {self._WORKFLOW_COLUMNS} FROM registered_workflows WHERE name=?"
        args: list[Any] = [name]
        if version is not None:
            query += " AND version=?"
            args.append(version)
        query += " ORDER BY version DESC LIMIT 1"
        with self._read() as cur:
            row = cur.execute(self._sql(query), args).fetchone()
        return None if row is None else self._registered(row)

    def list_registered_workflows(self) -> list[RegisteredWorkflow]:
        with self._read() as cur:
            rows = cur.execute(
                f"SELECT {self._WORKFLOW_COLUMNS} FROM registered_workflows w WHERE version ="
                " (SELECT MAX(version) FROM registered_workflows v WHERE v.name = w.name) ORDER BY name"
            ).fetchall()
        return [self._registered(row) for row in rows]

    # -- schedules -------------------------------------------------------------------------------

    _SCHEDULE_COLUMNS = (
        "name, workflow_name, workflow_version, cron, timezone, inputs_json, catchup, overlap, paused,"
        " paused_reason, created_at, created_by, after_ts, last_run_id"
    )

    @staticmethod
    def _schedule(row: Sequence[Any]) -> ScheduleRecord:
        return ScheduleRecord(
            name=row[0],
            workflow_name=row[1],
            workflow_version=row[2],
            cron=row[3],
            timezone=row[4],
            inputs=json.loads(row[5] or "{}"),
            catchup=row[6],
            overlap=row[7],
            paused=bool(row[8]),
            paused_reason=row[9],
            created_at=row[10],
            created_by=row[11],
            after=row[12],
            last_run_id=row[13],
        )

    def add_schedule(self, record: ScheduleRecord, max_per_owner: int | None = None) -> None:
        with self._write() as cur:
            if max_per_owner is not None:
                row = cur.execute(
                    self._sql("SELECT COUNT(*) FROM schedules WHERE created_by=?"), (record.created_by,)
                ).fetchone()
                if int(row[0]) >= max_per_owner:
                    raise ScheduleConflictError(
                        f"{record.created_by} holds {row[0]} schedules, the most allowed (setting "
                        "schedules_max_per_key); remove one with `factory schedules remove NAME`"
                    )
            cur.execute(
                self._sql(
                    f"INSERT INTO schedules ({self._SCHEDULE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT (name) DO NOTHING"
                ),
                (
                    record.name,
                    record.workflow_name,
                    record.workflow_version,
                    record.cron,
                    record.timezone,
                    json.dumps(record.inputs),
                    record.catchup,
                    record.overlap,
                    record.paused,
                    record.paused_reason,
                    record.created_at,
                    record.created_by,
                    record.after,
                    record.last_run_id,
                ),
            )
            if cur.rowcount != 1:
                raise ScheduleConflictError(
                    f"a schedule named {record.name!r} exists already; remove it first "
                    f"(`factory schedules remove {record.name}`) or add this one with another --name"
                )

    def get_schedule(self, name: str) -> ScheduleRecord | None:
        with self._read() as cur:
            row = cur.execute(
                self._sql(f"SELECT {self._SCHEDULE_COLUMNS} FROM schedules WHERE name=?"), (name,)
            ).fetchone()
        return None if row is None else self._schedule(row)

    def list_schedules(self) -> list[ScheduleRecord]:
        with self._read() as cur:
            rows = cur.execute(f"SELECT {self._SCHEDULE_COLUMNS} FROM schedules ORDER BY name").fetchall()
        return [self._schedule(row) for row in rows]

    def set_schedule_paused(self, name: str, paused: bool, reason: str | None, now: float) -> bool:
        with self._write() as cur:
            if paused:
                cur.execute(
                    self._sql("UPDATE schedules SET paused=?, paused_reason=? WHERE name=?"), (True, reason, name)
                )
            else:  # the paused time's ticks are not due: from now on
                cur.execute(
                    self._sql(
                        "UPDATE schedules SET paused=?, paused_reason=NULL,"
                        " after_ts=CASE WHEN after_ts > ? THEN after_ts ELSE ? END WHERE name=?"
                    ),
                    (False, now, now, name),
                )
            return bool(cur.rowcount)

    def remove_schedule(self, name: str) -> bool:
        with self._write() as cur:
            cur.execute(self._sql("DELETE FROM schedule_ticks WHERE schedule=?"), (name,))
            cur.execute(self._sql("DELETE FROM schedules WHERE name=?"), (name,))
            return bool(cur.rowcount)

    def decide_tick(self, tick: TickRecord, run: NewRun | None = None) -> bool:
        with self._write() as cur:
            cur.execute(
                self._sql(
                    "INSERT INTO schedule_ticks"
                    " (schedule, tick, run_id, action, reason, missed, decided_at, decided_by)"
                    " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (schedule, tick) DO NOTHING"
                ),
                (
                    tick.schedule,
                    tick.tick,
                    run.run_id if run else None,
                    tick.action,
                    tick.reason,
                    tick.missed,
                    tick.decided_at,
                    tick.decided_by,
                ),
            )
            if cur.rowcount != 1:
                return False  # another scheduler decided this tick first
            if run is not None:
                self._insert_run(cur, run)
            cur.execute(
                self._sql(
                    "UPDATE schedules SET after_ts=CASE WHEN after_ts > ? THEN after_ts ELSE ? END,"
                    " last_run_id=COALESCE(?, last_run_id) WHERE name=?"
                ),
                (tick.tick, tick.tick, run.run_id if run else None, tick.schedule),
            )
            return True

    def schedule_ticks(self, name: str, limit: int = 50) -> list[TickRecord]:
        with self._read() as cur:
            rows = cur.execute(
                self._sql(
                    "SELECT schedule, tick, run_id, action, reason, missed, decided_at, decided_by"
                    " FROM schedule_ticks WHERE schedule=? ORDER BY tick DESC LIMIT ?"
                ),
                (name, limit),
            ).fetchall()
        return [
            TickRecord(
                schedule=r[0],
                tick=int(r[1]),
                run_id=r[2],
                action=r[3],
                reason=r[4] or "",
                missed=int(r[5] or 0),
                decided_at=r[6],
                decided_by=r[7] or "",
            )
            for r in rows
        ]

    # -- routing corrections ---------------------------------------------------------------------

    _CORRECTION_COLUMNS = "id, text, agent, decision_id, who, created_at"

    def add_route_correction(self, record: RouteCorrection) -> RouteCorrection:
        with self._write() as cur:
            row = cur.execute(
                self._sql(
                    "INSERT INTO route_corrections (text, agent, decision_id, who, created_at)"
                    " VALUES (?,?,?,?,?) RETURNING id"
                ),
                (record.text, record.agent, record.decision_id, record.who, record.created_at),
            ).fetchone()
        return record.model_copy(update={"id": int(row[0])})

    def route_corrections(self, after_id: int = 0, limit: int = 10_000) -> list[RouteCorrection]:
        with self._read() as cur:
            rows = cur.execute(
                self._sql(f"SELECT {self._CORRECTION_COLUMNS} FROM route_corrections WHERE id > ? ORDER BY id LIMIT ?"),
                (after_id, limit),
            ).fetchall()
        return [
            RouteCorrection(id=r[0], text=r[1], agent=r[2], decision_id=r[3], who=r[4] or "", created_at=r[5])
            for r in rows
        ]

    # -- once() results of steps (factory.stepcontext) --------------------------------------------

    def once_get(self, run_id: str, step_id: str, item: int, key: str) -> str | None:
        with self._read() as cur:
            row = cur.execute(
                self._sql("SELECT result_json FROM step_once WHERE run_id=? AND step_id=? AND item=? AND key=?"),
                (run_id, step_id, item, key),
            ).fetchone()
        return None if row is None else str(row[0])

    def once_put(
        self, run_id: str, step_id: str, item: int, key: str, result_json: str, attempt: int, max_keys: int
    ) -> str:
        where = "run_id=? AND step_id=? AND item=?"
        with self._write() as cur:
            row = cur.execute(
                self._sql(f"SELECT result_json FROM step_once WHERE {where} AND key=?"), (run_id, step_id, item, key)
            ).fetchone()
            if row is not None:  # another attempt recorded it first: that result stands
                return str(row[0])
            count = cur.execute(self._sql(f"SELECT COUNT(*) FROM step_once WHERE {where}"), (run_id, step_id, item))
            if int(count.fetchone()[0]) >= max_keys:
                raise StepContextError(
                    f"step {step_id!r} has recorded {max_keys} once() results in this run, the most one step "
                    "(or for_each item) may; use fewer keys, e.g. one per batch rather than one per record"
                )
            cur.execute(
                self._sql(
                    "INSERT INTO step_once (run_id, step_id, item, key, result_json, attempt, created_at)"
                    " VALUES (?,?,?,?,?,?,?) ON CONFLICT (run_id, step_id, item, key) DO NOTHING"
                ),
                (run_id, step_id, item, key, result_json, attempt, time.time()),
            )
            row = cur.execute(
                self._sql(f"SELECT result_json FROM step_once WHERE {where} AND key=?"), (run_id, step_id, item, key)
            ).fetchone()
        return str(row[0])

    # -- cache -----------------------------------------------------------------------------------

    def cache_get(self, key: str) -> str | None:
        with self._read() as cur:
            row = cur.execute(self._sql("SELECT output_json FROM cache WHERE key=?"), (key,)).fetchone()
        return None if row is None else str(row[0])

    def cache_put(self, key: str, output_json: str) -> None:
        with self._write() as cur:
            cur.execute(
                self._sql(
                    "INSERT INTO cache (key, output_json, created_at) VALUES (?,?,?)"
                    " ON CONFLICT (key) DO UPDATE SET output_json=excluded.output_json, created_at=excluded.created_at"
                ),
                (key, output_json, time.time()),
            )


# a run's newest event: the last entry of the run in the events (run_id, id) index, one probe
RUN_LAST_EVENT_SQL = "SELECT id FROM events WHERE run_id=? ORDER BY id DESC LIMIT 1"


def iter_statements(script: str) -> Iterator[str]:
    for statement in script.split(";"):
        if statement.strip():
            yield statement.strip()
