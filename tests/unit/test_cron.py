"""Cron slots in IANA timezones: basics, the DST policy (pinned), backwards walks, properties."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.engine import cron as cron_module
from orchestrator.engine.cron import CronSchedule, jitter_offset_s


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def in_window(slots: list[datetime], start: datetime, end: datetime) -> list[datetime]:
    return [s for s in slots if start <= s < end]


def local_day(zone: str, year: int, month: int, day: int) -> tuple[datetime, datetime]:
    """[local midnight, next local midnight) of a calendar day, as UTC instants."""
    tz = ZoneInfo(zone)
    start = datetime(year, month, day, tzinfo=tz).astimezone(UTC)
    end = (datetime(year, month, day, tzinfo=tz) + timedelta(days=1)).astimezone(UTC)
    return start, end


# UTC instants at which each zone's offset changes (2024-2026), for steering examples.
TRANSITIONS: dict[str, list[datetime]] = {
    "Europe/Berlin": [utc(2024, 3, 31, 1), utc(2024, 10, 27, 1), utc(2025, 3, 30, 1),
                      utc(2025, 10, 26, 1), utc(2026, 3, 29, 1), utc(2026, 10, 25, 1)],
    "America/New_York": [utc(2024, 3, 10, 7), utc(2024, 11, 3, 6), utc(2025, 3, 9, 7),
                         utc(2025, 11, 2, 6), utc(2026, 3, 8, 7), utc(2026, 11, 1, 6)],
    "Australia/Lord_Howe": [utc(2024, 4, 6, 15), utc(2024, 10, 5, 15, 30), utc(2025, 4, 5, 15),
                            utc(2025, 10, 4, 15, 30), utc(2026, 4, 4, 15), utc(2026, 10, 3, 15, 30)],
}


def test_transition_table_is_right() -> None:
    for zone, instants in TRANSITIONS.items():
        tz = ZoneInfo(zone)
        for t in instants:
            before = (t - timedelta(seconds=1)).astimezone(tz).utcoffset()
            assert before != t.astimezone(tz).utcoffset(), (zone, t)


# -- basics -----------------------------------------------------------------------------------


def test_every_15_minutes_utc() -> None:
    s = CronSchedule.parse("*/15 * * * *", "UTC")
    assert s.next_after(utc(2025, 1, 1, 10, 7)) == utc(2025, 1, 1, 10, 15)
    assert s.next_after(utc(2025, 1, 1, 10, 15)) == utc(2025, 1, 1, 10, 30)  # strictly after
    just_before = utc(2025, 1, 1, 10, 14, 59) + timedelta(microseconds=999999)
    assert s.next_after(just_before) == utc(2025, 1, 1, 10, 15)
    assert s.next_n(utc(2025, 1, 1, 23, 40), 4) == [
        utc(2025, 1, 1, 23, 45), utc(2025, 1, 2, 0, 0), utc(2025, 1, 2, 0, 15), utc(2025, 1, 2, 0, 30),
    ]
    assert s.next_n(utc(2025, 1, 1), 0) == []
    assert s.next_after(utc(2025, 1, 1)).tzinfo is UTC


def test_input_in_any_zone_output_in_utc() -> None:
    s = CronSchedule.parse("*/15 * * * *", "UTC")
    t = datetime(2025, 1, 1, 12, 7, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    assert s.next_after(t) == utc(2025, 1, 1, 6, 45)
    assert s.next_after(t).tzinfo is UTC


def test_daily_berlin_follows_local_time_through_the_year() -> None:
    s = CronSchedule.parse("0 3 * * *", "Europe/Berlin")
    assert s.next_n(utc(2025, 1, 10), 2) == [utc(2025, 1, 10, 2), utc(2025, 1, 11, 2)]  # CET
    assert s.next_n(utc(2025, 7, 10), 2) == [utc(2025, 7, 10, 1), utc(2025, 7, 11, 1)]  # CEST


def test_schedule_is_a_frozen_value() -> None:
    a = CronSchedule.parse("  */5   * * * * ", " Europe/Berlin")
    assert a == CronSchedule("*/5 * * * *", "Europe/Berlin")
    assert a.expression == "*/5 * * * *"
    assert a.zone == ZoneInfo("Europe/Berlin")
    assert hash(a) == hash(CronSchedule("*/5 * * * *", "Europe/Berlin"))
    with pytest.raises(AttributeError):
        a.expression = "* * * * *"  # type: ignore[misc]


def test_aliases_and_extensions() -> None:
    assert CronSchedule.parse("@daily", "UTC").next_after(utc(2025, 1, 1, 5)) == utc(2025, 1, 2)
    last_day = CronSchedule.parse("0 0 L * *", "UTC")
    assert last_day.next_after(utc(2025, 2, 1)) == utc(2025, 2, 28)
    # Day-of-month OR day-of-week, as in classic cron.
    either = CronSchedule.parse("0 0 13 * 5", "UTC")
    assert either.next_n(utc(2025, 6, 1), 3) == [utc(2025, 6, 6), utc(2025, 6, 13), utc(2025, 6, 20)]


# -- DST policy, pinned -----------------------------------------------------------------------


def test_spring_forward_berlin_nonexistent_time_fires_one_gap_later() -> None:
    s = CronSchedule.parse("30 2 * * *", "Europe/Berlin")
    assert s.next_n(utc(2025, 3, 28, 12), 3) == [
        utc(2025, 3, 29, 1, 30),  # 02:30 CET
        utc(2025, 3, 30, 1, 30),  # 02:30 does not exist: fires at 03:30 CEST
        utc(2025, 3, 31, 0, 30),  # 02:30 CEST
    ]
    assert s.next_after(utc(2025, 3, 30, 1, 29)) == utc(2025, 3, 30, 1, 30)
    assert s.next_after(utc(2025, 3, 30, 1, 30)) == utc(2025, 3, 31, 0, 30)
    assert s.latest_at_or_before(utc(2025, 3, 30, 12), limit=2) == [
        utc(2025, 3, 29, 1, 30), utc(2025, 3, 30, 1, 30),
    ]


def test_spring_forward_new_york_nonexistent_time_fires_one_gap_later() -> None:
    s = CronSchedule.parse("30 2 * * *", "America/New_York")
    assert s.next_n(utc(2025, 3, 8), 3) == [
        utc(2025, 3, 8, 7, 30),  # 02:30 EST
        utc(2025, 3, 9, 7, 30),  # 02:30 does not exist: fires at 03:30 EDT
        utc(2025, 3, 10, 6, 30),  # 02:30 EDT
    ]
    assert s.latest_at_or_before(utc(2025, 3, 9, 7, 30)) == [utc(2025, 3, 9, 7, 30)]
    assert s.latest_at_or_before(utc(2025, 3, 9, 7, 29)) == [utc(2025, 3, 8, 7, 30)]


def test_fall_back_new_york_repeated_time_fires_once_at_first_occurrence() -> None:
    s = CronSchedule.parse("30 1 * * *", "America/New_York")
    slots = s.next_n(utc(2025, 11, 1), 3)
    assert slots == [
        utc(2025, 11, 1, 5, 30),  # 01:30 EDT
        utc(2025, 11, 2, 5, 30),  # 01:30 EDT, first occurrence; 01:30 EST (06:30Z) does not fire
        utc(2025, 11, 3, 6, 30),  # 01:30 EST
    ]
    start, end = local_day("America/New_York", 2025, 11, 2)
    assert in_window(slots, start, end) == [utc(2025, 11, 2, 5, 30)]
    # From inside the repeated hour (after the first 01:30) the next slot is the next day's.
    assert s.next_after(utc(2025, 11, 2, 5, 45)) == utc(2025, 11, 3, 6, 30)
    assert s.next_after(utc(2025, 11, 2, 6, 15)) == utc(2025, 11, 3, 6, 30)
    assert s.latest_at_or_before(utc(2025, 11, 2, 6, 45)) == [utc(2025, 11, 2, 5, 30)]


def test_fall_back_berlin_repeated_time_fires_once_at_first_occurrence() -> None:
    s = CronSchedule.parse("30 2 * * *", "Europe/Berlin")
    slots = s.next_n(utc(2025, 10, 25), 3)
    assert slots == [
        utc(2025, 10, 25, 0, 30),  # 02:30 CEST
        utc(2025, 10, 26, 0, 30),  # 02:30 CEST, first occurrence; 02:30 CET (01:30Z) does not fire
        utc(2025, 10, 27, 1, 30),  # 02:30 CET
    ]
    start, end = local_day("Europe/Berlin", 2025, 10, 26)
    assert in_window(slots, start, end) == [utc(2025, 10, 26, 0, 30)]


HOURLY_TRANSITION_DAYS = [
    # zone, local transition day, distinct slots of `30 * * * *` on that local day
    ("Europe/Berlin", (2025, 3, 30), 23),  # 02:30 does not exist -> same instant as 03:30
    ("Europe/Berlin", (2025, 10, 26), 24),  # 25-hour day; the repeated 02:30 fires once
    ("America/New_York", (2025, 3, 9), 23),
    ("America/New_York", (2025, 11, 2), 24),
    ("Australia/Lord_Howe", (2025, 10, 5), 24),  # 02:00 -> 02:30: every :30 exists
    ("Australia/Lord_Howe", (2025, 4, 6), 24),  # 02:00 -> 01:30: the repeated 01:30 fires once
]


@pytest.mark.parametrize(("zone", "day", "expected"), HOURLY_TRANSITION_DAYS)
def test_hourly_across_transition_days(zone: str, day: tuple[int, int, int], expected: int) -> None:
    s = CronSchedule.parse("30 * * * *", zone)
    start, end = local_day(zone, *day)
    slots = s.next_n(start - timedelta(hours=3), 40)
    assert all(a < b for a, b in pairwise(slots))
    assert len(in_window(slots, start, end)) == expected
    # The same set walking backwards from the end of the day.
    back = s.latest_at_or_before(end, not_before=start, limit=100)
    assert back == in_window(slots, start, end)


def test_spring_forward_hourly_berlin_exact_slots() -> None:
    s = CronSchedule.parse("30 * * * *", "Europe/Berlin")
    assert s.next_n(utc(2025, 3, 29, 23, 45), 4) == [
        utc(2025, 3, 30, 0, 30),  # 01:30 CET
        utc(2025, 3, 30, 1, 30),  # 02:30 (nonexistent) and 03:30 CEST: one slot
        utc(2025, 3, 30, 2, 30),  # 04:30 CEST
        utc(2025, 3, 30, 3, 30),
    ]


def test_fall_back_hourly_new_york_exact_slots() -> None:
    s = CronSchedule.parse("30 * * * *", "America/New_York")
    assert s.next_n(utc(2025, 11, 2, 4), 4) == [
        utc(2025, 11, 2, 4, 30),  # 00:30 EDT
        utc(2025, 11, 2, 5, 30),  # 01:30 EDT (first occurrence only)
        utc(2025, 11, 2, 7, 30),  # 02:30 EST; 01:30 EST (06:30Z) is skipped
        utc(2025, 11, 2, 8, 30),
    ]


def test_half_hour_gap_slots_are_ordered_by_instant() -> None:
    # Lord Howe 2025-10-05: 02:00 (+10:30) -> 02:30 (+11). 02:00 and 02:20 do not exist and map
    # with the +10:30 offset to 15:30Z and 15:50Z; 02:40 exists and is 15:40Z.
    s = CronSchedule.parse("*/20 * * * *", "Australia/Lord_Howe")
    expected = [utc(2025, 10, 4, 15, 10), utc(2025, 10, 4, 15, 30), utc(2025, 10, 4, 15, 40),
                utc(2025, 10, 4, 15, 50), utc(2025, 10, 4, 16, 0)]
    assert s.next_n(utc(2025, 10, 4, 15), 5) == expected
    assert s.next_after(utc(2025, 10, 4, 15, 35)) == utc(2025, 10, 4, 15, 40)  # not 15:50
    assert s.latest_at_or_before(utc(2025, 10, 4, 16), limit=5) == expected
    assert s.latest_at_or_before(utc(2025, 10, 4, 15, 45)) == [utc(2025, 10, 4, 15, 40)]


def brute_force_slots(expression: str, zone: str, around: datetime, hours: int) -> list[datetime]:
    """Every match of the cron in naive local time over a wide window, mapped by the policy."""
    tz = ZoneInfo(zone)
    centre = around.astimezone(tz).replace(tzinfo=None)
    walk = croniter(expression, centre - timedelta(hours=hours + 30))
    found: set[datetime] = set()
    while True:
        wall: datetime = walk.get_next(datetime)
        if wall > centre + timedelta(hours=hours + 30):
            break
        found.add(wall.replace(tzinfo=tz, fold=0).astimezone(UTC))
    lo, hi = around - timedelta(hours=hours), around + timedelta(hours=hours)
    return sorted(s for s in found if lo <= s <= hi)


ORACLE_EXPRESSIONS = ["*/20 * * * *", "*/7 * * * *", "15,45 1-3 * * *", "0,30 0-4 * * *", "* 2 * * *"]


@pytest.mark.parametrize("expression", ORACLE_EXPRESSIONS)
@pytest.mark.parametrize(
    ("zone", "transition"), [(z, t) for z, ts in TRANSITIONS.items() for t in ts[2:4]]
)
def test_matches_brute_force_around_transitions(expression: str, zone: str, transition: datetime) -> None:
    s = CronSchedule.parse(expression, zone)
    expected = brute_force_slots(expression, zone, transition, hours=6)
    lo, hi = transition - timedelta(hours=6), transition + timedelta(hours=6)
    assert expected, "window should contain slots"
    assert s.next_n(lo - timedelta(microseconds=1), len(expected)) == expected
    assert s.latest_at_or_before(hi, not_before=lo, limit=len(expected) + 10) == expected
    for a, b in pairwise(expected):
        assert s.next_after(a) == b
        assert s.latest_at_or_before(b - timedelta(seconds=1)) == [a]


# -- latest_at_or_before ----------------------------------------------------------------------


@pytest.fixture
def croniter_steps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts croniter steps taken by the module (get_next / get_prev calls)."""
    steps = [0]

    class Counting(croniter):  # type: ignore[misc]
        def get_next(self, *args: Any, **kwargs: Any) -> Any:
            steps[0] += 1
            return super().get_next(*args, **kwargs)

        def get_prev(self, *args: Any, **kwargs: Any) -> Any:
            steps[0] += 1
            return super().get_prev(*args, **kwargs)

    monkeypatch.setattr(cron_module, "croniter", Counting)
    yield steps


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/New_York"])
def test_long_outage_walks_back_only_as_far_as_needed(zone: str, croniter_steps: list[int]) -> None:
    s = CronSchedule.parse("* * * * *", zone)
    now = utc(2025, 3, 30, 12, 0, 30)
    down_since = now - timedelta(days=7)  # 10,080 per-minute slots in range
    latest = s.latest_at_or_before(now, not_before=down_since, limit=10)
    assert latest == [utc(2025, 3, 30, 11, 51) + timedelta(minutes=i) for i in range(10)]
    # Backwards from `now`: about `limit` steps plus the DST spread (<= 1 hour), not 10,080.
    assert croniter_steps[0] <= 10 + 61 + 2


def test_next_after_walks_only_near_the_target(croniter_steps: list[int]) -> None:
    s = CronSchedule.parse("* * * * *", "Europe/Berlin")
    assert s.next_after(utc(2025, 3, 30, 1, 0, 30)) == utc(2025, 3, 30, 1, 1)
    assert croniter_steps[0] <= 2 * 61 + 2


def test_latest_bounds_and_edge_cases() -> None:
    s = CronSchedule.parse("0 * * * *", "UTC")
    now = utc(2025, 6, 1, 12, 30)
    # not_before later than every slot <= now.
    assert s.latest_at_or_before(now, not_before=utc(2025, 6, 1, 12, 1)) == []
    assert s.latest_at_or_before(now, not_before=now + timedelta(hours=1)) == []
    # not_before and instant are inclusive.
    assert s.latest_at_or_before(utc(2025, 6, 1, 12), not_before=utc(2025, 6, 1, 12)) == [utc(2025, 6, 1, 12)]
    assert s.latest_at_or_before(now, not_before=utc(2025, 6, 1, 10), limit=10) == [
        utc(2025, 6, 1, 10), utc(2025, 6, 1, 11), utc(2025, 6, 1, 12),
    ]
    assert s.latest_at_or_before(now, limit=0) == []
    assert s.latest_at_or_before(now, limit=3) == [
        utc(2025, 6, 1, 10), utc(2025, 6, 1, 11), utc(2025, 6, 1, 12),
    ]


def test_sparse_schedule_far_in_either_direction() -> None:
    s = CronSchedule.parse("0 0 29 2 *", "Europe/Berlin")
    assert s.next_after(utc(2025, 1, 1)) == utc(2028, 2, 28, 23)
    assert s.latest_at_or_before(utc(2025, 1, 1)) == [utc(2024, 2, 28, 23)]
    assert s.latest_at_or_before(utc(2025, 1, 1), not_before=utc(2024, 3, 1)) == []


# -- properties -------------------------------------------------------------------------------

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]
EXPRESSIONS = ["*/15 * * * *", "30 2 * * *", "30 1 * * *", "*/20 * * * *", "30 * * * *",
               "0 0 * * 0", "15,45 1-3 * * *", "* * * * *"]

uniform_instants = st.datetimes(
    min_value=datetime(2024, 1, 1), max_value=datetime(2026, 12, 31), timezones=st.just(UTC)
)
near_transitions = st.builds(
    lambda t, minutes, seconds: t + timedelta(minutes=minutes, seconds=seconds),
    st.sampled_from([t for ts in TRANSITIONS.values() for t in ts]),
    st.integers(-6 * 60, 6 * 60),
    st.sampled_from([0, 0, 0, 1, 59]),
)


@settings(max_examples=100, deadline=None)
@given(
    expression=st.sampled_from(EXPRESSIONS),
    zone=st.sampled_from(ZONES),
    t=st.one_of(uniform_instants, near_transitions),
)
def test_forward_and_backward_agree(expression: str, zone: str, t: datetime) -> None:
    s = CronSchedule.parse(expression, zone)
    nxt = s.next_after(t)
    assert nxt > t
    assert s.latest_at_or_before(nxt)[-1] == nxt

    five = s.next_n(t, 5)
    stepped = [nxt]
    for _ in range(4):
        stepped.append(s.next_after(stepped[-1]))
    assert five == stepped

    before = s.latest_at_or_before(t, limit=3)
    assert len(before) == 3
    assert all(a < b for a, b in pairwise(before))
    assert before[-1] <= t
    assert s.next_after(before[-1]) == nxt  # nothing in (latest, t]
    assert s.next_n(before[0] - timedelta(microseconds=1), 3) == before  # same slots both ways


# -- jitter -----------------------------------------------------------------------------------


def test_jitter_is_deterministic_and_in_range() -> None:
    slot = utc(2025, 3, 30, 1, 30)
    values = {jitter_offset_s("sched-1", slot, 300) for _ in range(5)}
    assert len(values) == 1
    slots = [slot + timedelta(minutes=15 * i) for i in range(200)]
    offsets = [jitter_offset_s("sched-1", x, 300) for x in slots]
    assert all(0 <= o <= 300 for o in offsets)
    assert len(set(offsets)) > 150  # differs across slots (most of the time)
    assert [jitter_offset_s("sched-2", x, 300) for x in slots] != offsets
    assert {jitter_offset_s("s", x, 1) for x in slots} == {0, 1}  # inclusive upper bound


def test_jitter_matches_documented_derivation() -> None:
    import hashlib

    slot = utc(2025, 1, 1, 6)
    digest = hashlib.sha256(f"abc|{slot.isoformat()}".encode()).digest()
    assert jitter_offset_s("abc", slot, 600) == int.from_bytes(digest[:8], "big") % 601
    # The same instant expressed in another zone gives the same offset.
    assert jitter_offset_s("abc", slot.astimezone(ZoneInfo("Asia/Kolkata")), 600) == jitter_offset_s(
        "abc", slot, 600
    )


def test_jitter_zero_or_negative() -> None:
    slot = utc(2025, 1, 1)
    assert jitter_offset_s("x", slot, 0) == 0
    assert jitter_offset_s("x", slot, -5) == 0


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "timezone_name", "fragment"),
    [
        ("not a cron", "UTC", "exactly 5 are required"),
        ("61 * * * *", "UTC", "invalid cron expression '61 * * * *'"),
        ("*/0 * * * *", "UTC", "invalid cron expression"),
        ("0 0 1 * * *", "UTC", "has 6 fields"),
        ("0 0 1 1 * 2025 0", "UTC", "has 7 fields"),
        ("", "UTC", "cron expression is empty"),
        ("0 0 30 2 *", "UTC", "never fires"),
        ("R * * * *", "UTC", "random"),
        ("* * * * *", "Mars/Olympus_Mons", "unknown timezone 'Mars/Olympus_Mons'"),
        ("* * * * *", "America", "unknown timezone 'America'"),
        ("* * * * *", "../etc/passwd", "unknown timezone"),
        ("* * * * *", "", "timezone is empty"),
        ("* * * * *", "localtime", "unknown timezone 'localtime'"),
    ],
)
def test_parse_errors_name_the_problem(expression: str, timezone_name: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        CronSchedule.parse(expression, timezone_name)
    assert fragment in str(info.value)


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ValueError, match="unknown timezone"):
        CronSchedule("* * * * *", "Nope/Nowhere")


def test_month_and_day_names_are_not_mistaken_for_random_fields() -> None:
    s = CronSchedule.parse("0 12 * MAR,APR THU,FRI", "UTC")
    assert s.next_after(utc(2025, 1, 1)) == utc(2025, 3, 6, 12)


def test_naive_datetimes_are_refused() -> None:
    s = CronSchedule.parse("* * * * *", "UTC")
    with pytest.raises(ValueError, match="timezone-aware"):
        s.next_after(datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="not_before must be timezone-aware"):
        s.latest_at_or_before(utc(2025, 1, 1), not_before=datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="must be >= 0"):
        s.next_n(utc(2025, 1, 1), -1)
    with pytest.raises(ValueError, match="must be >= 0"):
        s.latest_at_or_before(utc(2025, 1, 1), limit=-1)
