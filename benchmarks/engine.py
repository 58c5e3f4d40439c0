"""Engine benchmark: the same DAGs on raw Ray and through the Factory (durable SQLite state).

    python -m benchmarks.engine [--repeat 3] [--only chain,fanout,lattice] [--big 10000]
    python -m benchmarks.engine --store postgresql://... [--events redis://...]

All run in this process on one Ray instance; for each DAG it prints the best
wall time of each and the ratio Factory/raw. With --store (and --events), the
Factory also runs on that store (and publishes its events to that Redis), beside
the SQLite figures, and the per-step overhead over raw Ray is compared. ``--big N`` also runs an N-step
workflow through the Factory and prints the peak memory of this process (the
coordinator).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from typing import Any

import ray

import factory
from benchmarks import dagfuncs
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


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, best time kept")
    parser.add_argument("--only", default="chain,fanout,lattice")
    parser.add_argument("--chain", type=int, default=500)
    parser.add_argument("--fanout", type=int, default=2000)
    parser.add_argument("--lattice", type=int, default=20)
    parser.add_argument("--big", type=int, default=0, help="also run an N-step workflow and report memory")
    parser.add_argument("--store", help="also run on this store, e.g. postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--events", help="with --store: publish events to this Redis, e.g. redis://127.0.0.1:6379/0")
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="factory-bench-")
    settings = Settings(home=home)
    store = SQLiteStore(os.path.join(home, "factory.db"))
    backends: list[tuple[str, Store, Settings]] = [("sqlite", store, settings)]
    if args.store:
        label = "postgres" if args.store.startswith("postgres") else "store"
        if args.events:
            label += "+redis"
        backends.append((label, open_store(args.store), Settings(home=home, events_url=args.events)))
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, "
        f"Python {platform.python_version()}, Ray {ray.__version__}"
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

    header = f"{'dag':<26}{'raw ray s':>11}"
    for label, _, _ in backends:
        header += f"{label + ' s':>18}{'ratio':>7}"
    print(header)
    overheads: dict[str, dict[str, float]] = {}
    tasks = {"chain": args.chain, "fanout": args.fanout + 2, "lattice": args.lattice**2}  # Ray tasks per DAG
    for name in args.only.split(","):
        title, raw_fn, workflow, last = cases[name]
        raw_time, raw_result = _best(raw_fn, args.repeat)
        line = f"{title:<26}{raw_time:>11.3f}"
        for label, backend, backend_settings in backends:

            def through_factory(
                wf: Workflow = workflow, st: Store = backend, se: Settings = backend_settings
            ) -> factory.RunResult:
                return factory.run(wf, store=st, settings=se)

            fac_time, result = _best(through_factory, args.repeat)
            assert result.ok, result.error
            assert result.outputs[last] == raw_result, (result.outputs[last], raw_result)
            line += f"{fac_time:>18.3f}{fac_time / raw_time:>7.2f}"
            overheads.setdefault(name, {})[label] = (fac_time - raw_time) / tasks[name]
        print(line)
    if len(backends) > 1:
        for name, per_backend in overheads.items():
            base, other = per_backend["sqlite"], per_backend[backends[1][0]]
            ratio = f"{other / base:.2f}x" if base > 0 else "n/a"
            print(
                f"{name}: overhead per task over raw Ray: sqlite {base * 1e3:.3f} ms, "
                f"{backends[1][0]} {other * 1e3:.3f} ms ({ratio} of sqlite)"
            )

    if args.big:
        width = 100
        steps: list[Step] = []
        for k in range(args.big):
            deps = {"x": f"${{steps.b{k - width}.output}}"} if k >= width else {"x": k}
            steps.append(Step(id=f"b{k}", python=_fn("inc"), with_=deps))
        big = Workflow(name=f"big-{args.big}", steps=steps)
        start = time.perf_counter()
        result = factory.run(big, store=store, settings=settings)
        elapsed = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"{args.big}-step workflow: {result.status.value} in {elapsed:.2f}s, coordinator peak RSS {peak_mb:.0f} MB"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
