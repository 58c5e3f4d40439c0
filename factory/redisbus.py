"""Redis Streams event bus: the store's event log (the outbox) published to Redis.

Every key belongs to one store: ``factory:<store id>:...``, the store id being
random, made once and kept in the store (``Store.store_id()``). Two stores (two
deployments, or a fresh database) can share one Redis without mixing their events
or their cursors: event ids start again at 1 in a new store, and under a shared
cursor its events would all have looked published already.

Every event is appended to the store's stream ``factory:<store id>:events`` and to
its run's stream ``factory:<store id>:run:<run_id>:events`` under the entry id
``<event id>-0``. Event ids follow commit order (see the stores), so publishing in
id order keeps the streams in order, and Redis itself refuses an entry id not
above the stream's last: a publisher that retries after a failure, or two
publishers at once, cannot create duplicates. The publication cursor
(``factory:<store id>:events:published``) lives in Redis beside the streams.

If Redis is unreachable, events simply stay in the store; the publisher keeps
trying and catches up in order when Redis returns. Runs never fail because of it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from factory.errors import FactoryError
from factory.store import Event, EventRow, Store

log = logging.getLogger(__name__)

FINAL_EVENTS = {"run.succeeded", "run.failed", "run.cancelled"}

# Publish a batch of events in one command: each appended to the store's stream (KEYS[1]) and to
# its run's, under the entry id <event id>-0; the run's stream of a final event expires after
# ARGV[2] s; then the cursor (KEYS[2]) moves forward to the batch's last id (never back). An entry
# id already there ("equal or smaller") was published before: skipped; any other error stops the
# batch, the cursor unmoved. KEYS[3...]: the batch's run streams. ARGV[1]: MAXLEN (~) of each
# stream, 0 for none. ARGV[3]: the events,
# JSON [[id, run stream, run id, step id, type, data, ts, final], ...], all strings but final
# (numbers are strings: Lua's cjson keeps 14 digits).
_PUBLISH = """
local events = cjson.decode(ARGV[3])
local maxlen = tonumber(ARGV[1])
for _, e in ipairs(events) do
    local entry = e[1] .. '-0'
    for _, key in ipairs({KEYS[1], e[2]}) do
        local added
        if maxlen > 0 then
            added = redis.pcall('XADD', key, 'MAXLEN', '~', maxlen, entry,
                'run_id', e[3], 'step_id', e[4], 'type', e[5], 'data', e[6], 'ts', e[7])
        else
            added = redis.pcall('XADD', key, entry,
                'run_id', e[3], 'step_id', e[4], 'type', e[5], 'data', e[6], 'ts', e[7])
        end
        if type(added) == 'table' and added.err and not string.find(added.err, 'equal or smaller', 1, true) then
            return redis.error_reply(added.err)
        end
    end
    if e[8] then redis.call('EXPIRE', e[2], ARGV[2]) end
end
local last = tonumber(events[#events][1])
if last > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], last) end
return #events
"""


@dataclass(frozen=True)
class StreamKeys:
    """The Redis keys of one store's events, all under ``factory:<store id>:``."""

    store_id: str

    def __post_init__(self) -> None:
        if not self.store_id or any(c in self.store_id for c in ": \t\n{}*?[]"):
            raise FactoryError(f"{self.store_id!r} is not a store id (Store.store_id() gives it)")

    @property
    def prefix(self) -> str:
        return f"factory:{self.store_id}"

    @property
    def events(self) -> str:
        """Every event of the store."""
        return f"{self.prefix}:events"

    @property
    def cursor(self) -> str:
        """The id of the last event published (all below it are published too)."""
        return f"{self.prefix}:events:published"

    def run(self, run_id: str) -> str:
        """The events of one run."""
        return f"{self.prefix}:run:{run_id}:events"

    def stream(self, run_id: str | None = None) -> str:
        return self.run(run_id) if run_id else self.events


def _client(url: str) -> Any:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise FactoryError("the Redis event bus needs the redis package: pip install 'factory[redis]'") from exc
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5, decode_responses=True)


_FIELDS = ("run_id", "step_id", "type", "data", "ts")  # an entry's fields, in the order _PUBLISH takes them


def _field_values(row: EventRow) -> tuple[str, str, str, str, str]:
    """An event's entry fields (:data:`_FIELDS`), from its row as the store keeps it."""
    _, run_id, step_id, type_, data, ts = row
    return run_id, step_id or "", type_, data, repr(ts)


def _fields(row: EventRow) -> dict[str, str]:
    return dict(zip(_FIELDS, _field_values(row), strict=True))


def event_from_entry(entry_id: str, fields: dict[str, str]) -> Event:
    return Event(
        id=int(entry_id.split("-", 1)[0]),
        run_id=fields["run_id"],
        step_id=fields["step_id"] or None,
        type=fields["type"],
        data=json.loads(fields["data"]),
        ts=float(fields["ts"]),
    )


class RedisEventPublisher:
    """Publishes the store's events to Redis Streams, in order, at most once per entry id."""

    def __init__(
        self,
        store: Store,
        url: str,
        maxlen: int = 100_000,
        run_stream_ttl: int = 7 * 24 * 3600,
        batch: int = 500,
    ) -> None:
        self.store = store
        self.url = url
        self.keys = StreamKeys(store.store_id())
        self.maxlen = maxlen
        self.run_stream_ttl = run_stream_ttl
        self.batch = batch
        self.redis = _client(url)
        self._publish = self.redis.register_script(_PUBLISH)
        self._stop = threading.Event()
        self._nudge = threading.Event()
        self._thread: threading.Thread | None = None

    def cursor(self) -> int:
        return int(self.redis.get(self.keys.cursor) or 0)

    def publish_pending(self) -> int:
        """Publish every event after the cursor; returns how many were looked at.
        Raises redis.ConnectionError while Redis is unreachable."""
        total = 0
        while True:
            events = self.store.event_rows(self.cursor(), self.batch)
            if not events:
                return total
            # the events as the store keeps them, their data as its JSON text: not parsed to be
            # written again (11 us of this process's CPU an event that way, 3 us so: the
            # coordinator's, while a run goes on)
            run_streams = {run_id: self.keys.run(run_id) for run_id in {event[1] for event in events}}
            rows = [
                [str(event[0]), run_streams[event[1]], *_field_values(event), event[3] in FINAL_EVENTS]
                for event in events
            ]
            # one command a batch (two XADDs an event, packed by redis-py, cost about 85 us of
            # this process's CPU an event); the run streams declared, as a script's keys must be
            self._publish(
                keys=[self.keys.events, self.keys.cursor, *run_streams.values()],
                args=[self.maxlen or 0, self.run_stream_ttl, json.dumps(rows)],
            )
            total += len(events)
            if len(events) < self.batch:
                return total

    # -- background publication ------------------------------------------------------------------

    def start(self, interval: float = 0.2) -> RedisEventPublisher:
        def loop() -> None:
            delay = interval
            while not self._stop.is_set():
                try:
                    self.publish_pending()
                    delay = interval
                except Exception as exc:  # noqa: BLE001 - Redis down: keep the events, try again later
                    log.warning("cannot publish events to Redis yet (%s); retrying", exc)
                    delay = min(delay * 2, 5.0)
                self._nudge.wait(delay)
                self._nudge.clear()

        self._thread = threading.Thread(target=loop, name="factory-event-publisher", daemon=True)
        self._thread.start()
        return self

    def nudge(self) -> None:
        self._nudge.set()

    def stop(self, flush_timeout: float = 5.0) -> bool:
        """Stop the thread, then try for up to ``flush_timeout`` s to publish what is left.
        Returns False if events remain unpublished (they stay in the store for later)."""
        self._stop.set()
        self._nudge.set()
        if self._thread is not None:
            self._thread.join(10)
        deadline = time.monotonic() + flush_timeout
        while True:
            try:
                self.publish_pending()
                return True
            except Exception as exc:  # noqa: BLE001
                if time.monotonic() >= deadline:
                    log.warning("events not yet published to Redis (%s); they stay in the store", exc)
                    return False
                time.sleep(0.2)


class RedisEventBus:
    """Reading one store's streams: replay, tail, and consumer groups for outside consumers.

    ``store_id`` names the store whose events to read (``Store.store_id()``; or use
    :meth:`for_store`)."""

    def __init__(self, url: str, store_id: str) -> None:
        self.keys = StreamKeys(store_id)
        self.redis = _client(url)

    @classmethod
    def for_store(cls, store: Store, url: str) -> RedisEventBus:
        return cls(url, store.store_id())

    def replay(self, after_id: int = 0, run_id: str | None = None, count: int = 1000) -> list[Event]:
        stream = self.keys.stream(run_id)
        entries = self.redis.xrange(stream, min=f"({after_id}-0" if after_id else "-", count=count)
        return [event_from_entry(entry_id, fields) for entry_id, fields in entries]

    def tail(self, after_id: int = 0, run_id: str | None = None, block_ms: int = 1000) -> Iterator[Event]:
        """Events after ``after_id``, waiting for new ones (forever; stop iterating to end)."""
        stream = self.keys.stream(run_id)
        last = f"{after_id}-0"
        while True:
            reply = self.redis.xread({stream: last}, count=500, block=block_ms)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    yield event_from_entry(entry_id, fields)

    def ensure_group(self, group: str, run_id: str | None = None, start_after: int = 0) -> None:
        """Create a consumer group (if it does not exist) that starts after event ``start_after``."""
        import redis

        stream = self.keys.stream(run_id)
        try:
            self.redis.xgroup_create(stream, group, id=f"{start_after}-0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def consume(
        self, group: str, consumer: str, run_id: str | None = None, count: int = 100, block_ms: int = 1000
    ) -> list[Event]:
        """New events for this consumer of the group; acknowledge them with :meth:`ack`."""
        stream = self.keys.stream(run_id)
        reply = self.redis.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)
        return [event_from_entry(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries]

    def ack(self, group: str, events: list[Event], run_id: str | None = None) -> int:
        stream = self.keys.stream(run_id)
        if not events:
            return 0
        return int(self.redis.xack(stream, group, *[f"{e.id}-0" for e in events]))

    def pending(self, group: str, run_id: str | None = None) -> int:
        stream = self.keys.stream(run_id)
        return int(self.redis.xpending(stream, group)["pending"])
