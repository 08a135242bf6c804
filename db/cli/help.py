"""How ``--help`` looks: no type shown for on/off flags, descriptions given room.

Typer's Rich help prints a type column for every option; a flag (``--help``,
``--resume``, ``--export-delivery/--no-export-delivery``) has no value, yet shows
``<bool>``, and that column plus a long ``--no-…`` form left ``ctdx worker --help``
a narrow column for the descriptions at 80 characters. :func:`tidy_help` removes
the type of flags and lets the descriptions take the room they need.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from typer import rich_utils
from typer.core import TyperOption

_done = False


def tidy_help() -> None:
    """Patch Typer's help rendering once per process (idempotent)."""
    global _done
    if _done:
        return
    original = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        if self.is_flag or self.count:
            return None  # a flag takes no value: no type to show
        shown: str | None = original(self, ctx)
        return shown

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]
    rich_utils.Table = _HelpTable  # type: ignore[attr-defined]
    _done = True


class _HelpTable(Table):
    """Typer's option and command tables, with the description (last) column taking all
    most of the width the others leave, option names kept on one line, and a flag's
    ``--no-…`` form under the flag.

    Without it Rich shares the width out in proportion to the content, and the
    descriptions of ``ctdx worker --help`` got 16 of 80 columns.
    """

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        cells = list(renderables)
        if len(cells) in (6, 7):  # an options row: [required,] long, short, --no-long, ...
            at = len(cells) - 6
            long, negative = cells[at], cells[at + 2]
            if isinstance(long, Text) and isinstance(negative, Text) and negative.plain:
                # the --no- form under its option, not in a column of its own
                cells[at] = Text.assemble(long, "\n", negative)
                cells[at + 2] = Text("")
        super().add_row(*cells, **kwargs)  # the first row creates the columns
        if len(self.rows) == 1 and not self.show_header and len(self.columns) >= 2:
            for column in self.columns[:-2]:  # option names; types and help may wrap
                column.no_wrap = True
            self.columns[-2].max_width = 16  # '<float range> [0.0<=x<=1.0]' wraps
            self.columns[-1].ratio = 3
