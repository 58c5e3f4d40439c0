"""The run's agents as a python step reaches them: ``factory.step_context().ask(agent, task)``.

An ``agent:`` step sends one task to one pool. Patterns that decide what to send next from
what came back (a loop of rounds, k samples and a vote: :mod:`factory.patterns`) are python
steps that call the same pools. The coordinator gives each python call of a run that has a
catalogue a :class:`StepAgents`: which agents the run may use and where their pools live
(the agent manager's name). The worker connects to the manager once per process and sends
the tasks through the pools' clients, as the coordinator does for agent steps: the same
replicas, breakers, bounded queues and failover. Each answer is wrapped as an agent step's
output (``{agent, replica, route: null, result}``); a failure raises :class:`AgentCallError`
with the replica's ``retryable`` verdict, so the python step's retry policy treats it as the
agent step's would.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from factory.catalog import AgentSpec
from factory.errors import AgentError, StepInputError

_POOLS: dict[tuple[str, str], Any] = {}  # this process's connections to agent managers
_LOCK = threading.Lock()


class AgentCallError(AgentError):
    """An agent called from a python step failed; ``retryable`` is the replica's verdict."""

    def __init__(self, message: str, *, retryable: bool, error_type: str | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.error_type = error_type


@dataclass(frozen=True)
class StepAgents:
    """The agents of a run's catalogue that can run here (they have a class), and their manager."""

    specs: tuple[AgentSpec, ...]
    search_path: tuple[str, ...] = ()
    manager_name: str = ""
    namespace: str = ""
    context: dict[str, Any] = field(default_factory=dict)  # store_url and run_id: agents' emits go to the run

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def spec(self, name: str) -> AgentSpec:
        for spec in self.specs:
            if spec.name == name:
                return spec
        known = ", ".join(self.names) or "none"
        raise StepInputError(f"the run's catalogue has no agent {name!r} that can run here (it has: {known})")

    def _pools(self) -> Any:
        """This process's connection to the manager; a new one when the manager was replaced
        (stopped and started again: the old connection's clients point at dead replicas)."""
        import ray

        from factory.pools import Pools

        key = (self.manager_name, self.namespace)
        try:
            current = ray.get_actor(self.manager_name, namespace=self.namespace)._actor_id
        except ValueError:
            current = None  # none runs: Pools() starts it
        with _LOCK:
            pools = _POOLS.get(key)
            if pools is not None and (current is None or pools.manager._actor_id != current):
                pools.close()
                pools = None
            if pools is None:
                pools = _POOLS[key] = Pools(self.manager_name, self.namespace)
            return pools

    def submit(
        self, name: str, task: dict[str, Any], *, step_id: str | None = None, timeout: float | None = None
    ) -> Any:
        """Send ``task`` to agent ``name``'s pool; an ObjectRef of its Outcome."""
        from factory.stepcontext import CONTEXT_META

        client = self._pools().ensure(self.spec(name), search_path=self.search_path)
        meta: dict[str, Any] = {"agent": name, "route": None}
        if self.context and step_id:
            meta[CONTEXT_META] = {**self.context, "step_id": step_id}
        return client.submit(task, meta=meta, timeout=timeout)

    @staticmethod
    def settle(name: str, outcome: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The wrapped answer and its token usage, or AgentCallError."""
        if not outcome.ok:
            raise AgentCallError(
                f"agent {name!r} failed: {outcome.error}",
                retryable=bool(outcome.retryable),
                error_type=outcome.error_type,
            )
        answer = json.loads(outcome.output_json or "null")
        usage = outcome.extra.get("usage") if outcome.extra else None
        return answer, usage if isinstance(usage, dict) else None

    def ask_many(
        self, calls: Sequence[tuple[str, dict[str, Any]]], *, step_id: str | None = None, timeout: float | None = None
    ) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        """Send every ``(agent, task)`` at once and wait for all: the answers, in order."""
        import ray

        refs = [self.submit(name, task, step_id=step_id, timeout=timeout) for name, task in calls]
        outcomes = ray.get(refs)
        return [self.settle(name, outcome) for (name, _), outcome in zip(calls, outcomes, strict=True)]
