"""The Python API: load, validate, run, resume and cancel workflows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from factory.dag import build_graph, load_workflow, validate_workflow
from factory.engine import Coordinator, Progress, RunResult, new_run_id
from factory.errors import RunStateError, WorkflowValidationError
from factory.raysession import ensure_ray
from factory.settings import Settings, get_settings
from factory.spec import Workflow
from factory.store import FINAL_RUN_STATUSES, RunStatus, Store, open_store


def store_for(settings: Settings | None = None) -> Store:
    settings = settings or get_settings()
    return open_store(settings.resolved_store_url())


def merge_inputs(workflow: Workflow, inputs: dict[str, Any] | None) -> dict[str, Any]:
    """The workflow's input defaults overridden by ``inputs``; unknown names are an error."""
    given = dict(inputs or {})
    unknown = sorted(set(given) - set(workflow.inputs))
    if unknown:
        declared = ", ".join(sorted(workflow.inputs)) or "none"
        raise WorkflowValidationError(
            [f"unknown input {name!r} (declared inputs: {declared})" for name in unknown], workflow.name
        )
    return {**workflow.inputs, **given}


def run(
    workflow: Workflow | str | Path,
    inputs: dict[str, Any] | None = None,
    *,
    store: Store | None = None,
    settings: Settings | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_start: Callable[[str], None] | None = None,
    run_id: str | None = None,
) -> RunResult:
    """Run a workflow to the end and return its result. Joins or starts Ray as needed.

    The run is durable: if this process dies, ``resume(run_id)`` finishes it.
    """
    settings = settings or get_settings()
    workflow = validate_workflow(workflow) if isinstance(workflow, Workflow) else load_workflow(workflow)
    merged = merge_inputs(workflow, inputs)
    graph = build_graph(workflow)
    own_store = store is None
    store = store or store_for(settings)
    try:
        ensure_ray(settings.ray_address)
        run_id = run_id or new_run_id()
        store.create_run(run_id, workflow.name, workflow.model_dump_json(by_alias=True), merged, graph.order)
        if on_start is not None:
            on_start(run_id)
        coordinator = Coordinator(store, workflow, run_id, merged, settings, on_progress, graph)
        coordinator.start()
        return coordinator.execute()
    finally:
        if own_store:
            store.close()


def resume(
    run_id: str,
    *,
    store: Store | None = None,
    settings: Settings | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunResult:
    """Finish a run that was interrupted, failed or cancelled. Steps that committed
    their output are not run again; every other step runs (again)."""
    settings = settings or get_settings()
    own_store = store is None
    store = store or store_for(settings)
    try:
        record = store.get_run(run_id)
        if record.status == RunStatus.SUCCEEDED:
            raise RunStateError(f"run {run_id} already succeeded; nothing to resume")
        workflow = Workflow.model_validate_json(record.spec_json)
        ensure_ray(settings.ray_address)
        coordinator = Coordinator(store, workflow, run_id, record.inputs, settings, on_progress)
        if not store.claim_run(run_id, coordinator.owner, settings.lease_seconds):
            raise RunStateError(
                f"run {run_id} is still being run by a live process (its lease was renewed less than "
                f"{settings.lease_seconds:g}s ago); wait for it or `factory cancel {run_id}`"
            )
        store.reset_unfinished_steps(run_id)
        coordinator.start(resumed=True)
        return coordinator.execute()
    finally:
        if own_store:
            store.close()


def cancel(run_id: str, *, store: Store | None = None, settings: Settings | None = None) -> bool:
    """Ask the run's coordinator to stop. Returns False if the run had already finished."""
    own_store = store is None
    store = store or store_for(settings)
    try:
        record = store.get_run(run_id)
        if record.status in FINAL_RUN_STATUSES:
            return False
        store.request_cancel(run_id)
        return True
    finally:
        if own_store:
            store.close()
