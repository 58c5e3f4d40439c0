"""Approval gates: who may decide, recording a decision, and which waiting runs are due.

A gate (a step with ``approval:``) opens when its dependencies succeeded: the step is
``waiting`` and, once nothing else runs, the run is parked as ``waiting`` and its coordinator
stops. A decision is recorded here (the first one stands); then the run is resumed by
whoever recorded it (``factory approve``, the API) or by the supervisor, which also resumes
a parked run whose gate's timeout has passed so that the timeout is applied.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from factory.errors import NotFoundError, PermissionDeniedError, RunStateError, StepInputError
from factory.spec import Workflow
from factory.store import ApiKeyRecord, ApprovalRecord, RunRecord, RunStatus, StepStatus, Store

MAX_COMMENT_CHARS = 2000
LOCAL = "local"


@dataclass(frozen=True)
class Decision:
    """One operation's input: a decision at a gate."""

    run_id: str
    step_id: str
    approved: bool
    comment: str = ""


def approver_name(key: ApiKeyRecord | None) -> str:
    """How a decider is recorded: ``key:NAME`` for an API key, ``local`` for the CLI on this machine."""
    return LOCAL if key is None else f"key:{key.name}"


def may_decide(approvers: list[str], key: ApiKeyRecord | None) -> bool:
    """Whether ``key`` (None: the CLI on the Factory's machine, which may always decide) is one
    of ``approvers``."""
    if key is None:
        return True
    for approver in approvers:
        kind, _, value = approver.partition(":")
        if kind == "scope" and (value in key.scopes or "admin" in key.scopes):
            return True
        if kind == "key" and value == key.name:
            return True
    return False


def decide(store: Store, decision: Decision, key: ApiKeyRecord | None, now: float | None = None) -> ApprovalRecord:
    """Record ``decision`` for a gate that waits; raises when the gate is unknown, not waiting,
    already decided (RunStateError naming the standing decision) or not the key's to decide."""
    if len(decision.comment) > MAX_COMMENT_CHARS:
        raise StepInputError(f"the comment is {len(decision.comment)} characters; at most {MAX_COMMENT_CHARS}")
    record = store.get_run(decision.run_id)
    workflow = Workflow.model_validate_json(record.spec_json)
    step = next((s for s in workflow.steps if s.id == decision.step_id), None)
    if step is None:
        raise NotFoundError(f"run {decision.run_id} has no step {decision.step_id!r}")
    if step.approval is None:
        raise StepInputError(f"step {decision.step_id!r} of run {decision.run_id} is not an approval gate")
    if not may_decide(step.approval.approvers, key):
        assert key is not None
        raise PermissionDeniedError(
            f"API key {key.name!r} may not decide at gate {decision.step_id!r}: its approvers are "
            f"{', '.join(step.approval.approvers)}"
        )
    statuses = {s.step_id: s.status for s in store.get_steps(decision.run_id)}
    status = statuses.get(decision.step_id)
    # the gate's own status is the test; the run may be pending (resumed after another gate's decision)
    if status != StepStatus.WAITING or record.status not in (RunStatus.PENDING, RunStatus.RUNNING, RunStatus.WAITING):
        shown = status.value if status is not None else "unknown"
        raise RunStateError(
            f"gate {decision.step_id!r} of run {decision.run_id} is {shown} (run {record.status.value}), "
            "not waiting for a decision"
        )
    standing, recorded = store.decide_approval(
        ApprovalRecord(
            run_id=decision.run_id,
            step_id=decision.step_id,
            approved=decision.approved,
            by=approver_name(key),
            comment=decision.comment,
            decided_at=time.time() if now is None else now,
        )
    )
    if not recorded:
        verb = "approved" if standing.approved else "rejected"
        raise RunStateError(f"gate {decision.step_id!r} of run {decision.run_id} was already {verb} by {standing.by}")
    return standing


def is_due(store: Store, run: RunRecord, now: float) -> bool:
    """A parked run (``waiting``) that can move on: one of its waiting gates has a decision or
    its timeout has passed."""
    if run.status != RunStatus.WAITING:
        return False
    waiting = {s.step_id: s for s in store.get_steps(run.id) if s.status == StepStatus.WAITING}
    if not waiting:
        return True  # nothing waits any more (e.g. a resume was interrupted): let it go on
    if {a.step_id for a in store.get_approvals(run.id)} & set(waiting):
        return True
    workflow = Workflow.model_validate_json(run.spec_json)
    for step in workflow.steps:
        record = waiting.get(step.id)
        if record is None or step.approval is None or step.approval.timeout is None:
            continue
        if record.started_at is not None and now >= record.started_at + step.approval.timeout:
            return True
    return False
