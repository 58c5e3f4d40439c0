"""ProgressCounter: the counts that `factory --api run/resume` and `factory submit --follow`
show, built from a run's events, agree with what the coordinator itself would count."""

from __future__ import annotations

from typing import Any

import pytest

from factory.cli.backend import ProgressCounter
from factory.engine import Progress

pytestmark = pytest.mark.unit


Event = tuple[str, str | None] | tuple[str, str | None, dict[str, Any]]


def feed(counter: ProgressCounter, *events: Event) -> Progress:
    counts = counter.counts
    for event in events:
        counts = counter.add(*event)
    return counts


def test_running_retrying_and_finished_steps() -> None:
    counts = feed(
        ProgressCounter(),
        ("step.created", "a"),
        ("step.created", "b"),
        ("step.created", "c"),
        ("run.started", None),
        ("step.started", "a"),
        ("step.started", "b"),
        ("step.log", "a", {"line": "x"}),
    )
    assert (counts.total, counts.running, counts.retrying) == (3, 2, 0)
    counts = feed(ProgressCounter(counts), ("step.started", "a"), ("step.retrying", "a", {"delay": 0.1}))
    assert (counts.running, counts.retrying) == (0, 1)


def test_a_retry_moves_the_step_back_to_running_then_done() -> None:
    counter = ProgressCounter()
    feed(counter, ("step.created", "a"), ("step.created", "b"), ("step.started", "a"), ("step.started", "b"))
    counts = feed(counter, ("step.retrying", "a", {"delay": 0.5, "attempt": 1}))
    assert (counts.running, counts.retrying) == (1, 1)
    counts = feed(counter, ("step.started", "a"))
    assert (counts.running, counts.retrying) == (2, 0)
    counts = feed(counter, ("step.succeeded", "a"), ("step.failed", "b"))
    assert (counts.running, counts.retrying, counts.succeeded, counts.failed) == (0, 0, 1, 1)
    assert counts.finished == 2


def test_an_item_waiting_to_retry_leaves_its_step_running() -> None:
    counter = ProgressCounter()
    feed(counter, ("step.created", "fan"), ("step.started", "fan"))
    counts = feed(counter, ("step.retrying", "fan", {"delay": 0.1, "attempt": 1, "item": 3}))
    assert (counts.running, counts.retrying) == (1, 0)


def test_a_resumed_run_counts_its_committed_steps_as_succeeded() -> None:
    counter = ProgressCounter(Progress(total=4))  # a resume follows from after the old events
    counts = feed(counter, ("run.resume_requested", None), ("run.resumed", None, {"already_done": 3}))
    assert (counts.total, counts.succeeded, counts.finished) == (4, 3, 3)
    counts = feed(counter, ("step.started", "d"), ("step.succeeded", "d"))
    assert (counts.succeeded, counts.running) == (4, 0)


def test_a_nonsense_already_done_is_ignored() -> None:
    counts = feed(ProgressCounter(Progress(total=2)), ("run.resumed", None, {"already_done": "lots"}))
    assert counts.succeeded == 0


def test_items_of_a_running_fan_out_from_its_step_items_events() -> None:
    counter = ProgressCounter()
    feed(counter, ("step.created", "fan"), ("step.started", "fan"), ("step.items", "fan", {"done": 3, "total": 10}))
    counts = feed(counter, ("step.items", "fan", {"done": 7, "total": 10}))
    assert (counts.items_done, counts.items_total) == (7, 10)
    counts = feed(counter, ("step.items", "fan", {"done": 12, "total": 10}))  # nonsense: ignored
    assert (counts.items_done, counts.items_total) == (7, 10)
    counts = feed(counter, ("step.succeeded", "fan"))
    assert (counts.items_done, counts.items_total, counts.succeeded) == (0, 0, 1)


def test_live_events_of_a_running_step_leave_it_running() -> None:
    counts = feed(
        ProgressCounter(),
        ("step.created", "a"),
        ("step.started", "a"),
        ("step.progress", "a", {"fraction": 0.5, "message": "half", "attempt": 1}),
        ("step.emitted", "a", {"items": [1], "attempt": 1}),
        ("step.tool_call", "a", {"id": "c1", "name": "s__t", "arguments": "{}", "attempt": 1}),
        ("step.tool_result", "a", {"id": "c1", "error": False, "text": "ok", "attempt": 1}),
    )
    assert counts.running == 1
    assert feed(ProgressCounter(counts), ("step.succeeded", "a")).running == 0


def test_the_bar_gives_a_reporting_step_its_own_line_until_it_ends() -> None:
    from factory.cli.runs import ProgressBar

    bar = ProgressBar(enabled=False)
    bar.enabled = True  # not started: no terminal needed, the tasks are still kept
    bar.event({"type": "step.progress", "step_id": "embed", "data": {"fraction": 0.25, "message": "shard 1"}})
    bar.event({"type": "step.progress", "step_id": "embed", "data": {"fraction": 0.5, "message": "shard 2"}})
    bar.event({"type": "step.progress", "step_id": "fetch", "data": {"fraction": None, "message": "[b]x"}})
    tasks = {t.description.strip(): t for t in bar.progress.tasks}
    assert tasks["embed"].completed == 50 and tasks["embed"].fields["detail"] == "shard 2"
    assert tasks["fetch"].total is None and tasks["fetch"].fields["detail"] == "\\[b]x"  # markup escaped
    bar.event({"type": "step.succeeded", "step_id": "embed", "data": {}})
    assert [t.description.strip() for t in bar.progress.tasks] == ["fetch"]
