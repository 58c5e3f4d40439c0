"""What the dashboard draws (ui.render): layout by networkx, escaping, tables, form values."""

from __future__ import annotations

import pytest

pytest.importorskip("networkx")

from ui import render

XSS = "<img src=x onerror=alert(1)>"


def graph(n_layers: int = 3, width: int = 2) -> dict[str, object]:
    nodes, edges = [], []
    for layer in range(n_layers):
        for i in range(width):
            nodes.append({"id": f"s{layer}_{i}", "status": "succeeded" if layer == 0 else "pending", "attempts": 1})
            if layer:
                edges.append({"source": f"s{layer - 1}_{i}", "target": f"s{layer}_{i}"})
    return {"nodes": nodes, "edges": edges}


def test_layout_puts_each_step_right_of_its_dependencies() -> None:
    g = graph()
    pos = render.dag_layout(g)
    assert len(pos) == 6
    for edge in g["edges"]:  # type: ignore[attr-defined]
        assert pos[edge["source"]][0] < pos[edge["target"]][0]
    assert len(set(pos.values())) == 6  # no two boxes on top of each other


def test_dag_model_boxes_arrows_and_states_as_data() -> None:
    g = {
        "nodes": [
            {"id": "a", "status": "failed", "attempts": 3, "error": XSS},
            {"id": "b", "status": "running", "for_each": True, "items_done": 2, "items_total": 5},
        ],
        "edges": [{"source": "a", "target": "b"}],
    }
    model = render.dag_model(g)
    assert model["compact"] is False and len(model["edges"]) == 1
    by_id = {n[0]: n for n in model["nodes"]}
    assert by_id["a"][4:6] == ["failed", "failed · 3 attempts"] and by_id["b"][5] == "running · 2/5 items"
    assert by_id["b"][3] is True  # a for_each step
    assert by_id["a"][6] == f"a: failed · 3 attempts\n{XSS}"  # data: the page sets it as text
    x1, _, x2, _ = model["edges"][0]
    assert x1 <= x2 and by_id["a"][1] < by_id["b"][1]
    # the page's code never parses a run's text as markup
    assert "innerHTML" not in render.DAG_JS and "insertAdjacentHTML" not in render.DAG_JS
    assert "textContent" in render.DAG_JS


def test_a_large_dag_is_drawn_compact() -> None:
    g = graph(n_layers=40, width=50)  # 2,000 steps
    model = render.dag_model(g)
    assert model["compact"] is True and model["edges"] == []
    assert len(model["nodes"]) == 2000 and len({(n[1], n[2]) for n in model["nodes"]}) == 2000
    assert [layer[3] for layer in model["layers"]] == [50] * 40
    xs = {n[0]: n[1] for n in model["nodes"]}
    assert xs["s0_0"] < xs["s1_0"] < xs["s39_0"]  # layers left to right
    assert model["w"] < 5000 and model["h"] < 500  # a page can hold it


def test_apply_events_moves_steps_and_the_run() -> None:
    g = graph(n_layers=2, width=1)
    g["nodes"][1]["attempts"] = 0  # type: ignore[index]
    events = [
        {"id": 1, "type": "run.started", "step_id": None, "data": {}},
        {"id": 2, "type": "step.started", "step_id": "s1_0", "data": {}},
        {"id": 3, "type": "step.progress", "step_id": "s1_0", "data": {"fraction": 0.5}},
        {"id": 4, "type": "step.log", "step_id": "s1_0", "data": {"lines": ["x"]}},
        {"id": 5, "type": "step.started", "step_id": "nope", "data": {}},
    ]
    changed, run_status = render.apply_events(g, events)
    node = g["nodes"][1]  # type: ignore[index]
    assert changed == {"s1_0"} and run_status == "running"
    assert node["status"] == "running" and node["attempts"] == 1 and render.node_state(node)[1] == "running · 50%"
    assert g["counts"] == {"succeeded": 1, "running": 1}
    changed, run_status = render.apply_events(
        g,
        [
            {"id": 6, "type": "step.failed", "step_id": "s1_0", "data": {"error": "boom"}},
            {"id": 7, "type": "run.failed", "step_id": None, "data": {}},
        ],
    )
    assert changed == {"s1_0"} and run_status == "failed" and node["status"] == "failed" and node["error"] == "boom"


def test_gantt_shows_every_attempt_and_the_running_one() -> None:
    nodes = [
        {"id": "a", "status": "succeeded", "attempts": 2},
        {"id": "b", "status": "running", "attempts": 1, "started_at": 14.0},
    ]
    attempts = [
        {"step_id": "a", "attempt": 1, "status": "failed", "duration": 1.0, "finished_at": 11.0, "error": XSS},
        {"step_id": "a", "attempt": 2, "status": "succeeded", "duration": 2.0, "finished_at": 14.0},
    ]
    html = render.gantt_svg(nodes, attempts, now=20.0)
    assert html.count("<rect") == 3 and XSS not in html
    assert "a attempt 1: failed" in html and "b attempt 1: running" in html
    assert "10.00s" in html  # the axis spans 10 s to 20 s
    many = [{"id": f"s{i}", "status": "succeeded", "attempts": 1} for i in range(500)]
    done = [
        {"step_id": f"s{i}", "attempt": 1, "status": "succeeded", "duration": 1.0, "finished_at": float(i)}
        for i in range(500)
    ]
    html = render.gantt_svg(many, done, now=600.0, max_rows=300)
    assert html.count("<rect") == 300 and ">s499<" in html and ">s199<" not in html  # the latest 300
    assert "the 300 steps whose attempts ended last, of 500" in html


def test_tables_and_logs() -> None:
    runs = [
        {
            "id": "r1",
            "status": "running",
            "workflow_name": XSS,
            "created_at": 0.0,
            "started_at": 100.0,
            "finished_at": None,
            "steps_done": 1,
            "steps_total": 3,
            "steps_failed": 1,
            "error": None,
        }
    ]
    row = render.run_rows(runs, now=190.0)[0]
    assert row[2] == XSS  # a table cell shows text as it is (the browser test checks it stays text)
    assert row[4] == "1m30s" and row[5] == "1 / 3 (1 failed)"
    logs = render.step_logs(
        "a",
        [{"step_id": "a", "attempt": 1, "status": "failed", "duration": 0.5, "logs": "hello\n", "error": "boom"}],
        [(None, None, "live 1")],
    )
    assert logs.splitlines() == ["--- attempt 1: failed (0.50s)", "boom", "hello", "--- live", "live 1"]


def test_live_log_lines_of_running_attempts_only() -> None:
    """Lines of an attempt that ended are in its log: shown once, not again as live lines."""
    live = render.live_lines({"lines": ["one", "two"], "attempt": 1})
    live += render.live_lines({"lines": ["three"], "attempt": 2, "skipped": 4})
    assert live == [
        (1, None, "one"),
        (1, None, "two"),
        (2, None, "[4 lines not shown live: printed faster than they are sent]"),
        (2, None, "three"),
    ]
    assert render.live_lines({"lines": "not a list"}) == []
    assert render.live_lines({"lines": [1], "attempt": True}) == [(None, None, "1")]  # not an attempt number
    running = render.step_logs("a", [], live)
    assert running.splitlines() == [
        "--- attempt 1: running (live)",
        "one",
        "two",
        "--- attempt 2: running (live)",
        "[4 lines not shown live: printed faster than they are sent]",
        "three",
    ]
    first_failed = [{"step_id": "a", "attempt": 1, "status": "retrying", "duration": 1.0, "logs": "one\ntwo\n"}]
    lines = render.step_logs("a", first_failed, live).splitlines()
    assert lines.count("one") == 1 and lines[-2:] == [
        "[4 lines not shown live: printed faster than they are sent]",
        "three",
    ]
    # a for_each step's items: prefixed while it runs, gone once the step's log (all items) is there
    items = render.live_lines({"lines": ["x"], "attempt": 1, "item": 7})
    assert render.step_logs("a", [], items).splitlines() == ["--- attempt 1: running (live)", "[item 7] x"]
    done = [{"step_id": "a", "attempt": 1, "status": "succeeded", "duration": 1.0, "logs": "[item 7] x\n"}]
    assert render.step_logs("a", done, items).splitlines() == ["--- attempt 1: succeeded (1.00s)", "[item 7] x"]
    # another step's attempts change nothing
    other = [{"step_id": "b", "attempt": 1, "status": "succeeded", "duration": 1.0}]
    assert "one" in render.step_logs("a", other, live)


def test_event_rows_are_bounded() -> None:
    events = [
        {"id": i, "ts": 0.0, "type": "step.log", "step_id": "a", "data": {"lines": ["x" * 500]}} for i in range(300)
    ]
    rows = render.event_rows(events)
    assert len(rows) == 200 and rows[0][0] == "299" and len(rows[0][4]) <= 160


def test_pools_and_route_rows() -> None:
    agents = {
        "agents": [
            {
                "name": "s",
                "capabilities": ["wait"],
                "runnable": True,
                "pool": {
                    "replicas": 2,
                    "min_replicas": 1,
                    "max_replicas": 3,
                    "in_flight": 4,
                    "queued": 1,
                    "health": "healthy",
                    "breaker": "closed",
                },
            },
            {"name": "t", "capabilities": [], "runnable": False, "pool": None},
        ]
    }
    assert render.pool_rows(agents) == [
        ["s", "wait", "2 (1-3)", "4", "1", "healthy", "closed"],
        ["t", "", "0", "0", "0", "catalogue only (routing)", ""],
    ]
    decision = {
        "agent": "s",
        "score": 0.9,
        "breakdown": {"semantic": 0.95, "load": 0.05},
        "runners_up": [{"agent": "u", "score": 0.4, "breakdown": {"semantic": 0.4}}],
        "filtered_out": {"t": "lacks capability wait"},
    }
    rows = render.route_rows(decision)
    assert [r[-1] for r in rows] == ["chosen", "runner-up", "filtered out: lacks capability wait"]
    assert rows[0][1:4] == ["0.900", "0.950", "0.050"]


def test_inputs_form_types() -> None:
    assert [render.input_kind(v) for v in (True, 3, 1.5, "x", [1], {"a": 1}, None)] == [
        "bool",
        "int",
        "float",
        "text",
        "json",
        "json",
        "json",
    ]
    assert render.parse_input("int", 9.0) == 9 and render.parse_input("float", 2) == 2.0
    assert render.parse_input("json", '{"a": [1]}') == {"a": [1]}
    with pytest.raises(ValueError, match="whole number"):
        render.parse_input("int", 2.5)
    with pytest.raises(ValueError, match="not JSON"):
        render.parse_input("json", "{nope")


def test_schedule_rows() -> None:
    active = {
        "name": "nightly",
        "workflow_ref": "sales@3",
        "cron": "30 6 * * 1-5",
        "timezone": "Europe/Paris",
        "state": "active",
        "next_ticks": [86400.0, 172800.0],
        "last_tick": {"tick": 3600.0, "action": "run", "run_id": "abc123", "reason": ""},
    }
    paused = {
        "name": "yearly",
        "workflow_ref": XSS + "@1",
        "cron": "0 0 1 1 *",
        "timezone": "UTC",
        "state": "paused",
        "paused_reason": "the key that added it was revoked",
        "next_ticks": [],
        "last_tick": {"tick": 0.0, "action": "skip", "run_id": None, "reason": "the previous run still runs"},
    }
    fresh = {**active, "name": "new", "last_tick": None}
    rows = render.schedule_rows([active, paused, fresh])
    assert rows[0] == [
        "nightly",
        "sales@3",
        "30 6 * * 1-5 (Europe/Paris)",
        "1970-01-02 00:00:00",
        "1970-01-01 01:00:00 · run abc123",
        "yes",
    ]
    assert rows[1][1] == XSS + "@1"  # a table cell shows text as it is
    assert rows[1][3:] == [
        "",
        "1970-01-01 00:00:00 · skipped: the previous run still runs",
        "no: the key that added it was revoked",
    ]
    assert rows[2][4] == "never"


def test_emitted_values_of_a_step() -> None:
    first = render.emitted_lines({"items": [{"delta": "Hel"}, {"delta": XSS}], "attempt": 1})
    retry = render.emitted_lines({"items": ["x"], "attempt": 2, "dropped": 3})
    item = render.emitted_lines({"items": [1.5], "attempt": 1, "item": 4})
    assert render.emitted_lines({"items": {"not": "a list"}}) == []
    assert first == [(1, None, '{"delta": "Hel"}'), (1, None, '{"delta": "' + XSS + '"}')]
    text = render.step_emitted("a", first + retry + item)
    assert text.splitlines() == [
        '{"delta": "Hel"}',
        '{"delta": "<img src=x onerror=alert(1)>"}',  # text in a text box: shown as it is
        '[attempt 2] "x"',
        "[attempt 2] [3 values dropped: emitted faster than they are sent]",
        "[item 4] 1.5",
    ]
    assert render.step_emitted("a", []) == "(nothing emitted by step a)"
