"""Token usage and estimated cost of steps and runs (factory.costs), and how the dashboard shows them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deployments.dashboard_views import run_graph
from factory.costs import Usage, add_usage, price_table, step_usage, total_usage, usage_of
from factory.settings import Settings
from factory.spec import Workflow
from factory.store import RunRecord, RunStatus, StepRecord, StepStatus
from ui.render import step_rows, usage_text

PRICES = {"big": (3.0, 15.0), "small": (0.5, 1.0)}  # USD per million tokens in / out


def fa_usage(model: str, tokens_in: int, tokens_out: int) -> dict[str, Any]:
    """A usage record as factory.fastagent reports one job's."""
    return {
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "total_tokens": tokens_in + tokens_out,
        "requests": 1,
        "tool_calls": 0,
        "models": {model: {"input_tokens": tokens_in, "output_tokens": tokens_out, "requests": 1}},
    }


def agent_output(usage: dict[str, Any] | None) -> dict[str, Any]:
    return {"agent": "a", "replica": "a-1", "route": None, "result": {"text": "x", "usage": usage}}


def test_step_usage_reads_agent_python_and_for_each_outputs() -> None:
    one, two = fa_usage("big", 100, 20), fa_usage("small", 1000, 300)
    assert step_usage(agent_output(one)) == one
    assert step_usage({"answer": "y", "usage": two}) == two  # a python step that asked agents
    assert step_usage(agent_output(None)) is None and step_usage(42) is None and step_usage(None) is None
    assert step_usage({"agent": "a", "replica": "r", "usage": one}) is None  # an agent step's usage is its result's
    summed = step_usage([agent_output(one), agent_output(two), agent_output(None)])  # a for_each agent step
    assert summed is not None
    assert (summed["input_tokens"], summed["output_tokens"], summed["requests"]) == (1100, 320, 2)
    assert set(summed["models"]) == {"big", "small"}


def test_usage_is_priced_per_model_and_summed_over_a_run() -> None:
    one, two, three = fa_usage("big", 100, 20), fa_usage("small", 1000, 300), fa_usage("big", 50, 10)
    step = usage_of(agent_output(one), PRICES)
    assert step is not None and step.cost_usd == pytest.approx((100 * 3.0 + 20 * 15.0) / 1e6)
    assert step.models["big"].input_tokens == 100 and step.unpriced_models == []

    total = total_usage([agent_output(one), {"usage": two}, "no usage", None, [agent_output(three)]], PRICES)
    assert total is not None
    assert (total.input_tokens, total.output_tokens, total.total_tokens, total.requests) == (1150, 330, 1480, 3)
    assert total.models["big"].model_dump() == {"input_tokens": 150, "output_tokens": 30, "requests": 2}
    assert total.models["small"].output_tokens == 300
    expected = (150 * 3.0 + 30 * 15.0 + 1000 * 0.5 + 300 * 1.0) / 1e6
    assert total.cost_usd == pytest.approx(expected)
    assert total_usage(["a", None, {"x": 1}], PRICES) is None


def test_models_without_a_price_are_named_and_not_priced() -> None:
    mixed = usage_of({"usage": add_usage(fa_usage("big", 10, 10), fa_usage("mystery", 5, 5))}, PRICES)
    assert mixed is not None and mixed.cost_usd == pytest.approx(10 * 18.0 / 1e6)
    assert mixed.unpriced_models == ["mystery"]  # so cost_usd is a lower bound
    unpriced = usage_of({"usage": fa_usage("mystery", 5, 5)}, PRICES)
    assert unpriced is not None and unpriced.cost_usd is None and unpriced.unpriced_models == ["mystery"]
    no_models = Usage.of({"input_tokens": 4, "output_tokens": 2}, PRICES)
    assert no_models.total_tokens == 6 and no_models.cost_usd is None and no_models.unpriced_models == ["unknown"]
    nonsense = Usage.of({"input_tokens": -3, "output_tokens": True, "models": {"big": "x"}}, PRICES)
    assert (nonsense.input_tokens, nonsense.output_tokens, nonsense.models) == (0, 0, {})


def test_price_table_reads_the_setting() -> None:
    settings = Settings(model_prices={"big": {"input": 3, "output": 15}})
    assert price_table(settings.model_prices) == {"big": (3.0, 15.0)}


def test_the_dashboard_graph_and_step_table_show_tokens_and_cost() -> None:
    spec = {
        "name": "u",
        "steps": [{"id": "ask", "agent": "writer", "with": {"text": "t"}}, {"id": "plain", "python": "m:f"}],
    }
    spec_json = Workflow.model_validate(spec).model_dump_json(by_alias=True)
    record = RunRecord(
        id="r1", workflow_name="u", status=RunStatus.SUCCEEDED, spec_json=spec_json, created_at=1.0, inputs={}
    )
    steps = [
        StepRecord(
            run_id="r1",
            step_id="ask",
            status=StepStatus.SUCCEEDED,
            attempts=1,
            output_json=json.dumps(agent_output(fa_usage("big", 100, 20))),
        ),
        StepRecord(run_id="r1", step_id="plain", status=StepStatus.SUCCEEDED, attempts=1, output_json='{"usage": 3}'),
    ]
    nodes = {n.id: n.model_dump(mode="json") for n in run_graph(record, steps, now=2.0, prices=PRICES).nodes}
    assert nodes["ask"]["usage"]["input_tokens"] == 100 and nodes["plain"]["usage"] is None
    rows = {row[0]: row for row in step_rows(list(nodes.values()))}
    assert rows["ask"][4] == "100 in / 20 out · $0.000600" and rows["plain"][4] == ""
    unpriced = run_graph(record, steps, now=2.0).nodes[0].model_dump(mode="json")
    assert usage_text(unpriced["usage"]) == "100 in / 20 out · ?"
    assert usage_text({"input_tokens": 1, "output_tokens": 2, "cost_usd": 0.5, "unpriced_models": ["m"]}) == (
        "1 in / 2 out · >= $0.500000"
    )


def test_a_runs_spend_is_read_from_its_usage_event_and_bad_values_count_nothing() -> None:
    from factory.costs import RunSpend

    spent = RunSpend.of_event(
        {"attempts": 4, "steps": 3, "tokens": 120, "cost_usd": 0.25, "seconds": 1.5, "unpriced": ["m"] * 500}
    )
    assert (spent.attempts, spent.steps, spent.tokens, spent.cost_usd, spent.seconds) == (4, 3, 120, 0.25, 1.5)
    assert len(spent.unpriced_models) == 100
    odd = RunSpend.of_event({"attempts": True, "tokens": -5, "cost_usd": "1", "unpriced": "m"})
    assert (odd.attempts, odd.tokens, odd.cost_usd, odd.unpriced_models) == (0, 0, 0.0, [])


def test_the_run_page_shows_what_a_run_spent_with_its_unpriced_models() -> None:
    from factory.costs import RunSpend
    from ui.render import spent_text

    spent = RunSpend(attempts=3, steps=2, tokens=54, cost_usd=0.000075).model_dump(mode="json")
    assert spent_text(spent) == "54 tokens · est. $0.000075 · 3 attempt(s)"
    unpriced = RunSpend(attempts=1, tokens=9, unpriced_models=["local.m"]).model_dump(mode="json")
    assert spent_text(unpriced) == "9 tokens · est. ? · 1 attempt(s) · no price for local.m"
    partly = RunSpend(attempts=2, tokens=9, cost_usd=0.5, unpriced_models=["local.m"]).model_dump(mode="json")
    assert spent_text(partly).startswith("9 tokens · est. >= $0.500000")
    assert spent_text(RunSpend(attempts=5).model_dump(mode="json")) == ""  # no model used: no line
    assert spent_text(None) == ""
