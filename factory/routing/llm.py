"""The ``llm`` scorer: asks a language model to rate each agent for a task.

The prompt and the parsing of the reply are here and tested with a stand-in
model. The model itself is a completion function ``str -> str``: pass one as
``complete=``, or name a fast-agent model in ``FACTORY_ROUTER_LLM_MODEL``.
The fast-agent binding is not written yet (fast-agent is not installed where
this was built and no model is reachable), so naming a model raises a
``RouterConfigError`` that says so rather than pretending.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable

from factory.catalog import Catalog
from factory.errors import RouterConfigError, ScorerError

Complete = Callable[[str], str]

ENV_MODEL = "FACTORY_ROUTER_LLM_MODEL"

_INSTRUCTIONS = (
    "You route tasks to agents. Rate how well each agent below fits the task, from 0 (cannot do it) "
    "to 1 (exactly its job). Answer with one JSON object mapping every agent name to its rating, and nothing else."
)


def _configured_model() -> str | None:
    from factory.settings import get_settings

    return get_settings().router_llm_model


def catalog_prompt(catalog: Catalog) -> str:
    lines = [_INSTRUCTIONS, "", "Agents:"]
    for agent in catalog.agents:
        lines.append(f"- {agent.name} (capabilities: {', '.join(agent.capabilities) or 'none'}): {agent.description}")
        lines.extend(f"    e.g. {example}" for example in agent.examples)
    return "\n".join(lines)


def parse_scores(reply: str, agents: list[str]) -> dict[str, float]:
    """Ratings from a model's reply: the first JSON object in it; unknown names dropped, missing ones 0."""
    match = re.search(r"\{.*\}", reply, flags=re.DOTALL)
    if match is None:
        raise ScorerError(f"the llm scorer's model did not answer with a JSON object: {reply[:200]!r}")
    try:
        data = json.loads(match.group(0))
    except json.JSONDecodeError as exc:
        raise ScorerError(f"the llm scorer's model answered malformed JSON ({exc}): {reply[:200]!r}") from None
    if not isinstance(data, dict):
        raise ScorerError(f"the llm scorer's model answered {type(data).__name__}, not an object")
    scores: dict[str, float] = {}
    for name in agents:
        value = data.get(name, 0.0)
        try:
            scores[name] = min(max(float(value), 0.0), 1.0)
        except (TypeError, ValueError):
            scores[name] = 0.0
    return scores


def _fast_agent_completion(model: str) -> Complete:
    if importlib.util.find_spec("fast_agent") is None:
        raise RouterConfigError(
            f"the llm scorer is set to use model {model!r} through fast-agent, which is not installed: "
            "install the Factory's fast-agent extra, or use --scorer lexical or embedding"
        )
    raise RouterConfigError(
        "the llm scorer's fast-agent binding is not implemented yet; pass complete= to LLMScorer "
        "or use --scorer lexical or embedding"
    )


class LLMScorer:
    """Ratings from a language model (one call per task: slow, for when the other scorers disagree)."""

    name = "llm"

    def __init__(self, catalog: Catalog, complete: Complete | None = None, model: str | None = None) -> None:
        self.agents = [a.name for a in catalog.agents]
        self.prompt = catalog_prompt(catalog)
        if complete is None:
            model = model or _configured_model()
            if model is None:
                raise RouterConfigError(
                    f"the llm scorer has no model configured: set {ENV_MODEL} to a fast-agent model name, "
                    "or use --scorer lexical (the default) or --scorer embedding"
                )
            complete = _fast_agent_completion(model)
        self.complete = complete

    def fit(self, text: str) -> dict[str, float]:
        reply = self.complete(f"{self.prompt}\n\nTask: {text}\n\nJSON:")
        return parse_scores(reply, self.agents)
