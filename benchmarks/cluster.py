"""The cost of spreading a workflow over several Ray nodes, and how fast a dead node's steps
run elsewhere.

    python -m benchmarks.cluster [--fanout 2000] [--repeat 3] [--quick] [--json]

Starts Ray clusters on this machine with `ray start` processes (ports of their own, token
authentication on; never `ray stop`), and from this process as the driver:

1. one node with 2 CPUs: the fan-out of N items (``for_each``) through the Factory, and the
   same fan-out as plain Ray tasks (for reference), best of ``--repeat``;
2. three nodes: a head with no CPU (the driver and its coordinator run there, as a job's
   driver does) and two workers with 1 CPU each, the same 2 CPUs in all, so every item runs
   on another node than its coordinator: the same runs. The ratio three nodes / one node is
   the cost of spreading (target <= 1.3x);
3. on the three nodes: a fan-out of sleeping items that take no CPU but one of the 4
   ``slot`` units each node offers, so that they all start at once on the three nodes and
   the surviving nodes have room; once worker ``b`` runs some of them, its raylet is
   SIGKILLed (when Ray put none on ``b`` four times running, a fifth run has more items than
   the other nodes hold, and the figure then includes waiting for a free slot). Prints the
   time from the kill to the moment every item that was in flight on ``b`` had started
   again on another node (target <= 10 s), and the time to the end of the run.

The state is an SQLite file in a temporary folder (all nodes are on this machine), or
``--store postgresql://...``. ``--quick`` (200 items, one round, a short failover) checks
that the benchmark works; its figures mean little.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import factory
from benchmarks import dagfuncs
from factory.settings import Settings
from factory.spec import Workflow
from factory.store import Store, open_store
from factory.store.sqlite import SQLiteStore
from tests.fixtures.ray_nodes import LocalRayCluster

REPO = Path(__file__).resolve().parent.parent
SLOTS = 4  # items of the failover round each node holds at once


def fanout_workflow(n: int) -> Workflow:
    return Workflow.model_validate(
        {
            "name": f"cluster-fanout-{n}",
            "steps": [
                {"id": "source", "python": "benchmarks.dagfuncs:numbers", "with": {"n": n}},
                {
                    "id": "square",
                    "python": "benchmarks.dagfuncs:square_on",
                    "for_each": "${steps.source.output}",
                    "with": {"x": "${item}"},
                },
            ],
        }
    )


def failover_workflow(path: str, items: int, seconds: float) -> Workflow:
    return Workflow.model_validate(
        {
            "name": "cluster-failover",
            "steps": [
                {
                    "id": "items",
                    "python": "benchmarks.dagfuncs:mark",
                    "for_each": list(range(items)),
                    "with": {"path": path, "item": "${item}", "seconds": seconds},
                    "resources": {"num_cpus": 0, "slot": 1},
                }
            ],
        }
    )


def raw_fanout(n: int) -> list[Any]:
    numbers, square_on = ray.remote(dagfuncs.numbers), ray.remote(dagfuncs.square_on)
    items = ray.get(numbers.remote(n))
    return ray.get([square_on.remote(x) for x in items])


def _best(fn: Any, repeat: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def _start_cluster(token: str, layout: list[tuple[str, int, dict[str, float]]]) -> LocalRayCluster:
    cluster = LocalRayCluster(token=token)
    try:
        (_, head_cpus, head_resources), *workers = layout
        cluster.start_head(num_cpus=head_cpus, resources=head_resources)
        for name, cpus, resources in workers:
            cluster.add_worker(name, num_cpus=cpus, resources=resources)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _connect(cluster: LocalRayCluster) -> None:
    ray.init(address=cluster.gcs_address, logging_level=logging.WARNING, log_to_driver=False)


def _warm_every_node() -> None:
    """Start a worker process on every node with a CPU, by a task pinned there: a node whose
    first worker is still starting when the others have run every item gets none (seen on a
    loaded machine), and the three-node figure would then measure one worker."""
    noop = ray.remote(num_cpus=1)(dagfuncs.numbers)
    ray.get(
        [
            noop.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(1)
            for node in ray.nodes()  # type: ignore[no-untyped-call]
            if node["Alive"] and node["Resources"].get("CPU", 0) >= 1
        ]
    )


def _measure_fanout(n: int, repeat: int, store: Store, settings: Settings) -> dict[str, Any]:
    workflow = fanout_workflow(n)
    _warm_every_node()
    raw_fanout(50)
    factory.run(fanout_workflow(50), store=store, settings=settings)
    raw_time, raw_result = _best(lambda: raw_fanout(n), repeat)
    fac_time, result = _best(lambda: factory.run(workflow, store=store, settings=settings), repeat)
    assert result.ok, result.error
    squares = [pair[0] for pair in result.outputs["square"]]
    assert squares == [pair[0] for pair in raw_result] == [x * x for x in range(n)]
    nodes = Counter(pair[1] for pair in result.outputs["square"])
    return {
        "raw_s": raw_time,
        "factory_s": fac_time,
        "items_per_node": sorted(nodes.values(), reverse=True),
        "spread": len(nodes) >= 2,
    }


def _node_id(resource: str) -> str:
    for node in ray.nodes():  # type: ignore[no-untyped-call]
        if node["Alive"] and resource in node["Resources"]:
            return str(node["NodeID"])
    raise RuntimeError(f"no live node offers {resource}")


def _read_marks(path: Path) -> list[tuple[str, int, str, float]]:
    if not path.exists():
        return []
    marks = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4:
            marks.append((parts[0], int(parts[1]), parts[2], float(parts[3])))
    return marks


def _failover_round(
    store: Store, settings: Settings, items: int, seconds: float, path: Path, victim: str
) -> tuple[threading.Thread, dict[str, Any], set[int]]:
    """Start the fan-out in a thread; once every item started, the items in flight on the
    victim (none when Ray put none there: the caller tries again)."""
    workflow = failover_workflow(str(path), items, seconds)
    outcome: dict[str, Any] = {}

    def run() -> None:
        outcome["result"] = factory.run(workflow, store=store, settings=settings)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and thread.is_alive():
        marks = _read_marks(path)
        if len({item for kind, item, _, _ in marks if kind == "start"}) >= items:
            started = {item for kind, item, node, _ in marks if kind == "start" and node == victim}
            ended = {item for kind, item, node, _ in marks if kind == "end" and node == victim}
            return thread, outcome, started - ended
        time.sleep(0.05)
    return thread, outcome, set()


def _measure_failover(
    cluster: LocalRayCluster, store: Store, settings: Settings, items: int, seconds: float, folder: Path
) -> dict[str, Any]:
    victim = _node_id("victim")
    tries = 5
    for attempt in range(tries):
        # the last try has more items than the head and `a` hold together, so `b` must run some
        # (Ray's placement is random: a busy machine once had it put none there five times running);
        # then the items of `b` wait for a slot to free on the others before they start again
        count = items if attempt < tries - 1 else max(items, 2 * SLOTS + 2)
        path = folder / f"marks-{attempt}.txt"
        thread, outcome, in_flight = _failover_round(store, settings, count, seconds, path, victim)
        if in_flight:
            break
        thread.join(300)  # Ray put no item on the victim this time: let it end, try again
    else:
        raise RuntimeError(f"in {tries} runs, Ray never put an item of the fan-out on the victim node")
    node = next(n for n in cluster.nodes if n.name == "b")
    killed = time.time()
    node.kill_raylet()
    thread.join(300)
    ended_at = time.time()
    result = outcome.get("result")
    if result is None or not result.ok:
        raise RuntimeError(f"the failover run did not succeed: {getattr(result, 'error', 'no result')}")
    marks = _read_marks(path)
    restarts = {
        item: min(t for kind, i, n, t in marks if kind == "start" and i == item and n != victim and t >= killed)
        for item in in_flight
        if any(kind == "start" and i == item and n != victim and t >= killed for kind, i, n, t in marks)
    }
    if not restarts:
        raise RuntimeError(f"no item of the dead node ran again elsewhere: {marks}")
    executions = Counter(item for kind, item, _, _ in marks if kind == "start")
    first_node = Counter(node for kind, _, node, t in marks if kind == "start" and t < killed)
    return {
        "items": count,
        "item_seconds": seconds,
        "items_per_node_before_kill": sorted(first_node.values(), reverse=True),
        "in_flight_on_victim": len(in_flight),
        "ran_again_elsewhere": len(restarts),
        "rescheduled_after_s": max(restarts.values()) - killed,
        "run_ended_after_s": ended_at - killed,
        "items_run_more_than_once": sum(1 for count in executions.values() if count > 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fanout", type=int, default=2000, help="items in the fan-out")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, best time kept")
    parser.add_argument("--failover-items", type=int, default=8, help="sleeping items in the failover round")
    parser.add_argument("--failover-seconds", type=float, default=4.0, help="how long each such item sleeps")
    parser.add_argument("--store", help="a PostgreSQL URL for the runs' state (default: SQLite in a temp folder)")
    parser.add_argument("--quick", action="store_true", help="200 items, one round: checks the benchmark runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if os.environ.get("RAY_AUTH_MODE") != "token" or not os.environ.get("RAY_AUTH_TOKEN"):
        # Ray reads its authentication mode once per process: start again with a token of
        # our own for the clusters this benchmark starts (and without another cluster's address)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.cluster", *argv], env)
    if args.quick:
        args.fanout, args.repeat, args.failover_seconds = 200, 1, 2.0

    folder = Path(tempfile.mkdtemp(prefix="factory-bench-cluster-"))
    settings = Settings(home=str(folder))
    store: Store = open_store(args.store) if args.store else SQLiteStore(str(folder / "factory.db"))
    # the nodes' workers import benchmarks.dagfuncs and this checkout's factory
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    token = os.environ["RAY_AUTH_TOKEN"]
    slot = {"slot": float(SLOTS)}
    layouts = {
        "one_node": [("head", 2, slot)],
        "three_nodes": [("head", 0, slot), ("a", 1, slot), ("b", 1, {**slot, "victim": 1.0})],
    }
    results: dict[str, Any] = {}
    try:
        for label, layout in layouts.items():
            cluster = _start_cluster(token, layout)
            try:
                _connect(cluster)
                results[label] = _measure_fanout(args.fanout, args.repeat, store, settings)
                if label == "three_nodes":
                    results["failover"] = _measure_failover(
                        cluster, store, settings, args.failover_items, args.failover_seconds, folder
                    )
            finally:
                ray.shutdown()
                cluster.stop()
    finally:
        store.close()

    one, three, failover = results["one_node"], results["three_nodes"], results["failover"]
    ratio = three["factory_s"] / one["factory_s"]
    raw_ratio = three["raw_s"] / one["raw_s"]
    summary = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, Ray {ray.__version__}",
        "fanout": args.fanout,
        "repeat": args.repeat,
        "store": "postgresql" if args.store else "sqlite",
        "one_node": {k: round(v, 3) if isinstance(v, float) else v for k, v in one.items()},
        "three_nodes": {k: round(v, 3) if isinstance(v, float) else v for k, v in three.items()},
        "ratio_three_over_one": round(ratio, 3),
        "raw_ratio_three_over_one": round(raw_ratio, 3),
        "failover": {k: round(v, 3) if isinstance(v, float) else v for k, v in failover.items()},
        "targets_met": three["spread"] and ratio <= 1.3 and failover["rescheduled_after_s"] <= 10,
    }
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return 0
    print(f"cluster benchmark on {summary['machine']}, state in {summary['store']}")
    print(f"fan-out of {args.fanout} items, best of {args.repeat}:")
    print(f"  {'':<34}{'raw ray s':>10}{'factory s':>11}  items per node")
    for label, title in (("one_node", "one node, 2 CPUs"), ("three_nodes", "head 0 CPU + 2 workers, 1 CPU each")):
        r = results[label]
        print(f"  {title:<34}{r['raw_s']:>10.3f}{r['factory_s']:>11.3f}  {r['items_per_node']}")
    print(f"ratio three nodes / one node: factory {ratio:.2f} (target <= 1.3), raw Ray {raw_ratio:.2f}")
    if not three["spread"]:
        print("  (Ray ran every item of the three-node fan-out on one worker: that figure measures one node)")
    print(
        f"node killed (SIGKILL of its raylet) with {failover['in_flight_on_victim']} item(s) in flight on it: "
        f"all running elsewhere {failover['rescheduled_after_s']:.1f}s later (target <= 10 s); "
        f"run succeeded {failover['run_ended_after_s']:.1f}s after the kill; "
        f"{failover['items_run_more_than_once']} item(s) ran more than once"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
