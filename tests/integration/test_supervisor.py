"""Runs reach an end when their owner dies: the supervisor of the API server adopts them.

Faults made here: the runner actor killed with runs in flight, a pending run nobody
started, a run that cannot start. The time from the fault to the run moving again is
printed (docs/reliability.md quotes it)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from factory.api import create_run, store_for
from factory.client import FactoryClient
from factory.dag import validate_data
from factory.runner import NAMESPACE, runner_name
from factory.store import RunGrants, RunStatus, Store
from tests.conftest import ApiServer
from tests.fixtures import teststeps

GRANTS = RunGrants(principal="key:test", modules=["tests.fixtures.teststeps"], secrets=[])


@pytest.fixture
def api_store(api_server: ApiServer) -> Any:
    store = store_for(api_server.settings)
    yield store
    store.close()


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def events(store: Store, run_id: str) -> list[Any]:
    return store.events(0, run_id, 10_000)


def test_killing_the_runner_mid_run_resumes_the_run(api_server: ApiServer, api_store: Store, tmp_path: Path) -> None:
    counter = str(tmp_path / "first.count")
    workflow = {
        "name": "survives-runner-death",
        "steps": [
            {
                "id": "first",
                "python": "tests.fixtures.teststeps:count_and_echo",
                "with": {"counter": counter, "value": 1},
            },
            {"id": "slow", "python": "tests.fixtures.teststeps:sleepy", "with": {"seconds": 3}, "needs": ["first"]},
            {"id": "last", "python": "tests.fixtures.teststeps:add", "with": {"a": "${steps.first.output}", "b": 1}},
        ],
    }
    with FactoryClient(api_server.base_url, api_server.keys["submit"]) as client:
        run_id = client.submit(workflow)
        wait_for(
            lambda: any(e.type == "step.started" and e.step_id == "slow" for e in events(api_store, run_id)),
            60,
            "the slow step to start",
        )
        ray.kill(ray.get_actor(runner_name(api_server.settings), namespace=NAMESPACE))
        killed = time.monotonic()
        adopted = wait_for(
            lambda: [e for e in events(api_store, run_id) if e.type == "run.adopted"], 60, "the supervisor"
        )
        moving = time.monotonic() - killed
        run = client.wait(run_id, timeout=90)
    assert run["status"] == "succeeded", run
    assert teststeps.calls(counter) == 1  # the committed step did not run again
    # the runner's process is gone on this host: no need to wait for its lease
    assert adopted[0].data["reason"] in ("its owner died", "its owner's lease expired (3s)")
    print(f"\nrunner killed -> run adopted and moving again after {moving:.1f}s (lease 3s, sweep every 1s)")


def test_a_pending_run_nobody_started_is_started(api_server: ApiServer, api_store: Store) -> None:
    steps = [{"id": "a", "python": "tests.fixtures.teststeps:add", "with": {"a": 1, "b": 2}}]
    workflow = validate_data({"name": "forgotten", "steps": steps}, check_imports=False)
    run_id = create_run(workflow, {}, store=api_store, settings=api_server.settings, grants=GRANTS)
    created = time.monotonic()
    wait_for(lambda: api_store.get_run(run_id).status == RunStatus.SUCCEEDED, 60, "the forgotten run to finish")
    print(f"\npending run with no owner -> succeeded after {time.monotonic() - created:.1f}s (grace 3s)")
    assert [s.output for s in api_store.get_steps(run_id)] == [3]


def test_a_run_that_cannot_start_fails_with_the_reason(api_server: ApiServer, api_store: Store) -> None:
    api_store.create_run("cannot-start", "broken", json.dumps({"name": "broken", "steps": "nope"}), {}, ["a"], GRANTS)
    wait_for(lambda: api_store.get_run("cannot-start").status == RunStatus.FAILED, 60, "the broken run to fail")
    record = api_store.get_run("cannot-start")
    assert record.error is not None and "could not start" in record.error
    assert [s.status.value for s in api_store.get_steps("cannot-start")] == ["skipped"]


def test_killing_the_api_replica_loses_nothing(api_server: ApiServer, api_store: Store, tmp_path: Path) -> None:
    """Runs do not live in API replicas: Serve replaces a killed replica, the run goes on in
    the runner, and a client following it reconnects to the new replica and sees the end."""
    import threading

    import httpx

    gate = tmp_path / "gate"
    workflow = {
        "name": "survives-api-replica-death",
        "steps": [
            {
                "id": "wait",
                "python": "tests.fixtures.teststeps:wait_for_file",
                "with": {"path": str(gate), "seconds": 120},
            },
            {"id": "after", "python": "tests.fixtures.teststeps:add", "with": {"a": 1, "b": 2}, "needs": ["wait"]},
        ],
    }
    streams: list[str | None] = []  # the Last-Event-ID of each events request the client makes

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/events"):
                streams.append(request.headers.get("last-event-id"))
            return super().handle_request(request)

    client = FactoryClient(api_server.base_url, api_server.keys["submit"], reconnect_delay=0.2, transport=Recording())
    run_id = client.submit(workflow)
    followed: list[Any] = []
    heard: list[int] = []

    def follow() -> None:
        followed.append(client.wait(run_id, timeout=120, on_event=lambda e: heard.append(int(e["id"]))))

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    wait_for(
        lambda: any(e.type == "step.started" and e.step_id == "wait" for e in events(api_store, run_id)),
        60,
        "the first step to start",
    )
    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and "FactoryAPI" in a["name"] and "REPLICA" in a["name"].upper()
    ]
    assert len(replicas) == 1, replicas
    ray.kill(ray.get_actor(replicas[0]["name"], namespace="serve"), no_restart=True)
    killed = time.monotonic()

    def healthy() -> bool:
        try:
            return httpx.get(f"{api_server.base_url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    time.sleep(0.2)
    wait_for(healthy, 90, "Serve to replace the API replica")
    back = time.monotonic() - killed
    gate.touch()
    follower.join(120)
    assert followed and followed[0]["status"] == "succeeded", followed
    assert api_store.get_run(run_id).status == RunStatus.SUCCEEDED
    # the follower's stream died with the replica; it reopened one from the last event it had
    assert len(streams) >= 2 and streams[0] is None, streams
    assert any(last is not None and int(last) > 0 for last in streams[1:]), streams
    assert heard == sorted(set(heard)), "no event twice, none out of order"
    assert heard == [e.id for e in events(api_store, run_id)], "and none missed"
    assert not [e for e in events(api_store, run_id) if e.type == "run.adopted"]  # its owner never died
    print(f"\nAPI replica killed -> a new replica answered after {back:.1f}s; the run and its follower went on")
    client.close()
