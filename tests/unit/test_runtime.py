"""The worker side of an attempt, run in this process (no Ray)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from factory.runtime import Outcome, StepCall, run_attempt
from factory.spec import RetryPolicy

FIXTURES = str(Path(__file__).parent.parent / "fixtures")


def call(target: str, arguments: dict[str, object], timeout: float | None = None, **kw: object) -> StepCall:
    return StepCall(
        step_id="s",
        target=target,
        arguments=arguments,
        resolved=bool(kw.pop("resolved", False)),
        inputs={"n": 3},
        dep_ids=tuple(kw.pop("dep_ids", ())),  # type: ignore[arg-type]
        search_path=(FIXTURES,),
        timeout=timeout,
        retry=RetryPolicy(),
    )


def test_resolves_dependencies_and_inputs() -> None:
    dep = Outcome(ok=True, output_json=json.dumps({"v": 4}))
    outcome = run_attempt(
        call("teststeps:add", {"a": "${steps.up.output.v}", "b": "${inputs.n}"}, dep_ids=["up"]), (dep,)
    )
    assert outcome.ok and json.loads(outcome.output_json or "") == 7


def test_failed_dependency_skips_without_running() -> None:
    outcome = run_attempt(call("teststeps:always_fails", {"message": "x"}, dep_ids=["up"]), (Outcome(ok=False),))
    assert outcome.skipped and not outcome.ok


def test_timeout_interrupts_the_attempt() -> None:
    start = time.monotonic()
    outcome = run_attempt(call("teststeps:sleepy", {"seconds": 10}, timeout=0.3), ())
    assert time.monotonic() - start < 5
    assert not outcome.ok and outcome.retryable
    assert "StepTimeoutError" in (outcome.error or "") and "timeout of 0.3s" in (outcome.error or "")


def test_unserialisable_output_is_a_clear_non_retryable_error() -> None:
    outcome = run_attempt(call("teststeps:unserializable", {}), ())
    assert not outcome.ok and not outcome.retryable
    assert "cannot be stored as JSON" in (outcome.error or "")


def test_pydantic_models_are_stored_as_json() -> None:
    outcome = run_attempt(call("teststeps:make_point", {"x": 1, "y": 2}), ())
    assert json.loads(outcome.output_json or "") == {"x": 1, "y": 2}


def test_bad_arguments_are_not_retried() -> None:
    outcome = run_attempt(call("teststeps:add", {"a": 1}), ())
    assert not outcome.ok and not outcome.retryable
    assert "missing a required argument: 'b'" in (outcome.error or "")


def test_output_and_logs_are_captured() -> None:
    outcome = run_attempt(call("teststeps:chatty", {"x": 21}), ())
    assert outcome.ok and outcome.output_json == "42"
    assert "printing 21" in outcome.logs and "WARNING teststeps: logging 21" in outcome.logs


def test_failure_carries_the_traceback_in_logs() -> None:
    outcome = run_attempt(call("teststeps:always_fails", {"message": "nope"}), ())
    assert outcome.error == "ValueError: nope" and outcome.retryable
    assert "Traceback" in outcome.logs and "always_fails" in outcome.logs
