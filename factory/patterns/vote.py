"""``maker``: k-voting among an agent's replicas, as a durable python step.

The same task is sent ``k`` times at once to one agent's pool (its replicas share the
samples: power of two choices); the answers are compared after normalising them, and the
answer more than half of the samples gave wins. Each sample is recorded with
``step_context().once()`` as it completes, so a retry or a resumed run asks only for the
samples it lacks::

    - id: answer
      python: factory.patterns:maker
      with: {agent: solver, task: {text: "${inputs.question}"}, k: 5}

The output: ``{answer, result, majority, votes, needed, k, tally: [{answer, votes}], replicas, usage}``.
Without a majority (a tie, or answers spread thin) ``answer`` and ``result`` are null and
``majority`` false; with ``on_no_majority: fail`` the step fails instead with
``NoMajorityError`` (not retried: the recorded samples would give the same votes).

This is plain majority voting over k samples sent at once. fast-agent's MAKER samples one
after another until an answer leads by k votes ("first to ahead by k"); here the k samples
run in parallel on the replicas, and ``quorum`` may ask for more than a majority.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from factory.errors import NoMajorityError, StepInputError
from factory.stepcontext import step_context

MAX_SAMPLES = 51
_SPACE = re.compile(r"\s+")


class VoteSpec(BaseModel):
    """The step's ``with``, checked before any agent is asked."""

    model_config = ConfigDict(extra="forbid")

    agent: str = Field(min_length=1, description="The agent whose replicas answer.")
    task: dict[str, Any] | str = Field(description="The task sent k times (a string is {text: ...}).")
    k: int = Field(default=3, ge=1, le=MAX_SAMPLES, description="How many samples.")
    quorum: int | None = Field(
        default=None, ge=1, le=MAX_SAMPLES, description="Votes the winner needs (default: more than half of k)."
    )
    match: Literal["normalized", "exact"] = Field(
        default="normalized", description="normalized: case, spaces and a final period ignored."
    )
    on_no_majority: Literal["return", "fail"] = "return"
    timeout: float | None = Field(default=None, gt=0, description="Seconds each sample may take.")


def answer_key(result: Any, match: str = "normalized") -> str:
    """What two samples must share to count as the same answer: structured ``data`` if there is
    some, else the text (normalised unless ``match`` is exact), else the result as JSON."""
    if isinstance(result, dict) and result.get("data") is not None:
        return json.dumps(result["data"], sort_keys=True, default=str)
    text = result.get("text") if isinstance(result, dict) else result
    if not isinstance(text, str):
        return json.dumps(result, sort_keys=True, default=str)
    if match == "exact":
        return text
    return _SPACE.sub(" ", text).strip().rstrip(".").strip().casefold()


def tally(results: list[Any], match: str = "normalized", quorum: int | None = None) -> dict[str, Any]:
    """The vote over ``results`` (pure: no agent, no store)."""
    keys = [answer_key(result, match) for result in results]
    counts = Counter(keys)
    needed = quorum if quorum is not None else len(results) // 2 + 1
    ranked = counts.most_common()
    winner = ranked[0][0] if ranked and ranked[0][1] >= needed else None
    if winner is not None and len(ranked) > 1 and ranked[1][1] == ranked[0][1]:
        winner = None  # a tie at the top (only possible with a low quorum)
    chosen = results[keys.index(winner)] if winner is not None else None
    return {
        "answer": winner,
        "result": chosen,
        "majority": winner is not None,
        "votes": ranked[0][1] if ranked else 0,
        "needed": needed,
        "k": len(results),
        "tally": [{"answer": key, "votes": count} for key, count in ranked],
    }


def maker(**fields: Any) -> dict[str, Any]:
    """Send the task k times, vote (see the module docstring); ``with`` holds :class:`VoteSpec`'s fields."""
    try:
        spec = VoteSpec.model_validate(fields)
    except ValidationError as exc:
        raise StepInputError(f"maker: {exc}") from None
    if spec.quorum is not None and spec.quorum > spec.k:
        raise StepInputError(f"maker: quorum {spec.quorum} is more than k={spec.k} samples")
    task = {"text": spec.task} if isinstance(spec.task, str) else spec.task
    ctx = step_context()

    def sample(index: int) -> dict[str, Any]:
        def ask() -> dict[str, Any]:
            answer = ctx.ask(spec.agent, task, timeout=spec.timeout)
            return {"replica": answer.get("replica"), "result": answer.get("result")}

        recorded: dict[str, Any] = ctx.once(f"sample-{index}", ask)
        return recorded

    with ThreadPoolExecutor(max_workers=spec.k, thread_name_prefix="maker") as pool:
        samples = list(pool.map(sample, range(spec.k)))
    vote = tally([s["result"] for s in samples], spec.match, spec.quorum)
    vote["replicas"] = dict(Counter(str(s["replica"]) for s in samples))
    vote["usage"] = ctx.usage  # the tokens this attempt's samples used (recorded samples cost none)
    ctx.emit({"votes": vote["votes"], "k": spec.k, "majority": vote["majority"]})
    if not vote["majority"] and spec.on_no_majority == "fail":
        shown = ", ".join(f"{row['answer'][:60]!r}: {row['votes']}" for row in vote["tally"][:5])
        raise NoMajorityError(f"no answer of agent {spec.agent!r} got {vote['needed']} of {spec.k} votes ({shown})")
    return vote
