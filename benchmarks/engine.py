"""Engine benchmark: the same DAGs on raw Ray and through the Factory (durable SQLite state).

    python -m benchmarks.engine [--repeat 3] [--only chain,fanout,lattice] [--big 10000]
    python -m benchmarks.engine --store postgresql://... [--events redis://...]
    python -m benchmarks.engine --concurrent 200 [--per-run-store]
    python -m benchmarks.engine --huge 10000,100000 [--huge-kinds chains,for_each]
    python -m benchmarks.engine --profile [--profile-dir DIR]
    python -m benchmarks.engine --no-fuse    # each python step and item its own Ray task

All run in this process on one Ray instance; for each DAG it prints the best
wall time of each and the ratio Factory/raw. With --store (and --events), the
Factory also runs on that store (and publishes its events to that Redis), beside
the SQLite figures, and the per-step overhead over raw Ray is compared. ``--big N`` also runs an N-step
workflow through the Factory and prints the peak memory of this process (the
coordinator).

``--concurrent N``: N runs of a 5-step workflow started at once in this process (a
coordinator per thread), runs/s from the first start to the last finish and p50/p99 run
latency, against the same N 5-task DAGs on raw Ray started the same way.
``--huge SIZES``: for each size, SIZE/100 parallel chains of 100 steps and one for_each of
SIZE items, each in a fresh child process: wall time and that process's peak RSS.
``--profile``: the chain, fan-out and lattice once more under cProfile (the coordinator
runs in this thread): the top functions by own and cumulative time.
Given any of these three, the DAG table runs only if ``--only`` names its DAGs.
``--no-fuse``: a chain of python steps is not run as one Ray task, nor short steps with joins
nor short for_each items several per task (``fuse_chains=False``, ``batch_items=False``): each
step and each item is its own task, as raw Ray runs them.

Short steps go several to a task once their function's time is known in this process
(factory.groups): the best of ``--repeat`` runs is such a run; the first run of each DAG,
before that, is printed after the table.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import ray

import factory
from benchmarks import dagfuncs, engine_scale
from factory.settings import Settings, mask_secrets
from factory.spec import Step, Workflow
from factory.store import Store, open_store
from factory.store.sqlite import SQLiteStore

HERE = os.path.dirname(os.path.abspath(__file__))


def _fn(name: str) -> str:
    return f"benchmarks.dagfuncs:{name}"


# -- the DAGs, as Factory workflows ---------------------------------------------------------------


def chain_workflow(n: int) -> Workflow:
    steps = [Step(id="s0", python=_fn("inc"), with_={"x": 0})]
    steps += [Step(id=f"s{i}", python=_fn("inc"), with_={"x": f"${{steps.s{i - 1}.output}}"}) for i in range(1, n)]
    return Workflow(name=f"chain-{n}", steps=steps)


def fanout_workflow(n: int) -> Workflow:
    return Workflow(
        name=f"fanout-{n}",
        steps=[
            Step(id="source", python=_fn("numbers"), with_={"n": n}),
            Step(id="square", python=_fn("square"), for_each="${steps.source.output}", with_={"x": "${item}"}),
            Step(id="total", python=_fn("total"), with_={"values": "${steps.square.output}"}),
        ],
    )


def lattice_workflow(n: int) -> Workflow:
    steps: list[Step] = []
    for i in range(n):
        for j in range(n):
            a = f"${{steps.n{i - 1}_{j}.output}}" if i else 1
            b = f"${{steps.n{i}_{j - 1}.output}}" if j else 1
            steps.append(Step(id=f"n{i}_{j}", python=_fn("add"), with_={"a": a, "b": b}))
    return Workflow(name=f"lattice-{n}x{n}", steps=steps)


# -- the same DAGs on raw Ray ---------------------------------------------------------------------


def raw_chain(n: int) -> Any:
    inc = ray.remote(dagfuncs.inc)
    ref = inc.remote(0)
    for _ in range(1, n):
        ref = inc.remote(ref)
    return ray.get(ref)


def raw_fanout(n: int) -> Any:
    numbers, square = ray.remote(dagfuncs.numbers), ray.remote(dagfuncs.square)

    @ray.remote
    def total(*values: int) -> int:
        return dagfuncs.total(list(values))

    items = ray.get(numbers.remote(n))
    return ray.get(total.remote(*[square.remote(x) for x in items]))


def raw_lattice(n: int) -> Any:
    add = ray.remote(dagfuncs.add)
    refs: dict[tuple[int, int], Any] = {}
    for i in range(n):
        for j in range(n):
            refs[i, j] = add.remote(refs[i - 1, j] if i else 1, refs[i, j - 1] if j else 1)
    return ray.get(refs[n - 1, n - 1])


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any, float]:
    """The best time of ``repeat`` runs, the last result, and the first run's time."""
    best, result, first = float("inf"), None, 0.0
    for i in range(repeat):
        start = time.perf_counter()
        result = fn()
        took = time.perf_counter() - start
        best = min(best, took)
        first = took if i == 0 else first
    return best, result, first


def _table(
    names: list[str],
    cases: dict[str, tuple[str, Callable[[], Any], Workflow, str]],
    backends: list[tuple[str, Store, Settings]],
    repeat: int,
    tasks: dict[str, int],
) -> None:
    """Each DAG on raw Ray and through the Factory on each backend: best times and ratios.

    A first run of each DAG on each backend comes before the others (its steps' functions are
    not known short yet, factory.groups) and is printed apart; then ``repeat`` rounds run the
    backends in turn, a run each, so that they meet the same load: the machine's load drifts
    over a minute more than the backends differ."""
    header = f"{'dag':<26}{'raw ray s':>11}"
    for label, _, _ in backends:
        header += f"{label + ' s':>18}{'ratio':>7}"
    print(header)
    overheads: dict[str, dict[str, float]] = {}
    firsts: list[str] = []
    bests: dict[str, dict[str, float]] = {}
    rounds: dict[str, list[float]] = {}  # dag -> each round's ratio of the second backend to the first
    for name in names:
        title, raw_fn, workflow, last = cases[name]
        raw_time, raw_result, _ = _best(raw_fn, repeat)
        times: dict[str, list[float]] = {label: [] for label, _, _ in backends}
        for _ in range(repeat + 1):
            for label, backend, backend_settings in backends:
                start = time.perf_counter()
                result = factory.run(workflow, store=backend, settings=backend_settings)
                times[label].append(time.perf_counter() - start)
                assert result.ok, result.error
                assert result.outputs[last] == raw_result, (result.outputs[last], raw_result)
        line = f"{title:<26}{raw_time:>11.3f}"
        for label, _, _ in backends:
            first, *rest = times[label]
            firsts.append(f"{name} {label} {first:.3f} s ({first / raw_time:.2f})")
            fac_time = bests.setdefault(name, {})[label] = min(rest)
            line += f"{fac_time:>18.3f}{fac_time / raw_time:>7.2f}"
            overheads.setdefault(name, {})[label] = (fac_time - raw_time) / tasks[name]
        if len(backends) > 1:
            ones, others = times[backends[0][0]][1:], times[backends[1][0]][1:]
            rounds[name] = [b / a for a, b in zip(ones, others, strict=True)]
        print(f"{line}   {engine_scale.load()}")
    if firsts:
        # the steps' functions were not known short then (factory.groups): a lattice's steps went alone
        print(
            f"first run of each, left out of the best ({backends[0][0]}'s before its steps' functions' times were "
            "known in this process, the others' after it): " + ", ".join(firsts)
        )
    if len(backends) > 1:
        first_label, second_label = backends[0][0], backends[1][0]
        for name, per_backend in overheads.items():
            base, other = per_backend[first_label], per_backend[second_label]
            ratio = f"{other / base:.2f}x" if base > 0 else "n/a"
            print(
                f"{name}: overhead per task over raw Ray: {first_label} {base * 1e3:.3f} ms, "
                f"{second_label} {other * 1e3:.3f} ms ({ratio} of {first_label})"
            )
        for name, ratios in rounds.items():
            print(
                f"{name}: {second_label} / {first_label}, best against best "
                f"{bests[name][second_label] / bests[name][first_label]:.2f}; each round's, median "
                f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each, best kept (after a first run each; backends in turn)"
    )
    parser.add_argument("--only", help="the DAGs of the table (default chain,fanout,lattice)")
    parser.add_argument("--chain", type=int, default=500)
    parser.add_argument("--fanout", type=int, default=2000)
    parser.add_argument("--lattice", type=int, default=20)
    parser.add_argument("--big", type=int, default=0, help="also run an N-step workflow and report memory")
    parser.add_argument("--store", help="also run on this store, e.g. postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--events", help="with --store: publish events to this Redis, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--concurrent", type=int, default=0, help="N runs of 5 steps at once in this process")
    parser.add_argument("--concurrent-repeat", type=int, default=3, help="rounds of --concurrent, best kept")
    parser.add_argument(
        "--per-run-store", action="store_true", help="--concurrent: each run opens its own store connection"
    )
    parser.add_argument("--huge", default="", help="comma-separated sizes of the large workflows, e.g. 10000,100000")
    parser.add_argument("--huge-kinds", default="chains,for_each", help=f"of {','.join(engine_scale.HUGE_KINDS)}")
    parser.add_argument("--huge-timeout", type=float, default=engine_scale.HUGE_TIMEOUT_SECONDS)
    parser.add_argument("--profile", action="store_true", help="profile the chain, fan-out and lattice runs")
    parser.add_argument("--profile-dir", help="with --profile: also write each .prof file here")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="each DAG also as the Factory's worker tasks alone and with a store that commits nothing",
    )
    parser.add_argument(
        "--no-fuse",
        action="store_true",
        help="each python step and item its own Ray task (fuse_chains and batch_items off)",
    )
    args = parser.parse_args()
    if args.only is None:
        special = args.concurrent or args.huge or args.profile or args.breakdown
        args.only = "" if special else "chain,fanout,lattice"

    home = tempfile.mkdtemp(prefix="factory-bench-")
    fuse = not args.no_fuse
    settings = Settings(home=home, fuse_chains=fuse, batch_items=fuse)
    store = SQLiteStore(os.path.join(home, "factory.db"))
    backends: list[tuple[str, Store, Settings]] = [("sqlite", store, settings)]
    if args.store:
        label = "postgres" if args.store.startswith("postgres") else "store"
        if args.events:
            label += "+redis"
        backends.append(
            (
                label,
                open_store(args.store),
                Settings(home=home, events_url=args.events, fuse_chains=fuse, batch_items=fuse),
            )
        )
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, "
        f"Python {platform.python_version()}, Ray {ray.__version__}; {engine_scale.load()} at the start; "
        + ("chains in one task, short steps and items several a task" if fuse else "a task a step, an item (--no-fuse)")
    )
    for label, backend, backend_settings in backends:
        events = mask_secrets(backend_settings.events_url or "embedded (the store's event log)")
        print(f"{label}: store {mask_secrets(backend.url)}, events {events}")

    cases = {
        "chain": (
            f"chain of {args.chain}",
            lambda: raw_chain(args.chain),
            chain_workflow(args.chain),
            f"s{args.chain - 1}",
        ),
        "fanout": (
            f"fan-out {args.fanout} + fan-in",
            lambda: raw_fanout(args.fanout),
            fanout_workflow(args.fanout),
            "total",
        ),
        "lattice": (
            f"lattice {args.lattice}x{args.lattice}",
            lambda: raw_lattice(args.lattice),
            lattice_workflow(args.lattice),
            f"n{args.lattice - 1}_{args.lattice - 1}",
        ),
    }
    # warm every path (worker processes, imports, connections)
    raw_chain(20)
    for _, backend, backend_settings in backends:
        factory.run(chain_workflow(20), store=backend, settings=backend_settings)

    names = [name for name in args.only.split(",") if name]
    if names:
        tasks = {"chain": args.chain, "fanout": args.fanout + 2, "lattice": args.lattice**2}  # Ray tasks per DAG
        _table(names, cases, backends, args.repeat, tasks)
    if args.breakdown:
        print("\nbreakdown, best of --repeat (x: ratio to raw Ray); wrapper: the Factory's worker tasks chained")
        print("by ObjectRefs, no coordinator; no-commit: the coordinator with a store whose record() does nothing")
        print(engine_scale.BREAKDOWN_HEADER)
        for name in ("chain", "fanout", "lattice"):
            title, raw_fn, workflow, _ = cases[name]
            print(engine_scale.breakdown(title, raw_fn, workflow, home, settings, args.repeat))
    if args.profile:
        for name in ("chain", "fanout", "lattice"):
            _, _, workflow, _ = cases[name]
            print(engine_scale.profile_run(name, workflow, store, settings, args.profile_dir))
    if args.concurrent:
        report = engine_scale.run_concurrent(
            args.concurrent, args.concurrent_repeat, settings, store, args.per_run_store
        )
        engine_scale.print_concurrent(report)

    if args.big:
        big = engine_scale.chains_workflow(args.big)
        start = time.perf_counter()
        result = factory.run(big, store=store, settings=settings)
        elapsed = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"{args.big}-step workflow: {result.status.value} in {elapsed:.2f}s, coordinator peak RSS {peak_mb:.0f} MB"
            f" (this process, after the runs above); {engine_scale.load()}"
        )
    ray.shutdown()
    if args.huge:
        print(f"\nlarge workflows, each in a fresh process (SQLite store); timeout {args.huge_timeout:.0f}s each")
        for size in [int(s) for s in args.huge.split(",") if s]:
            for kind in [k for k in args.huge_kinds.split(",") if k]:
                engine_scale.print_huge(engine_scale.run_huge(kind, size, args.huge_timeout))


if __name__ == "__main__":
    main()
