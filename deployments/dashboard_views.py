"""What the dashboard's endpoints answer, built from the store's records: pure functions, no HTTP.

``GET /v1/run-summaries``, ``GET /v1/runs/{id}/graph`` and ``GET /v1/system`` return these models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field

from factory.auth import Scope, has_scope
from factory.costs import Usage, usage_of
from factory.dag import build_graph
from factory.spec import Workflow
from factory.store import ApiKeyRecord, AttemptRecord, Event, RunRecord, RunStatus, RunSummary, StepRecord, StepStatus

SYSTEM_WINDOW_MAX = 24 * 3600.0
SYSTEM_BUCKETS_MAX = 240


class WhoAmI(BaseModel):
    id: str
    name: str
    scopes: list[str]
    can_submit: bool = Field(description="May submit, cancel and resume runs.")
    can_admin: bool


def who_am_i(key: ApiKeyRecord) -> WhoAmI:
    return WhoAmI(
        id=key.id,
        name=key.name,
        scopes=key.scopes,
        can_submit=has_scope(key, Scope.SUBMIT),
        can_admin=has_scope(key, Scope.ADMIN),
    )


class SummaryPage(BaseModel):
    runs: list[RunSummary]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next (older) page; null at the end.")
    last_event_id: int = Field(
        default=0, description="The newest event before this page was read: follow GET /v1/events?after= from it."
    )


class GraphNode(BaseModel):
    id: str
    kind: str = Field(description="python, container, agent or route.")
    status: StepStatus
    attempts: int = 0
    for_each: bool = False
    items_total: int | None = Field(default=None, description="A for_each step's items, once known.")
    items_done: int | None = None
    progress: float | None = Field(
        default=None, description="A running step's newest ctx.progress() fraction (0 to 1), if it reports one."
    )
    progress_message: str | None = Field(default=None, description="And its message.")
    started_at: float | None = None
    finished_at: float | None = None
    duration: float | None = None
    error: str | None = None
    cached: bool = False
    usage: Usage | None = Field(
        default=None, description="Tokens and estimated cost, from the committed output (as in GET /v1/runs/{id})."
    )


class GraphEdge(BaseModel):
    source: str
    target: str


class RunGraph(BaseModel):
    run_id: str
    workflow: str
    status: RunStatus
    nodes: list[GraphNode]
    edges: list[GraphEdge]
    order: list[str] = Field(description="Step ids in a topological order.")
    counts: dict[str, int] = Field(description="Steps by status.")
    workflow_ref: str | None = Field(default=None, description="name@version of a registered workflow.")
    spec: dict[str, Any] | None = Field(
        default=None,
        description="The workflow as submitted, to run it again: only for keys that may submit (a spec can "
        "hold container env values and mounts that a read key has no business seeing).",
    )
    last_event_id: int = Field(
        default=0,
        description="The run's newest event before the steps were read (0: none yet): the graph reflects every "
        "event of this run up to it; follow the run's events after it to update the graph yourself.",
    )


class SystemPoint(BaseModel):
    t: float = Field(description="Start of the bucket (unix seconds).")
    steps: int = Field(description="Attempts finished in the bucket.")
    steps_per_s: float
    p50: float | None = Field(description="Median attempt duration in seconds.")
    p99: float | None
    failures: int
    retries: int


class RayNode(BaseModel):
    node_id: str
    address: str
    alive: bool
    cpu_total: float = 0.0
    cpu_used: float = 0.0
    memory_total: float = 0.0
    memory_used: float = 0.0


class SystemView(BaseModel):
    now: float
    window: float
    bucket: float
    series: list[SystemPoint]
    runs_by_status: dict[str, int]
    queues: dict[str, int] = Field(default_factory=dict, description="Queue depth of each agent pool.")
    nodes: list[RayNode] = Field(default_factory=list)


def summary_cursor(summary: RunSummary) -> str:
    return f"{summary.created_at!r}:{summary.id}"


def summary_page(records: list[RunSummary], limit: int, last_event_id: int = 0) -> SummaryPage:
    """A page from ``limit + 1`` records: the extra one only says there is a next page."""
    page = records[:limit]
    return SummaryPage(
        runs=page,
        next_cursor=summary_cursor(page[-1]) if len(records) > limit else None,
        last_event_id=last_event_id,
    )


def run_graph(
    record: RunRecord,
    steps: list[StepRecord],
    now: float,
    item_progress: dict[str, dict[str, Any]] | None = None,
    *,
    with_spec: bool = True,
    step_progress: dict[str, dict[str, Any]] | None = None,
    last_event_id: int = 0,
    prices: Mapping[str, tuple[float, float]] | None = None,
) -> RunGraph:
    """The run's DAG: one node per step (a for_each step stays one node, its items counted:
    from its output once it succeeded, else from ``item_progress``, the newest ``step.items``
    event's data of each step). ``with_spec``: include the workflow as submitted.
    ``step_progress``: the newest ``step.progress`` data of each step, shown on running ones.
    ``prices``: the model prices the nodes' usage is estimated with."""
    workflow = Workflow.model_validate_json(record.spec_json)
    graph = build_graph(workflow)
    by_id = {s.step_id: s for s in steps}
    nodes: list[GraphNode] = []
    counts: dict[str, int] = {}
    for step in workflow.steps:
        state = by_id.get(step.id)
        status = state.status if state is not None else StepStatus.PENDING
        counts[status.value] = counts.get(status.value, 0) + 1
        node = GraphNode(id=step.id, kind=step.kind, status=status, for_each=step.for_each is not None)
        if state is not None:
            node.attempts = state.attempts
            node.started_at, node.finished_at = state.started_at, state.finished_at
            node.error, node.cached = state.error, state.cached
            if state.started_at is not None:
                node.duration = (state.finished_at or now) - state.started_at
            if state.status == StepStatus.SUCCEEDED and '"usage"' in (state.output_json or ""):  # parse only then
                node.usage = usage_of(state.output, prices or {})
            if node.for_each:
                output = state.output if state.status == StepStatus.SUCCEEDED else None
                progress = (item_progress or {}).get(step.id)
                if isinstance(output, list):
                    node.items_total = node.items_done = len(output)
                elif progress is not None:
                    node.items_done, node.items_total = int(progress["done"]), int(progress["total"])
            reported = (step_progress or {}).get(step.id)
            if reported is not None and status in (StepStatus.RUNNING, StepStatus.RETRYING):
                fraction = reported.get("fraction")
                node.progress = float(fraction) if isinstance(fraction, int | float) else None
                message = reported.get("message")
                node.progress_message = message if isinstance(message, str) else None
        nodes.append(node)
    edges = [GraphEdge(source=dep, target=step_id) for step_id, deps in graph.deps.items() for dep in deps]
    return RunGraph(
        run_id=record.id,
        workflow=record.workflow_name,
        status=record.status,
        nodes=nodes,
        edges=edges,
        order=graph.order,
        counts=counts,
        workflow_ref=record.grants.workflow_ref if record.grants else None,
        spec=workflow.model_dump(mode="json", by_alias=True, exclude_defaults=True) if with_spec else None,
        last_event_id=last_event_id,
    )


def step_progress(events: list[Event]) -> dict[str, dict[str, Any]]:
    """The newest ``step.progress`` data of each step, from events newest first."""
    progress: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.step_id and event.step_id not in progress and "fraction" in event.data:
            progress[event.step_id] = event.data
    return progress


def item_progress(events: list[Event]) -> dict[str, dict[str, Any]]:
    """The newest ``step.items`` data of each step, from events newest first."""
    progress: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.step_id and event.step_id not in progress and {"done", "total"} <= event.data.keys():
            progress[event.step_id] = event.data
    return progress


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by the nearest-rank method; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def system_series(
    attempts: list[AttemptRecord], retry_times: list[float], now: float, window: float, bucket: float
) -> list[SystemPoint]:
    """Buckets of ``bucket`` seconds covering the last ``window`` seconds, oldest first."""
    count = max(1, math.ceil(window / bucket))
    start = now - count * bucket
    durations: list[list[float]] = [[] for _ in range(count)]
    finished = [0] * count
    failures = [0] * count
    retries = [0] * count

    def index(ts: float) -> int | None:
        i = int((ts - start) // bucket)
        return i if 0 <= i < count else None

    for attempt in attempts:
        i = index(attempt.finished_at)
        if i is None:
            continue
        finished[i] += 1
        if attempt.duration is not None:
            durations[i].append(attempt.duration)
        if attempt.status != StepStatus.SUCCEEDED:
            failures[i] += 1
    for ts in retry_times:
        i = index(ts)
        if i is not None:
            retries[i] += 1
    return [
        SystemPoint(
            t=start + i * bucket,
            steps=finished[i],
            steps_per_s=finished[i] / bucket,
            p50=percentile(durations[i], 50),
            p99=percentile(durations[i], 99),
            failures=failures[i],
            retries=retries[i],
        )
        for i in range(count)
    ]


def pool_queues(agents: dict[str, Any]) -> dict[str, int]:
    """Queue depth of each live pool of an agents view (factory.agents_view)."""
    queues: dict[str, int] = {}
    for agent in agents.get("agents", []):
        pool = agent.get("pool")
        if isinstance(pool, dict):
            depth = pool.get("queued", 0)
            queues[str(agent["name"])] = int(depth) if isinstance(depth, int | float) else 0
    return queues


def ray_nodes(nodes: list[dict[str, Any]], available: dict[str, dict[str, float]]) -> list[RayNode]:
    """Ray's nodes (``ray.nodes()``) with their logical CPU and memory in use."""
    views = []
    for node in nodes:
        node_id = str(node.get("NodeID", ""))
        total = node.get("Resources") or {}
        free = available.get(node_id, {})
        cpu, memory = float(total.get("CPU", 0.0)), float(total.get("memory", 0.0))
        views.append(
            RayNode(
                node_id=node_id,
                address=str(node.get("NodeManagerAddress", "")),
                alive=bool(node.get("Alive", False)),
                cpu_total=cpu,
                cpu_used=max(0.0, cpu - float(free.get("CPU", cpu))),
                memory_total=memory,
                memory_used=max(0.0, memory - float(free.get("memory", memory))),
            )
        )
    return views
