"""The ``embedding`` scorer: all-MiniLM-L6-v2 sentence embeddings, run with numpy.

Each agent is represented by several sentences (prototypes): its description,
each of its examples, and "name: capabilities". They are embedded once, when
the scorer is prepared for a catalogue. A task's fit to an agent is its cosine
to the agent's centroid, the normalised mean of its prototypes: the agent's
overall profile counts, not one example that happens to share the task's words
(on the development set the centroid beat the closest prototype and mixes of
the two).

Before the cosine, task and prototypes pass through the within-intent
whitening of ``factory.routing.intents``: it shrinks the directions in which
requests of one intent differ by topic, so the fit follows what a task asks
for more than what it is about.

The cosine is then blended with the ``lexical`` scorer's fit:
``fit = cosine + lexical_weight * lexical``. A sentence embedding mixes what a
task asks for with what it is about ("write the query for our sales data"
sits near the data analyst); the lexical fit adds the evidence of the words
themselves ("query"). Both were chosen on held-out task sets written without
reading the development tasks (benchmarks/data); docs/routing.md has the figures
of each part (``python -m benchmarks.routing --ablation``).

Corrections (``remember``; factory.routing.corrections) join their agent's prototypes at
``CORRECTION_WEIGHT`` each, moving its centroid, and near copies of one get a bonus.

The model is read from disk only (see ``factory.models.files``): run
``factory models pull`` once, or set ``FACTORY_EMBEDDING_MODEL_PATH``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from factory.catalog import AgentSpec, Catalog
from factory.routing.corrections import (
    CORRECTION_WEIGHT,
    MAX_CORRECTIONS,
    MEMORY_FLOOR,
    Recalled,
    memory_bonus,
)
from factory.routing.intents import intent_whitening
from factory.routing.lexical import LexicalScorer

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# Share of the lexical fit in the blend (see the module's docstring).
LEXICAL_WEIGHT = 0.4


def prototypes(agent: AgentSpec) -> list[str]:
    """The sentences that stand for ``agent``."""
    texts = [agent.description] if agent.description.strip() else []
    texts += [e for e in agent.examples if e.strip()]
    label = agent.name.replace("_", " ").replace("-", " ")
    caps = ", ".join(c.replace("-", " ").replace("_", " ") for c in agent.capabilities)
    texts.append(f"{label}: {caps}" if caps else label)
    return texts


class EmbeddingScorer:
    """Cosine fit of a text to each agent's description, examples and capabilities in MiniLM space,
    after the within-intent whitening (``whiten``), blended with the lexical fit (``lexical_weight``;
    0 gives the cosine alone)."""

    name = "embedding"
    # softmax temperature of the decision's confidence: fitted (least log loss) on the
    # development task sets (benchmarks/data/routing-sets.yaml); docs/routing.md has its calibration
    temperature = 0.05

    def __init__(
        self,
        catalog: Catalog,
        model_dir: str | Path | None = None,
        *,
        lexical_weight: float = LEXICAL_WEIGHT,
        whiten: bool = True,
        backend: str | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        """``cache_dir``: where the intent whitening is kept when the model's folder is read-only
        (default $FACTORY_HOME/cache)."""
        import numpy as np

        from factory.models.minilm import load_encoder

        self.encoder = load_encoder(model_dir, backend)
        self._transform = intent_whitening(self.encoder, cache_dir) if whiten else None
        self.lexical_weight = lexical_weight
        self.lexical = LexicalScorer(catalog) if lexical_weight else None
        self.agents = [a.name for a in catalog.agents]
        texts: list[str] = []
        owner: list[int] = []
        for i, agent in enumerate(catalog.agents):
            for text in prototypes(agent):
                texts.append(text)
                owner.append(i)
        vectors = self._project(self.encoder.encode(texts))
        # the sum of each agent's prototype vectors; its centroid is this plus its corrections, normalised
        self._sums = np.zeros((len(self.agents), self.encoder.hidden), dtype=np.float32)
        np.add.at(self._sums, np.asarray(owner, dtype=np.int64), vectors)
        self._centroids = self._normalised(self._sums)
        # corrections (factory.routing.corrections): agent index, text, and the vectors as one matrix
        self._memory: tuple[list[int], list[str], npt.NDArray[np.float32]] = (
            [],
            [],
            np.zeros((0, self.encoder.hidden), dtype=np.float32),
        )
        # the last text fitted alone and its vector: ``recall`` for the same decision reuses it
        self._last: tuple[str, npt.NDArray[np.float32]] | None = None

    def remember(self, agent: str, text: str) -> bool:
        """A correction: ``text`` is an example of ``agent``. Replaced whole, so a decision
        running meanwhile sees the memory before or after, never half of it."""
        if agent not in self.agents:
            return False
        import numpy as np

        owners, texts, vectors = self._memory
        keep = MAX_CORRECTIONS - 1
        self._memory = (
            [*owners[-keep:], self.agents.index(agent)],
            [*texts[-keep:], text],
            np.vstack([vectors[-keep:], self.embed(text)[None, :]]),
        )
        self._centroids = self._shifted()
        return True

    def remember_many(self, corrections: Sequence[tuple[str, str]]) -> int:
        """Many corrections in one batched encoding and one new matrix."""
        import numpy as np

        known = [(a, t) for a, t in corrections if a in self.agents][-MAX_CORRECTIONS:]
        if not known:
            return 0
        vectors = self._project(self.encoder.encode([t for _, t in known]))
        owners, texts, memory = self._memory
        keep = MAX_CORRECTIONS - len(known)
        self._memory = (
            [*(owners[-keep:] if keep else []), *(self.agents.index(a) for a, _ in known)],
            [*(texts[-keep:] if keep else []), *(t for _, t in known)],
            np.vstack([memory[-keep:] if keep else memory[:0], vectors]),
        )
        self._centroids = self._shifted()
        return len(known)

    @staticmethod
    def _normalised(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        import numpy as np

        norms = np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        return (rows / norms).astype(np.float32, copy=False)

    def _shifted(self) -> npt.NDArray[np.float32]:
        """The centroids with the kept corrections in: each counts CORRECTION_WEIGHT of a prototype."""
        import numpy as np

        owners, _, vectors = self._memory
        sums = self._sums.copy()
        if owners:
            np.add.at(sums, np.asarray(owners, dtype=np.int64), CORRECTION_WEIGHT * vectors)
        return self._normalised(sums)

    def recall(self, text: str, limit: int = 3) -> list[Recalled]:
        owners, texts, vectors = self._memory
        if not owners:
            return []
        last = self._last
        sims = vectors @ (last[1] if last is not None and last[0] == text else self.embed(text))
        order = sims.argsort()[::-1][:limit]
        return [
            Recalled(agent=self.agents[owners[i]], text=texts[i], similarity=round(float(sims[i]), 6))
            for i in order
            if sims[i] > MEMORY_FLOOR
        ]

    def _project(self, vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Whitened and L2-normalised again (unchanged without whitening)."""
        if self._transform is None:
            return vectors
        import numpy as np

        projected: npt.NDArray[np.float32] = vectors @ self._transform
        projected /= np.maximum(np.linalg.norm(projected, axis=1, keepdims=True), 1e-12)
        return projected

    def embed(self, text: str) -> npt.NDArray[np.float32]:
        """The text's vector in the space the scorer compares in (whitened when ``whiten``)."""
        vector: npt.NDArray[np.float32] = self._project(self.encoder.encode([text]))[0]
        return vector

    def fit(self, text: str) -> dict[str, float]:
        return self.fit_many([text])[0]

    def fit_many(self, texts: list[str]) -> list[dict[str, float]]:
        """``fit`` for several texts at once: one batched forward pass, much faster than a loop."""
        if not self.agents or not texts:
            return [{} for _ in texts]
        queries = self._project(self.encoder.encode(texts))
        if len(texts) == 1:
            self._last = (texts[0], queries[0])
        scores = queries @ self._centroids.T
        owners, _, memory = self._memory
        if owners:
            import numpy as np

            sims = queries @ memory.T
            for agent in sorted(set(owners)):
                closest = sims[:, np.asarray(owners) == agent].max(axis=1)
                scores[:, agent] += [memory_bonus(float(s)) for s in closest]
        fits = [{name: float(s) for name, s in zip(self.agents, row, strict=True)} for row in scores]
        if self.lexical is not None:
            for text, fit in zip(texts, fits, strict=True):
                for name, value in self.lexical.fit(text).items():
                    fit[name] += self.lexical_weight * value
        return fits
