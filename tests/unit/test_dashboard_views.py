"""The dashboard's views built from store records (deployments.dashboard_views), without servers."""

from __future__ import annotations

import json

from deployments.dashboard_views import (
    item_progress,
    percentile,
    pool_queues,
    ray_nodes,
    run_graph,
    step_progress,
    summary_page,
    system_series,
)
from factory.spec import Workflow
from factory.store import AttemptRecord, Event, RunRecord, RunStatus, RunSummary, StepRecord, StepStatus

SPEC = {
    "name": "g",
    "inputs": {"xs": [1, 2, 3]},
    "steps": [
        {"id": "load", "python": "m:f"},
        {
            "id": "each",
            "python": "m:g",
            "for_each": "${inputs.xs}",
            "with": {"v": "${item}", "d": "${steps.load.output}"},
        },
        {"id": "side", "python": "m:h"},
        {"id": "join", "python": "m:j", "needs": ["each", "side"]},
    ],
}


def record() -> RunRecord:
    return RunRecord(
        id="r1", workflow_name="g", status=RunStatus.RUNNING, spec_json=json.dumps(SPEC), inputs={}, created_at=1.0
    )


def test_graph_has_a_node_per_step_and_the_dependencies_as_edges() -> None:
    steps = [
        StepRecord(run_id="r1", step_id="load", status=StepStatus.SUCCEEDED, attempts=2, started_at=10, finished_at=12),
        StepRecord(
            run_id="r1",
            step_id="each",
            status=StepStatus.SUCCEEDED,
            attempts=1,
            output_json=json.dumps([1, 2, 3]),
            started_at=12,
            finished_at=13,
        ),
        StepRecord(run_id="r1", step_id="side", status=StepStatus.RUNNING, attempts=1, started_at=11),
    ]
    graph = run_graph(record(), steps, now=20.0)
    nodes = {n.id: n for n in graph.nodes}
    assert list(nodes) == ["load", "each", "side", "join"]
    assert {(e.source, e.target) for e in graph.edges} == {("load", "each"), ("each", "join"), ("side", "join")}
    assert nodes["load"].attempts == 2 and nodes["load"].duration == 2
    assert nodes["side"].duration == 9  # running: up to now
    assert nodes["each"].for_each and (nodes["each"].items_done, nodes["each"].items_total) == (3, 3)
    assert nodes["join"].status == StepStatus.PENDING and not nodes["join"].for_each
    assert graph.order.index("load") < graph.order.index("each") < graph.order.index("join")
    assert graph.counts == {"succeeded": 2, "running": 1, "pending": 1}
    # the spec comes back as a workflow that validates to the same one (for "run again")
    assert Workflow.model_validate(graph.spec) == Workflow.model_validate(SPEC)


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([3.0], 99) == 3.0


def test_system_series_buckets_attempts_failures_and_retries() -> None:
    now = 1000.0

    def attempt(ts: float, duration: float, ok: bool = True) -> AttemptRecord:
        status = StepStatus.SUCCEEDED if ok else StepStatus.FAILED
        return AttemptRecord(run_id="r", step_id="s", attempt=1, status=status, duration=duration, finished_at=ts)

    attempts = [attempt(995, 1.0), attempt(996, 3.0), attempt(997, 2.0, ok=False), attempt(905, 9.0), attempt(10, 1)]
    series = system_series(attempts, retry_times=[998.0, 999.0, 1.0], now=now, window=100, bucket=10)
    assert len(series) == 10 and series[0].t == 900 and series[-1].t == 990
    last = series[-1]
    assert (last.steps, last.failures, last.retries) == (3, 1, 2)
    assert last.steps_per_s == 0.3 and last.p50 == 2.0 and last.p99 == 3.0
    assert series[0].steps == 1 and series[0].p50 == 9.0
    assert sum(p.steps for p in series) == 4  # the attempt outside the window is left out
    assert series[5].p50 is None and series[5].steps == 0


def test_summary_page_cursor_only_when_more() -> None:
    runs = [
        RunSummary(id=f"r{i}", workflow_name="w", status=RunStatus.SUCCEEDED, created_at=float(10 - i))
        for i in range(3)
    ]
    full = summary_page(runs, 2)
    assert [r.id for r in full.runs] == ["r0", "r1"] and full.next_cursor == "9.0:r1"
    assert summary_page(runs, 3).next_cursor is None


def test_queues_and_nodes() -> None:
    agents = {"agents": [{"name": "a", "pool": {"queued": 4}}, {"name": "b", "pool": None}]}
    assert pool_queues(agents) == {"a": 4}
    nodes = ray_nodes(
        [{"NodeID": "n1", "NodeManagerAddress": "10.0.0.1", "Alive": True, "Resources": {"CPU": 4.0, "memory": 8e9}}],
        {"n1": {"CPU": 1.0, "memory": 6e9}},
    )
    assert nodes[0].cpu_used == 3.0 and nodes[0].memory_used == 2e9 and nodes[0].alive


def test_a_running_for_each_step_counts_its_items_from_its_newest_progress_event() -> None:
    events = [  # newest first
        Event(id=9, run_id="r1", step_id="each", type="step.items", data={"done": 2, "total": 3}, ts=2),
        Event(id=5, run_id="r1", step_id="each", type="step.items", data={"done": 0, "total": 3}, ts=1),
    ]
    progress = item_progress(events)
    assert progress == {"each": {"done": 2, "total": 3}}
    steps = [StepRecord(run_id="r1", step_id="each", status=StepStatus.RUNNING, attempts=1, started_at=1)]
    node = next(n for n in run_graph(record(), steps, now=5.0, item_progress=progress).nodes if n.id == "each")
    assert (node.items_done, node.items_total) == (2, 3)


def test_a_running_step_shows_its_newest_reported_progress() -> None:
    events = [  # newest first
        Event(id=9, run_id="r1", step_id="side", type="step.progress", data={"fraction": 0.75, "message": "m"}, ts=2),
        Event(id=5, run_id="r1", step_id="side", type="step.progress", data={"fraction": 0.25}, ts=1),
        Event(id=4, run_id="r1", step_id="load", type="step.progress", data={"fraction": 0.5}, ts=1),
    ]
    reported = step_progress(events)
    assert reported == {"side": {"fraction": 0.75, "message": "m"}, "load": {"fraction": 0.5}}
    steps = [
        StepRecord(run_id="r1", step_id="load", status=StepStatus.SUCCEEDED, attempts=1, started_at=1, finished_at=2),
        StepRecord(run_id="r1", step_id="side", status=StepStatus.RUNNING, attempts=1, started_at=1),
    ]
    nodes = {n.id: n for n in run_graph(record(), steps, now=5.0, step_progress=reported).nodes}
    assert (nodes["side"].progress, nodes["side"].progress_message) == (0.75, "m")
    assert nodes["load"].progress is None  # finished: its progress is over

    from ui.render import node_caption, step_rows

    side = nodes["side"].model_dump(mode="json")
    assert node_caption(side).endswith("75%")
    assert step_rows([side])[0][1] == "running (75% m)"
