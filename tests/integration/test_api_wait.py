"""POST /v1/workflows?wait=: the run's outputs in the answer, and a caller that leaves cancels
its run (cancel_on_disconnect), over real HTTP on the session's API (the `api_server` fixture)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest

from factory.client import FactoryClient
from tests.conftest import ApiServer


def workflow(name: str, x: int = 1, seconds: float = 0.0) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [
        {"id": "a", "python": "tests.fixtures.teststeps:add", "with": {"a": "${inputs.x}", "b": 1}}
    ]
    if seconds:
        steps.append({"id": "wait", "python": "tests.fixtures.teststeps:sleepy", "with": {"seconds": seconds}})
    return {"name": name, "inputs": {"x": x}, "steps": steps}


@pytest.fixture
def client(api_server: ApiServer) -> FactoryClient:
    return FactoryClient(api_server.base_url, api_server.keys["submit"])


def run_of(client: FactoryClient, name: str, timeout: float = 30) -> dict[str, Any]:
    """The one run of the workflow ``name`` (its answer never came: the caller left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = client.run_summaries(workflow=name)["runs"]
        if runs:
            return dict(runs[0])
        time.sleep(0.1)
    raise AssertionError(f"no run of {name}")


def final_status(client: FactoryClient, run_id: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(client.get_run(run_id)["status"])
        if status in ("succeeded", "failed", "cancelled"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} did not end within {timeout}s")


def test_wait_returns_the_outputs_of_a_run_that_ends_in_time(api_server: ApiServer, client: FactoryClient) -> None:
    http = httpx.Client(base_url=api_server.base_url, headers=api_server.headers("submit"), timeout=60)
    response = http.post("/v1/workflows", params={"wait": 30}, json={"workflow": workflow("wait-ok", 41)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded" and body["outputs"] == {"a": 42} and body["error"] is None
    assert client.get_run(body["run_id"])["status"] == "succeeded"
    # the client's helper says the same
    answer = client.submit_and_wait(workflow("wait-ok-client", 1), wait=30)
    assert answer["status"] == "succeeded" and answer["outputs"] == {"a": 2}


def test_a_run_that_fails_in_time_says_why(api_server: ApiServer) -> None:
    bad = {
        "name": "wait-fails",
        "steps": [{"id": "a", "python": "tests.fixtures.teststeps:add", "with": {"a": "x", "b": 1}}],
    }
    http = httpx.Client(base_url=api_server.base_url, headers=api_server.headers("submit"), timeout=60)
    response = http.post("/v1/workflows", params={"wait": 30}, json={"workflow": bad})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "failed" and "TypeError" in body["error"] and body["outputs"] == {}


def test_a_run_longer_than_the_wait_is_202_and_goes_on(client: FactoryClient) -> None:
    started = time.monotonic()
    answer = client.submit_and_wait(workflow("wait-long", seconds=3), wait=0.5)
    assert time.monotonic() - started < 3  # it did not wait for the run
    assert answer["status"] in ("pending", "running") and answer["outputs"] is None
    assert client.wait(answer["run_id"], timeout=60)["status"] == "succeeded"


def test_wait_is_bounded(api_server: ApiServer) -> None:
    http = httpx.Client(base_url=api_server.base_url, headers=api_server.headers("submit"), timeout=30)
    body = {"workflow": workflow("wait-bounds")}
    for params in ({"wait": 301}, {"wait": -1}, {"wait": "soon"}, {"cancel_on_disconnect": "true"}):
        response = http.post("/v1/workflows", params=params, json=body)
        assert response.status_code == 422, (params, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
    assert "wait" in http.post("/v1/workflows", params={"cancel_on_disconnect": True}, json=body).json()["detail"]


def _leave_early(api_server: ApiServer, name: str, seconds: float, cancel: bool) -> None:
    """Submit with wait and leave (the request times out and its connection is closed)."""
    params = {"wait": 60, "cancel_on_disconnect": cancel}
    with (
        httpx.Client(base_url=api_server.base_url, headers=api_server.headers("submit"), timeout=2.0) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post("/v1/workflows", params=params, json={"workflow": workflow(name, seconds=seconds)})


def test_a_caller_that_leaves_cancels_its_run(api_server: ApiServer, client: FactoryClient) -> None:
    name = f"wait-leaves-{uuid.uuid4().hex[:6]}"
    _leave_early(api_server, name, seconds=30, cancel=True)
    run = run_of(client, name)
    assert final_status(client, run["id"], timeout=20) == "cancelled"
    steps = {s["step_id"]: s["status"] for s in client.get_run(run["id"])["steps"]}
    assert steps["wait"] == "cancelled"


def test_without_cancel_on_disconnect_the_run_goes_on(api_server: ApiServer, client: FactoryClient) -> None:
    name = f"wait-stays-{uuid.uuid4().hex[:6]}"
    _leave_early(api_server, name, seconds=3, cancel=False)
    run = run_of(client, name)
    assert final_status(client, run["id"], timeout=30) == "succeeded"
