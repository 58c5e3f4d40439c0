"""The scheduler's decisions (factory.cron): pure functions of a cron expression, a time zone,
the last decided tick and ``now``; the ``schedule:`` of a workflow validated at the boundary."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from factory import cron
from factory.spec import Workflow


def ts(text: str, zone: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


def iso(tick: float, zone: str = "UTC") -> str:
    return datetime.fromtimestamp(tick, ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M %Z")


@pytest.mark.parametrize(
    ("expr", "says"),
    [
        ("61 * * * *", "field 1 (minute) '61'"),
        ("* 24 * * *", "field 2 (hour) '24'"),
        ("0 0 32 * *", "field 3 (day-of-month) '32'"),
        ("0 0 30 2 *", "field 3 (day-of-month) '30'"),  # no February 30th: never fires
        ("0 0 * 13 *", "field 4 (month) '13'"),
        ("0 0 * * MON-FUNDAY", "field 5 (day-of-week)"),
        ("* * *", "has 3 field(s); it needs 5"),
        ("*/5 * * * * *", "has 6 field(s)"),  # no seconds field: the finest tick is a minute
        ("@fortnightly", "unknown cron alias"),
    ],
)
def test_a_bad_cron_expression_names_its_field(expr: str, says: str) -> None:
    with pytest.raises(ValueError) as info:
        cron.check_cron(expr)
    assert says in str(info.value)


def test_aliases_and_whitespace_are_normalised() -> None:
    assert cron.check_cron("@daily") == "0 0 * * *"
    assert cron.check_cron("  */15   *  * * 1-5 ") == "*/15 * * * 1-5"


def test_a_workflow_schedule_is_validated_where_it_is_read() -> None:
    base = {"name": "w", "steps": [{"id": "a", "python": "m:f"}]}
    ok = Workflow.model_validate({**base, "schedule": {"cron": "@hourly", "timezone": "Europe/Paris"}})
    assert ok.schedule is not None and ok.schedule.cron == "0 * * * *" and ok.schedule.catchup == "skip"
    for schedule, says in [
        ({"cron": "0 99 * * *"}, "field 2 (hour)"),
        ({"cron": "0 6 * * *", "timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"cron": "0 6 * * *", "timezone": "../../etc/passwd"}, "unknown time zone"),
        ({"cron": "0 6 * * *", "catchup": "all"}, "schedule.catchup"),
        ({"cron": "0 6 * * *", "every": "day"}, "schedule.every"),
    ]:
        with pytest.raises(ValidationError) as info:
            Workflow.model_validate({**base, "schedule": schedule})
        assert says in str(info.value), schedule


def test_spring_forward_a_skipped_wall_time_fires_once_after_the_gap() -> None:
    # Europe/Berlin jumps from 02:00 to 03:00 on 2026-03-29: 02:30 does not exist that day
    ticks = cron.next_fire_times("30 2 * * *", "Europe/Berlin", ts("2026-03-28 12:00", "Europe/Berlin"), 3)
    assert [iso(t, "Europe/Berlin") for t in ticks] == [
        "2026-03-29 03:00 CEST",
        "2026-03-30 02:30 CEST",
        "2026-03-31 02:30 CEST",
    ]


def test_fall_back_a_repeated_wall_time_fires_once_a_day_but_intervals_keep_going() -> None:
    # 2026-10-25: Berlin goes from 03:00 CEST back to 02:00 CET, so 02:30 happens twice
    daily = cron.next_fire_times("30 2 * * *", "Europe/Berlin", ts("2026-10-24 12:00", "Europe/Berlin"), 2)
    assert [iso(t, "Europe/Berlin") for t in daily] == ["2026-10-25 02:30 CEST", "2026-10-26 02:30 CET"]
    start = datetime(2026, 10, 25, 1, 45, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()
    every30 = cron.next_fire_times("*/30 * * * *", "Europe/Berlin", start, 5)
    gaps = {b - a for a, b in itertools.pairwise(every30)}
    assert gaps == {1800}, [iso(t, "Europe/Berlin") for t in every30]  # real half hours, none twice


def test_on_time_ticks_run_each_once_in_order() -> None:
    after = ts("2026-01-01 10:00")
    decisions = cron.decide(
        "* * * * *", "UTC", after=after, now=after + 150, catchup="skip", grace=300, overlap="allow"
    )
    assert [(d.tick - after, d.action) for d in decisions] == [(60, "run"), (120, "run")]
    # nothing due before the next tick, and a tick is never due twice from the same `after`
    assert cron.decide("* * * * *", "UTC", after=after + 120, now=after + 179, catchup="skip", grace=300) == []


def test_missed_ticks_are_skipped_by_default_in_one_decision() -> None:
    after = ts("2026-01-01 10:00")
    now = after + 3600 + 30  # the scheduler was down an hour; the 11:00 tick is 30 s late
    decisions = cron.decide("*/10 * * * *", "UTC", after=after, now=now, catchup="skip", grace=60)
    assert [(iso(d.tick), d.action, d.missed) for d in decisions] == [
        ("2026-01-01 10:50 UTC", "skip", 5),
        ("2026-01-01 11:00 UTC", "run", 0),
    ]
    assert "catchup skip" in decisions[0].reason and "5 ticks" in decisions[0].reason


def test_run_once_runs_the_latest_missed_tick_once() -> None:
    after = ts("2026-01-01 10:00")
    now = after + 3600 + 300  # 11:05: every tick since 10:10 is past the grace
    decisions = cron.decide("*/10 * * * *", "UTC", after=after, now=now, catchup="run_once", grace=60)
    assert [(iso(d.tick), d.action, d.missed) for d in decisions] == [
        ("2026-01-01 10:50 UTC", "skip", 5),
        ("2026-01-01 11:00 UTC", "run", 0),
    ]
    assert "run_once" in decisions[1].reason
    # with an on-time tick running anyway, the missed ones are not run on top of it
    on_time = cron.decide("*/10 * * * *", "UTC", after=after, now=after + 3630, catchup="run_once", grace=60)
    assert [d.action for d in on_time] == ["skip", "run"] and on_time[0].missed == 5
    skip_all = cron.decide("*/10 * * * *", "UTC", after=after, now=now, catchup="skip", grace=60)
    assert [d.action for d in skip_all] == ["skip"] and skip_all[0].missed == 6


def test_overlap_skip_while_the_previous_run_goes_on() -> None:
    after = ts("2026-01-01 10:00")
    kwargs = {"after": after, "now": after + 130, "catchup": "skip", "grace": 300}
    busy = cron.decide("* * * * *", "UTC", previous_active="r-1", overlap="skip", **kwargs)  # type: ignore[arg-type]
    assert [d.action for d in busy] == ["skip", "skip"] and "r-1 has not finished" in busy[0].reason
    # with none going on, the first due tick runs and the next would overlap it
    free = cron.decide("* * * * *", "UTC", previous_active=None, overlap="skip", **kwargs)  # type: ignore[arg-type]
    assert [d.action for d in free] == ["run", "skip"]
    allowed = cron.decide("* * * * *", "UTC", previous_active="r-1", overlap="allow", **kwargs)  # type: ignore[arg-type]
    assert [d.action for d in allowed] == ["run", "run"]


def test_a_long_outage_is_decided_without_scanning_every_tick() -> None:
    after = ts("2025-01-01 00:00")
    now = ts("2026-01-01 00:00") + 5  # a year of every-minute ticks
    decisions = cron.decide("* * * * *", "UTC", after=after, now=now, catchup="skip", grace=60)
    assert decisions[-1] == cron.TickDecision(int(ts("2026-01-01 00:00")), "run", "on time")
    assert decisions[0].action == "skip"


def test_timezones_shift_the_fire_times() -> None:
    after = datetime(2026, 6, 1, tzinfo=UTC).timestamp()
    (tokyo,) = cron.next_fire_times("0 9 * * *", "Asia/Tokyo", after, 1)
    (ny,) = cron.next_fire_times("0 9 * * *", "America/New_York", after, 1)
    assert iso(tokyo) == "2026-06-02 00:00 UTC"  # 09:00 JST on June 1st is `after` itself: not after it
    assert iso(ny) == "2026-06-01 13:00 UTC"


def test_shortest_gap_sees_uneven_expressions() -> None:
    assert cron.shortest_gap("0,1 * * * *", "UTC", ts("2026-01-01 00:00")) == 60
    assert cron.shortest_gap("0 */2 * * *", "UTC", ts("2026-01-01 00:00")) == 7200
    assert cron.latest_fire_time("0 6 * * *", "UTC", ts("2026-01-02 05:59")) == ts("2026-01-01 06:00")
