"""Schedules: registered workflows that start by themselves on a cron schedule.

``add`` (an operator: ``factory schedules add WORKFLOW.yaml`` or ``POST /v1/schedules``
with an admin key) registers the workflow, as ``factory workflows register`` does, and
stores its ``schedule:`` (cron, timezone, inputs, catchup, overlap). Its runs carry the
grants of whoever added it: a schedule whose key is revoked or expires is paused, with
that reason, at its next tick.

The :class:`CronScheduler` (hosted by :class:`CronSchedulerActor`, a detached Ray actor that the
API starts, so ``factory up`` runs it) looks every ``scheduler_interval_seconds`` at every
schedule and asks :func:`factory.cron.decide` which ticks are due. Each decision is a row
unique per (schedule, tick), inserted in the transaction that creates the tick's run
(``Store.decide_tick``): several schedulers (API replicas, two clusters on one store, a
scheduler restarted after a crash) may decide the same tick, and exactly one of them
records it and starts its run. The scheduler keeps nothing of its own: a restarted one
carries on from the store, where the last decided tick is. A run created but not handed
to the runner (the scheduler died in between) is pending, and the supervisor starts it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from pydantic import BaseModel, Field

from factory import cron
from factory.errors import (
    FactoryError,
    RunNotFoundError,
    ScheduleConflictError,
    ScheduleNotFoundError,
    StoreUnavailableError,
    WorkflowValidationError,
)
from factory.settings import Settings
from factory.spec import Workflow
from factory.store import (
    FINAL_RUN_STATUSES,
    ApiKeyRecord,
    NewRun,
    ScheduleRecord,
    Store,
    TickRecord,
)

log = logging.getLogger(__name__)

CRON_SCHEDULER_NAME = "factory-cron"
NEXT_SHOWN = 3  # next fire times a schedule's view shows


class TickView(BaseModel):
    tick: float = Field(description="When the tick was due (epoch seconds).")
    action: str = Field(description="run or skip")
    run_id: str | None = None
    reason: str = ""
    missed: int = 0

    @classmethod
    def of(cls, t: TickRecord) -> TickView:
        return cls(tick=t.tick, action=t.action, run_id=t.run_id, reason=t.reason, missed=t.missed)


class ScheduleView(BaseModel):
    """A schedule as `factory schedules list` and ``GET /v1/schedules`` show it."""

    name: str
    workflow_ref: str = Field(description="name@version of the registered workflow it runs.")
    cron: str
    timezone: str
    inputs: dict[str, Any]
    catchup: str
    overlap: str
    state: str = Field(description="active or paused")
    paused_reason: str | None = None
    created_at: float
    created_by: str
    next_ticks: list[float] = Field(description="The next fire times (epoch seconds); none while paused.")
    last_tick: TickView | None = None

    @classmethod
    def of(cls, r: ScheduleRecord, now: float, last: TickRecord | None = None) -> ScheduleView:
        upcoming = [] if r.paused else cron.next_fire_times(r.cron, r.timezone, max(now, r.after), NEXT_SHOWN)
        return cls(
            name=r.name,
            workflow_ref=f"{r.workflow_name}@{r.workflow_version}",
            cron=r.cron,
            timezone=r.timezone,
            inputs=r.inputs,
            catchup=r.catchup,
            overlap=r.overlap,
            state="paused" if r.paused else "active",
            paused_reason=r.paused_reason,
            created_at=r.created_at,
            created_by=r.created_by,
            next_ticks=[float(t) for t in upcoming],
            last_tick=None if last is None else TickView.of(last),
        )


# -- operations: add, list, pause, resume, remove --------------------------------------------------


def check_schedulable(workflow: Workflow, settings: Settings) -> None:
    """WorkflowValidationError unless the workflow has a schedule within the bounds, whose inputs fit it."""
    from factory.api import merge_inputs
    from factory.limits import DocumentLimits

    schedule = workflow.schedule
    if schedule is None:
        raise WorkflowValidationError(
            ["field schedule: a scheduled workflow needs `schedule: {cron: '0 6 * * *', timezone: UTC}`"],
            workflow.name,
        )
    gap = cron.shortest_gap(schedule.cron, schedule.timezone, time.time())
    if gap < settings.schedule_min_interval_seconds:
        raise WorkflowValidationError(
            [
                f"field schedule.cron: {schedule.cron!r} fires {gap:g}s apart at times, more often than the "
                f"{settings.schedule_min_interval_seconds:g}s allowed (setting schedule_min_interval_seconds)"
            ],
            workflow.name,
        )
    try:
        merge_inputs(workflow, schedule.inputs, DocumentLimits.from_settings(settings))
    except WorkflowValidationError as exc:
        raise WorkflowValidationError([f"field schedule.inputs: {p}" for p in exc.problems], workflow.name) from None


def add(
    store: Store,
    settings: Settings,
    workflow: Workflow,
    *,
    principal: str,
    name: str | None = None,
    secrets: list[str] | None = None,
    now: float | None = None,
) -> ScheduleView:
    """Register ``workflow`` (validated, its ``base_dir`` vouched for by the caller) as the next
    version of ``name`` and schedule it; its first tick is the first fire time after now."""
    from factory import registry

    check_schedulable(workflow, settings)
    assert workflow.schedule is not None
    name = name or workflow.name
    if store.get_schedule(name) is not None:  # before registering a version for nothing
        raise ScheduleConflictError(
            f"a schedule named {name!r} exists already; remove it first (`factory schedules remove {name}`)"
        )
    registered = registry.register(store, workflow, name=name, secrets=secrets, created_by=principal)
    now = time.time() if now is None else now
    schedule = workflow.schedule
    record = ScheduleRecord(
        name=name,
        workflow_name=registered.name,
        workflow_version=registered.version,
        cron=schedule.cron,
        timezone=schedule.timezone,
        inputs=schedule.inputs,
        catchup=schedule.catchup,
        overlap=schedule.overlap,
        created_at=now,
        created_by=principal,
        after=now,
    )
    store.add_schedule(record, max_per_owner=settings.schedules_max_per_key)
    return ScheduleView.of(record, now)


def lookup(store: Store, name: str) -> ScheduleRecord:
    found = store.get_schedule(name)
    if found is None:
        raise ScheduleNotFoundError(f"no schedule {name!r}; `factory schedules list` shows them")
    return found


def view(store: Store, name: str, now: float | None = None) -> ScheduleView:
    record = lookup(store, name)
    last = store.schedule_ticks(name, 1)
    return ScheduleView.of(record, time.time() if now is None else now, last[0] if last else None)


def list_views(store: Store, now: float | None = None) -> list[ScheduleView]:
    now = time.time() if now is None else now
    out = []
    for record in store.list_schedules():
        last = store.schedule_ticks(record.name, 1)
        out.append(ScheduleView.of(record, now, last[0] if last else None))
    return out


def pause(store: Store, name: str, reason: str = "paused by an operator") -> ScheduleView:
    if not store.set_schedule_paused(name, True, reason, time.time()):
        lookup(store, name)
    return view(store, name)


def resume(store: Store, name: str) -> ScheduleView:
    """Active again; ticks of the paused time are not run (the next is the first after now)."""
    if not store.set_schedule_paused(name, False, None, time.time()):
        lookup(store, name)
    return view(store, name)


def remove(store: Store, name: str) -> None:
    if not store.remove_schedule(name):
        lookup(store, name)


# -- the scheduler ------------------------------------------------------------------------------


def creator_problem(principal: str, keys: dict[str, ApiKeyRecord], now: float) -> str | None:
    """Why a schedule's creator may no longer start runs, or None."""
    if not principal.startswith("key:"):
        return None
    key_id = principal.removeprefix("key:")
    key = keys.get(key_id)
    if key is None:
        return f"the key that added it ({principal}) no longer exists"
    if key.revoked:
        return f"the key that added it ({principal}) was revoked; add the schedule again with a valid admin key"
    if key.expired(now):
        return f"the key that added it ({principal}) expired; add the schedule again with a valid admin key"
    return None


class CronScheduler:
    """Decides the due ticks of every schedule and starts their runs (``start(run_id)``)."""

    def __init__(self, store: Store, settings: Settings, start: Callable[[str], None], who: str = "") -> None:
        self.store = store
        self.settings = settings
        self.start = start
        self.who = who or f"scheduler:{socket.gethostname()}:{os.getpid()}"

    def sweep(self, now: float | None = None) -> list[TickRecord]:
        """One look at every schedule; returns the decisions this scheduler recorded."""
        now = time.time() if now is None else now
        keys = {k.id: k for k in self.store.list_api_keys()}
        recorded: list[TickRecord] = []
        for schedule in self.store.list_schedules():
            if schedule.paused:
                continue
            try:
                recorded += self._sweep_one(schedule, keys, now)
            except StoreUnavailableError:
                raise  # the store, not the schedule: the next sweep tries again, nothing is paused
            except FactoryError as exc:  # the workflow or its inputs no longer fit: stop, and say why
                log.warning("schedule %s: %s; pausing it", schedule.name, exc)
                self.store.set_schedule_paused(schedule.name, True, f"could not start a run: {exc}"[:2000], now)
        return recorded

    def _sweep_one(self, schedule: ScheduleRecord, keys: dict[str, ApiKeyRecord], now: float) -> list[TickRecord]:
        problem = creator_problem(schedule.created_by, keys, now)
        if problem is not None:
            log.warning("schedule %s: %s; pausing it", schedule.name, problem)
            self.store.set_schedule_paused(schedule.name, True, problem, now)
            return []
        active = None
        last = schedule.last_run_id
        if schedule.overlap == "skip" and last:
            try:
                active = None if self.store.get_run(last).status in FINAL_RUN_STATUSES else last
            except RunNotFoundError:  # deleted since: nothing goes on
                active = None
        decisions = cron.decide(
            schedule.cron,
            schedule.timezone,
            after=schedule.after,
            now=now,
            catchup="run_once" if schedule.catchup == "run_once" else "skip",
            grace=self.settings.schedule_grace_seconds,
            previous_active=active,
            overlap="allow" if schedule.overlap == "allow" else "skip",
        )
        recorded = []
        for decision in decisions:
            run = self._new_run(schedule) if decision.action == "run" else None
            tick = TickRecord(
                schedule=schedule.name,
                tick=decision.tick,
                run_id=run.run_id if run else None,
                action=decision.action,
                reason=decision.reason,
                missed=decision.missed,
                decided_at=now,
                decided_by=self.who,
            )
            if not self.store.decide_tick(tick, run):
                continue  # another scheduler decided it
            recorded.append(tick)
            if run is not None:
                self.start(run.run_id)
        return recorded

    def _new_run(self, schedule: ScheduleRecord) -> NewRun:
        from factory import registry
        from factory.api import merge_inputs
        from factory.dag import build_graph
        from factory.engine import new_run_id
        from factory.limits import DocumentLimits
        from factory.policy import Submitter, registered_grants

        record = registry.lookup(self.store, schedule.workflow_name, schedule.workflow_version)
        limits = DocumentLimits.from_settings(self.settings)
        workflow = registry.workflow_of(record, limits)
        grants = registered_grants(record, workflow, Submitter(principal=schedule.created_by))
        grants = grants.model_copy(update={"schedule": schedule.name})
        inputs = merge_inputs(workflow, schedule.inputs, limits)
        return NewRun(
            run_id=new_run_id(),
            workflow_name=workflow.name,
            spec_json=workflow.model_dump_json(by_alias=True),
            inputs=inputs,
            step_ids=build_graph(workflow).order,
            grants=grants,
        )


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class CronSchedulerActor:
    """Runs :class:`CronScheduler` every ``scheduler_interval_seconds`` in a thread; Ray restarts it if it dies."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = Settings.model_validate(settings)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def _hand_over(self, run_id: str) -> None:
        from ray.exceptions import RayError

        from factory.runner import get_runner

        try:
            ray.get(get_runner(self.settings).start.remote(run_id, False), timeout=30)
        except (RayError, TimeoutError) as exc:  # pending: the supervisor starts it
            log.warning("scheduled run %s: no runner takes it now (%s); the supervisor will", run_id, exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.scheduler_interval_seconds):
            try:
                self.sweep()
            except Exception:
                log.warning("scheduler sweep failed; trying again", exc_info=True)

    def sweep(self, now: float | None = None) -> list[dict[str, Any]]:
        """One sweep (``now``: a moment to decide at, for tests); the decisions recorded."""
        from factory.api import store_for

        with self._lock:
            store = store_for(self.settings)
            try:
                done = CronScheduler(store, self.settings, self._hand_over).sweep(now)
            finally:
                store.close()
        return [t.model_dump(mode="json") for t in done]

    def stop(self) -> None:
        self._stop.set()


def cron_scheduler_name(settings: Settings) -> str:
    from factory.runner import runner_name

    return runner_name(settings).replace("factory-runner", CRON_SCHEDULER_NAME)


def get_cron_scheduler(settings: Settings) -> Any:
    """The scheduler of these settings' store, created on first use (one per configuration)."""
    from factory.runner import NAMESPACE

    return CronSchedulerActor.options(  # type: ignore[attr-defined]
        name=cron_scheduler_name(settings), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(settings.model_dump(mode="json", exclude={"api_key"}))
