"""Summarise a sampling profile: py-spy's collapsed stacks (``py-spy record -f raw``).

    py-spy record -r 250 -f raw -o /tmp/x.txt -- python -m benchmarks.engine --concurrent 200
    python -m benchmarks.stacks /tmp/x.txt --within "factory/api.py:run" [--top 25]

Each line of the file is ``frame;frame;...;frame COUNT`` (outermost first). Only the samples
whose stack holds a frame containing ``--within`` are kept (e.g. the coordinators' threads);
it prints the functions by own samples (the innermost frame) and by inclusive samples (on the
stack at all), as a share of the kept samples. py-spy counts samples where a thread was
running (idle threads are left out unless ``--idle`` was given to py-spy).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_LOCATION = re.compile(r"\s*\((?P<file>[^()]*?)(?::\d+)?\)$")


def _function(frame: str) -> str:
    """``name (path/to/file.py:123)`` -> ``name (file.py)``: one entry per function, not per line;
    a process's frame (``process PID:"command line"``, with --subprocesses) cut to its start."""
    if frame.startswith("process "):
        return frame[:80]
    match = _LOCATION.search(frame)
    if match is None:
        return frame.strip()
    name = frame[: match.start()].strip()
    path = match.group("file")
    short = "/".join(path.split("/")[-2:])
    return f"{name} ({short})"


def summarise(path: Path, within: str, top: int) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    kept = total = 0
    for line in path.read_text().splitlines():
        match = _LINE.match(line.strip())
        if match is None:
            continue
        count = int(match.group("count"))
        frames = match.group("stack").split(";")
        total += count
        if within and not any(within in frame for frame in frames):
            continue
        kept += count
        names = [_function(frame) for frame in frames]
        own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    if not kept:
        return f"no samples within {within!r} (of {total})"
    lines = [f"{kept} samples within {within!r} ({100 * kept / max(total, 1):.0f}% of {total})", "", "own time:"]
    lines += [f"{100 * n / kept:6.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"{100 * n / kept:6.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path)
    parser.add_argument("--within", default="", help="keep only the stacks with a frame containing this")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summarise(args.path, args.within, args.top))


if __name__ == "__main__":
    main()
