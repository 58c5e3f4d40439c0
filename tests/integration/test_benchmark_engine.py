"""The engine benchmark's scale modes work at tiny sizes, so their code cannot rot:
``--concurrent`` (runs at once in one process, against raw Ray), the large-workflow case (in
this process, and once through its fresh child process) and the breakdown's wrapper-only
path. Checks what must hold whatever the timing (every run succeeded, the outputs are right,
the figures are there), never the figures themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import engine_scale
from benchmarks.engine import chain_workflow, fanout_workflow
from factory.settings import Settings
from factory.store.sqlite import SQLiteStore


def test_concurrent_runs_report_throughput_and_latency(ray_cluster: str, factory_home: Path) -> None:
    settings = Settings(home=factory_home)
    store = SQLiteStore(factory_home / "factory.db")
    try:
        report = engine_scale.run_concurrent(5, 1, settings, store, per_run_store=False)
    finally:
        store.close()
    assert report["concurrent"] == 5 and report["tasks"] == 25
    for side in ("raw", "factory"):
        figures = report[side]
        assert figures["runs"] == 5 and figures["failures"] == 0
        assert figures["runs_per_s"] > 0 and 0 < figures["p50_s"] <= figures["p99_s"] <= figures["wall_s"]
    assert report["throughput_ratio"] > 0 and report["p99_ratio"] > 0
    assert report["one_at_a_time"]["factory_cpu_ms"] > 0 and report["one_at_a_time"]["raw_ms"] > 0


def test_large_workflow_cases_at_a_tiny_size(ray_cluster: str, factory_home: Path) -> None:
    settings = engine_scale.huge_settings(str(factory_home), 300)
    assert settings.max_for_each_items >= 300
    store = SQLiteStore(factory_home / "factory.db")
    try:
        for kind in ("chains", "for_each"):
            report = engine_scale.measure_case(kind, 300, store, settings)
            assert report["status"] == "succeeded" and report["correct"], report
            assert report["peak_rss_mb"] >= report["peak_rss_before_run_mb"] > 0
    finally:
        store.close()


def test_a_large_workflow_runs_in_a_fresh_process() -> None:
    env_before = dict(os.environ)
    report = engine_scale.run_huge("for_each", 50, timeout=120)
    assert dict(os.environ) == env_before
    assert report["status"] == "succeeded" and report["correct"], report
    assert report["peak_rss_mb"] > 0 and report["wall_s"] > 0


def test_the_breakdown_runs_the_factory_tasks_without_a_coordinator(ray_cluster: str) -> None:
    assert engine_scale.wrapper_only(chain_workflow(5)) == 5
    assert engine_scale.wrapper_only(fanout_workflow(4)) == 0 + 1 + 4 + 9


def test_the_table_runs_the_backends_in_turn_and_compares_them(
    ray_cluster: str, factory_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.engine import _table, raw_chain

    settings = Settings(home=factory_home)
    one, other = SQLiteStore(factory_home / "one.db"), SQLiteStore(factory_home / "other.db")
    try:
        cases = {"chain": ("chain of 4", lambda: raw_chain(4), chain_workflow(4), "s3")}
        _table(["chain"], cases, [("one", one, settings), ("other", other, settings)], 2, {"chain": 4})
    finally:
        one.close()
        other.close()
    printed = capsys.readouterr().out
    assert "chain of 4" in printed and "first run of each" in printed
    assert "chain: other / one, best against best" in printed and "each round's, median" in printed
    other = SQLiteStore(factory_home / "other.db")
    assert len(other.list_runs()) == 3  # a first run, then 2 rounds
    other.close()
