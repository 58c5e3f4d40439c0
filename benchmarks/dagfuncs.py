"""Tiny step functions shared by the raw-Ray baseline and the Factory in the benchmarks."""

from __future__ import annotations


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
