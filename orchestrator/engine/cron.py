"""Cron schedule slots in an IANA timezone, with an explicit policy for DST changes.

Pure computation: no database, no I/O beyond loading timezone data. Every datetime taken in
must be timezone-aware; every datetime given back is in UTC (`datetime.UTC`).

Expressions
-----------
Standard 5-field cron (minute hour day-of-month month day-of-week, plus croniter's aliases
such as `@daily` and extensions such as `L` and `1#2`; day-of-month and day-of-week are OR-ed
as in classic cron). Rejected with `ValueError`: anything `croniter.is_valid` rejects, an
expression that never fires (`0 0 30 2 *`), 6/7-field forms (seconds, years), and croniter's
random `R` fields, which would make the schedule change every time it is parsed. The timezone
must be an IANA key `zoneinfo.ZoneInfo` can load (`localtime` and `posixrules` are refused:
they depend on the host).

DST policy
----------
The cron fields are matched against LOCAL wall-clock time in the schedule's timezone. Each
matching naive wall-clock time `n` is turned into an instant by

    n.replace(tzinfo=zone, fold=0).astimezone(UTC)

and the schedule's slots are the SET of those instants: distinct, in increasing order. So:

* A wall-clock time that does not exist (spring forward) is read with the offset in force
  before the change, i.e. it fires one gap-length later in wall-clock terms, still once that
  day. `30 2 * * *` in Europe/Berlin on 2025-03-30 fires at 01:30Z (= 03:30 CEST); in
  America/New_York on 2025-03-09 at 07:30Z (= 03:30 EDT).
* A wall-clock time that occurs twice (fall back) fires ONCE, at its first occurrence (the
  summer offset). `30 1 * * *` in America/New_York on 2025-11-02 fires at 05:30Z (01:30 EDT)
  only; `30 2 * * *` in Europe/Berlin on 2025-10-26 at 00:30Z (02:30 CEST) only.
* Two wall-clock times that map to the same instant give one slot. An hourly `30 * * * *`
  therefore has 23 slots on a spring-forward day in Berlin / New York (02:30 and 03:30 are the
  same instant) and 24 on a fall-back day (the repeated hour fires once, in its first pass).
* Slots are ordered by instant, not by wall-clock time. With a gap that is not a whole hour
  (Australia/Lord_Howe moves 02:00 -> 02:30) `*/20 * * * *` on 2025-10-05 gives 02:00 and
  02:20 (nonexistent, -> 15:30Z and 15:50Z) and 02:40 (-> 15:40Z): the slots are 15:30Z,
  15:40Z, 15:50Z, 16:00Z.

How it is computed
------------------
croniter only ever sees naive datetimes (it then does plain calendar arithmetic; its own
timezone handling is not used). Because the mapping above is not monotonic around a gap, the
walks do not stop at the first mapped instant past the target; they use bounds on the zone's
UTC offsets instead. With `lo`/`hi` the smallest/largest offset in force near a wall-clock time
(sampled hourly over a window of days around it, cached per zone and day; this assumes no
offset is ever in force for less than an hour), a naive `n` maps into `[n - hi, n - lo]`. A
forward walk from instant `t` therefore starts at wall-clock `t + lo` (nothing earlier can
map after `t`) and hands out a candidate once the walk has reached a `n` with `n - hi` >= the
candidate (nothing later can map before it); the backward walk mirrors this. The cost of a call
is the number of cron matches in the target's neighbourhood plus the DST spread, never the
length of the range: `latest_at_or_before` after a week-long outage of a per-minute schedule
walks back from the end and stops after `limit` slots (or at `not_before`).
"""

from __future__ import annotations

import hashlib
import heapq
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import islice
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

__all__ = ["CronSchedule", "expression_problem", "jitter_offset_s", "timezone_problem"]

_FIELD_NAMES = "minute hour day-of-month month day-of-week"
_RANDOM_FIELD = re.compile(r"(?<![A-Za-z])[Rr](?![A-Za-z])")
_HOST_DEPENDENT_ZONES = frozenset({"localtime", "posixrules"})

_DAY = timedelta(days=1)
_MINUTE = timedelta(minutes=1)
# `_offset_bounds(zone, day)` must cover every offset that can apply to a naive time within
# [day - 2 days, day + 3 days): such a time maps less than a day away (|offset| < 24h), and the
# offset used for a nonexistent time is the one in force before its gap (gap < 2 days).
_BOUNDS_BEFORE = timedelta(days=6)
_BOUNDS_AFTER = timedelta(days=5)
_BOUNDS_STEP = timedelta(hours=1)


@dataclass(frozen=True)
class CronSchedule:
    """A 5-field cron expression evaluated in an IANA timezone (see the module docstring)."""

    expression: str
    timezone: str
    _zone: ZoneInfo = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        _validate_expression(self.expression)
        object.__setattr__(self, "_zone", _load_zone(self.timezone))

    @classmethod
    def parse(cls, expression: str, timezone: str) -> CronSchedule:
        """Validate and build; whitespace in the expression is normalised.

        Raises ValueError naming the problem for a bad expression or an unknown timezone.
        """
        if not isinstance(expression, str):
            raise ValueError(f"cron expression must be a string, got {type(expression).__name__}")
        if not isinstance(timezone, str):
            raise ValueError(f"timezone must be a string, got {type(timezone).__name__}")
        return cls(" ".join(expression.split()), timezone.strip())

    @property
    def zone(self) -> ZoneInfo:
        return self._zone

    def next_after(self, instant: datetime) -> datetime:
        """The first slot strictly after `instant`."""
        for slot in self._forward(_utc_naive(instant, "instant")):
            return slot.replace(tzinfo=UTC)
        raise ValueError(f"cron {self.expression!r} has no slot after {instant.isoformat()}")

    def next_n(self, instant: datetime, n: int) -> list[datetime]:
        """The next `n` slots strictly after `instant`, ascending (n == 0 gives [])."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        start = _utc_naive(instant, "instant")
        return [slot.replace(tzinfo=UTC) for slot in islice(self._forward(start), n)]

    def latest_at_or_before(
        self, instant: datetime, not_before: datetime | None = None, limit: int = 1
    ) -> list[datetime]:
        """The most recent `limit` slots with not_before <= slot <= instant, ascending.

        Walks backwards from `instant`, so the cost does not grow with the distance to
        `not_before` (a long outage). Empty when no slot qualifies or limit == 0.
        """
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        end = _utc_naive(instant, "instant")
        floor = None if not_before is None else _utc_naive(not_before, "not_before")
        if limit == 0 or (floor is not None and floor > end):
            return []
        found = list(islice(self._backward(end, floor), limit))
        found.reverse()
        return [slot.replace(tzinfo=UTC) for slot in found]

    # -- internals: every datetime below is naive; "instants" are naive UTC -------------------

    def _instant(self, wall: datetime) -> datetime:
        """The policy's mapping of a naive local wall-clock time to a naive UTC instant."""
        offset = wall.replace(tzinfo=self._zone, fold=0).utcoffset()
        assert offset is not None  # a ZoneInfo always has an offset
        return wall - offset

    def _forward(self, after: datetime) -> Iterator[datetime]:
        """Slots strictly after `after`, ascending, without duplicates.

        Every naive n maps to an instant in [n - hi, n - lo] (bounds valid within 2 days of
        n; further away |offset| < 1 day gives the same conclusions), so:
        starting the walk at after + lo misses nothing that maps after `after`; and once the
        walk is at n, every later match maps strictly after n - hi, so pending candidates at
        or below that are final.
        """
        lo, _ = _offset_bounds(self._zone, _day(after))
        walk = croniter(self.expression, after + lo)
        pending: list[datetime] = []  # min-heap
        queued: set[datetime] = set()
        while True:
            try:
                wall: datetime = walk.get_next(datetime)
            except CroniterBadDateError:  # no further match within croniter's horizon
                break
            slot = self._instant(wall)
            if slot > after and slot not in queued:
                heapq.heappush(pending, slot)
                queued.add(slot)
            _, hi = _offset_bounds(self._zone, _day(wall))
            settled = wall - hi  # every later match maps strictly after this
            while pending and pending[0] <= settled:
                queued.discard(pending[0])
                yield heapq.heappop(pending)
        while pending:
            yield heapq.heappop(pending)

    def _backward(self, at: datetime, floor: datetime | None) -> Iterator[datetime]:
        """Slots in [floor, at], descending, without duplicates (mirror of `_forward`)."""
        _, hi = _offset_bounds(self._zone, _day(at))
        # Every match that maps at or before `at` is at or before wall-clock at + hi; matches
        # are whole minutes, and croniter's get_prev is strictly before its start.
        start = (at + hi).replace(second=0, microsecond=0) + _MINUTE
        walk = croniter(self.expression, start)
        pending: list[tuple[timedelta, datetime]] = []  # max-heap: keyed by _EPOCH - slot
        queued: set[datetime] = set()
        while True:
            try:
                wall: datetime = walk.get_prev(datetime)
            except CroniterBadDateError:  # no earlier match within croniter's horizon
                break
            slot = self._instant(wall)
            if slot <= at and (floor is None or slot >= floor) and slot not in queued:
                heapq.heappush(pending, (_EPOCH - slot, slot))
                queued.add(slot)
            lo, _ = _offset_bounds(self._zone, _day(wall))
            ceiling = wall - lo  # every later (earlier-in-time) match maps strictly before this
            while pending and pending[0][1] >= ceiling:
                queued.discard(pending[0][1])
                yield heapq.heappop(pending)[1]
            if floor is not None and ceiling <= floor:
                break
        while pending:
            yield heapq.heappop(pending)[1]


def jitter_offset_s(schedule_id: str, slot: datetime, jitter_s: int) -> int:
    """A deterministic offset in [0, jitter_s] seconds for one (schedule, slot); 0 if jitter_s <= 0.

    Derived from sha256 of f"{schedule_id}|{slot.isoformat()}" with the slot in UTC (as this
    module returns slots), so the same instant gives the same offset whatever zone it is in.
    """
    if jitter_s <= 0:
        return 0
    stamp = _utc_naive(slot, "slot").replace(tzinfo=UTC).isoformat()
    digest = hashlib.sha256(f"{schedule_id}|{stamp}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (jitter_s + 1)


# -- helpers ----------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1)
_PROBE_START = datetime(2000, 1, 1)


def _validate_expression(expression: str) -> None:
    if not isinstance(expression, str):
        raise ValueError(f"cron expression must be a string, got {type(expression).__name__}")
    if not expression.strip():
        raise ValueError("cron expression is empty")
    fields = expression.split()
    if not expression.strip().startswith("@") and len(fields) != 5:
        raise ValueError(
            f"cron expression {expression!r} has {len(fields)} fields; exactly 5 are required "
            f"({_FIELD_NAMES}); seconds and year fields are not supported"
        )
    if _RANDOM_FIELD.search(expression):
        raise ValueError(
            f"cron expression {expression!r} uses a random 'R' field, which is not deterministic"
        )
    if not croniter.is_valid(expression):
        detail = "not a valid cron expression"
        try:
            croniter(expression)
        except Exception as exc:  # croniter's own message is the most precise detail
            detail = str(exc)
        raise ValueError(f"invalid cron expression {expression!r}: {detail}")
    try:
        croniter(expression, _PROBE_START).get_next(datetime)
    except CroniterBadDateError:
        raise ValueError(
            f"cron expression {expression!r} never fires (no such date, e.g. February 30)"
        ) from None


# For the checks of a new schedule: (lowest, highest) value of each field, and the names
# croniter reads in the month and day-of-week fields. Day-of-week 7 is Sunday again, so a step
# there is measured against 0-6.
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12), ("day-of-week", 0, 6))
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_NAMES: dict[str, dict[str, int]] = {
    "month": {m: i for i, m in enumerate(_MONTHS, 1)},
    "day-of-week": {d: i for i, d in enumerate(_WEEKDAYS)},
}


def expression_problem(expression: str) -> str | None:
    """Why a NEW schedule must not use `expression`, or None when it may.

    Everything `CronSchedule.parse` refuses (including an expression that never fires, such as
    `0 0 31 2 *`), and two forms croniter accepts that are almost surely mistakes:
    a reversed range (croniter wraps it around, so `1-0 * * * *` fires every minute) and a step
    larger than the field's range (`*/1000000` matches only the field's first value).
    Only definitions being accepted are held to the last two; stored schedules keep firing.
    """
    if not isinstance(expression, str):
        return f"cron expression must be a string, got {type(expression).__name__}"
    normalised = " ".join(expression.split())
    try:
        _validate_expression(normalised)
    except ValueError as exc:
        return str(exc)
    if normalised.startswith("@"):
        return None
    for (name, low, high), text in zip(_FIELDS, normalised.split(), strict=True):
        for item in text.split(","):
            base, _, step = item.partition("/")
            if step.isascii() and step.isdigit() and (len(step) > 6 or int(step) > high - low):
                return (
                    f"cron expression {normalised!r}: the step /{step} in the {name} field is larger than "
                    f"the field's range ({low}-{high}), so it matches only the first value; write that value"
                )
            first, dash, last = base.partition("-")
            start, end = _field_value(first, name), _field_value(last, name)
            if dash and start is not None and end is not None and start > end:
                wrapped = ",".join(f"{a}-{b}" if a < b else f"{a}" for a, b in ((start, high), (low, end)))
                return (
                    f"cron expression {normalised!r}: the range {base} in the {name} field is reversed "
                    f"({start} > {end}); croniter would wrap it around. Write the values in order, "
                    f"e.g. {wrapped} if a wrap-around is meant"
                )
    return None


def _field_value(text: str, name: str) -> int | None:
    """The number a range end stands for (digits or a month/day name), or None (`L`, `*`, ...)."""
    if text.isascii() and text.isdigit():
        return int(text) if len(text) <= 6 else None
    return _NAMES.get(name, {}).get(text.lower())


def timezone_problem(timezone: str) -> str | None:
    """Why a schedule cannot use `timezone`, or None (the rule `CronSchedule.parse` applies)."""
    try:
        _load_zone(timezone)
    except ValueError as exc:
        return str(exc)
    return None


def _load_zone(timezone: str) -> ZoneInfo:
    if not isinstance(timezone, str):
        raise ValueError(f"timezone must be a string, got {type(timezone).__name__}")
    if not timezone:
        raise ValueError("timezone is empty; expected an IANA name such as 'Europe/Berlin'")
    if timezone in _HOST_DEPENDENT_ZONES:
        raise ValueError(f"unknown timezone {timezone!r}: host-dependent, not an IANA zone name")
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(
            f"unknown timezone {timezone!r}: expected an IANA name such as 'Europe/Berlin'"
        ) from exc


def _utc_naive(value: datetime, name: str) -> datetime:
    if not isinstance(value, datetime):
        raise ValueError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(UTC).replace(tzinfo=None)


def _day(value: datetime) -> int:
    return value.toordinal()


@lru_cache(maxsize=4096)
def _offset_bounds(zone: ZoneInfo, day: int) -> tuple[timedelta, timedelta]:
    """Smallest and largest UTC offset of `zone` in force near naive day `day`.

    Valid for any naive time in [day - 2 days, day + 3 days): sampled hourly over instants
    [day - 6 days, day + 5 days].
    """
    base = datetime.fromordinal(day).replace(tzinfo=UTC)
    instant = base - _BOUNDS_BEFORE
    last = base + _BOUNDS_AFTER
    offsets: set[timedelta] = set()
    while instant <= last:
        offset = instant.astimezone(zone).utcoffset()
        assert offset is not None
        offsets.add(offset)
        instant += _BOUNDS_STEP
    return min(offsets), max(offsets)
