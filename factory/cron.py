"""Cron expressions and the scheduler's decisions, as pure functions (no store, no clock).

Expressions are the five fields of crontab(5) (minute hour day-of-month month
day-of-week) or one of ``@hourly @daily @weekly @monthly @yearly``, parsed by the
cronsim library, in an IANA time zone (zoneinfo). Daylight saving time follows
Debian cron: a wall-clock time skipped when clocks go forward fires at the first
minute after the gap; a time that happens twice when clocks go back fires once
for a daily-style expression, and at both instants for one whose minute or hour
field repeats (``*/15 * * * *``).

:func:`decide` says, given a schedule's last decided tick and ``now``, which ticks
are due and whether each runs or is skipped (the missed-tick policy). Ticks are
epoch seconds of whole minutes, so they are exact as integers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

ALIASES = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
MAX_CRON_CHARS = 200
MAX_SCAN = 10_000  # fire times one decision looks at, at most (a week of every-minute ticks)

Catchup = Literal["skip", "run_once"]
Overlap = Literal["skip", "allow"]


def expand(expr: str) -> str:
    """The five fields of an expression (an alias replaced), whitespace normalised."""
    text = " ".join(expr.split())
    return ALIASES.get(text.lower(), text)


def check_cron(expr: str) -> str:
    """The expression, normalised; ValueError naming the field that is wrong and how to fix it."""
    if len(expr) > MAX_CRON_CHARS:
        raise ValueError(f"a cron expression has at most {MAX_CRON_CHARS} characters")
    fields = expand(expr)
    parts = fields.split(" ")
    if fields.startswith("@"):
        raise ValueError(f"unknown cron alias {expr.strip()!r}: use one of {', '.join(ALIASES)} or five fields")
    if len(parts) != len(FIELDS):
        raise ValueError(
            f"cron expression {expr.strip()!r} has {len(parts)} field(s); it needs 5: "
            f"{' '.join(FIELDS)} (for example '*/15 * * * *' or '0 6 * * 1-5')"
        )
    try:
        CronSim(fields, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        reason = str(exc)  # "Bad minute", "Bad day-of-month", ...
        field = reason.removeprefix("Bad ").strip()
        if field in FIELDS:
            index = FIELDS.index(field)
            raise ValueError(
                f"cron expression {expr.strip()!r}: field {index + 1} ({field}) {parts[index]!r} is not valid; "
                f"{_FIELD_HELP[field]}"
            ) from None
        raise ValueError(f"cron expression {expr.strip()!r} is not valid: {reason}") from None
    return fields


_FIELD_HELP = {
    "minute": "use 0-59, '*', lists (1,30), ranges (0-29) or steps (*/15)",
    "hour": "use 0-23, '*', lists, ranges or steps",
    "day-of-month": "use 1-31 (a day that exists in some month), '*', lists, ranges, steps, L or W",
    "month": "use 1-12 or JAN-DEC, '*', lists, ranges or steps",
    "day-of-week": "use 0-7 (0 and 7 are Sunday) or SUN-SAT, '*', lists, ranges, steps or 5#2 / 5L",
}


def check_timezone(name: str) -> str:
    """The name of an IANA time zone (``Europe/Paris``, ``UTC``); ValueError otherwise."""
    try:
        if not name or len(name) > 64 or name.startswith(("/", ".")) or ".." in name:
            raise ValueError
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}: use an IANA name such as UTC, Europe/Paris or America/New_York"
        ) from None
    return name


def _zone(name: str) -> tzinfo:
    return ZoneInfo(name)


def fire_times(cron: str, timezone: str, after: float) -> Iterator[int]:
    """Fire times strictly after ``after`` (epoch seconds), in order, as epoch seconds."""
    start = datetime.fromtimestamp(after, _zone(timezone))
    for when in CronSim(expand(cron), start):
        tick = int(when.timestamp())
        if tick > after:
            yield tick


def next_fire_times(cron: str, timezone: str, after: float, count: int) -> list[int]:
    """The next ``count`` fire times after ``after``."""
    out: list[int] = []
    for tick in fire_times(cron, timezone, after):
        out.append(tick)
        if len(out) >= count:
            break
    return out


def latest_fire_time(cron: str, timezone: str, at_or_before: float) -> int | None:
    """The latest fire time at or before the moment, or None (a schedule that never fired)."""
    start = datetime.fromtimestamp(int(at_or_before) + 1, _zone(timezone))
    for when in CronSim(expand(cron), start, reverse=True):
        tick = int(when.timestamp())
        if tick <= at_or_before:
            return tick
    return None


def shortest_gap(cron: str, timezone: str, after: float, samples: int = 500) -> float:
    """The shortest time between two of the next ``samples`` fire times (seconds)."""
    ticks = next_fire_times(cron, timezone, after, samples)
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    return float(min(gaps)) if gaps else float("inf")


@dataclass(frozen=True)
class TickDecision:
    """What to do with one tick of a schedule."""

    tick: int
    action: Literal["run", "skip"]
    reason: str
    missed: int = 0  # a skip decision can stand for this many missed ticks (this one the latest)


def decide(
    cron: str,
    timezone: str,
    *,
    after: float,
    now: float,
    catchup: Catchup,
    grace: float,
    previous_active: str | None = None,
    overlap: Overlap = "skip",
) -> list[TickDecision]:
    """The decisions due at ``now`` for ticks after ``after`` (the schedule's last decided tick,
    or when it was added or resumed), in tick order.

    A tick is *on time* while ``now - tick <= grace``: it runs. Older ticks were *missed*
    (the scheduler was down, or the store unreachable): with ``catchup: skip`` they are
    skipped, all in one decision at the latest of them; with ``run_once`` the latest missed
    tick runs once for them all, unless an on-time tick runs now anyway. ``previous_active``:
    a run of this schedule that has not finished; with ``overlap: skip`` the ticks that would
    run are skipped instead while it goes on (the first one that runs makes the next ones
    overlap it too, so at most one runs at a time)."""
    if now <= after:
        return []
    due: list[int] = []
    for tick in fire_times(cron, timezone, after):
        if tick > now:
            break
        due.append(tick)
        if len(due) >= MAX_SCAN:  # a long outage: look at the latest ticks instead
            latest = latest_fire_time(cron, timezone, now)
            if latest is not None and latest > due[-1]:
                due = [*due[:-1], latest]
            break
    missed = [t for t in due if now - t > grace]
    on_time = [t for t in due if now - t <= grace]
    out: list[TickDecision] = []
    if missed:
        span = "" if len(missed) == 1 else f" ({len(missed)} ticks, the first at {_iso(missed[0], timezone)})"
        late = f"{now - missed[-1]:.0f}s late, past the grace of {grace:g}s{span}"
        if catchup == "run_once" and not on_time:
            if len(missed) > 1:
                out.append(
                    TickDecision(missed[-2], "skip", "missed; catchup run_once runs only the latest", len(missed) - 1)
                )
            out.append(TickDecision(missed[-1], "run", f"missed ({late}); catchup run_once runs it once"))
        else:
            why = "catchup skip" if catchup == "skip" else "catchup run_once, covered by the on-time tick that runs"
            out.append(TickDecision(missed[-1], "skip", f"missed ({late}); {why}", len(missed)))
    out += [TickDecision(t, "run", "on time") for t in on_time]
    if overlap == "skip":
        active = previous_active
        kept: list[TickDecision] = []
        for decision in out:
            if decision.action == "run" and active is not None:
                decision = TickDecision(
                    decision.tick, "skip", f"the previous run {active} has not finished (overlap: skip)"
                )
            elif decision.action == "run":
                active = f"of tick {_iso(decision.tick, timezone)}"
            kept.append(decision)
        out = kept
    return out


def _iso(tick: float, timezone: str) -> str:
    return datetime.fromtimestamp(tick, _zone(timezone)).isoformat()
