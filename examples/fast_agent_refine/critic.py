"""A checklist critic: the evaluator of the example, a plain Python agent (no model needed).

It rates the answer by the points of its checklist the answer mentions: all of them GOOD (and
EXCELLENT when the answer is also short), at least half FAIR, fewer POOR; its feedback names
the points missing. A fast-agent agent with a real model can take its place (see agents.yaml).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from factory.agent import Agent


class ChecklistConfig(BaseModel):
    must_mention: list[str] = Field(min_length=1, description="Points a good answer mentions.")
    short_words: int = Field(default=40, ge=1, description="An answer of at most this many words is short.")


class ChecklistCritic(Agent):
    """Rate an answer by the points of a checklist it mentions."""

    name = "checklist_critic"
    capabilities = ("evaluate",)
    config_model = ChecklistConfig

    config: ChecklistConfig

    def handle(self, task: dict[str, Any]) -> dict[str, str]:
        # factory.patterns.evaluator_optimizer sends the task, then "Answer:", then the answer
        text = str(task.get("text", ""))
        answer = text.partition("\n\nAnswer:\n")[2].partition("\n\nReply with JSON only")[0] or text
        missing = [point for point in self.config.must_mention if point.lower() not in answer.lower()]
        if missing:
            rating = "FAIR" if len(missing) * 2 <= len(self.config.must_mention) else "POOR"
            return {"rating": rating, "feedback": "Also mention " + ", ".join(missing) + "."}
        short = len(answer.split()) <= self.config.short_words
        return {"rating": "EXCELLENT" if short else "GOOD", "feedback": "Every point is there."}
