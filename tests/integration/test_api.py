"""The HTTP API over real HTTP, on Ray Serve in the session's Ray (the `api_server` fixture)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from deployments.app import _settings
from factory.client import ApiError, FactoryClient
from factory.errors import FactoryError
from factory.routing import RouteRequest
from tests.conftest import ApiServer

PROBLEM = "application/problem+json"


def workflow(value: Any = 1, seconds: float = 0.0, name: str = "api-test") -> dict[str, Any]:
    steps: list[dict[str, Any]] = [
        {"id": "a", "python": "tests.fixtures.teststeps:add", "with": {"a": "${inputs.x}", "b": 1}},
    ]
    if seconds:
        steps.append({"id": "wait", "python": "tests.fixtures.teststeps:sleepy", "with": {"seconds": seconds}})
    return {"name": name, "inputs": {"x": value}, "steps": steps}


@pytest.fixture
def http(api_server: ApiServer) -> httpx.Client:
    return httpx.Client(base_url=api_server.base_url, timeout=30)


@pytest.fixture
def client(api_server: ApiServer) -> FactoryClient:
    return FactoryClient(api_server.base_url, api_server.keys["submit"])


def is_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["detail"]
    return dict(body)


def test_health_needs_no_key(http: httpx.Client) -> None:
    assert http.get("/healthz").json()["status"] == "ok"


def test_keys_are_required_and_scoped(http: httpx.Client, api_server: ApiServer) -> None:
    missing = is_problem(http.get("/v1/runs"), 401)
    assert "Authorization: Bearer" in missing["detail"]
    assert http.get("/v1/runs").headers["www-authenticate"].startswith("Bearer")
    is_problem(http.get("/v1/runs", headers={"Authorization": "Bearer fk_nope_nope"}), 401)
    reader = api_server.headers("read")
    assert http.get("/v1/runs", headers=reader).status_code == 200
    denied = is_problem(http.post("/v1/workflows", json={"workflow": workflow()}, headers=reader), 403)
    assert "--scope submit" in denied["detail"]
    is_problem(http.post("/v1/route", json={"text": "x"}), 401)


def test_submit_follow_and_read_a_run(client: FactoryClient, http: httpx.Client, api_server: ApiServer) -> None:
    run_id = client.submit(workflow(41))
    run = client.wait(run_id, timeout=60)
    assert run["status"] == "succeeded"
    assert {s["step_id"]: s["output"] for s in run["steps"]} == {"a": 42}
    events = list(client.events(run_id))
    assert events[0]["type"] == "run.created" and events[-1]["type"] == "run.succeeded"
    # resumable with Last-Event-ID: only what came after
    middle = events[2]["id"]
    with http.stream(
        "GET", f"/v1/runs/{run_id}/events", headers={**api_server.headers("read"), "Last-Event-ID": str(middle)}
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        ids = [int(line[4:]) for line in response.iter_lines() if line.startswith("id: ")]
    assert ids == [e["id"] for e in events if e["id"] > middle]


def test_submit_yaml(http: httpx.Client, api_server: ApiServer) -> None:
    import yaml

    response = http.post(
        "/v1/workflows",
        content=yaml.safe_dump(workflow(5)),
        headers={**api_server.headers("submit"), "Content-Type": "application/yaml"},
    )
    assert response.status_code == 202, response.text
    assert response.json()["url"] == f"/v1/runs/{response.json()['run_id']}"


def test_invalid_workflows_say_what_to_fix(http: httpx.Client, api_server: ApiServer) -> None:
    bad = {"name": "bad", "steps": [{"id": "a", "python": "nosuch.module:f"}, {"id": "a", "python": "x:y"}]}
    body = is_problem(http.post("/v1/workflows", json={"workflow": bad}, headers=api_server.headers("submit")), 422)
    assert any("duplicate id" in e for e in body["errors"])
    # the API checks module names against what is allowed; it never imports them
    ok_ids = {"name": "bad", "steps": [{"id": "a", "python": "nosuch.module:f"}]}
    body = is_problem(http.post("/v1/workflows", json={"workflow": ok_ids}, headers=api_server.headers("submit")), 403)
    assert any("module 'nosuch.module' is not allowed" in e for e in body["errors"])
    body = is_problem(
        http.post("/v1/workflows", content=b"steps: [", headers={**api_server.headers(), "Content-Type": "text/yaml"}),
        422,
    )
    assert "malformed YAML" in body["detail"]
    is_problem(
        http.post("/v1/workflows", content=b"{", headers={**api_server.headers(), "Content-Type": "application/json"}),
        422,
    )
    is_problem(
        http.post("/v1/workflows", content=b"x", headers={**api_server.headers(), "Content-Type": "text/plain"}), 415
    )
    is_problem(
        http.post("/v1/workflows", json={"workflow": workflow(), "inputs": {"nope": 1}}, headers=api_server.headers()),
        422,
    )


def test_pagination_and_filters(client: FactoryClient, api_server: ApiServer) -> None:
    ids = [client.submit(workflow(i, name="paged")) for i in range(3)]
    for run_id in ids:
        client.wait(run_id, timeout=60)
    seen: list[str] = []
    cursor = None
    while True:
        page = client.list_runs(limit=2, cursor=cursor)
        assert len(page["runs"]) <= 2
        seen += [r["id"] for r in page["runs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) and set(ids) <= set(seen)
    assert all(r["status"] == "succeeded" for r in client.list_runs(status="succeeded", limit=200)["runs"])
    with pytest.raises(ApiError) as info:
        client.list_runs(cursor="garbage")
    assert info.value.status == 422


def test_cancel_and_resume(client: FactoryClient, http: httpx.Client, api_server: ApiServer) -> None:
    run_id = client.submit(workflow(1, seconds=30))
    deadline = time.monotonic() + 30
    while client.get_run(run_id)["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.cancel(run_id)["status"] == "cancelling"
    assert client.wait(run_id, timeout=60)["status"] == "cancelled"
    conflict = is_problem(http.post(f"/v1/runs/{run_id}/cancel", headers=api_server.headers("submit")), 409)
    assert "already finished" in conflict["detail"]
    # resume the cancelled run: the committed step is kept, the cancelled one runs again (shortly: cancel it again)
    assert client.resume(run_id)["status"] == "resuming"
    # at once no longer cancelled: a client that waits now cannot mistake the old end for the new one
    assert client.get_run(run_id)["status"] in ("pending", "running")
    while client.get_run(run_id)["status"] != "running" and time.monotonic() < deadline + 30:
        time.sleep(0.1)
    client.cancel(run_id)
    final = client.wait(run_id, timeout=60)
    assert final["status"] == "cancelled"
    assert {s["step_id"]: s["attempts"] for s in final["steps"]}["a"] == 1


def test_unknown_things_are_404(http: httpx.Client, api_server: ApiServer) -> None:
    body = is_problem(http.get("/v1/runs/nope", headers=api_server.headers("read")), 404)
    assert "no run 'nope'" in body["detail"]
    is_problem(http.get("/v1/nowhere", headers=api_server.headers("read")), 404)
    is_problem(http.get("/v1/runs/nope/events", headers=api_server.headers("read")), 404)
    is_problem(http.delete("/v1/runs", headers=api_server.headers("read")), 405)


def test_routing_endpoint(http: httpx.Client, client: FactoryClient, api_server: ApiServer) -> None:
    decision = client.route("Please render this German letter in English")
    assert decision["agent"] == "translator"
    assert decision["runners_up"] and "semantic" in decision["breakdown"]
    body = is_problem(
        http.post("/v1/route", json={"text": "x", "capabilities": ["fly"]}, headers=api_server.headers("read")), 422
    )
    assert "fly" in body["detail"]
    is_problem(http.post("/v1/route", json={"capabilities": []}, headers=api_server.headers("read")), 422)
    # Resources: no agent of this catalogue has a GPU; a negative amount is a client error too.
    body = is_problem(
        http.post("/v1/route", json={"text": "x", "resources": {"GPU": 1}}, headers=api_server.headers("read")), 422
    )
    assert "lacks resources: GPU 1 (a replica holds GPU 0)" in body["detail"]
    body = is_problem(
        http.post("/v1/route", json={"text": "x", "resources": {"GPU": -1}}, headers=api_server.headers("read")), 422
    )
    assert "cannot be negative" in str(body)


def test_agents_and_metrics(client: FactoryClient, http: httpx.Client, api_server: ApiServer) -> None:
    names = [a["name"] for a in client.agents()["agents"]]
    assert names[:3] == ["summarizer", "translator", "coder"]
    metrics = http.get("/metrics", headers=api_server.headers("read"))
    assert metrics.status_code == 200 and 'factory_runs{status="succeeded"}' in metrics.text


def test_request_size_limit(http: httpx.Client, api_server: ApiServer) -> None:
    huge = json.dumps({"workflow": workflow(), "inputs": {"x": "y" * (api_server.settings.api_max_body_bytes + 10)}})
    body = is_problem(
        http.post("/v1/workflows", content=huge, headers={**api_server.headers(), "Content-Type": "application/json"}),
        413,
    )
    assert "limit" in body["detail"]


def test_rate_limit_per_key(api_server: ApiServer) -> None:
    from factory.api import store_for
    from factory.auth import Scope, create_key

    store = store_for(api_server.settings)
    key, _ = create_key(store, [Scope.READ], "burst")
    store.close()
    seen_429 = threading.Event()

    def send(http: httpx.Client) -> httpx.Response | None:
        if seen_429.is_set():
            return None
        response = http.get("/v1/runs", params={"limit": 1})
        if response.status_code == 429:
            seen_429.set()
        return response

    # The bucket holds 30 and refills at 50/s: faster than that, it runs dry. Sent from 16 threads:
    # one client waiting for each answer did not outpace the refill on a loaded machine (CI saw
    # 400 requests in a row answered 200).
    with (
        httpx.Client(base_url=api_server.base_url, headers={"Authorization": f"Bearer {key}"}) as http,
        ThreadPoolExecutor(16) as pool,
    ):
        answered = [r for r in pool.map(lambda _: send(http), range(1000)) if r is not None]
    codes = [r.status_code for r in answered]
    limited = next((r for r in answered if r.status_code == 429), None)
    assert codes[0] == 200 and set(codes) == {200, 429}
    assert limited is not None and int(limited.headers["retry-after"]) >= 1
    assert "requests per second" in limited.json()["detail"]


def test_open_mode_only_on_loopback() -> None:
    with pytest.raises(FactoryError, match=r"only allowed when the API listens on 127\.0\.0\.1"):
        _settings({"settings": {}, "open_mode": True, "host": "0.0.0.0"})
    with pytest.raises(FactoryError, match=r"only allowed when the API listens on 127\.0\.0\.1"):
        _settings({"settings": {}, "open_mode": True})  # serve.yaml binds 0.0.0.0 and names no host
    assert _settings({"settings": {}, "open_mode": True, "host": "127.0.0.1"})[1] is True


def test_event_ids_out_of_range_are_422_not_a_broken_stream(
    client: FactoryClient, http: httpx.Client, api_server: ApiServer
) -> None:
    """Found by the fuzzer: after=2**63 overflowed the store's integer and broke the stream."""
    run_id = client.submit(workflow(1))
    client.wait(run_id, timeout=60)
    read = api_server.headers("read")
    is_problem(http.get(f"/v1/runs/{run_id}/events", params={"after": 2**63}, headers=read), 422)
    is_problem(http.get(f"/v1/runs/{run_id}/events", headers={**read, "Last-Event-ID": str(2**63)}), 422)
    is_problem(http.get(f"/v1/runs/{run_id}/events", headers={**read, "Last-Event-ID": "soon"}), 422)


def test_validate_needs_submit_and_lists_every_problem(http: httpx.Client, api_server: ApiServer) -> None:
    doc = workflow(1)
    doc["steps"].append({"id": "b", "python": "os:system", "with": {"command": "true"}})
    body = {"workflow": doc, "inputs": {"nope": 1}}
    is_problem(http.post("/v1/validate", json=body, headers=api_server.headers("read")), 403)
    seen = http.post("/v1/validate", json=body, headers=api_server.headers("submit")).json()
    assert seen["valid"] is False and seen["refused"] is True
    assert any("nope" in p for p in seen["problems"]), seen  # the inputs' problem ...
    assert any("os" in p and "b" in p for p in seen["problems"]), seen  # ... and the key's, both
    fine = http.post("/v1/validate", json={"workflow": workflow(1)}, headers=api_server.headers("submit")).json()
    assert fine == {**fine, "valid": True, "refused": False, "problems": [], "steps": ["a"]}


def test_event_streams_are_bounded(client: FactoryClient, http: httpx.Client, api_server: ApiServer) -> None:
    run_id = client.submit(workflow(1, seconds=0.1))
    client.wait(run_id, timeout=60)
    read = api_server.headers("read")
    three = http.get("/v1/events", params={"limit": 3}, headers=read)
    assert sum(line.startswith("id: ") for line in three.text.splitlines()) == 3
    is_problem(http.get("/v1/events", params={"limit": 10**9}, headers=read), 422)
    all_of_run = [e["id"] for e in client.events(run_id, follow=False)]
    assert all_of_run == sorted(set(all_of_run)) and len(all_of_run) >= 5
    assert len(client.attempts(run_id)) == 2
    assert len(http.get(f"/v1/runs/{run_id}/attempts", params={"limit": 1}, headers=read).json()) == 1

    # a key holds at most api_max_streams_per_key streams open; a closed one frees its place
    admin = FactoryClient(api_server.base_url, api_server.keys["admin"])
    key = admin.create_key(["read"], "streams")["key"]
    mine = {"Authorization": f"Bearer {key}"}
    limit = api_server.settings.api_max_streams_per_key
    with contextlib.ExitStack() as stack:
        streams = [
            stack.enter_context(
                httpx.stream("GET", f"{api_server.base_url}/v1/events", params={"follow": True}, headers=mine)
            )
            for _ in range(limit)
        ]
        assert all(s.status_code == 200 for s in streams)
        refused = is_problem(http.get("/v1/events", params={"follow": True}, headers=mine), 429)
        assert f"(the limit is {limit})" in refused["detail"]
        assert http.get("/v1/events", params={"limit": 1}, headers=read).status_code == 200  # other keys unaffected
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        again = http.get("/v1/events", params={"limit": 1}, headers=mine)
        if again.status_code == 200:
            break
        time.sleep(0.5)
    assert again.status_code == 200, "closed streams must give their places back"


def test_routing_corrections_are_learnt_kept_and_reach_a_new_replica(
    http: httpx.Client, client: FactoryClient, api_server: ApiServer
) -> None:
    from factory.api import store_for
    from factory.catalog import load_catalog
    from factory.routing import Router, make_scorer
    from factory.routing.corrections import CorrectionSync

    text = "Sort out the seating plan for the board dinner next Thursday"
    first = client.route(text)
    right = "coder" if first["agent"] != "coder" else "summarizer"
    feedback = {"text": text, "agent": right, "decision_id": first["decision_id"]}
    is_problem(http.post("/v1/route/feedback", json=feedback, headers=api_server.headers("read")), 403)
    unknown = is_problem(
        http.post("/v1/route/feedback", json={**feedback, "agent": "astronaut"}, headers=api_server.headers("submit")),
        422,
    )
    assert "astronaut" in unknown["detail"]
    is_problem(
        http.post("/v1/route/feedback", json={**feedback, "text": "x" * 10_001}, headers=api_server.headers("submit")),
        422,
    )
    kept = client.route_feedback(text, right, first["decision_id"])
    assert kept["who"].startswith("key:") and kept["decision_id"] == first["decision_id"]
    again = client.route(text)
    assert again["agent"] == right
    assert again["recalled"] and again["recalled"][0]["text"] == text
    listed = client.route_corrections(after=kept["id"] - 1)
    assert [(c["text"], c["agent"]) for c in listed] == [(text, right)]
    # a replica started later (another replica, or after a restart) learns every stored correction
    settings = api_server.settings
    catalog = load_catalog(settings.agents_file)
    fresh = Router(catalog, make_scorer(settings.router_scorer, catalog, settings))
    assert fresh.route(RouteRequest(text=text)).agent == first["agent"]
    store = store_for(settings)
    try:
        assert CorrectionSync().pull(fresh, store) >= 1
    finally:
        store.close()
    assert fresh.route(RouteRequest(text=text)).agent == right


def test_an_approval_gate_over_http(client: FactoryClient, http: httpx.Client, api_server: ApiServer) -> None:
    """The run parks at its gate (a waiter returns `waiting`); a key that is not an approver is
    refused (403); the approver's decision resumes the run on the server; a second decision is 409."""
    wf = workflow(4, name="api-gate")
    wf["steps"] += [
        {"id": "gate", "approval": {"message": "ship ${steps.a.output}?", "approvers": ["scope:admin"]}},
        {"id": "after", "python": "tests.fixtures.teststeps:echo", "with": {"value": "${steps.gate.output}"}},
    ]
    run_id = client.submit(wf)
    parked = client.wait(run_id, timeout=60)
    assert parked["status"] == "waiting"
    assert {s["step_id"]: s["status"] for s in parked["steps"]} == {
        "a": "succeeded",
        "gate": "waiting",
        "after": "pending",
    }
    url = f"/v1/runs/{run_id}/steps/gate/approval"
    refused = is_problem(http.post(url, json={"approved": True}, headers=api_server.headers("submit")), 403)
    assert "approvers are scope:admin" in refused["detail"]
    is_problem(http.post(url, json={"approved": True, "extra": 1}, headers=api_server.headers("admin")), 422)
    is_problem(http.post(f"/v1/runs/{run_id}/steps/nope/approval", json={}, headers=api_server.headers("admin")), 404)
    is_problem(http.post(f"/v1/runs/{run_id}/steps/a/approval", json={}, headers=api_server.headers("admin")), 400)
    admin = FactoryClient(api_server.base_url, api_server.keys["admin"])
    answer = admin.approve(run_id, "gate", True, "ship it")
    assert answer["run_status"] == "pending" and answer["decision"]["by"].startswith("key:")
    final = admin.wait(run_id, timeout=60, after=int(answer["after_event_id"]))
    assert final["status"] == "succeeded", final
    out = {s["step_id"]: s["output"] for s in final["steps"]}["after"]
    assert out["approved"] is True and out["comment"] == "ship it"
    again = is_problem(http.post(url, json={"approved": False}, headers=api_server.headers("admin")), 409)
    assert "not waiting" in again["detail"]
