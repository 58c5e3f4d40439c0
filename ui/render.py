"""What the dashboard draws, from the API's answers: pure functions (no Gradio, no HTTP).

Everything a run, a step, a log line or a workflow name contains is escaped here
(``html.escape``) before it becomes markup: it is shown as text, never run.
"""

from __future__ import annotations

import datetime as dt
import json
from html import escape
from typing import Any

import networkx as nx

STATUS_COLOURS = {
    "pending": "#9ca3af",
    "running": "#3b82f6",
    "retrying": "#f59e0b",
    "waiting": "#a855f7",
    "succeeded": "#22c55e",
    "failed": "#ef4444",
    "skipped": "#d1d5db",
    "cancelled": "#6b7280",
}
FINAL_RUN = {"succeeded", "failed", "cancelled"}
NODE_W, NODE_H, GAP_X, GAP_Y = 170, 44, 60, 16
MAX_LABEL = 22


def colour(status: str) -> str:
    return STATUS_COLOURS.get(status, "#9ca3af")


def when(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 60:
        return f"{value:.2f}s"
    minutes, rest = divmod(value, 60)
    if minutes < 60:
        return f"{int(minutes)}m{rest:02.0f}s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)}h{int(minutes):02d}m"


def run_duration(run: dict[str, Any], now: float) -> float | None:
    start = run.get("started_at")
    if start is None:
        return None
    return float(run.get("finished_at") or now) - float(start)


def _short(text: str, limit: int = MAX_LABEL) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- runs ----------------------------------------------------------------------------------------

RUN_COLUMNS = ["run", "status", "workflow", "started", "duration", "steps done / total", "error"]


def run_rows(runs: list[dict[str, Any]], now: float) -> list[list[str]]:
    rows = []
    for run in runs:
        steps = f"{run['steps_done']} / {run['steps_total']}"
        if run.get("steps_failed"):
            steps += f" ({run['steps_failed']} failed)"
        rows.append(
            [
                run["id"],
                run["status"],
                run["workflow_name"],
                when(run.get("started_at") or run.get("created_at")),
                seconds(run_duration(run, now)),
                steps,
                _short(run.get("error") or "", 120),
            ]
        )
    return rows


# -- the DAG -----------------------------------------------------------------------------------------


def dag_layout(graph: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Node positions (pixels, top-left of each box): layers of the DAG left to right
    (networkx's topological generations and multipartite layout), then scaled to boxes."""
    g = nx.DiGraph()
    for node in graph["nodes"]:
        g.add_node(node["id"])
    g.add_edges_from((e["source"], e["target"]) for e in graph["edges"])
    if not g:
        return {}
    layer_of: dict[str, int] = {}
    for layer, names in enumerate(nx.topological_generations(g)):
        for name in names:
            layer_of[name] = layer
    nx.set_node_attributes(g, layer_of, "layer")
    raw = nx.multipartite_layout(g, subset_key="layer", align="vertical")
    by_layer: dict[int, list[str]] = {}
    for name in g.nodes:
        by_layer.setdefault(layer_of[name], []).append(name)
    positions: dict[str, tuple[float, float]] = {}
    for layer, names in by_layer.items():
        names.sort(key=lambda n: float(raw[n][1]), reverse=True)  # networkx's order within the layer
        for row, name in enumerate(names):
            positions[name] = (20 + layer * (NODE_W + GAP_X), 20 + row * (NODE_H + GAP_Y))
    return positions


def node_caption(node: dict[str, Any]) -> str:
    if node.get("for_each"):
        done, total = node.get("items_done"), node.get("items_total")
        items = f"{done}/{total} items" if total is not None else "items …"
        return f"{node['status']} · {items}"
    caption = str(node["status"])
    if node.get("attempts", 0) > 1:
        caption += f" · {node['attempts']} attempts"
    return caption


def dag_svg(graph: dict[str, Any]) -> str:
    """The run's DAG as SVG: a box per step coloured by status, arrows for dependencies."""
    positions = dag_layout(graph)
    if not positions:
        return '<div class="factory-empty">no steps</div>'
    width = max(x for x, _ in positions.values()) + NODE_W + 20
    height = max(y for _, y in positions.values()) + NODE_H + 20
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="dag-svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="12">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#6b7280"/></marker></defs>',
    ]
    for edge in graph["edges"]:
        if edge["source"] not in positions or edge["target"] not in positions:
            continue
        x1, y1 = positions[edge["source"]]
        x2, y2 = positions[edge["target"]]
        parts.append(
            f'<line x1="{x1 + NODE_W:.0f}" y1="{y1 + NODE_H / 2:.0f}" x2="{x2:.0f}" y2="{y2 + NODE_H / 2:.0f}" '
            'stroke="#9ca3af" stroke-width="1.2" marker-end="url(#arrow)"/>'
        )
    for node in graph["nodes"]:
        x, y = positions[node["id"]]
        step_id = escape(str(node["id"]))
        tip = f"{node['id']}: {node['status']}"
        if node.get("error"):
            tip += f"\n{node['error']}"
        parts.append(
            f'<g class="dag-node" data-step="{step_id}" data-status="{escape(str(node["status"]))}">'
            f"<title>{escape(tip)}</title>"
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{NODE_W}" height="{NODE_H}" rx="6" '
            f'fill="{colour(str(node["status"]))}" fill-opacity="0.25" stroke="{colour(str(node["status"]))}" '
            f'stroke-width="{3 if node.get("for_each") else 2}"/>'
            f'<text x="{x + 8:.0f}" y="{y + 18:.0f}" font-weight="bold">{escape(_short(str(node["id"])))}</text>'
            f'<text x="{x + 8:.0f}" y="{y + 35:.0f}" fill="#374151">{escape(node_caption(node))}</text></g>'
        )
    parts.append("</svg>")
    legend = " ".join(
        f'<span style="border-left:12px solid {c};padding-left:4px;margin-right:10px">{s}</span>'
        for s, c in STATUS_COLOURS.items()
    )
    return (
        f'<div class="factory-legend">{legend}</div><div style="overflow:auto;max-height:520px">{"".join(parts)}</div>'
    )


# -- the timeline ------------------------------------------------------------------------------------


def gantt_svg(nodes: list[dict[str, Any]], attempts: list[dict[str, Any]], now: float) -> str:
    """A row per step, a bar per attempt (retries side by side), the running attempt up to now."""
    bars: list[tuple[str, float, float, str, str]] = []  # step, start, end, status, tip
    finished_steps = set()
    for a in attempts:
        end = float(a["finished_at"])
        start = end - float(a.get("duration") or 0.0)
        tip = f"{a['step_id']} attempt {a['attempt']}: {a['status']} ({seconds(a.get('duration'))})"
        if a.get("error"):
            tip += f"\n{a['error']}"
        bars.append((a["step_id"], start, end, a["status"], tip))
        finished_steps.add((a["step_id"], a["attempt"]))
    for node in nodes:
        running = node["status"] in ("running", "retrying") and node.get("started_at") is not None
        if running and (node["id"], node.get("attempts", 0)) not in finished_steps:
            tip = f"{node['id']} attempt {node.get('attempts', 0)}: running"
            bars.append((node["id"], float(node["started_at"]), now, "running", tip))
    if not bars:
        return '<div class="factory-empty">no attempts yet</div>'
    rows = list(dict.fromkeys(n["id"] for n in nodes if any(b[0] == n["id"] for b in bars)))
    rows += [b[0] for b in bars if b[0] not in rows]
    t0 = min(b[1] for b in bars)
    t1 = max(max(b[2] for b in bars), t0 + 0.001)
    label_w, plot_w, row_h = 160, 640, 20
    scale = plot_w / (t1 - t0)
    height = len(rows) * row_h + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="gantt-svg" width="{label_w + plot_w + 20}" height="{height}" '
        'font-family="sans-serif" font-size="11">'
    ]
    for i, step in enumerate(rows):
        parts.append(f'<text x="4" y="{i * row_h + 14}">{escape(_short(step, 24))}</text>')
    for step, start, end, status, tip in bars:
        i = rows.index(step)
        x = label_w + (start - t0) * scale
        w = max(2.0, (end - start) * scale)
        parts.append(
            f'<rect x="{x:.1f}" y="{i * row_h + 3}" width="{w:.1f}" height="{row_h - 6}" rx="2" '
            f'fill="{colour(status)}" stroke="#111827" stroke-width="0.5"><title>{escape(tip)}</title></rect>'
        )
    axis_y = len(rows) * row_h + 16
    parts.append(f'<text x="{label_w}" y="{axis_y}">0s</text>')
    parts.append(f'<text x="{label_w + plot_w - 40}" y="{axis_y}">{escape(seconds(t1 - t0))}</text>')
    parts.append("</svg>")
    return f'<div style="overflow:auto;max-height:420px">{"".join(parts)}</div>'


# -- steps, events, logs ---------------------------------------------------------------------------

STEP_COLUMNS = ["step", "status", "attempts", "duration", "error"]


def step_rows(nodes: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for node in nodes:
        status = str(node["status"])
        if node.get("for_each") and node.get("items_total") is not None:
            status += f" ({node['items_done']}/{node['items_total']} items)"
        if node.get("cached"):
            status += " (cached)"
        rows.append(
            [
                str(node["id"]),
                status,
                str(node.get("attempts", 0)),
                seconds(node.get("duration")),
                _short(node.get("error") or "", 200),
            ]
        )
    return rows


EVENT_COLUMNS = ["id", "time", "type", "step", "data"]


def event_rows(events: list[dict[str, Any]], limit: int = 200) -> list[list[str]]:
    """The newest ``limit`` events, newest first (step.log lines shortened)."""
    rows = []
    for event in list(events)[-limit:][::-1]:
        data = event.get("data") or {}
        rows.append(
            [
                str(event["id"]),
                when(event.get("ts")),
                str(event["type"]),
                str(event.get("step_id") or ""),
                _short(json.dumps(data, ensure_ascii=False), 160),
            ]
        )
    return rows


def step_logs(step: str, attempts: list[dict[str, Any]], live: list[str]) -> str:
    """A step's finished attempts' logs, then the lines it printed since (it may still run)."""
    parts = []
    for a in attempts:
        if a["step_id"] != step:
            continue
        head = f"--- attempt {a['attempt']}: {a['status']} ({seconds(a.get('duration'))})"
        parts.append(head + (f"\n{a['error']}" if a.get("error") else ""))
        if a.get("logs"):
            parts.append(str(a["logs"]).rstrip("\n"))
    if live:
        parts.append("--- live")
        parts.extend(live)
    return "\n".join(parts) if parts else f"(no logs of step {step} yet)"


# -- agents -------------------------------------------------------------------------------------------

POOL_COLUMNS = ["agent", "capabilities", "replicas", "in flight", "queued", "health", "breaker"]


def pool_rows(agents: dict[str, Any]) -> list[list[str]]:
    rows = []
    for agent in agents.get("agents", []):
        pool = agent.get("pool")
        caps = ", ".join(str(c) for c in agent.get("capabilities") or [])
        if isinstance(pool, dict):
            replicas = f"{pool.get('replicas', 0)} ({pool.get('min_replicas', 0)}-{pool.get('max_replicas', 0)})"
            rows.append(
                [
                    str(agent["name"]),
                    caps,
                    replicas,
                    str(pool.get("in_flight", 0)),
                    str(pool.get("queued", 0)),
                    str(pool.get("health", "")),
                    str(pool.get("breaker", "")),
                ]
            )
        else:
            state = "runnable, no pool yet" if agent.get("runnable") else "catalogue only (routing)"
            rows.append([str(agent["name"]), caps, "0", "0", "0", state, ""])
    return rows


ROUTE_COLUMNS = ["agent", "score", "semantic", "load", "verdict"]


def route_rows(decision: dict[str, Any]) -> list[list[str]]:
    def row(agent: str, score: float, breakdown: dict[str, float], verdict: str) -> list[str]:
        return [
            agent,
            f"{score:.3f}",
            f"{breakdown.get('semantic', 0.0):.3f}",
            f"{breakdown.get('load', 0.0):.3f}",
            verdict,
        ]

    rows = [row(decision["agent"], float(decision["score"]), decision.get("breakdown") or {}, "chosen")]
    for c in decision.get("runners_up") or []:
        rows.append(row(c["agent"], float(c["score"]), c.get("breakdown") or {}, "runner-up"))
    for agent, why in (decision.get("filtered_out") or {}).items():
        rows.append([str(agent), "", "", "", f"filtered out: {why}"])
    return rows


# -- system --------------------------------------------------------------------------------------------


def series_records(view: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Long-format records for the plots: throughput, latency, failures/retries."""
    throughput, latency, trouble = [], [], []
    for point in view.get("series", []):
        t = dt.datetime.fromtimestamp(point["t"], tz=dt.UTC).replace(tzinfo=None)
        throughput.append({"time": t, "steps/s": point["steps_per_s"]})
        for name in ("p50", "p99"):
            if point.get(name) is not None:
                latency.append({"time": t, "seconds": point[name], "percentile": name})
        trouble.append({"time": t, "count": point["failures"], "kind": "failures"})
        trouble.append({"time": t, "count": point["retries"], "kind": "retries"})
    return {"throughput": throughput, "latency": latency, "trouble": trouble}


NODE_COLUMNS = ["node", "address", "alive", "CPU in use", "memory in use"]


def node_rows(view: dict[str, Any]) -> list[list[str]]:
    rows = []
    for node in view.get("nodes", []):
        mem_total, mem_used = node["memory_total"] / 1e9, node["memory_used"] / 1e9
        rows.append(
            [
                str(node["node_id"])[:12],
                str(node["address"]),
                "yes" if node["alive"] else "no",
                f"{node['cpu_used']:g} / {node['cpu_total']:g}",
                f"{mem_used:.1f} / {mem_total:.1f} GB",
            ]
        )
    return rows


# -- submitting --------------------------------------------------------------------------------------


def input_kind(default: Any) -> str:
    """The form field for a declared input, from its default: bool, int, float, text or json."""
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, str):
        return "text"
    return "json"


def parse_input(kind: str, value: Any) -> Any:
    """A form value as the input's type; ValueError with a readable message when it is not one."""
    if kind == "bool":
        return bool(value)
    if kind == "int":
        if value is None or float(value) != int(float(value)):
            raise ValueError(f"{value!r} is not a whole number")
        return int(float(value))
    if kind == "float":
        if value is None:
            raise ValueError("a number is needed")
        return float(value)
    if kind == "text":
        return "" if value is None else str(value)
    try:
        return json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
