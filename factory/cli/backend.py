"""What the ``factory`` commands ask of the Factory, whether it is this machine's state or
an HTTP API: one small interface, two implementations (:mod:`factory.cli.local`,
:mod:`factory.cli.remote`). Commands print what a backend returns and never ask which
one they have, so a command means the same locally and with ``--api``.

Both speak the store's records (RunRecord, StepRecord, AttemptRecord, ApiKeyRecord) and
raise :class:`factory.errors.FactoryError`; a workflow's problems are a
WorkflowValidationError either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from factory.approvals import Decision
from factory.auth import Scope
from factory.costs import RunSpend
from factory.engine import Progress, RunResult
from factory.errors import FactoryError
from factory.routing.models import RouteDecision, RouteRequest
from factory.schedules import ScheduleView, TickView
from factory.spec import Budget
from factory.store import ApiKeyRecord, ApprovalRecord, AttemptRecord, RunRecord, RunStatus, StepRecord


class RunWaitTimeout(FactoryError):
    """``run``/``resume``/``start`` reached ``--timeout`` before the run ended. ``detail`` says
    what became of the run (over the API it goes on; locally it was cancelled)."""

    retryable = True

    def __init__(self, run_id: str, timeout: float, detail: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id} did not end within {timeout:g}s: {detail}")


@dataclass(frozen=True)
class RunInfo:
    """A run as a command shows it. ``stalled``: running, but no coordinator runs it any more
    (the supervisor or ``factory resume`` takes it over). ``steps`` only from ``get_run``."""

    record: RunRecord
    stalled: bool = False
    steps: list[StepRecord] = field(default_factory=list)
    spent: RunSpend | None = None  # only from ``get_run``: all its attempts, failed ones included


@dataclass(frozen=True)
class Checked:
    """A workflow that passed validation: its name and step ids."""

    name: str
    steps: list[str]


@dataclass(frozen=True)
class Registered:
    name: str
    version: int


@dataclass(frozen=True)
class RegisteredInfo:
    name: str
    version: int
    inputs: dict[str, Any]
    secrets: list[str]
    created_at: float
    created_by: str


@dataclass
class Watch:
    """Who hears about a run while a command waits for it, and how long it waits."""

    on_start: Callable[[str], None] | None = None
    on_progress: Callable[[Progress], None] | None = None
    on_event: Callable[[dict[str, Any]], None] | None = None  # each event of the run (step.progress for the bar)
    timeout: float | None = None
    run_id: str | None = None  # `factory run --run-id` (a Ray job started by `factory submit`): use this id

    def started(self, run_id: str) -> None:
        if self.on_start is not None:
            self.on_start(run_id)

    def progress(self, counts: Progress) -> None:
        if self.on_progress is not None:
            self.on_progress(counts)

    def event(self, event: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(event)


@dataclass(frozen=True)
class RouteOptions:
    """What only a local router takes: the catalogue file, the scorer, the model folder.
    The API routes with its own; giving these with ``--api`` is an error that says so."""

    agents: Path | None = None
    scorer: str | None = None
    model_path: Path | None = None


class Backend(Protocol):
    """The Factory as the CLI sees it. ``where`` names it in messages."""

    where: str

    def validate(self, workflow: Path, inputs: dict[str, Any], agents: Path | None) -> Checked: ...

    def run(
        self, workflow: Path, inputs: dict[str, Any], agents: Path | None, watch: Watch, budget: Budget | None = None
    ) -> RunResult: ...

    def resume(self, run_id: str, agents: Path | None, watch: Watch, budget: Budget | None = None) -> RunResult: ...

    def cancel(self, run_id: str) -> bool: ...

    def approve(
        self, decision: Decision, watch: Watch | None, agents: Path | None = None
    ) -> tuple[ApprovalRecord, RunResult | None]:
        """Record a decision at a gate; with ``watch``, follow the run on to its end (or its next
        wait) when the decision lets it go on. The result is None when not followed."""
        ...

    def list_runs(self, limit: int, status: RunStatus | None) -> list[RunInfo]: ...

    def get_run(self, run_id: str) -> RunInfo: ...

    def attempts(self, run_id: str, step: str | None) -> list[AttemptRecord]: ...

    def events(self, run_id: str | None, after: int, follow: bool) -> Iterator[dict[str, Any]]: ...

    def route(self, request: RouteRequest, options: RouteOptions) -> RouteDecision: ...

    def correct_route(self, text: str, agent: str, decision_id: str | None) -> int:
        """Keep a correction (``text`` goes to ``agent``); returns its id."""
        ...

    def agents(self, catalogue: Path | None) -> dict[str, Any]: ...

    def create_key(
        self, scopes: list[Scope], name: str, expires_in: float | None, secrets: list[str]
    ) -> tuple[str, ApiKeyRecord]: ...

    def list_keys(self) -> list[ApiKeyRecord]: ...

    def revoke_key(self, key_id: str) -> bool: ...

    def register_workflow(
        self, workflow: Path, name: str | None, secrets: list[str], base_dir: str | None
    ) -> Registered: ...

    def list_workflows(self) -> list[RegisteredInfo]: ...

    def start_workflow(
        self, name: str, inputs: dict[str, Any], version: int | None, watch: Watch | None
    ) -> tuple[str, RunResult | None]: ...

    def add_schedule(self, workflow: Path, name: str | None, secrets: list[str], base_dir: str | None) -> ScheduleView:
        """Register the workflow and schedule it by its ``schedule:``."""

    def list_schedules(self) -> list[ScheduleView]: ...

    def schedule_action(self, name: str, action: Literal["pause", "resume", "remove"]) -> ScheduleView | None:
        """Pause, resume or remove a schedule; its view after (None once removed)."""

    def schedule_ticks(self, name: str, limit: int) -> list[TickView]: ...

    def close(self) -> None: ...


# Events a running step publishes without changing its state: its log lines, progress, emitted data,
# its agents' tool calls and their results.
LIVE_EVENTS = frozenset({"step.log", "step.progress", "step.emitted", "step.tool_call", "step.tool_result"})


class ProgressCounter:
    """Counts a run's events into a :class:`Progress` (as the coordinator counts them), one
    event at a time, for commands that follow a run from outside its coordinator: steps
    created, running, waiting to retry, and finished by status; a resumed run's steps that
    had committed (``run.resumed``'s ``already_done``) count as succeeded; a running
    ``for_each`` step's items from its ``step.items`` events (done, total)."""

    def __init__(self, counts: Progress | None = None) -> None:
        self.counts = counts or Progress(total=0)
        self._running: set[str] = set()
        self._retrying: set[str] = set()
        self._waiting: set[str] = set()
        self._items: dict[str, tuple[int, int]] = {}  # running for_each step -> (done, total)

    def add(self, kind: str, step: str | None, data: dict[str, Any] | None = None) -> Progress:
        counts = self.counts
        if kind == "step.created":
            counts.total += 1
        elif kind == "run.resumed":
            done = (data or {}).get("already_done")
            if isinstance(done, int) and 0 <= done <= max(counts.total, done):
                counts.succeeded = done
                counts.failed = counts.skipped = counts.cancelled = 0
        elif kind in ("step.succeeded", "step.cached"):
            counts.succeeded += 1
        elif kind == "step.failed":
            counts.failed += 1
        elif kind == "step.skipped":
            counts.skipped += 1
        elif kind == "step.cancelled":
            counts.cancelled += 1
        if step and kind == "step.items":
            done, total = (data or {}).get("done"), (data or {}).get("total")
            if isinstance(done, int) and isinstance(total, int) and 0 <= done <= total:
                self._items[step] = (done, total)
            return self._tally()
        if step and kind.startswith("step."):
            if kind in ("step.approved", "step.rejected", "step.log"):
                return self._tally()
            self._waiting.discard(step)
            if kind == "step.waiting":
                self._waiting.add(step)
            elif kind == "step.started":
                self._running.add(step)
                self._retrying.discard(step)
            elif kind == "step.retrying":
                if "item" in (data or {}):  # one item waits to retry; the step runs on
                    return self._tally()
                self._running.discard(step)
                self._retrying.add(step)
            elif kind not in LIVE_EVENTS:
                self._running.discard(step)
                self._retrying.discard(step)
                self._items.pop(step, None)
        return self._tally()

    def _tally(self) -> Progress:
        self.counts.running = len(self._running)
        self.counts.retrying = len(self._retrying)
        self.counts.waiting = len(self._waiting)
        self.counts.items_done = sum(done for done, _ in self._items.values())
        self.counts.items_total = sum(total for _, total in self._items.values())
        return self.counts
