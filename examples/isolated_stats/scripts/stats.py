"""Summarise the CSV made by generate.py into a JSON report; prints the report."""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
from pathlib import Path


def main(source: Path, out: Path) -> None:
    decimals = int(os.environ.get("DECIMALS", "2"))
    with source.open() as f:
        values = [float(row["value"]) for row in csv.DictReader(f)]
    report = {
        "count": len(values),
        "mean": round(statistics.fmean(values), decimals),
        "median": round(statistics.median(values), decimals),
        "stdev": round(statistics.stdev(values), decimals),
        "min": round(min(values), decimals),
        "max": round(max(values), decimals),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
