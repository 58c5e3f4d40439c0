"""Scorers: how well a task's text fits each agent of a catalogue.

A scorer is prepared once per catalogue (its constructor takes the catalogue)
and then answers ``fit(text)`` with a score per agent, higher is better. Scores
of one scorer are comparable across agents; the router adds load on top.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from factory.catalog import Catalog
from factory.errors import RouterConfigError

if TYPE_CHECKING:
    from factory.settings import Settings


@runtime_checkable
class Scorer(Protocol):
    """Semantic fit of a task to the agents of the catalogue it was prepared for."""

    name: str

    def fit(self, text: str) -> dict[str, float]:
        """A score per agent name (every agent of the catalogue), higher is a better fit."""
        ...


ScorerFactory = Callable[[Catalog, "Settings | None"], Scorer]


def _lexical(catalog: Catalog, settings: Settings | None) -> Scorer:
    from factory.routing.lexical import LexicalScorer

    return LexicalScorer(catalog)


def _embedding(catalog: Catalog, settings: Settings | None) -> Scorer:
    try:
        import numpy  # noqa: F401
        import safetensors  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError as exc:
        raise RouterConfigError(
            f"the embedding scorer needs numpy, tokenizers and safetensors ({exc.name} is missing): "
            "install the Factory's embedding extra, or use --scorer lexical"
        ) from None
    from factory.routing.embedding import EmbeddingScorer

    if settings is None:
        return EmbeddingScorer(catalog)
    from factory.models.files import MODEL_NAME

    return EmbeddingScorer(
        catalog,
        settings.embedding_model_path or settings.home / "models" / MODEL_NAME,
        backend=settings.embedding_backend,
        cache_dir=settings.home / "cache",
    )


def _llm(catalog: Catalog, settings: Settings | None) -> Scorer:
    from factory.routing.llm import LLMScorer

    return LLMScorer(catalog, model=settings.router_llm_model if settings is not None else None)


SCORERS: dict[str, ScorerFactory] = {"lexical": _lexical, "embedding": _embedding, "llm": _llm}


def make_scorer(name: str, catalog: Catalog, settings: Settings | None = None) -> Scorer:
    """Prepare the scorer called ``name`` for ``catalog``. ``settings`` give the model's folder,
    backend and cache, and the llm scorer's model (services pass theirs; without them the
    defaults and the environment are used)."""
    try:
        factory = SCORERS[name]
    except KeyError:
        known = ", ".join(sorted(SCORERS))
        raise RouterConfigError(f"unknown scorer {name!r}; choose one of: {known}") from None
    return factory(catalog, settings)


def fallback_for(catalog: Catalog, settings: Settings | None = None) -> Scorer | None:
    """The scorer a router asks when unsure: the llm scorer when the catalogue's
    ``routing.when_uncertain`` is ``llm`` (it needs router_llm_model), else none."""
    if catalog.routing.when_uncertain != "llm":
        return None
    return make_scorer("llm", catalog, settings)
