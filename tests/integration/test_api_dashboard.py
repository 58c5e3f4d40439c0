"""The API's dashboard endpoints over real HTTP on Ray Serve (the session's `api_server`)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from factory.client import ApiError, FactoryClient
from tests.conftest import ApiServer
from tests.integration.test_api import is_problem, workflow


@pytest.fixture
def client(api_server: ApiServer) -> FactoryClient:
    return FactoryClient(api_server.base_url, api_server.keys["submit"])


def test_run_summaries_filters_and_pages(client: FactoryClient, api_server: ApiServer) -> None:
    name = f"dash-{uuid.uuid4().hex[:8]}"
    ids = [client.submit(workflow(i, name=name)) for i in range(3)]
    for run_id in ids:
        client.wait(run_id, timeout=60)
    page = client.run_summaries(workflow=name, limit=2)
    assert [r["id"] for r in page["runs"]] == ids[::-1][:2] and page["next_cursor"]
    assert all(r["steps_total"] == 1 and r["steps_done"] == 1 and r["status"] == "succeeded" for r in page["runs"])
    rest = client.run_summaries(workflow=name, limit=2, cursor=page["next_cursor"])
    assert [r["id"] for r in rest["runs"]] == [ids[0]] and rest["next_cursor"] is None
    assert [r["id"] for r in client.run_summaries(text=ids[1][-12:].upper())["runs"]] == [ids[1]]
    assert client.run_summaries(workflow=name, status="failed")["runs"] == []
    http = httpx.Client(base_url=api_server.base_url, timeout=30)
    is_problem(http.get("/v1/run-summaries"), 401)
    headers = api_server.headers("read")
    is_problem(http.get("/v1/run-summaries", params={"limit": 0}, headers=headers), 422)
    is_problem(http.get("/v1/run-summaries", params={"q": "x" * 201}, headers=headers), 422)
    is_problem(http.get("/v1/run-summaries", params={"cursor": "nope"}, headers=headers), 422)


def test_run_graph(client: FactoryClient, api_server: ApiServer) -> None:
    run_id = client.submit(workflow(1, seconds=0.1))
    client.wait(run_id, timeout=60)
    graph = client.run_graph(run_id)
    assert [n["id"] for n in graph["nodes"]] == ["a", "wait"]
    assert all(n["status"] == "succeeded" and n["attempts"] == 1 for n in graph["nodes"])
    assert graph["counts"] == {"succeeded": 2} and graph["status"] == "succeeded"
    assert graph["spec"]["name"] == "api-test"  # a submit key may run it again
    # the graph's last_event_id is the run's newest event: the graph reflects them all, and it says
    # nothing of other runs (another run's events after it do not move it)
    assert max(e["id"] for e in client.events(run_id, follow=False)) == graph["last_event_id"]
    client.wait(client.submit(workflow(2)), timeout=60)
    assert client.run_graph(run_id)["last_event_id"] == graph["last_event_id"]
    reader = FactoryClient(api_server.base_url, api_server.keys["read"])
    assert reader.run_graph(run_id)["spec"] is None  # a read key sees no env values or mounts
    with pytest.raises(ApiError) as missing:
        client.run_graph("no-such-run")
    assert missing.value.status == 404


def test_system(client: FactoryClient, api_server: ApiServer) -> None:
    client.wait(client.submit(workflow(5)), timeout=60)
    view = client.system(window=600, buckets=30)
    assert len(view["series"]) == 30
    assert sum(p["steps"] for p in view["series"]) >= 1
    assert view["runs_by_status"]["succeeded"] >= 1
    assert view["nodes"] and view["nodes"][0]["cpu_total"] > 0
    http = httpx.Client(base_url=api_server.base_url, timeout=30)
    is_problem(http.get("/v1/system"), 401)
    is_problem(http.get("/v1/system", params={"buckets": 10_000}, headers=api_server.headers("read")), 422)


def test_whoami(api_server: ApiServer) -> None:
    for scope, can_submit in (("read", False), ("submit", True), ("admin", True)):
        me = FactoryClient(api_server.base_url, api_server.keys[scope]).whoami()
        assert me["scopes"] == [scope] and me["can_submit"] is can_submit and me["can_admin"] is (scope == "admin")
    is_problem(httpx.Client(base_url=api_server.base_url).get("/v1/whoami"), 401)


def test_graph_counts_the_items_of_a_running_for_each_step(client: FactoryClient, tmp_path: Path) -> None:
    """Items done / total while the step runs (step.items events), not one node per item."""
    gate, open_ = tmp_path / "go", tmp_path / "open"
    open_.write_text("open")
    items = [{"path": str(open_), "seconds": 5}, {"path": str(open_), "seconds": 5}, {"path": str(gate), "seconds": 60}]
    wf = {
        "name": "fan-out",
        "inputs": {"items": items},
        "steps": [
            {
                "id": "each",
                "python": "tests.fixtures.teststeps:wait_for_file",
                "for_each": "${inputs.items}",
                "with": {"path": "${item.path}", "seconds": "${item.seconds}"},
                "retry": {"max_attempts": 1},
            }
        ],
    }
    run_id = client.submit(wf)
    deadline = time.monotonic() + 60
    node: dict[str, Any] = {}
    while time.monotonic() < deadline:
        node = client.run_graph(run_id)["nodes"][0]
        if node["status"] == "running" and node.get("items_done") == 2:
            break
        time.sleep(0.3)
    assert node["for_each"] and (node["items_done"], node["items_total"]) == (2, 3), node
    gate.write_text("go")
    done = client.wait(run_id, timeout=60)
    graph = client.run_graph(run_id)
    assert len(graph["nodes"]) == 1 and (graph["nodes"][0]["items_done"], graph["nodes"][0]["items_total"]) == (3, 3)
    assert done["status"] == "succeeded"
    events = [e["data"] for e in client.events(run_id, follow=False) if e["type"] == "step.items"]
    assert events[0] == {"done": 0, "total": 3} and {"done": 2, "total": 3} in events
