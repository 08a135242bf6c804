"""Units under the CLI: --since/--until parsing in a fixed time zone, and fitted tables."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from rich.console import Console

from ctdx.db.cli.dates import BadDate, Bound, parse_instant, parse_period
from ctdx.db.cli.output import (
    Column,
    csv_cell,
    fit_widths,
    fitted_table,
    iso_utc,
    middle_ellipsis,
    percent,
)

NOW = datetime(2026, 3, 29, 15, 30, tzinfo=UTC)  # Berlin: 17:30 CEST, the day clocks go forward


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.usefixtures("berlin")
@pytest.mark.parametrize(
    ("text", "bound", "expected"),
    [
        ("today", Bound.START, utc(2026, 3, 28, 23)),  # local midnight, CET
        ("today", Bound.END, utc(2026, 3, 29, 22)),  # next midnight, CEST: a 23-hour day
        ("yesterday", Bound.START, utc(2026, 3, 27, 23)),
        ("yesterday", Bound.END, utc(2026, 3, 28, 23)),
        ("now", Bound.START, NOW),
        ("24h", Bound.START, NOW - timedelta(hours=24)),
        ("7d", Bound.START, NOW - timedelta(days=7)),
        ("30m", Bound.END, NOW - timedelta(minutes=30)),
        ("2w", Bound.START, NOW - timedelta(weeks=2)),
        ("2026-05-01", Bound.START, utc(2026, 4, 30, 22)),
        ("2026-05-01", Bound.END, utc(2026, 5, 1, 22)),
        ("2026-05-01T08:00", Bound.START, utc(2026, 5, 1, 6)),
        ("2026-05-01 08:00:30", Bound.END, utc(2026, 5, 1, 6, 0, 30)),
        ("2026-05-01T08:00Z", Bound.START, utc(2026, 5, 1, 8)),
        ("2026-05-01T08:00+05:00", Bound.START, utc(2026, 5, 1, 3)),
        (" TODAY ", Bound.START, utc(2026, 3, 28, 23)),
    ],
)
def test_accepted_forms(text: str, bound: Bound, expected: datetime) -> None:
    assert parse_instant(text, bound, now=NOW) == expected


@pytest.mark.parametrize(
    "text", ["2026-13-01", "2026-02-30", "2026-5-1x", "tomorrow-ish", "7x", "", "12:00:99"]
)
def test_rejected_forms_name_the_accepted_ones(text: str) -> None:
    with pytest.raises(BadDate) as info:
        parse_instant(text, Bound.START, now=NOW)
    assert "YYYY-MM-DD" in str(info.value) and "24h" in str(info.value)


def test_period_order() -> None:
    assert parse_period(None, None) == (None, None)
    start, end = parse_period("2026-05-01T00:00Z", "2026-05-02T00:00Z")
    assert start == utc(2026, 5, 1) and end == utc(2026, 5, 2)
    with pytest.raises(BadDate, match="must be before"):
        parse_period("2026-05-02T00:00Z", "2026-05-01T00:00Z")


def test_values_for_machines_and_people() -> None:
    assert iso_utc(datetime(2026, 5, 1, 14, 3, 4, 123456, tzinfo=UTC)) == "2026-05-01T14:03:04.123Z"
    assert iso_utc(None) is None
    assert csv_cell(None) == "" and csv_cell(True) == "true" and csv_cell(0.5) == "0.5"
    assert csv_cell({"b": 1, "a": 2}) == '{"a": 2, "b": 1}'
    assert percent(0.05) == "5.0%" and percent(1.0) == "100%" and percent(None) == "-"
    uid = "1.2.826.0.1.3680043.8.498.86211543673339597347172172205005718201"
    short = middle_ellipsis(uid, 17)
    assert len(short) == 17 and short.startswith("1.2.826.") and short.endswith("05718201")
    assert middle_ellipsis("1.2.3", 17) == "1.2.3"


def test_fit_drops_optional_columns_then_shrinks_never_past_the_width() -> None:
    columns = [
        Column("A", str, min_width=10, max_width=10),
        Column("UID", str, min_width=12, max_width=64, flex=True, middle=True),
        Column("Opt", str, min_width=10, max_width=20, drop=1),
        Column("Text", str, min_width=5, max_width=30),
    ]
    rows = [["a" * 10, "u" * 64, "o" * 20, "t" * 30]]
    wide = fit_widths(columns, rows, 200)
    assert wide == [10, 64, 20, 30]
    assert fit_widths(columns, rows, 78) == [10, 12, 20, 30]  # minimum UID, all fit
    narrow = fit_widths(columns, rows, 70)  # 10 + 12 + 20 + 30 + 6 > 70: Opt goes
    assert narrow == [10, 26, 0, 30]  # and the UID takes what is left
    tight = fit_widths(columns, rows, 32)  # then Text shrinks towards its minimum
    assert tight == [10, 12, 0, 6]  # 10 + 12 + 6 + 2 gaps of 2 = 32

    console = Console(width=40, file=None, record=True)
    table = fitted_table(console, columns, [["x" * 10, "1.2.840.99999.1.2.3.4.5.6.7", "o", "[b]t"]])
    with console.capture() as captured:
        console.print(table)
    lines = captured.get().splitlines()
    assert max(len(line) for line in lines) <= 40
    assert "[b]t" in lines[-1]  # data is never read as Rich markup
