"""Routing: which agent of a catalogue should take a task, and why.

``Router(catalog, scorer="lexical").route(RouteRequest(text=...), health)`` applies the
hard filters (capabilities, health, open circuit breakers), scores the semantic fit
of the text to each remaining agent, breaks near ties on load, and returns a
``RouteDecision`` that explains itself. Scorers: ``lexical`` (no dependencies),
``embedding`` (all-MiniLM-L6-v2 on numpy; ``factory models pull`` first) and ``llm``.
"""

from factory.errors import NoEligibleAgentError
from factory.routing.models import AgentHealth, Candidate, RouteDecision, RouteRequest
from factory.routing.router import Router
from factory.routing.scorers import SCORERS, Scorer, fallback_for, make_scorer

__all__ = [
    "SCORERS",
    "AgentHealth",
    "Candidate",
    "NoEligibleAgentError",
    "RouteDecision",
    "RouteRequest",
    "Router",
    "Scorer",
    "fallback_for",
    "make_scorer",
]
