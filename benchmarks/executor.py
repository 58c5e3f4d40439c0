"""Executor benchmark: a local isolated step vs a bare subprocess running the same command.

    python -m benchmarks.executor [--repeat 30] [--warmup 3]

For each command it runs, in this one process, the bare ``subprocess.run`` and
the full local executor path (uid slot, private workdir, cgroups, prlimit,
bubblewrap with every namespace, read-only root, log capture, cleanup), and the
full step path (``run_spec``: secrets, mounts, artifact store) and prints the
median and p90 wall times, the ratio isolated/bare and the time added per step.
Target: ratio <= 1.5x, or <= 25 ms added per step.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from factory.sandbox import run_spec
from factory.sandbox.local import LocalExecutor
from factory.sandbox.secrets import EnvSecretSource
from factory.spec import ContainerSpec

COMMANDS: dict[str, list[str]] = {
    "true": ["/bin/true"],
    "python3 -c (interpreter start)": ["/usr/bin/python3", "-c", "print(sum(range(100000)))"],
}
TARGET_RATIO = 1.5
TARGET_ADDED_MS = 25.0


def _interleaved(fns: dict[str, Callable[[], object]], repeat: int, warmup: int) -> dict[str, list[float]]:
    """Time each function ``repeat`` times, taking turns, so that load changes hit all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - started)
    return samples


def _summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    executor = LocalExecutor()
    home = Path(tempfile.mkdtemp(prefix="factory-bench-"))
    print(f"# local executor vs bare subprocess ({platform.machine()}, {os.cpu_count()} cpus, uid {os.geteuid()})")
    print(f"{'command':34} {'path':10} {'median ms':>10} {'p90 ms':>8} {'ratio':>6} {'added ms':>9}")
    verdicts = []
    for label, argv in COMMANDS.items():
        spec = ContainerSpec(image="host", command=argv)

        def bare(argv: list[str] = argv) -> object:
            return subprocess.run(argv, capture_output=True, check=True)

        def isolated(spec: ContainerSpec = spec) -> object:
            result = executor.run(spec)
            assert result.exit_code == 0, result.stderr
            return result

        def step(spec: ContainerSpec = spec) -> object:
            return run_spec(spec, executor, home=home, secret_source=EnvSecretSource({}))

        samples = _interleaved({"bare": bare, "isolated": isolated, "step": step}, args.repeat, args.warmup)
        base_median, base_p90 = _summary(samples["bare"])
        print(f"{label:34} {'bare':10} {base_median * 1e3:10.2f} {base_p90 * 1e3:8.2f} {'':>6} {'':>9}")
        for name in ("isolated", "step"):
            median, p90 = _summary(samples[name])
            ratio = median / base_median
            added = (median - base_median) * 1e3
            print(f"{'':34} {name:10} {median * 1e3:10.2f} {p90 * 1e3:8.2f} {ratio:5.2f}x {added:9.2f}")
            verdicts.append(ratio <= TARGET_RATIO or added <= TARGET_ADDED_MS)
    met = all(verdicts)
    print(f"target (<= {TARGET_RATIO}x or <= {TARGET_ADDED_MS:g} ms added per step): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
