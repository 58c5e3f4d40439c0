"""The router: hard filters, semantic fit (lexical scorer), load as a tie-breaker, the explanation."""

from __future__ import annotations

import pytest

from factory.catalog import Catalog
from factory.errors import FactoryError, NoEligibleAgentError, RouterConfigError
from factory.routing import AgentHealth, Router, RouteRequest, Scorer, make_scorer
from factory.routing.lexical import LexicalScorer
from tests.fixtures.routing_support import catalog


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(catalog())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The catalogue's words in other forms, other orders and with slips: stems and character n-grams.
        ("Summarising: these reports need short abstracts", "summarizer"),
        ("Could you do a translation of the letter?", "translator"),
        ("translting this into Italian, natural language please", "translator"),
        ("The unit tests of my Python module are failing; fix them", "coder"),
        ("Optimise the queries joining customers and orders", "sql"),
        ("Which relational database query would list the customers?", "sql"),
    ],
)
def test_lexical_scorer_routes_on_the_catalogues_words(router: Router, text: str, expected: str) -> None:
    decision = router.route(RouteRequest(text=text))
    assert decision.agent == expected, decision.reason


@pytest.mark.parametrize(
    "text",
    [
        # Words the catalogue never uses: no thesaurus bridges them (that was tuning to one catalogue).
        "Give me a quick recap of this memo",
        "How would you say 'thank you' in Japanese?",
    ],
)
def test_lexical_scorer_knows_only_the_catalogues_words(text: str) -> None:
    scores = LexicalScorer(catalog()).fit(text)
    assert max(scores.values()) < 0.2, scores  # at most weak character-level echoes


def test_lexical_scores_every_agent_and_prefers_the_fitting_one() -> None:
    scorer = LexicalScorer(catalog())
    scores = scorer.fit("translate this contract into french")
    assert set(scores) == {"summarizer", "translator", "coder", "sql"}
    assert max(scores, key=scores.__getitem__) == "translator"
    assert scores["translator"] > 2 * max(v for k, v in scores.items() if k != "translator")
    assert all(v >= 0 for v in scores.values())
    # A text with no known word fits nothing.
    assert all(v == 0 for v in scorer.fit("zzz qqq").values())


def test_capability_filter_overrides_the_text(router: Router) -> None:
    decision = router.route(RouteRequest(text="Summarize this report", capabilities=["SQL"]))
    assert decision.agent == "sql"
    assert set(decision.filtered_out) == {"summarizer", "translator", "coder"}
    assert decision.filtered_out["coder"] == "missing capabilities: sql"
    assert "filtered out" in decision.reason


def test_unhealthy_agent_is_skipped(router: Router) -> None:
    health = {"translator": AgentHealth(healthy=False)}
    decision = router.route(RouteRequest(text="Translate this letter into German"), health)
    assert decision.agent != "translator"
    assert decision.filtered_out == {"translator": "unhealthy: its pool has no healthy replica"}


def test_open_breaker_makes_the_router_prefer_another_eligible_agent(router: Router) -> None:
    request = RouteRequest(text="Write a query that joins orders with customers", capabilities=["code"])
    assert router.route(request).agent == "sql"
    decision = router.route(request, {"sql": AgentHealth(breaker_open=True)})
    assert decision.agent == "coder"
    assert "circuit breaker open" in decision.filtered_out["sql"]


def test_fails_when_the_only_eligible_agents_have_open_breakers(router: Router) -> None:
    request = RouteRequest(text="Write a query", capabilities=["code"])
    health = {"sql": AgentHealth(breaker_open=True), "coder": AgentHealth(breaker_open=True)}
    with pytest.raises(NoEligibleAgentError) as info:
        router.route(request, health)
    message = str(info.value)
    assert isinstance(info.value, FactoryError)
    assert "sql: circuit breaker open" in message and "coder: circuit breaker open" in message
    assert "summarizer: missing capabilities: code" in message
    assert "retry once the open circuit breakers" in message
    assert info.value.filtered_out["translator"] == "missing capabilities: code"


def test_missing_capability_error_says_what_to_change(router: Router) -> None:
    with pytest.raises(NoEligibleAgentError, match=r"add an agent with capabilities \[gpu\]"):
        router.route(RouteRequest(text="anything", capabilities=["gpu"]))


def test_empty_catalogue_is_reported() -> None:
    with pytest.raises(NoEligibleAgentError, match="catalogue is empty"):
        Router(Catalog()).route(RouteRequest(text="hello"))


def _twins() -> Catalog:
    same = {"description": "Translate text between languages.", "capabilities": ["translate"]}
    agents = [{"name": "twin-1", **same}, {"name": "twin-2", **same}, {"name": "other"}]
    return Catalog.model_validate({"agents": agents})


def test_load_breaks_ties_between_equally_fitting_agents() -> None:
    router = Router(_twins())
    request = RouteRequest(text="translate this into Dutch")
    first_busy = {"twin-1": AgentHealth(in_flight=6, capacity=8), "twin-2": AgentHealth(in_flight=1, capacity=8)}
    decision = router.route(request, first_busy)
    assert decision.agent == "twin-2"
    assert decision.breakdown["semantic"] == decision.runners_up[0].breakdown["semantic"] > 0
    assert "less loaded" in decision.reason
    second_busy = {"twin-1": AgentHealth(in_flight=0, capacity=8), "twin-2": AgentHealth(in_flight=8, capacity=8)}
    assert router.route(request, second_busy).agent == "twin-1"
    # Equal fit and equal load: catalogue order decides, and says so.
    idle = router.route(request)
    assert idle.agent == "twin-1" and "comes first in the catalogue" in idle.reason


def test_load_does_not_override_a_clear_semantic_winner(router: Router) -> None:
    health = {"translator": AgentHealth(in_flight=50, capacity=2)}
    decision = router.route(RouteRequest(text="Translate this letter into German"), health)
    assert decision.agent == "translator"
    assert decision.breakdown["load"] > 0
    assert "despite more load" in decision.reason


def test_decision_explains_itself(router: Router) -> None:
    health = {"sql": AgentHealth(healthy=False), "coder": AgentHealth(in_flight=2, capacity=4)}
    decision = router.route(RouteRequest(text="Summarize this report in five bullet points"), health)
    assert decision.agent == "summarizer" and decision.scorer == "lexical"
    assert decision.score == decision.breakdown["total"]
    assert decision.breakdown["total"] == pytest.approx(decision.breakdown["semantic"] - decision.breakdown["load"])
    names = [c.agent for c in decision.runners_up]
    assert names and "summarizer" not in names and "sql" not in names
    assert sorted(names) == ["coder", "translator"]
    scores = [c.score for c in decision.runners_up]
    assert scores == sorted(scores, reverse=True) and scores[0] < decision.score
    coder = next(c for c in decision.runners_up if c.agent == "coder")
    assert coder.breakdown["load"] == pytest.approx(0.02 * 0.5)
    assert decision.reason.startswith("summarizer fits the task best") and names[0] in decision.reason
    assert decision.reason.endswith("filtered out: sql.")
    assert decision.latency_ms >= 0
    assert decision.model_dump(mode="json")["filtered_out"] == {"sql": "unhealthy: its pool has no healthy replica"}


def test_runners_up_are_capped() -> None:
    router = Router(catalog(), max_runners_up=1)
    assert len(router.route(RouteRequest(text="fix my code")).runners_up) == 1


def test_only_one_eligible_agent() -> None:
    decision = Router(catalog()).route(RouteRequest(text="hello", capabilities=["translate"]))
    assert decision.agent == "translator" and decision.runners_up == []
    assert "only eligible agent" in decision.reason


class _Fixed:
    name = "fixed"

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores
        self.calls = 0

    def fit(self, text: str) -> dict[str, float]:
        self.calls += 1
        return self.scores


def test_a_custom_scorer_plugs_in() -> None:
    scorer = _Fixed({"coder": 0.9, "sql": 0.1})
    assert isinstance(scorer, Scorer)
    router = Router(catalog(), scorer)
    decision = router.route(RouteRequest(text="whatever"))
    assert (decision.agent, decision.scorer, scorer.calls) == ("coder", "fixed", 1)
    # Agents the scorer did not score count as 0.
    assert {c.agent: c.breakdown["semantic"] for c in decision.runners_up}["translator"] == 0.0


def test_unknown_scorer_lists_the_known_ones() -> None:
    with pytest.raises(RouterConfigError, match="unknown scorer 'magic'; choose one of: embedding, lexical, llm"):
        make_scorer("magic", catalog())


def test_request_validation() -> None:
    assert RouteRequest(text="x", capabilities=[" code ", ""]).capabilities == ["code"]
    with pytest.raises(ValueError):
        AgentHealth(capacity=0)
    with pytest.raises(ValueError):
        RouteRequest.model_validate({"text": "x", "unknown": 1})


def test_a_long_filtered_list_is_counted_in_the_reason() -> None:
    agents = [{"name": f"agent-{i}", "capabilities": ["x" if i == 0 else "y"]} for i in range(5)]
    decision = Router(Catalog.model_validate({"agents": agents})).route(RouteRequest(text="t", capabilities=["x"]))
    assert decision.agent == "agent-0" and len(decision.filtered_out) == 4
    assert decision.reason.endswith("; 4 agents filtered out.")


def _gpu_catalog() -> Catalog:
    return Catalog.model_validate(
        {
            "agents": [
                {
                    "name": "big_summarizer",
                    "capabilities": ["summarize"],
                    "description": "Summarize long documents with a large model.",
                    "pool": {"num_gpus": 1, "memory": 8_000_000_000, "resources": {"accel_x": 2}},
                },
                {
                    "name": "small_summarizer",
                    "capabilities": ["summarize"],
                    "description": "Summarize short notes.",
                },
            ]
        }
    )


def test_resources_filter_keeps_only_agents_whose_replicas_hold_them() -> None:
    router = Router(_gpu_catalog())
    decision = router.route(RouteRequest(text="Summarize this short note", resources={"GPU": 1}))
    assert decision.agent == "big_summarizer"
    assert decision.filtered_out == {"small_summarizer": "lacks resources: GPU 1 (a replica holds GPU 0)"}
    # Memory in bytes and custom resources are compared the same way.
    decision = router.route(RouteRequest(text="Summarize", resources={"memory": 4e9, "accel_x": 1}))
    assert decision.agent == "big_summarizer"
    with pytest.raises(NoEligibleAgentError) as caught:
        router.route(RouteRequest(text="Summarize", resources={"accel_x": 3, "CPU": 0.1}))
    assert caught.value.filtered_out["big_summarizer"] == "lacks resources: accel_x 3 (a replica holds accel_x 2)"
    assert "CPU" not in caught.value.filtered_out["big_summarizer"]


def test_an_agent_the_cluster_cannot_place_is_passed_over() -> None:
    router = Router(_gpu_catalog())
    health = {"big_summarizer": AgentHealth(unplaceable="no node has GPU 1 (the largest node has 0)")}
    decision = router.route(RouteRequest(text="Summarize this long report with a large model"), health)
    assert decision.agent == "small_summarizer"
    assert decision.filtered_out["big_summarizer"] == "cannot be placed: no node has GPU 1 (the largest node has 0)"


def test_resource_requests_must_not_be_negative() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cannot be negative: GPU"):
        RouteRequest(text="x", resources={"GPU": -1})
    with pytest.raises(ValidationError, match="set GPU with num_cpus, num_gpus and memory"):
        Catalog.model_validate({"agents": [{"name": "a", "pool": {"resources": {"GPU": 1}}}]})


def test_placement_reasons_name_the_missing_resource() -> None:
    from factory.pools.placement import unplaceable_reason

    nodes = [{"CPU": 4.0, "memory": 8e9}, {"CPU": 2.0, "GPU": 1.0, "memory": 2e9}]
    assert unplaceable_reason({"memory": 16 * 2**30}, nodes) == (
        "no node has memory 16 GiB (the largest node has memory 7.45 GiB)"
    )
    assert unplaceable_reason({"CPU": 1, "GPU": 1}, nodes) is None
    assert unplaceable_reason({"CPU": 0, "GPU": 0}, []) is None  # asks for nothing
    assert unplaceable_reason({"memory": 3 * 2**29}, nodes) is None
    assert unplaceable_reason({"GPU": 2}, nodes) == "no node has GPU 2 (the largest node has GPU 1)"
    # Each resource exists, but never together on one node.
    assert unplaceable_reason({"GPU": 1, "memory": 4e9}, nodes) == (
        "no single node has all of GPU 1, memory 3.73 GiB at once"
    )
    assert unplaceable_reason({"CPU": 1}, []) == "the cluster has no alive node"


def test_a_correction_sends_the_same_request_and_close_rewordings_to_the_corrected_agent() -> None:
    router = Router(catalog())
    text = "Please tidy up the wording of our onboarding handbook"
    before = router.route(RouteRequest(text=text))
    assert before.agent != "translator" and before.recalled == []
    assert not router.learn("astronaut", text)  # no such agent: nothing learnt
    assert router.learn("translator", text)
    after = router.route(RouteRequest(text=text))
    assert after.agent == "translator"
    assert [(r.agent, r.text) for r in after.recalled] == [("translator", text)]
    assert after.decision_id != before.decision_id
    reworded = router.route(RouteRequest(text="tidy up the wording of the onboarding handbook, please"))
    assert reworded.agent == "translator"
    # a task that is not close to the correction is decided as before
    assert router.route(RouteRequest(text="Fix the failing unit test in this module.")).agent == "coder"
    assert router.route(RouteRequest(text="Fix the failing unit test in this module.")).recalled == []


def test_a_correction_obeys_the_hard_filters() -> None:
    router = Router(catalog())
    text = "Please tidy up the wording of our onboarding handbook"
    router.learn("translator", text)
    decision = router.route(RouteRequest(text=text, capabilities=["code"]))
    assert decision.agent in ("coder", "sql") and "translator" in decision.filtered_out


def test_confidence_and_the_uncertain_flag() -> None:
    from factory.catalog import RoutingPolicy

    sure = Router(catalog()).route(RouteRequest(text="Translate this letter into German."))
    assert sure.agent == "translator" and 0.5 < sure.confidence <= 1.0 and not sure.uncertain
    strict = catalog().model_copy(update={"routing": RoutingPolicy(min_confidence=0.999)})
    doubt = Router(strict).route(RouteRequest(text="Look at this for me"))
    assert doubt.uncertain and doubt.reason.startswith("uncertain (")
    assert doubt.confidence < 0.999
    only = Router(strict).route(RouteRequest(text="Translate", capabilities=["translate"]))
    assert only.confidence == 1.0 and not only.uncertain  # one eligible agent: nothing to doubt


def test_an_unsure_router_asks_its_fallback_when_the_catalogue_says_llm() -> None:
    """The llm scorer with a stand-in for a paid model (a function that answers JSON scores)."""
    import json

    from factory.catalog import RoutingPolicy
    from factory.routing.llm import LLMScorer

    asked: list[str] = []

    def stand_in_model(prompt: str) -> str:
        asked.append(prompt)
        return json.dumps({"summarizer": 0.05, "translator": 0.05, "coder": 0.05, "sql": 0.95})

    strict = catalog().model_copy(update={"routing": RoutingPolicy(min_confidence=0.999, when_uncertain="llm")})
    router = Router(strict, fallback=LLMScorer(strict, complete=stand_in_model))
    decision = router.route(RouteRequest(text="Look at this for me"))
    assert asked and decision.agent == "sql" and decision.scorer == "lexical+llm"
    assert (
        Router(catalog(), fallback=LLMScorer(strict, complete=stand_in_model))
        .route(RouteRequest(text="Look at this for me"))
        .scorer
        == "lexical"
    )  # without the policy the fallback is not asked
