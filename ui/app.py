"""The dashboard's Gradio Blocks: Runs, Run, Submit, Schedules, Agents, System.

It talks to the Factory only through :class:`factory.client.FactoryClient` (the HTTP API)
with the API key of the person logged in; the key lives in the session on the server, never
in a URL. Live parts follow the events API (:mod:`ui.live`); a timer applies what the
streams delivered. User-provided text is escaped (:mod:`ui.render`) or shown in text
components (tables, text boxes, JSON).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html import escape
from typing import Any

import anyio
import gradio as gr

from factory.approvals import MAX_COMMENT_CHARS
from factory.client import ApiError, FactoryClient
from factory.dag import parse_workflow_text
from factory.errors import FactoryError
from factory.limits import DocumentLimits
from ui import render
from ui.live import EventFollower

log = logging.getLogger(__name__)
FETCHERS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="ui-fetch")
LOOP_TICK = 0.05  # how often a page's live loop looks at its event streams (seconds)
LOOP_QUIET = 10.0  # a loop with nothing to send says so this often: a closed tab ends it then
LOOP_STALE = 5.0  # a loop that did not look for this long is taken for gone: the watchdog starts another
MIN_REFRESH = 0.3  # the run page asks the API again at most this often...
REFRESH_COST_FACTOR = 4.0  # ...and at most once per this many times what the last answer cost
MIN_LIST_RELOAD = 0.5
DELTA_WINDOW = 2.0  # a graph update repeats the changes of the last seconds (updates may arrive batched)
# the run page sends all it shows again, without asking the API, RESEND_FIRST s after it last sent
# something new, then twice as long each time up to RESEND_MAX: an update the browser lost (Gradio can
# drop one that reaches a tab whose components are still mounting) is mended, not kept for good
RESEND_FIRST = 3.0
RESEND_MAX = 60.0
RUN_STATUSES = ["any", "pending", "running", "waiting", "succeeded", "failed", "cancelled"]
PAGE_SIZE = 25
READ_ONLY_NOTE = "your key can read only: cancel, resume, run again and submit need a key with the submit scope"
SCHEDULE_ADMIN_NOTE = (
    "pausing and resuming schedules needs a key with the admin scope (adding and removing them too: "
    "`factory schedules`); yours has: {scopes}"
)
MAX_YAML_CHARS = 1_000_000

EXAMPLE_YAML = """\
name: hello
inputs:
  who: world
  times: 2
steps:
  - id: greet
    python: examples.hello:greet
    with: {who: "${inputs.who}"}
"""

CSS = """
.factory-badge {display:inline-block;padding:2px 10px;border-radius:10px;color:white;font-weight:bold}
.factory-empty {color:#6b7280;padding:8px}
.factory-problems li {font-family:monospace;white-space:pre-wrap}
"""


@dataclass
class Session:
    """One logged-in person: their client, what their key may do, what their pages follow."""

    client: FactoryClient
    me: dict[str, Any]
    tab: str = "runs"
    # runs list
    cursors: list[str | None] = field(default_factory=lambda: [None])
    next_cursor: str | None = None
    list_follower: EventFollower | None = None
    list_seen: int = -1
    filters: tuple[str, str, str] = ("any", "", "")
    list_loaded_at: float = 0.0
    # run page
    run_id: str | None = None
    run_follower: EventFollower | None = None
    graph: dict[str, Any] | None = None
    run: dict[str, Any] | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    pending_action: str | None = None
    pending_gate: str | None = None  # the approval gate an approve / reject is about
    log_step: str | None = None
    # schedules
    schedules: list[dict[str, Any]] = field(default_factory=list)
    schedule: str | None = None  # the one picked (to pause or resume)
    # what the browser's run page shows, so that the live loop sends only what changed
    gen: int = 0  # which opening of a run page the page's graph belongs to
    seq: int = 0  # the graph view's updates, in order
    dag_sent: dict[str, list[str]] = field(default_factory=dict)  # each step's state as the graph shows it
    dag_drawn: dict[str, Any] | None = None  # the graph view's model as first sent (its layout)
    dag_recent: deque[tuple[float, str]] = field(default_factory=deque)  # (when, step) sent lately
    applied_id: int | None = None  # the newest event the graph reflects (None: the API does not say)
    details_pending: bool = False  # opened: the tables, timeline and logs are still to be sent
    refreshed_version: int = -1
    refreshed_at: float = 0.0
    refresh_cost: float = 0.0
    resent_at: float = 0.0  # when the run page's details were last sent in full...
    resend_gap: float = RESEND_FIRST  # ...and how long after that they are sent again
    picked_at: float = 0.0  # when a step was last picked for the logs (its own answer shows them)
    sent: dict[str, Any] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    # the page's live loop
    closed: bool = False
    loop_token: object | None = None
    loop_beat: float = 0.0

    @property
    def can_submit(self) -> bool:
        return bool(self.me.get("can_submit"))

    @property
    def can_admin(self) -> bool:
        return bool(self.me.get("can_admin"))

    def had_news(self, at: float) -> None:
        """The run page sent (or was shown) something new at ``at``: all of it again RESEND_FIRST s later."""
        self.resent_at, self.resend_gap = at, RESEND_FIRST

    def close(self) -> None:
        self.closed = True
        for follower in (self.list_follower, self.run_follower):
            if follower is not None:
                follower.stop()
        self.client.close()


def _close(session: Session | None) -> None:
    if isinstance(session, Session):
        session.close()


def _error(exc: BaseException | str) -> str:
    return f'<div class="factory-error" style="color:#b91c1c">{escape(str(exc))}</div>'


def _skipped(value: Any) -> bool:
    """Whether an output is ``gr.skip()``: the component keeps what it shows."""
    return bool(value == gr.skip())


def _ok(text: str) -> str:
    return f'<div class="factory-ok" style="color:#15803d">{escape(text)}</div>'


def _badge(status: str) -> str:
    return (
        f'<span id="run-status" class="factory-badge" data-status="{escape(status)}" '
        f'style="background:{render.colour(status)}">{escape(status)}</span>'
    )


def build_app(api_url: str, *, client_timeout: float = 30.0) -> gr.Blocks:
    """The dashboard for the Factory API at ``api_url``."""

    def new_session(key: str) -> Session:
        client = FactoryClient(api_url, api_key=key, timeout=client_timeout, idle_timeout=45.0)
        try:
            me = client.whoami()
        except BaseException:
            client.close()
            raise
        return Session(client, me)

    with gr.Blocks(title="The Factory", analytics_enabled=False) as demo:
        session_state = gr.State(None, delete_callback=_close)
        gr.HTML("<h2 style='margin:0'>The Factory</h2>")

        # -- login ---------------------------------------------------------------------------
        with gr.Column(visible=True) as login_box:
            key_box = gr.Textbox(
                label="API key", type="password", placeholder="fk_…", elem_id="login-key", max_length=400
            )
            login_btn = gr.Button("Log in", variant="primary", elem_id="login-btn")
            login_status = gr.HTML("", elem_id="login-status")

        with gr.Column(visible=False) as main_box:
            with gr.Row():
                who = gr.HTML("", elem_id="whoami")
                logout_btn = gr.Button("Log out", size="sm", scale=0, elem_id="logout-btn")
            with gr.Tabs(selected="runs", elem_id="tabs") as tabs:
                # -- runs ------------------------------------------------------------------------
                with gr.Tab("Runs", id="runs", elem_id="tab-runs") as runs_tab:
                    with gr.Row():
                        status_filter = gr.Dropdown(RUN_STATUSES, value="any", label="status", elem_id="f-status")
                        workflow_filter = gr.Textbox(label="workflow", max_length=200, elem_id="f-workflow")
                        text_filter = gr.Textbox(label="search (id, workflow, error)", max_length=200, elem_id="f-q")
                    with gr.Row():
                        newer_btn = gr.Button("← newer", size="sm", elem_id="newer-btn")
                        page_label = gr.HTML("", elem_id="page-label")
                        older_btn = gr.Button("older →", size="sm", elem_id="older-btn")
                    runs_table = gr.Dataframe(
                        headers=render.RUN_COLUMNS,
                        datatype="str",
                        interactive=False,
                        elem_id="runs-table",
                        max_height=600,
                        wrap=True,
                    )
                    with gr.Row():
                        open_id = gr.Textbox(label="run id", max_length=100, elem_id="open-run-id", scale=3)
                        open_btn = gr.Button("Open run", elem_id="open-run-btn", scale=1)
                    runs_msg = gr.HTML("", elem_id="runs-msg")

                # -- one run ---------------------------------------------------------------------
                with gr.Tab("Run", id="run", elem_id="tab-run") as run_tab:
                    run_header = gr.HTML("<div class='factory-empty'>open a run from the Runs tab</div>")
                    with gr.Row():
                        cancel_btn = gr.Button("Cancel run", variant="stop", elem_id="cancel-btn", interactive=False)
                        resume_btn = gr.Button("Resume", elem_id="resume-btn", interactive=False)
                        rerun_btn = gr.Button("Run again", elem_id="rerun-btn", interactive=False)
                        approve_btn = gr.Button("Approve gate", elem_id="approve-btn")
                        reject_btn = gr.Button("Reject gate", elem_id="reject-btn")
                    perm_note = gr.HTML("", elem_id="perm-note")
                    with gr.Column(visible=False) as confirm_box:
                        confirm_text = gr.HTML("", elem_id="confirm-text")
                        rerun_inputs = gr.Code(
                            language="json", label="inputs", visible=False, elem_id="rerun-inputs", max_lines=20
                        )
                        gate_comment = gr.Textbox(
                            label="comment (recorded with the decision)",
                            visible=False,
                            max_length=MAX_COMMENT_CHARS,
                            elem_id="gate-comment",
                        )
                        with gr.Row():
                            confirm_yes = gr.Button("Yes, do it", variant="primary", elem_id="confirm-yes")
                            confirm_no = gr.Button("No", elem_id="confirm-no")
                    action_result = gr.HTML("", elem_id="action-result")
                    gr.HTML("<h3>Graph</h3>")
                    dag = gr.HTML(
                        None,
                        elem_id="dag",
                        html_template=(
                            f'<div class="factory-legend">{render.dag_legend()}</div>'
                            '<div class="dag-host" style="overflow:auto;max-height:520px"></div>'
                        ),
                        js_on_load=render.DAG_JS,
                    )
                    gr.HTML("<h3>Timeline of attempts</h3>")
                    gantt = gr.HTML("", elem_id="gantt")
                    steps_table = gr.Dataframe(
                        headers=render.STEP_COLUMNS,
                        datatype="str",
                        interactive=False,
                        label="steps",
                        elem_id="steps-table",
                        max_height=400,
                        wrap=True,
                    )
                    with gr.Row():
                        log_step = gr.Dropdown(
                            [], label="step (its logs and emitted data)", elem_id="log-step", allow_custom_value=False
                        )
                    step_log = gr.Textbox(
                        label="logs", lines=10, max_lines=30, interactive=False, elem_id="step-logs", autoscroll=True
                    )
                    step_emitted = gr.Textbox(
                        label="emitted data (ctx.emit: partial results, streamed tokens)",
                        lines=3,
                        max_lines=20,
                        interactive=False,
                        elem_id="step-emitted",
                        autoscroll=True,
                    )
                    with gr.Row():
                        inputs_json = gr.JSON(label="inputs", elem_id="run-inputs")
                        outputs_json = gr.JSON(label="outputs", elem_id="run-outputs")
                    events_table = gr.Dataframe(
                        headers=render.EVENT_COLUMNS,
                        datatype="str",
                        interactive=False,
                        label="events (newest first)",
                        elem_id="events-table",
                        max_height=400,
                        wrap=True,
                    )

                # -- submit ----------------------------------------------------------------------
                with gr.Tab("Submit", id="submit", elem_id="tab-submit") as submit_tab:
                    upload = gr.File(label="upload a workflow YAML", file_types=[".yaml", ".yml"], elem_id="upload")
                    yaml_box = gr.Code(value=EXAMPLE_YAML, language="yaml", label="workflow", elem_id="submit-yaml")
                    validate_btn = gr.Button("Validate", elem_id="validate-btn")
                    validation = gr.HTML("", elem_id="validate-result")
                    declared: gr.State = gr.State(None)
                    can_submit = gr.State(False)
                    form_area = gr.Column()

                # -- schedules -------------------------------------------------------------------
                with gr.Tab("Schedules", id="schedules", elem_id="tab-schedules") as schedules_tab:
                    schedules_table = gr.Dataframe(
                        headers=render.SCHEDULE_COLUMNS,
                        datatype="str",
                        interactive=False,
                        label="schedules (times in UTC)",
                        elem_id="schedules-table",
                        max_height=600,
                        wrap=True,
                    )
                    schedules_msg = gr.HTML("", elem_id="schedules-msg")
                    with gr.Row():
                        schedule_pick = gr.Dropdown(
                            [], label="schedule", elem_id="schedule-pick", allow_custom_value=False, scale=3
                        )
                        pause_btn = gr.Button("Pause", elem_id="schedule-pause-btn", interactive=False, scale=1)
                        unpause_btn = gr.Button("Resume", elem_id="schedule-resume-btn", interactive=False, scale=1)
                    schedule_note = gr.HTML("", elem_id="schedule-note")

                # -- agents ----------------------------------------------------------------------
                with gr.Tab("Agents", id="agents", elem_id="tab-agents") as agents_tab:
                    pools_table = gr.Dataframe(
                        headers=render.POOL_COLUMNS,
                        datatype="str",
                        interactive=False,
                        label="agents and their pools",
                        elem_id="pools-table",
                    )
                    agents_msg = gr.HTML("", elem_id="agents-msg")
                    gr.HTML("<h3>Routing playground</h3>")
                    with gr.Row():
                        route_text = gr.Textbox(label="task", max_length=4000, elem_id="route-text", scale=3)
                        route_caps = gr.Textbox(label="capabilities (comma separated)", max_length=400, scale=1)
                    route_btn = gr.Button("Route", elem_id="route-btn")
                    route_result = gr.HTML("", elem_id="route-result")
                    route_table = gr.Dataframe(
                        headers=render.ROUTE_COLUMNS, datatype="str", interactive=False, elem_id="route-table"
                    )

                # -- system ----------------------------------------------------------------------
                with gr.Tab("System", id="system", elem_id="tab-system") as system_tab:
                    with gr.Row():
                        throughput_plot = gr.LinePlot(x="time", y="steps/s", title="steps finished per second")
                        latency_plot = gr.LinePlot(
                            x="time", y="seconds", color="percentile", title="step latency p50 / p99"
                        )
                    with gr.Row():
                        trouble_plot = gr.LinePlot(x="time", y="count", color="kind", title="failures and retries")
                        status_plot = gr.BarPlot(x="status", y="runs", title="runs by status")
                        queue_plot = gr.BarPlot(x="agent", y="queued", title="agent queue depth")
                    nodes_table = gr.Dataframe(
                        headers=render.NODE_COLUMNS,
                        datatype="str",
                        interactive=False,
                        label="Ray nodes",
                        elem_id="nodes-table",
                    )
                    system_msg = gr.HTML("", elem_id="system-msg")

        loop_timer = gr.Timer(1.0)  # starts the page's live loop, and again if it ended (see live())
        slow_timer = gr.Timer(5.0)

        # -- login / logout -----------------------------------------------------------------------

        def permission_updates(s: Session) -> list[Any]:
            allowed = s.can_submit
            note = "" if allowed else f"<div style='color:#92400e'>{escape(READ_ONLY_NOTE)}</div>"
            return [gr.update(interactive=allowed)] * 3 + [note, allowed]

        def login(key: str, old: Session | None, *filter_values: str) -> list[Any]:
            """Log in and show the first page of runs in the same answer (one round trip less)."""
            key = (key or "").strip()
            nothing = [gr.skip()] * 3
            if not key:
                return [gr.skip(), _error("paste an API key"), *[gr.skip()] * 8, "", *nothing]
            try:
                s = new_session(key)
            except FactoryError as exc:
                return [gr.skip(), _error(exc), *[gr.skip()] * 8, "", *nothing]
            _close(old)
            scopes = ", ".join(s.me.get("scopes", []))
            me = f"logged in as key <b>{escape(str(s.me.get('name') or s.me['id']))}</b> ({escape(scopes)})"
            return [
                s,
                "",
                gr.update(visible=False),
                gr.update(visible=True),
                me,
                *permission_updates(s),
                "",
                *load_runs(s, *filter_values),
            ]

        login_outputs = [
            session_state,
            login_status,
            login_box,
            main_box,
            who,
            cancel_btn,
            resume_btn,
            rerun_btn,
            perm_note,
            can_submit,
            key_box,
        ]

        def logout(s: Session | None) -> list[Any]:
            _close(s)
            return [None, gr.update(visible=True), gr.update(visible=False), "logged out"]

        logout_btn.click(logout, [session_state], [session_state, login_box, main_box, login_status])

        # -- runs list ----------------------------------------------------------------------------

        def load_runs(s: Session, status: str, workflow: str, text: str) -> list[Any]:
            s.filters = (status, workflow, text)
            s.list_loaded_at = time.monotonic()
            cursor = s.cursors[-1]
            try:
                page = s.client.run_summaries(
                    status=None if status == "any" else status,
                    workflow=(workflow or "").strip() or None,
                    text=(text or "").strip() or None,
                    limit=PAGE_SIZE,
                    cursor=cursor,
                )
            except FactoryError as exc:
                return [gr.skip(), gr.skip(), _error(exc)]
            s.next_cursor = page["next_cursor"]
            if s.list_follower is None or s.list_follower.ended:
                s.list_follower = EventFollower(s.client, None, int(page.get("last_event_id") or 0))
            s.list_seen = s.list_follower.version
            label = f"page {len(s.cursors)}" + ("" if s.next_cursor else " (last)")
            return [render.run_rows(page["runs"], time.time()), label, ""]

        list_outputs = [runs_table, page_label, runs_msg]
        filters = [status_filter, workflow_filter, text_filter]

        def refresh_list(s: Session | None, *args: str) -> list[Any]:
            if not isinstance(s, Session):
                return [gr.skip()] * 3
            return load_runs(s, *args)

        def first_page(s: Session | None, *args: str) -> list[Any]:
            if not isinstance(s, Session):
                return [gr.skip()] * 3
            s.cursors = [None]
            return load_runs(s, *args)

        def older(s: Session | None, *args: str) -> list[Any]:
            if not isinstance(s, Session) or not s.next_cursor:
                return [gr.skip()] * 3
            s.cursors.append(s.next_cursor)
            return load_runs(s, *args)

        def newer(s: Session | None, *args: str) -> list[Any]:
            if not isinstance(s, Session) or len(s.cursors) == 1:
                return [gr.skip()] * 3
            s.cursors.pop()
            return load_runs(s, *args)

        def list_due(s: Session) -> bool:
            """The events stream delivered something since the list was loaded (or it ended)."""
            follower = s.list_follower
            if follower is not None:
                follower.touch()
            if time.monotonic() - s.list_loaded_at < MIN_LIST_RELOAD:
                return False
            return follower is None or follower.version != s.list_seen or follower.ended

        status_filter.change(first_page, [session_state, *filters], list_outputs)
        workflow_filter.change(first_page, [session_state, *filters], list_outputs)
        text_filter.change(first_page, [session_state, *filters], list_outputs)
        older_btn.click(older, [session_state, *filters], list_outputs)
        newer_btn.click(newer, [session_state, *filters], list_outputs)
        login_btn.click(login, [key_box, session_state, *filters], [*login_outputs, *list_outputs])
        key_box.submit(login, [key_box, session_state, *filters], [*login_outputs, *list_outputs])

        # -- one run ------------------------------------------------------------------------------

        run_outputs = [
            run_header,
            dag,
            gantt,
            steps_table,
            log_step,
            step_log,
            step_emitted,
            inputs_json,
            outputs_json,
            events_table,
            cancel_btn,
            resume_btn,
        ]

        def fetch_run(s: Session, run_id: str) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
            """The run's graph, record and attempts, asked at once: the page waits for the slowest."""
            graph_f = FETCHERS.submit(s.client.run_graph, run_id)
            run_f = FETCHERS.submit(s.client.get_run, run_id)
            attempts_f = FETCHERS.submit(s.client.attempts, run_id)
            return graph_f.result(), run_f.result(), attempts_f.result()

        def header_html(s: Session) -> str:
            graph, run = s.graph, s.run
            assert graph is not None and run is not None
            status = str(run["status"])
            counts = " · ".join(f"{n} {k}" for k, n in sorted(graph["counts"].items()))
            return (
                f"<div id='run-header'><h3 style='margin:0'>run <code id='run-id'>{escape(run['id'])}</code> "
                f"{_badge(status)}</h3>"
                f"<div>workflow <b id='run-workflow'>{escape(str(run['workflow']))}</b>"
                + (f" ({escape(str(run['workflow_ref']))})" if run.get("workflow_ref") else "")
                + f" · started {escape(render.when(run.get('started_at') or run.get('created_at')))}"
                f" · duration {escape(render.seconds(render.run_duration(run, time.time())))}"
                f" · by {escape(str(run.get('started_by', '')))}</div>"
                f"<div>steps: {escape(counts)}</div>"
                + (
                    f"<div id='run-spent' title='what its budgets count: every attempt, failed ones included'>"
                    f"spent: {escape(spent)}</div>"
                    if (spent := render.spent_text(run.get("spent")))
                    else ""
                )
                + (f"<div style='color:#b91c1c'>{escape(str(run['error']))}</div>" if run.get("error") else "")
                + ("<div style='color:#92400e'>stalled: its coordinator is gone</div>" if run.get("stalled") else "")
                + "</div>"
            )

        def buttons(s: Session) -> dict[str, Any]:
            status = str((s.run or {}).get("status"))
            return {
                "cancel": gr.update(interactive=s.can_submit and status not in render.FINAL_RUN),
                "resume": gr.update(interactive=s.can_submit and status != "succeeded"),
            }

        def dag_full(s: Session) -> dict[str, Any]:
            """The whole graph for the page's graph view (a new opening: ``s.gen``)."""
            assert s.graph is not None
            model = render.dag_model(s.graph)
            s.seq += 1
            s.dag_sent = {str(n[0]): list(n[4:7]) for n in model["nodes"]}
            s.dag_drawn = model
            s.dag_recent.clear()
            return {"gen": s.gen, "seq": s.seq, "model": model}

        def dag_again(s: Session) -> dict[str, Any]:
            """The whole graph again, its layout as first sent and every step as the view shows it now:
            a page that lost the drawing draws it; one that has it only paints the states."""
            assert s.dag_drawn is not None
            s.seq += 1
            nodes = [[*n[:4], *s.dag_sent.get(str(n[0]), n[4:7])] for n in s.dag_drawn["nodes"]]
            return {"gen": s.gen, "seq": s.seq, "model": {**s.dag_drawn, "nodes": nodes}}

        def dag_delta(s: Session, steps: Iterable[str] | None) -> dict[str, Any] | None:
            """The states of ``steps`` (None: all) that differ from what the graph view shows, with
            those sent in the last ``DELTA_WINDOW`` seconds; None when nothing changed."""
            assert s.graph is not None
            wanted = None if steps is None else set(steps)
            now = time.monotonic()
            fresh = False
            for node in s.graph["nodes"]:
                if wanted is not None and node["id"] not in wanted:
                    continue
                state = render.node_state(node)
                if s.dag_sent.get(node["id"]) != state:
                    s.dag_sent[node["id"]] = state
                    s.dag_recent.append((now, node["id"]))
                    fresh = True
            while s.dag_recent and s.dag_recent[0][0] < now - DELTA_WINDOW:
                s.dag_recent.popleft()
            if not fresh:
                return None
            s.seq += 1
            nodes = {step: s.dag_sent[step] for _, step in s.dag_recent if step in s.dag_sent}
            return {"gen": s.gen, "seq": s.seq, "nodes": nodes}

        def details(s: Session) -> dict[str, Any]:
            """Everything of the run page but its graph, from what the API last answered."""
            graph, run = s.graph, s.run
            assert graph is not None and run is not None
            step_ids = [n["id"] for n in graph["nodes"]]
            step = s.log_step
            if step not in step_ids:
                step = next((n["id"] for n in graph["nodes"] if n["status"] in ("running", "retrying")), None)
                step = step or (step_ids[0] if step_ids else None)
            s.log_step = step
            live = s.run_follower.live_lines(step) if (s.run_follower and step) else []
            emitted = s.run_follower.emitted_values(step) if (s.run_follower and step) else []
            events = s.run_follower.snapshot()[1] if s.run_follower else []
            return {
                "header": header_html(s),
                "gantt": render.gantt_svg(graph["nodes"], s.attempts, time.time()),
                "steps": render.step_rows(graph["nodes"]),
                "log_step": gr.update(choices=step_ids, value=step),
                "logs": render.step_logs(step, s.attempts, live) if step else "",
                "emitted": render.step_emitted(step, emitted) if step else "",
                "inputs": run.get("inputs") or {},
                "outputs": {
                    st["step_id"]: st.get("output") for st in run.get("steps") or [] if st.get("output") is not None
                },
                "events": render.event_rows(events),
                **buttons(s),
            }

        RUN_KEYS = ["header", "dag", "gantt", "steps", "log_step", "logs", "emitted", "inputs", "outputs", "events"]
        RUN_KEYS += ["cancel", "resume"]
        PICK_KEYS = {"log_step", "logs", "emitted"}  # what picking a step sends itself

        def as_outputs(s: Session, values: dict[str, Any]) -> list[Any]:
            """``values`` in the order of ``run_outputs``; what the page shows already is skipped."""
            out: list[Any] = []
            for key in RUN_KEYS:
                value = values.get(key)
                if value is None or (key != "dag" and key in s.sent and s.sent[key] == value):
                    out.append(gr.skip())
                else:
                    s.sent[key] = value
                    out.append(value)
            return out

        def adopt(s: Session, graph: dict[str, Any], run: dict[str, Any], attempts: list[dict[str, Any]]) -> None:
            """Take the API's answers, then what the run's events said since (the graph says up to which)."""
            s.graph, s.run, s.attempts = graph, run, attempts
            after = graph.get("last_event_id")
            if not isinstance(after, int) or s.run_follower is None:
                s.applied_id = None  # an API that does not say: the graph changes with its answers only
                return
            _, newer = s.run_follower.since(after)
            if newer:
                _, run_status = render.apply_events(graph, newer)
                if run_status:
                    run["status"] = run_status
            s.applied_id = int(newer[-1]["id"]) if newer else after

        def open_run(s: Session | None, run_id: str) -> list[Any]:
            """Switch to the run's page and follow its events. The header and the graph come now;
            the tables, timeline and logs right after, from the page's live loop."""
            if not isinstance(s, Session):
                return [gr.skip()] * (len(run_outputs) + 3)
            run_id = (run_id or "").strip()
            with s.lock:
                s.gen += 1
                gen = s.gen
                if s.run_follower is not None:
                    s.run_follower.stop()
                s.run_id, s.run_follower, s.pending_action = run_id, None, None
            try:
                started = time.monotonic()
                graph, run, attempts = fetch_run(s, run_id)
            except FactoryError as exc:
                with s.lock:
                    if s.gen == gen:
                        s.run_id = None
                return [gr.skip(), _error(exc), gr.skip(), *[gr.skip()] * len(run_outputs)]
            with s.lock:
                if s.gen != gen:  # another run was opened meanwhile
                    return [gr.skip()] * (len(run_outputs) + 3)
                s.run_follower = EventFollower(s.client, run_id, 0)
                adopt(s, graph, run, attempts)
                s.log_step = None
                s.sent = {}
                s.refreshed_version, s.refreshed_at = -1, time.monotonic()
                s.had_news(s.refreshed_at)
                s.refresh_cost = s.refreshed_at - started
                s.details_pending = True
                s.tab = "run"
                values = {
                    "header": header_html(s),
                    "dag": dag_full(s),
                    "gantt": "<div class='factory-empty'>loading…</div>",
                    "steps": [],
                    "logs": "",
                    "emitted": "",
                    "outputs": {},
                    "events": [],
                    **buttons(s),
                }
                return [gr.update(selected="run"), "", gr.update(visible=False), *as_outputs(s, values)]

        open_outputs = [tabs, runs_msg, confirm_box, *run_outputs]
        open_btn.click(open_run, [session_state, open_id], open_outputs)
        open_id.submit(open_run, [session_state, open_id], open_outputs)

        def pick_row(s: Session | None, evt: gr.SelectData) -> list[Any]:
            row = evt.row_value if isinstance(evt.row_value, list) else None
            if not row:
                return [gr.skip()] * len(open_outputs)
            return open_run(s, str(row[0]))

        runs_table.select(pick_row, [session_state], open_outputs)

        def run_news(s: Session) -> list[Any] | None:
            """What the run's events said since the graph was drawn, applied without asking the API:
            the graph's changed steps and the header. Quick: it runs in the loop itself."""
            follower = s.run_follower
            if follower is None or s.graph is None or s.run is None:
                return None
            follower.touch()
            stopped = follower.ended and follower.error is None and follower.idle_stop > 0 and not follower.alive
            if stopped and s.run.get("status") not in render.FINAL_RUN:
                # stopped while the tab was elsewhere: follow again from where it was
                s.run_follower = EventFollower(s.client, s.run_id, follower.last_id, carry=follower)
            if s.applied_id is None or not s.lock.acquire(blocking=False):
                return None
            try:
                _, newer = follower.since(s.applied_id)
                if not newer:
                    return None
                s.applied_id = int(newer[-1]["id"])
                changed, run_status = render.apply_events(s.graph, newer)
                if run_status:
                    s.run["status"] = run_status
                if not changed and not run_status:
                    return None
                s.had_news(time.monotonic())
                return as_outputs(s, {"dag": dag_delta(s, changed), "header": header_html(s), **buttons(s)})
            finally:
                s.lock.release()

        def run_due(s: Session) -> bool:
            follower = s.run_follower
            if s.details_pending:
                return True
            if follower is not None and time.monotonic() - s.resent_at >= s.resend_gap:
                with s.lock:  # everything again, from what the page has (what changed comes as usual)
                    s.details_pending, s.sent = True, {}
                    s.resend_gap = min(2 * s.resend_gap, RESEND_MAX)
                return True
            if follower is None or follower.version == s.refreshed_version:
                return False
            wait = max(MIN_REFRESH, REFRESH_COST_FACTOR * s.refresh_cost)
            return time.monotonic() - s.refreshed_at >= wait

        def run_refresh(s: Session) -> list[Any] | None:
            """Ask the API again (or, just opened, use its answers) and send what changed."""
            with s.lock:
                gen, run_id, follower = s.gen, s.run_id, s.run_follower
                pending = s.details_pending
                s.details_pending = False
            if run_id is None or follower is None:
                return None
            version = follower.version
            started = time.monotonic()
            if not pending:
                try:
                    graph, run, attempts = fetch_run(s, run_id)
                except FactoryError as exc:
                    log.info("run page of %s: %s", run_id, exc)
                    s.refreshed_at = time.monotonic()
                    return None
            with s.lock:
                if s.gen != gen:
                    return None
                if not pending:
                    adopt(s, graph, run, attempts)
                    s.refreshed_version = version
                values = details(s)
                values["dag"] = dag_delta(s, None)
                if pending:  # the whole graph too (the drawing itself may be what the page lost)
                    values["dag"] = dag_again(s)
                    s.resent_at = time.monotonic()
                s.refreshed_at = time.monotonic()
                s.refresh_cost = max(s.refresh_cost if pending else 0.0, s.refreshed_at - started)
                out = as_outputs(s, values)
                if not pending and any(not _skipped(v) for v in out):
                    s.had_news(s.refreshed_at)
                return out

        def pick_step(s: Session | None, step: str | None) -> list[str]:
            if not isinstance(s, Session) or not step:
                return ["", ""]
            with s.lock:
                s.log_step, s.picked_at = step, time.monotonic()
                s.had_news(s.picked_at)  # all again soon: whatever crossed the pick is mended
            live = s.run_follower.live_lines(step) if s.run_follower else []
            emitted = render.step_emitted(step, s.run_follower.emitted_values(step) if s.run_follower else [])
            s.sent["emitted"] = emitted
            try:
                attempts = s.client.attempts(s.run_id or "", step)
            except FactoryError as exc:
                return [str(exc), emitted]
            logs = render.step_logs(step, attempts, live)
            s.sent["logs"] = logs
            return [logs, emitted]

        log_step.input(pick_step, [session_state, log_step], [step_log, step_emitted])

        # -- actions, each confirmed ----------------------------------------------------------------

        def ask(action: str) -> Any:
            def handler(s: Session | None) -> list[Any]:
                if not isinstance(s, Session) or s.run_id is None:
                    return [gr.skip()] * 5
                gate = action in ("approve", "reject")
                if not gate and not s.can_submit:
                    return [gr.update(visible=False), "", gr.skip(), gr.skip(), _error(READ_ONLY_NOTE)]
                if gate:  # the gate's approvers decide who may: the API says no to the others
                    # the graph follows the events; the API's answer may be older than what the page shows
                    waiting = [n["id"] for n in (s.graph or {}).get("nodes") or [] if n["status"] == "waiting"]
                    if not waiting:
                        try:
                            steps = s.client.get_run(s.run_id).get("steps") or []
                        except FactoryError as exc:
                            return [gr.update(visible=False), "", gr.skip(), gr.skip(), _error(exc)]
                        waiting = [st["step_id"] for st in steps if st["status"] == "waiting"]
                    if not waiting:
                        return [gr.update(visible=False), "", gr.skip(), gr.skip(), _error("no approval gate waits")]
                    s.pending_gate = waiting[0]
                s.pending_action = action
                question = {
                    "cancel": f"Cancel run {s.run_id}? Attempts in flight are stopped.",
                    "resume": f"Resume run {s.run_id}? Steps that succeeded are kept.",
                    "rerun": f"Run workflow {(s.run or {}).get('workflow', '')} again with these inputs?",
                    "approve": f"Approve gate {s.pending_gate} of run {s.run_id}? The run goes on.",
                    "reject": f"Reject gate {s.pending_gate} of run {s.run_id}?",
                }[action]
                inputs = json.dumps((s.run or {}).get("inputs") or {}, indent=2)
                return [
                    gr.update(visible=True),
                    f"<b>{escape(question)}</b>",
                    gr.update(visible=action == "rerun", value=inputs),
                    gr.update(visible=gate, value=""),
                    "",
                ]

            return handler

        ask_outputs = [confirm_box, confirm_text, rerun_inputs, gate_comment, action_result]
        cancel_btn.click(ask("cancel"), [session_state], ask_outputs)
        resume_btn.click(ask("resume"), [session_state], ask_outputs)
        rerun_btn.click(ask("rerun"), [session_state], ask_outputs)
        approve_btn.click(ask("approve"), [session_state], ask_outputs)
        reject_btn.click(ask("reject"), [session_state], ask_outputs)

        def confirm(s: Session | None, inputs_text: str, comment: str) -> list[Any]:
            skip_run = [gr.skip()] * len(run_outputs)
            if not isinstance(s, Session) or s.run_id is None or s.pending_action is None:
                return [gr.update(visible=False), gr.skip(), gr.skip(), *skip_run]
            action, s.pending_action = s.pending_action, None
            try:
                if action in ("approve", "reject") and s.pending_gate is not None:
                    gate, s.pending_gate = s.pending_gate, None
                    answer = s.client.approve(s.run_id, gate, action == "approve", comment or "")
                    if s.run_follower is None or s.run_follower.ended:
                        s.run_follower = EventFollower(
                            s.client, s.run_id, s.run_follower.last_id if s.run_follower else 0
                        )
                    done = "approved" if action == "approve" else "rejected"
                    message = f"{done} gate {gate} as {answer['decision']['by']}"
                    return [gr.update(visible=False), _ok(message), gr.skip(), *skip_run]
                if action == "cancel":
                    s.client.cancel(s.run_id)
                    return [gr.update(visible=False), _ok(f"cancelling run {s.run_id}"), gr.skip(), *skip_run]
                if action == "resume":
                    s.client.resume(s.run_id)
                    if s.run_follower is None or s.run_follower.ended:
                        s.run_follower = EventFollower(
                            s.client, s.run_id, s.run_follower.last_id if s.run_follower else 0
                        )
                    return [gr.update(visible=False), _ok(f"resuming run {s.run_id}"), gr.skip(), *skip_run]
                try:
                    inputs = json.loads(inputs_text or "{}")
                except json.JSONDecodeError as exc:
                    s.pending_action = action
                    return [gr.skip(), _error(f"the inputs are not JSON: {exc}"), gr.skip(), *skip_run]
                if not isinstance(inputs, dict):
                    s.pending_action = action
                    return [gr.skip(), _error("the inputs must be a JSON object"), gr.skip(), *skip_run]
                graph = s.graph or s.client.run_graph(s.run_id)
                ref = graph.get("workflow_ref")
                if ref:
                    name, _, version = str(ref).partition("@")
                    new_id = s.client.start(name, inputs, int(version) if version.isdigit() else None)
                else:
                    new_id = s.client.submit(graph["spec"], inputs)
            except FactoryError as exc:
                return [gr.update(visible=False), _error(exc), gr.skip(), *skip_run]
            opened = open_run(s, new_id)
            return [gr.update(visible=False), _ok(f"started run {new_id}"), opened[0], *opened[3:]]

        confirm_yes.click(
            confirm, [session_state, rerun_inputs, gate_comment], [confirm_box, action_result, tabs, *run_outputs]
        )

        def dismiss(s: Session | None) -> list[Any]:
            if isinstance(s, Session):
                s.pending_action = None
            return [gr.update(visible=False), "nothing done"]

        confirm_no.click(dismiss, [session_state], [confirm_box, action_result])

        # -- submit -------------------------------------------------------------------------------------

        def workflow_data(text: str) -> Any:
            if len(text or "") > MAX_YAML_CHARS:
                raise FactoryError(f"the workflow is longer than {MAX_YAML_CHARS} characters")
            return parse_workflow_text(text or "", limits=DocumentLimits(), source="the workflow")

        def problems_html(title: str, problems: list[str], good: bool = False) -> str:
            items = "".join(f"<li>{escape(p)}</li>" for p in problems)
            colour = "#15803d" if good else "#b91c1c"
            return f"<div style='color:{colour}'><b>{escape(title)}</b></div><ul class='factory-problems'>{items}</ul>"

        def validate(s: Session | None, text: str) -> list[Any]:
            if not isinstance(s, Session):
                return [gr.skip(), gr.skip()]
            try:
                data = workflow_data(text)
                if not isinstance(data, dict):  # never a path: the client would read a file of that name
                    raise FactoryError("a workflow is a mapping with name, inputs and steps")
                result = s.client.validate(data)
            except ApiError as exc:
                errors = exc.problem.get("errors")
                problems = [str(e) for e in errors] if isinstance(errors, list) else [str(exc)]
                return [problems_html("not a workflow", problems), {}]
            except FactoryError as exc:
                problems = getattr(exc, "problems", None) or [str(exc)]
                return [problems_html("not a workflow", [str(p) for p in problems]), {}]
            if result["valid"] and not result.get("refused"):
                steps = ", ".join(result.get("steps") or [])
                html = problems_html(f"valid: workflow {result.get('name')} with steps {steps}", [], good=True)
                return [html, dict(result.get("inputs") or {})]
            title = "valid, but your key may not run it" if result.get("refused") else "problems"
            return [problems_html(title, [str(p) for p in result.get("problems") or []]), {}]

        validate_btn.click(validate, [session_state, yaml_box], [validation, declared])

        def uploaded(s: Session | None, path: str | None) -> list[Any]:
            if not path:
                return [gr.skip(), gr.skip(), gr.skip()]
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read(MAX_YAML_CHARS + 1)
            return [text, *validate(s, text)]

        upload.upload(uploaded, [session_state, upload], [yaml_box, validation, declared])

        with form_area:

            @gr.render(inputs=[declared, can_submit])  # type: ignore[untyped-decorator]
            def inputs_form(spec: dict[str, Any] | None, allowed: bool) -> None:
                fields: list[Any] = []
                kinds: list[tuple[str, str]] = []
                if spec is None:
                    gr.HTML(
                        "<div class='factory-empty'>validate the workflow to fill in its inputs and submit it</div>"
                    )
                    return
                if spec:
                    gr.HTML("<h4>inputs</h4>")
                for name, default in spec.items():
                    kind = render.input_kind(default)
                    label = f"{name} ({kind})"
                    if kind == "bool":
                        fields.append(
                            gr.Checkbox(value=default, label=label, elem_id=f"input-{name}", interactive=True)
                        )
                    elif kind in ("int", "float"):
                        fields.append(
                            gr.Number(
                                value=default,
                                label=label,
                                precision=0 if kind == "int" else None,
                                elem_id=f"input-{name}",
                                interactive=True,
                            )
                        )
                    elif kind == "text":
                        fields.append(
                            gr.Textbox(
                                value=default,
                                label=label,
                                max_length=100_000,
                                elem_id=f"input-{name}",
                                interactive=True,
                            )
                        )
                    else:
                        fields.append(
                            gr.Code(
                                value=json.dumps(default, indent=2),
                                language="json",
                                label=label,
                                elem_id=f"input-{name}",
                                interactive=True,
                            )
                        )
                    kinds.append((name, kind))
                button = gr.Button("Submit", variant="primary", interactive=bool(allowed), elem_id="submit-btn")
                submit_msg = gr.HTML(
                    "" if allowed else f"<div style='color:#92400e'>{escape(READ_ONLY_NOTE)}</div>",
                    elem_id="submit-result",
                )

                def do_submit(s: Session | None, text: str, *values: Any) -> list[Any]:
                    skip = [gr.skip()] * (len(run_outputs) + 2)
                    if not isinstance(s, Session):
                        return [gr.skip(), *skip]
                    try:
                        inputs = {
                            name: render.parse_input(kind, v) for (name, kind), v in zip(kinds, values, strict=True)
                        }
                    except ValueError as exc:
                        return [_error(exc), *skip]
                    try:
                        data = workflow_data(text)
                        if not isinstance(data, dict):
                            raise FactoryError("a workflow is a mapping with name, inputs and steps")
                        run_id = s.client.submit(data, inputs)
                    except ApiError as exc:
                        errors = exc.problem.get("errors")
                        problems = [str(e) for e in errors] if isinstance(errors, list) else []
                        return [problems_html(str(exc).splitlines()[0], problems), *skip]
                    except FactoryError as exc:
                        return [_error(exc), *skip]
                    opened = open_run(s, run_id)
                    return [_ok(f"submitted run {run_id}"), opened[0], opened[2], *opened[3:]]

                button.click(
                    do_submit,
                    [session_state, yaml_box, *fields],
                    [submit_msg, tabs, confirm_box, *run_outputs],
                )

        # -- schedules ----------------------------------------------------------------------------------

        def schedule_controls(s: Session, message: str = "") -> list[Any]:
            """The picker, the pause and resume buttons (usable by admin keys, for a schedule in the
            state they change) and the note saying why they are not."""
            names = [str(sc["name"]) for sc in s.schedules]
            if s.schedule not in names:
                s.schedule = None
            picked = next((sc for sc in s.schedules if sc["name"] == s.schedule), None)
            paused = picked is not None and picked.get("state") == "paused"
            if not s.can_admin:
                scopes = ", ".join(str(x) for x in s.me.get("scopes", []))
                note = f"<div style='color:#92400e'>{escape(SCHEDULE_ADMIN_NOTE.format(scopes=scopes))}</div>"
            elif picked is None:
                note = "<div class='factory-empty'>pick a schedule to pause or resume it</div>"
            else:
                note = ""
            return [
                gr.update(choices=names, value=s.schedule),
                gr.update(interactive=s.can_admin and picked is not None and not paused),
                gr.update(interactive=s.can_admin and paused),
                message or note,
            ]

        def load_schedules(s: Session | None) -> list[Any]:
            if not isinstance(s, Session):
                return [gr.skip()] * 6
            try:
                s.schedules = s.client.list_schedules()
            except FactoryError as exc:
                return [gr.skip(), _error(exc), *[gr.skip()] * 4]
            empty = "<div class='factory-empty'>no schedules: `factory schedules add` adds one</div>"
            return [render.schedule_rows(s.schedules), "" if s.schedules else empty, *schedule_controls(s)]

        schedule_outputs = [schedules_table, schedules_msg, schedule_pick, pause_btn, unpause_btn, schedule_note]

        def pick_schedule(s: Session | None, name: str | None) -> list[Any]:
            if not isinstance(s, Session):
                return [gr.skip()] * 4
            s.schedule = name or None
            return schedule_controls(s)

        def pick_schedule_row(s: Session | None, evt: gr.SelectData) -> list[Any]:
            row = evt.row_value if isinstance(evt.row_value, list) else None
            return pick_schedule(s, str(row[0]) if row else None)

        schedule_pick.input(pick_schedule, [session_state, schedule_pick], schedule_outputs[2:])
        schedules_table.select(pick_schedule_row, [session_state], schedule_outputs[2:])

        def schedule_action(action: str) -> Any:
            def handler(s: Session | None) -> list[Any]:
                if not isinstance(s, Session) or s.schedule is None:
                    return [gr.skip()] * 6
                if not s.can_admin:  # the button is disabled; the API would say no anyway
                    return [*[gr.skip()] * 5, schedule_controls(s)[-1]]
                name = s.schedule
                try:
                    s.client.schedule_action(name, action)
                except FactoryError as exc:
                    return [gr.skip(), _error(exc), *[gr.skip()] * 4]
                out = load_schedules(s)
                done = "paused" if action == "pause" else "resumed"
                out[-1] = _ok(f"{done} schedule {name}")
                return out

            return handler

        pause_btn.click(schedule_action("pause"), [session_state], schedule_outputs)
        unpause_btn.click(schedule_action("resume"), [session_state], schedule_outputs)

        # -- agents -------------------------------------------------------------------------------------

        def load_agents(s: Session | None) -> list[Any]:
            if not isinstance(s, Session):
                return [gr.skip(), gr.skip()]
            try:
                return [render.pool_rows(s.client.agents()), ""]
            except FactoryError as exc:
                return [gr.skip(), _error(exc)]

        def route(s: Session | None, text: str, caps: str) -> list[Any]:
            if not isinstance(s, Session):
                return [gr.skip(), gr.skip()]
            if not (text or "").strip():
                return [_error("type a task"), []]
            capabilities = [c.strip() for c in (caps or "").split(",") if c.strip()]
            try:
                decision = s.client.route(text, capabilities)
            except FactoryError as exc:
                return [_error(exc), []]
            html = (
                f"<div id='route-choice'>chosen: <b>{escape(str(decision['agent']))}</b> "
                f"(score {float(decision['score']):.3f}, {escape(str(decision.get('scorer', '')))}, "
                f"{float(decision.get('latency_ms', 0)):.1f} ms)</div>"
                f"<div>{escape(str(decision.get('reason', '')))}</div>"
            )
            return [html, render.route_rows(decision)]

        route_btn.click(route, [session_state, route_text, route_caps], [route_result, route_table])
        route_text.submit(route, [session_state, route_text, route_caps], [route_result, route_table])

        # -- system -------------------------------------------------------------------------------------

        def load_system(s: Session | None) -> list[Any]:
            if not isinstance(s, Session):
                return [gr.skip()] * 7
            try:
                view = s.client.system(window=900, buckets=60)
            except FactoryError as exc:
                return [*[gr.skip()] * 6, _error(exc)]
            import pandas as pd  # type: ignore[import-untyped]

            records = render.series_records(view)
            statuses = [{"status": k, "runs": v} for k, v in view["runs_by_status"].items()]
            queues = [{"agent": k, "queued": v} for k, v in view.get("queues", {}).items()]
            return [
                pd.DataFrame(records["throughput"], columns=["time", "steps/s"]),
                pd.DataFrame(records["latency"], columns=["time", "seconds", "percentile"]),
                pd.DataFrame(records["trouble"], columns=["time", "count", "kind"]),
                pd.DataFrame(statuses, columns=["status", "runs"]),
                pd.DataFrame(queues, columns=["agent", "queued"]),
                render.node_rows(view),
                "",
            ]

        system_outputs = [throughput_plot, latency_plot, trouble_plot, status_plot, queue_plot, nodes_table, system_msg]

        def slow_tick(s: Session | None) -> list[Any]:
            skip_agents, skip_system = [gr.skip()] * 2, [gr.skip()] * len(system_outputs)
            skip_schedules = [gr.skip()] * len(schedule_outputs)
            if not isinstance(s, Session):
                return [*skip_agents, *skip_system, *skip_schedules]
            if s.tab == "agents":
                return [*load_agents(s), *skip_system, *skip_schedules]
            if s.tab == "system":
                return [*skip_agents, *load_system(s), *skip_schedules]
            if s.tab == "schedules":  # the next and last runs move; the note keeps what an action said
                return [*skip_agents, *skip_system, *load_schedules(s)[:5], gr.skip()]
            return [*skip_agents, *skip_system, *skip_schedules]

        slow_timer.tick(slow_tick, [session_state], [pools_table, agents_msg, *system_outputs, *schedule_outputs])

        # -- the live loop ------------------------------------------------------------------------------

        live_outputs = [*list_outputs, *run_outputs]

        async def live(s: Session | None) -> AsyncIterator[list[Any]]:
            """The page's live loop: every ``LOOP_TICK`` it looks at the streams the page follows and
            pushes what changed (Gradio sends each yield at once): the runs list when its stream
            delivered something; on a run page, the graph and header as the run's events say
            (without asking the API), then the rest from the API, at most every
            ``MIN_REFRESH`` s or ``REFRESH_COST_FACTOR`` times what the last answer cost. One loop
            per page: the timer starts it, and again only if it ended (a dropped connection)."""
            if not isinstance(s, Session) or s.closed or time.monotonic() - s.loop_beat < LOOP_STALE:
                return
            token = object()
            s.loop_token = token
            skip_list = [gr.skip()] * len(list_outputs)
            skip_run = [gr.skip()] * len(run_outputs)
            said = time.monotonic()
            while not s.closed and s.loop_token is token:
                s.loop_beat = time.monotonic()
                out: list[Any] | None = None
                try:
                    if s.tab == "runs" and list_due(s):
                        listed = await anyio.to_thread.run_sync(lambda: load_runs(s, *s.filters))
                        out = [*listed, *skip_run]
                    elif s.tab == "run" and s.run_id is not None:
                        news = run_news(s)
                        if news is not None:
                            yield [*skip_list, *news]
                            said = time.monotonic()
                        if run_due(s):
                            s.loop_beat = asked = time.monotonic()
                            refreshed = await anyio.to_thread.run_sync(run_refresh, s)
                            if refreshed is not None:
                                if s.picked_at >= asked:  # a step was picked meanwhile: not the one before
                                    keys = zip(RUN_KEYS, refreshed, strict=True)
                                    refreshed = [gr.skip() if k in PICK_KEYS else v for k, v in keys]
                                out = [*skip_list, *refreshed]
                except Exception:  # the loop outlives one bad answer; the next tick tries again
                    log.exception("dashboard live loop")
                if out is None and time.monotonic() - said > LOOP_QUIET:
                    out = [*skip_list, *skip_run]  # nothing new: a closed page is noticed on sending
                if out is not None:
                    yield out
                    said = time.monotonic()
                await asyncio.sleep(LOOP_TICK)

        loop_timer.tick(
            live,
            [session_state],
            live_outputs,
            show_progress="hidden",
            concurrency_limit=None,
            trigger_mode="once",
            queue=True,
        )

        # -- which tab is open ------------------------------------------------------------------------

        def on_tab(name: str) -> Any:
            def handler(s: Session | None) -> None:
                if isinstance(s, Session):
                    s.tab = name

            return handler

        runs_tab.select(on_tab("runs"), [session_state], None).then(
            refresh_list, [session_state, *filters], list_outputs
        )
        run_tab.select(on_tab("run"), [session_state], None)
        submit_tab.select(on_tab("submit"), [session_state], None)
        schedules_tab.select(on_tab("schedules"), [session_state], None).then(
            load_schedules, [session_state], schedule_outputs
        )
        agents_tab.select(on_tab("agents"), [session_state], None).then(
            load_agents, [session_state], [pools_table, agents_msg]
        )
        system_tab.select(on_tab("system"), [session_state], None).then(load_system, [session_state], system_outputs)

    return demo  # type: ignore[no-any-return]
