"""Learning from corrections: a request a person re-routed is remembered as a labelled example
of the right agent.

A scorer that learns (``LearningScorer``) keeps each correction in its own space (the
embedding scorer as a vector, the lexical scorer as TF-IDF vectors). Two things follow:

- memory: an agent's fit gets a bonus that grows with the similarity of the task to that
  agent's closest correction,

      bonus = MEMORY_WEIGHT * max(0, (similarity - MEMORY_FLOOR) / (1 - MEMORY_FLOOR))

  so a request asked again, or closely reworded, goes where it was sent (both scorers);
- a shifted region (embedding scorer): the correction joins the agent's prototypes, counting
  CORRECTION_WEIGHT of one, so the agent's centroid moves towards the kind of request it was
  corrected with, and a new request of that kind can follow it without being a near copy.

On the development sets the shift gains a few tasks (docs/routing.md has both learning curves and
what else was tried): in this sentence space a labelled example says little about requests it is
not close to, even with most of a set's tasks labelled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from factory.routing.router import Router
    from factory.store import Store

# Similarity below which a correction says nothing about a task.
MEMORY_FLOOR = 0.8
# The bonus of an identical request: more than any fit difference between two agents.
MEMORY_WEIGHT = 1.0
# What a correction counts for in its agent's centroid (embedding scorer), in prototypes (the
# description, each example, "name: capabilities" count 1 each): chosen on the development sets.
CORRECTION_WEIGHT = 0.5
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

    def remember_many(self, corrections: Sequence[tuple[str, str]]) -> int:
        """``remember`` for many (agent, text) pairs at once (the newest MAX_CORRECTIONS count);
        returns how many were kept."""

    def recall(self, text: str, limit: int = 3) -> list[Recalled]:
        """The corrections closest to ``text`` that count (similarity above MEMORY_FLOOR), closest first."""


class CorrectionSync:
    """Teaches a router the corrections of a store, from the first on and then the new ones.

    Ids come from a sequence: on PostgreSQL a lower id can commit after a higher one was read,
    so each pull reads again the last WINDOW ids and skips those already learnt."""

    WINDOW = 1_000
    PAGE = 1_000

    def __init__(self) -> None:
        self.seen = 0
        self._recent: set[int] = set()

    def pull(self, router: Router, store: Store) -> int:
        """Learn what ``store`` holds that ``router`` has not learnt; returns how many."""
        fresh = []
        after = max(0, self.seen - self.WINDOW)
        while True:
            page = store.route_corrections(after, self.PAGE)
            fresh += [c for c in page if c.id not in self._recent]
            if len(page) < self.PAGE:
                break
            after = page[-1].id
        router.learn_many([(c.agent, c.text) for c in fresh])
        for correction in fresh:
            self._recent.add(correction.id)
            self.seen = max(self.seen, correction.id)
        self._recent = {i for i in self._recent if i > self.seen - self.WINDOW}
        return len(fresh)
