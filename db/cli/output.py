"""Output of the query commands: Rich tables for people, JSON and CSV for scripts.

Machine formats are a contract (``docs/cli-json.md``): field names and order
are fixed by the caller, timestamps are ISO 8601 UTC with a ``Z``, nulls are
JSON ``null`` and empty CSV cells. Tables are for a person at a terminal:
local times, short values, and columns fitted to the terminal's width (80
columns must work) by dropping optional columns, then shortening values —
UIDs lose their middle, where they differ least.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

ELLIPSIS = "…"
GAP = 2  # characters between table columns (padding 1 on each side, collapsed)


class ListFormat(StrEnum):
    TABLE = "table"
    JSON = "json"
    CSV = "csv"


# --- values ---------------------------------------------------------------------------


def iso_utc(value: datetime | None) -> str | None:
    """``2026-05-01T12:03:04.123Z``: ISO 8601, UTC, milliseconds (the machine formats)."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def jsonable(value: Any) -> Any:
    """Plain JSON types: datetimes as :func:`iso_utc`, tuples as lists, mappings recursed."""
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def csv_cell(value: Any) -> str:
    """CSV text: empty for null, ``true``/``false``, ISO UTC timestamps, JSON for nested values."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return iso_utc(value) or ""
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(jsonable(value), sort_keys=True, ensure_ascii=False)
    return str(value)


def write_json(value: Any, out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    stream.write(json.dumps(jsonable(value), indent=2, ensure_ascii=False) + "\n")


def write_csv(
    fields: Sequence[str], rows: Sequence[Mapping[str, Any]], out: TextIO | None = None
) -> None:
    """A header line and one line per row, ``\\n``-terminated, quoted where needed."""
    writer = csv.writer(out or sys.stdout, lineterminator="\n")
    writer.writerow(fields)
    for row in rows:
        writer.writerow([csv_cell(row.get(name)) for name in fields])


def local_time(value: datetime | None, *, seconds: bool = False) -> str:
    """A timestamp in the terminal's time zone, for tables."""
    if value is None:
        return "-"
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def short_time(value: datetime | None, now: datetime | None = None) -> str:
    """Like ``ls -l``: ``MM-DD HH:MM`` within the current year, else ``YYYY-MM-DD`` (11 chars)."""
    if value is None:
        return "-"
    local = value.astimezone()
    current = (now or datetime.now(UTC)).astimezone()
    if local.year == current.year:
        return local.strftime("%m-%d %H:%M")
    return local.strftime("%Y-%m-%d")


def percent(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.1f}%" if value < 0.9995 else "100%"


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def middle_ellipsis(text: str, width: int) -> str:
    """``1.2.826.0.1…498.12345``: keep both ends (a UID's root and its unique tail)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    keep = width - 1
    head = keep // 2
    tail = keep - head
    return text[:head] + ELLIPSIS + text[len(text) - tail :]


def distinct_middle(values: Sequence[str], width: int) -> list[str]:
    """``values`` shortened to ``width`` so that different values stay different.

    First :func:`middle_ellipsis` (root and tail); when that makes two different values
    look alike (UIDs of one scanner share their root, and often their last digits), the
    tail alone, then a window starting where the values start to differ. Values that
    cannot be told apart in ``width`` characters keep the middle form.
    """
    distinct = set(values)
    if width <= 2 or all(len(v) <= width for v in distinct):
        return [middle_ellipsis(v, width) for v in values]

    def tail(text: str) -> str:
        return text if len(text) <= width else ELLIPSIS + text[len(text) - width + 1 :]

    common = len(os.path.commonprefix(list(distinct)))

    def window(text: str) -> str:
        if len(text) <= width:
            return text
        start = min(common, len(text) - width + 1)
        if start <= 0:
            return end_ellipsis(text, width)
        return end_ellipsis(ELLIPSIS + text[start:], width)

    for shorten in (lambda v: middle_ellipsis(v, width), tail, window):
        if len({shorten(v) for v in distinct}) == len(distinct):
            return [shorten(v) for v in values]
    return [middle_ellipsis(v, width) for v in values]


def end_ellipsis(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    return text[: width - 1] + ELLIPSIS


# --- fitted tables --------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One table column.

    ``flex`` columns take the width left over (at least ``min_width``);
    others take their content's width up to ``max_width`` and shrink to
    ``min_width`` when needed. ``drop`` (1 first) marks optional columns,
    removed when even the minimum widths do not fit.
    """

    header: str
    cell: Callable[[Any], str]
    min_width: int = 4
    max_width: int = 40
    flex: bool = False
    middle: bool = False  # shorten in the middle (UIDs) instead of at the end
    justify: str = "left"
    drop: int | None = None
    grow: int = 0  # flex columns with a higher ``grow`` get spare width first


def fit_widths(columns: Sequence[Column], cells: Sequence[Sequence[str]], width: int) -> list[int]:
    """Widths for ``columns`` (0 = dropped) so the table fits ``width`` characters."""
    natural = []
    for index, column in enumerate(columns):
        longest = max([len(column.header), *(len(row[index]) for row in cells)])
        natural.append(max(min(longest, column.max_width), min(column.min_width, longest)))
    widths = list(natural)
    active = [True] * len(columns)

    def fixed_total() -> int:
        count = sum(active)
        total = GAP * (count - 1)
        for i, column in enumerate(columns):
            if active[i]:
                total += min(widths[i], column.min_width) if column.flex else widths[i]
        return total

    droppable = sorted(
        (c.drop, i) for i, c in enumerate(columns) if c.drop is not None
    )
    while fixed_total() > width:
        if droppable:
            active[droppable.pop(0)[1]] = False
            continue
        shrinkable = [
            i for i, c in enumerate(columns) if active[i] and not c.flex and widths[i] > c.min_width
        ]
        if not shrinkable:
            break  # narrower than the minimum: Rich crops what is left
        widest = max(shrinkable, key=lambda i: widths[i] - columns[i].min_width)
        widths[widest] -= 1

    spare = width - fixed_total()
    for i, column in sorted(enumerate(columns), key=lambda item: -item[1].grow):
        if active[i] and column.flex:
            base = min(widths[i], column.min_width)
            extra = max(0, min(natural[i] - base, spare))
            widths[i] = base + extra
            spare -= extra
    return [w if active[i] else 0 for i, w in enumerate(widths)]


def fitted_table(
    console: Console, columns: Sequence[Column], rows: Sequence[Any], title: str | None = None
) -> Table:
    """A Rich table of ``rows`` whose columns fit ``console.width``."""
    cells = [[column.cell(row) for column in columns] for row in rows]
    widths = fit_widths(columns, cells, console.width)
    table = Table(
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
        header_style="bold",
        title=title,
        title_justify="left",
    )
    kept = [i for i, w in enumerate(widths) if w > 0]
    for i in kept:
        column = columns[i]
        table.add_column(
            column.header,
            width=widths[i],
            no_wrap=True,
            overflow="ellipsis",
            justify=column.justify,  # type: ignore[arg-type]
        )
    shown = {
        i: distinct_middle([row[i] for row in cells], widths[i])
        for i in kept
        if columns[i].middle
    }
    for r, row in enumerate(cells):
        table.add_row(
            *(
                Text(shown[i][r] if i in shown else end_ellipsis(row[i], widths[i]))
                for i in kept
            )
        )
    return table


def make_console(out: TextIO | None = None) -> Console:
    """A console for one command: reads ``COLUMNS`` now, so tests and pipes get 80 columns.

    Markup in data (``[...]`` in a series description) is never interpreted:
    callers pass data as :class:`rich.text.Text`, never as markup strings.
    """
    return Console(file=out, highlight=False, soft_wrap=False)
