"""fast-agent agents in a pool against the same fast-agent agent in one process, in one run.

    python -m benchmarks.fastagent_pool [--calls 400] [--concurrency 8] [--rounds 2]

The agent is ``factory.fastagent:FastAgent`` on fast-agent's ``passthrough`` model (it answers
with the message: no provider, so the figures show the cost of the bridge and the pool, not a
model's). Modes, in alternating rounds:

- in-process: ``await agent.handle(task)`` on one FastAgent made here (one fast-agent app, one
  agent instance per job, as a replica does);
- pool, 1 replica and 2 replicas: ``await client.call(task)`` through a Factory pool of
  FastAgent replicas (Ray actors).

Prints calls/s per mode (the best round of each) and the ratios to in-process. Targets:
>= 0.7x on one replica, > 1x with two replicas (on two cores).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import ray

from factory.catalog import AgentSpec
from factory.fastagent import FastAgent
from factory.pools import ManagerConfig, PoolClient, Pools, stop_manager

CONFIG = {"model": "passthrough", "instruction": "Repeat the request."}


async def _closed_loop(call: Callable[[int], Awaitable[Any]], calls: int, concurrency: int) -> float:
    """Calls per second with ``concurrency`` calls in flight."""
    next_call = 0

    async def worker() -> None:
        nonlocal next_call
        while next_call < calls:
            i = next_call
            next_call += 1
            await call(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return calls / (time.perf_counter() - start)


def _pool(pools: Pools, name: str, replicas: int) -> PoolClient:
    spec = AgentSpec.model_validate(
        {
            "name": name,
            "class": "factory.fastagent:FastAgent",
            "config": CONFIG,
            "pool": {
                "min_replicas": replicas,
                "max_replicas": replicas,
                "max_concurrency": 16,
                "max_queued": 100_000,
                "num_cpus": 0,
            },
        }
    )
    return pools.ensure(spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fastagent_pool", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="calls per round and mode")
    parser.add_argument("--concurrency", type=int, default=8, help="calls kept in flight")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each mode counts")
    args = parser.parse_args(argv)

    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    local = FastAgent(CONFIG)
    if local.problem:
        raise SystemExit(local.problem)
    manager = f"bench-fa-{uuid.uuid4().hex[:6]}"
    pools = Pools(manager, config=ManagerConfig(check_interval=5.0))
    try:
        one = _pool(pools, "fa-one", 1)
        two = _pool(pools, "fa-two", 2)
        modes: dict[str, Callable[[int], Awaitable[Any]]] = {
            "in-process": lambda i: local.handle(local.task_model.model_validate({"text": f"task {i}"})),
            "pool, 1 replica": lambda i: one.call({"text": f"task {i}"}),
            "pool, 2 replicas": lambda i: two.call({"text": f"task {i}"}),
        }

        async def bench() -> dict[str, float]:
            for call in modes.values():  # warm up: first calls start apps and connections
                await _closed_loop(call, 20, args.concurrency)
            best = dict.fromkeys(modes, 0.0)
            for _ in range(args.rounds):
                for name, call in modes.items():
                    best[name] = max(best[name], await _closed_loop(call, args.calls, args.concurrency))
            return best

        results = asyncio.run(bench())
    finally:
        pools.close()
        stop_manager(manager, drain_timeout=0)
    base = results["in-process"]
    print(
        f"fast-agent pool benchmark (passthrough model): {args.calls} calls per round, "
        f"{args.concurrency} in flight, best of {args.rounds} alternating rounds"
    )
    for name, rate in results.items():
        print(f"  {name:<18} {rate:8.0f} calls/s   {rate / base:5.2f}x in-process")
    print(
        f"targets: 1 replica >= 0.7x ({results['pool, 1 replica'] / base:.2f}), "
        f"2 replicas > 1x ({results['pool, 2 replicas'] / base:.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
