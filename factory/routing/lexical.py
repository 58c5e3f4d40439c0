"""The ``lexical`` scorer: TF-IDF over stems and character n-grams. No dependencies.

Each agent becomes one document: its name, capabilities, description and
examples. A text becomes two sparse vectors, each weighted by TF-IDF over the
catalogue's agents (a word every agent has tells nothing):

- ``words``: Porter stems of the words that are not stop words;
- ``chars``: character 4-grams of the words, which catch forms the stemmer keeps
  apart ("analysis" / "analyze") and spelling slips.

The fit of a text to an agent is a weighted sum of the cosines of the vector
pairs, computed against the agent's whole document and against its best single
example, so one close example counts even in a long list.

Everything it knows comes from the catalogue at hand. An earlier version added a
hand-written thesaurus of task concepts whose groups followed the development
catalogue's agents one to one: it lifted the sets of that catalogue (held-out
0.64 -> 0.78) and lowered every other (operations 0.81 -> 0.72, property
0.70 -> 0.53), so it was tuning, and it is gone (docs/routing.md).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from factory.catalog import AgentSpec, Catalog
from factory.routing.corrections import MAX_CORRECTIONS, MEMORY_FLOOR, Recalled, memory_bonus
from factory.routing.text import STOP_WORDS, char_ngrams, stem, words

Vector = dict[str, float]

# How much each view of the text counts; they add up to 1.
FAMILY_WEIGHTS: dict[str, float] = {"words": 2 / 3, "chars": 1 / 3}
# Share of the whole-document match against the best single example.
DOCUMENT_WEIGHT = 0.7
# Name and capabilities are short and telling: they count as this many sentences of description.
NAME_WEIGHT = 2.0


@dataclass(frozen=True)
class _Features:
    words: Counter[str]
    chars: Counter[str]

    def family(self, name: str) -> Counter[str]:
        return {"words": self.words, "chars": self.chars}[name]


def features(text: str) -> _Features:
    tokens = words(text)
    stems = [stem(t) for t in tokens]
    content = [s for t, s in zip(tokens, stems, strict=True) if t not in STOP_WORDS]
    chars: Counter[str] = Counter()
    for token in tokens:
        if token not in STOP_WORDS and len(token) > 2:
            chars.update(char_ngrams(token))
    return _Features(Counter(content), chars)


def _plain(feats: _Features) -> dict[str, Vector]:
    """Sublinear TF vectors, L2-normalised, of every term (corrections bring words the catalogue lacks)."""
    vectors: dict[str, Vector] = {}
    for fam in FAMILY_WEIGHTS:
        vec = {t: 1.0 + math.log(c) for t, c in feats.family(fam).items() if c > 0}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        vectors[fam] = {t: v / norm for t, v in vec.items()} if norm else {}
    return vectors


def _scaled(counts: Counter[str], weight: float) -> Counter[str]:
    return Counter({k: v * weight for k, v in counts.items()})


def _name_text(agent: AgentSpec) -> str:
    return " ".join(
        re.split(r"[-_.]", agent.name) + [c.replace("-", " ").replace("_", " ") for c in agent.capabilities]
    )


class LexicalScorer:
    """TF-IDF fit of a text to each agent's name, capabilities, description and examples."""

    name = "lexical"
    # softmax temperature of the decision's confidence: fitted (least log loss) on the
    # development task sets (benchmarks/data/routing-sets.yaml); docs/routing.md has its calibration
    temperature = 0.06

    def __init__(self, catalog: Catalog) -> None:
        self.agents = [a.name for a in catalog.agents]
        docs: list[dict[str, Counter[str]]] = []
        self._examples: list[list[dict[str, Vector]]] = []
        example_feats: list[list[_Features]] = []
        for agent in catalog.agents:
            head = features(_name_text(agent))
            body = features(agent.description)
            exs = [features(e) for e in agent.examples]
            doc: dict[str, Counter[str]] = {}
            for fam in FAMILY_WEIGHTS:
                total = _scaled(head.family(fam), NAME_WEIGHT) + body.family(fam)
                for ex in exs:
                    total.update(ex.family(fam))
                doc[fam] = total
            docs.append(doc)
            example_feats.append(exs)
        n = len(docs)
        self._idf: dict[str, dict[str, float]] = {}
        for fam in FAMILY_WEIGHTS:
            df: Counter[str] = Counter()
            for doc in docs:
                df.update(doc[fam].keys())
            self._idf[fam] = {term: math.log((1 + n) / (1 + d)) + 1.0 for term, d in df.items()}
        self._docs = [{fam: self._vector(doc[fam], fam) for fam in FAMILY_WEIGHTS} for doc in docs]
        self._examples = [
            [{fam: self._vector(ex.family(fam), fam) for fam in FAMILY_WEIGHTS} for ex in exs] for exs in example_feats
        ]
        self._memory: list[tuple[str, str, dict[str, Vector]]] = []  # (agent, text, vectors) of corrections

    def remember(self, agent: str, text: str) -> bool:
        """A correction: ``text`` is an example of ``agent`` (see factory.routing.corrections)."""
        if agent not in self.agents:
            return False
        self._memory = [*self._memory[-(MAX_CORRECTIONS - 1) :], (agent, text, _plain(features(text)))]
        return True

    def remember_many(self, corrections: Sequence[tuple[str, str]]) -> int:
        return sum(self.remember(agent, text) for agent, text in corrections[-MAX_CORRECTIONS:])

    def recall(self, text: str, limit: int = 3) -> list[Recalled]:
        query = _plain(features(text))
        found = [Recalled(agent=a, text=t, similarity=round(self._similarity(query, v), 6)) for a, t, v in self._memory]
        return sorted((r for r in found if r.similarity > MEMORY_FLOOR), key=lambda r: -r.similarity)[:limit]

    def _query(self, feats: _Features) -> dict[str, Vector]:
        return {fam: self._vector(feats.family(fam), fam) for fam in FAMILY_WEIGHTS}

    def _vector(self, counts: Counter[str], family: str) -> Vector:
        """Sublinear TF times IDF, L2-normalised; terms no agent has are dropped (they cannot match)."""
        idf = self._idf[family]
        vec = {t: (1.0 + math.log(c)) * idf[t] for t, c in counts.items() if c > 0 and t in idf}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        return {t: v / norm for t, v in vec.items()} if norm else {}

    @staticmethod
    def _cosine(a: Vector, b: Vector) -> float:
        if len(a) > len(b):
            a, b = b, a
        return sum(v * b.get(t, 0.0) for t, v in a.items())

    def _similarity(self, query: dict[str, Vector], target: dict[str, Vector]) -> float:
        return sum(w * self._cosine(query[fam], target[fam]) for fam, w in FAMILY_WEIGHTS.items())

    def fit(self, text: str) -> dict[str, float]:
        query = self._query(features(text))
        scores: dict[str, float] = {}
        for name, doc, examples in zip(self.agents, self._docs, self._examples, strict=True):
            whole = self._similarity(query, doc)
            best_example = max((self._similarity(query, ex) for ex in examples), default=whole)
            scores[name] = DOCUMENT_WEIGHT * whole + (1.0 - DOCUMENT_WEIGHT) * best_example
        closest: dict[str, float] = {}
        plain = _plain(features(text)) if self._memory else {}
        for agent, _, vectors in self._memory:
            closest[agent] = max(closest.get(agent, 0.0), self._similarity(plain, vectors))
        for agent, similarity in closest.items():
            scores[agent] += memory_bonus(similarity)
        return scores
