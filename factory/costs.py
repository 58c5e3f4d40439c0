"""Tokens and estimated cost of an agent call's usage (as fast-agent agents report it).

``usage`` is ``{input_tokens, output_tokens, total_tokens, models: {model: {input_tokens,
output_tokens, ...}}}``; ``prices`` are USD per million input and output tokens by model (the
``model_prices`` setting). Used by the scheduler (budgets) and by ``factory status`` (the
estimated cost of each step). Pure: no store, no settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
