"""all-MiniLM-L6-v2 on numpy against sentence-transformers' own embeddings, and the routers on the dev set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factory.catalog import load_catalog
from factory.routing import Router, RouteRequest
from tests.fixtures.routing_support import DEV_SET, catalog, dev_tasks, model_cache_dir

FIXTURES = Path(__file__).parent.parent / "fixtures"

# Regression floors, a little below what was measured on the dev set (lexical 0.85, embedding 0.92).
LEXICAL_FLOOR = 0.80
EMBEDDING_FLOOR = 0.88

needs_dev_set = pytest.mark.skipif(
    not (DEV_SET / "tasks.tsv").is_file(), reason=f"routing dev set not found at {DEV_SET} (FACTORY_ROUTING_DEV_DIR)"
)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return model_cache_dir()


def test_numpy_minilm_matches_sentence_transformers(minilm_dir: Path) -> None:
    import numpy as np

    from factory.models.minilm import load_encoder

    reference = json.loads((FIXTURES / "minilm_reference.json").read_text(encoding="utf-8"))
    encoder = load_encoder(minilm_dir)
    got = encoder.encode(reference["sentences"])
    want = np.asarray(reference["embeddings"], dtype=np.float32)
    assert got.shape == want.shape == (len(reference["sentences"]), 384)
    cosines = (got * want).sum(axis=1) / np.linalg.norm(want, axis=1)
    assert cosines.min() >= 0.999, dict(zip(reference["sentences"], cosines.tolist(), strict=True))
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # One text alone gives the same vector as inside a padded batch.
    alone = encoder.encode([reference["sentences"][0]])[0]
    assert float(alone @ got[0]) > 0.99999
    # The same texts in another order give the same rows.
    short = reference["sentences"][:3]
    assert np.allclose(encoder.encode(short[::-1])[::-1], got[:3], atol=1e-5)


def test_encoder_is_loaded_once_per_folder(minilm_dir: Path) -> None:
    from factory.models.minilm import load_encoder

    assert load_encoder(minilm_dir) is load_encoder(minilm_dir)


def test_embedding_router_on_the_test_catalogue(minilm_dir: Path) -> None:
    from factory.routing.embedding import EmbeddingScorer

    router = Router(catalog(), EmbeddingScorer(catalog(), model_dir=minilm_dir))
    assert router.route(RouteRequest(text="Could you put this email into Italian?")).agent == "translator"
    assert router.route(RouteRequest(text="Give me the gist of this long paper")).agent == "summarizer"
    decision = router.route(RouteRequest(text="My Python loop never ends, can you fix it?"))
    assert decision.agent == "coder" and decision.scorer == "embedding"
    assert -1.0 <= decision.breakdown["semantic"] <= 1.0


def _accuracy(router: Router) -> float:
    tasks = dev_tasks()
    return sum(router.route(RouteRequest(text=text)).agent == expected for expected, text in tasks) / len(tasks)


@needs_dev_set
def test_lexical_accuracy_floor_on_the_dev_set() -> None:
    assert _accuracy(Router(load_catalog(DEV_SET / "agents.yaml"), "lexical")) >= LEXICAL_FLOOR


@needs_dev_set
def test_embedding_accuracy_floor_on_the_dev_set(minilm_dir: Path) -> None:
    from factory.routing.embedding import EmbeddingScorer

    agents = load_catalog(DEV_SET / "agents.yaml")
    scorer = EmbeddingScorer(agents, model_dir=minilm_dir)
    tasks = dev_tasks()
    # One batched pass over all tasks; the router's choice with no load is the best fit.
    fits = scorer.fit_many([text for _, text in tasks])
    hits = [max(fit, key=fit.__getitem__) == expected for (expected, _), fit in zip(tasks, fits, strict=True)]
    assert sum(hits) / len(hits) >= EMBEDDING_FLOOR
    # fit() of one text agrees with the batch.
    single = scorer.fit(tasks[0][1])
    assert single == pytest.approx(fits[0], abs=1e-5)
    assert Router(agents, scorer).route(RouteRequest(text=tasks[0][1])).breakdown["semantic"] == pytest.approx(
        max(single.values()), abs=1e-5
    )
