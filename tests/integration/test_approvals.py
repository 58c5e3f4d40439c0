"""Approval gates on a real local Ray, on SQLite and PostgreSQL: the run parks durably (its
coordinator returns, nothing is held), a decision lets it go on, rejections and timeouts do
what the gate says."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

import factory
from factory.approvals import Decision, is_due, may_decide
from factory.errors import PermissionDeniedError, RunStateError
from factory.settings import Settings
from factory.spec import ApprovalSpec, Step, Workflow
from factory.store import ApiKeyRecord, RunStatus, Store

FIXTURES = str(Path(__file__).parent.parent / "fixtures")

pytestmark = pytest.mark.usefixtures("ray_cluster")


def gated(approval: dict[str, Any], *extra: Step) -> Workflow:
    return Workflow(
        name="gated",
        base_dir=FIXTURES,
        inputs={"amount": 120},
        steps=[
            Step(id="plan", python="teststeps:echo", with_={"value": {"amount": "${inputs.amount}", "to": "ACME"}}),
            Step(id="gate", approval=ApprovalSpec.model_validate(approval)),
            Step(
                id="act",
                python="teststeps:echo",
                with_={"value": {"approved": "${steps.gate.output.approved}", "by": "${steps.gate.output.by}"}},
            ),
            *extra,
        ],
    )


ASK = {"message": "Pay ${steps.plan.output.amount} to ${steps.plan.output.to}?"}


def statuses(store: Store, run_id: str) -> dict[str, str]:
    return {s.step_id: s.status.value for s in store.get_steps(run_id)}


def test_a_gate_parks_the_run_and_a_decision_finishes_it(store: Store, settings: Settings) -> None:
    result = factory.run(gated(ASK), store=store, settings=settings)
    assert result.status == RunStatus.WAITING and result.outputs == {"plan": {"amount": 120, "to": "ACME"}}
    run = store.get_run(result.run_id)
    assert run.status == RunStatus.WAITING and run.owner is None  # nobody holds it while people decide
    assert statuses(store, result.run_id) == {"plan": "succeeded", "gate": "waiting", "act": "pending"}
    (opened,) = store.latest_events(result.run_id, "step.waiting")
    assert opened.data["message"] == "Pay 120 to ACME?" and opened.data["approvers"] == ["scope:admin"]
    assert [e.data["steps"] for e in store.latest_events(result.run_id, "run.waiting")] == [["gate"]]

    record = factory.approve(Decision(result.run_id, "gate", True, "within budget"), store=store, settings=settings)
    assert record.by == "local" and record.approved
    with pytest.raises(RunStateError, match="already approved by local"):
        factory.approve(Decision(result.run_id, "gate", False), store=store, settings=settings)
    assert is_due(store, store.get_run(result.run_id), time.time())

    done = factory.resume(result.run_id, store=store, settings=settings)
    assert done.ok, done.error
    gate = done.outputs["gate"]
    assert gate["approved"] is True and gate["by"] == "local" and gate["comment"] == "within budget"
    assert gate["timed_out"] is False
    assert done.outputs["act"] == {"approved": True, "by": "local"}
    assert [e.data["comment"] for e in store.latest_events(result.run_id, "step.approved")] == ["within budget"]


def test_a_rejection_fails_the_gate_and_skips_what_it_guards(store: Store, settings: Settings) -> None:
    result = factory.run(gated(ASK), store=store, settings=settings)
    factory.approve(Decision(result.run_id, "gate", False, "too much"), store=store, settings=settings)
    done = factory.resume(result.run_id, store=store, settings=settings)
    assert done.status == RunStatus.FAILED
    assert "rejected by local: too much" in (done.error or "")
    assert statuses(store, result.run_id) == {"plan": "succeeded", "gate": "failed", "act": "skipped"}


def test_on_reject_continue_makes_the_rejection_an_output(settings: Settings, factory_home: Path) -> None:
    from factory.store.sqlite import SQLiteStore

    store = SQLiteStore(factory_home / "factory.db")
    try:
        result = factory.run(gated({**ASK, "on_reject": "continue"}), store=store, settings=settings)
        factory.approve(Decision(result.run_id, "gate", False), store=store, settings=settings)
        done = factory.resume(result.run_id, store=store, settings=settings)
        assert done.ok and done.outputs["act"] == {"approved": False, "by": "local"}
    finally:
        store.close()


@pytest.mark.parametrize(
    ("on_timeout", "status", "approved"),
    [("approve", RunStatus.SUCCEEDED, True), ("reject", RunStatus.FAILED, False), ("fail", RunStatus.FAILED, None)],
)
def test_a_gate_timeout_decides_as_the_gate_says(
    settings: Settings, factory_home: Path, on_timeout: str, status: RunStatus, approved: bool | None
) -> None:
    from factory.store.sqlite import SQLiteStore

    store = SQLiteStore(factory_home / "factory.db")
    try:
        result = factory.run(gated({**ASK, "timeout": 1, "on_timeout": on_timeout}), store=store, settings=settings)
        assert result.status == RunStatus.WAITING
        assert not is_due(store, store.get_run(result.run_id), time.time())
        time.sleep(1.1)
        assert is_due(store, store.get_run(result.run_id), time.time())  # the supervisor would resume it now
        done = factory.resume(result.run_id, store=store, settings=settings)
        assert done.status == status
        if approved is None:
            assert "no decision within its timeout of 1s" in (done.error or "")
        elif approved:
            assert done.outputs["gate"]["by"] == "timeout" and done.outputs["gate"]["timed_out"] is True
        else:
            assert "rejected by timeout" in (done.error or "")
    finally:
        store.close()


def test_a_live_coordinator_takes_a_decision_without_parking(
    settings: Settings, factory_home: Path, tmp_path: Path
) -> None:
    """While other steps still run, the coordinator waits with the gate and polls for the decision."""
    from factory.store.sqlite import SQLiteStore

    opened = tmp_path / "open"
    slow = Step(id="slow", python="teststeps:wait_for_file", with_={"path": str(opened), "seconds": 60})
    store = SQLiteStore(factory_home / "factory.db")
    try:
        results: list[Any] = []
        thread = threading.Thread(
            target=lambda: results.append(factory.run(gated(ASK, slow), store=store, settings=settings))
        )
        thread.start()
        deadline = time.monotonic() + 60
        run_id = None
        while time.monotonic() < deadline:
            runs = store.list_runs()
            if runs and statuses(store, runs[0].id).get("gate") == "waiting":
                run_id = runs[0].id
                break
            time.sleep(0.1)
        assert run_id is not None
        assert store.get_run(run_id).status == RunStatus.RUNNING  # not parked: "slow" runs
        factory.approve(Decision(run_id, "gate", True), store=store, settings=settings)
        opened.write_text("go")
        thread.join(60)
        assert results and results[0].ok, results
        assert store.latest_events(run_id, "run.waiting") == []
    finally:
        store.close()


def test_who_may_decide() -> None:
    def key(name: str, *scopes: str) -> ApiKeyRecord:
        return ApiKeyRecord(id="k", name=name, key_hash="h", scopes=list(scopes), created_at=0)

    assert may_decide(["scope:admin"], None)  # the CLI on the Factory's machine
    assert may_decide(["scope:admin"], key("ops", "admin"))
    assert not may_decide(["scope:admin"], key("ops", "submit"))
    assert may_decide(["scope:submit"], key("ops", "submit"))
    assert may_decide(["scope:submit"], key("ops", "admin"))
    assert not may_decide(["scope:submit"], key("ops", "read"))
    assert may_decide(["key:finance"], key("finance", "read"))
    assert not may_decide(["key:finance"], key("finance2", "submit"))


def test_a_key_that_is_not_an_approver_is_refused(settings: Settings, factory_home: Path) -> None:
    from factory.store.sqlite import SQLiteStore

    store = SQLiteStore(factory_home / "factory.db")
    try:
        result = factory.run(gated({**ASK, "approvers": ["key:finance"]}), store=store, settings=settings)
        intruder = ApiKeyRecord(id="k1", name="intern", key_hash="h", scopes=["admin"], created_at=0)
        with pytest.raises(PermissionDeniedError, match="its approvers are key:finance"):
            factory.approve(Decision(result.run_id, "gate", True), key=intruder, store=store, settings=settings)
        finance = ApiKeyRecord(id="k2", name="finance", key_hash="h", scopes=["read"], created_at=0)
        record = factory.approve(Decision(result.run_id, "gate", True), key=finance, store=store, settings=settings)
        assert record.by == "key:finance"
    finally:
        store.close()


def test_a_decision_in_time_stands_and_the_deadline_does_not_move(settings: Settings, factory_home: Path) -> None:
    """Approved before the deadline, resumed after it: the approval stands (the timeout does not
    override it). A gate reopened by a resume keeps the deadline it had."""
    from factory.store.sqlite import SQLiteStore

    store = SQLiteStore(factory_home / "factory.db")
    try:
        result = factory.run(gated({**ASK, "timeout": 1.5, "on_timeout": "reject"}), store=store, settings=settings)
        first = store.latest_events(result.run_id, "step.waiting")[0].data["deadline"]
        again = factory.resume(result.run_id, store=store, settings=settings)  # nothing decided: parks again
        assert again.status == RunStatus.WAITING
        reopened = store.latest_events(result.run_id, "step.waiting")[0].data["deadline"]
        assert reopened == pytest.approx(first, abs=0.5)  # not pushed back by the resume
        factory.approve(Decision(result.run_id, "gate", True, "in time"), store=store, settings=settings)
        time.sleep(max(0.0, first - time.time()) + 0.3)
        done = factory.resume(result.run_id, store=store, settings=settings)
        assert done.ok, done.error
        assert done.outputs["gate"]["by"] == "local" and done.outputs["gate"]["timed_out"] is False
    finally:
        store.close()
