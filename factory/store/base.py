"""The store's records and the Protocol every backend implements."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, Field


class RunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"  # parked at approval gates: nothing runs until a decision (or a gate's timeout)
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"  # an approval gate, open: waiting for a person's decision
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


FINAL_RUN_STATUSES = {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED}
FINAL_STEP_STATUSES = {StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.CANCELLED}


class RunGrants(BaseModel):
    """What a run may use, decided when it was submitted and kept with it.

    A run started on this machine (``factory run``) has no grants record: whoever can run
    the CLI here can run code here. A run submitted over the API carries one, and the
    coordinator and its workers hold the run to it.
    """

    principal: str = Field(description="Who started the run: key:<id>, or local.")
    modules: list[str] | None = Field(
        default=None, description="Modules (or package prefixes) python steps may import; None: any."
    )
    secrets: list[str] | None = Field(default=None, description="Secret names container steps may use; None: any.")
    host_mounts: bool = Field(default=False, description="Container steps may mount files of the workflow's folder.")
    workflow_ref: str | None = Field(default=None, description="name@version of the registered workflow, if any.")
    schedule: str | None = Field(default=None, description="The schedule that started the run, if any.")

    def allows_module(self, module: str) -> bool:
        return self.modules is None or any(module == m or module.startswith(m + ".") for m in self.modules)


class RunRecord(BaseModel):
    id: str
    workflow_name: str
    status: RunStatus
    spec_json: str
    inputs: dict[str, Any]
    error: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    owner: str | None = None
    heartbeat_at: float | None = None
    cancel_requested: bool = False
    grants: RunGrants | None = None


class StepRecord(BaseModel):
    run_id: str
    step_id: str
    status: StepStatus
    attempts: int = 0
    output_json: str | None = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    cached: bool = False
    items_done: int = Field(default=0, description="for_each steps: items whose output is committed.")
    items_total: int = Field(default=0, description="for_each steps: items in the list (0 before it is known).")

    @property
    def output(self) -> Any:
        return None if self.output_json is None else json.loads(self.output_json)


class ItemRecord(BaseModel):
    """A for_each item whose output is committed: a resumed run does not run it again."""

    run_id: str
    step_id: str
    index: int
    total: int  # the length of the list this item belongs to
    output_json: str
    attempts: int = 1
    logs: str = ""
    cached: bool = False


class ApprovalRecord(BaseModel):
    """A person's decision at an approval gate (the first one recorded stands)."""

    run_id: str
    step_id: str
    approved: bool
    by: str = Field(description="Who decided: key:NAME, local, or timeout.")
    comment: str = ""
    decided_at: float


class AttemptRecord(BaseModel):
    run_id: str
    step_id: str
    attempt: int
    status: StepStatus
    error: str | None = None
    logs: str = ""
    duration: float | None = None
    finished_at: float


class ApiKeyRecord(BaseModel):
    """An API key as stored: only its hash, never the key."""

    id: str
    name: str
    key_hash: str
    scopes: list[str]
    created_at: float
    revoked: bool = False
    expires_at: float | None = None
    last_used_at: float | None = None
    secrets: list[str] = Field(default_factory=list, description="Secrets granted to the key's inline workflows.")

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class RunSummary(BaseModel):
    """A run as a list of runs shows it: no inputs or spec, its steps counted."""

    id: str
    workflow_name: str
    status: RunStatus
    error: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    started_by: str = "local"
    steps_total: int = 0
    steps_done: int = Field(default=0, description="Succeeded or skipped.")
    steps_failed: int = 0
    steps_running: int = Field(default=0, description="Running or waiting to retry.")


class RegisteredWorkflow(BaseModel):
    """A workflow an operator registered: keys start it by name; its code is the operator's."""

    name: str
    version: int = 0  # given by the store when registered
    spec_json: str
    base_dir: str | None = None
    secrets: list[str] = Field(default_factory=list, description="Secrets granted to the workflow's container steps.")
    created_at: float
    created_by: str = ""


class ScheduleRecord(BaseModel):
    """A registered workflow's schedule (factory.schedules): when its runs start, with what."""

    name: str
    workflow_name: str
    workflow_version: int
    cron: str
    timezone: str = "UTC"
    inputs: dict[str, Any] = Field(default_factory=dict)
    catchup: str = "skip"
    overlap: str = "skip"
    paused: bool = False
    paused_reason: str | None = None
    created_at: float
    created_by: str = Field(description="key:<id> whose grants its runs carry, or local.")
    after: float = Field(description="Ticks after this moment are due: when added or resumed, or the last decided.")
    last_run_id: str | None = None


class TickRecord(BaseModel):
    """One decided tick of a schedule: a run started, or why it was skipped. Unique per (schedule, tick)."""

    schedule: str
    tick: int = Field(description="Epoch seconds of the tick.")
    run_id: str | None = None
    action: str = Field(description="run or skip")
    reason: str = ""
    missed: int = Field(default=0, description="A skip standing for this many missed ticks.")
    decided_at: float
    decided_by: str = ""


@dataclass
class NewRun:
    """A run to create with a decision (the arguments of Store.create_run)."""

    run_id: str
    workflow_name: str
    spec_json: str
    inputs: dict[str, Any]
    step_ids: list[str]
    grants: RunGrants | None = None


class RouteCorrection(BaseModel):
    """A person's correction of a routing decision: ``text`` should have gone to ``agent``.
    Routers use it as a labelled example of that agent (factory.routing)."""

    id: int = 0  # given by the store
    text: str
    agent: str
    decision_id: str | None = None
    who: str = ""
    created_at: float


class Event(BaseModel):
    id: int
    run_id: str
    step_id: str | None = None
    type: str
    data: dict[str, Any] = {}
    ts: float


# an event as the store keeps it: (id, run_id, step_id, type, data as JSON text, ts)
EventRow = tuple[int, str, str | None, str, str, float]


@dataclass
class RunChange:
    """A run's new status, with the event that records it."""

    run_id: str
    status: RunStatus
    event: str
    error: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    at: float | None = None  # when it happened (time of day); None: when it is committed


@dataclass
class StepChange:
    """A step's new status, with the event that records it, and optionally a finished attempt."""

    run_id: str
    step_id: str
    status: StepStatus
    event: str
    attempts: int | None = None
    output_json: str | None = None
    error: str | None = None
    cached: bool = False
    attempt_logs: str | None = None  # set when an attempt finished: recorded in the attempts table
    attempt_duration: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    # When it happened (time of day): the step's start or end and its attempt's end. Changes are
    # committed in groups (a chain's steps end within one commit), so the commit's time would tie
    # them. None: when it is committed.
    at: float | None = None


@dataclass
class ItemChange:
    """A for_each item finished: its output is committed with the batch, without an event of its own
    (``step.items`` events tell how many are done)."""

    run_id: str
    step_id: str
    index: int
    total: int
    output_json: str
    attempts: int = 1
    logs: str = ""
    cached: bool = False


@dataclass
class EventChange:
    """An event that changes no state (e.g. ``step.items``), committed in order with the batch."""

    run_id: str
    step_id: str | None
    event: str
    data: dict[str, Any] = field(default_factory=dict)


Change = RunChange | StepChange | ItemChange | EventChange


class Store(Protocol):
    """Durable state of runs, steps, attempts, events and the step cache."""

    url: str

    def store_id(self) -> str:
        """This store's id: random, made once and kept in the store itself (table store_meta).
        Everything the store publishes outside (Redis keys) lives under it."""

    def create_run(
        self,
        run_id: str,
        workflow_name: str,
        spec_json: str,
        inputs: dict[str, Any],
        step_ids: list[str],
        grants: RunGrants | None = None,
    ) -> None: ...

    def record(self, changes: list[Change], owner: str | None = None) -> None:
        """Apply the changes and append one event each, in one transaction. With ``owner``,
        raise LeaseLostError (and change nothing) unless that coordinator still owns the runs."""

    def append_event(self, run_id: str, step_id: str | None, type: str, data: dict[str, Any]) -> None:
        """An event that changes no state (e.g. step.log lines of a running step)."""

    def claim_run(
        self,
        run_id: str,
        owner: str,
        lease_seconds: float,
        dead_owner: str | None = None,
        pending_only: bool = False,
    ) -> bool:
        """Become the run's coordinator unless another owner holds a fresh lease. ``dead_owner``:
        an owner the caller knows to be dead (factory.owner), whose lease counts as expired; the
        claim still fails if the run has another owner by now. ``pending_only``: only while the run
        is still pending, checked in the claim's own transaction (a start that came late does not
        run a run the supervisor has meanwhile failed, cancelled or started)."""

    def heartbeat(self, run_id: str, owner: str) -> bool:
        """Renew the lease; False when ``owner`` no longer holds it."""

    def release_run(self, run_id: str, owner: str) -> None: ...

    def reset_unfinished_steps(self, run_id: str) -> list[str]:
        """Before a resume: every step that has not succeeded goes back to pending."""

    def request_cancel(self, run_id: str) -> None: ...

    def clear_cancel(self, run_id: str) -> None:
        """Forget a cancel request (before an explicit resume of a cancelled run)."""

    def cancel_requested(self, run_id: str) -> bool: ...

    def get_run(self, run_id: str) -> RunRecord: ...

    def list_runs(
        self, limit: int = 20, status: RunStatus | None = None, before: tuple[float, str] | None = None
    ) -> list[RunRecord]:
        """Newest first; ``before`` = (created_at, id) of the last run of the previous page."""

    def get_steps(self, run_id: str) -> list[StepRecord]: ...

    def set_run_spec(self, run_id: str, spec_json: str) -> None:
        """Replace a run's workflow spec (a resume with a new budget); its steps stay as they are."""
        ...

    def decide_approval(self, record: ApprovalRecord) -> tuple[ApprovalRecord, bool]:
        """Record a decision unless the gate has one: returns the decision that stands and
        whether it is this one."""
        ...

    def get_approvals(self, run_id: str) -> list[ApprovalRecord]:
        """The decisions recorded for a run's gates."""
        ...

    def get_items(self, run_id: str, step_id: str | None = None) -> list[ItemRecord]:
        """Committed for_each items of a run (or of one step), by step and index."""
        ...

    def run_summaries(
        self,
        limit: int = 50,
        status: RunStatus | None = None,
        workflow: str | None = None,
        text: str | None = None,
        before: tuple[float, str] | None = None,
    ) -> list[RunSummary]:
        """Newest first, with their steps counted in the query (fast for a page of a large store).
        ``text``: a case-insensitive substring of the id, workflow name or error."""

    def run_status_counts(self) -> dict[RunStatus, int]:
        """How many runs have each status."""

    def attempts_since(self, since: float, limit: int = 50_000) -> list[AttemptRecord]:
        """Attempts finished at or after ``since`` (newest first, without their logs)."""

    def event_times(self, since: float, types: list[str], scan: int = 200_000) -> list[tuple[float, str]]:
        """(ts, type) of the events of these types since ``since``, among the newest ``scan`` events."""

    def get_attempts(self, run_id: str, step_id: str | None = None, limit: int | None = None) -> list[AttemptRecord]:
        """Oldest first; with ``limit``, only the newest ``limit`` of them."""

    def events(self, after_id: int = 0, run_id: str | None = None, limit: int = 1000) -> list[Event]: ...

    def event_rows(self, after_id: int, limit: int) -> list[EventRow]:
        """The events after ``after_id`` as stored, their data as its JSON text, in id order: for
        copying them elsewhere (the Redis publisher) without parsing them (the text as written:
        ``json.dumps`` of the event's data, so parsing it gives what :meth:`events` gives)."""

    def latest_events(self, run_id: str, type: str, limit: int = 1000) -> list[Event]:
        """The run's newest events of this type, newest first."""

    def last_event_id(self, run_id: str | None = None) -> int:
        """The newest event's id (0 when there is none); with ``run_id``, the newest of that run's
        events. Ids follow commit order, so following from it misses none of the events to come."""

    def wait_for_events(self, timeout: float) -> None:
        """Return when new events may have been appended, or after ``timeout`` seconds."""

    def create_api_key(self, record: ApiKeyRecord) -> None: ...

    def find_api_key(self, key_hash: str) -> ApiKeyRecord | None: ...

    def list_api_keys(self) -> list[ApiKeyRecord]: ...

    def revoke_api_key(self, key_id: str) -> bool: ...

    def touch_api_key(self, key_id: str, when: float) -> None:
        """Record when the key was last used."""

    def register_workflow(self, record: RegisteredWorkflow) -> RegisteredWorkflow:
        """Store the workflow as the next version of its name; returns it with its version."""

    def get_registered_workflow(self, name: str, version: int | None = None) -> RegisteredWorkflow | None:
        """That version, or the latest one."""

    def list_registered_workflows(self) -> list[RegisteredWorkflow]:
        """The latest version of every registered name."""

    def add_schedule(self, record: ScheduleRecord, max_per_owner: int | None = None) -> None:
        """Store a new schedule. ScheduleConflictError (nothing stored) if one of that name exists,
        or, with ``max_per_owner``, when its creator holds that many already."""

    def get_schedule(self, name: str) -> ScheduleRecord | None: ...

    def list_schedules(self) -> list[ScheduleRecord]:
        """Every schedule, by name."""

    def set_schedule_paused(self, name: str, paused: bool, reason: str | None, now: float) -> bool:
        """Pause (with the reason shown) or resume; a resumed schedule's ticks are due from
        ``now`` on (none of the paused time). False if there is no such schedule."""

    def remove_schedule(self, name: str) -> bool:
        """Delete the schedule and its ticks; False if there was none."""

    def decide_tick(self, tick: TickRecord, run: NewRun | None = None) -> bool:
        """Record a decision on a tick, and create its run (pending) in the same transaction.
        False, and nothing changed, when that (schedule, tick) was decided already: of several
        schedulers deciding the same tick, exactly one succeeds."""

    def schedule_ticks(self, name: str, limit: int = 50) -> list[TickRecord]:
        """The schedule's decided ticks, newest first."""

    def add_route_correction(self, record: RouteCorrection) -> RouteCorrection:
        """Store a correction; returns it with its id (ids grow with time)."""

    def route_corrections(self, after_id: int = 0, limit: int = 10_000) -> list[RouteCorrection]:
        """Corrections with an id above ``after_id``, oldest first."""

    def once_get(self, run_id: str, step_id: str, item: int, key: str) -> str | None:
        """The result a step's ``once(key, ...)`` recorded in this run (``item``: the for_each
        item's index, -1 for none), as JSON text; None when nothing is recorded."""

    def once_put(
        self, run_id: str, step_id: str, item: int, key: str, result_json: str, attempt: int, max_keys: int
    ) -> str:
        """Record a ``once()`` result unless one is recorded already; returns the recorded one
        (the first to commit wins). StepContextError when the step (item) holds ``max_keys``."""

    def cache_get(self, key: str) -> str | None: ...

    def cache_put(self, key: str, output_json: str) -> None: ...

    def close(self) -> None: ...
