"""The pool client's choice and admission logic, with placeholder handles (no replica is called)."""

from __future__ import annotations

import random

import pytest

from factory.catalog import AgentSpec
from factory.errors import PoolSaturated
from factory.pools.client import PoolClient
from factory.pools.models import PoolSnapshot, ReplicaRef


def make_client(replicas: int, max_concurrency: int = 1, max_queued: int = 0) -> PoolClient:
    spec = AgentSpec.model_validate(
        {"name": "p", "pool": {"max_replicas": 8, "max_concurrency": max_concurrency, "max_queued": max_queued}}
    )
    snapshot = PoolSnapshot(
        name="p",
        version=1,
        spec=spec,
        replicas=[ReplicaRef(replica_id=f"r{i}", handle=object()) for i in range(replicas)],
    )
    return PoolClient(snapshot, seed=7)


def test_power_of_two_choices_never_picks_the_busier_of_two() -> None:
    client = make_client(4, max_concurrency=100)
    rng = random.Random(1)
    for _ in range(400):
        member = client._start()
        assert member is not None
        if rng.random() < 0.4:  # some requests finish
            client._release(member)
    loads = client.in_flight_by_replica()
    assert sum(loads.values()) == client.in_flight
    assert max(loads.values()) - min(loads.values()) <= 3  # random choice would spread far wider


def test_admission_counts_capacity_plus_queue() -> None:
    client = make_client(2, max_concurrency=2, max_queued=3)
    taken = [client._start() for _ in range(7)]  # 4 slots + 3 queued
    assert client.capacity == 4 and client.queued == 3
    with pytest.raises(PoolSaturated) as info:
        client._start()
    assert (info.value.in_flight, info.value.capacity, info.value.max_queued) == (7, 4, 3)
    assert client.rejected == 1
    client._release(taken[0])
    assert client._start() is not None


def test_a_membership_update_keeps_counts_of_replicas_that_stay() -> None:
    client = make_client(2, max_concurrency=4)
    for _ in range(4):
        client._start()
    before = client.in_flight_by_replica()
    client.apply(
        PoolSnapshot(
            name="p",
            version=2,
            spec=client.spec,
            replicas=[ReplicaRef(replica_id="r0", handle=object()), ReplicaRef(replica_id="r9", handle=object())],
        )
    )
    assert client.in_flight_by_replica() == {"r0": before["r0"], "r9": 0}
    assert client.version == 2 and client.replicas == 2


def test_a_replica_seen_dead_stays_out_until_the_manager_drops_it() -> None:
    client = make_client(3, max_concurrency=10, max_queued=100)
    client._mark_dead("r1")
    snapshot = PoolSnapshot(
        name="p",
        version=client.version,
        spec=client.spec,
        replicas=[ReplicaRef(replica_id=f"r{i}", handle=object()) for i in range(3)],
    )
    client.apply(snapshot)  # the same membership again: r1 is still known to be dead
    assert sorted(client.handles()) == ["r0", "r2"] and client.capacity == 20
    picked = {client._start().replica_id for _ in range(50)}  # type: ignore[union-attr]
    assert picked == {"r0", "r2"}
