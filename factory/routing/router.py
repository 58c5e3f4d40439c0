"""The router: hard filters, then semantic fit, then load."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from factory.catalog import AgentSpec, Catalog, describe_amount
from factory.errors import NoEligibleAgentError
from factory.routing.corrections import LearningScorer
from factory.routing.models import AgentHealth, Candidate, RouteDecision, RouteRequest
from factory.routing.scorers import Scorer, make_scorer

_IDLE = AgentHealth()


def _short_of(wanted: Mapping[str, float], held: Mapping[str, float]) -> str:
    """What of ``wanted`` one replica holding ``held`` lacks, e.g. "GPU 1 (a replica holds 0)"; "" if nothing."""
    return ", ".join(
        f"{describe_amount(name, amount)} (a replica holds {describe_amount(name, held.get(name, 0.0))})"
        for name, amount in sorted(wanted.items())
        if held.get(name, 0.0) + 1e-9 < amount
    )


class Router:
    """Picks the agent of a catalogue that should take a task, and says why.

    1. Hard filters: the agent must have every requested capability, its replicas
       must hold the requested resources (``RouteRequest.resources`` against the
       catalogue's pool config), some node of the cluster must be able to hold a
       replica, it must be healthy, and its circuit breaker must be closed.
    2. Semantic fit of the task text to each remaining agent (the scorer).
    3. Load, as a small tie-breaker: ``total = semantic - load_weight * utilisation``,
       utilisation being in-flight requests over capacity (capped at ``max_utilisation``).

    The scorer is prepared once, here, for this catalogue; ``route`` is cheap.
    """

    def __init__(
        self,
        catalog: Catalog,
        scorer: str | Scorer = "lexical",
        *,
        load_weight: float = 0.02,
        max_utilisation: float = 2.0,
        max_runners_up: int = 5,
        fallback: Scorer | None = None,
    ) -> None:
        """``fallback``: the scorer that decides when the first is unsure and the catalogue's
        ``routing.when_uncertain`` is ``llm`` (a cascade)."""
        self.catalog = catalog
        self.scorer: Scorer = make_scorer(scorer, catalog) if isinstance(scorer, str) else scorer
        self.load_weight = load_weight
        self.max_utilisation = max_utilisation
        self.max_runners_up = max_runners_up
        self.fallback = fallback
        self._order = {agent.name: i for i, agent in enumerate(catalog.agents)}

    def _filter(
        self, request: RouteRequest, health: Mapping[str, AgentHealth]
    ) -> tuple[list[AgentSpec], dict[str, str]]:
        wanted = [c.lower() for c in request.capabilities]
        eligible: list[AgentSpec] = []
        filtered: dict[str, str] = {}
        for agent in self.catalog.agents:
            have = {c.lower() for c in agent.capabilities}
            missing = [c for c in wanted if c not in have]
            state = health.get(agent.name, _IDLE)
            short = _short_of(request.resources, agent.pool.replica_resources())
            if missing:
                filtered[agent.name] = f"missing capabilities: {', '.join(missing)}"
            elif short:
                filtered[agent.name] = f"lacks resources: {short}"
            elif state.unplaceable:
                filtered[agent.name] = f"cannot be placed: {state.unplaceable}"
            elif not state.healthy:
                filtered[agent.name] = "unhealthy: its pool has no healthy replica"
            elif state.breaker_open:
                filtered[agent.name] = "circuit breaker open after repeated failures"
            else:
                eligible.append(agent)
        return eligible, filtered

    def route(self, request: RouteRequest, health: Mapping[str, AgentHealth] | None = None) -> RouteDecision:
        """The decision for ``request``; raises ``NoEligibleAgentError`` when the filters leave no agent."""
        start = time.perf_counter()
        health = health or {}
        eligible, filtered = self._filter(request, health)
        if not eligible:
            raise NoEligibleAgentError(filtered, request.capabilities)

        scorer = self.scorer
        candidates = self._candidates(scorer, request.text, eligible, health)
        confidence = _confidence(candidates, _temperature(scorer))
        policy = self.catalog.routing
        uncertain = len(candidates) > 1 and confidence < policy.min_confidence
        if uncertain and policy.when_uncertain == "llm" and self.fallback is not None:
            scorer = self.fallback  # the cascade: the fallback decides, and its confidence counts
            candidates = self._candidates(scorer, request.text, eligible, health)
            confidence = _confidence(candidates, _temperature(scorer))
            uncertain = confidence < policy.min_confidence
        best, rest = candidates[0], candidates[1:]
        recalled = self.scorer.recall(request.text) if isinstance(self.scorer, LearningScorer) else []
        reason = self._reason(best, rest, filtered, scorer.name)
        if uncertain:
            second = f" or {rest[0].agent}" if rest else ""
            reason = f"uncertain ({confidence:.2f} < {policy.min_confidence:.2f}): {best.agent}{second}; " + reason
        return RouteDecision(
            agent=best.agent,
            scorer=scorer.name if scorer is self.scorer else f"{self.scorer.name}+{scorer.name}",
            score=best.score,
            breakdown=best.breakdown,
            reason=reason,
            confidence=round(confidence, 4),
            uncertain=uncertain,
            runners_up=rest[: self.max_runners_up],
            filtered_out=filtered,
            recalled=recalled,
            latency_ms=(time.perf_counter() - start) * 1000.0,
        )

    def _candidates(
        self, scorer: Scorer, text: str, eligible: list[AgentSpec], health: Mapping[str, AgentHealth]
    ) -> list[Candidate]:
        fit = scorer.fit(text)
        candidates: list[Candidate] = []
        for agent in eligible:
            semantic = float(fit.get(agent.name, 0.0))
            utilisation = min(health.get(agent.name, _IDLE).utilisation, self.max_utilisation)
            load = self.load_weight * utilisation
            total = semantic - load
            breakdown = {"semantic": round(semantic, 6), "load": round(load, 6), "total": round(total, 6)}
            candidates.append(Candidate(agent=agent.name, score=round(total, 6), breakdown=breakdown))
        # Best total first; ties go to the better semantic fit, then to catalogue order.
        candidates.sort(key=lambda c: (-c.score, -c.breakdown["semantic"], self._order[c.agent]))
        return candidates

    def learn(self, agent: str, text: str) -> bool:
        """A correction: ``text`` belongs to ``agent``. False when the scorer does not learn or
        the catalogue has no such agent."""
        return isinstance(self.scorer, LearningScorer) and self.scorer.remember(agent, text)

    def learn_many(self, corrections: list[tuple[str, str]]) -> int:
        """``learn`` for many (agent, text) pairs at once; returns how many were kept."""
        if not corrections or not isinstance(self.scorer, LearningScorer):
            return 0
        return self.scorer.remember_many(corrections)

    def _reason(self, best: Candidate, rest: list[Candidate], filtered: dict[str, str], scorer: str) -> str:
        sem = best.breakdown["semantic"]
        if not rest:
            why = f"{best.agent} is the only eligible agent (fit {sem:.3f})"
        else:
            second = rest[0]
            sem2 = second.breakdown["semantic"]
            if sem > sem2:
                why = f"{best.agent} fits the task best ({scorer} fit {sem:.3f} vs {sem2:.3f} for {second.agent})"
                if best.breakdown["load"] > 0 and second.breakdown["load"] < best.breakdown["load"]:
                    why += ", ahead despite more load"
            elif sem == sem2 and best.breakdown["load"] < second.breakdown["load"]:
                why = f"{best.agent} and {second.agent} fit equally ({sem:.3f}); {best.agent} is less loaded"
            elif sem == sem2:
                why = (
                    f"{best.agent} and {second.agent} fit equally ({sem:.3f}) and are as loaded; "
                    f"{best.agent} comes first in the catalogue"
                )
            else:
                why = f"{best.agent} fits almost as well as {second.agent} ({sem:.3f} vs {sem2:.3f}) and is less loaded"
        if 0 < len(filtered) <= 3:
            why += f"; filtered out: {', '.join(filtered)}"
        elif filtered:
            why += f"; {len(filtered)} agents filtered out"
        return why + "."


# Softmax temperature of a scorer without its own (``temperature`` attribute).
DEFAULT_TEMPERATURE = 0.05


def _temperature(scorer: Scorer) -> float:
    value = getattr(scorer, "temperature", DEFAULT_TEMPERATURE)
    return float(value) if isinstance(value, int | float) and value > 0 else DEFAULT_TEMPERATURE


def _confidence(candidates: list[Candidate], temperature: float) -> float:
    """The softmax probability of the best candidate over the eligible ones."""
    if len(candidates) <= 1:
        return 1.0
    top = candidates[0].score
    weights = [math.exp((c.score - top) / temperature) for c in candidates]
    return weights[0] / sum(weights)
