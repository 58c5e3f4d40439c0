"""The scheduler: one run's state, and the decisions that move it. No Ray, no store, no clock.

The driver (:class:`factory.engine.Coordinator`) tells the scheduler what happened:

- :meth:`RunScheduler.start` (the run begins or resumes),
- :meth:`RunScheduler.on_result` (an attempt finished with an :class:`~factory.outcome.Outcome`),
- :meth:`RunScheduler.on_time` (time passed: backoffs may be over),
- :meth:`RunScheduler.cancel` (someone asked to stop),

each with the time ``now`` it happened. Each returns the :data:`Action` objects the driver
carries out (submit an attempt, make an output available, stop an attempt), and the
scheduler queues the state changes to commit (:meth:`RunScheduler.take_changes`), each with
its event, in the order they happened.

Python and container steps are submitted *eagerly*: as soon as each of their dependencies has
been submitted (:class:`SubmitStep`), with the dependencies' pending results as arguments,
so that Ray pipelines a chain without a round trip through the coordinator (a step submitted
eagerly lets its dependants go in the same turn, also after a retry or a ``for_each``). Such an attempt
runs the user's code only once its dependencies succeeded; when one failed, it returns
``skipped`` at once. Steps whose arguments need values (``for_each``, ``cache``, agent and
route steps) are submitted with resolved arguments (:class:`SubmitCall`), one call per item,
once their dependencies succeeded.

When an attempt fails and will be retried, dependants submitted against it are *superseded*:
their generation is bumped, results of the old generation are ignored, and they are
submitted again against the retry.

``for_each`` items are durable one by one: each finished item is an
:class:`~factory.store.ItemChange` committed with the batch, and a resumed run is given the
committed items (:meth:`RunScheduler.restore`) and runs only the others.
"""

from __future__ import annotations

import heapq
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from factory.costs import RunSpend, count_tokens, estimate_cost
from factory.dag import Graph
from factory.errors import StepInputError
from factory.outcome import Outcome, limit_outcome
from factory.refs import Context, resolve
from factory.retry import backoff_delay
from factory.spec import Budget, Step, Workflow
from factory.store.base import (
    FINAL_STEP_STATUSES,
    ApprovalRecord,
    Change,
    EventChange,
    ItemChange,
    ItemRecord,
    RunChange,
    RunStatus,
    StepChange,
    StepRecord,
    StepStatus,
)

ITEM_PROGRESS_SECONDS = 0.5  # a running for_each step says how many items are done at most this often
# An attempt (a step's, or a for_each item's) lost with its Ray node runs again this many
# times at most, beside its retry policy: Ray's own default max_retries for system failures.
MAX_NODE_LOSSES = 3
# Items of one for_each step in flight at once; the others wait their turn (bounds the
# coordinator's memory and Ray's queue for very large lists).
MAX_ITEMS_IN_FLIGHT = 4096
# A step is submitted ahead of its dependencies' success (Ray pipelines it) only while fewer
# attempts than this are in flight; else once they succeeded. Bounds the driver's memory on huge DAGs.
MAX_AHEAD = 2_000
_ACTIVE = (StepStatus.RUNNING, StepStatus.RETRYING)
TIMEOUT = "timeout"  # who decided when a gate's timeout did
MAX_GATE_MESSAGE = 4000  # characters of a gate's message once its ${...} are resolved


# -- actions: what the driver carries out ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubmitStep:
    """Start an attempt whose ``with`` is resolved in the worker from its dependencies' results
    (the driver passes the latest result of each dependency: the ones it submitted or published)."""

    token: int
    step_id: str


@dataclass(frozen=True, slots=True)
class SubmitCall:
    """Start an attempt with resolved arguments: one item of a ``for_each`` (``index``), or the one
    call of a step that needs values (``index`` 0). ``cacheable``: the driver may answer it from the
    step cache (and must store its output there when it succeeds)."""

    token: int
    step_id: str
    index: int
    arguments: dict[str, Any]
    item: Any = None
    has_item: bool = False
    route_text: str | None = None
    cacheable: bool = False


@dataclass(frozen=True, slots=True)
class Publish:
    """Make a step's committed output the result its dependants receive."""

    step_id: str
    output_json: str


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the attempt in flight under this token (its result, if any, will be ignored)."""

    token: int


@dataclass(frozen=True, slots=True)
class ProposeDecision:
    """A gate's timeout passed: record this decision unless a person's stands already, and
    hand the scheduler the one that stands (:meth:`RunScheduler.on_decision`)."""

    decision: ApprovalRecord


Action = SubmitStep | SubmitCall | Publish | Stop | ProposeDecision


@dataclass(frozen=True, slots=True)
class Attempt:
    """What a token stands for: the attempt of a step (``index`` None) or of an item."""

    step_id: str
    generation: int
    index: int | None


# -- state -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Item:
    attempts: int = 0
    node_losses: int = 0
    done: bool = False
    output_json: str | None = None
    logs: str = ""
    cached: bool = False
    token: int | None = None


@dataclass
class _StepState:
    step: Step
    status: StepStatus = StepStatus.PENDING
    generation: int = 0
    submitted: bool = False
    available: bool = False  # dependants may be submitted against this step's latest result
    attempts: int = 0
    token: int | None = None  # the step's own attempt in flight (eager steps)
    output_json: str | None = None
    started_at: float = 0.0
    node_losses: int = 0
    # steps that need values: their calls (items of a for_each, or the single call)
    items: list[_Item] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)  # the for_each list
    items_left: int = 0
    next_index: int = 0  # first item never submitted
    in_flight: int = 0
    waiting: list[int] = field(default_factory=list)  # items due again (retries), by index
    progress_at: float = float("-inf")
    progress_done: int = -1
    gate_opened_at: float | None = None  # approval gates: when the wait began (wall clock, survives resumes)
    timeout_proposed: bool = False  # the gate's timeout decision was handed to the driver


@dataclass
class RunVerdict:
    """How the run ended."""

    status: RunStatus
    error: str | None
    event: str


USAGE_EVENT_SECONDS = 1.0  # a run.usage event (what the run used, for budgets) at most this often


@dataclass
class Usage:
    """What a run used, counted against its budget; kept across resumes (``run.usage`` events)."""

    attempts: int = 0
    steps: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0  # running time of earlier sessions (parked time is not counted)
    unpriced: list[str] = field(default_factory=list)  # models used whose price is not configured

    def data(self, seconds: float) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "steps": self.steps,
            "tokens": self.tokens,
            "cost_usd": round(self.cost_usd, 6),
            "seconds": round(seconds, 3),
            **({"unpriced": self.unpriced} if self.unpriced else {}),
        }

    @classmethod
    def of(cls, data: dict[str, Any]) -> Usage:
        spent = RunSpend.of_event(data)
        return cls(
            attempts=spent.attempts,
            steps=spent.steps,
            tokens=spent.tokens,
            cost_usd=spent.cost_usd,
            seconds=spent.seconds,
            unpriced=spent.unpriced_models,
        )


class RunScheduler:
    """The decisions of one run. See the module's docstring."""

    def __init__(
        self,
        workflow: Workflow,
        graph: Graph,
        run_id: str,
        inputs: dict[str, Any],
        *,
        max_output_bytes: int,
        max_for_each_items: int,
        max_items_in_flight: int = MAX_ITEMS_IN_FLIGHT,
        max_ahead: int = MAX_AHEAD,
        rng: random.Random | None = None,
        budget: Budget | None = None,
        prices: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        """``budget``: the run's limits (default: the workflow's); ``prices``: USD per million
        input and output tokens by model, for cost estimates."""
        self.workflow = workflow
        self.graph = graph
        self.run_id = run_id
        self.inputs = inputs
        self.max_output_bytes = max_output_bytes
        self.max_for_each_items = max_for_each_items
        self.max_items_in_flight = max(1, max_items_in_flight)
        self.max_ahead = max_ahead
        self.rng = rng or random.Random()
        self.states: dict[str, _StepState] = {s.id: _StepState(s) for s in workflow.steps}
        self._unfinished = len(self.states)  # steps not in a final status (kept by _change)
        self._fan_outs = [self.states[s.id] for s in workflow.steps if s.for_each is not None]
        # only approval gates wait for people: the scans for waiting steps look at these alone
        self._gates = [self.states[s.id] for s in workflow.steps if s.approval is not None]
        self.tokens: dict[int, Attempt] = {}
        self._next_token = 0
        self._retries: list[tuple[float, int, str, int | None, int]] = []  # (due, seq, step, item, generation)
        self._seq = 0
        self._changes: list[Change] = []
        self._actions: list[Action] = []
        self._values: dict[str, Any] = {}
        self._restored_items: dict[str, dict[int, ItemRecord]] = {}
        # results of eager attempts that came before their dependencies' (see on_result)
        self._deferred: dict[str, tuple[int, Outcome, bool]] = {}
        self._decisions: dict[str, ApprovalRecord] = {}  # approval decisions known, not yet applied
        self._wall = 0.0
        self._wall_offset: float | None = None  # time of day minus the driver's monotonic clock
        self.budget = budget if budget is not None else workflow.budget
        # a budget of starts is kept exactly: a step is submitted only once it may start
        self._eager = self.budget is None or (self.budget.max_steps is None and self.budget.max_attempts is None)
        self.prices = prices or {}
        self.usage = Usage()
        self._session_start = 0.0
        self._usage_at = float("-inf")
        self._usage_sent: dict[str, Any] = {}
        self._exceeded: tuple[str, float, float, str] | None = None  # budget name, limit, used, what
        self.budget_error: str | None = None
        self.cancelled = False
        self._first_error: str | None = None
        self._now = 0.0

    # -- what the driver asks ------------------------------------------------------------------

    def take_changes(self) -> list[Change]:
        changes, self._changes = self._changes, []
        return changes

    @property
    def finished(self) -> bool:
        return self._unfinished == 0

    def next_deadline(self) -> float | None:
        """When :meth:`on_time` has something to do next (a retry due), or None."""
        return self._retries[0][0] if self._retries else None

    def in_flight(self) -> list[int]:
        return list(self.tokens)

    def current(self, token: int) -> bool:
        """Whether ``token``'s attempt still counts: not stopped, nor superseded (a dependency it
        was submitted against failed, or the run ended), so its outcome would be decided."""
        attempt = self.tokens.get(token)
        if attempt is None:
            return False
        state = self.states[attempt.step_id]
        return attempt.generation == state.generation and state.status not in FINAL_STEP_STATUSES

    @property
    def parked(self) -> bool:
        """Nothing is in flight or due, and approval gates wait: the run waits for people, and
        its coordinator may stop until a decision comes (or a gate's timeout passes)."""
        return (
            not self.tokens
            and not self._retries
            and not self.cancelled
            and self._unfinished > 0
            and any(s.status == StepStatus.WAITING for s in self._gates)
        )

    def waiting_gates(self) -> list[str]:
        return [s.step.id for s in self._gates if s.status == StepStatus.WAITING]

    def gate_deadline(self, step_id: str) -> float | None:
        """When the gate's timeout passes (wall clock), or None."""
        state = self.states[step_id]
        spec = state.step.approval
        if spec is None or spec.timeout is None or state.gate_opened_at is None:
            return None
        return state.gate_opened_at + spec.timeout

    def verdict(self) -> RunVerdict:
        if self.parked:
            return RunVerdict(RunStatus.WAITING, None, "run.waiting")
        if self.cancelled:
            return RunVerdict(RunStatus.CANCELLED, "the run was cancelled", "run.cancelled")
        if all(s.status == StepStatus.SUCCEEDED for s in self.states.values()):
            return RunVerdict(RunStatus.SUCCEEDED, None, "run.succeeded")  # a budget passed by the last step
        if self.budget_error is not None:
            return RunVerdict(RunStatus.FAILED, self.budget_error, "run.failed")
        return RunVerdict(RunStatus.FAILED, self._first_error or "a step did not succeed", "run.failed")

    def outputs(self) -> dict[str, Any]:
        return {sid: self._value(sid) for sid, s in self.states.items() if s.status == StepStatus.SUCCEEDED}

    def step_status(self, step_id: str) -> StepStatus:
        return self.states[step_id].status

    def items_progress(self, step_id: str) -> tuple[int, int]:
        state = self.states[step_id]
        return len(state.items) - state.items_left, len(state.items)

    # -- events --------------------------------------------------------------------------------

    def restore(self, steps: Iterable[StepRecord], items: Iterable[ItemRecord] = ()) -> int:
        """A resumed run: what the store holds. Succeeded steps are done; the committed items of
        the others are not run again. Returns how many steps were already done."""
        done = 0
        for record in steps:
            state = self.states.get(record.step_id)
            if state is None:
                continue
            state.attempts = record.attempts
            if record.status == StepStatus.WAITING and state.step.approval is not None:
                state.gate_opened_at = record.started_at
            if record.status == StepStatus.SUCCEEDED:
                state.status = StepStatus.SUCCEEDED
                self._unfinished -= 1
                state.output_json = record.output_json or "null"
                done += 1
        for item in items:
            if item.step_id in self.states and self.states[item.step_id].status != StepStatus.SUCCEEDED:
                self._restored_items.setdefault(item.step_id, {})[item.index] = item
        return done

    def restore_usage(self, data: dict[str, Any]) -> None:
        """What earlier sessions of the run used (the last ``run.usage`` event's data)."""
        self.usage = Usage.of(data)
        # a model priced since (the error said to) no longer stops the run
        self.usage.unpriced = [m for m in self.usage.unpriced if m not in self.prices]
        self._usage_sent = self.usage.data(self.usage.seconds)

    def start(self, now: float, resumed: bool = False, already_done: int = 0, wall: float = 0.0) -> list[Action]:
        """``now``: the driver's monotonic clock; ``wall``: the time of day (approval deadlines)."""
        self._now = now
        self._wall = wall
        if wall:
            self._wall_offset = wall - now
        self._session_start = now
        if resumed:
            self._changes.append(
                RunChange(
                    self.run_id, RunStatus.RUNNING, "run.resumed", data={"already_done": already_done}, at=self._at()
                )
            )
        else:
            self._changes.append(RunChange(self.run_id, RunStatus.RUNNING, "run.started", at=self._at()))
        for state in self.states.values():
            if state.status == StepStatus.SUCCEEDED:
                state.available = True
                self._actions.append(Publish(state.step.id, state.output_json or "null"))
        for step_id in self.graph.order:
            self._try_submit(step_id)
        self._enforce_budget()
        return self._take_actions()

    def on_result(self, token: int, outcome: Outcome, now: float, *, node_lost: bool = False) -> list[Action]:
        """An attempt finished (``node_lost``: it died with its Ray node). Unknown or stale tokens
        are ignored."""
        self._now = now
        attempt = self.tokens.pop(token, None)
        if attempt is None:
            return []
        self._count_usage(outcome)
        state = self.states[attempt.step_id]
        if attempt.index is not None and attempt.index < len(state.items):
            item = state.items[attempt.index]
            if item.token == token:
                item.token = None
                state.in_flight -= 1
        elif state.token == token:
            state.token = None
        if attempt.generation != state.generation or state.status in (
            StepStatus.FAILED,
            StepStatus.SKIPPED,
            StepStatus.CANCELLED,
        ):
            self._refill(state)
            self._enforce_budget()
            return self._take_actions()
        if node_lost:
            unit: _StepState | _Item = state if attempt.index is None else state.items[attempt.index]
            if unit.node_losses < MAX_NODE_LOSSES:
                unit.node_losses += 1
            else:
                node_lost = False
        if attempt.index is None and state.status == StepStatus.PENDING and not outcome.skipped:
            # Ray ran it (or failed it) before this scheduler saw all its dependencies succeed
            # (they finished in the same sweep, handled after it): it is decided once they have.
            self._deferred[state.step.id] = (attempt.generation, outcome, node_lost)
            self._enforce_budget()
            return self._take_actions()
        self._decide(state, attempt.index, outcome, node_lost)
        self._enforce_budget()
        return self._take_actions()

    def _decide(self, state: _StepState, index: int | None, outcome: Outcome, node_lost: bool) -> None:
        outcome = limit_outcome(outcome, self.max_output_bytes)
        if index is not None:
            self._on_item_result(state, index, outcome, node_lost)
        elif outcome.skipped:
            state.submitted = False
            state.available = False
            if state.status == StepStatus.RUNNING:
                state.status = StepStatus.PENDING
        elif outcome.ok:
            self._succeed(state, outcome.output_json or "null", outcome.logs, outcome.duration)
        else:
            self._on_failure(state, outcome, None, node_lost)

    def on_decision(self, decision: ApprovalRecord, now: float) -> list[Action]:
        """A person decided at an approval gate (or the gate's timeout decided for them)."""
        self._now = now
        state = self.states.get(decision.step_id)
        if state is None or state.step.approval is None or state.status in FINAL_STEP_STATUSES:
            return []
        if state.status != StepStatus.WAITING:
            self._decisions[decision.step_id] = decision  # applied when the gate opens
            return []
        self._decide_gate(state, decision)
        self._enforce_budget()
        return self._take_actions()

    def on_time(self, now: float, wall: float | None = None) -> list[Action]:
        """Time passed: submit the retries that are due; apply the timeouts of approval gates
        (``wall``: the time of day); tell how far running for_each steps are."""
        self._now = now
        if wall is not None:
            self._wall = wall
            self._wall_offset = wall - now
            for state in self._gates:
                deadline = self.gate_deadline(state.step.id) if state.status == StepStatus.WAITING else None
                if deadline is not None and wall >= deadline:
                    self._gate_timed_out(state)
        while self._retries and self._retries[0][0] <= now:
            _, _, step_id, index, generation = heapq.heappop(self._retries)
            state = self.states[step_id]
            if state.status != StepStatus.RETRYING or generation != state.generation:
                continue
            if index is None:
                state.status = StepStatus.PENDING
                self._try_submit(step_id)
            else:
                state.waiting.append(index)
                state.status = StepStatus.RUNNING
                self._refill(state)
                if state.waiting or any(e[2] == step_id for e in self._retries):
                    state.status = StepStatus.RETRYING
        for state in self._fan_outs:
            self._item_progress(state)
        limit = self.budget.max_seconds if self.budget is not None else None
        if limit is not None and self._seconds() > limit and self._exceeded is None:
            self._exceeded = ("max_seconds", limit, self._seconds(), "has run for (seconds)")
        self._enforce_budget()
        self._usage_event()
        return self._take_actions()

    def cancel(self, reason: str = "cancelled") -> list[Action]:
        """Stop every attempt in flight; mark the unfinished steps cancelled."""
        self.cancelled = True
        for token in list(self.tokens):
            self._actions.append(Stop(token))
        self.tokens.clear()
        self._retries.clear()
        for state in self.states.values():
            if state.status not in FINAL_STEP_STATUSES:
                self._change(state, StepStatus.CANCELLED, "step.cancelled", data={"reason": reason})
        return self._take_actions()

    def finish(self) -> RunVerdict:
        """The run's final change (queued) and verdict; call once every step is final or after cancel."""
        verdict = self.verdict()
        self._usage_event(force=True)
        data = {"steps": self.waiting_gates()} if verdict.status == RunStatus.WAITING else {}
        self._changes.append(
            RunChange(self.run_id, verdict.status, verdict.event, error=verdict.error, data=data, at=self._at())
        )
        return verdict

    # -- internals -----------------------------------------------------------------------------

    def _take_actions(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

    def _token(self, step_id: str, generation: int, index: int | None) -> int:
        self._next_token += 1
        self.tokens[self._next_token] = Attempt(step_id, generation, index)
        return self._next_token

    def _change(self, state: _StepState, status: StepStatus, event: str, **kw: Any) -> None:
        if status in FINAL_STEP_STATUSES and state.status not in FINAL_STEP_STATUSES:
            self._unfinished -= 1
        state.status = status
        self._changes.append(StepChange(self.run_id, state.step.id, status, event, at=self._at(), **kw))

    def _at(self) -> float | None:
        """The time of day of the moment being decided (the driver's clocks), or None before it gave one."""
        return None if self._wall_offset is None else self._now + self._wall_offset

    def _value(self, step_id: str) -> Any:
        if step_id not in self._values:
            self._values[step_id] = json.loads(self.states[step_id].output_json or "null")
        return self._values[step_id]

    def _deps_succeeded(self, step_id: str) -> bool:
        return all(self.states[d].status == StepStatus.SUCCEEDED for d in self.graph.deps[step_id])

    @staticmethod
    def needs_values(step: Step) -> bool:
        return step.for_each is not None or step.cache or step.kind in ("agent", "route")

    def _context(self, step: Step, item: Any = None, has_item: bool = False) -> Context:
        outputs = {d: self._value(d) for d in self.graph.deps[step.id]}
        return Context(self.inputs, outputs, item, has_item)

    def _arguments(self, step: Step) -> dict[str, Any]:
        """What a step's call resolves: a container step's spec, else its ``with`` mapping."""
        return step.container.model_dump() if step.container is not None else step.with_

    def _mark_running(self, state: _StepState) -> bool:
        """The step starts (an attempt, unless its calls are counted one by one); False when its
        budget does not admit it (the run then stops)."""
        if not self._admit(new_step=state.attempts == 0, attempt=not self.needs_values(state.step)):
            return False
        state.attempts += 1
        state.started_at = self._now
        self._change(state, StepStatus.RUNNING, "step.started", attempts=state.attempts)
        return True

    # -- budget --

    def _seconds(self) -> float:
        return self.usage.seconds + max(0.0, self._now - self._session_start)

    def _admit(self, new_step: bool, attempt: bool) -> bool:
        if self._exceeded is not None:
            return False
        budget = self.budget
        if budget is not None:
            if new_step and budget.max_steps is not None and self.usage.steps >= budget.max_steps:
                self._exceeded = ("max_steps", budget.max_steps, self.usage.steps + 1, "would start step number")
                return False
            if attempt and budget.max_attempts is not None and self.usage.attempts >= budget.max_attempts:
                self._exceeded = (
                    "max_attempts",
                    budget.max_attempts,
                    self.usage.attempts + 1,
                    "would start attempt number",
                )
                return False
        self.usage.steps += int(new_step)
        self.usage.attempts += int(attempt)
        return True

    def _count_usage(self, outcome: Outcome) -> None:
        usage = outcome.extra.get("usage") if outcome.extra else None
        if not isinstance(usage, dict):
            return
        tokens = count_tokens(usage)
        self.usage.tokens += tokens
        cost, unpriced = estimate_cost(usage, self.prices)
        self.usage.cost_usd += cost
        self.usage.unpriced.extend(model for model in unpriced if model not in self.usage.unpriced)
        budget = self.budget
        if budget is None or self._exceeded is not None:
            return
        if budget.max_tokens is not None and self.usage.tokens > budget.max_tokens:
            self._exceeded = ("max_tokens", budget.max_tokens, self.usage.tokens, "used tokens")
        elif budget.max_cost_usd is not None and self.usage.unpriced:
            self._exceeded = ("max_cost_usd", budget.max_cost_usd, -1, "used models without a price: ")
        elif budget.max_cost_usd is not None and self.usage.cost_usd > budget.max_cost_usd:
            self._exceeded = ("max_cost_usd", budget.max_cost_usd, self.usage.cost_usd, "spent (USD, estimated)")

    def _enforce_budget(self) -> None:
        """Past a budget: stop what is in flight, cancel what is unfinished, fail the run saying why."""
        if self._exceeded is None or self.budget_error is not None:
            return
        name, limit, used, what = self._exceeded
        if used < 0:
            self.budget_error = (
                f"budget reached: {name} {limit:g} cannot be kept, the run {what}{', '.join(self.usage.unpriced)}; "
                "set their prices in the model_prices setting (FACTORY_MODEL_PRICES)"
            )
        else:
            self.budget_error = (
                f"budget reached: {name} is {limit:g} and the run {what} {used:g}; "
                f"`factory resume {self.run_id} --budget {name}=N` continues it with a larger one"
            )
        self._changes.append(
            EventChange(
                self.run_id,
                None,
                "run.budget_exceeded",
                {"budget": name, "limit": limit, "used": used, "usage": self.usage.data(self._seconds())},
            )
        )
        for token in list(self.tokens):
            self._actions.append(Stop(token))
        self.tokens.clear()
        self._retries.clear()
        self._deferred.clear()
        for state in self.states.values():
            if state.status not in FINAL_STEP_STATUSES:
                self._change(state, StepStatus.CANCELLED, "step.cancelled", data={"reason": f"budget {name} reached"})

    def _usage_event(self, force: bool = False) -> None:
        """What the run used so far, as a ``run.usage`` event (when it changed; at most every
        USAGE_EVENT_SECONDS unless ``force``): a resumed run counts on from it."""
        if not force and self.budget is None and not self.usage.tokens:
            return  # without a budget: once per session (at its end), what a later --budget counts on
        if not force and self._now - self._usage_at < USAGE_EVENT_SECONDS:
            return
        data = self.usage.data(self._seconds())
        if data == self._usage_sent:
            return
        self._usage_at, self._usage_sent = self._now, data
        self._changes.append(EventChange(self.run_id, None, "run.usage", data))

    def _try_submit(self, step_id: str) -> None:
        """Submit the step if it can go; a step submitted eagerly lets its dependants go too (a
        chain after a retry, or after a for_each, is submitted at once, as at the start)."""
        work = [step_id]
        while work:
            current = work.pop()
            if self._submit_if_ready(current) and self._eager:
                work.extend(reversed(self.graph.dependants.get(current, [])))

    def _submit_if_ready(self, step_id: str) -> bool:
        """Whether the step was submitted as an attempt of its own (:class:`SubmitStep`)."""
        state = self.states[step_id]
        if state.submitted or state.status in FINAL_STEP_STATUSES or state.status == StepStatus.RETRYING:
            return False
        deps = self.graph.deps[step_id]
        if not all(self.states[d].available for d in deps):
            return False
        if state.step.approval is not None:
            if state.status != StepStatus.WAITING and self._deps_succeeded(step_id):
                self._open_gate(state)
            return False
        if self.needs_values(state.step):
            if self._deps_succeeded(step_id):
                self._submit_with_values(state)
            return False
        ready = self._deps_succeeded(step_id)
        if not ready and (not self._eager or len(self.tokens) >= self.max_ahead):
            return False  # submitted when its dependencies succeeded (see _succeed)
        if ready and not self._mark_running(state):
            return False  # its budget does not admit it: not started at all (the run stops)
        state.submitted = True
        state.available = True
        state.token = self._token(step_id, state.generation, None)
        self._actions.append(SubmitStep(state.token, step_id))
        return True

    def _submit_with_values(self, state: _StepState) -> None:
        step = state.step
        if not self._mark_running(state):
            return
        state.submitted = True
        try:
            if step.for_each is not None:
                values = resolve(step.for_each, self._context(step))
                if not isinstance(values, list):
                    raise StepInputError(f"for_each needs a list, but {step.for_each} is a {type(values).__name__}")
                if len(values) > self.max_for_each_items:
                    raise StepInputError(
                        f"for_each over {len(values)} items; the limit is {self.max_for_each_items} "
                        "(FACTORY_MAX_FOR_EACH_ITEMS): split the list, or batch items into one call each"
                    )
            else:
                values = [None]
        except Exception as exc:  # noqa: BLE001 - user data; reported on the step
            self._fail_step(state, f"{type(exc).__name__}: {exc}", logs="")
            return
        state.values = values
        state.items = [_Item() for _ in values]
        state.items_left = len(values)
        state.next_index = 0
        restored = self._restored_items.pop(step.id, {})
        if step.for_each is not None:
            for index, record in restored.items():
                if record.total == len(values) and index < len(values):
                    item = state.items[index]
                    item.done, item.output_json, item.logs = True, record.output_json, record.logs
                    item.attempts, item.cached = record.attempts, record.cached
                    state.items_left -= 1
        if state.items_left == 0:
            self._finish_items(state)
            return
        self._refill(state)
        if state.status in _ACTIVE and state.items_left == 0:
            self._finish_items(state)
        elif state.status in _ACTIVE:
            self._item_progress(state, force=True)

    # -- approval gates --

    def _open_gate(self, state: _StepState) -> None:
        spec = state.step.approval
        assert spec is not None
        state.submitted = True
        try:
            message = resolve(spec.message, self._context(state.step))
        except Exception as exc:  # noqa: BLE001 - user data; reported on the step
            state.attempts += 1
            self._fail_step(state, f"approval.message: {type(exc).__name__}: {exc}", logs="")
            return
        resumed = state.gate_opened_at is not None
        if state.gate_opened_at is None:
            state.gate_opened_at = self._wall
        state.started_at = self._now
        deadline = self.gate_deadline(state.step.id)
        self._change(
            state,
            StepStatus.WAITING,
            "step.waiting",
            data={
                "message": (message if isinstance(message, str) else json.dumps(message, default=str))[
                    :MAX_GATE_MESSAGE
                ],
                "approvers": spec.approvers,
                "deadline": deadline,
                "on_timeout": spec.on_timeout,
                **({"resumed": True} if resumed else {}),
            },
        )
        decision = self._decisions.pop(state.step.id, None)
        if decision is not None:
            self._decide_gate(state, decision)
        elif deadline is not None and self._wall >= deadline:
            self._gate_timed_out(state)

    def _gate_timed_out(self, state: _StepState) -> None:
        """The decision of the timeout is proposed, not taken: the driver records it unless a
        person decided first, and hands back the decision that stands."""
        spec = state.step.approval
        assert spec is not None and spec.timeout is not None
        if state.timeout_proposed:
            return
        state.timeout_proposed = True
        self._actions.append(
            ProposeDecision(
                ApprovalRecord(
                    run_id=self.run_id,
                    step_id=state.step.id,
                    approved=spec.on_timeout == "approve",
                    by=TIMEOUT,
                    comment=f"no decision within {spec.timeout:g}s",
                    decided_at=(state.gate_opened_at or self._wall) + spec.timeout,
                )
            )
        )

    def _decide_gate(self, state: _StepState, decision: ApprovalRecord) -> None:
        spec = state.step.approval
        assert spec is not None
        state.attempts = max(state.attempts, 1)
        timed_out = decision.by == TIMEOUT
        if timed_out and spec.on_timeout == "fail":
            self._fail_step(state, f"no decision within its timeout of {spec.timeout or 0:g}s (on_timeout: fail)", "")
            return
        output = {
            "approved": decision.approved,
            "by": decision.by,
            "comment": decision.comment,
            "decided_at": decision.decided_at,
            "timed_out": timed_out,
        }
        self._changes.append(
            EventChange(
                self.run_id,
                state.step.id,
                "step.approved" if decision.approved else "step.rejected",
                {"by": decision.by, "comment": decision.comment, "timed_out": timed_out},
            )
        )
        if not decision.approved and spec.on_reject == "fail":
            why = f": {decision.comment}" if decision.comment else ""
            self._fail_step(state, f"rejected by {decision.by}{why}", logs="")
            return
        waited = max(0.0, decision.decided_at - (state.gate_opened_at or decision.decided_at))
        self._succeed(state, json.dumps(output), "", waited)

    def _refill(self, state: _StepState) -> None:
        """Submit this step's items due again, then new ones, while fewer than the limit are in flight."""
        if state.status not in _ACTIVE or not state.items:
            return
        while state.in_flight < self.max_items_in_flight and state.status in _ACTIVE and self._exceeded is None:
            if state.waiting:
                index = state.waiting.pop(0)
            else:
                while state.next_index < len(state.items) and state.items[state.next_index].done:
                    state.next_index += 1
                if state.next_index >= len(state.items):
                    return
                index = state.next_index
                state.next_index += 1
            self._submit_item(state, index)

    def _submit_item(self, state: _StepState, index: int) -> None:
        step = state.step
        has_item = step.for_each is not None
        value = state.values[index] if has_item else None
        item = state.items[index]
        try:
            arguments = resolve(self._arguments(step), self._context(step, value, has_item))
            route_text: str | None = None
            if step.route is not None:
                text = resolve(step.route.text, self._context(step, value, has_item))
                route_text = text if isinstance(text, str) else json.dumps(text, default=str)
        except StepInputError as exc:
            item.attempts += 1
            self._on_item_result(
                state,
                index,
                Outcome(ok=False, error=str(exc), error_type="factory.errors.StepInputError"),
                False,
            )
            return
        except Exception as exc:  # noqa: BLE001 - user data; reported on the step
            item.attempts += 1
            self._on_item_result(state, index, Outcome(ok=False, error=f"{type(exc).__name__}: {exc}"), False)
            return
        if not self._admit(new_step=False, attempt=True):
            state.waiting.insert(0, index)  # not started: the run stops (budget)
            return
        cacheable = step.cache and item.attempts == 0
        item.attempts += 1
        item.token = self._token(step.id, state.generation, index)
        state.in_flight += 1
        self._actions.append(SubmitCall(item.token, step.id, index, arguments, value, has_item, route_text, cacheable))

    def _on_item_result(self, state: _StepState, index: int, outcome: Outcome, node_lost: bool) -> None:
        step = state.step
        item = state.items[index]
        if outcome.ok:
            item.done = True
            item.output_json = outcome.output_json or "null"
            item.logs = outcome.logs
            item.cached = bool(outcome.extra.get("cached"))
            state.items_left -= 1
            if step.for_each is not None:
                self._changes.append(
                    ItemChange(
                        self.run_id,
                        step.id,
                        index,
                        len(state.items),
                        item.output_json,
                        item.attempts,
                        item.logs,
                        item.cached,
                    )
                )
            if state.items_left == 0:
                self._finish_items(state)
            else:
                self._refill(state)
                self._item_progress(state)
            return
        self._on_failure(state, outcome, index, node_lost)
        self._refill(state)

    def _item_progress(self, state: _StepState, force: bool = False) -> None:
        """A ``step.items`` event (done, total) for a running for_each step, at most every
        ITEM_PROGRESS_SECONDS: how far it is, for those who watch."""
        if state.step.for_each is None or not state.items or state.status not in _ACTIVE:
            return
        total = len(state.items)
        done = total - state.items_left
        if done == state.progress_done or (not force and self._now - state.progress_at < ITEM_PROGRESS_SECONDS):
            return
        state.progress_at, state.progress_done = self._now, done
        self._changes.append(EventChange(self.run_id, state.step.id, "step.items", {"done": done, "total": total}))

    def _finish_items(self, state: _StepState) -> None:
        step = state.step
        if step.for_each is not None:
            output_json = "[" + ",".join(item.output_json or "null" for item in state.items) + "]"
        else:
            output_json = state.items[0].output_json or "null"
        all_cached = bool(state.items) and all(item.cached for item in state.items)
        logs = "\n".join(
            (f"[item {i}] " if step.for_each is not None else "") + item.logs
            for i, item in enumerate(state.items)
            if item.logs and not item.cached
        )
        state.attempts = max([state.attempts] + [item.attempts for item in state.items])
        what = "the list of its items' outputs" if step.for_each is not None else "the step's output"
        whole = limit_outcome(Outcome(ok=True, output_json=output_json), self.max_output_bytes, what)
        if not whole.ok:  # each item fits, all of them together do not (or a result cached before the limit)
            self._fail_step(state, f"{whole.error} (not retried: fix the input or the code)", logs)
            return
        state.values = []
        self._succeed(state, output_json, logs, self._now - state.started_at, cached=all_cached)

    def _succeed(self, state: _StepState, output_json: str, logs: str, duration: float, cached: bool = False) -> None:
        state.output_json = output_json
        self._values.pop(state.step.id, None)
        if not state.available or self.needs_values(state.step):
            self._actions.append(Publish(state.step.id, output_json))
        state.available = True
        self._change(
            state,
            StepStatus.SUCCEEDED,
            "step.cached" if cached else "step.succeeded",
            attempts=state.attempts,
            output_json=output_json,
            cached=cached,
            attempt_logs=logs,
            attempt_duration=duration,
            data={"duration": round(duration, 6)},
        )
        for dependant in self.graph.dependants.get(state.step.id, []):
            dep_state = self.states[dependant]
            if dep_state.submitted:
                if (
                    dep_state.status == StepStatus.PENDING
                    and self._deps_succeeded(dependant)
                    and self._mark_running(dep_state)
                ):
                    deferred = self._deferred.pop(dependant, None)
                    if deferred is not None and deferred[0] == dep_state.generation:
                        self._decide(dep_state, None, deferred[1], deferred[2])
            else:
                self._try_submit(dependant)

    def _supersede(self, step_id: str) -> None:
        """Dependants submitted against an attempt that failed: forget them, they go again later."""
        for desc in self.graph.descendants(step_id):
            state = self.states[desc]
            if state.status in FINAL_STEP_STATUSES:
                continue
            state.generation += 1
            self._deferred.pop(desc, None)
            state.submitted = False
            state.available = False
            state.token = None
            if state.status == StepStatus.RUNNING:
                state.status = StepStatus.PENDING

    def _stop_items(self, state: _StepState) -> None:
        for item in state.items:
            if item.token is not None:
                self.tokens.pop(item.token, None)
                self._actions.append(Stop(item.token))
                item.token = None
        state.in_flight = 0
        state.waiting.clear()

    def _fail_step(self, state: _StepState, error: str, logs: str, duration: float = 0.0) -> None:
        step_id = state.step.id
        self._supersede(step_id)
        state.available = False
        self._change(
            state,
            StepStatus.FAILED,
            "step.failed",
            attempts=state.attempts,
            error=error,
            attempt_logs=logs,
            attempt_duration=duration,
        )
        if self._first_error is None:
            self._first_error = f"step {step_id!r} failed: {error}"
        for desc in self.graph.descendants(step_id):
            desc_state = self.states[desc]
            if desc_state.status not in FINAL_STEP_STATUSES:
                self._change(desc_state, StepStatus.SKIPPED, "step.skipped", data={"because": step_id})
        self._stop_items(state)
        state.values = []

    def _on_failure(self, state: _StepState, outcome: Outcome, index: int | None, node_lost: bool) -> None:
        """``node_lost``: the attempt died with its Ray node; it runs again at once on the nodes
        that remain, whatever the step's retry policy (the step itself did not fail)."""
        step = state.step
        attempts = state.items[index].attempts if index is not None else state.attempts
        label = f"item {index}: " if index is not None and step.for_each is not None else ""
        error = f"{label}{outcome.error}"
        if node_lost or (outcome.retryable and attempts < step.retry.max_attempts):
            delay = 0.0 if node_lost else backoff_delay(step.retry, attempts, self.rng)
            self._seq += 1
            heapq.heappush(self._retries, (self._now + delay, self._seq, step.id, index, state.generation))
            if index is None:
                self._supersede(step.id)
                state.available = False
                state.submitted = False
            self._change(
                state,
                StepStatus.RETRYING,
                "step.retrying",
                attempts=state.attempts if index is None else None,
                error=error,
                attempt_logs=outcome.logs if index is None else None,
                attempt_duration=outcome.duration,
                data={
                    "delay": round(delay, 3),
                    "attempt": attempts,
                    **({"item": index} if index is not None else {}),
                    **({"node_lost": True} if node_lost else {}),
                },
            )
            return
        if not outcome.retryable:
            error += " (not retried: fix the input or the code)"
        elif step.retry.max_attempts > 1:
            error += f" (gave up after {attempts} attempts)"
        self._fail_step(state, error, outcome.logs, outcome.duration)

    # -- progress ------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Steps by status, and items done / total of running for_each steps."""
        counts: dict[str, int] = {"total": len(self.states), "items_done": 0, "items_total": 0}
        for state in self.states.values():
            counts[state.status.value] = counts.get(state.status.value, 0) + 1
            if state.step.for_each is not None and state.items and state.status in _ACTIVE:
                counts["items_total"] += len(state.items)
                counts["items_done"] += len(state.items) - state.items_left
        return counts
