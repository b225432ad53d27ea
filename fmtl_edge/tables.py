"""Tables that fit the console by rule, never by cutting a cell: :class:`FitTable`.

A rich :class:`~rich.table.Table` narrower than its content shrinks its columns and cuts cells
(``mas-2-worst-sc…``, ``0.2…``); at 80 columns — a pipe, a log file, a small terminal — that made
method names and figures unreadable. A :class:`FitTable` instead measures its natural width when it
is printed and, when that is wider than the console, splits its columns into parts: each part
repeats the leading ``keep`` columns (the method, or the task) and takes as many of the other
columns, in order, as fit; the title of a later part says ``(continued)`` and the caption follows
the last part as text. No cell wraps or is cut (a single column wider than the console is the only thing
folded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Col:
    """One column: its header, ``justify`` (``left`` | ``right`` | ``center``), an optional style,
    and ``wrap``: free text (a reason, a path) that may wrap at spaces when its column alone is
    wider than the console (other cells never wrap)."""

    header: str
    justify: str = "right"
    style: str | None = None
    wrap: bool = False


class FitTable:
    """A table whose columns are split into parts that fit the console width (see the module docstring).

    Args:
        title: the table's title (later parts: ``<title> (continued)``).
        columns: every column, the ``keep`` leading ones first.
        keep: leading columns repeated in every part (at least 1).
        caption: printed under the last part (None: none).
    """

    def __init__(self, title: str, columns: Sequence[Col], keep: int = 1, caption: str | None = None):
        if not 1 <= keep <= len(columns):
            raise ValueError(f"keep must be in 1..{len(columns)}, got {keep}")
        self.title = title
        self.columns = list(columns)
        self.keep = keep
        self.caption = caption
        self.rows: list[list[Any]] = []

    def add_row(self, *cells: Any) -> None:
        """Add a row (str or :class:`rich.text.Text` cells, one per column).

        Raises:
            ValueError: not one cell per column.
        """
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: a row has {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))

    def _table(self, cols: Sequence[int], title: str | None, caption: str | None):
        from rich.table import Table

        t = Table(title=title, caption=caption)
        for i in cols:
            c = self.columns[i]
            t.add_column(c.header, justify=c.justify, style=c.style, no_wrap=not c.wrap,
                         overflow="fold")  # a column alone wider than the console folds, never "…"
        for r in self.rows:
            t.add_row(*[r[i] for i in cols])
        return t

    def _width(self, console, options, cols: Sequence[int]) -> int:
        return console.measure(self._table(cols, None, None), options=options.update_width(1 << 16)).maximum

    def parts(self, console, options) -> list[list[int]]:
        """The column indices of each part at ``options.max_width`` (one part when all fit)."""
        width = options.max_width
        head = list(range(self.keep))
        rest = list(range(self.keep, len(self.columns)))
        if self._width(console, options, head + rest) <= width:
            return [head + rest]
        parts: list[list[int]] = []
        cur: list[int] = []
        for i in rest:
            if cur and self._width(console, options, head + cur + [i]) > width:
                parts.append(head + cur)
                cur = []
            cur.append(i)
        parts.append(head + cur)
        return parts

    def tables(self, console, options) -> list:
        """What to print at ``options.max_width``: the rich Tables of the parts; when there are
        several, the caption follows them as text the console's width (not squeezed under the last,
        narrower, part)."""
        parts = self.parts(console, options)
        if len(parts) == 1:
            return [self._table(parts[0], self.title, self.caption)]
        out: list = [self._table(cols, self.title if k == 0 else f"{self.title} (continued)", None)
                     for k, cols in enumerate(parts)]
        if self.caption:
            from rich.text import Text

            out.append(Text(self.caption, style="table.caption"))
        return out

    def __rich_console__(self, console, options):
        yield from self.tables(console, options)

    def __rich_measure__(self, console, options):
        from rich.measure import Measurement

        widths = [self._width(console, options, cols) for cols in self.parts(console, options)]
        return Measurement(min(widths), max(widths))
