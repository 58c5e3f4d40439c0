"""FactoryClient against scripted servers (httpx.MockTransport): streams that stall, drop
or time out, and a server that stops answering. No server, no Ray."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from factory.client import ApiUnreachableError, FactoryClient, WaitTimeoutError
from factory.errors import FactoryError

Handler = Callable[[httpx.Request], httpx.Response]


def event(event_id: int, type: str = "step.succeeded") -> dict[str, Any]:
    return {"id": event_id, "run_id": "r1", "step_id": None, "type": type, "data": {}, "ts": 1.0}


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"id: {e['id']}\nevent: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def stream(chunks: Iterator[bytes]) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=chunks)


def run_json(status: str) -> httpx.Response:
    return httpx.Response(200, json={"id": "r1", "status": status, "steps": []})


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at the end of each test: whatever a scripted server holds back returns then."""
    gate = threading.Event()
    yield gate
    gate.set()


def client_for(handler: Handler, **kwargs: Any) -> FactoryClient:
    options: dict[str, Any] = {"reconnect_delay": 0.01, **kwargs}
    return FactoryClient("http://factory.test", api_key="fk_test", transport=httpx.MockTransport(handler), **options)


def test_wait_times_out_at_the_deadline_while_the_stream_is_idle(release: threading.Event) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):

            def body() -> Iterator[bytes]:
                yield sse(event(1, "run.started"))
                release.wait(30)  # open, silent: the run is long

            return stream(body())
        return run_json("running")

    client = client_for(handler)
    started = time.monotonic()
    with pytest.raises(TimeoutError) as caught:
        client.wait("r1", timeout=0.5)
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 1.5, elapsed
    assert isinstance(caught.value, WaitTimeoutError) and isinstance(caught.value, FactoryError)
    assert "did not finish within 0.5s" in str(caught.value)


def test_wait_times_out_at_the_deadline_when_the_server_does_not_answer(release: threading.Event) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        release.wait(30)  # accepts the connection, never answers
        return run_json("running")

    client = client_for(handler)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client.wait("r1", timeout=0.3)
    assert time.monotonic() - started < 1.3


def test_a_dropped_stream_is_reopened_with_last_event_id_and_nothing_is_repeated() -> None:
    seen_headers: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/events"):
            return run_json("succeeded")
        seen_headers.append(request.headers.get("last-event-id"))
        if len(seen_headers) == 1:

            def dropped() -> Iterator[bytes]:
                yield sse(event(1, "run.started"), event(2))
                raise httpx.ReadError("connection reset by peer")

            return stream(dropped())
        # this server ignores Last-Event-ID and sends everything again: the client skips what it had
        return stream(iter([sse(event(1, "run.started"), event(2), event(3), event(4, "run.succeeded"))]))

    client = client_for(handler)
    assert [e["id"] for e in client.events("r1")] == [1, 2, 3, 4]
    assert seen_headers == [None, "2"]

    seen_headers.clear()
    assert client.wait("r1", timeout=5)["status"] == "succeeded"
    assert seen_headers == [None, "2"]


def test_a_stream_silent_past_the_idle_timeout_is_reopened() -> None:
    timeouts: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"]["read"])
        if len(timeouts) == 1:

            def silent() -> Iterator[bytes]:
                yield sse(event(1, "run.started"))
                raise httpx.ReadTimeout("no keep-alive within the idle timeout")

            return stream(silent())
        return stream(iter([sse(event(2, "run.succeeded"))]))

    client = client_for(handler, idle_timeout=7.0)
    assert [e["id"] for e in client.events("r1")] == [1, 2]
    assert timeouts == [7.0, 7.0]  # a read timeout, never None


def test_a_restarting_server_is_retried_while_following() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            return httpx.Response(503, json={"title": "Service Unavailable", "detail": "restarting"})
        if request.url.path.endswith("/events"):
            return stream(iter([sse(event(1, "run.started"), event(2, "run.failed"))]))
        return run_json("failed")

    client = client_for(handler)
    assert client.wait("r1", timeout=5)["status"] == "failed"
    assert calls.count("/v1/runs/r1/events") == 2


def test_errors_that_a_retry_cannot_fix_reach_the_caller_at_once() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"title": "Not Found", "detail": "no run 'r1'"})

    client = client_for(handler)
    started = time.monotonic()
    with pytest.raises(FactoryError, match="no run 'r1'") as caught:
        client.wait("r1", timeout=5)
    assert not isinstance(caught.value, TimeoutError) and time.monotonic() - started < 1


def test_a_stream_that_ends_before_the_run_is_followed_again() -> None:
    """A proxy closed the stream (cleanly) while the run was still running."""
    streams = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal streams
        if request.url.path.endswith("/events"):
            streams += 1
            assert request.url.params["after"] == ("0" if streams == 1 else "1")
            if streams == 1:
                return stream(iter([sse(event(1, "run.started"))]))
            return stream(iter([sse(event(2, "run.succeeded"))]))
        return run_json("succeeded" if streams >= 2 else "running")

    client = client_for(handler)
    assert client.wait("r1")["status"] == "succeeded"
    assert streams == 2


def test_an_unreachable_server_is_a_retryable_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with pytest.raises(ApiUnreachableError, match="cannot reach the Factory API") as caught:
        client_for(handler).get_run("r1")
    assert caught.value.retryable


def test_path_segments_are_quoted_so_an_id_cannot_reach_another_endpoint() -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.raw_path.decode())
        return httpx.Response(200, json={"id": "x", "status": "running", "steps": []})

    client = client_for(handler)
    client.get_run("../keys")
    client.cancel("r1/../../keys?x=1#y")
    client.revoke_key("..")
    assert paths == [
        "/v1/runs/..%2Fkeys",
        "/v1/runs/r1%2F..%2F..%2Fkeys%3Fx%3D1%23y/cancel",
        "/v1/keys/%2E%2E/revoke",
    ]


def test_events_that_do_not_follow_are_read_page_by_page() -> None:
    """The server ends a stream that does not follow after a page; the client asks again from
    the last id until a page is empty, and yields each event once."""
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        after = int(request.url.params["after"])
        asked.append(request.url.params["after"])
        page = [event(i) for i in range(after + 1, min(after + 3, 6) + 1)]  # pages of 3, 6 events in all
        return stream(iter([sse(*page)]))

    assert [e["id"] for e in client_for(handler).events(None, follow=False)] == [1, 2, 3, 4, 5, 6]
    assert asked == ["0", "3", "6"]


def test_a_followed_stream_of_every_run_is_reopened_when_the_server_ends_it() -> None:
    """The API ends a followed stream after its lifetime; following every run goes on."""
    opened = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal opened
        opened += 1
        last = int(request.headers.get("last-event-id") or 0)
        return stream(iter([sse(event(last + 1, "run.succeeded"))]))

    seen = []
    for e in client_for(handler).events(None, follow=True):
        seen.append(e["id"])
        if len(seen) == 3:
            break
    assert seen == [1, 2, 3] and opened == 3
