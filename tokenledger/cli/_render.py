"""How the ``tokenledger`` command prints: cells (dollars, counts, tokens, times,
statuses), JSON for scripts, and tables that fit the terminal.

Tables are laid out here (`fit_table`) and printed by rich on a terminal; on a pipe they
are written without importing rich, character for character as rich would (see
`Table.plain_text`): importing rich costs a piped ``tokenledger report`` a sixth of its
start-up. Cells are rich markup; `escape` makes recorded text (agent names, tags, error
types) literal in it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import click

from tokenledger._money import usd_text
from tokenledger.cli._options import EMPTY

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table as RichTable

__all__ = [
    "NOT_APPLICABLE",
    "PIPE_WIDTH",
    "RICH_TERMINAL_ENV",
    "Column",
    "Table",
    "count_text",
    "decimal_text",
    "escape",
    "fit_table",
    "json_default",
    "make_console",
    "money",
    "percent",
    "plain",
    "print_json",
    "print_rows",
    "rich_table",
    "say",
    "show_table",
    "status_text",
    "tokens_text",
    "when",
    "wrap_plain",
]

#: How a cell shows an amount that has no value, such as the cost per success of no success.
NOT_APPLICABLE = "[dim]n/a[/]"
# A call without a price has no cost: saying $0 would understate what was spent.
_UNPRICED = "[yellow]unpriced[/]"

# --------------------------------------------------------------------------- output

# Piped output is read by tools and people with wide terminals: do not cut it at
# rich's default of 80 columns.
PIPE_WIDTH = 200
# What makes rich colour or measure a pipe as it would a terminal.
RICH_TERMINAL_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")


def make_console() -> Console:
    from rich.console import Console

    width = None if sys.stdout.isatty() else PIPE_WIDTH
    return Console(file=sys.stdout, width=width, highlight=False)


def show_table(build: Callable[[int], Table], *, rich_only: bool = False) -> None:
    """Print the table ``build(width)`` lays out for stdout's width.

    On a pipe, rich prints plain characters, so they are written here without importing
    rich (see `Table.plain_text`); a terminal gets rich's colours. ``rich_only`` leaves
    a pipe to rich too, as the outcome and economics tables have always been printed.
    """
    piped = not rich_only and not sys.stdout.isatty() and sys.platform != "win32"
    encoding = (getattr(sys.stdout, "encoding", None) or "utf-8").lower()
    if piped and encoding.startswith("utf") and not set(RICH_TERMINAL_ENV) & set(os.environ):
        table = build(PIPE_WIDTH)
        text = table.plain_text(PIPE_WIDTH)
        if text is not None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        make_console().print(table)
        return
    console = make_console()
    console.print(build(console.width))


def say(message: str, *, err: bool = False) -> None:
    click.echo(message, err=err)


def json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        # Exact, as a string: JSON numbers are floats to most readers.
        return decimal_text(value)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    raise TypeError(f"Cannot encode {type(value).__name__} as JSON")


def print_json(data: Sequence[Any] | dict[str, Any]) -> None:
    """Rows (dataclasses or dicts) as a JSON array, or one dict as an object."""
    if not isinstance(data, dict):
        data = [row if isinstance(row, dict) else dataclasses.asdict(row) for row in data]
    click.echo(json.dumps(data, default=json_default, indent=2, ensure_ascii=False))


def print_rows(
    read: tuple[Sequence[Any], bool],
    *,
    as_json: bool,
    table: Callable[..., Table],
    no_match: str,
    rich_only: bool = False,
) -> None:
    """What a listing command prints for ``read``, its rows and whether the ledger holds
    nothing at all: the rows as JSON or as the table ``table(rows, width=...)`` lays
    out, or a sentence when there are none (``no_match``, unless the ledger is empty).
    ``rich_only``: see `show_table`."""
    rows, empty = read
    if as_json:
        print_json(rows)
    elif rows:
        show_table(lambda width: table(rows, width=width), rich_only=rich_only)
    else:
        say(EMPTY if empty else no_match)


# ----------------------------------------------------------------------------- cells


def money(value: Decimal | None, *, missing: str = _UNPRICED) -> str:
    """Dollars for a table cell or a line of rich markup (see `usd_text`'s table style);
    None reads as ``missing``, by default as unpriced."""
    return usd_text(value, missing=missing)


def percent(rate: Decimal) -> str:
    return f"{rate * 100:.1f} %"


def decimal_text(value: Decimal) -> str:
    """An exact Decimal as plain digits, without trailing zeros: 0.0012, 12, 0."""
    return format(value.normalize(), "f") if value else "0"


def count_text(value: int) -> str:
    return f"{value:,}" if value else "[dim]0[/]"


def tokens_text(value: int) -> str:
    """A token count for a table: exact below 100,000, then 105k, 1.2M, 3.4B.

    Exact figures are one ``--json`` away; the table has to fit an 80-column terminal.
    """
    if value < 100_000:
        return count_text(value)
    for divisor, suffix in ((1_000_000_000, "B"), (1_000_000, "M")):
        if value >= divisor:
            return f"{value / divisor:,.1f}{suffix}"
    return f"{value / 1000:,.0f}k"


_ESCAPE = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")


def escape(text: str) -> str:
    """``text`` as literal rich markup: rich.markup.escape, without importing rich."""

    def escape_backslashes(match: re.Match[str]) -> str:
        backslashes, tag = match.groups()
        return f"{backslashes}{backslashes}\\{tag}"

    text = _ESCAPE.sub(escape_backslashes, text)
    if text.endswith("\\") and not text.endswith("\\\\"):
        return text + "\\"
    return text


def when(value: dt.datetime | None, *, now: dt.datetime | None = None) -> str:
    """Local time, as short as is unambiguous: 14:03:07 today, Nov 21 09:15, 2024-12-31."""
    if value is None:
        return ""
    local = value.astimezone()
    today = (now or dt.datetime.now().astimezone()).date()
    if local.date() == today:
        return local.strftime("%H:%M:%S")
    if local.year == today.year:
        return local.strftime("%b %d %H:%M")
    return local.strftime("%Y-%m-%d")


_STATUS_STYLE = {"ok": "green", "error": "red", "budget_exceeded": "yellow", "running": "blue"}


def status_text(value: str) -> str:
    return f"[{_STATUS_STYLE.get(value, 'yellow')}]{escape(value)}[/]"


# ---------------------------------------------------------------------------- tables


@dataclasses.dataclass
class Column:
    """One table column. ``drop``: 0 always shown, else dropped (highest first) when
    the terminal is too narrow. ``name``: left-aligned text that rich may shorten."""

    header: str
    cells: list[str]
    total: str = ""
    drop: int = 0
    name: bool = False
    left: bool = False
    style: str | None = None


def fit_table(
    columns: list[Column],
    *,
    width: int,
    title: str | None = None,
    caption: str | None = None,
    with_total: bool = False,
) -> Table:
    """A table that fits ``width``: optional columns go first, then long names are cut.

    Rich alone would squeeze every column, numbers included, into ellipses.
    """
    simple = all(plain(cell) is not None for c in columns for cell in (c.header, *c.cells, c.total))

    sizes: dict[str, int] = {}  # the loops below measure each cell many times

    def cell_len(cell: str) -> int:
        if cell not in sizes:
            if simple:
                sizes[cell] = len(plain(cell) or "")
            else:
                from rich.text import Text

                sizes[cell] = Text.from_markup(cell).cell_len
        return sizes[cell]

    def needed(column: Column) -> int:
        cells = [column.header, *column.cells, column.total if with_total else ""]
        return max(cell_len(cell) for cell in cells)

    def overflow() -> int:
        return sum(needed(c) for c in shown) + 2 * (len(shown) - 1) - width

    shown = list(columns)
    while overflow() > 0 and any(c.drop for c in shown):
        shown.remove(max(reversed([c for c in shown if c.drop]), key=lambda c: c.drop))
    # Still too wide: shorten the longest names (with an ellipsis), never the figures.
    limits = {id(c): needed(c) for c in shown if c.name}
    excess = overflow()
    while excess > 0 and limits and max(limits.values()) > 8:
        longest = max(limits, key=lambda key: limits[key])
        limits[longest] -= 1
        excess -= 1
    hidden = [c.header for c in columns if c not in shown]
    notes = [caption] if caption else []
    if hidden:
        notes.append(f"Not shown, to fit the terminal: {', '.join(hidden)} (or use --json).")
    return Table(
        columns=shown,
        max_widths=[limits.get(id(column)) for column in shown],
        title=title,
        caption="\n".join(notes) or None,
        with_total=with_total,
        simple=simple,
    )


def rich_table(*, title: str | None, caption: str | None, **options: Any) -> RichTable:
    """An empty rich table in the style of every table the command prints: no vertical
    rules (columns are told apart by alignment), title and caption on the left."""
    from rich import box
    from rich.table import Table as RichTable

    return RichTable(
        title=title,
        caption=caption,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        title_justify="left",
        title_style="bold",
        caption_justify="left",
        caption_style="dim",
        header_style="bold cyan",
        **options,
    )


@dataclasses.dataclass
class Table:
    """A table laid out by `fit_table`, printed by rich (``__rich__``) or, on a pipe, as
    the same characters without loading rich (`plain_text`)."""

    columns: list[Column]
    max_widths: list[int | None]
    title: str | None
    caption: str | None
    with_total: bool
    # Every cell is plain by `plain`, so `plain_text` can print what rich would.
    simple: bool

    def __rich__(self) -> RichTable:
        # A 2-space gap between columns: reports must fit an 80-column terminal.
        table = rich_table(title=self.title, caption=self.caption, padding=(0, 1, 0, 0))
        for column, max_width in zip(self.columns, self.max_widths, strict=True):
            table.add_column(
                column.header,
                justify="left" if column.name or column.left else "right",
                no_wrap=True,
                overflow="ellipsis",
                max_width=max_width,
                style=column.style,
            )
        for row in zip(*(column.cells for column in self.columns), strict=True):
            table.add_row(*row)
        if self.with_total:
            table.add_section()
            table.add_row(*(column.total for column in self.columns))
        return table

    def plain_text(self, width: int) -> str | None:
        """The lines rich prints for this table on a console without colours, ``width``
        wide; None when only rich can tell (wide characters, a table wider than that).

        Importing rich costs a piped ``tokenledger report`` a sixth of its start-up.
        tests/cli/test_cli.py checks this against rich, table by table.
        """
        if not self.simple or not self.columns:
            return None
        rows = [[column.header for column in self.columns]]
        rows += [list(row) for row in zip(*(c.cells for c in self.columns), strict=True)]
        if self.with_total:
            rows.append([column.total for column in self.columns])
        texts = [[plain(cell) or "" for cell in row] for row in rows]
        widths = [max(len(row[i]) for row in texts) for i in range(len(self.columns))]
        widths = [
            max(1, size if limit is None else min(size, limit))
            for size, limit in zip(widths, self.max_widths, strict=True)
        ]
        total = sum(widths) + 2 * (len(widths) - 1)
        if total > width:
            return None  # rich would squeeze the columns its own way

        def line(row: list[str]) -> str:
            cells = []
            for cell, cell_width, column in zip(row, widths, self.columns, strict=True):
                right = not (column.name or column.left)
                text = cell.rstrip() if right else cell  # as rich justifies right
                if len(text) > cell_width:
                    text = text[: cell_width - 1] + "…"
                cells.append(text.rjust(cell_width) if right else text.ljust(cell_width))
            return "  ".join(cells)

        title = wrap_plain(self.title, total) if self.title else []
        caption = wrap_plain(self.caption, total) if self.caption else []
        if title is None or caption is None:
            return None
        body = [line(row) for row in texts[1:]]
        if self.with_total:
            body.insert(-1, " " * total)
        lines = [*title, line(texts[0]), "─" * total, *body, *caption]
        return "".join(f"{text}\n" for text in lines)


# rich's console markup (rich.markup.RE_TAGS) and emoji codes (rich._emoji_replace).
_MARKUP_TAG = re.compile(r"((\\*)\[([a-z#/@][^[]*?)])")
_EMOJI_CODE = re.compile(r":(\S*?)(?:-(?:emoji|text))?:")
# Emoji names rich knows that have no letter in them.
_EMOJI_WITHOUT_LETTERS = frozenset({"100", "1234"})
# The styles our tables use: others (links, handlers, unknown names) are left to rich.
_PLAIN_STYLES = frozenset({"blue", "bold", "cyan", "dim", "green", "red", "yellow"})
# Beyond printable ASCII, the characters our tables use: one cell wide, never replaced.
_PLAIN_EXTRA = frozenset("→↳…")
_WORD = re.compile(r"\s*\S+\s*")


def plain(markup: str, *, lines: bool = False) -> str | None:
    """The characters rich prints for ``markup`` without colours, or None when telling
    needs rich itself: an emoji code, a wide or control character (a line break only
    with ``lines``), a markup error."""
    pieces: list[str] = []
    opened: list[str] = []
    position = 0
    for match in _MARKUP_TAG.finditer(markup):  # as rich.markup._parse reads it
        whole, escapes, tag = match.groups()
        start, end = match.span()
        if start > position:
            pieces.append(markup[position:start])
        position = end
        if escapes:
            backslashes, escaped = divmod(len(escapes), 2)
            if backslashes:
                pieces.append("\\" * backslashes)
            if escaped:
                pieces.append(whole[len(escapes) :])
                continue
        if not tag.startswith("/"):
            if not set(tag.split()) <= _PLAIN_STYLES:
                return None  # a link, a handler, a style rich may not know
            opened.append(tag)
        elif tag[1:].strip():
            if tag[1:].strip() not in opened:
                return None
            del opened[len(opened) - 1 - opened[::-1].index(tag[1:].strip())]
        elif opened:
            opened.pop()
        else:
            return None
    if position < len(markup):
        pieces.append(markup[position:])
    pieces = [piece.replace("\\[", "[") for piece in pieces]
    for piece in pieces:
        for colon in range(len(piece)):
            if piece[colon] != ":":
                continue
            code = _EMOJI_CODE.match(piece, colon)
            if code is None:
                continue
            name = code.group(1).lower()
            if not name.isdigit() or name in _EMOJI_WITHOUT_LETTERS:
                return None
    text = "".join(pieces)
    if all(" " <= char <= "~" or char in _PLAIN_EXTRA for char in text.replace("\n", " ")):
        return None if "\n" in text and not lines else text
    return None


def wrap_plain(markup: str, width: int) -> list[str] | None:
    """``markup`` wrapped to ``width`` and padded, as rich wraps a left-justified title
    or caption; None when that needs rich (see `plain`), or for a word longer than a
    line, which rich folds."""
    text = plain(markup, lines=True)
    if text is None:
        return None
    lines = []
    for paragraph in text.split("\n"):
        breaks = [0]
        offset = 0
        for word in _WORD.finditer(paragraph):
            size = len(word.group().rstrip())
            if size > width:
                return None
            if width - offset >= size:
                offset += len(word.group())
            elif offset and word.start():
                breaks.append(word.start())
                offset = len(word.group())
        breaks.append(len(paragraph))
        for begin, end in itertools.pairwise(breaks):
            line = paragraph[begin:end]
            excess = len(line) - width
            if excess > 0:  # rich's rstrip_end: trailing whitespace past the width goes
                trailing = len(line) - len(line.rstrip())
                line = line[: len(line) - min(trailing, excess)]
            lines.append(line[:width].ljust(width))
    return lines
