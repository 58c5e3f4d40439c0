"""Engine at scale: many runs at once in one process, very large workflows, and a profile.

Used by ``python -m benchmarks.engine`` (``--concurrent N``, ``--huge SIZES``, ``--profile``);
``python -m benchmarks.engine_scale case ...`` is the child process of ``--huge``: it runs one
large workflow and prints its wall time and its own peak RSS as JSON on the last line.

Figures are wall times on a shared machine: each is printed with the load average
(``os.getloadavg``) at the time it was taken.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray

import factory
from benchmarks import dagfuncs
from factory.dag import build_graph
from factory.refs import Context, resolve
from factory.runtime import Outcome, StepCall, execute_item, execute_step
from factory.settings import Settings
from factory.spec import Step, Workflow
from factory.store import Change, Store
from factory.store.sqlite import SQLiteStore

REPO = Path(__file__).resolve().parent.parent
HUGE_CHAIN_LENGTH = 100  # the large workflows are parallel chains of this many steps
HUGE_TIMEOUT_SECONDS = 900.0  # a large workflow's child process is stopped after this long
SHUTDOWN_GRACE_SECONDS = 120.0  # a child that reported gets this long to shut its Ray down
RSS_POLL_SECONDS = 0.5  # how often the parent reads the child's peak RSS (kept if it is stopped)
PROFILE_TOP = 25  # functions listed per profile


def _fn(name: str) -> str:
    return f"benchmarks.dagfuncs:{name}"


def load() -> str:
    """The 1, 5 and 15 minute load averages, for the line beside a figure."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}/{fifteen:.1f}"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


# -- many runs at once ----------------------------------------------------------------------------


def small_workflow() -> Workflow:
    """Five steps, a diamond and a tail: s0 -> (s1, s2) -> s3 -> s4. s4 = (0+1+1) + 1*1 + 1 = 4."""
    return Workflow(
        name="small-5",
        steps=[
            Step(id="s0", python=_fn("inc"), with_={"x": 0}),
            Step(id="s1", python=_fn("inc"), with_={"x": "${steps.s0.output}"}),
            Step(id="s2", python=_fn("square"), with_={"x": "${steps.s0.output}"}),
            Step(id="s3", python=_fn("add"), with_={"a": "${steps.s1.output}", "b": "${steps.s2.output}"}),
            Step(id="s4", python=_fn("inc"), with_={"x": "${steps.s3.output}"}),
        ],
    )


SMALL_STEPS = 5
SMALL_RESULT = 4


_REMOTES: dict[str, Any] = {}
_REMOTES_LOCK = threading.Lock()


def _remote(name: str) -> Any:
    """dagfuncs.NAME as a Ray remote function, made once (each ray.remote() exports it anew)."""
    with _REMOTES_LOCK:
        if name not in _REMOTES:
            _REMOTES[name] = ray.remote(getattr(dagfuncs, name))
        return _REMOTES[name]


def raw_small() -> Any:
    """The same five tasks on raw Ray, the last one awaited."""
    inc, square, add = _remote("inc"), _remote("square"), _remote("add")
    s0 = inc.remote(0)
    s3 = add.remote(inc.remote(s0), square.remote(s0))
    return ray.get(inc.remote(s3))


@dataclass
class Concurrent:
    """N runs started at once: from the first start to the last finish, and each run's latency."""

    runs: int
    wall: float
    latencies: list[float] = field(default_factory=list)
    failures: int = 0

    @property
    def per_second(self) -> float:
        return self.runs / self.wall if self.wall > 0 else float("nan")

    def summary(self) -> dict[str, float]:
        return {
            "runs": self.runs,
            "wall_s": round(self.wall, 3),
            "runs_per_s": round(self.per_second, 2),
            "p50_s": round(_percentile(self.latencies, 0.50), 3),
            "p99_s": round(_percentile(self.latencies, 0.99), 3),
            "failures": self.failures,
        }


def _at_once(n: int, one: Callable[[], bool]) -> Concurrent:
    """``one()`` in each of n threads, all released together; ``one`` returns whether it succeeded."""
    gate = threading.Barrier(n + 1)
    latencies: list[float] = [0.0] * n
    ends: list[float] = [0.0] * n
    ok: list[bool] = [False] * n

    def body(i: int) -> None:
        gate.wait()
        start = time.perf_counter()
        try:
            ok[i] = one()
        except Exception as exc:  # noqa: BLE001 - counted as a failure, reported below
            print(f"run {i} raised {type(exc).__name__}: {exc}", file=sys.stderr)
        ends[i] = time.perf_counter()
        latencies[i] = ends[i] - start

    threads = [threading.Thread(target=body, args=(i,), name=f"bench-run-{i}", daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    first = time.perf_counter()
    gate.wait()
    for thread in threads:
        thread.join()
    return Concurrent(n, max(ends) - first, latencies, failures=ok.count(False))


def concurrent_factory(n: int, settings: Settings, store: Store | None) -> Concurrent:
    """n runs of the 5-step workflow, each ``factory.run`` in its own thread of this process (a
    coordinator per thread, as the runner actor hosts them). ``store`` shared by all of them, or
    None: each run opens its own connection from ``settings`` (the runner actor's way)."""
    workflow = small_workflow()

    def one() -> bool:
        result = factory.run(workflow, store=store, settings=settings)
        return result.ok and result.outputs["s4"] == SMALL_RESULT

    return _at_once(n, one)


def concurrent_raw(n: int) -> Concurrent:
    """The same n 5-task DAGs on raw Ray, each submitted and awaited from its own thread."""
    return _at_once(n, lambda: raw_small() == SMALL_RESULT)


SEQUENTIAL_RUNS = 50  # runs one at a time, for the CPU each costs this process


def one_at_a_time(n: int, settings: Settings, store: Store) -> dict[str, float]:
    """The 5-step run n times one after the other, raw and through the Factory: wall time and
    this thread's CPU per run (what many runs at once pay under one GIL)."""
    workflow = small_workflow()
    figures: dict[str, float] = {}
    sides: dict[str, Callable[[], Any]] = {
        "raw": raw_small,
        "factory": lambda: factory.run(workflow, store=store, settings=settings),
    }
    for side, fn in sides.items():
        start, cpu = time.perf_counter(), time.thread_time()
        for _ in range(n):
            fn()
        figures[f"{side}_ms"] = round(1e3 * (time.perf_counter() - start) / n, 2)
        figures[f"{side}_cpu_ms"] = round(1e3 * (time.thread_time() - cpu) / n, 2)
    return figures


def run_concurrent(n: int, repeat: int, settings: Settings, store: Store, per_run_store: bool) -> dict[str, Any]:
    """Alternate raw and Factory rounds ``repeat`` times; keep each side's best throughput round."""
    # warm: workers, imports, the store
    concurrent_raw(min(n, 8))
    concurrent_factory(min(n, 8), settings, None if per_run_store else store)
    best_raw: Concurrent | None = None
    best_fac: Concurrent | None = None
    loads: list[str] = []
    for _ in range(repeat):
        loads.append(load())
        raw = concurrent_raw(n)
        fac = concurrent_factory(n, settings, None if per_run_store else store)
        if best_raw is None or raw.per_second > best_raw.per_second:
            best_raw = raw
        if best_fac is None or fac.per_second > best_fac.per_second:
            best_fac = fac
    assert best_raw is not None and best_fac is not None
    sequential = one_at_a_time(SEQUENTIAL_RUNS, settings, store)
    loads.append(load())
    return {
        "one_at_a_time": sequential,
        "concurrent": n,
        "tasks": n * SMALL_STEPS,
        "store": "one connection per run" if per_run_store else "one shared store",
        "raw": best_raw.summary(),
        "factory": best_fac.summary(),
        "throughput_ratio": round(best_fac.per_second / best_raw.per_second, 3),
        "p99_ratio": round(_percentile(best_fac.latencies, 0.99) / _percentile(best_raw.latencies, 0.99), 3),
        "loads": loads,
    }


def print_concurrent(report: dict[str, Any]) -> None:
    n = report["concurrent"]
    print(f"\n{n} runs of 5 steps at once in this process ({report['tasks']} tasks; {report['store']}); best of rounds")
    print(f"{'':<10}{'runs/s':>9}{'wall s':>9}{'p50 s':>9}{'p99 s':>9}{'failed':>8}")
    for label in ("raw", "factory"):
        s = report[label]
        print(
            f"{label:<10}{s['runs_per_s']:>9.1f}{s['wall_s']:>9.3f}{s['p50_s']:>9.3f}{s['p99_s']:>9.3f}{s['failures']:>8}"
        )
    met = "met" if report["throughput_ratio"] >= 0.5 else "NOT met"
    print(
        f"throughput Factory/raw {report['throughput_ratio']:.2f} (target >= 0.5: {met}), "
        f"p99 Factory/raw {report['p99_ratio']:.2f}; {', '.join(report['loads'])}"
    )
    seq = report["one_at_a_time"]
    print(
        f"one at a time ({SEQUENTIAL_RUNS} runs): raw {seq['raw_ms']:.2f} ms wall, {seq['raw_cpu_ms']:.2f} ms CPU "
        f"of this thread per run; Factory {seq['factory_ms']:.2f} ms wall, {seq['factory_cpu_ms']:.2f} ms CPU"
    )


# -- very large workflows, each in a fresh process ---------------------------------------------------


def chains_workflow(steps: int, length: int = HUGE_CHAIN_LENGTH) -> Workflow:
    """``steps // length`` parallel chains of ``length`` steps: step k depends on step k - width."""
    width = max(1, steps // length)
    items: list[Step] = []
    for k in range(steps):
        deps = {"x": f"${{steps.b{k - width}.output}}"} if k >= width else {"x": k}
        items.append(Step(id=f"b{k}", python=_fn("inc"), with_=deps))
    return Workflow(name=f"chains-{width}x{length}", steps=items)


def for_each_workflow(items: int) -> Workflow:
    return Workflow(
        name=f"for-each-{items}",
        steps=[
            Step(id="source", python=_fn("numbers"), with_={"n": items}),
            Step(id="square", python=_fn("square"), for_each="${steps.source.output}", with_={"x": "${item}"}),
            Step(id="total", python=_fn("total"), with_={"values": "${steps.square.output}"}),
        ],
    )


def huge_settings(home: str, steps: int) -> Settings:
    """The limits a workflow of ``steps`` steps (or a for_each of ``steps`` items) needs, raised
    explicitly for the benchmark (their defaults guard an API against oversized documents)."""
    defaults = Settings(home=home)
    return Settings(
        home=home,
        max_for_each_items=max(defaults.max_for_each_items, steps),
        workflow_max_steps=max(defaults.workflow_max_steps, steps),
        workflow_max_nodes=max(defaults.workflow_max_nodes, steps * 8),
        workflow_max_bytes=max(defaults.workflow_max_bytes, steps * 128),
    )


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_case(kind: str, steps: int) -> dict[str, Any]:
    """In this (fresh) process: one large workflow on SQLite. Ray stays up (the caller prints
    the report first: shutting a driver down after 100,000 tasks can take minutes)."""
    home = tempfile.mkdtemp(prefix="factory-huge-")
    settings = huge_settings(home, steps)
    store = SQLiteStore(os.path.join(home, "factory.db"))
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        return measure_case(kind, steps, store, settings)
    finally:
        store.close()


def raw_chains(steps: int, length: int = HUGE_CHAIN_LENGTH) -> int:
    """chains_workflow(steps) on raw Ray (every task submitted at once, as the Factory does);
    returns the last step's value."""
    inc = _remote("inc")
    width = max(1, steps // length)
    refs: list[Any] = []
    for k in range(steps):
        refs.append(inc.remote(refs[k - width] if k >= width else k))
    last = ray.get(refs[-1])
    return int(last)


HUGE_KINDS = ("chains", "for_each", "raw_chains", "wrapper_chains")


def measure_case(kind: str, steps: int, store: Store, settings: Settings) -> dict[str, Any]:
    """One large workflow, after a small warm-up run: wall time, whether the output is right,
    and this process's peak RSS (before and after). ``chains`` and ``for_each`` go through the
    Factory; ``raw_chains`` is the same chains on raw Ray and ``wrapper_chains`` the Factory's
    worker tasks alone (wrapper_only), the baselines of the coordinator's memory."""
    factory.run(chains_workflow(20, 10), store=store, settings=settings)  # warm the workers
    before = _peak_mb()
    build_start = time.perf_counter()
    width = max(1, steps // HUGE_CHAIN_LENGTH)
    chain_end = (steps - 1) % width + 1 + (steps - 1) // width  # the last chain's seed, plus one per step
    workflow: Workflow | None = None
    if kind in ("chains", "wrapper_chains"):
        workflow, last, expected = chains_workflow(steps), f"b{steps - 1}", chain_end
    elif kind == "for_each":
        workflow, last, expected = for_each_workflow(steps), "total", sum(x * x for x in range(steps))
    built = time.perf_counter() - build_start
    after_build = _current_mb()
    start = time.perf_counter()
    if kind == "raw_chains":
        status, correct = "succeeded", raw_chains(steps) == chain_end
    elif kind == "wrapper_chains":
        assert workflow is not None
        status, correct = "succeeded", wrapper_only(workflow) == chain_end
    else:
        assert workflow is not None
        result = factory.run(workflow, store=store, settings=settings)
        status, correct = result.status.value, result.outputs.get(last) == expected
    wall = time.perf_counter() - start
    return {
        "kind": kind,
        "steps": steps,
        "status": status,
        "correct": correct,
        "wall_s": round(wall, 2),
        "build_s": round(built, 2),
        "peak_rss_mb": round(_peak_mb()),
        "peak_rss_before_run_mb": round(before),
        "rss_after_build_mb": round(after_build),
        "load": load(),
    }


def _current_mb() -> float:
    """This process's resident set now (not its peak)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child_peak_mb(pid: int) -> float | None:
    """The child's peak RSS so far (VmHWM), read from /proc; None when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_huge(kind: str, steps: int, timeout: float) -> dict[str, Any]:
    """One large workflow in a fresh child process (its peak RSS is its own); stopped after
    ``timeout`` seconds, in which case the time and the peak RSS seen so far are reported.
    The child prints its report before it shuts its Ray down, and is stopped if that takes
    longer than SHUTDOWN_GRACE_SECONDS."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "benchmarks.engine_scale", "case", kind, str(steps)]
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as errors:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
        assert child.stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(child.stdout or []), daemon=True)
        reader.start()
        peak: float | None = None
        while child.poll() is None and time.perf_counter() - start < timeout:
            if any(line.startswith("{") for line in lines):
                break
            peak = _child_peak_mb(child.pid) or peak
            time.sleep(RSS_POLL_SECONDS)
        done = [line for line in lines if line.startswith("{")]
        if done:  # let it shut its Ray down (so that the next case does not overlap), within reason
            try:
                child.wait(timeout=SHUTDOWN_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                child.terminate()
        elif child.poll() is None:
            child.terminate()
        child.wait()
        reader.join(timeout=5)
        if done:
            return dict(json.loads(done[-1]))
        if time.perf_counter() - start >= timeout:
            return {
                "kind": kind,
                "steps": steps,
                "status": f"stopped after {timeout:.0f}s",
                "peak_rss_mb": round(peak or 0),
                "load": load(),
            }
        errors.seek(0)
        return {"kind": kind, "steps": steps, "status": f"exit {child.returncode}: {errors.read().strip()[-600:]}"}


def print_huge(report: dict[str, Any]) -> None:
    chains = f"{report['steps'] // HUGE_CHAIN_LENGTH} chains of {HUGE_CHAIN_LENGTH}"
    what = {
        "chains": chains,
        "for_each": f"one for_each of {report['steps']}",
        "raw_chains": f"{chains} on raw Ray",
        "wrapper_chains": f"{chains} as the Factory's tasks, no coordinator",
    }[report["kind"]]
    if "wall_s" not in report:
        print(f"{report['steps']:>8} steps, {what}: {report['status']}, peak RSS so far {report.get('peak_rss_mb')} MB")
        return
    print(
        f"{report['steps']:>8} steps, {what}: {report['status']} (output correct: {report['correct']}) "
        f"in {report['wall_s']:.1f}s, coordinator peak RSS {report['peak_rss_mb']} MB "
        f"({report['peak_rss_before_run_mb']} MB before, {report.get('rss_after_build_mb', '?')} MB with the "
        f"workflow built); {report['load']}"
    )


# -- a profile of the coordinator -------------------------------------------------------------------


def profile_run(label: str, workflow: Workflow, store: Store, settings: Settings, out_dir: str | None) -> str:
    """One Factory run timed plainly (wall, and CPU of this thread, where the coordinator runs),
    then one under cProfile timed by this thread's CPU clock, so that what the coordinator
    waits for (Ray, the workers) is not counted: the top functions by own and cumulative CPU."""
    steps = len(workflow.steps)
    start, cpu_start = time.perf_counter(), time.thread_time()
    factory.run(workflow, store=store, settings=settings)
    plain, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
    profiler = cProfile.Profile(time.thread_time)
    start = time.perf_counter()
    profiler.enable()
    result = factory.run(workflow, store=store, settings=settings)
    profiler.disable()
    profiled = time.perf_counter() - start
    assert result.ok, result.error
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        profiler.dump_stats(os.path.join(out_dir, f"{label}.prof"))
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    text.write(
        f"== {label}: {steps} steps; unprofiled {plain:.3f}s wall, the coordinator thread's CPU {cpu:.3f}s "
        f"({cpu / plain:.0%} of the wall time, {1e3 * cpu / steps:.3f} ms per step); "
        f"{profiled:.3f}s wall under cProfile (CPU clock); {load()}\n"
    )
    stats.sort_stats("tottime").print_stats(PROFILE_TOP)
    stats.sort_stats("cumulative").print_stats(PROFILE_TOP)
    return text.getvalue()


# -- where the overhead goes: the worker's wrapper alone, the coordinator without commits ----------


class NoCommitStore(SQLiteStore):
    """A SQLite store whose ``record`` writes nothing: the coordinator's cost without its commits
    (the lease, the run row and the reads still go to SQLite). For the breakdown only."""

    def record(self, changes: list[Change], owner: str | None = None) -> None:
        return None


def wrapper_only(workflow: Workflow) -> Any:
    """The workflow's steps as the Factory's own Ray tasks (runtime.execute_step / execute_item,
    the worker-side wrapper: reference resolution, output capture, JSON) chained by ObjectRefs,
    with no coordinator, no store: what the wrapper adds to raw Ray. Returns the last output."""
    graph = build_graph(workflow)
    by_id = {s.id: s for s in workflow.steps}
    refs: dict[str, Any] = {}
    for step_id in graph.order:
        step = by_id[step_id]
        deps = graph.deps[step_id]
        call = StepCall(
            step_id=step_id,
            target=step.python or "",
            arguments=step.with_,
            resolved=False,
            inputs={},
            dep_ids=tuple(deps),
            search_path=(),
            timeout=step.timeout,
            retry=step.retry,
        )
        if step.for_each is None:
            refs[step_id] = execute_step.remote(call, *[refs[d] for d in deps])
            continue
        outputs = {d: json.loads(ray.get(refs[d]).output_json) for d in deps}
        items = resolve(step.for_each, Context({}, outputs))
        item_refs = [
            execute_item.remote(
                replace(call, arguments=resolve(step.with_, Context({}, outputs, item, True)), resolved=True)
            )
            for item in items
        ]
        output_json = "[" + ",".join(outcome.output_json or "null" for outcome in ray.get(item_refs)) + "]"
        refs[step_id] = ray.put(Outcome(ok=True, output_json=output_json))
    return json.loads(ray.get(refs[graph.order[-1]]).output_json)


def breakdown(
    title: str, raw_fn: Callable[[], Any], workflow: Workflow, home: str, settings: Settings, repeat: int
) -> str:
    """Best-of-``repeat`` wall times of one DAG four ways, alternated round by round."""
    sqlite = SQLiteStore(os.path.join(home, "breakdown.db"))
    nocommit = NoCommitStore(os.path.join(home, "breakdown-nocommit.db"))
    ways: dict[str, Callable[[], Any]] = {
        "raw": raw_fn,
        "wrapper": lambda: wrapper_only(workflow),
        "nocommit": lambda: factory.run(workflow, store=nocommit, settings=settings),
        "sqlite": lambda: factory.run(workflow, store=sqlite, settings=settings),
    }
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(repeat):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    raw = best["raw"]
    cells = "".join(f"{best[name]:>12.3f}{best[name] / raw:>6.2f}" for name in ways)
    return f"{title:<24}{cells}   {load()}"


BREAKDOWN_HEADER = (
    f"{'dag':<24}{'raw s':>12}{'':>6}{'wrapper s':>12}{'x':>6}{'no-commit s':>12}{'x':>6}{'sqlite s':>12}{'x':>6}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    case = sub.add_parser("case", help="run one large workflow in this process (the child of --huge)")
    case.add_argument("kind", choices=HUGE_KINDS)
    case.add_argument("steps", type=int)
    args = parser.parse_args()
    if args.command == "case":
        print(json.dumps(run_case(args.kind, args.steps)), flush=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
