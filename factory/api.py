"""The Python API: load, validate, run, resume and cancel workflows."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.approvals import Decision, decide
from factory.cache import RedisResultCache, ResultCache
from factory.catalog import Catalog, load_catalog
from factory.costs import RunSpend
from factory.dag import Graph, build_graph, load_workflow, validate_workflow
from factory.engine import Coordinator, Progress, RunResult, new_run_id
from factory.errors import RunStateError, WorkflowValidationError
from factory.limits import DocumentLimits, check_inputs
from factory.owner import owner_is_gone
from factory.raysession import ensure_ray
from factory.redisbus import RedisEventPublisher
from factory.settings import Settings, get_settings
from factory.spec import Budget, Workflow
from factory.store import (
    FINAL_RUN_STATUSES,
    FINAL_STEP_STATUSES,
    ApiKeyRecord,
    ApprovalRecord,
    Change,
    RunChange,
    RunGrants,
    RunRecord,
    RunStatus,
    StepChange,
    StepStatus,
    Store,
    open_store,
)

if TYPE_CHECKING:
    from factory.pools import PoolDispatcher


def store_for(settings: Settings | None = None) -> Store:
    settings = settings or get_settings()
    return open_store(
        settings.resolved_store_url(),
        pool_max=settings.postgres_pool_max,
        retry_seconds=settings.postgres_retry_seconds,
    )


def cache_for(settings: Settings, store: Store) -> ResultCache:
    """The step result cache the settings name: Redis (cache_url) or the store."""
    if settings.cache_url:
        return RedisResultCache(settings.cache_url, settings.cache_ttl_seconds)
    return store


@contextmanager
def event_publication(settings: Settings, store: Store) -> Iterator[None]:
    """While a coordinator runs: publish its events to Redis when events_url names one."""
    if not settings.events_url:
        yield
        return
    publisher = RedisEventPublisher(store, settings.events_url, settings.events_stream_maxlen).start()
    try:
        yield
    finally:
        publisher.stop()


def merge_inputs(
    workflow: Workflow, inputs: dict[str, Any] | None, limits: DocumentLimits | None = None
) -> dict[str, Any]:
    """The workflow's input defaults overridden by ``inputs``; unknown names are an error.
    With ``limits``, the inputs must be JSON data within them (factory.limits.check_inputs)."""
    given = check_inputs(inputs, limits, source=workflow.name) if limits is not None else dict(inputs or {})
    unknown = sorted(set(given) - set(workflow.inputs))
    if unknown:
        declared = ", ".join(sorted(workflow.inputs)) or "none"
        raise WorkflowValidationError(
            [f"unknown input {name!r} (declared inputs: {declared})" for name in unknown], workflow.name
        )
    return {**workflow.inputs, **given}


def create_run(
    workflow: Workflow | str | Path,
    inputs: dict[str, Any] | None = None,
    *,
    store: Store | None = None,
    settings: Settings | None = None,
    run_id: str | None = None,
    grants: RunGrants | None = None,
    check_imports: bool = True,
) -> str:
    """Record a new pending run without running it; ``resume(run_id)`` (in any process) runs it.

    ``grants``: what the run may use (a run submitted over the API; see factory.policy).
    ``check_imports=False`` validates without importing step modules (the API never imports)."""
    settings = settings or get_settings()
    limits = DocumentLimits.from_settings(settings)
    workflow = (
        validate_workflow(workflow, check_imports=check_imports, limits=limits)
        if isinstance(workflow, Workflow)
        else load_workflow(workflow, check_imports=check_imports, limits=limits)
    )
    merged = merge_inputs(workflow, inputs, limits)
    graph = build_graph(workflow)
    own_store = store is None
    store = store or store_for(settings)
    try:
        run_id = run_id or new_run_id()
        store.create_run(
            run_id, workflow.name, workflow.model_dump_json(by_alias=True), merged, graph.order, grants=grants
        )
        return run_id
    finally:
        if own_store:
            store.close()


def with_budget(workflow: Workflow, budget: Budget | None) -> Workflow:
    """The workflow with ``budget``'s limits replacing its own."""
    if budget is None:
        return workflow
    return workflow.model_copy(update={"budget": (workflow.budget or Budget()).merged(budget)})


def _agent_dispatcher(
    agents: Catalog | str | Path | None, workflow: Workflow, settings: Settings
) -> PoolDispatcher | None:
    """The engine's dispatcher for agent:/route: steps (pools live in the detached agent manager)."""
    if agents is None:
        return None
    from factory.breaker import BreakerConfig
    from factory.pools import PoolDispatcher

    return PoolDispatcher.from_catalog(
        agents, search_path=[workflow.base_dir], breaker=BreakerConfig.from_settings(settings), settings=settings
    )


@contextmanager
def _coordinator(
    store: Store,
    workflow: Workflow,
    run_id: str,
    inputs: dict[str, Any],
    settings: Settings,
    on_progress: Callable[[Progress], None] | None,
    agents: Catalog | str | Path | None,
    graph: Graph | None = None,
    grants: RunGrants | None = None,
) -> Iterator[Coordinator]:
    """A coordinator for the run, with its agent dispatcher (if the run has a catalogue) open meanwhile."""
    dispatcher = _agent_dispatcher(agents, workflow, settings)
    if dispatcher is not None:  # agents publish progress and emitted data as this run's events
        dispatcher.run_context = (store.url, run_id)
    coordinator = Coordinator(
        store,
        workflow,
        run_id,
        inputs,
        settings,
        on_progress,
        graph,
        agent_dispatcher=dispatcher,
        cache=cache_for(settings, store),
        grants=grants,
    )
    try:
        yield coordinator
    finally:
        if dispatcher is not None:
            dispatcher.close()


def run(
    workflow: Workflow | str | Path,
    inputs: dict[str, Any] | None = None,
    *,
    store: Store | None = None,
    settings: Settings | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_start: Callable[[str], None] | None = None,
    run_id: str | None = None,
    agents: Catalog | str | Path | None = None,
    validated: bool = False,
    budget: Budget | None = None,
) -> RunResult:
    """Run a workflow to the end and return its result. Joins or starts Ray as needed.

    The run is durable: if this process dies, ``resume(run_id)`` finishes it.
    ``agents`` (a Catalog or an agents.yaml path) serves the workflow's agent: and route: steps;
    the catalogue is read once. ``validated``: ``workflow`` is a Workflow that the caller
    validated already (with :func:`factory.dag.load_workflow` and this catalogue and these
    settings' limits), so it is not validated a second time. ``budget``: limits of this run,
    replacing the workflow's own where it sets them.
    """
    settings = settings or get_settings()
    catalog = agents if isinstance(agents, Catalog) or agents is None else load_catalog(agents)
    limits = DocumentLimits.from_settings(settings)
    if isinstance(workflow, Workflow):
        workflow = workflow if validated else validate_workflow(workflow, agents=catalog, limits=limits)
    else:
        workflow = load_workflow(workflow, agents=catalog, limits=limits)
    workflow = with_budget(workflow, budget)
    merged = merge_inputs(workflow, inputs, limits)
    graph = build_graph(workflow)
    own_store = store is None
    store = store or store_for(settings)
    try:
        ensure_ray(settings.ray_address)
        run_id = run_id or new_run_id()
        store.create_run(run_id, workflow.name, workflow.model_dump_json(by_alias=True), merged, graph.order)
        if on_start is not None:
            on_start(run_id)
        with _coordinator(store, workflow, run_id, merged, settings, on_progress, catalog, graph) as coordinator:
            coordinator.start()
            with event_publication(settings, store):
                return coordinator.execute()
    finally:
        if own_store:
            store.close()


def approve(
    decision: Decision,
    *,
    key: ApiKeyRecord | None = None,
    store: Store | None = None,
    settings: Settings | None = None,
) -> ApprovalRecord:
    """Record a decision at an approval gate that waits (``key`` None: the CLI on this machine).
    The run goes on when it is resumed: by the coordinator that still runs it (it polls for
    decisions), by :func:`resume`, or by the supervisor of a running Factory."""
    settings = settings or get_settings()
    own_store = store is None
    store = store or store_for(settings)
    try:
        return decide(store, decision, key)
    finally:
        if own_store:
            store.close()


def resume(
    run_id: str,
    *,
    store: Store | None = None,
    settings: Settings | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    agents: Catalog | str | Path | None = None,
    pending_only: bool = False,
    keep_cancel: bool = False,
    on_start: Callable[[str], None] | None = None,
    budget: Budget | None = None,
) -> RunResult:
    """Run a pending run, or finish one that was interrupted, failed or cancelled. Steps
    that committed their output are not run again; every other step runs (again).
    ``agents`` as for :func:`run`. With ``pending_only`` (a submitted run starting), a run
    that is no longer pending (cancelled meanwhile) is left as it is. With ``keep_cancel``
    (the supervisor adopting an orphaned run) a cancel asked earlier is not forgotten.
    ``on_start(run_id)`` is called once this process runs it (an earlier cancel cleared, the
    run ``running``): a cancel from then on stops the run. ``budget``: new limits for the
    run (kept for later resumes), replacing those it had where it sets them; what the run
    used so far still counts."""
    settings = settings or get_settings()
    own_store = store is None
    store = store or store_for(settings)
    try:
        record = store.get_run(run_id)
        if pending_only and record.status != RunStatus.PENDING:
            return RunResult(run_id, record.status, {}, f"the run is {record.status.value}, no longer pending")
        if record.status == RunStatus.SUCCEEDED:
            raise RunStateError(f"run {run_id} already succeeded; nothing to resume")
        workflow = with_budget(Workflow.model_validate_json(record.spec_json), budget)
        ensure_ray(settings.ray_address)
        with _coordinator(
            store, workflow, run_id, record.inputs, settings, on_progress, agents, grants=record.grants
        ) as coordinator:
            # an owner that died on this machine holds no lease, however fresh its last heartbeat
            dead_owner = record.owner if owner_is_gone(record.owner) else None
            claimed = store.claim_run(
                run_id, coordinator.owner, settings.lease_seconds, dead_owner=dead_owner, pending_only=pending_only
            )
            if not claimed and pending_only and (now := store.get_run(run_id).status) != RunStatus.PENDING:
                # started, failed or cancelled (by the supervisor) since it was read: not run twice
                return RunResult(run_id, now, {}, f"the run is {now.value}, no longer pending")
            if not claimed:
                raise RunStateError(
                    f"run {run_id} is still being run by a live process (its lease was renewed less than "
                    f"{settings.lease_seconds:g}s ago); wait for it or `factory cancel {run_id}`"
                )
            if not pending_only and not keep_cancel:
                store.clear_cancel(run_id)  # resuming on purpose overrides an earlier cancel
            if budget is not None:
                store.set_run_spec(run_id, workflow.model_dump_json(by_alias=True))
            store.reset_unfinished_steps(run_id)
            # a run that once started keeps its committed steps, even if it waits as pending again
            # (a resume asked over the API marks it pending at once, see deployments/api.py)
            coordinator.start(resumed=record.status != RunStatus.PENDING or record.started_at is not None)
            if on_start is not None:
                on_start(run_id)
            with event_publication(settings, store):
                return coordinator.execute()
    finally:
        if own_store:
            store.close()


def run_is_stalled(record: RunRecord, lease_seconds: float, now: float) -> bool:
    """Running, but nobody runs it: its lease lapsed or its owner's process is known dead.
    The supervisor (with the API) or ``factory resume`` takes such a run over."""
    if record.status != RunStatus.RUNNING:
        return False
    return (record.heartbeat_at or 0) < now - lease_seconds or owner_is_gone(record.owner)


def run_spent(store: Store, run_id: str) -> RunSpend | None:
    """What a run spent in all its attempts, failed ones included (its latest ``run.usage``
    event, as it counted it against its budgets); None before it records any."""
    for event in store.latest_events(run_id, "run.usage", limit=1):
        return RunSpend.of_event(event.data)
    return None


def cancel(run_id: str, *, store: Store | None = None, settings: Settings | None = None) -> bool:
    """Cancel a run. Its coordinator, if one runs it, stops the attempts in flight; a run
    that nobody runs (pending, or its coordinator died) is marked cancelled here.
    Returns False if the run had already finished."""
    settings = settings or get_settings()
    own_store = store is None
    store = store or store_for(settings)
    try:
        record = store.get_run(run_id)
        if record.status in FINAL_RUN_STATUSES:
            return False
        store.request_cancel(run_id)  # stays set: a coordinator that claims the run later stops at once
        lease_live = (
            bool(record.owner)
            and (record.heartbeat_at or 0) > time.time() - settings.lease_seconds
            and not owner_is_gone(record.owner)
        )
        if not lease_live:
            changes: list[Change] = [
                StepChange(run_id, s.step_id, StepStatus.CANCELLED, "step.cancelled", data={"reason": "cancelled"})
                for s in store.get_steps(run_id)
                if s.status not in FINAL_STEP_STATUSES
            ]
            changes.append(RunChange(run_id, RunStatus.CANCELLED, "run.cancelled", error="the run was cancelled"))
            store.record(changes)
        return True
    finally:
        if own_store:
            store.close()


def fail_unstarted(run_id: str, reason: str, *, store: Store | None = None, settings: Settings | None = None) -> bool:
    """Mark a run that is still pending (its coordinator could not start: a bad module, a
    missing agent, a store error) as failed with ``reason``, so it does not wait for ever.
    Returns False when the run had moved on (another coordinator took it)."""
    settings = settings or get_settings()
    own_store = store is None
    store = store or store_for(settings)
    try:
        record = store.get_run(run_id)
        lease_live = bool(record.owner) and (record.heartbeat_at or 0) > time.time() - settings.lease_seconds
        if record.status != RunStatus.PENDING or lease_live:
            return False
        changes: list[Change] = [
            StepChange(run_id, s.step_id, StepStatus.SKIPPED, "step.skipped", data={"reason": "the run did not start"})
            for s in store.get_steps(run_id)
            if s.status not in FINAL_STEP_STATUSES
        ]
        changes.append(RunChange(run_id, RunStatus.FAILED, "run.failed", error=reason))
        store.record(changes)
        return True
    except Exception:  # noqa: BLE001 - best effort: the supervisor tries again later
        return False
    finally:
        if own_store:
            store.close()
