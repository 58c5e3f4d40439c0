"""Learning from corrections: a request a person re-routed is remembered as a labelled example
of the right agent.

A scorer that learns (``LearningScorer``) keeps each correction in its own space (the
embedding scorer as a vector, the lexical scorer as TF-IDF vectors) and adds to an agent's
fit a bonus that grows with the similarity of the task to that agent's closest correction:

    bonus = MEMORY_WEIGHT * max(0, (similarity - MEMORY_FLOOR) / (1 - MEMORY_FLOOR))

so a request asked again, or closely reworded, goes where it was sent, and tasks that are not
close to any correction are scored as before (a correction teaches its neighbourhood, not the
whole catalogue: on the development catalogues, corrections used as ordinary prototypes moved
accuracy by a task or two either way; docs/routing.md has the learning curve).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pydantic import BaseModel, Field

# Similarity below which a correction says nothing about a task.
MEMORY_FLOOR = 0.8
# The bonus of an identical request: more than any fit difference between two agents.
MEMORY_WEIGHT = 1.0
# Corrections a router keeps (oldest dropped first); bounds memory and the cost of a decision.
MAX_CORRECTIONS = 10_000
# Longest correction text accepted.
MAX_CORRECTION_CHARS = 10_000


class Recalled(BaseModel):
    """A correction that weighed in a decision."""

    agent: str
    text: str
    similarity: float = Field(description="The scorer's similarity of the task to the corrected request.")


def memory_bonus(similarity: float) -> float:
    return MEMORY_WEIGHT * max(0.0, (similarity - MEMORY_FLOOR) / (1.0 - MEMORY_FLOOR))


@runtime_checkable
class LearningScorer(Protocol):
    """A scorer that takes corrections as labelled examples."""

    def remember(self, agent: str, text: str) -> bool:
        """Keep ``text`` as an example of ``agent``; False if the catalogue has no such agent."""

    def recall(self, text: str, limit: int = 3) -> list[Recalled]:
        """The corrections closest to ``text`` that count (similarity above MEMORY_FLOOR), closest first."""
