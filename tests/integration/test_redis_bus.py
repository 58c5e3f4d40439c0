"""The Redis Streams event bus, against real redis-server processes."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import factory
from factory.cache import RedisResultCache
from factory.redisbus import RedisEventBus, RedisEventPublisher, StreamKeys, _fields, event_from_entry
from factory.settings import Settings
from factory.spec import Step, Workflow
from factory.store import Event, Store
from factory.store.sqlite import SQLiteStore

FIXTURES = str(Path(__file__).parent.parent / "fixtures")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server of our own on a free port, with an append-only file so a restart keeps the streams."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.dir = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: redis flushes its append-only file and exits
            self.proc.wait(20)
            self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        from tests.conftest import service_missing

        service_missing("redis-server", FileNotFoundError("redis-server"))
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def wf(*steps: Step) -> Workflow:
    return Workflow(name="bus", steps=list(steps), base_dir=FIXTURES)


def slow_chain(n: int, seconds: float) -> Workflow:
    return wf(
        *[
            Step(id=f"s{i}", python="teststeps:sleepy", needs=[f"s{i - 1}"] if i else [], with_={"seconds": seconds})
            for i in range(n)
        ]
    )


def test_published_in_order_with_replay_and_consumer_groups(
    ray_cluster: str, own_redis: RedisServer, factory_home: Path
) -> None:
    settings = Settings(home=factory_home, events_url=own_redis.url)
    store = SQLiteStore(factory_home / "factory.db")
    result = factory.run(slow_chain(3, 0.05), store=store, settings=settings)
    assert result.ok
    stored = store.events(0, result.run_id)
    bus = RedisEventBus.for_store(store, own_redis.url)
    assert bus.replay(0, result.run_id) == stored
    assert bus.replay(0) == store.events(0)
    assert bus.replay(stored[3].id, result.run_id) == stored[4:]

    bus.ensure_group("auditors", result.run_id)
    bus.ensure_group("auditors", result.run_id)  # idempotent
    first = bus.consume("auditors", "a1", result.run_id, count=4, block_ms=100)
    rest = bus.consume("auditors", "a2", result.run_id, block_ms=100)
    assert first + rest == stored
    assert bus.pending("auditors", result.run_id) == len(stored)
    assert bus.ack("auditors", first + rest, result.run_id) == len(stored)
    assert bus.pending("auditors", result.run_id) == 0
    assert bus.redis.ttl(bus.keys.run(result.run_id)) > 0  # finished runs' streams expire
    store.close()


REDIS_OUTAGE_SECONDS = 30.0


def test_redis_outage_mid_run_loses_nothing_and_duplicates_nothing(
    ray_cluster: str, own_redis: RedisServer, factory_home: Path
) -> None:
    settings = Settings(home=factory_home, events_url=own_redis.url)
    store = SQLiteStore(factory_home / "factory.db")
    bus = RedisEventBus.for_store(store, own_redis.url)
    seen: list[Event] = []
    last_id = 0

    def consume() -> None:
        """A consumer that tracks the last id it saw and reconnects after errors."""
        nonlocal last_id
        deadline = time.monotonic() + 60 + REDIS_OUTAGE_SECONDS
        while time.monotonic() < deadline:
            try:
                reply = bus.redis.xread({bus.keys.events: f"{last_id}-0"}, count=100, block=200)
            except redis.RedisError:
                time.sleep(0.1)
                continue
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    event = event_from_entry(entry_id, fields)
                    seen.append(event)
                    last_id = event.id
                    if event.type == "run.succeeded":
                        return

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    outcome: list[factory.RunResult] = []
    runner = threading.Thread(
        # 8 steps of 5 s: the run goes on through the whole outage and ends after it
        target=lambda: outcome.append(factory.run(slow_chain(8, 5.0), store=store, settings=settings))
    )
    runner.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(e.type == "step.succeeded" for e in seen):
        time.sleep(0.05)
    assert seen, "nothing was published before the outage"
    own_redis.stop()  # Redis goes away mid-run, for 30 s (the run does not wait for it)
    time.sleep(REDIS_OUTAGE_SECONDS)
    own_redis.start()  # and comes back with what it had
    runner.join(90)
    consumer.join(60)
    assert outcome and outcome[0].ok  # the outage never failed the run
    stored = store.events(0)
    assert [e.id for e in seen] == [e.id for e in stored]  # everything, in order, once
    assert seen == stored
    store.close()


def test_events_written_while_redis_is_down_are_published_later(
    ray_cluster: str, own_redis: RedisServer, factory_home: Path
) -> None:
    store = SQLiteStore(factory_home / "factory.db")
    url = own_redis.url
    own_redis.stop()
    settings = Settings(home=factory_home, events_url=url)
    result = factory.run(slow_chain(2, 0.01), store=store, settings=settings)
    assert result.ok  # the run does not wait for Redis
    own_redis.start()
    bus = RedisEventBus.for_store(store, url)
    assert bus.replay(0) == []
    publisher = RedisEventPublisher(store, url)
    assert publisher.publish_pending() == len(store.events(0))
    assert bus.replay(0) == store.events(0)
    assert publisher.publish_pending() == 0  # nothing twice
    publisher.redis.delete(publisher.keys.cursor)  # even with the cursor lost:
    publisher.publish_pending()
    assert bus.replay(0) == store.events(0)  # Redis refuses ids it already has
    store.close()


def test_trimming_keeps_streams_bounded(own_redis: RedisServer, factory_home: Path) -> None:
    store = SQLiteStore(factory_home / "factory.db")
    for i in range(30):
        store.create_run(f"r{i}", "wf", "{}", {}, [f"s{j}" for j in range(10)])
    publisher = RedisEventPublisher(store, own_redis.url, maxlen=50)
    publisher.publish_pending()
    length = publisher.redis.xlen(publisher.keys.events)
    assert length < 330 and length >= 50  # approximate trimming: about maxlen, never below it
    store.close()


def test_redis_result_cache(
    redis_url: str, store: object, ray_cluster: str, factory_home: Path, tmp_path: Path
) -> None:
    counter = tmp_path / "c"
    settings = Settings(home=factory_home, cache_url=redis_url, cache_ttl_seconds=60)
    workflow = wf(
        Step(
            id="slow",
            python="teststeps:count_and_echo",
            with_={"counter": str(counter), "value": str(tmp_path)},
            cache=True,
        )
    )
    first = factory.run(workflow, store=store, settings=settings)  # type: ignore[arg-type]
    second = factory.run(workflow, store=store, settings=settings)  # type: ignore[arg-type]
    assert first.outputs == second.outputs == {"slow": str(tmp_path)}
    assert len(counter.read_text()) == 1
    cache = RedisResultCache(redis_url, 60)
    keys = [k for k in cache.redis.scan_iter("factory:cache:*") if 0 < cache.redis.ttl(k) <= 60]
    assert keys


def _assert_streams_match(store: Store, url: str) -> None:
    """The store's streams hold every event of the store, once each, in order: the store's
    stream all of them, each run's stream that run's."""
    bus = RedisEventBus.for_store(store, url)
    assert bus.replay(0, count=100_000) == store.events(0, limit=100_000)
    for run in store.list_runs(limit=1000):
        assert bus.replay(0, run.id, count=100_000) == store.events(0, run.id, limit=100_000)


def test_two_stores_share_one_redis_each_under_its_own_keys(
    own_redis: RedisServer, postgres_url: str, factory_home: Path
) -> None:
    """A second store (a fresh database, another deployment) publishing to the Redis of a first
    one: its event ids start again at 1, far below the first store's cursor. With one global
    cursor it published nothing; each store has its own keys now."""
    from factory.store.postgres import PostgresStore

    first: Store = SQLiteStore(factory_home / "factory.db")
    second: Store = PostgresStore(postgres_url)
    assert first.store_id() != second.store_id()
    reopened = SQLiteStore(factory_home / "factory.db")
    assert reopened.store_id() == first.store_id()  # made once, kept in the store
    reopened.close()

    for i in range(12):
        first.create_run(f"a{i}", "wf", "{}", {}, ["x", "y"])  # 36 events
    for i in range(3):
        second.create_run(f"b{i}", "wf", "{}", {}, ["x"])  # 6 events, ids 1..6
    assert RedisEventPublisher(first, own_redis.url).publish_pending() == 36
    assert RedisEventPublisher(second, own_redis.url).publish_pending() == 6
    for store in (first, second):
        _assert_streams_match(store, own_redis.url)
    prefixes = tuple(f"{StreamKeys(s.store_id()).prefix}:" for s in (first, second))
    keys = list(redis.Redis.from_url(own_redis.url, decode_responses=True).scan_iter("*"))
    assert keys and all(key.startswith(prefixes) for key in keys), keys

    for store, name in ((first, "c"), (second, "d")):
        bus = RedisEventBus.for_store(store, own_redis.url)
        bus.ensure_group("auditors", start_after=store.last_event_id())
        for i in range(4):
            store.create_run(f"{name}{i}", "wf", "{}", {}, ["x", "y"])
        # A batch is in the streams but the cursor is behind it (a Redis restored from a snapshot
        # taken between the two, or a publisher of an earlier version that died between its
        # XADDs and its cursor: now both are one script)...
        crashing = RedisEventPublisher(store, own_redis.url, batch=5)
        publish = crashing._publish

        def publish_then_lose_the_cursor(
            keys: list[str], args: list[object], crashing: RedisEventPublisher = crashing, publish: Any = publish
        ) -> None:
            before = crashing.cursor()
            publish(keys=keys, args=args)
            crashing.redis.set(crashing.keys.cursor, before)
            raise redis.ConnectionError("the publisher's process died here")

        crashing._publish = publish_then_lose_the_cursor
        with pytest.raises(redis.ConnectionError):
            crashing.publish_pending()
        # ...and another dies halfway through a pipeline: the next event reached the store's
        # stream but not its run's stream.
        cursor = crashing.cursor()
        pending = store.events(cursor)
        assert len(pending) == 12 and bus.replay(cursor) == pending[:5]
        half = pending[5]
        (half_row,) = store.event_rows(half.id - 1, 1)
        crashing.redis.xadd(crashing.keys.events, _fields(half_row), id=f"{half.id}-0")
        # A new publisher (the next coordinator, or `factory publish-events`) starts from the cursor.
        restarted = RedisEventPublisher(store, own_redis.url)
        assert restarted.publish_pending() == 12
        _assert_streams_match(store, own_redis.url)  # nothing lost, nothing twice
        assert restarted.publish_pending() == 0
        consumed = bus.consume("auditors", "a1", count=1000, block_ms=100)
        assert consumed == pending  # a consumer group sees each event once
    first.close()
    second.close()


def test_a_write_redis_refuses_stops_the_batch_and_is_published_later(
    own_redis: RedisServer, factory_home: Path
) -> None:
    """Redis refuses one event's XADD (here its run's stream key holds a string): the batch stops
    at that event with the cursor unmoved, the publisher reports the error, and once the cause is
    gone the next publication adds that event and the rest, none twice. (Before, the rest of the
    batch went on past it: here the store's stream got all nine.)"""
    store = SQLiteStore(factory_home / "factory.db")
    for i in range(3):
        store.create_run(f"r{i}", "wf", "{}", {}, ["a", "b"])  # 3 events each
    publisher = RedisEventPublisher(store, own_redis.url)
    publisher.redis.set(publisher.keys.run("r1"), "not a stream")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        publisher.publish_pending()
    assert publisher.cursor() == 0
    bus = RedisEventBus.for_store(store, own_redis.url)
    assert bus.replay(0) == store.events(0)[:4]  # r0's three, and r1's first in the store's stream
    publisher.redis.delete(publisher.keys.run("r1"))
    assert publisher.publish_pending() == 9
    _assert_streams_match(store, own_redis.url)
    assert publisher.cursor() == store.last_event_id()
    store.close()
