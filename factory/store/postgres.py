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
- A dropped connection (a restarted server, a terminated backend, a network cut) is
  not an error the caller sees: the pool checks a connection before handing it out
  (unless it served a call within the last second), and every public method is
  retried, with backoff, for up to
  ``retry_seconds``, when it failed on a connection error and its transaction is
  known not to have committed. When the connection drops during COMMIT, the store
  asks the server (``pg_xact_status``) whether that transaction committed: if it
  did, the call succeeds as it is; it is never run a second time (a second
  ``INSERT INTO events`` would duplicate events). Only connection-class errors are
  retried; every other error reaches the caller at once.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from factory.errors import FactoryError, StoreUnavailableError
from factory.store.base import StepStatus
from factory.store.sql import Cursor, RecordRows, SQLStore, fold_step_rows, iter_statements

_MIGRATION_LOCK = 7_240_001
_EVENTS_LOCK = 7_240_002
CHANNEL = "factory_events"
_CONNECTION_STATES = ("57P01", "57P02", "57P03")  # admin shutdown, crash shutdown, cannot connect now

log = logging.getLogger(__name__)

# a Store.record batch whose rows take more JSON than this goes row by row (_apply_record)
MAX_RECORD_JSON_CHARS = 8 * 1024 * 1024
# a pooled connection that served a call this recently is handed out without a check (_check_connection)
RECENTLY_USED_SECONDS = 1.0

# factory_record(owner, run ids, then each table's rows as JSON arrays of arrays, in the order of
# the changes; the positions are those of sql.py's _step_row, _attempt_row, _run_row, _item_row
# and event rows): what SQLStore._apply_record's statements do one row at a time, in the same
# order, done a table at a time (`python -m benchmarks.commit_path`: a batch of 200 steps took
# 29.7 ms with a statement a row in a loop, 10.8 ms so; 20 steps 3.7 ms, 2.1; one step the same):
# - steps: one UPDATE, when no step has two rows (the client folds a step's rows into one,
#   sql.fold_step_rows: an UPDATE changes a row once however many rows of its FROM match it);
#   otherwise row by row, in order, as before;
# - attempts, items: an upsert replaces every column but the key, so a key's last row alone
#   gives what its rows in order give (and one INSERT may not upsert a row twice); a key's
#   earlier rows are not written, so a NOT NULL one of them breaks is not refused (no caller
#   sends such a row);
# - events: inserted in the order of the changes. Their ids follow it: nextval() is taken as
#   each row leaves the ordered scan, one at a time (not documented, but what the executor does;
#   the store contract's tests check the order on every run of them).
_RECORD_FUNCTION = f"""
CREATE OR REPLACE FUNCTION factory_record(
    p_owner TEXT, p_run_ids TEXT[], p_steps JSONB, p_attempts JSONB, p_runs JSONB, p_items JSONB,
    p_events JSONB, OUT problem TEXT, OUT problem_run TEXT, OUT run_owner TEXT
) LANGUAGE plpgsql AS $fn$
DECLARE
    r JSONB;
    rid TEXT;
BEGIN
    IF p_owner IS NOT NULL THEN
        FOREACH rid IN ARRAY p_run_ids LOOP
            SELECT owner INTO run_owner FROM runs WHERE id = rid FOR UPDATE;
            IF NOT FOUND THEN
                problem := 'missing'; problem_run := rid; RETURN;
            END IF;
            IF run_owner IS DISTINCT FROM p_owner THEN
                problem := 'lease'; problem_run := rid; RETURN;
            END IF;
        END LOOP;
        run_owner := NULL;
    END IF;
    IF (SELECT count(*) = count(DISTINCT (e->>10, e->>11)) FROM jsonb_array_elements(p_steps) AS t(e)) THEN
        UPDATE steps s SET status = e->>0,
            attempts = COALESCE((e->>1)::INTEGER, s.attempts),
            output_json = CASE WHEN (e->>2)::BOOLEAN THEN e->>3 ELSE s.output_json END,
            error = e->>4,
            started_at = CASE WHEN (e->>5)::BOOLEAN THEN COALESCE(s.started_at, (e->>6)::DOUBLE PRECISION)
                ELSE COALESCE((e->>7)::DOUBLE PRECISION, s.started_at) END,
            finished_at = (e->>8)::DOUBLE PRECISION,
            cached = (e->>9)::BOOLEAN
        FROM jsonb_array_elements(p_steps) AS t(e)
        WHERE s.run_id = e->>10 AND s.step_id = e->>11;
    ELSE
        FOR r IN SELECT value FROM jsonb_array_elements(p_steps) WITH ORDINALITY AS t(value, n) ORDER BY n LOOP
            UPDATE steps SET status = r->>0,
                attempts = COALESCE((r->>1)::INTEGER, attempts),
                output_json = CASE WHEN (r->>2)::BOOLEAN THEN r->>3 ELSE output_json END,
                error = r->>4,
                started_at = CASE WHEN (r->>5)::BOOLEAN THEN COALESCE(started_at, (r->>6)::DOUBLE PRECISION)
                    ELSE COALESCE((r->>7)::DOUBLE PRECISION, started_at) END,
                finished_at = (r->>8)::DOUBLE PRECISION,
                cached = (r->>9)::BOOLEAN
            WHERE run_id = r->>10 AND step_id = r->>11;
        END LOOP;
    END IF;
    INSERT INTO attempts (run_id, step_id, attempt, status, error, logs, duration, finished_at)
    SELECT DISTINCT ON (e->>0, e->>1, (e->>2)::INTEGER) e->>0, e->>1, (e->>2)::INTEGER, e->>3, e->>4, e->>5,
        (e->>6)::DOUBLE PRECISION, (e->>7)::DOUBLE PRECISION
    FROM jsonb_array_elements(p_attempts) WITH ORDINALITY AS t(e, n)
    ORDER BY e->>0, e->>1, (e->>2)::INTEGER, n DESC
    ON CONFLICT (run_id, step_id, attempt) DO UPDATE SET status = excluded.status,
        error = excluded.error, logs = excluded.logs, duration = excluded.duration,
        finished_at = excluded.finished_at;
    FOR r IN SELECT value FROM jsonb_array_elements(p_runs) WITH ORDINALITY AS t(value, n) ORDER BY n LOOP
        UPDATE runs SET status = r->>0, error = r->>1,
            started_at = CASE WHEN (r->>2)::BOOLEAN THEN COALESCE(started_at, (r->>3)::DOUBLE PRECISION)
                ELSE started_at END,
            finished_at = (r->>4)::DOUBLE PRECISION
        WHERE id = r->>5;
    END LOOP;
    INSERT INTO step_items (run_id, step_id, idx, total, output_json, attempts, logs, cached, finished_at)
    SELECT DISTINCT ON (e->>0, e->>1, (e->>2)::INTEGER) e->>0, e->>1, (e->>2)::INTEGER, (e->>3)::INTEGER,
        e->>4, (e->>5)::INTEGER, e->>6, (e->>7)::BOOLEAN, (e->>8)::DOUBLE PRECISION
    FROM jsonb_array_elements(p_items) WITH ORDINALITY AS t(e, n)
    ORDER BY e->>0, e->>1, (e->>2)::INTEGER, n DESC
    ON CONFLICT (run_id, step_id, idx) DO UPDATE SET total = excluded.total,
        output_json = excluded.output_json, attempts = excluded.attempts, logs = excluded.logs,
        cached = excluded.cached, finished_at = excluded.finished_at;
    PERFORM pg_advisory_xact_lock({_EVENTS_LOCK});
    INSERT INTO events (run_id, step_id, type, data, ts)
    SELECT e->>0, e->>1, e->>2, e->>3, (e->>4)::DOUBLE PRECISION
    FROM jsonb_array_elements(p_events) WITH ORDINALITY AS t(e, n) ORDER BY n;
    NOTIFY {CHANNEL};
END
$fn$
"""

# a migration is a script of statements separated by ";", or a tuple of whole statements
MIGRATIONS: list[tuple[int, str | tuple[str, ...]]] = [
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
    (
        3,
        """
        ALTER TABLE runs ADD COLUMN principal TEXT;
        ALTER TABLE runs ADD COLUMN grants_json TEXT;
        ALTER TABLE api_keys ADD COLUMN expires_at DOUBLE PRECISION;
        ALTER TABLE api_keys ADD COLUMN last_used_at DOUBLE PRECISION;
        ALTER TABLE api_keys ADD COLUMN secrets TEXT NOT NULL DEFAULT '[]';
        CREATE TABLE registered_workflows (
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            spec_json TEXT NOT NULL,
            base_dir TEXT,
            secrets TEXT NOT NULL DEFAULT '[]',
            created_at DOUBLE PRECISION NOT NULL,
            created_by TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (name, version)
        )
        """,
    ),
    (
        4,
        """
        CREATE TABLE store_meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )
        """,
    ),
    (
        5,
        """
        CREATE TABLE route_corrections (
            id BIGSERIAL PRIMARY KEY,
            text TEXT NOT NULL,
            agent TEXT NOT NULL,
            decision_id TEXT,
            who TEXT NOT NULL DEFAULT '',
            created_at DOUBLE PRECISION NOT NULL
        )
        """,
    ),
    (
        6,
        """
        CREATE TABLE step_items (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            step_id TEXT NOT NULL,
            idx INTEGER NOT NULL,
            total INTEGER NOT NULL,
            output_json TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 1,
            logs TEXT NOT NULL DEFAULT '',
            cached BOOLEAN NOT NULL DEFAULT FALSE,
            finished_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (run_id, step_id, idx)
        )
        """,
    ),
    (
        7,
        """
        CREATE TABLE step_once (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            step_id TEXT NOT NULL,
            item INTEGER NOT NULL,
            key TEXT NOT NULL,
            result_json TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (run_id, step_id, item, key)
        )
        """,
    ),
    (
        8,
        """
        CREATE TABLE schedules (
            name TEXT PRIMARY KEY,
            workflow_name TEXT NOT NULL,
            workflow_version INTEGER NOT NULL,
            cron TEXT NOT NULL,
            timezone TEXT NOT NULL,
            inputs_json TEXT NOT NULL,
            catchup TEXT NOT NULL,
            overlap TEXT NOT NULL,
            paused BOOLEAN NOT NULL DEFAULT FALSE,
            paused_reason TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            created_by TEXT NOT NULL,
            after_ts DOUBLE PRECISION NOT NULL,
            last_run_id TEXT
        );
        CREATE INDEX schedules_created_by ON schedules (created_by);
        CREATE TABLE schedule_ticks (
            schedule TEXT NOT NULL,
            tick BIGINT NOT NULL,
            run_id TEXT,
            action TEXT NOT NULL,
            reason TEXT NOT NULL DEFAULT '',
            missed INTEGER NOT NULL DEFAULT 0,
            decided_at DOUBLE PRECISION NOT NULL,
            decided_by TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (schedule, tick)
        )
        """,
    ),
    (
        9,
        """
        CREATE TABLE approvals (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            step_id TEXT NOT NULL,
            approved BOOLEAN NOT NULL,
            decided_by TEXT NOT NULL,
            comment TEXT NOT NULL DEFAULT '',
            decided_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (run_id, step_id)
        )
        """,
    ),
    # Store.record in one statement: the lease checks and every row of a batch, applied in the
    # server (each statement from the client costs a round trip and about 0.1 ms of its CPU).
    # 10 made it with a loop a row; 11 remakes it a table at a time (both now make the latter)
    (10, (_RECORD_FUNCTION,)),
    (11, (_RECORD_FUNCTION,)),
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
            for statement in script if isinstance(script, tuple) else iter_statements(script):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            applied_now.append(version)
    return applied_now


_NOT_RETRIED = frozenset({"close", "wait_for_events"})


@functools.cache
def _nul_free_dumpers() -> tuple[type, ...]:
    """psycopg's dumpers of ``str`` for text parameters, with a NUL character turned into U+FFFD:
    PostgreSQL's text cannot hold one, and psycopg refuses the whole statement (a comment, a search
    or a name given to the API with a NUL in it failed with an internal error)."""
    from psycopg.types.string import StrDumper, StrDumperUnknown

    def nul_free(base: Any) -> type:
        def dump(self: Any, obj: str) -> Any:
            return base.dump(self, obj.replace("\x00", "\ufffd") if "\x00" in obj else obj)

        return type(f"NulFree{base.__name__}", (base,), {"dump": dump})

    return nul_free(StrDumper), nul_free(StrDumperUnknown)  # the second is the default for %s


def _configure_connection(conn: Any) -> None:
    """Each pooled connection, once made."""
    for dumper in _nul_free_dumpers():
        conn.adapters.register_dumper(str, dumper)


# JSON's escape of a NUL character: "\u0000" after an even number of backslashes (after an odd
# number, it is a backslash, then the text "u0000")
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _json_rows(rows: list[Any]) -> str | None:
    """The rows as a JSONB argument (of factory_record, or of a statement); None when JSONB cannot
    carry them: a NUL character (JSONB refuses \\u0000; the row-by-row path's dumpers replace it)
    or a float NaN or infinity (not JSON)."""
    try:
        text = json.dumps(rows, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return None
    # (the search, about 6 us a row, a fifth of a batch's time, only when there may be one)
    return None if "\\u0000" in text and _NUL_ESCAPE.search(text) else text


def _retry_public_methods[S: PostgresStore](cls: type[S]) -> type[S]:
    """Wrap every public method (the Store Protocol's, whichever class defines them) in
    :meth:`PostgresStore._retrying`. Each is one transaction, and a transaction is retried
    only when it is known not to have committed, so any of them may run again."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def retried(self: PostgresStore, *args: Any, **kwargs: Any) -> Any:
            return self._retrying(lambda: method(self, *args, **kwargs))

        return retried

    for name in dir(cls):
        if name.startswith("_") or name in _NOT_RETRIED:
            continue
        if inspect.isfunction(inspect.getattr_static(cls, name)):
            setattr(cls, name, wrap(getattr(cls, name)))
    return cls


@_retry_public_methods
class PostgresStore(SQLStore):
    """Store backed by PostgreSQL."""

    placeholder = "%s"

    def __init__(self, url: str, pool_max: int = 4, retry_seconds: float = 30.0) -> None:
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise FactoryError("the PostgreSQL store needs psycopg: pip install 'factory[postgres]'") from exc
        self.url = url
        self.retry_seconds = retry_seconds
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
            url,
            min_size=1,
            max_size=pool_max,
            kwargs={"autocommit": True},
            open=True,
            name="factory-store",
            configure=_configure_connection,
            check=self._check_connection,  # a connection that died while idle is replaced, not used
            timeout=min(10.0, max(retry_seconds, 1.0)),  # waiting for a connection is retried like the rest
        )
        self._used_at: dict[int, float] = {}  # id() of a pooled connection -> when it last served a call
        self._listen_lock = threading.Lock()
        self._listener: Any = None

    # -- connections, and what happens when one drops ----------------------------------------------

    def _is_connection_error(self, exc: BaseException) -> bool:
        """The connection or the server went away (or could not be reached): the kind of error
        that a new connection may not meet. Errors of SQL, constraints, locks are not."""
        if not isinstance(exc, self._psycopg.OperationalError):
            return False
        state = exc.sqlstate
        return state is None or state.startswith("08") or state in _CONNECTION_STATES  # None: client-side

    def _check_connection(self, conn: Any) -> None:
        """The pool's check before it hands out a connection (a round trip): of one that served
        a call within the last RECENTLY_USED_SECONDS, it is skipped (were it dead since, its call
        fails on a connection error and is retried on another; the pool drops a broken one).
        When one is found dead, the server probably dropped all of them: check every idle one
        now, rather than let the pool find them one at a time (it waits a second after the
        second dead one)."""
        if len(self._used_at) > 64:  # entries of connections the pool closed: forget them all
            self._used_at.clear()
        used_at = self._used_at.pop(id(conn), -RECENTLY_USED_SECONDS)
        if self.retry_seconds >= 1.0 and time.monotonic() - used_at < RECENTLY_USED_SECONDS:
            return  # (with almost no time to retry, every connection is checked)
        try:
            self._pool.check_connection(conn)
        except Exception:
            self._pool.check()
            raise

    def _unavailable(self, exc: BaseException, retryable: bool, what: str) -> StoreUnavailableError:
        from factory.settings import mask_secrets

        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return StoreUnavailableError(f"PostgreSQL at {mask_secrets(self.url)}: {what} ({reason})", retryable)

    @contextmanager
    def _write(self) -> Iterator[Cursor]:
        xid: str | None = None
        backend_pid = 0
        body_done = False
        try:
            with self._pool.connection() as conn:
                backend_pid = conn.info.backend_pid
                with conn.transaction(), conn.cursor() as cur:
                    row = cur.execute("SELECT pg_current_xact_id()::text").fetchone()
                    xid = None if row is None else str(row[0])
                    yield cur
                    body_done = True
                # leaving conn.transaction() sent COMMIT
                self._used_at[id(conn)] = time.monotonic()
        except self._psycopg.OperationalError as exc:
            if not self._is_connection_error(exc):
                raise
            if not body_done or xid is None:  # COMMIT was never sent: the server rolls it back
                raise self._unavailable(exc, True, "the connection dropped in a transaction") from exc
            outcome = self._commit_outcome(xid, backend_pid)
            if outcome == "committed":
                log.warning("the connection dropped as transaction %s committed; it did commit, going on", xid)
                return  # only the acknowledgement was lost: the call succeeded, do not run it again
            if outcome == "aborted":
                raise self._unavailable(exc, True, "the connection dropped during COMMIT, which failed") from exc
            raise self._unavailable(
                exc,
                False,
                f"the connection dropped during COMMIT and whether transaction {xid} committed could not be "
                "established; check the run's state (`factory status`) before resuming it",
            ) from exc

    def _commit_outcome(self, xid: str, backend_pid: int) -> str | None:
        """Whether a transaction whose COMMIT lost its answer committed: 'committed', 'aborted',
        or None when the server cannot be asked within ``retry_seconds``."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.05
        while True:
            try:
                with self._psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                    status = conn.execute("SELECT pg_xact_status(%s::xid8)", (xid,)).fetchone()
                    if status is not None and status[0] in ("committed", "aborted"):
                        return str(status[0])
                    # "in progress": its backend has not yet seen that the client is gone; end it
                    conn.execute("SELECT pg_terminate_backend(%s)", (backend_pid,))
            except self._psycopg.OperationalError as exc:
                if not self._is_connection_error(exc):
                    raise
            if time.monotonic() + delay > deadline:
                return None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    @contextmanager
    def _read(self) -> Iterator[Cursor]:
        try:
            with self._pool.connection() as conn:
                with conn.cursor() as cur:
                    yield cur
                self._used_at[id(conn)] = time.monotonic()
        except self._psycopg.OperationalError as exc:
            if not self._is_connection_error(exc):
                raise
            raise self._unavailable(exc, True, "the connection dropped while reading") from exc

    def _retrying[T](self, call: Callable[[], T]) -> T:
        """Run one store call; again, with backoff, while it fails retryably and time is left."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.05
        while True:
            try:
                return call()
            except StoreUnavailableError as exc:
                if not exc.retryable or time.monotonic() + delay > deadline:
                    if exc.retryable:
                        exc.args = (f"{exc}; gave up after {self.retry_seconds:g}s of retries",)
                    raise
                log.warning("%s; retrying in %.2fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _apply_record(self, cur: Cursor, rows: RecordRows, owner: str | None) -> None:
        """The same as SQLStore's, in one statement (factory_record): one round trip a batch
        instead of one a row. A batch whose rows are large (outputs of several MiB) goes row by
        row, as a JSONB argument is bounded (255 MB) and parsed whole; so does one JSONB cannot
        carry (_json_rows)."""
        steps = fold_step_rows(rows.steps)
        tables = [_json_rows(table) for table in (steps, rows.attempts, rows.runs, rows.items, rows.events)]
        if any(table is None for table in tables) or sum(len(t or "") for t in tables) > MAX_RECORD_JSON_CHARS:
            super()._apply_record(cur, rows, owner)
            return
        problem = cur.execute(
            "SELECT * FROM factory_record(%s, %s, %s, %s, %s, %s, %s)", (owner, rows.run_ids, *tables)
        ).fetchone()
        if problem is not None and problem[0] == "missing":
            raise self._not_found(problem[1])
        if problem is not None and problem[0] == "lease":
            raise self._lease_lost(problem[1], problem[2])

    # A new run's steps and events each in one statement, given as a JSON array (a run of 500 steps
    # was made in 20 ms with a statement a row, as executemany sends them, and is in 13 ms so)
    def _insert_steps(self, cur: Cursor, run_id: str, step_ids: list[str]) -> None:
        ids = _json_rows(step_ids)
        if ids is None or len(ids) > MAX_RECORD_JSON_CHARS:  # what JSONB cannot carry: a statement a row
            super()._insert_steps(cur, run_id, step_ids)
            return
        cur.execute(
            "INSERT INTO steps (run_id, step_id, status, position)"
            " SELECT %s, step_id, %s, n - 1 FROM jsonb_array_elements_text(%s::jsonb) WITH ORDINALITY AS t(step_id, n)",
            (run_id, StepStatus.PENDING.value, ids),
        )

    def _insert_events(self, cur: Cursor, rows: list[tuple[Any, ...]]) -> None:
        events = _json_rows(rows)
        if events is None or len(events) > MAX_RECORD_JSON_CHARS:
            super()._insert_events(cur, rows)
            return
        self._before_events(cur)
        cur.execute(
            "INSERT INTO events (run_id, step_id, type, data, ts)"
            " SELECT e->>0, e->>1, e->>2, e->>3, (e->>4)::DOUBLE PRECISION"
            " FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS t(e, n) ORDER BY n",
            (events,),
        )
        self._after_events(cur)

    def _lock_run(self, cur: Cursor, run_id: str) -> Any:
        return cur.execute("SELECT owner, heartbeat_at, status FROM runs WHERE id=%s FOR UPDATE", (run_id,)).fetchone()

    def _before_events(self, cur: Cursor) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_EVENTS_LOCK,))

    def _after_events(self, cur: Cursor) -> None:
        cur.execute(f"NOTIFY {CHANNEL}")

    def wait_for_events(self, timeout: float) -> None:
        """LISTEN for commits that appended events. The first call starts listening and
        returns at once, so the caller looks again and misses nothing in between. If the
        listening connection drops, it is dropped and the next call listens anew."""
        with self._listen_lock:
            try:
                if self._listener is None:
                    self._listener = self._psycopg.connect(self.url, autocommit=True, connect_timeout=5)
                    self._listener.execute(f"LISTEN {CHANNEL}")
                    return
                for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                    pass
            except self._psycopg.OperationalError as exc:
                if not self._is_connection_error(exc):
                    raise
                log.warning("the LISTEN connection dropped (%s); listening again", str(exc).strip())
                if self._listener is not None:
                    self._listener.close()
                    self._listener = None
                time.sleep(min(timeout, 1.0))

    def close(self) -> None:
        self._pool.close()
        with self._listen_lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
