"""The llm scorer through a real fast-agent (the ``fast-agent`` extra), with models that need no network.

What runs here is fast-agent itself: its model factory, an ``LlmAgent`` and its LLM classes.
The models are fast-agent's internal test models (``passthrough`` echoes the message, or
answers what followed ``***FIXED_RESPONSE`` once it has seen that; ``slow`` is passthrough
after 3 s) and its ``generic`` OpenAI-compatible provider pointed at a small local HTTP
server written below (the kind of endpoint Ollama or vLLM serve).

Not tested, because no provider is reachable here and no API key exists: a reply from a real
hosted model (Anthropic, OpenAI, ...). For those providers only the missing-key path runs,
which fast-agent checks before any request.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from factory.errors import RouterConfigError, ScorerError
from factory.routing import Router, RouteRequest
from factory.routing.llm import ENV_MODEL, LLMScorer, _fast_agent_completion
from tests.fixtures.routing_support import catalog

if importlib.util.find_spec("fast_agent") is None:
    if os.environ.get("CI") == "true":
        pytest.fail("fast-agent is not installed; CI must install the dev extra", pytrace=False)
    pytest.skip("fast-agent is not installed (pip install -e '.[fast-agent]')", allow_module_level=True)

FIXED = "***FIXED_RESPONSE"
# A rating no other scorer would give for the task below (it is plainly a SQL task).
RATING = {"summarizer": 0.1, "translator": 0.95, "coder": 0.3, "sql": 0.2}
TASK = "count orders per customer"


def passthrough_scorer(reply: str) -> LLMScorer:
    """An llm scorer on fast-agent's passthrough model, told to answer ``reply`` from now on."""
    scorer = LLMScorer(catalog(), model="passthrough")
    assert scorer.complete(f"{FIXED} {reply}") == reply
    return scorer


def test_the_router_follows_the_rating_of_a_fast_agent_model() -> None:
    router = Router(catalog(), passthrough_scorer(json.dumps(RATING)))
    decision = router.route(RouteRequest(text=TASK))
    assert decision.scorer == "llm"
    assert decision.agent == "translator"
    assert {c.agent: c.breakdown["semantic"] for c in decision.runners_up} == {
        "coder": 0.3,
        "sql": 0.2,
        "summarizer": 0.1,
    }


def test_the_prompt_reaches_the_model_and_the_echo_is_parsed() -> None:
    """Without a fixed response passthrough echoes the prompt: the catalogue and the task went through."""
    scorer = LLMScorer(catalog(), model="passthrough")
    reply = scorer.complete("Task: rate these")
    assert reply == "Task: rate these"
    # The only JSON object in the prompt is the one inside the task text.
    decision = Router(catalog(), scorer).route(RouteRequest(text='please rate {"coder": 0.7, "sql": 0.4}'))
    assert decision.agent == "coder" and decision.scorer == "llm"


def test_the_model_is_taken_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_MODEL, "passthrough")
    router = Router(catalog(), "llm")
    decision = router.route(RouteRequest(text='{"summarizer": 1}'))
    assert decision.agent == "summarizer" and decision.scorer == "llm"


def test_fit_works_inside_a_running_event_loop() -> None:
    """As in a Ray Serve replica: a plain (sync) call from a coroutine on the caller's loop."""
    scorer = passthrough_scorer(json.dumps(RATING))

    async def in_a_coroutine() -> dict[str, float]:
        asyncio.get_running_loop()
        scores = scorer.fit(TASK)
        await asyncio.sleep(0)  # the caller's loop still works afterwards
        return scores

    assert asyncio.run(asyncio.wait_for(in_a_coroutine(), 30)) == RATING


def test_concurrent_callers_from_threads() -> None:
    scorer = passthrough_scorer(json.dumps(RATING))
    results: list[dict[str, float]] = []

    def call() -> None:
        results.append(scorer.fit(TASK))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [RATING] * 8


def test_a_reply_that_is_not_json_is_a_scorer_error() -> None:
    scorer = passthrough_scorer("I would send this to the sql agent.")
    with pytest.raises(ScorerError, match="JSON object"):
        Router(catalog(), scorer).route(RouteRequest(text=TASK))


def test_an_unknown_model_is_a_config_error_naming_it() -> None:
    started = time.monotonic()
    with pytest.raises(RouterConfigError, match=re.escape("nosuchprovider.some-model")):
        LLMScorer(catalog(), model="nosuchprovider.some-model")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("model", "provider", "variable"),
    [("openai.gpt-4.1-mini", "OpenAI", "OPENAI_API_KEY"), ("haiku", "Anthropic", "ANTHROPIC_API_KEY")],
)
def test_a_provider_without_its_key_is_a_config_error(
    model: str, provider: str, variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fast-agent's own credential check, before any request (so no network is needed)."""
    for name in (variable, "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    with pytest.raises(RouterConfigError) as caught:
        LLMScorer(catalog(), model=model)
    message = str(caught.value)
    assert repr(model) in message and provider in message and variable in message and "API key" in message
    assert time.monotonic() - started < 30


def test_a_slow_model_times_out_with_a_scorer_error_and_recovers() -> None:
    complete = _fast_agent_completion("slow", timeout=0.5)  # slow answers after 3 s
    started = time.monotonic()
    with pytest.raises(ScorerError, match=re.escape("did not finish within 0.5 s")):
        complete("anything")
    assert time.monotonic() - started < 2.5
    complete.timeout = 10  # type: ignore[attr-defined]
    assert complete("still there?") == "still there?"


# --- fast-agent's generic (OpenAI-compatible) provider against a local server ---------------------------------


class _ChatServer(ThreadingHTTPServer):
    """/v1/chat/completions answering ``reply`` as a stream (or ``status`` with an error), recording requests."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ChatHandler)
        self.reply = "{}"
        self.status = 200
        self.requests: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _ChatHandler(BaseHTTPRequestHandler):
    server: _ChatServer

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.server.status != 200:
            payload = json.dumps({"error": {"message": "model is loading", "type": "server_error"}}).encode()
            self.send_response(self.server.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        base = {"id": "c1", "object": "chat.completion.chunk", "created": int(time.time()), "model": body["model"]}
        deltas = [({"role": "assistant", "content": self.server.reply}, None), ({}, "stop")]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for delta, finish in deltas:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def chat_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_ChatServer]:
    server = _ChatServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("GENERIC_BASE_URL", server.url)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_an_openai_compatible_endpoint_through_the_generic_provider(chat_server: _ChatServer) -> None:
    chat_server.reply = "Here you go: " + json.dumps(RATING)
    scorer = LLMScorer(catalog(), model="generic.tiny-local")
    router = Router(catalog(), scorer)
    assert router.route(RouteRequest(text=TASK)).agent == "translator"
    assert router.route(RouteRequest(text="Put this letter into German")).agent == "translator"
    assert len(chat_server.requests) == 2
    for request, task in zip(chat_server.requests, [TASK, "Put this letter into German"], strict=True):
        assert request["model"] == "tiny-local"
        # One system and one user message each time: no history carried from task to task.
        assert [m["role"] for m in request["messages"]] == ["system", "user"]
        user = request["messages"][1]["content"]
        text = user if isinstance(user, str) else " ".join(part["text"] for part in user)
        assert f"Task: {task}" in text and "- sql (capabilities: sql, code)" in text


def test_a_failing_endpoint_is_a_scorer_error(chat_server: _ChatServer) -> None:
    chat_server.status = 500
    scorer = LLMScorer(catalog(), model="generic.tiny-local")
    started = time.monotonic()
    with pytest.raises(ScorerError, match=re.escape("generic.tiny-local")):
        scorer.fit(TASK)
    assert time.monotonic() - started < 60


def test_a_systemexit_inside_fast_agent_becomes_a_scorer_error_and_the_loop_lives() -> None:
    """fast-agent reports some configuration errors with SystemExit(1); it must not stop the scorer's loop."""
    from factory.routing.llm import _FastAgentRuntime

    runtime = _FastAgentRuntime.get()

    async def exits() -> None:
        raise SystemExit(1)

    async def answers() -> int:
        return 42

    with pytest.raises(ScorerError, match="fast-agent configuration error"):
        runtime.run(exits(), 5, "the test's model")
    assert runtime.thread.is_alive()
    assert runtime.run(answers(), 5, "the test's model") == 42
