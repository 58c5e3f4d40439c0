"""``evaluator_optimizer``: fast-agent's evaluator-optimizer as a durable python step.

A generator agent answers a task; an evaluator agent rates the answer (EXCELLENT, GOOD, FAIR,
POOR) with feedback; the generator tries again with the feedback until the rating reaches
``min_rating`` or ``max_rounds`` have run. Each agent call of each round is recorded with
``step_context().once()`` as it completes, so a retry of the step, or the run resumed after
a crash, goes on at the call it was in: finished rounds are read back, not asked again::

    - id: refine
      python: factory.patterns:evaluator_optimizer
      with: {generator: writer, evaluator: critic, task: "${inputs.task}", max_rounds: 3, min_rating: GOOD}

The output: ``{text, rating, feedback, accepted, rounds, history: [{round, text, rating,
feedback}], usage}``: the accepted answer, or after the last round the best rated one (the latest
of equals). The evaluator may answer with JSON ``{"rating": ..., "feedback": ...}`` (in its
text, as structured output ``data``, or as its whole result for a Python agent) or with text
that names a rating; an answer with no rating fails the attempt with ``ModelOutputError``
(retried: nothing of it was recorded).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from factory.errors import ModelOutputError, StepInputError
from factory.stepcontext import step_context

RATINGS = ("POOR", "FAIR", "GOOD", "EXCELLENT")
Rating = Literal["POOR", "FAIR", "GOOD", "EXCELLENT"]
_RATING_WORD = re.compile(r"\b(EXCELLENT|GOOD|FAIR|POOR)\b")
_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)

EVALUATION_PROMPT = (
    "Evaluate the answer to the task below.\n\nTask:\n{task}\n\nAnswer:\n{answer}\n\n"
    'Reply with JSON only: {{"rating": "EXCELLENT" | "GOOD" | "FAIR" | "POOR", "feedback": "what to improve"}}'
)
REFINE_PROMPT = (
    "{task}\n\nYour previous answer:\n{answer}\n\nFeedback on it (rated {rating}):\n{feedback}\n\n"
    "Write an improved answer."
)


class LoopSpec(BaseModel):
    """The step's ``with``, checked before any agent is asked."""

    model_config = ConfigDict(extra="forbid")

    generator: str = Field(min_length=1, description="The agent that answers.")
    evaluator: str = Field(min_length=1, description="The agent that rates each answer.")
    task: str = Field(min_length=1, max_length=200_000)
    max_rounds: int = Field(default=3, ge=1, le=20)
    min_rating: Rating = "GOOD"
    evaluator_output: str | None = Field(
        default=None, description="Ask the evaluator for this structured output (a fast-agent agent's outputs)."
    )
    timeout: float | None = Field(default=None, gt=0, description="Seconds each agent call may take.")


class Evaluation(BaseModel):
    rating: Rating
    feedback: str = ""


def _found(value: Any) -> Evaluation | None:
    if isinstance(value, dict) and "rating" in value:
        data = {"rating": str(value["rating"]).strip().upper(), "feedback": str(value.get("feedback") or "")}
        try:
            return Evaluation.model_validate(data)
        except ValidationError:
            return None
    return None


def parse_evaluation(result: Any) -> Evaluation:
    """The rating and feedback in an evaluator's result, or ModelOutputError."""
    found = _found(result)
    if found is None and isinstance(result, dict):
        found = _found(result.get("data"))
        text = result.get("text")
    else:
        text = result if isinstance(result, str) else None
    if found is None and isinstance(text, str):
        match = _JSON_OBJECT.search(text)
        if match:
            try:
                found = _found(json.loads(match.group(0)))
            except json.JSONDecodeError:
                found = None
        if found is None:
            word = _RATING_WORD.search(text.upper())
            if word:
                found = Evaluation.model_validate({"rating": word.group(1), "feedback": text.strip()})
    if found is None:
        shown = json.dumps(result, default=str)[:200]
        raise ModelOutputError(f"the evaluator's answer names no rating ({', '.join(RATINGS)}): {shown}")
    return found


def _text(result: Any) -> str:
    if isinstance(result, dict) and isinstance(result.get("text"), str):
        return str(result["text"])
    return result if isinstance(result, str) else json.dumps(result, default=str)


def evaluator_optimizer(**fields: Any) -> dict[str, Any]:
    """Run the loop (see the module docstring); the step's ``with`` are :class:`LoopSpec`'s fields."""
    try:
        spec = LoopSpec.model_validate(fields)
    except ValidationError as exc:
        raise StepInputError(f"evaluator_optimizer: {exc}") from None
    ctx = step_context()
    wanted = RATINGS.index(spec.min_rating)
    history: list[dict[str, Any]] = []
    previous: dict[str, Any] | None = None
    for number in range(1, spec.max_rounds + 1):
        if previous is None:
            message = spec.task
        else:
            message = REFINE_PROMPT.format(
                task=spec.task, answer=previous["text"], rating=previous["rating"], feedback=previous["feedback"]
            )

        def generate(message: str = message) -> str:
            return _text(ctx.ask(spec.generator, {"text": message}, timeout=spec.timeout)["result"])

        answer: str = ctx.once(f"round-{number}-answer", generate)

        def evaluate(answer: str = answer) -> dict[str, Any]:
            task: dict[str, Any] = {"text": EVALUATION_PROMPT.format(task=spec.task, answer=answer)}
            if spec.evaluator_output is not None:
                task["output"] = spec.evaluator_output
            result = ctx.ask(spec.evaluator, task, timeout=spec.timeout)["result"]
            return parse_evaluation(result).model_dump()

        evaluation: dict[str, Any] = ctx.once(f"round-{number}-evaluation", evaluate)
        previous = {"round": number, "text": answer, **evaluation}
        history.append(previous)
        accepted = RATINGS.index(evaluation["rating"]) >= wanted
        ctx.progress(number / spec.max_rounds, f"round {number}: {evaluation['rating']}")
        ctx.emit({"round": number, "rating": evaluation["rating"], "feedback": evaluation["feedback"][:1000]})
        if accepted:
            break
    best = max(reversed(history), key=lambda entry: RATINGS.index(entry["rating"]))
    if RATINGS.index(history[-1]["rating"]) >= wanted:
        best = history[-1]
    return {
        "text": best["text"],
        "rating": best["rating"],
        "feedback": best["feedback"],
        "accepted": RATINGS.index(best["rating"]) >= wanted,
        "rounds": len(history),
        "history": history,
        "usage": ctx.usage,  # the tokens this attempt's agent calls used (recorded rounds cost none)
    }
