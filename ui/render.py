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

from factory.costs import cost_text

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


COMPACT_OVER = 120  # more steps than this: each step a small cell in its layer's column, no arrows
CELL, CELL_GAP, CELLS_PER_COLUMN, LAYER_GAP = 12, 3, 25, 14
MAX_TIP = 600


def dag_positions(graph: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Each step's (layer, row): layers of the DAG by networkx's topological generations,
    the order within a layer by its multipartite layout."""
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
    positions: dict[str, tuple[int, int]] = {}
    for layer, names in by_layer.items():
        names.sort(key=lambda n: float(raw[n][1]), reverse=True)  # networkx's order within the layer
        for row, name in enumerate(names):
            positions[name] = (layer, row)
    return positions


def dag_layout(graph: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Node positions (pixels, top-left of each box): layers left to right, then scaled to boxes."""
    return {
        name: (20 + layer * (NODE_W + GAP_X), 20 + row * (NODE_H + GAP_Y))
        for name, (layer, row) in dag_positions(graph).items()
    }


def node_caption(node: dict[str, Any]) -> str:
    if node.get("for_each"):
        done, total = node.get("items_done"), node.get("items_total")
        items = f"{done}/{total} items" if total is not None else "items …"
        return f"{node['status']} · {items}"
    caption = str(node["status"])
    if node.get("attempts", 0) > 1:
        caption += f" · {node['attempts']} attempts"
    if isinstance(node.get("progress"), int | float):
        caption += f" · {round(100 * node['progress'])}%"
    return caption


def node_state(node: dict[str, Any]) -> list[str]:
    """What the graph view shows of a step that changes while it runs: [status, caption, tooltip]."""
    caption = node_caption(node)
    tip = f"{node['id']}: {caption}"
    if node.get("error"):
        tip += f"\n{node['error']}"
    return [str(node["status"]), caption, _short(tip, MAX_TIP)]


def dag_model(graph: dict[str, Any]) -> dict[str, Any]:
    """The run's DAG for the page's graph view (``DAG_JS`` draws it with DOM calls, every text as
    text): positions from :func:`dag_positions`, a state per step. Up to ``COMPACT_OVER`` steps,
    a labelled box per step and an arrow per dependency; above, a small cell per step (its id
    and state in the tooltip) in its layer's columns, and no arrows."""
    positions = dag_positions(graph)
    compact = len(positions) > COMPACT_OVER
    nodes: list[list[Any]] = []
    edges: list[list[int]] = []
    layers: list[list[Any]] = []
    if compact:
        per_layer: dict[int, int] = {}
        for layer, _ in positions.values():
            per_layer[layer] = per_layer.get(layer, 0) + 1
        left, x = {}, 20
        for layer in sorted(per_layer):
            left[layer] = x
            layers.append([x, 14, f"{layer + 1}", per_layer[layer]])
            columns = -(-per_layer[layer] // CELLS_PER_COLUMN)
            x += max(columns * (CELL + CELL_GAP), 18) + LAYER_GAP
        step = CELL + CELL_GAP
        place = {
            name: (left[layer] + (row // CELLS_PER_COLUMN) * step, 22 + (row % CELLS_PER_COLUMN) * step)
            for name, (layer, row) in positions.items()
        }
        width = x + 6
        height = 22 + min(CELLS_PER_COLUMN, max(r for _, r in positions.values()) + 1) * (CELL + CELL_GAP) + 10
        box = [CELL, CELL]
    else:
        place = {n: (20 + la * (NODE_W + GAP_X), 20 + r * (NODE_H + GAP_Y)) for n, (la, r) in positions.items()}
        width = max((x for x, _ in place.values()), default=0) + NODE_W + 20
        height = max((y for _, y in place.values()), default=0) + NODE_H + 20
        box = [NODE_W, NODE_H]
        for edge in graph["edges"]:
            if edge["source"] in place and edge["target"] in place:
                (x1, y1), (x2, y2) = place[edge["source"]], place[edge["target"]]
                edges.append([x1 + NODE_W, y1 + NODE_H // 2, x2, y2 + NODE_H // 2])
    for node in graph["nodes"]:
        if node["id"] in place:
            x, y = place[node["id"]]
            nodes.append([str(node["id"]), x, y, bool(node.get("for_each")), *node_state(node)])
    return {"compact": compact, "w": width, "h": height, "box": box, "nodes": nodes, "edges": edges, "layers": layers}


# The browser's graph view: draws ``dag_model`` and applies status updates (see ui.app.DagView).
# Every value from a run goes in through textContent or setAttribute: nothing is parsed as markup.
DAG_JS = """
const SVGNS = 'http://www.w3.org/2000/svg';
const COLOURS = __COLOURS__;
const host = element.querySelector('.dag-host');
const store = window.__factoryDag ||
  (window.__factoryDag = {gen: null, seq: -1, model: null, states: {}, pending: null});
function el(name, attrs) {
  const e = document.createElementNS(SVGNS, name);
  for (const k in attrs) e.setAttribute(k, String(attrs[k]));
  return e;
}
function colour(status) { return Object.prototype.hasOwnProperty.call(COLOURS, status) ? COLOURS[status] : '#9ca3af'; }
function paint(g, st) {
  g.setAttribute('data-status', String(st[0]));
  const c = colour(st[0]);
  const r = g.querySelector('rect');
  r.setAttribute('fill', c);
  r.setAttribute('stroke', c);
  g.querySelector('title').textContent = String(st[2]);
  const cap = g.querySelector('text.cap');
  if (cap) cap.textContent = String(st[1]);
}
function draw() {
  host.replaceChildren();
  store.els = {};
  const m = store.model;
  if (!m) return;
  if (!m.nodes.length) {
    const d = document.createElement('div');
    d.className = 'factory-empty';
    d.textContent = 'no steps';
    host.appendChild(d);
    return;
  }
  const svg = el('svg', {id: 'dag-svg', width: m.w, height: m.h, viewBox: `0 0 ${m.w} ${m.h}`,
                          'font-family': 'sans-serif', 'font-size': 12, 'data-compact': m.compact ? 'yes' : 'no'});
  const defs = el('defs', {});
  const marker = el('marker', {id: 'dag-arrow', viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 6,
                               markerHeight: 6, orient: 'auto-start-reverse'});
  marker.appendChild(el('path', {d: 'M 0 0 L 10 5 L 0 10 z', fill: '#6b7280'}));
  defs.appendChild(marker);
  svg.appendChild(defs);
  for (const [x1, y1, x2, y2] of m.edges) {
    svg.appendChild(el('line', {x1, y1, x2, y2, stroke: '#9ca3af', 'stroke-width': 1.2,
                                'marker-end': 'url(#dag-arrow)'}));
  }
  for (const [x, y, label, count] of m.layers) {
    const t = el('text', {x, y, fill: '#6b7280', 'font-size': 10});
    t.textContent = `${label} (${count})`;
    t.appendChild(el('title', {})).textContent = `layer ${label}: ${count} steps`;
    svg.appendChild(t);
  }
  const [w, h] = m.box;
  for (const [id, x, y, forEach, status, caption, tip] of m.nodes) {
    const g = el('g', {class: 'dag-node', 'data-step': id});
    g.appendChild(el('title', {}));
    g.appendChild(el('rect', {x, y, width: w, height: h, rx: m.compact ? 2 : 6, 'fill-opacity': m.compact ? 0.85 : 0.25,
                              'stroke-width': forEach ? 3 : (m.compact ? 0.5 : 2)}));
    if (!m.compact) {
      const name = el('text', {x: x + 8, y: y + 18, 'font-weight': 'bold'});
      name.textContent = id.length > 22 ? id.slice(0, 21) + '…' : id;
      g.appendChild(name);
      g.appendChild(el('text', {x: x + 8, y: y + 35, fill: '#374151', class: 'cap'}));
    }
    paint(g, store.states[id] || [status, caption, tip]);
    store.els[id] = g;
    svg.appendChild(g);
  }
  host.appendChild(svg);
}
function apply(nodes) {
  for (const id of Object.keys(nodes)) {
    store.states[id] = nodes[id];
    const g = store.els[id];
    if (g) paint(g, nodes[id]);
  }
}
function update(v) {
  if (!v || typeof v !== 'object' || v.gen === undefined) return;
  if (v.model) {
    if (v.gen === store.gen && v.seq < store.seq) return;
    if (v.gen === store.gen && store.model && host.querySelector('#dag-svg')) {
      // drawn already (a page sends its graph again, in case one was lost): the states only
      store.seq = v.seq;
      const states = {};
      for (const n of v.model.nodes) states[n[0]] = n.slice(4);
      apply(states);
      return;
    }
    store.gen = v.gen; store.seq = v.seq; store.model = v.model; store.states = {};
    draw();
    const p = store.pending;
    store.pending = null;
    if (p && p.gen === v.gen && p.seq > v.seq) { store.seq = p.seq; apply(p.nodes); }
  } else if (v.gen === store.gen) {
    if (v.seq > store.seq) { store.seq = v.seq; apply(v.nodes); }
  } else {
    store.pending = v;  // updates of a graph still on its way
  }
}
if (props.value && props.value.model) update(props.value);
else { if (store.model && store.gen !== null) draw(); update(props.value); }
watch('value', () => update(props.value));
""".replace("__COLOURS__", json.dumps(STATUS_COLOURS))


def dag_legend() -> str:
    return " ".join(
        f'<span style="border-left:12px solid {c};padding-left:4px;margin-right:10px">{s}</span>'
        for s, c in STATUS_COLOURS.items()
    )


STEP_EVENT_STATUS = {
    "step.started": "running",
    "step.succeeded": "succeeded",
    "step.cached": "succeeded",
    "step.failed": "failed",
    "step.retrying": "retrying",
    "step.skipped": "skipped",
    "step.cancelled": "cancelled",
    "step.waiting": "waiting",
}
RUN_EVENT_STATUS = {
    "run.started": "running",
    "run.resumed": "running",
    "run.adopted": "running",
    "run.waiting": "waiting",
    "run.succeeded": "succeeded",
    "run.failed": "failed",
    "run.cancelled": "cancelled",
}


def apply_events(graph: dict[str, Any], events: list[dict[str, Any]]) -> tuple[set[str], str | None]:
    """Apply a run's new events to its graph as the API last answered it (in place): a step's
    status, attempts, items and reported progress, without asking the API. Returns the steps
    changed and the run's new status (None when no run event came). The next answer of the
    graph endpoint is the authority; this only shows a change before it comes."""
    by_id = {n["id"]: n for n in graph["nodes"]}
    changed: set[str] = set()
    run_status: str | None = None
    for event in events:
        kind, data = str(event.get("type")), event.get("data") or {}
        if kind in RUN_EVENT_STATUS:
            run_status = RUN_EVENT_STATUS[kind]
            continue
        node = by_id.get(str(event.get("step_id")))
        if node is None:
            continue
        if kind in STEP_EVENT_STATUS:
            node["status"] = STEP_EVENT_STATUS[kind]
            if kind == "step.started":
                node["attempts"] = int(node.get("attempts") or 0) + 1
                node["progress"] = None
            if kind == "step.failed" and data.get("error"):
                node["error"] = str(data["error"])
        elif kind == "step.items" and {"done", "total"} <= data.keys():
            node["items_done"], node["items_total"] = data["done"], data["total"]
        elif kind == "step.progress" and isinstance(data.get("fraction"), int | float):
            node["progress"] = float(data["fraction"])
        else:
            continue
        changed.add(node["id"])
    if changed:
        counts: dict[str, int] = {}
        for node in graph["nodes"]:
            counts[node["status"]] = counts.get(node["status"], 0) + 1
        graph["counts"] = counts
    return changed, run_status


# -- the timeline ------------------------------------------------------------------------------------


MAX_GANTT_ROWS = 300


def gantt_svg(
    nodes: list[dict[str, Any]], attempts: list[dict[str, Any]], now: float, max_rows: int = MAX_GANTT_ROWS
) -> str:
    """A row per step, a bar per attempt (retries side by side), the running attempt up to now;
    at most ``max_rows`` rows: the steps whose attempts ended last (or run now)."""
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
    latest: dict[str, float] = {}
    for b in bars:
        latest[b[0]] = max(latest.get(b[0], b[2]), b[2])
    note = ""
    if len(latest) > max_rows:
        kept = set(sorted(latest, key=lambda k: latest[k], reverse=True)[:max_rows])
        note = f'<div class="factory-empty">the {max_rows} steps whose attempts ended last, of {len(latest)}</div>'
        bars = [b for b in bars if b[0] in kept]
        latest = {k: v for k, v in latest.items() if k in kept}
    rows = [n["id"] for n in nodes if n["id"] in latest]
    listed = set(rows)
    rows += [k for k in latest if k not in listed]
    index = {step: i for i, step in enumerate(rows)}
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
        i = index[step]
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
    return f'{note}<div style="overflow:auto;max-height:420px">{"".join(parts)}</div>'


# -- steps, events, logs ---------------------------------------------------------------------------

STEP_COLUMNS = ["step", "status", "attempts", "duration", "tokens / est. cost", "error"]


def usage_text(usage: Any) -> str:
    """A node's usage (GraphNode.usage) as ``11 in / 7 out · $0.000025``: ``>= $`` when some models had no
    price, ``?`` when none had one; empty without usage."""
    if not isinstance(usage, dict):
        return ""
    text = f"{usage.get('input_tokens', 0)} in / {usage.get('output_tokens', 0)} out"
    cost, unpriced = usage.get("cost_usd"), [str(m) for m in usage.get("unpriced_models") or []]
    if isinstance(cost, int | float) or unpriced:
        text += f" · {cost_text(cost if isinstance(cost, int | float) else None, unpriced)}"
    return text


def spent_text(spent: Any) -> str:
    """A run's ``spent`` (RunSpend, as the API sends it) as ``120 tokens · est. $0.000250 · 4 attempts``:
    what its budgets count, failed attempts included; empty before it used any model."""
    if not isinstance(spent, dict) or not (spent.get("tokens") or spent.get("cost_usd")):
        return ""
    unpriced = [str(m) for m in spent.get("unpriced_models") or []]
    cost = spent.get("cost_usd")
    parts = [
        f"{spent.get('tokens', 0)} tokens",
        f"est. {cost_text(cost if isinstance(cost, int | float) else None, unpriced)}",
        f"{spent.get('attempts', 0)} attempt(s)",
    ]
    if unpriced:
        parts.append(f"no price for {', '.join(unpriced)}")
    return " · ".join(parts)


def step_rows(nodes: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for node in nodes:
        status = str(node["status"])
        if node.get("for_each") and node.get("items_total") is not None:
            status += f" ({node['items_done']}/{node['items_total']} items)"
        if node.get("cached"):
            status += " (cached)"
        if isinstance(node.get("progress"), int | float) or node.get("progress_message"):
            pct = f"{round(100 * node['progress'])}% " if isinstance(node.get("progress"), int | float) else ""
            status += f" ({pct}{node.get('progress_message') or ''})".replace(" )", ")")
        rows.append(
            [
                str(node["id"]),
                status,
                str(node.get("attempts", 0)),
                seconds(node.get("duration")),
                usage_text(node.get("usage")),
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


LiveLine = tuple[int | None, int | None, str]  # a step.log line: (attempt, for_each item, text)


def _attempt_and_item(data: dict[str, Any]) -> tuple[int | None, int | None]:
    """The attempt and for_each item a step event's data says it came from (None: it does not say)."""
    attempt, item = data.get("attempt"), data.get("item")
    return (
        attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
        item if isinstance(item, int) and not isinstance(item, bool) else None,
    )


def live_lines(data: dict[str, Any]) -> list[LiveLine]:
    """The lines of one ``step.log`` event's data, with the attempt and item they came from
    (None when the event does not say: events of an older Factory)."""
    lines = data.get("lines")
    if not isinstance(lines, list):
        return []
    attempt, item = _attempt_and_item(data)
    out: list[LiveLine] = []
    skipped = data.get("skipped")
    if isinstance(skipped, int) and skipped > 0:
        out.append((attempt, item, f"[{skipped} lines not shown live: printed faster than they are sent]"))
    out.extend((attempt, item, str(line)) for line in lines)
    return out


def step_logs(step: str, attempts: list[dict[str, Any]], live: list[LiveLine]) -> str:
    """A step's finished attempts' logs, then the lines its running attempts printed since
    (``step.log`` events): lines of an attempt that has ended are in its log already, and a
    for_each item's are in the step's log once the step has ended."""
    parts = []
    mine = [a for a in attempts if a["step_id"] == step]
    for a in mine:
        head = f"--- attempt {a['attempt']}: {a['status']} ({seconds(a.get('duration'))})"
        parts.append(head + (f"\n{a['error']}" if a.get("error") else ""))
        if a.get("logs"):
            parts.append(str(a["logs"]).rstrip("\n"))
    ended = {a["attempt"] for a in mine}
    group: int | str | None = ""
    for attempt, item, line in live:
        if (item is None and attempt in ended) or (item is not None and mine):
            continue
        if attempt != group:
            group = attempt
            parts.append("--- live" if attempt is None else f"--- attempt {attempt}: running (live)")
        parts.append(line if item is None else f"[item {item}] {line}")
    return "\n".join(parts) if parts else f"(no logs of step {step} yet)"


EmittedLine = tuple[int | None, int | None, str]  # a step.emitted value: (attempt, item, its JSON)


def emitted_lines(data: dict[str, Any]) -> list[EmittedLine]:
    """The values of one ``step.emitted`` event's data as JSON text, with their attempt and item."""
    items = data.get("items")
    if not isinstance(items, list):
        return []
    attempt, item = _attempt_and_item(data)
    out = [(attempt, item, json.dumps(value, ensure_ascii=False)) for value in items]
    dropped = data.get("dropped")
    if isinstance(dropped, int) and dropped > 0:
        out.append((attempt, item, f"[{dropped} values dropped: emitted faster than they are sent]"))
    return out


def step_emitted(step: str, emitted: list[EmittedLine]) -> str:
    """What a step emitted (``ctx.emit``: partial results, streamed tokens), one value a line, oldest
    first; a later attempt's and a for_each item's marked."""
    if not emitted:
        return f"(nothing emitted by step {step})"
    lines = []
    for attempt, item, text in emitted:
        prefix = f"[item {item}] " if item is not None else ""
        if attempt is not None and attempt > 1:
            prefix = f"[attempt {attempt}] " + prefix
        lines.append(prefix + text)
    return "\n".join(lines)


# -- schedules ----------------------------------------------------------------------------------------

SCHEDULE_COLUMNS = ["name", "workflow", "cron", "next run", "last run", "enabled"]


def schedule_rows(schedules: list[dict[str, Any]]) -> list[list[str]]:
    """``GET /v1/schedules`` as table rows (text only): a paused schedule says why, the last
    decided tick the run it started or why it was skipped."""
    rows = []
    for sc in schedules:
        nexts = sc.get("next_ticks") or []
        last = sc.get("last_tick")
        if isinstance(last, dict):
            done = f"run {last.get('run_id')}" if last.get("action") == "run" else f"skipped: {last.get('reason', '')}"
            last_text = f"{when(last.get('tick'))} · {done}"
        else:
            last_text = "never"
        paused = sc.get("state") == "paused"
        rows.append(
            [
                str(sc.get("name", "")),
                str(sc.get("workflow_ref", "")),
                f"{sc.get('cron', '')} ({sc.get('timezone', '')})",
                when(nexts[0]) if nexts and not paused else "",
                last_text,
                f"no: {sc.get('paused_reason') or 'paused'}" if paused else "yes",
            ]
        )
    return rows


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
