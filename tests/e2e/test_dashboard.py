"""The dashboard (/ui) in a real headless Chromium driven by Playwright, against the API on Ray Serve.

One Serve application (the session's `api_server`, which deploys the dashboard beside the API)
and one browser for the module; each test opens its own page, records console errors, page
errors, dialogs and HTTP answers >= 400, and saves a screenshot into docs/img/.
Chromium is Debian's (`apt-get install chromium`); CHROMIUM_PATH overrides where it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from factory.client import FactoryClient
from tests.conftest import ApiServer, service_missing

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/lib/chromium/chromium")
SHOTS = Path(__file__).parent.parent.parent / "docs" / "img"
WAIT_MS = 60_000
XSS_NAME = "<img src=x onerror=alert(1)>"
XSS_LOG = "<script>alert(1)</script>"

pytest.importorskip("gradio")
playwright_sync = pytest.importorskip("playwright.sync_api")


@dataclass
class Problems:
    seen: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        service_missing("Chromium", FileNotFoundError(CHROMIUM))
    with playwright_sync.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@contextlib.contextmanager
def watched_page(browser: Any) -> Iterator[tuple[Any, Problems]]:
    """A page in a context of its own (its own session), its problems recorded; none allowed."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    problems = Problems()
    pg.on("console", lambda m: problems.seen.append(f"console: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.seen.append(f"page error: {e}"))
    pg.on("response", lambda r: problems.seen.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)

    def dialog(d: Any) -> None:
        problems.seen.append(f"dialog: {d.message}")
        d.dismiss()

    pg.on("dialog", dialog)
    try:
        yield pg, problems
    finally:
        context.close()
    assert problems.seen == [], problems.seen


@pytest.fixture
def page(browser: Any, api_server: ApiServer) -> Iterator[tuple[Any, Problems]]:
    with watched_page(browser) as watched:
        yield watched


def client(api_server: ApiServer, scope: str = "submit") -> FactoryClient:
    return FactoryClient(api_server.base_url, api_server.keys[scope])


def login(pg: Any, api_server: ApiServer, scope: str = "submit") -> None:
    pg.goto(f"{api_server.base_url}/ui/")
    box(pg, "login-key").fill(api_server.keys[scope])
    pg.locator("#login-btn").click()
    pg.locator("#whoami").get_by_text("logged in").wait_for(timeout=WAIT_MS)
    # the key is never in the address
    assert api_server.keys[scope] not in pg.url


def box(pg: Any, elem_id: str) -> Any:
    """The text field of a Gradio Textbox (an input or a textarea)."""
    return pg.locator(f"#{elem_id} textarea, #{elem_id} input").first


def cell(pg: Any, table: str, text: str | re.Pattern[str]) -> Any:
    """A visible cell of a Gradio Dataframe whose whole text is ``text`` (or matches the pattern)."""
    pattern = text if isinstance(text, re.Pattern) else re.compile(rf"^\s*{re.escape(text)}\s*$")
    return pg.locator(f"#{table} [role=gridcell]").filter(has_text=pattern)


def pick(pg: Any, dropdown: str, option: str) -> None:
    # in the middle of the window: its list of options opens below it, inside the window
    pg.locator(f"#{dropdown}").evaluate("el => el.scrollIntoView({block: 'center'})")
    pg.locator(f"#{dropdown} input").click()
    pg.get_by_role("option", name=option, exact=True).click()


def open_run(pg: Any, run_id: str) -> None:
    pg.get_by_role("tab", name="Runs").click()
    box(pg, "open-run-id").fill(run_id)
    pg.locator("#open-run-btn").click()
    pg.locator("#run-id").filter(has_text=run_id).wait_for(timeout=WAIT_MS)


def status_is(pg: Any, status: str) -> None:
    pg.locator(f"#run-status[data-status={status}]").wait_for(timeout=WAIT_MS)


def shot(pg: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SHOTS / f"dashboard-{name}.png"), full_page=True)


WORKFLOW_YAML = """\
name: dashboard-demo
inputs:
  x: 41
  pause: 1.5
steps:
  - id: add
    python: tests.fixtures.teststeps:add
    with: {a: "${inputs.x}", b: 1}
  - id: wait
    python: tests.fixtures.teststeps:sleepy
    with: {seconds: "${inputs.pause}"}
  - id: chat
    python: tests.fixtures.teststeps:chatty
    with: {x: "${steps.add.output}"}
    needs: [wait]
"""


def test_submit_validate_and_watch_the_run_succeed_live(page: tuple[Any, Problems], api_server: ApiServer) -> None:
    pg, _ = page
    login(pg, api_server)
    pg.get_by_role("tab", name="Submit").click()
    editor = pg.locator("#submit-yaml .cm-content")
    editor.fill(WORKFLOW_YAML.replace("x: 41", "x: [oops"))
    pg.locator("#validate-btn").click()
    pg.locator("#validate-result").get_by_text("not a workflow").wait_for(timeout=WAIT_MS)
    editor.fill(WORKFLOW_YAML.replace("needs: [wait]", "needs: [nope]"))
    pg.locator("#validate-btn").click()
    pg.locator("#validate-result").get_by_text("nope").wait_for(timeout=WAIT_MS)  # the problem names the step
    editor.fill(WORKFLOW_YAML)
    pg.locator("#validate-btn").click()
    pg.locator("#validate-result").get_by_text("valid: workflow dashboard-demo").wait_for(timeout=WAIT_MS)
    box(pg, "input-x").fill("9")  # the form built from the declared inputs
    shot(pg, "submit")
    pg.evaluate("window.__not_reloaded = true")
    pg.locator("#submit-btn").click()
    pg.locator("#run-workflow").filter(has_text="dashboard-demo").wait_for(timeout=WAIT_MS)
    status_is(pg, "succeeded")  # the page follows the run: nobody reloads it
    assert pg.evaluate("window.__not_reloaded") is True
    pg.locator("#dag g.dag-node[data-step=chat][data-status=succeeded]").wait_for(timeout=WAIT_MS)
    cell(pg, "steps-table", "chat").first.wait_for(timeout=WAIT_MS)
    run_id = pg.locator("#run-id").inner_text().strip()
    run = client(api_server).get_run(run_id)
    assert {s["step_id"]: s["output"] for s in run["steps"]}["chat"] == 20  # (9 + 1) * 2: the form's input
    pg.locator("#run-outputs").get_by_text("20").first.wait_for(timeout=WAIT_MS)
    shot(pg, "run")


def test_runs_list_updates_by_itself(page: tuple[Any, Problems], api_server: ApiServer) -> None:
    pg, _ = page
    login(pg, api_server)
    cl = client(api_server)
    run_id = cl.submit(
        {
            "name": "list-live",
            "steps": [{"id": "a", "python": "tests.fixtures.teststeps:add", "with": {"a": 1, "b": 2}}],
        }
    )
    # nothing here asks for the list: the events stream makes the page reload it
    cell(pg, "runs-table", run_id).first.wait_for(timeout=WAIT_MS)
    cl.wait(run_id, timeout=60)
    shot(pg, "runs")


def test_cancel_a_slow_run_with_confirmation(page: tuple[Any, Problems], api_server: ApiServer) -> None:
    pg, _ = page
    login(pg, api_server)
    cl = client(api_server)
    run_id = cl.submit(
        {
            "name": "slow",
            "steps": [{"id": "nap", "python": "tests.fixtures.teststeps:sleepy", "with": {"seconds": 120}}],
        }
    )
    open_run(pg, run_id)
    status_is(pg, "running")
    pg.locator("#cancel-btn").click()
    pg.locator("#confirm-text").get_by_text(f"Cancel run {run_id}?").wait_for(timeout=WAIT_MS)
    pg.locator("#confirm-yes").click()
    pg.locator("#action-result").get_by_text(f"cancelling run {run_id}").wait_for(timeout=WAIT_MS)
    status_is(pg, "cancelled")
    assert cl.get_run(run_id)["status"] == "cancelled"
    shot(pg, "cancelled")


def test_step_logs_and_markup_shown_as_text(page: tuple[Any, Problems], api_server: ApiServer) -> None:
    pg, problems = page
    login(pg, api_server)
    cl = client(api_server)
    run_id = cl.submit(
        {
            "name": XSS_NAME,
            "steps": [
                {"id": "shout", "python": "tests.fixtures.teststeps:say", "with": {"text": XSS_LOG}},
                {"id": "calm", "python": "tests.fixtures.teststeps:chatty", "with": {"x": 3}},
            ],
        }
    )
    cl.wait(run_id, timeout=60)
    open_run(pg, run_id)
    status_is(pg, "succeeded")
    assert pg.locator("#run-workflow").inner_text() == XSS_NAME  # the characters, not an image
    assert pg.locator("#run-header img").count() == 0
    pick(pg, "log-step", "calm")
    logs = pg.locator("#step-logs textarea")
    pg.wait_for_function("() => document.querySelector('#step-logs textarea').value.includes('printing 3')")
    pick(pg, "log-step", "shout")
    pg.wait_for_function("(s) => document.querySelector('#step-logs textarea').value.includes(s)", arg=XSS_LOG)
    assert XSS_LOG in logs.input_value()
    shot(pg, "logs")
    # the runs list shows the name as text too
    pg.get_by_role("tab", name="Runs").click()
    box(pg, "f-q").fill(run_id)
    cell(pg, "runs-table", XSS_NAME).first.wait_for(timeout=WAIT_MS)
    assert pg.locator("#runs-table img").count() == 0
    time.sleep(0.5)
    assert not [p for p in problems.seen if p.startswith("dialog")]
    shot(pg, "xss")


def test_a_running_python_steps_logs_follow_live(page: tuple[Any, Problems], api_server: ApiServer) -> None:
    """The lines a python step prints show while it runs (its step.log events), then once each
    when its attempt's log is there."""
    pg, _ = page
    login(pg, api_server)
    cl = client(api_server)
    drip = {
        "id": "drip",
        "python": "tests.fixtures.teststeps:drip",
        "with": {"lines": 30, "pause": 0.3, "prefix": "tick"},
    }
    run_id = cl.submit({"name": "live-logs", "steps": [drip]})
    open_run(pg, run_id)  # the step running is the one whose logs show
    logs = "document.querySelector('#step-logs textarea').value"
    pg.wait_for_function(f"() => {logs}.split('\\n').includes('tick 3')", timeout=WAIT_MS)
    shown = pg.locator("#step-logs textarea").input_value()
    step = {s["step_id"]: s for s in cl.get_run(run_id)["steps"]}["drip"]
    assert step["status"] == "running", "the lines came before the step ended"
    assert "--- attempt 1: running (live)" in shown and "tick 29" not in shown
    shot(pg, "logs-live")
    status_is(pg, "succeeded")
    pg.wait_for_function(f"() => {logs}.includes('--- attempt 1: succeeded')", timeout=WAIT_MS)
    lines = pg.locator("#step-logs textarea").input_value().split("\n")
    assert [line for line in lines if line.startswith("tick ")] == [f"tick {i}" for i in range(30)]  # each once
    assert "--- attempt 1: running (live)" not in lines


def test_a_steps_emitted_data_shows_on_the_run_page(page: tuple[Any, Problems], api_server: ApiServer) -> None:
    """What a step emits (ctx.emit, e.g. streamed tokens) shows for the step picked, as text."""
    pg, _ = page
    login(pg, api_server)
    cl = client(api_server)
    steps = [
        {"id": "quiet", "python": "tests.fixtures.teststeps:add", "with": {"a": 1, "b": 2}},
        {"id": "stream", "python": "tests.fixtures.teststeps:report_progress", "with": {"n": 12, "delay": 0.1}},
    ]
    run_id = cl.submit({"name": "emits", "steps": steps})
    cl.wait(run_id, timeout=60)
    open_run(pg, run_id)
    status_is(pg, "succeeded")
    emitted = "document.querySelector('#step-emitted textarea').value"
    # the first step's, picked by the page itself
    pg.wait_for_function(f"() => {emitted} === '(nothing emitted by step quiet)'", timeout=WAIT_MS)
    pick(pg, "log-step", "stream")
    pg.wait_for_function(f"() => {emitted}.includes('{{\"i\": 11}}')", timeout=WAIT_MS)
    lines = pg.locator("#step-emitted textarea").input_value().split("\n")
    assert lines == [json.dumps({"i": i}) for i in range(12)]  # each value once, in order
    pick(pg, "log-step", "quiet")
    pg.wait_for_function(f"() => {emitted} === '(nothing emitted by step quiet)'", timeout=WAIT_MS)


def test_the_run_page_shows_tokens_and_what_the_run_spent(
    page: tuple[Any, Problems], api_server: ApiServer, usage_run: str
) -> None:
    """A run whose fast-agent steps asked the stand-in provider (tests/conftest.py ``usage_run``): the steps
    table shows each step's tokens and estimated cost, the header what the run spent in all its attempts
    (what its budgets count), at the api_server's prices."""
    from tests.conftest import API_MODEL_PRICES
    from tests.fixtures.chat_standin import COMPLETION_TOKENS, PROMPT_TOKENS

    prices = API_MODEL_PRICES["tiny-local"]
    cost = (PROMPT_TOKENS * prices["input"] + COMPLETION_TOKENS * prices["output"]) / 1e6
    pg, _ = page
    login(pg, api_server, "read")
    open_run(pg, usage_run)
    status_is(pg, "succeeded")
    cell(pg, "steps-table", f"{PROMPT_TOKENS} in / {COMPLETION_TOKENS} out · ${cost:.6f}").wait_for(timeout=WAIT_MS)
    cell(pg, "steps-table", f"{2 * PROMPT_TOKENS} in / {2 * COMPLETION_TOKENS} out · ${2 * cost:.6f}").wait_for(
        timeout=WAIT_MS
    )
    spent = pg.locator("#run-spent")
    spent.wait_for(timeout=WAIT_MS)
    tokens = 3 * (PROMPT_TOKENS + COMPLETION_TOKENS)
    assert spent.inner_text().startswith(f"spent: {tokens} tokens · est. ${3 * cost:.6f} · "), spent.inner_text()
    shot(pg, "run-usage")


def test_read_key_sees_but_cannot_act(page: tuple[Any, Problems], api_server: ApiServer) -> None:
    pg, _ = page
    cl = client(api_server)
    run_id = cl.submit(
        {
            "name": "read-only",
            "steps": [{"id": "a", "python": "tests.fixtures.teststeps:add", "with": {"a": 1, "b": 1}}],
        }
    )
    cl.wait(run_id, timeout=60)
    login(pg, api_server, "read")
    open_run(pg, run_id)
    for button in ("#cancel-btn", "#resume-btn", "#rerun-btn"):
        assert pg.locator(button).is_disabled()
    pg.locator("#perm-note").get_by_text("your key can read only").wait_for(timeout=WAIT_MS)


def test_schedules_listed_read_only_and_paused_by_an_admin(
    page: tuple[Any, Problems], browser: Any, api_server: ApiServer
) -> None:
    """The Schedules tab: each schedule with its workflow, cron, next and last run, enabled; a read
    key sees the pause / resume buttons disabled with the reason, an admin key uses them."""
    import datetime as dt

    import ray

    from factory import schedules
    from factory.runner import NAMESPACE

    pg, _ = page
    admin = client(api_server, "admin")
    name = "dash-yearly"
    step = {"id": "a", "python": "tests.fixtures.teststeps:add", "with": {"a": "${inputs.x}", "b": 1}}
    schedule = {"cron": "0 0 1 1 *", "timezone": "Europe/Paris", "inputs": {"x": 41}}
    view = admin.add_schedule({"name": name, "inputs": {"x": 1}, "steps": [step], "schedule": schedule})
    try:
        # the API's scheduler decides the next tick now (asked, not waited for): a last run to show
        actor = ray.get_actor(schedules.cron_scheduler_name(api_server.settings), namespace=NAMESPACE)
        ray.get(actor.sweep.remote(view["next_ticks"][0] + 1), timeout=60)
        run_id = admin.schedule_ticks(name)[0]["run_id"]
        admin.wait(run_id, timeout=60)
        (now,) = [v for v in admin.list_schedules() if v["name"] == name]
        next_run = dt.datetime.fromtimestamp(now["next_ticks"][0], tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")

        login(pg, api_server, "read")
        pg.get_by_role("tab", name="Schedules").click()
        cell(pg, "schedules-table", name).first.wait_for(timeout=WAIT_MS)
        for text in (view["workflow_ref"], "0 0 1 1 * (Europe/Paris)", next_run, "yes"):
            cell(pg, "schedules-table", text).first.wait_for(timeout=WAIT_MS)
        cell(pg, "schedules-table", re.compile(rf"· run {run_id}\s*$")).first.wait_for(timeout=WAIT_MS)
        cell(pg, "schedules-table", name).first.click()  # picked: still nothing a read key may do
        pg.locator("#schedule-note").get_by_text("needs a key with the admin scope").wait_for(timeout=WAIT_MS)
        assert pg.locator("#schedule-pause-btn").is_disabled() and pg.locator("#schedule-resume-btn").is_disabled()
        shot(pg, "schedules")

        with watched_page(browser) as (apg, _):  # an admin, in a session of their own
            login(apg, api_server, "admin")
            apg.get_by_role("tab", name="Schedules").click()
            cell(apg, "schedules-table", name).first.wait_for(timeout=WAIT_MS)
            assert apg.locator("#schedule-pause-btn").is_disabled()  # nothing picked yet
            pick(apg, "schedule-pick", name)
            apg.locator("#schedule-pause-btn:not([disabled])").click()
            apg.locator("#schedule-note").get_by_text(f"paused schedule {name}").wait_for(timeout=WAIT_MS)
            cell(apg, "schedules-table", re.compile(r"^\s*no: paused by key:")).first.wait_for(timeout=WAIT_MS)
            assert [v["state"] for v in admin.list_schedules() if v["name"] == name] == ["paused"]
            apg.locator("#schedule-resume-btn:not([disabled])").click()
            apg.locator("#schedule-note").get_by_text(f"resumed schedule {name}").wait_for(timeout=WAIT_MS)
            assert [v["state"] for v in admin.list_schedules() if v["name"] == name] == ["active"]
    finally:
        admin.schedule_action(name, "remove")


def test_agents_pool_and_routing_playground(page: tuple[Any, Problems], api_server: ApiServer) -> None:
    from factory.catalog import AgentSpec
    from factory.pools import Pools, stop_manager

    pg, _ = page
    pools = Pools()
    fixtures = str(Path(__file__).parent.parent / "fixtures")
    spec = AgentSpec.model_validate(
        {
            "name": "sleeper",
            "class": "agent_fixtures:Sleeper",
            "capabilities": ["wait"],
            "pool": {"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 2},
        }
    )
    try:
        pools.ensure(spec, search_path=[fixtures])
        login(pg, api_server)
        pg.get_by_role("tab", name="Agents").click()
        cell(pg, "pools-table", "sleeper").first.wait_for(timeout=WAIT_MS)
        cell(pg, "pools-table", "healthy").first.wait_for(timeout=WAIT_MS)
        box(pg, "route-text").fill("Boil these meeting notes down to three bullet points.")
        pg.locator("#route-btn").click()
        pg.locator("#route-choice").get_by_text("summarizer").wait_for(timeout=WAIT_MS)
        cell(pg, "route-table", "runner-up").first.wait_for(timeout=WAIT_MS)
        shot(pg, "agents")
    finally:
        pools.close()
        stop_manager(drain_timeout=0)


def test_system_plots(page: tuple[Any, Problems], api_server: ApiServer) -> None:
    pg, _ = page
    client(api_server).wait(
        client(api_server).submit(
            {"name": "sys", "steps": [{"id": "a", "python": "tests.fixtures.teststeps:add", "with": {"a": 1, "b": 1}}]}
        ),
        timeout=60,
    )
    login(pg, api_server)
    pg.get_by_role("tab", name="System").click()
    pg.get_by_text("steps finished per second").first.wait_for(timeout=WAIT_MS)
    pg.locator("canvas, svg.marks").first.wait_for(timeout=WAIT_MS)
    cell(pg, "nodes-table", re.compile(r"^\s*\d+(\.\d+)? / \d+(\.\d+)? GB\s*$")).first.wait_for(timeout=WAIT_MS)
    shot(pg, "system")


def test_factory_ui_runs_on_its_own(page: tuple[Any, Problems], api_server: ApiServer) -> None:
    """`factory ui --api URL`: the same dashboard in its own process, against the API's URL."""
    import subprocess
    import sys

    import httpx

    from tests.fixtures.ports import free_port

    pg, _ = page
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "factory.cli", "ui", "--api", api_server.base_url, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{base}/ui/", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "factory ui did not come up"
            time.sleep(0.5)
        assert httpx.get(f"{base}/favicon.ico").status_code == 200
        assert httpx.get(base, follow_redirects=False).headers["location"] == "/ui/"
        pg.goto(f"{base}/ui/")
        box(pg, "login-key").fill("fk_not_a_key")
        pg.locator("#login-btn").click()
        pg.locator("#login-status").get_by_text("HTTP 401").wait_for(timeout=WAIT_MS)
        box(pg, "login-key").fill(api_server.keys["read"])
        pg.locator("#login-btn").click()
        pg.locator("#whoami").get_by_text("(read)").wait_for(timeout=WAIT_MS)
    finally:
        pg.close()  # before the server goes: its open streams would log connection errors
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def test_run_again_with_edited_inputs_and_resume(page: tuple[Any, Problems], api_server: ApiServer) -> None:
    pg, _ = page
    cl = client(api_server)
    wf = {
        "name": "again",
        "inputs": {"x": 1},
        "steps": [{"id": "a", "python": "tests.fixtures.teststeps:add", "with": {"a": "${inputs.x}", "b": 1}}],
    }
    first = cl.submit(wf)
    cl.wait(first, timeout=60)
    login(pg, api_server)
    open_run(pg, first)
    status_is(pg, "succeeded")
    assert pg.locator("#resume-btn").is_disabled()  # nothing to resume in a run that succeeded
    pg.locator("#rerun-btn").click()
    pg.locator("#rerun-inputs .cm-content").fill('{"x": 41}')
    pg.locator("#confirm-no").click()
    pg.locator("#action-result").get_by_text("nothing done").wait_for(timeout=WAIT_MS)
    pg.locator("#rerun-btn").click()
    pg.locator("#rerun-inputs .cm-content").fill('{"x": 41}')
    pg.locator("#confirm-yes").click()
    pg.locator("#action-result").get_by_text("started run").wait_for(timeout=WAIT_MS)
    second = pg.locator("#run-id").inner_text().strip()
    assert second != first
    status_is(pg, "succeeded")
    assert {s["step_id"]: s["output"] for s in cl.get_run(second)["steps"]} == {"a": 42}
    # a cancelled run resumes from the page
    slow = cl.submit(
        {
            "name": "resume-me",
            "steps": [{"id": "nap", "python": "tests.fixtures.teststeps:sleepy", "with": {"seconds": 60}}],
        }
    )
    cl.cancel(slow)
    cl.wait(slow, timeout=60)
    open_run(pg, slow)
    status_is(pg, "cancelled")
    pg.locator("#resume-btn").click()
    pg.locator("#confirm-yes").click()
    pg.locator("#action-result").get_by_text(f"resuming run {slow}").wait_for(timeout=WAIT_MS)
    status_is(pg, "running")  # the page follows the resumed run
    cl.cancel(slow)


def test_approve_a_waiting_gate_from_the_run_page(page: tuple[Any, Problems], api_server: ApiServer) -> None:
    pg, _ = page
    login(pg, api_server)
    cl = client(api_server)
    run_id = cl.submit(
        {
            "name": "gated",
            "steps": [
                {"id": "plan", "python": "tests.fixtures.teststeps:add", "with": {"a": 1, "b": 1}},
                {"id": "gate", "approval": {"message": "go with ${steps.plan.output}?", "approvers": ["scope:submit"]}},
                {"id": "act", "python": "tests.fixtures.teststeps:echo", "with": {"value": "${steps.gate.output}"}},
            ],
        }
    )
    open_run(pg, run_id)
    status_is(pg, "waiting")
    pg.locator("#approve-btn").click()
    pg.locator("#confirm-text").get_by_text(f"Approve gate gate of run {run_id}?").wait_for(timeout=WAIT_MS)
    box(pg, "gate-comment").fill("fine by me")
    pg.locator("#confirm-yes").click()
    pg.locator("#action-result").get_by_text("approved gate gate as key:").wait_for(timeout=WAIT_MS)
    status_is(pg, "succeeded")
    act = {s["step_id"]: s for s in cl.get_run(run_id)["steps"]}["act"]
    assert act["output"]["approved"] is True and act["output"]["comment"] == "fine by me"


def test_a_large_run_is_drawn_compact_and_turns_green_live(page: tuple[Any, Problems], api_server: ApiServer) -> None:
    """Over 120 steps the graph is a cell per step; the cells follow the run's events with no reload."""
    pg, _ = page
    login(pg, api_server)
    cl = client(api_server)
    steps: list[dict[str, Any]] = [{"id": "first", "python": "tests.fixtures.teststeps:sleepy", "with": {"seconds": 2}}]
    steps += [
        {"id": f"s{i}", "python": "tests.fixtures.teststeps:add", "with": {"a": i, "b": 1}, "needs": ["first"]}
        for i in range(130)
    ]
    run_id = cl.submit({"name": "wide", "steps": steps})
    open_run(pg, run_id)
    pg.locator("#dag-svg[data-compact=yes]").wait_for(timeout=WAIT_MS)
    assert pg.locator("#dag g.dag-node").count() == 131
    pg.evaluate("window.__not_reloaded = true")
    pg.wait_for_function(
        "() => document.querySelectorAll('#dag g.dag-node[data-status=succeeded]').length === 131", timeout=WAIT_MS
    )
    status_is(pg, "succeeded")
    assert pg.evaluate("window.__not_reloaded") is True
    assert pg.locator("#dag g.dag-node[data-step=s7] title").text_content() == "s7: succeeded"
    cl.wait(run_id, timeout=60)


def test_a_graph_the_page_lost_is_drawn_again(page: tuple[Any, Problems], api_server: ApiServer) -> None:
    """The run page sends its whole graph again now and then: a page whose drawing was lost (as when
    Gradio drops the update that carried it) draws it again, with no reload and its steps' states."""
    pg, _ = page
    login(pg, api_server)
    cl = client(api_server)
    steps = [
        {"id": "one", "python": "tests.fixtures.teststeps:add", "with": {"a": 1, "b": 2}},
        {"id": "two", "python": "tests.fixtures.teststeps:add", "with": {"a": 3, "b": 4}, "needs": ["one"]},
    ]
    run_id = cl.submit({"name": "redrawn", "steps": steps})
    cl.wait(run_id, timeout=60)
    open_run(pg, run_id)
    status_is(pg, "succeeded")
    pg.locator("#dag-svg").wait_for(timeout=WAIT_MS)
    # the drawing and what the graph view knew of it, gone (the page itself stays)
    pg.evaluate(
        "window.__not_reloaded = true; document.querySelector('#dag .dag-host').replaceChildren();"
        " Object.assign(window.__factoryDag, {gen: null, seq: -1, model: null, states: {}})"
    )
    assert pg.locator("#dag-svg").count() == 0
    pg.locator("#dag-svg").wait_for(timeout=WAIT_MS)
    assert pg.evaluate("window.__not_reloaded") is True
    assert pg.locator("#dag g.dag-node[data-step=two]").get_attribute("data-status") == "succeeded"
