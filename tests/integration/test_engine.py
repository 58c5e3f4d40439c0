"""The engine on a real local Ray (one per test session) with durable SQLite state."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import factory
from factory.batches import MAX_ITEMS_PER_TASK
from factory.engine import RayBackend
from factory.groups import STEP_TIMES, timed_as
from factory.settings import Settings
from factory.spec import RetryPolicy, Step, Workflow
from factory.store import RunStatus
from factory.store.sqlite import SQLiteStore

FIXTURES = str(Path(__file__).parent.parent / "fixtures")
REPO = Path(__file__).parent.parent.parent

pytestmark = pytest.mark.usefixtures("ray_cluster")


def wf(*steps: Step, inputs: dict[str, Any] | None = None, name: str = "t") -> Workflow:
    return Workflow(name=name, steps=list(steps), inputs=inputs or {}, base_dir=FIXTURES)


def calls(counter: Path) -> int:
    return len(counter.read_text()) if counter.exists() else 0


def statuses(store: SQLiteStore, run_id: str) -> dict[str, str]:
    return {s.step_id: s.status.value for s in store.get_steps(run_id)}


def cancelled_once(workflow: Workflow, store: SQLiteStore, settings: Settings, ready: Callable[[str], bool]) -> str:
    """Runs ``workflow`` in a thread, cancels it once ``ready(run_id)`` holds (or after 30 s),
    and returns the run's id once the run has ended cancelled."""
    started: list[str] = []
    results: list[factory.RunResult] = []
    thread = threading.Thread(
        target=lambda: results.append(factory.run(workflow, store=store, settings=settings, on_start=started.append))
    )
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (started and ready(started[0])):
        time.sleep(0.05)
    assert factory.cancel(started[0], store=store)
    thread.join(30)
    assert results and results[0].status == RunStatus.CANCELLED
    return started[0]


def test_doc_report_example(store: SQLiteStore, settings: Settings, tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    result = factory.run(REPO / "examples/doc_report/workflow.yaml", {"out": str(out)}, store=store, settings=settings)
    assert result.ok, result.error
    summaries = result.outputs["summarize"]
    assert len(summaries) == len(result.outputs["load"]) >= 8
    assert all(s["words"] > 100 and len(s["top_terms"]) == 5 for s in summaries)
    report = result.outputs["report"]
    assert report["documents"] == len(summaries)
    assert report["total_words"] == sum(s["words"] for s in summaries)
    assert out.read_text() == report["markdown"] and report["markdown"].startswith("# Document report")


def test_sales_example_with_an_input_override(store: SQLiteStore, settings: Settings) -> None:
    default = factory.run(REPO / "examples/sales_stats/workflow.yaml", store=store, settings=settings)
    strict = factory.run(REPO / "examples/sales_stats/workflow.yaml", {"z": 3}, store=store, settings=settings)
    assert default.ok and strict.ok
    summary = default.outputs["summary"]
    assert summary["total_revenue"] == pytest.approx(sum(r["revenue"] for r in default.outputs["region_stats"]))
    assert summary["best_region"] == max(default.outputs["region_stats"], key=lambda r: r["revenue"])["region"]
    assert strict.outputs["summary"]["outlier_count"] < summary["outlier_count"]


def test_retries_with_backoff_until_success(store: SQLiteStore, settings: Settings, tmp_path: Path) -> None:
    counter = tmp_path / "flaky"
    step = Step(
        id="flaky",
        python="teststeps:flaky",
        with_={"counter": str(counter), "fail_times": 2},
        retry=RetryPolicy(max_attempts=3, backoff=0.05, jitter=True),
    )
    after = Step(id="after", python="teststeps:echo", with_={"value": "${steps.flaky.output}"})
    result = factory.run(wf(step, after), store=store, settings=settings)
    assert result.ok, result.error
    assert result.outputs["after"] == "ok after 3 attempts"
    assert calls(counter) == 3
    events = [e.type for e in store.events(0, result.run_id) if e.step_id == "flaky"]
    assert events.count("step.retrying") == 2 and events[-1] == "step.succeeded"
    attempts = store.get_attempts(result.run_id, "flaky")
    assert [a.status.value for a in attempts] == ["failed", "failed", "succeeded"]
    assert "attempt 1 failed on purpose" in (attempts[0].error or "")


def test_retries_are_limited_to_the_errors_named(store: SQLiteStore, settings: Settings, tmp_path: Path) -> None:
    counter = tmp_path / "c"
    step = Step(
        id="s",
        python="teststeps:flaky",
        with_={"counter": str(counter), "fail_times": 5, "error": "ValueError"},
        retry=RetryPolicy(max_attempts=4, backoff=0.01, on=["ConnectionError"]),
    )
    result = factory.run(wf(step), store=store, settings=settings)
    assert result.status == RunStatus.FAILED
    assert calls(counter) == 1
    assert "ValueError: attempt 1 failed on purpose" in (result.error or "")


def test_validation_errors_are_not_retried(store: SQLiteStore, settings: Settings, tmp_path: Path) -> None:
    counter = tmp_path / "c"
    step = Step(
        id="s", python="teststeps:invalid_point", with_={"counter": str(counter)}, retry=RetryPolicy(max_attempts=3)
    )
    result = factory.run(wf(step), store=store, settings=settings)
    assert result.status == RunStatus.FAILED and calls(counter) == 1
    assert "ValidationError" in (result.error or "") and "not retried" in (result.error or "")


def test_timeout_stops_the_attempt_then_retries(store: SQLiteStore, settings: Settings, tmp_path: Path) -> None:
    marker = tmp_path / "finished"
    step = Step(
        id="slow",
        python="teststeps:sleepy",
        with_={"seconds": 30, "marker": str(marker)},
        timeout=0.5,
        retry=RetryPolicy(max_attempts=2, backoff=0.01),
    )
    start = time.monotonic()
    result = factory.run(wf(step), store=store, settings=settings)
    assert time.monotonic() - start < 20
    assert result.status == RunStatus.FAILED
    assert "timeout of 0.5s" in (result.error or "") and "gave up after 2 attempts" in (result.error or "")
    assert not marker.exists()


def test_timeout_kills_an_attempt_that_ignores_the_interrupt(
    store: SQLiteStore, settings: Settings, tmp_path: Path
) -> None:
    counter = tmp_path / "c"
    step = Step(
        id="stuck", python="teststeps:stuck_in_native", with_={"seconds": 60, "counter": str(counter)}, timeout=0.5
    )
    start = time.monotonic()
    result = factory.run(wf(step), store=store, settings=settings)
    assert time.monotonic() - start < 30
    assert result.status == RunStatus.FAILED
    assert "worker process was killed" in (result.error or "")


def test_a_failure_skips_dependants_but_not_other_branches(
    store: SQLiteStore, settings: Settings, tmp_path: Path
) -> None:
    result = factory.run(
        wf(
            Step(id="bad", python="teststeps:always_fails", with_={"message": "broken input"}),
            Step(id="child", python="teststeps:echo", with_={"value": "${steps.bad.output}"}),
            Step(id="grandchild", python="teststeps:echo", with_={"value": "${steps.child.output}"}),
            Step(id="other", python="teststeps:sleepy", with_={"seconds": 0.3}),
            Step(id="unserialisable", python="teststeps:unserializable"),
        ),
        store=store,
        settings=settings,
    )
    assert result.status == RunStatus.FAILED
    assert statuses(store, result.run_id) == {
        "bad": "failed",
        "child": "skipped",
        "grandchild": "skipped",
        "other": "succeeded",
        "unserialisable": "failed",
    }
    steps = {s.step_id: s for s in store.get_steps(result.run_id)}
    assert steps["unserialisable"].error and "cannot be stored as JSON" in steps["unserialisable"].error
    assert result.outputs == {"other": "slept"}
    # the failure does not leak into the next run
    ok = factory.run(wf(Step(id="a", python="teststeps:add", with_={"a": 1, "b": 2})), store=store, settings=settings)
    assert ok.ok and ok.outputs == {"a": 3}


def test_a_step_that_prints_a_nul_character_is_recorded_and_its_run_ends(
    store: SQLiteStore, settings: Settings
) -> None:
    """PostgreSQL's text cannot hold NUL: before, its commit failed and the coordinator with it."""
    result = factory.run(
        wf(
            Step(id="ok", python="teststeps:nul_printer", with_={"x": 1}),
            Step(id="bad", python="teststeps:nul_printer", with_={"x": -1}),
            Step(id="each", python="teststeps:nul_printer", for_each=[2, 3], with_={"x": "${item}"}),
        ),
        store=store,
        settings=settings,
    )
    assert result.status == RunStatus.FAILED and result.outputs == {"ok": 1, "each": [2, 3]}
    attempts = {a.step_id: a for a in store.get_attempts(result.run_id)}
    assert "a\ufffdb 1" in attempts["ok"].logs and "a\ufffdb -1" in attempts["bad"].logs
    assert "bad\ufffdvalue -1" in (attempts["bad"].error or "")
    assert [i.logs.strip() for i in store.get_items(result.run_id, "each")] == ["a\ufffdb 2", "a\ufffdb 3"]


def test_for_each_retries_only_the_failing_item(store: SQLiteStore, settings: Settings, tmp_path: Path) -> None:
    counter = tmp_path / "c"
    result = factory.run(
        wf(
            Step(id="nums", python="teststeps:echo", with_={"value": [1, 2, 3, 4]}),
            Step(
                id="sq",
                python="teststeps:square_or_fail",
                for_each="${steps.nums.output}",
                with_={"x": "${item}", "bad": 3, "counter": str(counter)},
                retry=RetryPolicy(max_attempts=2, backoff=0.01),
            ),
            Step(id="sum", python="teststeps:echo", with_={"value": "${steps.sq.output}"}),
        ),
        store=store,
        settings=settings,
    )
    assert result.ok, result.error
    assert result.outputs["sum"] == [1, 4, 9, 16]
    assert calls(counter) == 2
    retry_events = [e for e in store.events(0, result.run_id) if e.type == "step.retrying"]
    assert len(retry_events) == 1 and retry_events[0].data["item"] == 2


def test_for_each_over_something_that_is_not_a_list(store: SQLiteStore, settings: Settings) -> None:
    result = factory.run(
        wf(
            Step(id="one", python="teststeps:echo", with_={"value": 5}),
            Step(id="each", python="teststeps:echo", for_each="${steps.one.output}", with_={"value": "${item}"}),
        ),
        store=store,
        settings=settings,
    )
    assert result.status == RunStatus.FAILED
    assert "for_each needs a list" in (result.error or "")


def test_cached_steps_do_not_run_again(store: SQLiteStore, settings: Settings, tmp_path: Path) -> None:
    counter = tmp_path / "c"

    def workflow(value: int) -> Workflow:
        return wf(
            Step(id="src", python="teststeps:echo", with_={"value": value}),
            Step(
                id="slow",
                python="teststeps:count_and_echo",
                with_={"counter": str(counter), "value": "${steps.src.output}"},
                cache=True,
            ),
        )

    first = factory.run(workflow(1), store=store, settings=settings)
    second = factory.run(workflow(1), store=store, settings=settings)
    third = factory.run(workflow(2), store=store, settings=settings)
    assert first.outputs["slow"] == second.outputs["slow"] == 1 and third.outputs["slow"] == 2
    assert calls(counter) == 2
    cached = {s.step_id: s.cached for s in store.get_steps(second.run_id)}
    assert cached == {"src": False, "slow": True}
    assert "step.cached" in [e.type for e in store.events(0, second.run_id)]


def test_cancel_stops_attempts_in_flight(store: SQLiteStore, settings: Settings, tmp_path: Path) -> None:
    marker = tmp_path / "finished"
    workflow = wf(
        Step(id="slow", python="teststeps:sleepy", with_={"seconds": 20, "marker": str(marker)}),
        Step(id="after", python="teststeps:echo", with_={"value": "${steps.slow.output}"}),
    )
    run_id = cancelled_once(workflow, store, settings, lambda run: statuses(store, run)["slow"] == "running")
    assert statuses(store, run_id) == {"slow": "cancelled", "after": "cancelled"}
    assert not factory.cancel(run_id, store=store)  # already finished
    time.sleep(1)
    assert not marker.exists()


def test_resume_reruns_only_what_did_not_succeed(store: SQLiteStore, settings: Settings, tmp_path: Path) -> None:
    counter_a, counter_b = tmp_path / "a", tmp_path / "b"
    workflow = wf(
        Step(id="a", python="teststeps:count_and_echo", with_={"counter": str(counter_a), "value": 10}),
        Step(id="b", python="teststeps:flaky", with_={"counter": str(counter_b), "fail_times": 1}),
        Step(id="c", python="teststeps:echo", with_={"value": "${steps.a.output} / ${steps.b.output}"}),
    )
    first = factory.run(workflow, store=store, settings=settings)
    assert first.status == RunStatus.FAILED
    assert statuses(store, first.run_id) == {"a": "succeeded", "b": "failed", "c": "skipped"}
    resumed = factory.resume(first.run_id, store=store, settings=settings)
    assert resumed.ok, resumed.error
    assert resumed.outputs["c"] == "10 / ok after 2 attempts"
    assert calls(counter_a) == 1 and calls(counter_b) == 2
    assert {s.step_id: s.attempts for s in store.get_steps(first.run_id)} == {"a": 1, "b": 2, "c": 1}
    assert "run.resumed" in [e.type for e in store.events(0, first.run_id)]
    with pytest.raises(factory.FactoryError, match="already succeeded"):
        factory.resume(first.run_id, store=store, settings=settings)


def test_every_state_change_is_an_event(store: SQLiteStore, settings: Settings) -> None:
    result = factory.run(
        wf(
            Step(id="a", python="teststeps:add", with_={"a": 1, "b": 2}),
            Step(id="b", python="teststeps:add", with_={"a": "${steps.a.output}", "b": 2}),
        ),
        store=store,
        settings=settings,
    )
    events = store.events(0, result.run_id)
    assert [(e.type, e.step_id) for e in events] == [
        ("run.created", None),
        ("step.created", "a"),
        ("step.created", "b"),
        ("run.started", None),
        ("step.started", "a"),
        ("step.succeeded", "a"),
        ("step.started", "b"),
        ("step.succeeded", "b"),
        ("run.usage", None),  # what the run used: a later `resume --budget` counts on from it
        ("run.succeeded", None),
    ]
    assert events[-2].data == {
        "attempts": 2,
        "steps": 2,
        "tokens": 0,
        "cost_usd": 0.0,
        "seconds": events[-2].data["seconds"],
    }


def test_inputs_must_be_declared(store: SQLiteStore, settings: Settings) -> None:
    workflow = wf(Step(id="a", python="teststeps:echo", with_={"value": "${inputs.x}"}), inputs={"x": 1})
    with pytest.raises(factory.WorkflowValidationError, match="unknown input 'y'"):
        factory.run(workflow, {"y": 2}, store=store, settings=settings)
    assert factory.run(workflow, {"x": "two"}, store=store, settings=settings).outputs == {"a": "two"}


def test_runs_do_not_share_state(store: SQLiteStore, settings: Settings) -> None:
    workflow = wf(Step(id="a", python="teststeps:echo", with_={"value": "${inputs.x}"}), inputs={"x": 0})
    results: list[factory.RunResult] = []
    threads = [
        threading.Thread(
            target=lambda i=i: results.append(factory.run(workflow, {"x": i}, store=store, settings=settings))
        )
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.outputs["a"] for r in results) == [0, 1, 2, 3]
    assert len({r.run_id for r in results}) == 4


def test_cancelling_a_run_that_nobody_runs(store: SQLiteStore, settings: Settings, tmp_path: Path) -> None:
    """A pending run (or one whose coordinator died) is cancelled on the spot, and a start
    that comes later does not run it; an explicit resume does."""
    counter = tmp_path / "c"
    workflow = wf(Step(id="a", python="teststeps:count_and_echo", with_={"counter": str(counter), "value": 1}))
    run_id = factory.api.create_run(workflow, store=store)
    assert factory.cancel(run_id, store=store, settings=settings)
    assert store.get_run(run_id).status == RunStatus.CANCELLED
    assert statuses(store, run_id) == {"a": "cancelled"}
    late = factory.resume(run_id, store=store, settings=settings, pending_only=True)  # the runner's start
    assert late.status == RunStatus.CANCELLED and calls(counter) == 0
    again = factory.resume(run_id, store=store, settings=settings)  # on purpose
    assert again.ok and calls(counter) == 1

    orphan = factory.api.create_run(workflow, store=store)
    store.claim_run(orphan, "a-coordinator-that-died", lease_seconds=60)
    from factory.store import RunChange

    store.record([RunChange(orphan, RunStatus.RUNNING, "run.started")])
    store.heartbeat(orphan, "a-coordinator-that-died")
    lapsed = settings.model_copy(update={"lease_seconds": 0.01})
    time.sleep(0.05)
    assert factory.cancel(orphan, store=store, settings=lapsed)
    assert store.get_run(orphan).status == RunStatus.CANCELLED


def test_the_cli_run_path_validates_the_workflow_and_reads_the_catalogue_once(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`factory run` validates the workflow and reads agents.yaml once, however many layers
    (CLI backend, Python API, agent dispatcher) it goes through."""
    import factory.api
    import factory.catalog
    import factory.cli.local
    import factory.dag
    from factory.cli.backend import Watch
    from factory.cli.local import LocalBackend

    counts = {"validate": 0, "catalog": 0}
    real_validate, real_catalog = factory.dag.validate_data, factory.catalog.load_catalog

    def validate(*args: Any, **kwargs: Any) -> Any:
        counts["validate"] += 1
        return real_validate(*args, **kwargs)

    def catalog(*args: Any, **kwargs: Any) -> Any:
        counts["catalog"] += 1
        return real_catalog(*args, **kwargs)

    monkeypatch.setattr(factory.dag, "validate_data", validate)
    for module in (factory.catalog, factory.api, factory.cli.local):
        monkeypatch.setattr(module, "load_catalog", catalog)
    agents = tmp_path / "agents.yaml"
    agents.write_text("agents: []\n")
    backend = LocalBackend(settings)
    try:
        result = backend.run(REPO / "examples/sales_stats/workflow.yaml", {}, agents, Watch())
    finally:
        backend.close()
    assert result.ok, result.error
    assert counts == {"validate": 1, "catalog": 1}


def _counted_chain(tmp_path: Path, middle: Step) -> tuple[Workflow, Path, Path]:
    """first -> middle -> last, each the only dependant of the one before: one Ray task."""
    first_counter, last_counter = tmp_path / "first", tmp_path / "last"
    return (
        wf(
            Step(id="first", python="teststeps:count_and_echo", with_={"counter": str(first_counter), "value": 1}),
            middle,
            Step(
                id="last",
                python="teststeps:count_and_echo",
                with_={"counter": str(last_counter), "value": "${steps.middle.output}"},
                needs=["middle"],
            ),
        ),
        first_counter,
        last_counter,
    )


def test_a_worker_killed_in_the_middle_of_a_chain_reruns_only_that_step(
    store: SQLiteStore, settings: Settings, tmp_path: Path
) -> None:
    """The chain's task dies with the step that SIGKILLs its worker. A death in a task of several
    steps charges none of them (an outcome yielded just before can be lost with the worker): the
    unreported steps go again, a task each, as the same attempts. The step kills its worker again,
    alone now, and is charged; its retry succeeds (its once() side effect not repeated), and the
    step after it runs once, after the retry."""
    charge = tmp_path / "charge"
    middle = Step(
        id="middle",
        python="teststeps:once_then_fail",
        with_={"counter": str(charge), "fail_times": 2, "kill": True},
        retry=RetryPolicy(max_attempts=2, backoff=0.01),
        needs=["first"],
    )
    workflow, first_counter, last_counter = _counted_chain(tmp_path, middle)
    result = factory.run(workflow, store=store, settings=settings)
    assert result.ok, result.error
    assert result.outputs["last"] == {"charged": 1, "attempt": 2, "key": result.outputs["last"]["key"], "item": None}
    # first ran once, or twice when what it yielded was lost with the worker (then it had not been
    # committed: it ran again as the same attempt)
    assert calls(first_counter) in (1, 2) and calls(last_counter) == 1 and calls(charge) == 1
    assert calls(Path(str(charge) + ".attempts")) == 3  # killed in the chain, killed alone, succeeded
    assert {s.step_id: s.attempts for s in store.get_steps(result.run_id)} == {"first": 1, "middle": 2, "last": 1}
    retrying = [e for e in store.events(0, result.run_id) if e.type == "step.retrying"]
    assert [e.step_id for e in retrying] == ["middle"]


def test_a_step_that_times_out_in_a_chain_fails_it_and_skips_the_rest(
    store: SQLiteStore, settings: Settings, tmp_path: Path
) -> None:
    """A step stuck where the timeout's interrupt cannot reach is stopped with its worker, which
    ran the chain: the step fails, the steps before it stay succeeded, the one after is skipped."""
    middle = Step(
        id="middle",
        python="teststeps:stuck_in_native",
        with_={"seconds": 60, "counter": str(tmp_path / "stuck")},
        timeout=0.5,
        needs=["first"],
    )
    workflow, first_counter, last_counter = _counted_chain(tmp_path, middle)
    start = time.monotonic()
    result = factory.run(workflow, store=store, settings=settings)
    assert time.monotonic() - start < 30
    assert result.status == RunStatus.FAILED and "worker process was killed" in (result.error or "")
    assert statuses(store, result.run_id) == {"first": "succeeded", "middle": "failed", "last": "skipped"}
    assert calls(first_counter) == 1 and calls(last_counter) == 0


def test_cancel_in_the_middle_of_a_long_chain_stops_it_there(
    store: SQLiteStore, settings: Settings, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    steps = [Step(id="s0", python="teststeps:slow_record", with_={"path": str(log), "value": 0, "seconds": 0.2})]
    steps += [
        Step(
            id=f"s{i}",
            python="teststeps:slow_record",
            with_={"path": str(log), "value": i, "seconds": 0.2},
            needs=[f"s{i - 1}"],
        )
        for i in range(1, 40)
    ]
    run_id = cancelled_once(wf(*steps), store, settings, lambda run: statuses(store, run).get("s3") == "succeeded")
    final = statuses(store, run_id)
    done = [s for s, status in final.items() if status == "succeeded"]
    assert 4 <= len(done) < 40 and set(final.values()) == {"succeeded", "cancelled"}
    time.sleep(1)
    ran = [int(line) for line in log.read_text().split()]
    # nothing ran after the cancel: the worker runs ahead of the coordinator, so besides the steps
    # committed, the step whose outcome came back as the cancel was carried out and the one the worker
    # had begun meanwhile may have started (each logs as it starts); nothing after those
    assert ran == list(range(len(ran))) and len(ran) <= len(done) + 2


def test_a_worker_killed_in_a_task_of_several_items_reruns_only_that_item(
    store: SQLiteStore, settings: Settings, tmp_path: Path
) -> None:
    """Quick items go several per task once their time is known. The item that kills its worker
    kills the task: none of its items is charged (what the items before it yielded can be lost
    with the worker), and its unreported items go again, each alone, as the same attempts. Only
    those ran twice (uncommitted), and the killed one ran twice; every other item ran once. When
    the killer was the only item of its task left unreported (the last of its task, or alone in
    one), it is the one that died, and it is charged: its second run is its second attempt."""
    folder = tmp_path / "runs"
    folder.mkdir()
    fan = Step(
        id="fan",
        python="teststeps:die_once_at",
        for_each=list(range(400)),
        with_={"folder": str(folder), "item": "${item}", "at": 300},
        retry=RetryPolicy(max_attempts=2, backoff=0.01),
    )
    result = factory.run(wf(fan), store=store, settings=settings)
    assert result.ok, result.error
    assert result.outputs["fan"] == [2 * i for i in range(400)]
    runs = {int(p.name): len(p.read_text()) for p in folder.iterdir()}
    twice = sorted(i for i, n in runs.items() if n == 2)
    assert set(runs) == set(range(400)) and set(runs.values()) <= {1, 2} and runs[300] == 2
    assert twice == list(range(twice[0], 301)) and len(twice) <= MAX_ITEMS_PER_TASK  # the killer's task only
    attempts = {i.index: i.attempts for i in store.get_items(result.run_id, "fan")}
    assert attempts[300] == 1 or (attempts[300] == 2 and twice == [300])
    assert {i: n for i, n in attempts.items() if i != 300} == {i: 1 for i in range(400) if i != 300}


def test_cancel_in_the_middle_of_a_fan_out_of_quick_items(
    store: SQLiteStore, settings: Settings, tmp_path: Path
) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    fan = Step(
        id="fan",
        python="teststeps:die_once_at",
        for_each=list(range(2000)),
        with_={"folder": str(folder), "item": "${item}", "at": -1, "seconds": 0.005},
    )
    run_id = cancelled_once(wf(fan), store, settings, lambda run: len(store.get_items(run, "fan")) >= 100)
    committed = len(store.get_items(run_id, "fan"))
    time.sleep(1)
    ran = sum(len(p.read_text()) for p in folder.iterdir())
    assert 100 <= committed < 2000 and ran < 2000  # the tasks of items in flight stopped
    # no item ran twice (a file can be empty: its item's worker was killed as it began to write)
    assert all(len(p.read_text()) <= 1 for p in folder.iterdir())


@pytest.fixture
def groups_seen(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The steps of each group the engine sends to Ray (RayBackend.submit_group, spied on); the
    engine sizes groups for 2 CPUs (the session's Ray has 4), so that they are known here."""
    monkeypatch.setattr(RayBackend, "parallelism", lambda self: 2)
    seen: list[list[str]] = []
    submit_group = RayBackend.submit_group

    def spy(self: RayBackend, calls: list[Any], sources: list[tuple[int, ...]], deps: list[Any]) -> Any:
        seen.append([call.step_id for call in calls])
        return submit_group(self, calls, sources, deps)

    monkeypatch.setattr(RayBackend, "submit_group", spy)
    return seen


def _fan_and_join(folder: Path, killer: int = -1, sleeper: int = -1, retry: RetryPolicy | None = None) -> Workflow:
    """root -> b1..b6 -> join, every step short (die_once_at, known to be short in this process):
    they go in groups. Step b``killer`` SIGKILLs its worker on its first run; b``sleeper``
    sleeps 0.3 s (longer than a group's budget)."""
    known = 0.0001
    for _ in range(5):
        STEP_TIMES.learn(timed_as("teststeps:die_once_at", FIXTURES), known)
        STEP_TIMES.learn(timed_as("teststeps:tally", FIXTURES), known)
    steps = [Step(id="root", python="teststeps:die_once_at", with_={"folder": str(folder), "item": 0, "at": -1})]
    for i in range(1, 7):
        steps.append(
            Step(
                id=f"b{i}",
                python="teststeps:die_once_at",
                with_={"folder": str(folder), "item": i, "at": killer, "seconds": 0.3 if i == sleeper else 0.0},
                needs=["root"],
                retry=retry or RetryPolicy(),
            )
        )
    given = [f"${{steps.b{i}.output}}" for i in range(1, 7)]
    join = {"counter": str(folder / "join"), "fail_times": 0, "given": given}
    steps.append(Step(id="join", python="teststeps:tally", with_=join))
    return wf(*steps, name="fan-and-join")


def test_short_steps_with_joins_go_in_groups_and_a_killed_worker_charges_none_but_the_killer(
    store: SQLiteStore, settings: Settings, tmp_path: Path, groups_seen: list[list[str]]
) -> None:
    """On Ray: the steps go in groups of four (8 short steps at once, 2 CPUs). b3 kills its
    worker in its group: the group's steps that had not reported go again alone, as the same
    attempts (the ones whose outcomes were lost with the worker run again); b3 is charged only
    if it was the only one left (then its retry succeeds); the run succeeds, the join once."""
    folder = tmp_path / "runs"
    folder.mkdir()
    result = factory.run(
        _fan_and_join(folder, killer=3, retry=RetryPolicy(max_attempts=2, backoff=0.01)), store=store, settings=settings
    )
    assert result.ok, result.error
    assert result.outputs["join"] == 1 + sum(2 * i for i in range(1, 7))
    group = groups_seen[0]
    assert group == ["root", "b1", "b2", "b3"] and sum(map(len, groups_seen)) == 8
    runs = {int(p.name): len(p.read_text()) for p in folder.iterdir() if p.name != "join"}
    assert runs[3] == 2 and set(runs.values()) <= {1, 2} and calls(folder / "join") == 1
    before = group[: group.index("b3")]  # ran in the group before b3: lost or reported
    assert all(runs[0 if s == "root" else int(s[1:])] in (1, 2) for s in before)
    attempts = {s.step_id: s.attempts for s in store.get_steps(result.run_id)}
    assert attempts == {**dict.fromkeys(["root", "b1", "b2", "b4", "b5", "b6", "join"], 1), "b3": attempts["b3"]}
    retrying = [e.step_id for e in store.events(0, result.run_id) if e.type == "step.retrying"]
    assert retrying == (["b3"] if attempts["b3"] == 2 else [])


def test_a_group_past_its_budget_stops_and_its_steps_left_go_alone(
    store: SQLiteStore, settings: Settings, tmp_path: Path, groups_seen: list[list[str]]
) -> None:
    """b2 was known short but sleeps 0.3 s, past a group's budget (0.1 s): its group stops after
    it and the steps left in it go as tasks of their own. Every step runs once."""
    folder = tmp_path / "runs"
    folder.mkdir()
    sent_alone: list[str] = []
    submit_step = RayBackend.submit_step

    def spy(self: RayBackend, call: Any, deps: list[Any], options: dict[str, Any]) -> Any:
        sent_alone.append(call.step_id)
        return submit_step(self, call, deps, options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RayBackend, "submit_step", spy)
        result = factory.run(_fan_and_join(folder, sleeper=2), store=store, settings=settings)
    assert result.ok, result.error
    assert groups_seen[0] == ["root", "b1", "b2", "b3"]
    assert "b3" in sent_alone  # after b2, the group had run past its budget
    runs = {int(p.name): len(p.read_text()) for p in folder.iterdir() if p.name != "join"}
    assert runs == dict.fromkeys(range(7), 1) and calls(folder / "join") == 1
    assert {s.step_id: s.attempts for s in store.get_steps(result.run_id)} == dict.fromkeys(
        ["root", *(f"b{i}" for i in range(1, 7)), "join"], 1
    )
