"""Token usage and estimated cost through the real HTTP API (Ray Serve, the `api_server` fixture) and
`factory --api ... status`, for a run whose fast-agent steps asked the stand-in provider (11 tokens in,
7 out per request: tests/fixtures/chat_standin.py); and the tool call of a passthrough agent's step
as step.tool_call / step.tool_result events of the API's event stream."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from factory.cli import app
from tests.conftest import API_MODEL_PRICES, ApiServer
from tests.fixtures.chat_standin import COMPLETION_TOKENS, PROMPT_TOKENS

if importlib.util.find_spec("fast_agent") is None:
    pytest.skip("fast-agent is not installed (pip install -e '.[fast-agent]')", allow_module_level=True)

FIXTURES = Path(__file__).parent.parent / "fixtures"
PRICE_IN = API_MODEL_PRICES["tiny-local"]["input"]
PRICE_OUT = API_MODEL_PRICES["tiny-local"]["output"]


def cost(requests: int) -> float:
    return requests * (PROMPT_TOKENS * PRICE_IN + COMPLETION_TOKENS * PRICE_OUT) / 1e6


def test_the_run_view_has_each_steps_usage_and_the_runs_total(api_server: ApiServer, usage_run: str) -> None:
    with httpx.Client(base_url=api_server.base_url, timeout=30, headers=api_server.headers("read")) as http:
        run = http.get(f"/v1/runs/{usage_run}").json()
    steps = {s["step_id"]: s for s in run["steps"]}
    ask, each = steps["ask"]["usage"], steps["each"]["usage"]
    assert (ask["input_tokens"], ask["output_tokens"], ask["total_tokens"], ask["requests"]) == (
        PROMPT_TOKENS,
        COMPLETION_TOKENS,
        PROMPT_TOKENS + COMPLETION_TOKENS,
        1,
    )
    assert ask["models"] == {
        "tiny-local": {"input_tokens": PROMPT_TOKENS, "output_tokens": COMPLETION_TOKENS, "requests": 1}
    }
    assert ask["cost_usd"] == pytest.approx(cost(1)) and ask["unpriced_models"] == []
    assert (each["input_tokens"], each["output_tokens"], each["requests"]) == (
        2 * PROMPT_TOKENS,
        2 * COMPLETION_TOKENS,
        2,
    )
    assert each["cost_usd"] == pytest.approx(cost(2))
    assert steps["plain"]["usage"] is None and steps["plain"]["output"] == 3
    total = run["usage"]
    assert (total["input_tokens"], total["output_tokens"], total["requests"]) == (
        3 * PROMPT_TOKENS,
        3 * COMPLETION_TOKENS,
        3,
    )
    assert total["models"]["tiny-local"]["input_tokens"] == 3 * PROMPT_TOKENS
    assert total["cost_usd"] == pytest.approx(cost(3))
    spent = run["spent"]  # as the run counted it for its budgets: no attempt failed, so the same tokens
    assert spent["tokens"] == 3 * (PROMPT_TOKENS + COMPLETION_TOKENS) and spent["cost_usd"] == pytest.approx(cost(3))
    assert spent["attempts"] >= 5 and spent["unpriced_models"] == []


def test_the_dashboards_graph_has_each_steps_usage(api_server: ApiServer, usage_run: str) -> None:
    with httpx.Client(base_url=api_server.base_url, timeout=30, headers=api_server.headers("read")) as http:
        graph = http.get(f"/v1/runs/{usage_run}/graph").json()
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert nodes["each"]["usage"]["output_tokens"] == 2 * COMPLETION_TOKENS
    assert nodes["ask"]["usage"]["cost_usd"] == pytest.approx(cost(1)) and nodes["plain"]["usage"] is None
    from ui.render import step_rows

    rows = {row[0]: row for row in step_rows(graph["nodes"])}
    assert rows["ask"][4] == f"{PROMPT_TOKENS} in / {COMPLETION_TOKENS} out · ${cost(1):.6f}"


def test_a_step_that_waited_for_its_pool_to_start_shows_that_time(api_server: ApiServer, usage_run: str) -> None:
    """The run's first agent tasks started its pools (several seconds, the session's first fast-agent app):
    the step's and the run's times include that wait, as its attempt's does (they were once committed only
    after it, so the dashboard said 0.01 s for a step whose attempt took 18 s)."""
    with httpx.Client(base_url=api_server.base_url, timeout=30, headers=api_server.headers("read")) as http:
        nodes = {n["id"]: n for n in http.get(f"/v1/runs/{usage_run}/graph").json()["nodes"]}
        attempt = http.get(f"/v1/runs/{usage_run}/attempts", params={"step": "ask"}).json()[0]
        run = http.get(f"/v1/runs/{usage_run}").json()
    assert attempt["duration"] > 1.0  # the pool started cold: the check below means something
    assert nodes["ask"]["duration"] >= attempt["duration"] - 0.5, (nodes["ask"], attempt)
    assert run["finished_at"] - run["started_at"] >= attempt["duration"] - 0.5


def test_the_openapi_schema_documents_usage(api_server: ApiServer) -> None:
    schema = httpx.get(f"{api_server.base_url}/openapi.json", timeout=30).json()["components"]["schemas"]
    for view in ("StepView", "RunView", "GraphNode"):
        assert "usage" in schema[view]["properties"], view
    assert "failed ones included" in schema["RunView"]["properties"]["spent"]["description"]
    usage = schema["Usage"]["properties"]
    assert {"input_tokens", "output_tokens", "models", "cost_usd", "unpriced_models"} <= set(usage)
    assert "model_prices" in usage["cost_usd"]["description"]


def test_factory_status_over_the_api_shows_tokens_and_cost(api_server: ApiServer, usage_run: str) -> None:
    remote = ["--api", api_server.base_url, "--api-key", api_server.keys["read"], "status", usage_run]
    env: dict[str, Any] = {"COLUMNS": "200", "FACTORY_MODEL_PRICES": json.dumps(API_MODEL_PRICES)}
    shown = CliRunner().invoke(app, remote, env=env)
    assert shown.exit_code == 0, shown.output
    rows = {line.split("│")[1].strip(): line for line in shown.output.splitlines() if line.count("│") > 3}
    assert f"{PROMPT_TOKENS} in / {COMPLETION_TOKENS} out" in rows["ask"] and f"${cost(1):.6f}" in rows["ask"]
    assert f"{2 * PROMPT_TOKENS} in / {2 * COMPLETION_TOKENS} out" in rows["each"] and f"${cost(2):.6f}" in rows["each"]
    assert f"tokens: {3 * PROMPT_TOKENS} in / {3 * COMPLETION_TOKENS} out" in shown.output
    assert f"estimated cost ${cost(3):.6f}" in shown.output
    assert f"failed ones included: {3 * (PROMPT_TOKENS + COMPLETION_TOKENS)} tokens" in shown.output
    unpriced = CliRunner().invoke(app, remote, env={"COLUMNS": "200", "FACTORY_MODEL_PRICES": "{}"})
    assert "no price for tiny-local" in unpriced.output and "estimated cost ?" in unpriced.output


def test_tool_calls_are_their_own_event_types_in_the_event_stream(api_server: ApiServer, usage_run: str) -> None:
    with (
        httpx.Client(base_url=api_server.base_url, timeout=30, headers=api_server.headers("read")) as http,
        http.stream("GET", f"/v1/runs/{usage_run}/events") as response,
    ):
        lines = list(response.iter_lines())
    sse = [
        (kind[len("event: ") :], json.loads(data[len("data: ") :]))
        for kind, data in itertools.pairwise(lines)
        if kind.startswith("event: ") and data.startswith("data: ")
    ]
    kinds = [kind for kind, _ in sse]
    assert kinds.count("step.tool_call") == 1 and kinds.count("step.tool_result") == 1, kinds
    call = next(event for kind, event in sse if kind == "step.tool_call")
    result = next(event for kind, event in sse if kind == "step.tool_result")
    assert call["step_id"] == "tool" and call["data"]["name"] == "tools__echo"
    assert json.loads(call["data"]["arguments"]) == {"text": "from the API test"}
    assert result["data"]["text"] == "echo: from the API test" and result["data"]["id"] == call["data"]["id"]
    assert kinds.index("step.tool_call") < kinds.index("step.tool_result")
    from ui.render import event_rows

    shown = [row[2] for row in event_rows([{**event, "type": kind} for kind, event in sse])]
    assert "step.tool_call" in shown and "step.tool_result" in shown
