"""Pool dispatch against raw actor calls to the same actors, in one run.

    python -m benchmarks.pools [--replicas 2] [--calls 4000] [--concurrency 16] [--rounds 3]
    python -m benchmarks.pools --fast-agent [--calls 400] [--concurrency 8]     # the fast-agent row

Starts a pool of N replicas of a trivial agent (so the numbers show dispatch
cost, not work), then, in alternating rounds on the same replicas:

- raw:   ``await replica.call.remote(task)``, round-robin over the actor handles;
- pool:  ``await client.call(task)`` (power of two choices on the caller's in-flight
  counts, the bounded-queue check, the circuit breaker, failover bookkeeping);
- relay: ``client.submit(task)``, the ObjectRef path the workflow engine uses
  (one more actor hop; reported, not part of the targets).

Each round keeps ``--concurrency`` calls in flight from one asyncio loop. Prints
calls/s and p50/p99 latency per mode (the best round of each) and the ratios
against raw. Targets: calls/s ratio >= 0.8, p99 <= 2x raw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import ray

from factory.agent import Agent
from factory.catalog import AgentSpec
from factory.pools import ManagerConfig, PoolClient, Pools, stop_manager


class Echo(Agent):
    """Returns its task: the cheapest possible agent."""

    name = "echo"

    async def handle(self, task: Any) -> Any:
        return task


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _closed_loop(call: Callable[[int], Awaitable[Any]], calls: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    counter = iter(range(calls))

    async def worker() -> None:
        for i in counter:
            started = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "calls_per_s": calls / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
    }


def _best(rounds: list[dict[str, float]]) -> dict[str, float]:
    return max(rounds, key=lambda r: r["calls_per_s"])


async def _bench(client: PoolClient, calls: int, concurrency: int, rounds: int) -> dict[str, dict[str, float]]:
    handles = list(client.handles().values())
    task = {"x": 1}

    async def raw(i: int) -> Any:
        return await handles[i % len(handles)].call.remote(task)

    async def pool(i: int) -> Any:
        outcome = await client.call(task)
        assert outcome.ok, outcome.error
        return outcome

    async def relay(i: int) -> Any:
        return await client.submit(task)

    modes: dict[str, Callable[[int], Awaitable[Any]]] = {"raw": raw, "pool": pool, "relay": relay}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in modes}
    for call in modes.values():  # warm up every path
        await _closed_loop(call, min(calls, 500), concurrency)
    for _ in range(rounds):
        for name, call in modes.items():
            results[name].append(await _closed_loop(call, calls, concurrency))
    return {name: _best(rounds_) for name, rounds_ in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pools", description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2, help="replicas in the pool")
    parser.add_argument("--calls", type=int, default=4000, help="calls per round and mode")
    parser.add_argument("--concurrency", type=int, default=16, help="calls kept in flight")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each mode counts")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--fast-agent",
        action="store_true",
        help="the fast-agent row instead: a pool of fast-agent replicas on the passthrough model against the same "
        "agent in this process (benchmarks.fastagent_pool; --calls, --concurrency and --rounds pass on)",
    )
    args = parser.parse_args(argv)
    if args.fast_agent:
        from benchmarks import fastagent_pool

        return fastagent_pool.main(
            ["--calls", str(args.calls), "--concurrency", str(args.concurrency), "--rounds", str(args.rounds)]
        )

    # A Ray of its own (or the one RAY_ADDRESS names): not whatever cluster happens to run here.
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    manager = f"bench-pools-{uuid.uuid4().hex[:6]}"
    pools = Pools(manager, config=ManagerConfig(check_interval=5.0))
    try:
        spec = AgentSpec.model_validate(
            {
                "name": "echo",
                "class": "benchmarks.pools:Echo",
                "pool": {
                    "min_replicas": args.replicas,
                    "max_replicas": args.replicas,
                    "max_concurrency": 64,
                    "max_queued": 100_000,
                    "num_cpus": 0,
                },
            }
        )
        client = pools.ensure(spec, agent=Echo)
        results = asyncio.run(_bench(client, args.calls, args.concurrency, args.rounds))
    finally:
        pools.close()
        stop_manager(manager, drain_timeout=0)

    raw, pool = results["raw"], results["pool"]
    ratio = pool["calls_per_s"] / raw["calls_per_s"]
    p99_ratio = pool["p99_ms"] / raw["p99_ms"]
    summary = {
        "replicas": args.replicas,
        "concurrency": args.concurrency,
        "calls": args.calls,
        "rounds": args.rounds,
        **{name: {k: round(v, 3) for k, v in r.items()} for name, r in results.items()},
        "ratio_calls_per_s": round(ratio, 3),
        "ratio_p99": round(p99_ratio, 3),
        "targets_met": ratio >= 0.8 and p99_ratio <= 2.0,
    }
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return 0
    print(
        f"pools benchmark: {args.replicas} replicas, {args.concurrency} calls in flight, "
        f"{args.calls} calls per round, best of {args.rounds} alternating rounds"
    )
    labels = {"raw": "raw actor calls", "pool": "pool client (p2c)", "relay": "pool via relay (engine path)"}
    for name, label in labels.items():
        r = results[name]
        print(f"  {label:<30} {r['calls_per_s']:8.0f} calls/s   p50 {r['p50_ms']:6.2f} ms   p99 {r['p99_ms']:6.2f} ms")
    print(f"ratio calls/s pool/raw: {ratio:.2f} (target >= 0.8)")
    print(f"ratio p99 pool/raw: {p99_ratio:.2f} (target <= 2.0)")
    print(f"relay path calls/s vs raw: {results['relay']['calls_per_s'] / raw['calls_per_s']:.2f} (for information)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
