"""Tokens and estimated cost of an agent call's usage (as fast-agent agents report it).

``usage`` is ``{input_tokens, output_tokens, total_tokens, models: {model: {input_tokens,
output_tokens, ...}}}``; ``prices`` are USD per million input and output tokens by model (the
``model_prices`` setting). Used by the scheduler (budgets), by ``factory status``, the HTTP API
and the dashboard (each step's tokens and estimated cost, and the run's total: ``usage_of`` and
``total_usage``); what a run spent in all its attempts (``RunSpend``). Pure: no store, no settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, Field

MAX_MODELS = 100  # models read from one usage record
UNKNOWN_MODEL = "unknown"  # tokens counted without a per-model breakdown


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def count_tokens(usage: Mapping[str, Any]) -> int:
    """Tokens in and out (``total_tokens``, else input + output)."""
    return _count(usage.get("total_tokens")) or _count(usage.get("input_tokens")) + _count(usage.get("output_tokens"))


def estimate_cost(usage: Mapping[str, Any], prices: Mapping[str, tuple[float, float]]) -> tuple[float, list[str]]:
    """The estimated USD cost of the priced models' tokens, and the models used that have no price
    (``unknown`` when tokens were counted without a per-model breakdown)."""
    cost = 0.0
    unpriced: list[str] = []
    models = usage.get("models")
    if isinstance(models, dict) and models:
        for model, row in list(models.items())[:MAX_MODELS]:
            if not isinstance(row, dict):
                continue
            price = prices.get(str(model))
            if price is None:
                if str(model) not in unpriced:
                    unpriced.append(str(model))
                continue
            cost += (_count(row.get("input_tokens")) * price[0] + _count(row.get("output_tokens")) * price[1]) / 1e6
    elif count_tokens(usage):
        unpriced.append(UNKNOWN_MODEL)
    return cost, unpriced


def add_usage(total: dict[str, Any] | None, usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Token usage summed over several agent calls (the shape FastAgent reports, per model too)."""
    if usage is None:
        return total
    out: dict[str, Any] = dict(total or {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "requests": 0})
    for name in ("input_tokens", "output_tokens", "total_tokens", "requests", "tool_calls"):
        value = usage.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            out[name] = out.get(name, 0) + value
    models = dict(out.get("models") or {})
    raw = usage.get("models")
    for model, row in list(raw.items())[:MAX_MODELS] if isinstance(raw, dict) else []:
        if not isinstance(row, dict):
            continue
        mine = dict(models.get(model) or {})
        for name, value in row.items():
            if isinstance(value, int) and not isinstance(value, bool):
                mine[name] = mine.get(name, 0) + value
        models[model] = mine
    if models:
        out["models"] = models
    return out


def step_usage(output: Any) -> dict[str, Any] | None:
    """Token usage recorded in a step's output, if any: an agent or route step's ``result.usage`` (as
    fast-agent agents report it), a python step's ``usage`` (as factory.patterns' steps report the
    agents they asked), or for a ``for_each`` step (a list of such outputs) the sum over its items."""
    if isinstance(output, list):
        total: dict[str, Any] | None = None
        for item in output:
            total = add_usage(total, step_usage(item))
        return total
    if not isinstance(output, dict):
        return None
    if "agent" in output and "replica" in output:  # an agent: or route: step
        result = output.get("result")
        usage = result.get("usage") if isinstance(result, dict) else None
    else:
        usage = output.get("usage")
    return usage if isinstance(usage, dict) else None


class ModelUsage(BaseModel):
    """One model's tokens."""

    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0


class Usage(BaseModel):
    """Tokens used, as the agents reported them, with the cost estimated from the ``model_prices`` setting."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    requests: int = Field(default=0, description="Model calls.")
    tool_calls: int = 0
    models: dict[str, ModelUsage] = Field(default_factory=dict, description="The same tokens by model.")
    cost_usd: float | None = Field(
        default=None,
        description="Estimated USD cost of the tokens of the models that have a price (model_prices); null when "
        "none has one. A lower bound when unpriced_models is not empty.",
    )
    unpriced_models: list[str] = Field(
        default_factory=list,
        description="Models used that have no price (`unknown`: tokens counted without a model); not in cost_usd.",
    )

    @classmethod
    def of(cls, usage: Mapping[str, Any], prices: Mapping[str, tuple[float, float]]) -> Usage:
        """A usage record (``step_usage``, ``add_usage``) as counted, with its estimated cost."""
        cost, unpriced = estimate_cost(usage, prices)
        raw = usage.get("models")
        models = {
            str(name): ModelUsage(
                input_tokens=_count(row.get("input_tokens")),
                output_tokens=_count(row.get("output_tokens")),
                requests=_count(row.get("requests")),
            )
            for name, row in (list(raw.items())[:MAX_MODELS] if isinstance(raw, dict) else [])
            if isinstance(row, dict)
        }
        priced = bool(models) and any(str(name) in prices for name in models)
        return cls(
            input_tokens=_count(usage.get("input_tokens")),
            output_tokens=_count(usage.get("output_tokens")),
            total_tokens=count_tokens(usage),
            requests=_count(usage.get("requests")),
            tool_calls=_count(usage.get("tool_calls")),
            models=models,
            cost_usd=cost if priced else None,
            unpriced_models=unpriced,
        )


class RunSpend(BaseModel):
    """What a run spent in all its attempts, failed ones included, as it counted it against its
    budgets (its latest ``run.usage`` event; the cost with the prices of the process that ran it)."""

    attempts: int = 0
    steps: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = Field(default=0.0, description="Running time (time parked at approval gates is not counted).")
    unpriced_models: list[str] = Field(default_factory=list, description="Models used that had no price.")

    @classmethod
    def of_event(cls, data: Mapping[str, Any]) -> RunSpend:
        def number(name: str) -> float:
            value = data.get(name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                return 0.0
            return float(value)

        unpriced = data.get("unpriced")
        return cls(
            attempts=int(number("attempts")),
            steps=int(number("steps")),
            tokens=int(number("tokens")),
            cost_usd=number("cost_usd"),
            seconds=number("seconds"),
            unpriced_models=[str(m)[:200] for m in unpriced][:MAX_MODELS] if isinstance(unpriced, list) else [],
        )


def usage_of(output: Any, prices: Mapping[str, tuple[float, float]]) -> Usage | None:
    """A step's usage with its estimated cost, from its committed output; None when it records none."""
    usage = step_usage(output)
    return None if usage is None else Usage.of(usage, prices)


def total_usage(outputs: Iterable[Any], prices: Mapping[str, tuple[float, float]]) -> Usage | None:
    """The usage of several steps (a run's), summed from their outputs; None when none records any."""
    total: dict[str, Any] | None = None
    for output in outputs:
        total = add_usage(total, step_usage(output))
    return None if total is None else Usage.of(total, prices)


def cost_text(cost: float | None, unpriced: list[str]) -> str:
    """An estimated cost as text: ``$0.000123``; ``>= $...`` when some models had no price; ``?``
    when none had one (no cost)."""
    if unpriced and not cost:
        return "?"
    return f"{'>= ' if unpriced else ''}${cost or 0.0:.6f}"


def price_table(model_prices: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """The ``model_prices`` setting (``{model: ModelPrice}``) as ``{model: (input, output)}``."""
    return {str(model): (float(p.input), float(p.output)) for model, p in model_prices.items()}
