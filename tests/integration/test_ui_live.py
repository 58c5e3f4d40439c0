"""The dashboard's event followers (ui.live) against the real API on Serve."""

from __future__ import annotations

import time

import pytest

from factory.client import FactoryClient
from tests.conftest import ApiServer
from tests.integration.test_api import workflow

pytest.importorskip("gradio")

from ui.live import EventFollower


def wait_until(check: object, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_run_follower_hears_every_event_and_ends_with_the_run(api_server: ApiServer) -> None:
    client = FactoryClient(api_server.base_url, api_server.keys["read"])
    submit = FactoryClient(api_server.base_url, api_server.keys["submit"])
    run_id = submit.submit(workflow(1, seconds=0.5))
    follower = EventFollower(client, run_id)
    submit.wait(run_id, timeout=60)
    wait_until(lambda: follower.ended)
    version, events = follower.snapshot()
    assert [e["id"] for e in events] == [e["id"] for e in client.events(run_id, follow=False)]
    assert events[-1]["type"] == "run.succeeded" and version >= len(events) and follower.error is None


def test_a_follower_nobody_asks_stops(api_server: ApiServer) -> None:
    client = FactoryClient(api_server.base_url, api_server.keys["read"])
    submit = FactoryClient(api_server.base_url, api_server.keys["submit"])
    start = client.run_summaries(limit=1)["last_event_id"]
    follower = EventFollower(client, None, start, idle_stop=0.5)
    time.sleep(1.0)  # nobody touched it
    submit.wait(submit.submit(workflow(2)), timeout=60)  # the next event lets it notice
    wait_until(lambda: not follower.alive, 30)
    kept = EventFollower(client, None, start, idle_stop=60)
    submit.wait(submit.submit(workflow(3)), timeout=60)
    wait_until(lambda: any(e["type"] == "run.succeeded" for e in kept.snapshot()[1]))
    assert kept.alive
    kept.stop()
