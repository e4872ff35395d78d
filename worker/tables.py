"""Plain rich tables for the CLI's listings (``orders dlq list``, ``orders show``).

By default a listing fits the terminal (80 columns and up) with fewer
columns; ``--wide`` shows every column, nothing cut, and lets its lines run
past the terminal's width rather than fold (like ``ps ww``):
:func:`print_whole`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.segment import Segment, Segments
from rich.table import Table
from rich.text import Text


def plain_table(title: str | None = None) -> Table:
    """No borders: two spaces between columns, none at the edges, a rule under the header."""
    return Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True
    )


def cut(text: str, style: str = "") -> Text:
    """A cell kept to one line, cut with an ellipsis where its column is narrower."""
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


def seconds(at: Any) -> str:
    """An ISO time (or a datetime) as ``YYYY-MM-DD HH:MM:SS`` in UTC; ``-`` for none."""
    if at is None or at == "":
        return "-"
    when = at if isinstance(at, datetime) else datetime.fromisoformat(str(at))
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S")


def print_whole(console: Console, renderable: RenderableType) -> None:
    """Print ``renderable`` as wide as it needs, lines running past the terminal's width (never folded)."""
    width = max(console.width, Measurement.get(console, console.options.update_width(10**6), renderable).maximum)
    lines = console.render_lines(renderable, console.options.update_width(width), pad=False)
    console.print(Segments(segment for line in lines for segment in (*line, Segment.line())), crop=False, end="")
