"""Tiny step functions shared by the raw-Ray baseline and the Factory in the benchmarks."""

from __future__ import annotations

from typing import Any


def inc(x: int) -> int:
    return x + 1


def numbers(n: int) -> list[int]:
    return list(range(n))


def square(x: int) -> int:
    return x * x


def total(values: list[int]) -> int:
    return sum(values)


def add(a: int, b: int) -> int:
    return a + b


def nap(seconds: float, after: object = None) -> float:
    """Sleeps, so that steps finish one by one (the dashboard benchmark)."""
    import time

    time.sleep(seconds)
    return seconds


def square_on(x: int) -> list[Any]:
    """``x * x`` and the Ray node it ran on: shows where a fan-out's items went."""
    import ray

    return [x * x, ray.get_runtime_context().get_node_id()]


def mark(path: str, item: int, seconds: float) -> int:
    """Append ``start ITEM NODE TIME`` to ``path``, sleep, append ``end ...``: the cluster
    benchmark reads when each item started, on which node, and whether it finished."""
    import time

    import ray

    node = ray.get_runtime_context().get_node_id()
    with open(path, "a") as fh:
        fh.write(f"start {item} {node} {time.time():.3f}\n")
    time.sleep(seconds)
    with open(path, "a") as fh:
        fh.write(f"end {item} {node} {time.time():.3f}\n")
    return item
