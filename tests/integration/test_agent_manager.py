"""The agent manager on a real local Ray: discover, health checks, scaling, draining."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from factory.catalog import AgentSpec
from factory.errors import AgentError
from factory.pools import AgentInfo, ManagerConfig, Pools, stop_manager
from factory.pools.manager import NAMESPACE

FIXTURES = str(Path(__file__).parent.parent / "fixtures")

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture
def manager_name() -> str:
    return f"test-manager-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def pools(manager_name: str) -> Iterator[Pools]:
    connection = Pools(
        manager_name,
        config=ManagerConfig(
            check_interval=0.3, unhealthy_after=2, scale_down_after=2, drain_grace=0.1, drain_timeout=10
        ),
    )
    try:
        yield connection
    finally:
        connection.close()
        stop_manager(manager_name, drain_timeout=0)


def spec(name: str, cls: str, **extra: Any) -> AgentSpec:
    pool = {"num_cpus": 0.1, **extra.pop("pool", {})}
    return AgentSpec.model_validate({"name": name, "class": f"agent_fixtures:{cls}", "pool": pool, **extra})


def poll(pools: Pools, name: str, check: Callable[[AgentInfo], bool], deadline: float = 30.0) -> AgentInfo:
    end = time.monotonic() + deadline
    info = None
    while time.monotonic() < end:
        found = pools.discover(name, refresh=True)
        if found:
            info = found[0]
            if check(info):
                return info
        time.sleep(0.2)
    raise AssertionError(f"pool {name} never reached the expected state; last seen: {info}")


def test_register_discover_and_unregister_with_drain(pools: Pools) -> None:
    pools.ensure(
        spec("sleeper", "Sleeper", capabilities=["wait"], pool={"min_replicas": 2, "max_replicas": 2}),
        search_path=[FIXTURES],
    )
    pools.ensure(spec("greeter", "greeter", capabilities=["greet"], config={"greeting": "hi"}), search_path=[FIXTURES])

    infos = {i.name: i for i in pools.discover(refresh=True)}
    assert set(infos) == {"sleeper", "greeter"}
    assert infos["sleeper"].replicas == 2 and infos["sleeper"].health == "healthy"
    assert infos["sleeper"].capabilities == ["wait"] and infos["sleeper"].breaker == "closed"
    assert [i.name for i in pools.discover(capability="greet")] == ["greeter"]
    assert pools.client("greeter").ask({"name": "Ada", "times": 2}) == {"text": "hi Ada hi Ada"}

    # the task model rejects a bad task: a validation error, not retried
    bad = ray.get(pools.client("greeter").submit({"times": 2}))
    assert not bad.ok and not bad.retryable and "name" in (bad.error or "")

    # a request in flight when the pool is unregistered still finishes
    sleeper = pools.client("sleeper")
    ref = sleeper.submit({"sleep": 1.0, "echo": "drained"})
    time.sleep(0.3)
    assert pools.unregister("sleeper") == 2
    outcome = ray.get(ref, timeout=30)
    assert outcome.ok and json.loads(outcome.output_json or "null")["echo"] == "drained"
    assert [i.name for i in pools.discover()] == ["greeter"]
    with pytest.raises(AgentError, match="no agent pool named 'sleeper'"):
        pools.client("sleeper")


def test_an_agent_that_cannot_start_is_reported(pools: Pools) -> None:
    with pytest.raises(AgentError, match="has no attribute 'Missing'"):
        pools.ensure(spec("ghost", "Missing"), search_path=[FIXTURES])
    with pytest.raises(AgentError, match="routed to but not run"):
        pools.ensure(AgentSpec(name="elsewhere", capabilities=["x"]))


def test_unhealthy_replica_is_replaced(pools: Pools, tmp_path: Path) -> None:
    client = pools.ensure(
        spec("sick", "MarkedSick", config={"flag_dir": str(tmp_path)}, pool={"min_replicas": 2, "max_replicas": 2}),
        search_path=[FIXTURES],
    )
    victim, handle = next(iter(client.handles().items()))
    pid = ray.get(handle.health.remote()).pid
    (tmp_path / str(pid)).touch()

    info = poll(
        pools,
        "sick",
        lambda i: (
            i.replicas == 2
            and victim not in {r.replica_id for r in i.replica_details}
            and all(r.healthy for r in i.replica_details)
        ),
    )
    assert info.health == "healthy"
    pools.report_now()
    assert victim not in client.handles()
    assert client.ask({})["pid"] != pid


def test_scales_up_on_queue_depth_and_back_down_when_quiet(pools: Pools) -> None:
    client = pools.ensure(
        spec("sleeper", "Sleeper", pool={"min_replicas": 1, "max_replicas": 3, "max_concurrency": 1}),
        search_path=[FIXTURES],
    )
    refs = [client.submit({"sleep": 0.7}) for _ in range(4)]  # 1 slot, 3 queued
    pools.report_now()
    up = poll(pools, "sleeper", lambda i: i.replicas == 3, deadline=20)
    assert up.max_replicas == 3
    assert all(o.ok for o in ray.get(refs, timeout=60))
    down = poll(pools, "sleeper", lambda i: i.replicas == 1, deadline=30)
    assert down.queued == 0


def test_min_replicas_zero_scales_to_zero_and_back_on_the_next_request(pools: Pools) -> None:
    client = pools.ensure(
        spec("napper", "Sleeper", pool={"min_replicas": 0, "max_replicas": 2, "max_concurrency": 2}),
        search_path=[FIXTURES],
    )
    assert len(client.handles()) == 1  # registered on first use: one replica to serve it
    first = ray.get(client.submit({"sleep": 0.05, "echo": "one"}), timeout=60)
    assert first.ok, first.error
    # Quiet for scale_down_after checks: the last replica stops, and the pool says it is idle.
    idle = poll(pools, "napper", lambda i: i.replicas == 0, deadline=30)
    assert idle.health == "idle" and idle.min_replicas == 0
    pools.report_now()
    # The next request finds no replica; the manager starts one and the request is served.
    second = ray.get(client.submit({"sleep": 0.05, "echo": "two"}), timeout=60)
    assert second.ok, second.error
    assert json.loads(second.output_json or "null")["echo"] == "two"
    assert second.extra["replica"] != first.extra["replica"]
    back = poll(pools, "napper", lambda i: i.replicas == 1)
    assert back.health == "healthy"
    # The async API takes the same way back from zero.
    poll(pools, "napper", lambda i: i.replicas == 0, deadline=30)
    pools.report_now()
    third = asyncio.run(client.call({"sleep": 0.01, "echo": "three"}))
    assert third.ok, third.error


def test_shutdown_drains_in_flight_work(manager_name: str) -> None:
    pools = Pools(manager_name, config=ManagerConfig(drain_grace=0.1))
    try:
        client = pools.ensure(spec("sleeper", "Sleeper"), search_path=[FIXTURES])
        ref = client.submit({"sleep": 1.0, "echo": "finished"})
        assert stop_manager(manager_name, drain_timeout=10) == {"sleeper": 1}
        outcome = ray.get(ref, timeout=30)
        assert outcome.ok and json.loads(outcome.output_json or "null")["echo"] == "finished"
        with pytest.raises(ValueError):
            ray.get_actor(manager_name, namespace=NAMESPACE)
    finally:
        pools.close()
        stop_manager(manager_name, drain_timeout=0)
