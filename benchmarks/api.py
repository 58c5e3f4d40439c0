"""API benchmark: POST /v1/route against a bare Ray Serve endpoint that returns a constant.

    python -m benchmarks.api [--seconds 5] [--connections 1,4] [--scorer lexical]

Both are deployed on the same Serve proxy in this run and loaded the same way (an
async HTTP client on loopback, N connections, a fixed duration); it prints requests
per second, p50/p99 latency and the ratios route/bare (targets: throughput >= 0.8x,
p99 <= 1.5x).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from fastapi import FastAPI
from ray import serve

from deployments.app import run_local
from factory.api import store_for
from factory.auth import Scope, create_key
from factory.settings import Settings

TASKS = [
    "Summarize the attached quarterly report in five bullet points.",
    "Translate this paragraph into Spanish.",
    "Fix the off-by-one error in this Python loop.",
    "What is the sentiment of this customer review?",
]

bare_app = FastAPI()


@serve.deployment(name="Bare", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(bare_app)
class Bare:
    @bare_app.post("/")
    def constant(self) -> dict[str, str]:
        return {"agent": "constant"}


async def load(url: str, headers: dict[str, str], connections: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=30) as client:

        async def worker(i: int) -> None:
            n = i
            while time.perf_counter() < deadline:
                body = {"text": TASKS[n % len(TASKS)], "capabilities": []}
                start = time.perf_counter()
                response = await client.post(url, json=body)
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status_code} {response.text[:200]}")
                n += 1

        await asyncio.gather(*(worker(i) for i in range(connections)))
    return latencies


def summary(latencies: list[float], seconds: float) -> tuple[float, float, float]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return len(latencies) / seconds, statistics.median(ordered) * 1e3, p99 * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="load duration per measurement")
    parser.add_argument("--connections", default="1,4", help="comma-separated connection counts")
    parser.add_argument("--scorer", default="lexical")
    parser.add_argument(
        "--agents", default=str(Path(__file__).parent.parent / "tests" / "fixtures" / "api_agents.yaml")
    )
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="factory-api-bench-"))
    settings = Settings(
        home=home, agents_file=Path(args.agents), router_scorer=args.scorer, api_rate_limit=1e6, api_rate_burst=10**6
    )
    store = store_for(settings)
    key, _ = create_key(store, [Scope.READ], "benchmark")
    store.close()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    run_local(settings, "127.0.0.1", port, open_mode=False)
    serve.run(Bare.bind(), name="bare", route_prefix="/bare")  # type: ignore[attr-defined]
    base = f"http://127.0.0.1:{port}"
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}, "
        f"Ray {ray.__version__}; scorer {args.scorer}; {args.seconds:g}s per measurement"
    )
    targets: dict[str, tuple[str, dict[str, Any]]] = {
        "bare": (f"{base}/bare/", {}),
        "route": (f"{base}/v1/route", {"Authorization": f"Bearer {key}"}),
    }
    for url, headers in targets.values():  # warm up: connections, router, proxy routes
        asyncio.run(load(url, headers, 1, 1.0))
    print(f"{'connections':<12}{'endpoint':<8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for connections in [int(c) for c in args.connections.split(",")]:
        results = {}
        for name, (url, headers) in targets.items():
            results[name] = summary(asyncio.run(load(url, headers, connections, args.seconds)), args.seconds)
            rps, p50, p99 = results[name]
            print(f"{connections:<12}{name:<8}{rps:>9.1f}{p50:>9.2f}{p99:>9.2f}")
        (b_rps, _, b_p99), (r_rps, _, r_p99) = results["bare"], results["route"]
        print(f"{connections:<12}{'ratio':<8}{r_rps / b_rps:>9.2f}{'':>9}{r_p99 / b_p99:>9.2f}")
    serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()


if __name__ == "__main__":
    main()
