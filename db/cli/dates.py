"""``--since`` / ``--until`` values: ISO dates and datetimes, ``24h``/``7d``, ``today``.

People think in local days ("what came in today"), the database stores UTC:
values without an offset are local time, and everything is returned as an
aware UTC datetime. A whole day given to ``--until`` includes that day, so
``--since yesterday --until yesterday`` is yesterday.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from enum import Enum

_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")

ACCEPTED = (
    "YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS] (local time unless it ends in Z or ±HH:MM), "
    "a span back from now (30m, 24h, 7d, 2w), today, yesterday or now"
)


class BadDate(ValueError):
    """A ``--since``/``--until`` value that is none of the accepted forms."""


class Bound(Enum):
    """Which end of a period a value is: a whole day is its start or its end."""

    START = "start"
    END = "end"


def _local_midnight(day: date) -> datetime:
    return datetime.combine(day, time()).astimezone().astimezone(UTC)


def _day_bound(day: date, bound: Bound) -> datetime:
    return _local_midnight(day + timedelta(days=1) if bound is Bound.END else day)


def parse_instant(text: str, bound: Bound, now: datetime | None = None) -> datetime:
    """Parse one bound of a period into an aware UTC datetime.

    Raises :class:`BadDate` naming the accepted forms.
    """
    value = text.strip().lower()
    now = (now or datetime.now(UTC)).astimezone(UTC)
    today = now.astimezone().date()
    if value == "now":
        return now
    if value == "today":
        return _day_bound(today, bound)
    if value == "yesterday":
        return _day_bound(today - timedelta(days=1), bound)
    relative = _RELATIVE.match(value)
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2)
        return now - timedelta(**{_UNITS[unit]: amount})
    if _DATE_ONLY.match(value):
        try:
            return _day_bound(date.fromisoformat(value), bound)
        except ValueError as exc:
            raise BadDate(f"{text!r} is not a valid date ({exc}); use {ACCEPTED}") from None
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        reason = str(exc) if not str(exc).startswith("Invalid isoformat") else "unrecognised form"
        raise BadDate(f"{text!r} is not a date or time ({reason}); use {ACCEPTED}") from None
    if parsed.tzinfo is None:
        parsed = parsed.astimezone()  # naive = local time
    return parsed.astimezone(UTC)


def parse_period(
    since: str | None, until: str | None, now: datetime | None = None
) -> tuple[datetime | None, datetime | None]:
    """Both bounds of a period; ``since`` must come before ``until``."""
    start = parse_instant(since, Bound.START, now) if since else None
    end = parse_instant(until, Bound.END, now) if until else None
    if start is not None and end is not None and start >= end:
        raise BadDate(f"--since ({since}) must be before --until ({until})")
    return start, end
