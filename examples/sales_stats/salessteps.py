"""Step functions for the ``sales-stats`` example workflow.

Pure standard library, deterministic, and every return value is JSON-serialisable.

DAG (a diamond)::

    load_rows --> split_by_region --> region_stats (for_each region) --+
        |                                                              +--> summary
        +-------------------------> outliers ---------------------------+
"""

import csv
import statistics
from collections import defaultdict
from pathlib import Path
from typing import TypedDict

HERE = Path(__file__).resolve().parent

COLUMNS = ("date", "region", "product", "units", "unit_price")


class SaleRow(TypedDict):
    date: str  # YYYY-MM-DD
    region: str
    product: str
    units: int
    unit_price: float
    revenue: float  # units * unit_price, rounded to cents


class RegionGroup(TypedDict):
    region: str
    rows: list[SaleRow]


class RegionStats(TypedDict):
    region: str
    revenue: float
    units: int
    top_product: str
    monthly: dict[str, float]  # "YYYY-MM" -> revenue


class Outlier(TypedDict):
    date: str
    region: str
    product: str
    units: int
    unit_price: float
    revenue: float
    zscore: float


class RegionRank(TypedDict):
    rank: int
    region: str
    revenue: float
    units: int
    share_pct: float
    top_product: str


class Summary(TypedDict):
    best_region: str | None
    total_revenue: float
    regions: list[RegionRank]
    outlier_count: int
    table_markdown: str


def _resolve_input_path(path: str) -> Path:
    """Relative paths are resolved against the workflow directory (this file's dir)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else HERE / p


def _money(value: float) -> float:
    return round(value, 2)


# --------------------------------------------------------------------------- steps


def load_rows(path: str = "data/sales.csv") -> list[SaleRow]:
    """Parse the sales CSV into typed rows (file order), adding a ``revenue`` field."""
    source = _resolve_input_path(path)
    rows: list[SaleRow] = []
    with source.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{source}: missing columns {missing}")
        for line_no, raw in enumerate(reader, start=2):
            try:
                units = int(raw["units"])
                unit_price = float(raw["unit_price"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{source}:{line_no}: bad number ({exc})") from exc
            date = raw["date"].strip()
            if len(date) != 10 or date[4] != "-" or date[7] != "-":
                raise ValueError(f"{source}:{line_no}: bad date {date!r}")
            rows.append(
                {
                    "date": date,
                    "region": raw["region"].strip().lower(),
                    "product": raw["product"].strip().lower(),
                    "units": units,
                    "unit_price": unit_price,
                    "revenue": _money(units * unit_price),
                }
            )
    return rows


def split_by_region(rows: list[SaleRow]) -> list[RegionGroup]:
    """Group rows by region; groups sorted by region name, rows keep their order."""
    groups: dict[str, list[SaleRow]] = defaultdict(list)
    for row in rows:
        groups[row["region"]].append(row)
    return [{"region": region, "rows": groups[region]} for region in sorted(groups)]


def region_stats(group: RegionGroup) -> RegionStats:
    """Revenue, units, best-selling product (by revenue) and monthly revenue of one region."""
    rows = group["rows"]
    by_product: dict[str, float] = defaultdict(float)
    by_month: dict[str, float] = defaultdict(float)
    for row in rows:
        by_product[row["product"]] += row["revenue"]
        by_month[row["date"][:7]] += row["revenue"]
    top_product = min(by_product.items(), key=lambda kv: (-kv[1], kv[0]))[0] if by_product else ""
    return {
        "region": group["region"],
        "revenue": _money(sum(row["revenue"] for row in rows)),
        "units": sum(row["units"] for row in rows),
        "top_product": top_product,
        "monthly": {month: _money(by_month[month]) for month in sorted(by_month)},
    }


def outliers(rows: list[SaleRow], z: float | str = 2.5) -> list[Outlier]:
    """Rows whose revenue is more than ``z`` population standard deviations from the mean.

    ``z`` may arrive as a string (e.g. from ``--input z=3``); it is converted to float.
    Sorted by |zscore| descending, then date, region, product.
    """
    threshold = float(z)
    if len(rows) < 2:
        return []
    revenues = [row["revenue"] for row in rows]
    mean = statistics.fmean(revenues)
    stdev = statistics.pstdev(revenues)
    if stdev == 0:
        return []
    flagged: list[Outlier] = []
    for row in rows:
        score = (row["revenue"] - mean) / stdev
        if abs(score) > threshold:
            flagged.append(
                {
                    "date": row["date"],
                    "region": row["region"],
                    "product": row["product"],
                    "units": row["units"],
                    "unit_price": row["unit_price"],
                    "revenue": row["revenue"],
                    "zscore": round(score, 2),
                }
            )
    flagged.sort(key=lambda o: (-abs(o["zscore"]), o["date"], o["region"], o["product"]))
    return flagged


def summary(stats: list[RegionStats], outliers: list[Outlier]) -> Summary:
    """Rank regions by revenue and render a Markdown table (regions, months, outliers)."""
    total = _money(sum(s["revenue"] for s in stats))
    ranked = sorted(stats, key=lambda s: (-s["revenue"], s["region"]))
    regions: list[RegionRank] = [
        {
            "rank": i,
            "region": s["region"],
            "revenue": s["revenue"],
            "units": s["units"],
            "share_pct": round(100 * s["revenue"] / total, 1) if total else 0.0,
            "top_product": s["top_product"],
        }
        for i, s in enumerate(ranked, start=1)
    ]

    lines = [
        "| Rank | Region | Revenue | Units | Share | Top product |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for r in regions:
        lines.append(
            f"| {r['rank']} | {r['region']} | {r['revenue']:,.2f} | {r['units']} | "
            f"{r['share_pct']:.1f}% | {r['top_product']} |"
        )
    lines.append(f"| | **Total** | **{total:,.2f}** | **{sum(r['units'] for r in regions)}** | 100.0% | |")

    months = sorted({m for s in stats for m in s["monthly"]})
    if months:
        lines += [
            "",
            "| Region | " + " | ".join(months) + " |",
            "|---|" + "---:|" * len(months),
        ]
        for s in sorted(stats, key=lambda s: s["region"]):
            cells = " | ".join(f"{s['monthly'].get(m, 0.0):,.2f}" for m in months)
            lines.append(f"| {s['region']} | {cells} |")

    if outliers:
        lines += [
            "",
            "| Outlier date | Region | Product | Units | Revenue | z |",
            "|---|---|---|---:|---:|---:|",
        ]
        for o in outliers:
            lines.append(
                f"| {o['date']} | {o['region']} | {o['product']} | {o['units']} | "
                f"{o['revenue']:,.2f} | {o['zscore']:+.2f} |"
            )

    return {
        "best_region": regions[0]["region"] if regions else None,
        "total_revenue": total,
        "regions": regions,
        "outlier_count": len(outliers),
        "table_markdown": "\n".join(lines) + "\n",
    }
