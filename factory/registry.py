"""Registered workflows: code an operator deployed, started by keys by name.

``register`` (an admin: ``factory workflows register`` or ``PUT /v1/workflows/{name}``)
stores a validated workflow as the next version of its name, with the folder its
step modules are imported from and the secrets granted to it. ``start`` (a ``submit``
key: ``POST /v1/workflows/{name}/runs``) creates a pending run of the latest (or a
given) version with the submitter's inputs; the run's grants are the workflow's own
modules, folder and secrets, never more.
"""

from __future__ import annotations

import json
import time
from typing import Any

from factory.api import create_run
from factory.dag import validate_data
from factory.errors import WorkflowNotFoundError
from factory.limits import DocumentLimits
from factory.policy import Submitter, check_registration, registered_grants
from factory.sandbox.secrets import check_name
from factory.settings import Settings
from factory.spec import Workflow
from factory.store import RegisteredWorkflow, Store


def register(
    store: Store,
    workflow: Workflow,
    *,
    name: str | None = None,
    secrets: list[str] | None = None,
    created_by: str = "",
) -> RegisteredWorkflow:
    """Store ``workflow`` (already validated; its ``base_dir`` is the folder the operator vouches
    for) as the next version of ``name`` (default: the workflow's name)."""
    check_registration(workflow)
    granted = sorted({check_name(s) for s in secrets or []})
    record = RegisteredWorkflow(
        name=name or workflow.name,
        spec_json=workflow.model_dump_json(by_alias=True),
        base_dir=workflow.base_dir,
        secrets=granted,
        created_at=time.time(),
        created_by=created_by,
    )
    return store.register_workflow(record)


def lookup(store: Store, name: str, version: int | None = None) -> RegisteredWorkflow:
    found = store.get_registered_workflow(name, version)
    if found is None:
        which = f"version {version} of " if version is not None else ""
        raise WorkflowNotFoundError(
            f"no registered workflow {which}{name!r}; `factory workflows list` shows them "
            "(an admin registers one with `factory workflows register WORKFLOW.yaml`)"
        )
    return found


def workflow_of(record: RegisteredWorkflow, limits: DocumentLimits | None = None) -> Workflow:
    """The registered workflow, validated again without importing its modules."""
    data = json.loads(record.spec_json)
    data.pop("base_dir", None)
    return validate_data(data, record.base_dir, f"{record.name}@{record.version}", check_imports=False, limits=limits)


def start(
    store: Store,
    settings: Settings,
    name: str,
    inputs: dict[str, Any] | None,
    submitter: Submitter,
    version: int | None = None,
) -> str:
    """Create a pending run of a registered workflow; returns its id (the caller starts it)."""
    record = lookup(store, name, version)
    workflow = workflow_of(record, DocumentLimits.from_settings(settings))
    grants = registered_grants(record, workflow, submitter)
    return create_run(workflow, inputs, store=store, settings=settings, grants=grants, check_imports=False)
