"""The step context without Ray: once() records on a real SQLite store, bounds, rate limits."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from factory import step_context
from factory.errors import StepContextError
from factory.limits import MAX_EMIT_BYTES, MAX_ONCE_KEY_CHARS
from factory.stepcontext import (
    EMITTED_EVENT,
    MAX_TOOL_TEXT,
    PROGRESS_EVENT,
    TOOL_CALL_EVENT,
    TOOL_RESULT_EVENT,
    StepContext,
    ToolCall,
    ToolResult,
)
from factory.store import Store
from factory.store.sqlite import SQLiteStore


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = SQLiteStore(tmp_path / "state.db")
    s.create_run("r1", "wf", "{}", {}, ["a", "b"])
    s.create_run("r2", "wf", "{}", {}, ["a"])
    return s


def ctx(store: Store, run_id: str = "r1", step: str = "a", attempt: int = 1, item: int | None = None) -> StepContext:
    return StepContext(run_id=run_id, step_id=step, attempt=attempt, item=item, store_url=store.url, interval=0.2)


def test_once_calls_fn_once_per_run_step_and_item(store: Store) -> None:
    calls: list[int] = []

    def charge(amount: int) -> dict[str, Any]:
        calls.append(amount)
        return {"charged": amount, "tuple": (1, 2)}

    first = ctx(store).once("charge", charge, 5)
    assert first == {"charged": 5, "tuple": [1, 2]}  # as recorded: JSON
    # a later attempt of the same step: the recorded result, fn not called
    assert ctx(store, attempt=2).once("charge", charge, 99) == first
    assert calls == [5]
    # another key, step, item or run: its own record
    ctx(store).once("other", charge, 6)
    ctx(store, step="b").once("charge", charge, 7)
    ctx(store, item=0).once("charge", charge, 8)
    ctx(store, item=1).once("charge", charge, 9)
    assert ctx(store, run_id="r2").once("charge", charge, 10) == {"charged": 10, "tuple": [1, 2]}
    assert calls == [5, 6, 7, 8, 9, 10]


def test_a_failing_fn_records_nothing(store: Store) -> None:
    def broken() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        ctx(store).once("k", broken)
    assert ctx(store, attempt=2).once("k", lambda: "fixed") == "fixed"


def test_once_bounds(store: Store) -> None:
    c = StepContext(run_id="r1", step_id="a", store_url=store.url, max_result_bytes=1024)
    with pytest.raises(StepContextError, match="1 to 200 characters"):
        c.once("k" * (MAX_ONCE_KEY_CHARS + 1), lambda: 1)
    with pytest.raises(StepContextError, match="1 to 200"):
        c.once("", lambda: 1)
    with pytest.raises(StepContextError, match="cannot be stored as JSON"):
        c.once("obj", lambda: object())
    with pytest.raises(StepContextError, match="more than the limit of 1024 bytes"):
        c.once("big", lambda: "x" * 2000)
    with pytest.raises(StepContextError, match="cannot be stored as JSON"):
        c.once("nan", lambda: float("nan"))
    assert not StepContextError.retryable  # the step's code must change: not retried
    assert store.once_get("r1", "a", -1, "big") is None


def test_once_keys_per_step_are_bounded(store: Store) -> None:
    for i in range(3):
        store.once_put("r1", "a", -1, f"k{i}", "1", 1, max_keys=3)
    with pytest.raises(StepContextError, match="3 once\\(\\) results"):
        store.once_put("r1", "a", -1, "k3", "1", 1, max_keys=3)
    # an existing key is answered even at the bound; the first result wins
    assert store.once_put("r1", "a", -1, "k0", "2", 2, max_keys=3) == "1"


def test_once_async(store: Store) -> None:
    calls: list[str] = []

    async def fetch() -> str:
        calls.append("x")
        await asyncio.sleep(0)
        return "token"

    async def step(attempt: int) -> Any:
        return await ctx(store, attempt=attempt).once_async("fetch", fetch)

    assert asyncio.run(step(1)) == "token"
    assert asyncio.run(step(2)) == "token"
    assert calls == ["x"]

    async def wrong() -> None:
        ctx(store).once("sync-in-loop", fetch)

    with pytest.raises(StepContextError, match="once_async"):
        asyncio.run(wrong())


def test_idempotency_keys() -> None:
    a1 = StepContext(run_id="r1", step_id="a", attempt=1)
    a2 = StepContext(run_id="r1", step_id="a", attempt=3)
    assert a1.idempotency_key == a2.idempotency_key
    others = {
        StepContext(run_id="r2", step_id="a").idempotency_key,
        StepContext(run_id="r1", step_id="b").idempotency_key,
        StepContext(run_id="r1", step_id="a", item=0).idempotency_key,
        a1.idempotency_key_for("refund"),
    }
    assert a1.idempotency_key not in others and len(others) == 4
    assert a1.idempotency_key.startswith("r1-")


def test_detached_outside_a_run() -> None:
    ctx_out = step_context()
    assert ctx_out.detached and ctx_out.run_id is None
    counter: list[int] = []
    ctx_out.once("k", counter.append, 1)
    ctx_out.once("k", counter.append, 2)
    assert counter == [1, 2]  # no store: nothing is recorded
    ctx_out.progress(0.5, "half")  # goes nowhere, but is still checked
    with pytest.raises(StepContextError):
        ctx_out.progress(1.5)


def test_active_context_is_seen_by_the_step_and_its_threads(store: Store) -> None:
    c = ctx(store, attempt=2, item=4)
    seen: list[StepContext] = []
    with c.active():
        seen.append(step_context())
        thread = threading.Thread(target=lambda: seen.append(step_context()))
        thread.start()
        thread.join()
    assert seen == [c, c]
    assert step_context().detached


def _events(store: Store, kind: str) -> list[dict[str, Any]]:
    return [e.data for e in store.events(0, "r1") if e.type == kind]


def test_progress_and_emit_are_rate_limited_and_the_last_is_published(store: Store) -> None:
    c = ctx(store, attempt=2)
    started = time.monotonic()
    with c.active():
        for i in range(1, 2001):  # a tight loop
            c.progress(i / 2000, f"record {i}")
            c.emit({"i": i})
    elapsed = time.monotonic() - started
    progress = _events(store, PROGRESS_EVENT)
    emitted = _events(store, EMITTED_EVENT)
    # at most one of each per interval (0.2 s here), plus the first and the last
    assert 1 <= len(progress) <= elapsed / 0.2 + 2
    assert len(emitted) <= elapsed / 0.2 + 2
    assert progress[-1] == {"fraction": 1.0, "message": "record 2000", "attempt": 2}
    items = [x["i"] for e in emitted for x in e["items"]]
    assert items == list(range(1, 2001))  # batched, in order, none lost (small data)
    assert all(e["attempt"] == 2 for e in emitted)


def test_emit_bounds_and_drops_are_counted(store: Store) -> None:
    c = ctx(store)
    with pytest.raises(StepContextError, match=f"more than the limit of {MAX_EMIT_BYTES}"):
        c.emit("x" * (MAX_EMIT_BYTES + 1))
    with pytest.raises(StepContextError, match="cannot be stored as JSON"):
        c.emit({1, object()})
    with c.active():
        c.emit("first")  # published at once
        for _ in range(20):  # 20 x 15 KiB within one interval: the batch holds 64 KiB
            c.emit("y" * 15_000)
    emitted = _events(store, EMITTED_EVENT)
    assert emitted[0]["items"] == ["first"]
    kept = sum(len(e["items"]) for e in emitted[1:])
    dropped = sum(e.get("dropped", 0) for e in emitted)
    assert kept + dropped == 20 and dropped > 0
    assert all(len(json.dumps(e)) < 70_000 for e in emitted)


def test_tool_calls_and_results_are_events_of_their_own_in_order_and_redacted(store: Store) -> None:
    c = ctx(store, attempt=3)
    secret = "sk-live-abcdefghijklmnop"
    with c.active():
        c.emit({"delta": "Let me look. "})
        c.tool_event(ToolCall(id="c1", name="files__read", arguments=json.dumps({"path": "a", "api_key": secret})))
        c.tool_event(ToolResult(id="c1", error=False, text="line one\nline two " + "z" * 5000))
        c.emit({"delta": "Done."})
    kinds = [(e.type, e.data) for e in store.events(0, "r1") if e.step_id == "a" and e.type != "step.created"]
    assert [k for k, _ in kinds] == [EMITTED_EVENT, TOOL_CALL_EVENT, TOOL_RESULT_EVENT, EMITTED_EVENT]
    call, result = kinds[1][1], kinds[2][1]
    assert call["id"] == "c1" and call["name"] == "files__read" and call["attempt"] == 3
    assert secret not in json.dumps(kinds) and "[redacted]" in call["arguments"]
    assert result["text"].startswith("line one line two z") and len(result["text"]) == MAX_TOOL_TEXT
    assert result["error"] is False and result["id"] == "c1"
    assert [i for _, d in kinds if "items" in d for i in d["items"]] == [{"delta": "Let me look. "}, {"delta": "Done."}]
    with pytest.raises(StepContextError, match="ToolCall or a ToolResult"):
        c.tool_event({"tool_call": "x"})  # type: ignore[arg-type]
    assert ToolCall(id="i" * 500, name="n", arguments="{}").id.endswith("...")


def test_tool_events_share_the_emit_bound(store: Store) -> None:
    c = ctx(store)
    with c.active():
        c.emit("first")  # published at once; the rest waits for the next flush
        for i in range(100):  # 100 x ~1 KiB, then 10 x 15 KiB: past 64 KiB some are dropped and counted
            c.tool_event(ToolResult(id=f"c{i}", error=False, text="r" * 2000))
        for _ in range(10):
            c.emit("y" * 15_000)
    results = _events(store, TOOL_RESULT_EVENT)
    emitted = _events(store, EMITTED_EVENT)
    kept = len(results) + sum(len(e["items"]) for e in emitted[1:])
    dropped = sum(e.get("dropped", 0) for e in emitted)
    assert kept + dropped == 110 and dropped > 0 and 0 < len(results) < 100


def test_bad_progress_is_refused(store: Store) -> None:
    c = ctx(store)
    for bad in (-0.1, 1.01, float("nan"), "half", True):
        with pytest.raises(StepContextError):
            c.progress(bad)  # type: ignore[arg-type]
    with pytest.raises(StepContextError):
        c.progress(0.5, 42)  # type: ignore[arg-type]
    with c.active():
        c.progress(None, "m" * 5000)
    (event,) = _events(store, PROGRESS_EVENT)
    assert event["fraction"] is None and len(event["message"]) == 500
