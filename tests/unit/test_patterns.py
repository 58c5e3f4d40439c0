"""factory.patterns without Ray: the vote, the evaluator's answer, the loop's logic against
agents played by a fake ``ask`` (the step context's agents), usage sums, and bad ``with``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from factory.costs import add_usage
from factory.errors import ModelOutputError, NoMajorityError, StepContextError, StepInputError
from factory.patterns import answer_key, evaluator_optimizer, maker, parse_evaluation, tally
from factory.stepcontext import StepContext


def test_answer_keys_ignore_case_spaces_and_a_final_period_unless_exact() -> None:
    assert answer_key({"text": "  The answer is  42. "}) == "the answer is 42"
    assert answer_key({"text": "The answer is 42."}, "exact") == "The answer is 42."
    assert answer_key({"text": "ignored", "data": {"b": 1, "a": 2}}) == '{"a": 2, "b": 1}'
    assert answer_key({"rating": "GOOD"}) == '{"rating": "GOOD"}'
    assert answer_key("Yes.") == "yes"


def test_tally_majority_none_tie_and_quorum() -> None:
    results = [{"text": t} for t in ["42", "42.", "41"]]
    vote = tally(results)
    assert vote["majority"] and vote["answer"] == "42" and vote["votes"] == 2 and vote["needed"] == 2
    assert vote["result"] == {"text": "42"}
    assert tally(results, "exact")["majority"] is False  # "42" and "42." differ when exact

    spread = tally([{"text": t} for t in ["a", "b", "c"]])
    assert spread["majority"] is False and spread["answer"] is None and spread["result"] is None
    assert spread["votes"] == 1 and len(spread["tally"]) == 3

    even = tally([{"text": t} for t in ["a", "a", "b", "b"]])
    assert even["majority"] is False  # 2 of 4 is not more than half
    assert tally([{"text": t} for t in ["a", "a", "b", "b"]], quorum=2)["majority"] is False  # a tie at the top
    assert tally([{"text": t} for t in ["a", "a", "b", "c"]], quorum=2)["answer"] == "a"
    assert tally([{"text": t} for t in ["a", "a", "a", "b"]], quorum=4)["majority"] is False


@pytest.mark.parametrize(
    ("result", "rating", "feedback"),
    [
        ({"rating": "good", "feedback": "ok"}, "GOOD", "ok"),  # a Python agent's result
        ({"text": "x", "data": {"rating": "FAIR", "feedback": "more"}}, "FAIR", "more"),  # structured output
        ({"text": 'Sure: {"rating": "EXCELLENT", "feedback": "none"} done'}, "EXCELLENT", "none"),
        (
            {"text": "I would rate this POOR: it misses the point."},
            "POOR",
            "I would rate this POOR: it misses the point.",
        ),
        ("Rating: good", "GOOD", "Rating: good"),
    ],
)
def test_the_evaluators_answer_is_read_in_every_form(result: Any, rating: str, feedback: str) -> None:
    found = parse_evaluation(result)
    assert (found.rating, found.feedback) == (rating, feedback)


def test_an_answer_without_a_rating_is_a_retryable_output_error() -> None:
    with pytest.raises(ModelOutputError, match="names no rating") as caught:
        parse_evaluation({"text": "Looks nice to me."})
    assert caught.value.retryable is True
    with pytest.raises(ModelOutputError):
        parse_evaluation({"rating": "SPLENDID"})


class FakeAgents:
    """Plays the run's agents for a detached step context: ``answer(agent, task) -> result``."""

    def __init__(self, answer: Callable[[str, dict[str, Any]], Any]) -> None:
        self.answer = answer
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def ask_many(self, calls: list[tuple[str, dict[str, Any]]], **_: Any) -> list[tuple[dict[str, Any], Any]]:
        self.calls.extend(calls)
        return [
            ({"agent": a, "replica": f"{a}-1", "route": None, "result": self.answer(a, t)}, {"total_tokens": 5})
            for a, t in calls
        ]


def run_with(agents: FakeAgents, fn: Callable[..., Any], **fields: Any) -> tuple[Any, StepContext]:
    ctx = StepContext(agents=agents)  # type: ignore[arg-type]
    with ctx.active():
        return fn(**fields), ctx


def test_the_loop_stops_at_the_wanted_rating_and_feeds_the_feedback_back() -> None:
    def answer(agent: str, task: dict[str, Any]) -> Any:
        if agent == "writer":
            return {"text": "v2" if "add numbers" in task["text"] else "v1"}
        return (
            {"rating": "GOOD", "feedback": "fine"}
            if "Answer:\nv2" in task["text"]
            else {
                "rating": "FAIR",
                "feedback": "add numbers",
            }
        )

    agents = FakeAgents(answer)
    out, ctx = run_with(agents, evaluator_optimizer, generator="writer", evaluator="critic", task="Write.")
    assert out["accepted"] and out["rounds"] == 2 and out["text"] == "v2" and out["rating"] == "GOOD"
    assert [agent for agent, _ in agents.calls] == ["writer", "critic", "writer", "critic"]
    assert "Your previous answer:\nv1" in agents.calls[2][1]["text"]
    assert ctx.usage == {"input_tokens": 0, "output_tokens": 0, "total_tokens": 20, "requests": 0}


def test_the_loop_returns_the_best_answer_after_its_last_round() -> None:
    ratings = iter(["FAIR", "GOOD", "FAIR"])
    answers = iter(["a", "b", "c"])

    def answer(agent: str, task: dict[str, Any]) -> Any:
        return {"text": next(answers)} if agent == "writer" else {"rating": next(ratings), "feedback": "-"}

    out, _ = run_with(
        FakeAgents(answer),
        evaluator_optimizer,
        generator="writer",
        evaluator="critic",
        task="Write.",
        max_rounds=3,
        min_rating="EXCELLENT",
    )
    assert out["accepted"] is False and out["rounds"] == 3
    assert (out["text"], out["rating"]) == ("b", "GOOD")


def test_maker_votes_and_can_fail_without_a_majority() -> None:
    answers = iter(["x", "y", "x"])
    out, _ = run_with(FakeAgents(lambda a, t: {"text": next(answers)}), maker, agent="solver", task="Q?", k=3)
    assert out["answer"] == "x" and out["votes"] == 2 and out["replicas"] == {"solver-1": 3}

    spread = iter(["x", "y", "z"])
    with pytest.raises(NoMajorityError, match="2 of 3 votes") as caught:
        run_with(FakeAgents(lambda a, t: {"text": next(spread)}), maker, agent="s", task="Q?", on_no_majority="fail")
    assert caught.value.retryable is False


@pytest.mark.parametrize(
    ("fn", "fields", "message"),
    [
        (maker, {"agent": "s", "task": "q", "k": 0}, "k"),
        (maker, {"agent": "s", "task": "q", "k": 3, "quorum": 4}, "quorum 4 is more than k=3"),
        (maker, {"agent": "s", "task": "q", "votes": 3}, "votes"),
        (evaluator_optimizer, {"generator": "w", "evaluator": "c", "task": "t", "max_rounds": 0}, "max_rounds"),
        (evaluator_optimizer, {"generator": "w", "evaluator": "c", "task": "t", "min_rating": "OK"}, "min_rating"),
    ],
)
def test_a_bad_with_is_a_step_input_error_before_any_agent_is_asked(
    fn: Callable[..., Any], fields: dict[str, Any], message: str
) -> None:
    agents = FakeAgents(lambda a, t: {"text": "never"})
    with pytest.raises(StepInputError, match=message):
        run_with(agents, fn, **fields)
    assert agents.calls == []


def test_asking_agents_without_a_catalogue_says_how() -> None:
    with pytest.raises(StepContextError, match="--agents"):
        StepContext().ask("writer", {"text": "hi"})


def test_usage_is_summed_per_model() -> None:
    one = {
        "input_tokens": 10,
        "output_tokens": 2,
        "total_tokens": 12,
        "requests": 1,
        "models": {"m": {"input_tokens": 10}},
    }
    two = {
        "input_tokens": 5,
        "output_tokens": 1,
        "total_tokens": 6,
        "requests": 1,
        "tool_calls": 2,
        "models": {"m": {"input_tokens": 5}, "n": {"input_tokens": 1}},
    }
    total = add_usage(add_usage(None, one), two)
    assert total == {
        "input_tokens": 15,
        "output_tokens": 3,
        "total_tokens": 18,
        "requests": 2,
        "tool_calls": 2,
        "models": {"m": {"input_tokens": 15}, "n": {"input_tokens": 1}},
    }
    assert add_usage(total, None) is total
