"""The step context on a real local Ray, on SQLite and PostgreSQL: once() survives retries,
a SIGKILLed worker and a resume; progress and emitted data reach the event log while the step runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import factory
from factory.engine import RunResult
from factory.settings import Settings
from factory.spec import RetryPolicy, Step, Workflow
from factory.store import RunStatus, Store

FIXTURES = str(Path(__file__).parent.parent / "fixtures")

pytestmark = pytest.mark.usefixtures("ray_cluster")


def wf(*steps: Step, name: str = "ctx") -> Workflow:
    return Workflow(name=name, steps=list(steps), base_dir=FIXTURES)


def calls(counter: Path) -> int:
    return len(counter.read_text()) if counter.exists() else 0


def once_step(counter: Path, fail_times: int, max_attempts: int, kill: bool = False) -> Step:
    return Step(
        id="charge",
        python="teststeps:once_then_fail",
        with_={"counter": str(counter), "fail_times": fail_times, "kill": kill},
        retry=RetryPolicy(max_attempts=max_attempts, backoff=0.05),
    )


def test_a_retry_gets_the_recorded_result(store: Store, settings: Settings, tmp_path: Path) -> None:
    counter = tmp_path / "charges"
    result = factory.run(wf(once_step(counter, fail_times=2, max_attempts=3)), store=store, settings=settings)
    assert result.ok, result.error
    assert calls(counter) == 1  # the side effect ran once, in attempt 1
    assert calls(Path(f"{counter}.attempts")) == 3
    out = result.outputs["charge"]
    assert out["charged"] == 1 and out["attempt"] == 3 and out["item"] is None
    assert out["key"].startswith(result.run_id + "-")


def test_a_sigkilled_worker_does_not_repeat_the_side_effect(store: Store, settings: Settings, tmp_path: Path) -> None:
    counter = tmp_path / "charges"
    step = once_step(counter, fail_times=1, max_attempts=2, kill=True)
    result = factory.run(wf(step), store=store, settings=settings)
    assert result.ok, result.error
    attempts = store.get_attempts(result.run_id, "charge")
    assert "worker process" in (attempts[0].error or "")  # attempt 1 died with its process
    assert calls(counter) == 1 and result.outputs["charge"]["attempt"] == 2


def test_resume_gets_the_recorded_result(store: Store, settings: Settings, tmp_path: Path) -> None:
    counter = tmp_path / "charges"
    first = factory.run(wf(once_step(counter, fail_times=1, max_attempts=1)), store=store, settings=settings)
    assert first.status == RunStatus.FAILED
    assert calls(counter) == 1
    resumed = factory.resume(first.run_id, store=store, settings=settings)
    assert resumed.ok, resumed.error
    assert calls(counter) == 1
    out = resumed.outputs["charge"]
    assert out["charged"] == 1 and out["attempt"] == 2
    # the idempotency key is the one the failed attempt had
    assert out["key"] == factory.StepContext(run_id=first.run_id, step_id="charge").idempotency_key

    # another run of the same workflow does not read this run's record
    again = factory.run(wf(once_step(counter, fail_times=0, max_attempts=1)), store=store, settings=settings)
    assert again.ok and calls(counter) == 2 and again.outputs["charge"]["charged"] == 2


def test_for_each_items_have_their_own_records(store: Store, settings: Settings, tmp_path: Path) -> None:
    step = Step(
        id="send",
        python="teststeps:once_per_item",
        for_each=[10, 20, 30],
        with_={"folder": str(tmp_path), "item": "${item}"},
        retry=RetryPolicy(max_attempts=2, backoff=0.05),
    )
    result = factory.run(wf(step), store=store, settings=settings)
    assert result.ok, result.error
    for value in (10, 20, 30):
        assert calls(tmp_path / f"sent-{value}") == 1 and calls(tmp_path / f"tries-{value}") == 2
    outs = result.outputs["send"]
    assert [o["item"] for o in outs] == [0, 1, 2] and all(o["attempt"] == 2 and o["sent"] == 1 for o in outs)
    assert len({o["key"] for o in outs}) == 3


def run_watched(workflow: Workflow, store: Store, settings: Settings, look: Callable[[str], None]) -> RunResult:
    """factory.run, with ``look(run_id)`` called every 50 ms from another thread while it runs
    (what a follower sees before the run ends)."""
    done = threading.Event()
    started: list[str] = []

    def watch() -> None:
        while not started and not done.is_set():
            time.sleep(0.02)
        while not done.is_set():
            look(started[0])
            time.sleep(0.05)

    follower = threading.Thread(target=watch)
    follower.start()
    try:
        return factory.run(workflow, store=store, settings=settings, on_start=started.append)
    finally:
        done.set()
        follower.join()


def test_progress_is_published_while_the_step_runs(store: Store, settings: Settings) -> None:
    step = Step(id="work", python="teststeps:report_progress", with_={"n": 12, "delay": 0.15})
    seen: list[dict[str, Any]] = []

    def watch(run_id: str) -> None:  # what a follower sees before the step ends
        running = [s for s in store.get_steps(run_id) if s.status.value == "running"]
        if running:
            seen.extend(e.data for e in store.events(0, run_id) if e.type == "step.progress" and e.data not in seen)

    result = run_watched(wf(step), store, settings, watch)
    assert result.ok, result.error
    assert seen and seen[0]["fraction"] < 1  # progress arrived while the step was running
    events = [e for e in store.events(0, result.run_id) if e.type in ("step.progress", "step.emitted")]
    progress = [e.data for e in events if e.type == "step.progress"]
    assert progress[-1] == {"fraction": 1.0, "message": "12 of 12", "attempt": 1}
    assert 2 <= len(progress) <= 12
    emitted = [x["i"] for e in events if e.type == "step.emitted" for x in e.data["items"]]
    assert emitted == list(range(12))
    # the step's end comes after its last progress event
    types = [e.type for e in store.events(0, result.run_id) if e.step_id == "work"]
    assert types.index("step.succeeded") > max(i for i, t in enumerate(types) if t == "step.progress")


def test_a_python_steps_log_lines_are_events_while_it_runs(store: Store, settings: Settings) -> None:
    """A step that prints across more than a second: step.log events before it ends, the rest
    when it ends (before its step.succeeded), each line once; the attempt's log has them all."""
    step = Step(id="drip", python="teststeps:drip", with_={"lines": 6, "pause": 0.3})
    seen_while_running: list[str] = []

    def watch(run_id: str) -> None:
        if seen_while_running:
            return
        status = {s.step_id: s.status.value for s in store.get_steps(run_id)}.get("drip")
        lines = [line for e in store.events(0, run_id) if e.type == "step.log" for line in e.data["lines"]]
        if lines and status == "running":
            seen_while_running.extend(lines)

    result = run_watched(wf(step), store, settings, watch)
    assert result.ok, result.error
    assert "line 0" in seen_while_running and "line 5" not in seen_while_running
    events = [e for e in store.events(0, result.run_id) if e.step_id == "drip"]
    lines = [line for e in events if e.type == "step.log" for line in e.data["lines"]]
    assert lines == [f"line {i}" for i in range(6)]
    assert all(e.data["attempt"] == 1 for e in events if e.type == "step.log")
    types = [e.type for e in events]
    assert types.index("step.succeeded") > max(i for i, t in enumerate(types) if t == "step.log")
    assert "line 5" in store.get_attempts(result.run_id, "drip")[0].logs


def test_quick_printing_steps_publish_no_log_events(store: Store, settings: Settings) -> None:
    """Steps (and for_each items) that end within the interval: their lines come with the attempt only."""
    steps = [
        Step(id="say", python="teststeps:chatty", with_={"x": 3}),
        Step(id="items", python="teststeps:drip", for_each=[1, 2, 3], with_={"lines": "${item}", "pause": 0}),
    ]
    result = factory.run(wf(*steps), store=store, settings=settings)
    assert result.ok, result.error
    time.sleep(1.0)  # past the interval: nothing was scheduled to come late either
    assert [e for e in store.events(0, result.run_id) if e.type == "step.log"] == []
    assert "printing 3" in store.get_attempts(result.run_id, "say")[0].logs
    assert "[item 2] line 0\nline 1\nline 2" in store.get_attempts(result.run_id, "items")[0].logs


def test_factory_run_hears_the_steps_progress(settings: Settings) -> None:
    """`factory run`'s bar: the local backend hands the run's events, progress included, to the watch."""
    from factory.cli.backend import Watch
    from factory.cli.local import LocalBackend

    heard: list[dict[str, Any]] = []
    workflow = Path(FIXTURES) / "progress_workflow.yaml"
    backend = LocalBackend(settings)
    try:
        result = backend.run(workflow, {}, None, Watch(on_event=heard.append))
    finally:
        backend.close()
    assert result.ok, result.error
    progress = [e["data"] for e in heard if e["type"] == "step.progress"]
    assert progress and progress[-1]["fraction"] == 1.0
    assert heard[-1]["type"] == "run.succeeded"  # the follower read on to the run's end


def test_notify_once_example(store: Store, settings: Settings, tmp_path: Path) -> None:
    repo = Path(__file__).parent.parent.parent
    outbox = tmp_path / "outbox.jsonl"
    result = factory.run(
        repo / "examples/notify_once/workflow.yaml", {"outbox": str(outbox)}, store=store, settings=settings
    )
    assert result.ok, result.error
    summary = result.outputs["summary"]
    assert summary == {"orders": 4, "notices_sent": 4, "attempts": 8, "each_sent_once": True}
    assert len(outbox.read_text().splitlines()) == 4  # every first attempt failed after its send
    kinds = {e.type for e in store.events(0, result.run_id)}
    assert {"step.progress", "step.emitted"} <= kinds
