"""Agent pools on a real local Ray: failover when a replica is killed, the bounded queue, the breaker."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from factory.breaker import BreakerConfig
from factory.errors import CircuitOpenError, PoolSaturated
from factory.pools import ManagerConfig, PoolClient, Pools, stop_manager
from factory.runtime import Outcome

FIXTURES = str(Path(__file__).parent.parent / "fixtures")

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture
def pools() -> Iterator[Pools]:
    name = f"test-pools-{uuid.uuid4().hex[:8]}"
    connection = Pools(
        name,
        config=ManagerConfig(check_interval=0.5, drain_grace=0.1, drain_timeout=5),
        breaker=BreakerConfig(failure_threshold=2, cooldown=60),
        failover_wait=20,
    )
    try:
        yield connection
    finally:
        connection.close()
        stop_manager(name, drain_timeout=0)


def sleeper_pool(pools: Pools, cls: str = "Sleeper", **pool: Any) -> PoolClient:
    from factory.catalog import AgentSpec

    spec = AgentSpec.model_validate(
        {"name": cls.lower(), "class": f"agent_fixtures:{cls}", "pool": {"num_cpus": 0.1, **pool}}
    )
    return pools.ensure(spec, search_path=[FIXTURES])


def wait_until_serving(client: PoolClient, deadline: float = 30.0) -> str:
    """The id of the replica that is executing a request right now (asked of the replicas themselves)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for replica_id, handle in client.handles().items():
            if ray.get(handle.health.remote()).in_flight > 0:
                return replica_id
        time.sleep(0.02)
    raise AssertionError("no replica started serving the request")


def wait_for_size(pools: Pools, name: str, size: int, gone: str, deadline: float = 30.0) -> list[str]:
    end = time.monotonic() + deadline
    ids: list[str] = []
    while time.monotonic() < end:
        (info,) = pools.discover(name, refresh=True)
        ids = [r.replica_id for r in info.replica_details]
        if info.replicas == size and gone not in ids and all(r.healthy for r in info.replica_details):
            return ids
        time.sleep(0.2)
    raise AssertionError(f"pool {name} did not get back to {size} healthy replicas without {gone}: {ids}")


def settled(client: PoolClient, deadline: float = 10.0) -> int:
    """In-flight count once completion callbacks (which run just after ray.get returns) have run."""
    end = time.monotonic() + deadline
    while client.in_flight and time.monotonic() < end:
        time.sleep(0.01)
    return client.in_flight


def test_killed_replica_request_is_retried_elsewhere_and_pool_heals(pools: Pools) -> None:
    client = sleeper_pool(pools, min_replicas=2, max_replicas=2, max_concurrency=1)
    before = set(client.handles())
    assert len(before) == 2
    ref = client.submit({"sleep": 1.0, "echo": "survivor"})
    victim = wait_until_serving(client)
    ray.kill(client.handles()[victim])

    outcome: Outcome = ray.get(ref, timeout=60)
    assert outcome.ok, outcome.error
    assert json.loads(outcome.output_json or "null")["echo"] == "survivor"
    assert outcome.extra["dead"] == [victim]
    assert outcome.extra["replica"] in before - {victim}

    ids = wait_for_size(pools, "sleeper", 2, gone=victim)
    assert len(set(ids) - before) == 1  # one new replica took the dead one's place
    pools.report_now()
    assert victim not in client.handles() and len(client.handles()) == 2
    assert settled(client) == 0


def test_killed_replica_with_the_async_api(pools: Pools) -> None:
    client = sleeper_pool(pools, cls="AsyncSleeper", min_replicas=2, max_replicas=2, max_concurrency=4)

    async def scenario() -> tuple[Outcome, str]:
        call = asyncio.ensure_future(client.call({"sleep": 1.0, "echo": 7}))
        victim = await asyncio.to_thread(wait_until_serving, client)
        ray.kill(client.handles()[victim])
        return await call, victim

    outcome, victim = asyncio.run(scenario())
    assert outcome.ok, outcome.error
    assert json.loads(outcome.output_json or "null")["echo"] == 7
    assert outcome.extra["dead"] == [victim] and outcome.extra["replica"] != victim
    wait_for_size(pools, "asyncsleeper", 2, gone=victim)


def test_power_of_two_choices_spreads_by_in_flight(pools: Pools) -> None:
    client = sleeper_pool(pools, min_replicas=2, max_replicas=2, max_concurrency=1)
    refs = [client.submit({"sleep": 0.5}) for _ in range(2)]
    # with two replicas both are sampled: the second request goes to the idle one
    assert sorted(client.in_flight_by_replica().values()) == [1, 1]
    refs += [client.submit({"sleep": 0.5}) for _ in range(2)]
    assert sorted(client.in_flight_by_replica().values()) == [2, 2]
    outcomes = ray.get(refs)
    pids = {json.loads(o.output_json or "null")["pid"] for o in outcomes}
    assert len(pids) == 2, [o.extra for o in outcomes]
    assert all(not o.extra["dead"] for o in outcomes)
    assert settled(client) == 0


def test_a_full_queue_raises_pool_saturated(pools: Pools) -> None:
    client = sleeper_pool(pools, min_replicas=1, max_replicas=1, max_concurrency=1, max_queued=2)
    refs = [client.submit({"sleep": 0.5}) for _ in range(3)]  # 1 running + 2 queued
    with pytest.raises(PoolSaturated, match=r"raise pool\.max_replicas or pool\.max_queued") as info:
        client.submit({"sleep": 0})
    assert info.value.in_flight == 3 and info.value.capacity == 1 and info.value.max_queued == 2
    assert all(o.ok for o in ray.get(refs))
    assert settled(client) == 0
    assert client.ask({"echo": "again"})["echo"] == "again"  # room again once the queue drained


def test_breaker_opens_after_repeated_failures(pools: Pools) -> None:
    from factory.catalog import AgentSpec

    client = pools.ensure(
        AgentSpec.model_validate({"name": "flaky", "class": "agent_fixtures:Flaky"}), search_path=[FIXTURES]
    )
    assert ray.get(client.submit({"fail": False})).ok
    for _ in range(2):
        outcome = ray.get(client.submit({"fail": True}))
        assert not outcome.ok and outcome.retryable and "backend this agent needs is down" in (outcome.error or "")
    settled(client)  # the completion callbacks settle the breaker
    assert client.breaker.state.value == "open"
    with pytest.raises(CircuitOpenError, match="pool:flaky"):
        client.submit({"fail": False})


def test_a_pool_of_one_waits_for_the_replacement(pools: Pools) -> None:
    client = sleeper_pool(pools, min_replicas=1, max_replicas=1)
    ref = client.submit({"sleep": 0.5, "echo": "again"})
    victim = wait_until_serving(client)
    ray.kill(client.handles()[victim])
    outcome: Outcome = ray.get(ref, timeout=60)
    assert outcome.ok, outcome.error  # served by the replica the manager started in the dead one's place
    assert outcome.extra["dead"] == [victim] and outcome.extra["replica"] != victim
    assert json.loads(outcome.output_json or "null")["echo"] == "again"


def test_route_steps_score_with_the_settings_they_are_given(tmp_path: Path) -> None:
    """A run's route: steps use the run's settings (scorer, model folder), not the defaults."""
    from factory.catalog import load_catalog
    from factory.errors import FactoryError
    from factory.pools import PoolDispatcher
    from factory.settings import Settings

    catalog = load_catalog(Path(__file__).parent.parent.parent / "examples" / "agents_triage" / "agents.yaml")
    assert type(PoolDispatcher(catalog).router.scorer).__name__ == "LexicalScorer"
    elsewhere = tmp_path / "no-model-here"
    settings = Settings(home=tmp_path, router_scorer="embedding", embedding_model_path=elsewhere)
    dispatcher = PoolDispatcher(catalog, settings=settings)
    assert dispatcher.scorer == "embedding"
    with pytest.raises(FactoryError, match=str(elsewhere)):
        dispatcher.router  # noqa: B018 - building the router loads the settings' model


def test_calls_sent_together_go_as_one_batch_and_a_slow_one_holds_none_back(pools: Pools) -> None:
    client = sleeper_pool(pools, cls="AsyncSleeper", min_replicas=1, max_replicas=1, max_concurrency=32)
    asyncio.run(client.call({"echo": "warm"}))  # the replica is up

    async def scenario() -> tuple[list[Any], int]:
        finished: list[Any] = []

        async def one(task: dict[str, Any]) -> None:
            outcome = await client.call(task)
            assert outcome.ok, outcome.error
            finished.append(json.loads(outcome.output_json or "null")["echo"])

        await asyncio.gather(one({"sleep": 2.0, "echo": "slow"}), *(one({"echo": i}) for i in range(15)))
        return finished, client._batcher().actor_calls

    finished, actor_calls = asyncio.run(scenario())
    assert finished[-1] == "slow" and sorted(finished[:-1]) == list(range(15))  # none waited for the slow one
    assert actor_calls == 2  # one call_batch for the sixteen, one result for the slow one parked


def test_batched_calls_keep_to_the_replicas_max_concurrency(pools: Pools) -> None:
    client = sleeper_pool(pools, cls="AsyncGauge", min_replicas=1, max_replicas=1, max_concurrency=3)

    async def scenario() -> list[Outcome]:
        return list(await asyncio.gather(*(client.call({"sleep": 0.2, "echo": i}) for i in range(12))))

    outcomes = asyncio.run(scenario())
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    peaks = [json.loads(o.output_json or "null")["peak"] for o in outcomes]
    assert max(peaks) == 3


def test_a_batch_on_a_killed_replica_fails_over_call_by_call(pools: Pools) -> None:
    client = sleeper_pool(pools, cls="AsyncSleeper", min_replicas=2, max_replicas=2, max_concurrency=16)

    async def scenario() -> tuple[list[Outcome], str]:
        calls = [asyncio.ensure_future(client.call({"sleep": 1.5, "echo": i})) for i in range(8)]
        victim = await asyncio.to_thread(wait_until_serving, client)
        ray.kill(client.handles()[victim])
        return list(await asyncio.gather(*calls)), victim

    outcomes, victim = asyncio.run(scenario())
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert sorted(json.loads(o.output_json or "null")["echo"] for o in outcomes) == list(range(8))
    moved = [o for o in outcomes if o.extra.get("dead")]
    assert moved and all(o.extra["dead"] == [victim] and o.extra["replica"] != victim for o in moved)
    assert settled(client) == 0


def test_a_parked_call_is_collected_or_dropped_on_the_replica(pools: Pools) -> None:
    client = sleeper_pool(pools, cls="AsyncSleeper", min_replicas=1, max_replicas=1, max_concurrency=8)
    (handle,) = client.handles().values()
    answers = ray.get(
        handle.call_batch.remote(
            [
                ({"echo": "quick"}, None, None, None),
                ({"sleep": 1.0}, None, None, None),
                ({"sleep": 30}, None, None, None),
            ]
        )
    )
    quick, parked, dropped = answers
    assert isinstance(quick, Outcome) and quick.ok and isinstance(parked, int) and isinstance(dropped, int)
    assert ray.get(handle.health.remote()).in_flight == 2
    ray.get(handle.drop.remote(dropped))
    collected: Outcome = ray.get(handle.result.remote(parked))
    assert collected.ok
    deadline = time.monotonic() + 10
    while ray.get(handle.health.remote()).in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    health = ray.get(handle.health.remote())
    assert (health.in_flight, health.served) == (0, 3 - 1)  # the dropped call neither ran on nor counted
    with pytest.raises(ray.exceptions.RayTaskError, match="no parked call"):
        ray.get(handle.result.remote(parked))  # collected once


def test_threads_that_ensure_a_pool_at_once_share_one_client(pools: Pools) -> None:
    """Each thread's own client would count only its own calls: power of two choices could then
    send them all to one replica (a maker's samples once all went to one of two)."""
    from concurrent.futures import ThreadPoolExecutor

    from factory.catalog import AgentSpec

    spec = AgentSpec.model_validate(
        {
            "name": "sleeper-once",
            "class": "agent_fixtures:Sleeper",
            "pool": {"num_cpus": 0.1, "min_replicas": 2, "max_replicas": 2},
        }
    )
    barrier = threading.Barrier(4)

    def ensure(_: int) -> PoolClient:
        barrier.wait()
        return pools.ensure(spec, search_path=[FIXTURES])

    with ThreadPoolExecutor(4) as run:
        clients = list(run.map(ensure, range(4)))
    assert all(client is clients[0] for client in clients)
    outcomes = ray.get([clients[0].submit({"sleep": 0.5, "echo": i}) for i in range(2)])
    assert len({o.extra["replica"] for o in outcomes}) == 2  # one client: the two calls spread
