"""Schedules: the scheduler over a real store (exactly one decision and run per tick, whoever
races for it, across a SIGKILL), the missed-tick and overlap policies, revoked keys, and the
API over real HTTP with the scheduler that the API starts."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

from factory import schedules
from factory.auth import Scope, create_key
from factory.dag import validate_data
from factory.errors import WorkflowValidationError
from factory.settings import Settings
from factory.spec import Workflow
from factory.store import Store, open_store
from tests.conftest import REPO, ApiServer

T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC


def workflow(cron: str = "* * * * *", name: str = "every-minute", **schedule: Any) -> Workflow:
    data = {
        "name": name,
        "inputs": {"x": 1},
        "steps": [{"id": "a", "python": "tests.fixtures.teststeps:add", "with": {"a": "${inputs.x}", "b": 1}}],
        "schedule": {"cron": cron, "inputs": {"x": 41}, **schedule},
    }
    return validate_data(data, None, name, check_imports=False)


def settings_for(url: str, home: Path, **extra: Any) -> Settings:
    return Settings(home=home, store_url=url, **extra)


def run_ticks(store: Store, name: str) -> list[tuple[int, str | None]]:
    return sorted((t.tick, t.run_id) for t in store.schedule_ticks(name, 1000) if t.action == "run")


def test_two_schedulers_racing_over_postgresql_start_each_tick_once(postgres_url: str, factory_home: Path) -> None:
    settings = settings_for(postgres_url, factory_home, schedule_grace_seconds=3600)
    stores = [open_store(postgres_url), open_store(postgres_url)]
    try:
        schedules.add(stores[0], settings, workflow(overlap="allow"), principal="local", now=T0)
        # `start` records the runs each scheduler would hand to the runner (no runner here: the
        # runs stay pending; what is tested is who decides which tick)
        handed: list[list[str]] = [[], []]
        racers = [schedules.CronScheduler(stores[i], settings, handed[i].append, who=f"s{i}") for i in (0, 1)]
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def race(i: int) -> None:
            try:
                for minute in range(1, 41):  # both sweep at the same moments; every third, two ticks are due
                    barrier.wait(timeout=30)
                    racers[i].sweep(T0 + minute * 60 + (1 if minute % 3 else 61))
            except BaseException as exc:  # noqa: BLE001 - the test reports it
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=race, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        started = handed[0] + handed[1]
        ticks = run_ticks(stores[0], "every-minute")
        assert [t for t, _ in ticks] == [int(T0) + 60 * m for m in range(1, 41)]  # none lost, each once
        assert sorted(started) == sorted(r for _, r in ticks) and len(set(started)) == len(started) == 40
        runs = stores[0].run_summaries(limit=200, workflow="every-minute")
        assert len(runs) == 40 and {r.started_by for r in runs} == {"local"}
        assert stores[0].get_run(started[0]).inputs == {"x": 41}
        grants = stores[0].get_run(started[0]).grants
        assert grants is not None and grants.schedule == "every-minute" and grants.workflow_ref == "every-minute@1"
    finally:
        for s in stores:
            s.close()


def _read_lines(process: subprocess.Popen[str], into: queue.Queue[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        into.put(line.strip())


def _scheduler_process(url: str, home: Path, real_start: float) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.cron_scheduler_process", url, str(home), str(T0), str(real_start), "60"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(process, lines), daemon=True).start()
    return process, lines


def _wait_for_runs(lines: queue.Queue[str], count: int, timeout: float = 60) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while len(seen) < count:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        if line != "ready":
            seen.append(line)
    return seen


def test_a_scheduler_killed_and_restarted_neither_loses_nor_repeats_a_tick(
    postgres_url: str, factory_home: Path
) -> None:
    store = open_store(postgres_url)
    try:
        settings = settings_for(postgres_url, factory_home)
        schedules.add(store, settings, workflow(overlap="allow"), principal="local", now=T0)
        real_start = time.time()  # one simulated minute a second from here, in both processes
        first, lines = _scheduler_process(postgres_url, factory_home, real_start)
        try:
            before = _wait_for_runs(lines, 3)
        finally:
            first.send_signal(signal.SIGKILL)  # wherever it is: maybe inside a transaction
            first.wait(timeout=30)
        time.sleep(1.5)  # ticks come due while no scheduler runs
        second, lines = _scheduler_process(postgres_url, factory_home, real_start)
        try:
            after = _wait_for_runs(lines, 4)
        finally:
            second.send_signal(signal.SIGKILL)
            second.wait(timeout=30)
        ticks = run_ticks(store, "every-minute")
        minutes = [t for t, _ in ticks]
        assert minutes == list(range(int(T0) + 60, minutes[-1] + 1, 60))  # every minute, none lost, none twice
        run_ids = [r for _, r in ticks]
        assert set(before) | set(after) <= set(run_ids) and not set(before) & set(after)
        runs = store.run_summaries(limit=500, workflow="every-minute")
        assert sorted(r.id for r in runs) == sorted(run_ids)  # one run per tick: none created twice
        assert {t.decided_by for t in store.schedule_ticks("every-minute", 1000)} >= {
            f"proc-{first.pid}",
            f"proc-{second.pid}",
        }
    finally:
        store.close()


def test_missed_ticks_follow_the_schedule_s_catchup_policy(factory_home: Path) -> None:
    settings = Settings(home=factory_home, schedule_grace_seconds=120)
    store = open_store(settings.resolved_store_url())
    try:
        schedules.add(store, settings, workflow("*/10 * * * *", "skipper"), principal="local", now=T0)
        schedules.add(
            store, settings, workflow("*/10 * * * *", "catcher", catchup="run_once"), principal="local", now=T0
        )
        handed: list[str] = []
        schedules.CronScheduler(store, settings, handed.append).sweep(T0 + 601)  # 00:10, on time: both run
        assert len(handed) == 2
        for name in ("skipper", "catcher"):  # their runs finish (no runner here: marked so by hand)
            last = store.get_schedule(name)
            assert last is not None and last.last_run_id
            _finish(store, last.last_run_id)
        # the scheduler was down from 00:11 to 03:05: 17 ticks were missed, none is on time
        restarted = schedules.CronScheduler(open_store(settings.resolved_store_url()), settings, handed.append)
        decided = {t.schedule: t for t in restarted.sweep(T0 + 3 * 3600 + 300) if t.action == "run"}
        skipped = store.schedule_ticks("skipper", 10)
        assert [(t.action, t.missed) for t in skipped] == [("skip", 17), ("run", 0)]
        assert "catchup skip" in skipped[0].reason and "skipper" not in decided
        caught = store.schedule_ticks("catcher", 10)
        assert [(t.tick - int(T0), t.action, t.missed) for t in caught] == [
            (3 * 3600, "run", 0),  # the latest missed tick, run once for them all
            (3 * 3600 - 600, "skip", 16),
            (600, "run", 0),
        ]
        assert decided["catcher"].run_id == handed[-1] and len(handed) == 3
        # nothing more until the next tick, and that one runs on time
        assert restarted.sweep(T0 + 3 * 3600 + 500) == []
        assert [t.tick - int(T0) for t in restarted.sweep(T0 + 3 * 3600 + 601)] == [3 * 3600 + 600] * 2
    finally:
        store.close()


def _finish(store: Store, run_id: str) -> None:
    from factory.store import RunChange, RunStatus

    store.record([RunChange(run_id, RunStatus.SUCCEEDED, "run.succeeded")])


def test_overlap_skip_waits_for_the_previous_run(factory_home: Path) -> None:
    settings = Settings(home=factory_home)
    store = open_store(settings.resolved_store_url())
    try:
        schedules.add(store, settings, workflow("*/5 * * * *", "slow"), principal="local", now=T0)
        handed: list[str] = []
        s = schedules.CronScheduler(store, settings, handed.append)
        s.sweep(T0 + 301)
        s.sweep(T0 + 601)  # the 00:05 run is still pending: 00:10 is skipped
        ticks = store.schedule_ticks("slow")
        assert [t.action for t in ticks] == ["skip", "run"] and handed[0] in ticks[0].reason
        _finish(store, handed[0])
        s.sweep(T0 + 901)
        assert [t.action for t in store.schedule_ticks("slow")] == ["run", "skip", "run"] and len(handed) == 2
    finally:
        store.close()


def test_a_schedule_whose_key_is_revoked_stops_with_the_reason(factory_home: Path) -> None:
    settings = Settings(home=factory_home)
    store = open_store(settings.resolved_store_url())
    try:
        _, key = create_key(store, [Scope.ADMIN], "operator")
        schedules.add(store, settings, workflow(), principal=f"key:{key.id}", now=T0)
        handed: list[str] = []
        schedules.CronScheduler(store, settings, handed.append).sweep(T0 + 61)
        run = store.get_run(handed[0])
        assert run.grants is not None and run.grants.principal == f"key:{key.id}"  # the key's grants
        store.revoke_api_key(key.id)
        assert schedules.CronScheduler(store, settings, handed.append).sweep(T0 + 121) == []
        view = schedules.view(store, "every-minute")
        assert view.state == "paused" and view.paused_reason and f"key:{key.id}" in view.paused_reason
        assert "revoked" in view.paused_reason and view.next_ticks == [] and len(handed) == 1
    finally:
        store.close()


def test_schedules_are_bounded_when_added(factory_home: Path) -> None:
    settings = Settings(home=factory_home, schedule_min_interval_seconds=300, schedules_max_per_key=1)
    store = open_store(settings.resolved_store_url())
    try:
        with pytest.raises(WorkflowValidationError, match="fires 60s apart"):
            schedules.add(store, settings, workflow("* * * * *"), principal="key:k")
        with pytest.raises(WorkflowValidationError, match="fires 60s apart"):
            schedules.add(store, settings, workflow("0,1 * * * *"), principal="key:k")  # uneven, still too often
        bad_inputs = workflow("@daily", "w2", inputs={"nope": 1})
        with pytest.raises(WorkflowValidationError, match=r"schedule\.inputs"):
            schedules.add(store, settings, bad_inputs, principal="key:k")
        schedules.add(store, settings, workflow("@daily", "one"), principal="key:k")
        from factory.errors import ScheduleConflictError

        with pytest.raises(ScheduleConflictError, match="schedules_max_per_key"):
            schedules.add(store, settings, workflow("@daily", "two"), principal="key:k")
        with pytest.raises(ScheduleConflictError, match="exists already"):
            schedules.add(store, settings, workflow("@daily", "one"), principal="key:other")
    finally:
        store.close()


# -- over the API --------------------------------------------------------------------------------


def test_schedules_over_the_api(api_server: ApiServer) -> None:
    from factory.client import FactoryClient
    from factory.runner import NAMESPACE

    http = httpx.Client(base_url=api_server.base_url, timeout=30)
    data = workflow("0 0 1 1 *", "api-yearly", timezone="Europe/Paris").model_dump(mode="json", by_alias=True)
    data.pop("base_dir")
    # starting runs is not deploying code: a submit key may not add, pause or remove schedules
    denied = http.post("/v1/schedules", json={"workflow": data}, headers=api_server.headers("submit"))
    assert denied.status_code == 403 and "--scope admin" in denied.json()["detail"]
    bad = {**data, "schedule": {"cron": "0 0 1 13 *"}}
    problem = http.post("/v1/schedules", json={"workflow": bad}, headers=api_server.headers())
    assert problem.status_code == 422 and problem.headers["content-type"].startswith("application/problem+json")
    assert any("field 4 (month) '13'" in e for e in problem.json()["errors"]), problem.json()
    added = http.post("/v1/schedules", json={"workflow": data}, headers=api_server.headers())
    assert added.status_code == 201, added.text
    view = added.json()
    assert view["state"] == "active" and view["workflow_ref"].startswith("api-yearly@")
    assert view["timezone"] == "Europe/Paris" and len(view["next_ticks"]) == 3
    again = http.post("/v1/schedules", json={"workflow": data}, headers=api_server.headers())
    assert again.status_code == 409 and "exists already" in again.json()["detail"]
    listed = http.get("/v1/schedules", headers=api_server.headers("read")).json()
    assert [v["name"] for v in listed if v["name"] == "api-yearly"] == ["api-yearly"]
    try:
        # the scheduler the API started decides the next tick (asked at that moment, not waited for)
        tick = view["next_ticks"][0]
        actor = ray.get_actor(schedules.cron_scheduler_name(api_server.settings), namespace=NAMESPACE)
        ray.get(actor.sweep.remote(tick + 1), timeout=60)
        ray.get(actor.sweep.remote(tick + 2), timeout=60)  # a second look decides nothing again
        ticks = http.get("/v1/schedules/api-yearly/ticks", headers=api_server.headers("read")).json()
        assert [(t["tick"], t["action"]) for t in ticks] == [(tick, "run")]
        client = FactoryClient(api_server.base_url, api_server.keys["read"])
        run = client.wait(ticks[0]["run_id"], timeout=60)
        assert run["status"] == "succeeded" and {s["step_id"]: s["output"] for s in run["steps"]} == {"a": 42}
        admin_id = api_server.keys["admin"].split("_")[1]
        assert run["started_by"] == f"key:{admin_id}" and run["workflow_ref"] == view["workflow_ref"]
        assert run["schedule"] == "api-yearly"
        assert http.post("/v1/schedules/api-yearly/pause", headers=api_server.headers("submit")).status_code == 403
        paused = http.post("/v1/schedules/api-yearly/pause", headers=api_server.headers()).json()
        assert paused["state"] == "paused" and paused["next_ticks"] == []
        assert paused["last_tick"]["run_id"] == ticks[0]["run_id"]
        admin = FactoryClient(api_server.base_url, api_server.keys["admin"])  # the CLI's --api path
        resumed = admin.schedule_action("api-yearly", "resume")
        assert resumed is not None and resumed["state"] == "active" and resumed["next_ticks"]
        assert [t["run_id"] for t in admin.schedule_ticks("api-yearly")] == [ticks[0]["run_id"]]
    finally:
        assert (
            FactoryClient(api_server.base_url, api_server.keys["admin"]).schedule_action("api-yearly", "remove") is None
        )
    gone = http.get("/v1/schedules/api-yearly", headers=api_server.headers("read"))
    assert gone.status_code == 404 and "factory schedules list" in gone.json()["detail"]
