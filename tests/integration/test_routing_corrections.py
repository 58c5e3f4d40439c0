"""Corrections that generalise: a correction shifts its agent's centroid (embedding scorer), so a
new request of the kind taught, not only a near copy, goes where it was corrected; requests of
other kinds stay where they were.

The catalogues and requests here are made up for the tests (no task set's text). The tests with
the real model fetch all-MiniLM-L6-v2 once per machine as the other embedding tests do
(tests/fixtures/routing_support.py, or FACTORY_EMBEDDING_MODEL_PATH); the stand-in encoder tests
need nothing."""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from factory.catalog import Catalog
from factory.routing import Router, RouteRequest
from factory.routing.corrections import CORRECTION_WEIGHT
from tests.fixtures.routing_support import model_cache_dir

OFFICE = Catalog.model_validate(
    {
        "agents": [
            {
                "name": "travel",
                "capabilities": ["travel"],
                "description": "Book flights, hotels and trains for staff trips.",
                "examples": [
                    "Find me a flight to Lisbon on Monday morning.",
                    "Reserve a hotel near the venue for two nights.",
                ],
            },
            {
                "name": "finance",
                "capabilities": ["finance"],
                "description": "Invoices, expense claims, budgets and payments.",
                "examples": ["Pay this supplier invoice before Friday.", "How much of the marketing budget is left?"],
            },
            {
                "name": "events",
                "capabilities": ["events"],
                "description": "Organise company events: venues, catering, invitations.",
                "examples": ["Plan the summer party for sixty people.", "Order catering for the Thursday workshop."],
            },
            {
                "name": "helpdesk",
                "capabilities": ["it"],
                "description": "Laptops, accounts, passwords and software access.",
                "examples": ["My laptop will not start.", "Give me access to the design software."],
            },
        ]
    }
)
# Money back for a trip someone paid for: the words say travel, the work is finance's.
TAUGHT = [
    "Reimburse my train ticket to the Leeds workshop",
    "I paid for the taxi to the airport myself, how do I get the money back?",
    "Claim back the hotel I paid on my own card in Berlin",
]
NEW_OF_THAT_KIND = "Get me reimbursed for the airport parking from last week's trip"
UNRELATED = [
    "Book me a train to Manchester next Tuesday",
    "Reset my password please",
    "Find a venue for the board dinner",
    "Pay the cleaning company's invoice",
    "Get me a hotel room in Paris for the trade fair",
    "Install the VPN on my new laptop",
    "Send the invitations for the product launch",
    "What did we spend on software licences this year?",
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return model_cache_dir()  # fetched once per machine, as `factory models pull` does


def _router(model_dir: Path) -> Router:
    from factory.routing.embedding import EmbeddingScorer

    return Router(OFFICE, EmbeddingScorer(OFFICE, model_dir=model_dir))


def _agents(router: Router, texts: Sequence[str]) -> list[str]:
    return [router.route(RouteRequest(text=t)).agent for t in texts]


def test_corrections_of_a_kind_move_a_new_request_of_that_kind(model_dir: Path) -> None:
    router = _router(model_dir)
    assert router.route(RouteRequest(text=NEW_OF_THAT_KIND)).agent == "travel"
    assert _agents(router, TAUGHT) != ["finance"] * len(TAUGHT)  # they were mistakes
    for text in TAUGHT:
        assert router.learn("finance", text)
    after = router.route(RouteRequest(text=NEW_OF_THAT_KIND))
    # not a near copy of any correction (none is recalled), yet it goes where the kind was sent
    assert after.agent == "finance" and after.recalled == []
    assert _agents(router, TAUGHT) == ["finance"] * len(TAUGHT)  # and the corrected requests themselves
    recalled = router.route(RouteRequest(text=TAUGHT[0])).recalled
    assert recalled[0].text == TAUGHT[0] and recalled[0].similarity > 0.99
    # recall reuses the vector of the decision's text only: another text fitted last does not leak in
    router.route(RouteRequest(text=UNRELATED[0]))
    assert router.scorer.recall(TAUGHT[0])[0].text == TAUGHT[0]  # type: ignore[attr-defined]


def test_corrections_do_not_move_unrelated_requests(model_dir: Path) -> None:
    router = _router(model_dir)
    before = _agents(router, UNRELATED)
    router.learn_many([("finance", t) for t in TAUGHT])
    assert _agents(router, UNRELATED) == before


def test_learn_and_learn_many_shift_the_same_way(model_dir: Path) -> None:
    one_by_one, at_once = _router(model_dir), _router(model_dir)
    for text in TAUGHT:
        one_by_one.learn("finance", text)
    assert at_once.learn_many([("finance", t) for t in TAUGHT]) == len(TAUGHT)
    fit_a = one_by_one.scorer.fit(NEW_OF_THAT_KIND)
    fit_b = at_once.scorer.fit(NEW_OF_THAT_KIND)
    assert fit_a == pytest.approx(fit_b, abs=1e-5)


class _BagEncoder:
    """A stand-in for MiniLM: words hashed into 64 dimensions, L2-normalised."""

    backend = "numpy"
    hidden = 64

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(texts), self.hidden), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                out[row, zlib.crc32(word.encode()) % self.hidden] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


TOY = Catalog.model_validate(
    {
        "agents": [
            {"name": "alpha", "capabilities": [], "description": "red green blue"},
            {"name": "beta", "capabilities": [], "description": "cat dog bird"},
        ]
    }
)


def test_a_correction_counts_as_a_fraction_of_a_prototype(monkeypatch: pytest.MonkeyPatch) -> None:
    import factory.models.minilm
    from factory.routing.embedding import EmbeddingScorer, prototypes

    monkeypatch.setattr(factory.models.minilm, "load_encoder", lambda *args, **kwargs: _BagEncoder())
    scorer = EmbeddingScorer(TOY, whiten=False, lexical_weight=0.0)
    encoder = _BagEncoder()
    correction = "fish snake lizard"
    assert scorer.remember("beta", correction) and not scorer.remember("gamma", correction)
    expected = (
        encoder.encode(prototypes(TOY.agents[1])).sum(axis=0) + CORRECTION_WEIGHT * encoder.encode([correction])[0]
    )
    expected /= np.linalg.norm(expected)
    query = "snake"
    assert scorer.fit(query)["beta"] == pytest.approx(float(encoder.encode([query])[0] @ expected), abs=1e-5)
    # alpha has no correction: its centroid is its prototypes' alone
    alpha = encoder.encode(prototypes(TOY.agents[0])).sum(axis=0)
    alpha /= np.linalg.norm(alpha)
    assert scorer.fit(query)["alpha"] == pytest.approx(float(encoder.encode([query])[0] @ alpha), abs=1e-5)


def test_the_oldest_corrections_leave_the_centroid_when_the_memory_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    import factory.models.minilm
    import factory.routing.embedding as embedding

    monkeypatch.setattr(factory.models.minilm, "load_encoder", lambda *args, **kwargs: _BagEncoder())
    monkeypatch.setattr(embedding, "MAX_CORRECTIONS", 2)
    scorer = embedding.EmbeddingScorer(TOY, whiten=False, lexical_weight=0.0)
    fresh = embedding.EmbeddingScorer(TOY, whiten=False, lexical_weight=0.0)
    scorer.remember("alpha", "snake snake snake")
    scorer.remember_many([("beta", "fish"), ("beta", "cow")])
    fresh.remember_many([("beta", "fish"), ("beta", "cow")])
    assert scorer.fit("snake") == pytest.approx(fresh.fit("snake"), abs=1e-6)
