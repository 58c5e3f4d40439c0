"""fast-agent's workflow patterns as durable, distributed Factory workflows.

- ``chain``: agent steps that reference each other's output (``${steps.ID.output.result.text}``).
- ``parallel``: independent agent steps (or a ``for_each`` agent step) and a fan-in step that
  references them all; the engine runs them at once on the pools' replicas.
- ``router``: the ``route:`` step (docs/routing.md).
- ``evaluator_optimizer`` (:mod:`factory.patterns.loop`): a python step whose rounds are recorded
  one call at a time, so a crash resumes at the round it was in.
- ``maker`` (:mod:`factory.patterns.vote`): k samples of one agent's replicas and a majority vote.

The last two are python steps that ask the run's agents through ``factory.step_context().ask``
(:mod:`factory.stepagents`); docs/agents.md shows each shape with its example.
"""

from factory.patterns.loop import LoopSpec, evaluator_optimizer, parse_evaluation
from factory.patterns.vote import VoteSpec, answer_key, maker, tally

__all__ = ["LoopSpec", "VoteSpec", "answer_key", "evaluator_optimizer", "maker", "parse_evaluation", "tally"]
