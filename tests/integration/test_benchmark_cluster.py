"""`python -m benchmarks.cluster --quick` works end to end: two clusters of `ray start`
processes, the fan-out on each, a node killed. Checks the report's structure and what must
hold whatever the timing (every item ran, the run survived the kill), never the figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent.parent


def test_the_quick_cluster_benchmark_reports_every_figure() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and not k.startswith("FACTORY_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.cluster", "--quick", "--json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["fanout"] == 200 and report["repeat"] == 1
    for layout, nodes in (("one_node", 1), ("three_nodes", 3)):
        figures = report[layout]
        assert figures["raw_s"] > 0 and figures["factory_s"] > 0
        assert sum(figures["items_per_node"]) == 200 and len(figures["items_per_node"]) <= nodes
    # Whether Ray spread this fan-out is Ray's choice on a loaded machine (CI once saw all 200
    # on one worker): reported, not asserted here; test_cluster.py pins steps to nodes instead.
    assert report["three_nodes"]["spread"] == (len(report["three_nodes"]["items_per_node"]) >= 2)
    assert report["targets_met"] is False or report["three_nodes"]["spread"]
    assert report["ratio_three_over_one"] > 0 and report["raw_ratio_three_over_one"] > 0
    failover = report["failover"]
    assert failover["in_flight_on_victim"] >= 1 and failover["ran_again_elsewhere"] >= 1
    assert 0 < failover["rescheduled_after_s"] <= failover["run_ended_after_s"]
