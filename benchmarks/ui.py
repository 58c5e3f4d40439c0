"""Dashboard benchmark in a real headless Chromium (Playwright, Debian's chromium).

    python -m benchmarks.ui [--steps 50] [--big 2000] [--runs 10000]

Starts Ray, the API and the dashboard on Serve in this process (a fresh SQLite store), then:

1. live: a chain of ``--steps`` steps; for each, the time from the step's ``step.succeeded``
   event (its timestamp in the store) to the browser's DAG showing that step succeeded
   (a script in the page notes when each node turns green); p50 / p99.
2. render: a run of ``--big`` steps (recorded, not started: 40 layers); the time from
   "Open run" to every node of its DAG drawn.
3. runs page: ``--runs`` runs in the store; the time from logging in to the first page of
   the list shown, and from "older" to the next page shown; the API's answer alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import tempfile
import time
from typing import Any

import httpx
import ray

from factory.api import create_run, store_for
from factory.auth import Scope, create_key
from factory.client import FactoryClient
from factory.settings import Settings
from factory.spec import Workflow

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/lib/chromium/chromium")
WATCH_JS = """() => {
  window.__seen = {};
  setInterval(() => {
    for (const g of document.querySelectorAll('#dag g.dag-node[data-status=succeeded]')) {
      const s = g.getAttribute('data-step');
      if (!(s in window.__seen)) window.__seen[s] = Date.now() / 1000;
    }
  }, 20);
}"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def login(page: Any, base: str, key: str) -> None:
    page.goto(f"{base}/ui/")
    page.locator("#login-key input").fill(key)
    page.locator("#login-btn").click()
    page.locator("#whoami").get_by_text("logged in").wait_for(timeout=60_000)


def open_run(page: Any, run_id: str) -> None:
    page.get_by_role("tab", name="Runs").click()
    page.locator("#open-run-id textarea, #open-run-id input").first.fill(run_id)
    page.locator("#open-run-btn").click()


def bench_live(page: Any, client: FactoryClient, steps: int) -> dict[str, Any]:
    wf: dict[str, Any] = {"name": "live-bench", "steps": []}
    for i in range(steps):
        step: dict[str, Any] = {"id": f"s{i}", "python": "benchmarks.dagfuncs:nap", "with": {"seconds": 0.3}}
        if i:
            step["with"]["after"] = f"${{steps.s{i - 1}.output}}"
        wf["steps"].append(step)
    run_id = client.submit(wf)
    open_run(page, run_id)
    page.locator("#run-id").filter(has_text=run_id).wait_for(timeout=60_000)
    page.evaluate(WATCH_JS)
    client.wait(run_id, timeout=600)
    page.locator("#run-status[data-status=succeeded]").wait_for(timeout=60_000)
    time.sleep(1.0)
    seen: dict[str, float] = page.evaluate("window.__seen")
    finished = {e["step_id"]: e["ts"] for e in client.events(run_id, follow=False) if e["type"] == "step.succeeded"}
    delays = [seen[s] - ts for s, ts in finished.items() if s in seen]
    slowest = sorted(((seen[s] - ts, s) for s, ts in finished.items() if s in seen), reverse=True)[:3]
    return {
        "slowest": ", ".join(f"{s} {d:.2f}s" for d, s in slowest),
        "steps": len(delays),
        "p50": statistics.median(delays),
        "p99": percentile(delays, 99),
        "max": max(delays),
    }


def big_workflow(n: int, width: int) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    for i in range(n):
        step: dict[str, Any] = {"id": f"s{i}", "python": "benchmarks.dagfuncs:inc", "with": {"x": 1}}
        if i >= width:
            step["needs"] = [f"s{i - width}"]
        steps.append(step)
    return {"name": "big-bench", "steps": steps}


def bench_render(page: Any, settings: Settings, n: int) -> dict[str, float]:
    workflow = Workflow.model_validate(big_workflow(n, max(1, n // 40)))
    run_id = create_run(workflow, {}, settings=settings, check_imports=False)
    start = time.perf_counter()
    open_run(page, run_id)
    page.wait_for_function(f"() => document.querySelectorAll('#dag g.dag-node').length === {n}", timeout=120_000)
    return {"steps": n, "seconds": time.perf_counter() - start}


def fill_runs(settings: Settings, count: int) -> None:
    store = store_for(settings)
    try:
        for i in range(count):
            store.create_run(f"bench-{i:06d}", f"wf-{i % 7}", "{}", {}, ["a", "b", "c"])
    finally:
        store.close()


def bench_runs_page(browser: Any, base: str, key: str, count: int) -> dict[str, float]:
    with FactoryClient(base, key) as client:
        api = []
        for _ in range(5):
            t = time.perf_counter()
            client.run_summaries(limit=25)
            api.append(time.perf_counter() - t)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{base}/ui/")
        page.locator("#login-key input").fill(key)
        start = time.perf_counter()
        page.locator("#login-btn").click()
        newest = f"bench-{count - 1:06d}"
        page.locator("#runs-table [role=gridcell]").filter(has_text=newest).first.wait_for(timeout=60_000)
        first = time.perf_counter() - start
        start = time.perf_counter()
        page.locator("#older-btn").click()
        page.locator("#runs-table [role=gridcell]").filter(has_text=f"bench-{count - 26:06d}").first.wait_for(
            timeout=60_000
        )
        older = time.perf_counter() - start
    finally:
        page.close()
    return {"runs": count, "first_page": first, "older_page": older, "api_median": statistics.median(api)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--big", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=10_000)
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright
    from ray import serve

    from deployments.app import run_local

    home = tempfile.mkdtemp(prefix="factory-ui-bench-")
    settings = Settings(home=home, allowed_modules=["benchmarks.dagfuncs"], workflow_max_steps=max(10_000, args.big))
    store = store_for(settings)
    key = create_key(store, [Scope.SUBMIT], "bench")[0]
    store.close()
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    base = f"http://127.0.0.1:{port}"
    run_local(settings, "127.0.0.1", port, open_mode=False)
    httpx.get(f"{base}/ui/", timeout=60).raise_for_status()
    try:
        with sync_playwright() as p, FactoryClient(base, key) as client:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            login(page, base, key)
            live = bench_live(page, client, args.steps)
            print(
                f"live: step finished -> browser shows it, over {live['steps']} steps: "
                f"p50 {live['p50']:.2f}s, p99 {live['p99']:.2f}s, max {live['max']:.2f}s (slowest: {live['slowest']})"
            )
            render = bench_render(page, settings, args.big)
            print(f"render: a run of {render['steps']} steps drawn in {render['seconds']:.2f}s")
            page.close()
            fill_runs(settings, args.runs)
            runs = bench_runs_page(browser, base, key, args.runs)
            print(
                f"runs page with {runs['runs']} runs in the store: first page shown {runs['first_page']:.2f}s "
                f"after login, next page {runs['older_page']:.2f}s; API alone {runs['api_median'] * 1000:.0f} ms"
            )
            browser.close()
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()


if __name__ == "__main__":
    main()
