"""The ``tokenledger`` command: read the ledger, set its budgets, migrate it, and run the
offline demo.

Start-up time matters for a command people run in loops and scripts, so this module
imports only click at the top: SQLAlchemy, rich and the query layer are imported inside
the commands that use them, and litellm only by ``tokenledger demo``; ``tokenledger
report`` on a SQLite file does not import SQLAlchemy at all (see
`_report_without_sqlalchemy`). A table printed to a pipe is written without rich,
character for character as rich would (see `_Table`).

Reading commands (``runs``, ``calls``, ``report``, ``status``, ``budgets``, ``db current``)
and ``budgets rm`` never create or migrate a database: a missing SQLite file is an error,
not a new ledger. ``budgets set``, like ``db upgrade``, creates a ledger where there is none.

.. versionadded:: 0.1.0
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
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from tokenledger._version import __version__
from tokenledger.exceptions import ConfigurationError, LedgerError, SchemaVersionError

if TYPE_CHECKING:
    import sqlalchemy as sa
    from rich.console import Console
    from rich.table import Table

    from tokenledger._reservations import BudgetStore
    from tokenledger.budgets import BudgetStatus
    from tokenledger.queries import CallRow, ReportRow, RunRow

__all__ = ["cli", "main"]

F = TypeVar("F", bound=Callable[..., Any])

_EMPTY = "No runs recorded yet. Try `tokenledger demo`."
_DB_HELP = (
    "Ledger database URL. Default: $TOKENLEDGER_DATABASE_URL, else tokenledger.db in the "
    "current directory."
)
_SINCE_HELP = "Only runs/calls since then: 30m, 24h, 7d, 2w, or an ISO date (2025-01-31)."
_URL_KEY = "tokenledger.url"


# -------------------------------------------------------------------------- plumbing


class _LedgerGroup(click.Group):
    """Turns tokenledger's and the database driver's errors into one-line messages.

    ``Error: <sentence>`` on stderr and exit status 1, never a traceback: a user who
    mistyped a URL or forgot ``db upgrade`` needs the fix, not our stack.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except LedgerError as exc:  # SchemaVersionError included
            raise click.ClickException(str(exc)) from exc
        except ConfigurationError as exc:
            raise click.ClickException(str(exc)) from exc
        except ModuleNotFoundError as exc:
            if exc.name in ("psycopg", "psycopg2"):
                raise click.ClickException(str(exc)) from exc
            raise
        except Exception as exc:
            reason = _driver_failure(exc)
            if reason is None:
                raise
            url = ctx.meta.get(_URL_KEY, "the ledger")
            raise click.ClickException(f"The database at {url} failed: {reason}") from exc


def _driver_failure(exc: Exception) -> str | None:
    """What the database said, when ``exc`` is the database failing; else None.

    SQLAlchemy wraps the driver's errors; `tokenledger report` on a SQLite file calls
    `sqlite3` itself (see `_report_without_sqlalchemy`). Neither module is imported
    here just to ask: an error of a module nobody loaded cannot have been raised.
    """
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(exc, sa_exc.DBAPIError):
        return str(exc.orig or exc).strip()
    sqlite3 = sys.modules.get("sqlite3")
    # The database's own failures only: a ProgrammingError or InterfaceError would be a
    # bug in tokenledger, and keeps its traceback.
    if sqlite3 is not None and (
        isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError
    ):
        return str(exc).strip() or type(exc).__name__
    return None


def _db_option(fn: F) -> F:
    return click.option("--db", "db_url", metavar="URL", default=None, help=_DB_HELP)(fn)


def _json_option(fn: F) -> F:
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print JSON (Decimals as strings, ISO-8601 times), for scripts.",
    )(fn)


def _resolve_url(db_url: str | None) -> tuple[str, str | None]:
    """The URL to use and its SQLite path (None for a server), or a usage error."""
    from tokenledger import storage

    url = db_url or storage.default_url()
    try:
        path = storage.database_path(url)
    except ConfigurationError as exc:
        source = "--db" if db_url else storage.DATABASE_URL_ENV
        raise click.BadParameter(str(exc), param_hint=f"'{source}'") from exc
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.find_root().meta[_URL_KEY] = path or storage.redact_url(url)
    return url, path


def _missing_file(path: str) -> NoReturn:
    raise click.ClickException(
        f"The ledger {path} does not exist. Record a run with tokenledger, run "
        "`tokenledger demo`, or pass --db with the URL of an existing ledger."
    )


def _engine(url: str) -> sa.Engine:
    from tokenledger import storage

    return storage.create_engine_for(url)


def _open_for_reading(db_url: str | None) -> sa.Engine | None:
    """An engine on an existing ledger at this code's schema; None when it has no schema.

    Never creates a file or a table: a missing SQLite file is an error, an empty
    database is an empty ledger, and one at another revision raises `SchemaVersionError`.
    """
    from tokenledger import schema

    url, path = _resolve_url(db_url)
    if path is not None and not os.path.exists(path):
        _missing_file(path)
    if path is not None and os.path.isfile(path) and os.path.getsize(path) == 0:
        # An empty file is an empty SQLite database. Connecting would switch it to WAL,
        # which writes a header: reading commands leave files as they found them.
        return None
    engine = _engine(url)
    try:
        revision = schema.current_revision(engine)
        if revision == schema.head_revision():
            return engine  # what ensure_schema would find, without looking twice
        if revision is None and not _has_ledger_tables(engine):
            engine.dispose()
            return None
        # ensure_schema creates tables only in a database without any; here it checks
        # the revision and raises SchemaVersionError with the command that fixes it.
        schema.ensure_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _has_ledger_tables(engine: sa.Engine) -> bool:
    import sqlalchemy as sa

    from tokenledger.schema import LEDGER_TABLES

    with engine.connect() as connection:
        return bool(set(sa.inspect(connection).get_table_names()) & set(LEDGER_TABLES))


R = TypeVar("R")


def _read(db_url: str | None, query: Callable[[sa.Engine], list[R]]) -> tuple[list[R], bool]:
    """Rows of ``query`` on the ledger, and whether the ledger holds nothing at all."""
    from tokenledger.queries import counts

    engine = _open_for_reading(db_url)
    if engine is None:
        return [], True
    try:
        rows = query(engine)
        if rows:
            return rows, False
        held = counts(engine)
        return rows, held.runs == 0 and held.calls == 0
    finally:
        engine.dispose()


# Piped output is read by tools and people with wide terminals: do not cut it at
# rich's default of 80 columns.
_PIPE_WIDTH = 200
# What makes rich colour or measure a pipe as it would a terminal.
_RICH_TERMINAL_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")


def _console() -> Console:
    from rich.console import Console

    width = None if sys.stdout.isatty() else _PIPE_WIDTH
    return Console(file=sys.stdout, width=width, highlight=False)


def _show_table(build: Callable[[int], _Table]) -> None:
    """Print the table ``build(width)`` lays out for stdout's width.

    On a pipe, rich prints plain characters, so they are written here without importing
    rich (see `_Table.plain_text`); a terminal gets rich's colours.
    """
    piped = not sys.stdout.isatty() and sys.platform != "win32"
    encoding = (getattr(sys.stdout, "encoding", None) or "utf-8").lower()
    if piped and encoding.startswith("utf") and not set(_RICH_TERMINAL_ENV) & set(os.environ):
        table = build(_PIPE_WIDTH)
        text = table.plain_text(_PIPE_WIDTH)
        if text is not None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        _console().print(table)
        return
    console = _console()
    console.print(build(console.width))


def _say(message: str, *, err: bool = False) -> None:
    click.echo(message, err=err)


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        # Exact, as a string: JSON numbers are floats to most readers.
        return format(value.normalize(), "f") if value else "0"
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    raise TypeError(f"Cannot encode {type(value).__name__} as JSON")


def _print_json(data: Sequence[Any] | dict[str, Any]) -> None:
    """Rows (dataclasses) as a JSON array, or one dict as an object."""
    if not isinstance(data, dict):
        data = [dataclasses.asdict(row) for row in data]
    click.echo(json.dumps(data, default=_json_default, indent=2, ensure_ascii=False))


def _since_value(since: str | None) -> dt.datetime | None:
    if since is None:
        return None
    from tokenledger._reporting import parse_since

    try:
        return parse_since(since)
    except ConfigurationError as exc:
        raise click.BadParameter(
            f"{since!r} is not a time. Use a duration back from now (30m, 24h, 7d, 2w) "
            "or an ISO date (2025-01-31).",
            param_hint="'--since'",
        ) from exc


def _limit_value(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value < 0:
        raise click.BadParameter(f"{value} is negative; give a count, or 0 for all.")
    return value


def _limit_option(fn: F) -> F:
    return click.option(
        "-n",
        "--limit",
        type=int,
        default=20,
        show_default=True,
        callback=_limit_value,
        help="How many to show, newest first (0: all).",
    )(fn)


# ------------------------------------------------------------------------ formatting


def _money(value: Decimal | None) -> str:
    """Dollars for a table: 4 places, or 2 significant digits below a tenth of a cent."""
    if value is None:
        return "[yellow]unpriced[/]"
    if value == 0 or abs(value) >= Decimal("0.001"):
        return f"${value:,.4f}"
    # Two significant digits: $0.00023, $0.000004.
    quantum = Decimal(1).scaleb(value.adjusted() - 1)
    return f"${value.quantize(quantum).normalize():f}"


def _count(value: int) -> str:
    return f"{value:,}" if value else "[dim]0[/]"


def _tokens(value: int) -> str:
    """A token count for a table: exact below 100,000, then 105k, 1.2M, 3.4B.

    Exact figures are one ``--json`` away; the table has to fit an 80-column terminal.
    """
    if value < 100_000:
        return _count(value)
    for divisor, suffix in ((1_000_000_000, "B"), (1_000_000, "M")):
        if value >= divisor:
            return f"{value / divisor:,.1f}{suffix}"
    return f"{value / 1000:,.0f}k"


_ESCAPE = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")


def _escape(text: str) -> str:
    """``text`` as literal rich markup: rich.markup.escape, without importing rich."""

    def escape_backslashes(match: re.Match[str]) -> str:
        backslashes, tag = match.groups()
        return f"{backslashes}{backslashes}\\{tag}"

    text = _ESCAPE.sub(escape_backslashes, text)
    if text.endswith("\\") and not text.endswith("\\\\"):
        return text + "\\"
    return text


def _when(value: dt.datetime | None, *, now: dt.datetime | None = None) -> str:
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


def _status(value: str) -> str:
    return f"[{_STATUS_STYLE.get(value, 'yellow')}]{_escape(value)}[/]"


@dataclasses.dataclass
class _Column:
    """One table column. ``drop``: 0 always shown, else dropped (highest first) when
    the terminal is too narrow. ``name``: left-aligned text that rich may shorten."""

    header: str
    cells: list[str]
    total: str = ""
    drop: int = 0
    name: bool = False
    left: bool = False
    style: str | None = None


def _fit_table(
    columns: list[_Column],
    *,
    width: int,
    title: str | None = None,
    caption: str | None = None,
    with_total: bool = False,
) -> _Table:
    """A table that fits ``width``: optional columns go first, then long names are cut.

    Rich alone would squeeze every column, numbers included, into ellipses.
    """
    simple = all(
        _plain(cell) is not None for c in columns for cell in (c.header, *c.cells, c.total)
    )

    sizes: dict[str, int] = {}  # the loops below measure each cell many times

    def cell_len(cell: str) -> int:
        if cell not in sizes:
            if simple:
                sizes[cell] = len(_plain(cell) or "")
            else:
                from rich.text import Text

                sizes[cell] = Text.from_markup(cell).cell_len
        return sizes[cell]

    def needed(column: _Column) -> int:
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
    return _Table(
        columns=shown,
        max_widths=[limits.get(id(column)) for column in shown],
        title=title,
        caption="\n".join(notes) or None,
        with_total=with_total,
        simple=simple,
    )


@dataclasses.dataclass
class _Table:
    """A table laid out by `_fit_table`, printed by rich (``__rich__``) or, on a pipe, as
    the same characters without loading rich (`plain_text`)."""

    columns: list[_Column]
    max_widths: list[int | None]
    title: str | None
    caption: str | None
    with_total: bool
    # Every cell is plain by `_plain`, so `plain_text` can print what rich would.
    simple: bool

    def __rich__(self) -> Table:
        from rich import box
        from rich.table import Table

        table = Table(
            title=self.title,
            caption=self.caption,
            # No vertical rules and a 2-space gap: reports must fit an 80-column terminal.
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            padding=(0, 1, 0, 0),
            title_justify="left",
            title_style="bold",
            caption_justify="left",
            caption_style="dim",
            header_style="bold cyan",
        )
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
        tests/test_cli.py checks this against rich, table by table.
        """
        if not self.simple or not self.columns:
            return None
        rows = [[column.header for column in self.columns]]
        rows += [list(row) for row in zip(*(c.cells for c in self.columns), strict=True)]
        if self.with_total:
            rows.append([column.total for column in self.columns])
        texts = [[_plain(cell) or "" for cell in row] for row in rows]
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

        title = _wrap_plain(self.title, total) if self.title else []
        caption = _wrap_plain(self.caption, total) if self.caption else []
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


def _plain(markup: str, *, lines: bool = False) -> str | None:
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


def _wrap_plain(markup: str, width: int) -> list[str] | None:
    """``markup`` wrapped to ``width`` and padded, as rich wraps a left-justified title
    or caption; None when that needs rich (see `_plain`), or for a word longer than a
    line, which rich folds."""
    text = _plain(markup, lines=True)
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


_KEY_HEADERS = {
    "agent": "Agent",
    "model": "Model",
    "provider": "Provider",
    "status": "Run status",
    "day": "Day (UTC)",
    "hour": "Hour (UTC)",
    "outcome": "Outcome",
}
_KEY_MISSING = {"agent": "(outside runs)", "status": "(outside runs)", "outcome": "(no outcome)"}
_REPORT_CAPTION = "Tokens: In includes Cached, Out includes Reasoning. Cost in USD."


def _report_columns(rows: Sequence[ReportRow], by: Sequence[str]) -> dict[str, _Column]:
    def total(name: str) -> int:
        return sum(getattr(row, name) for row in rows)

    def tokens(header: str, name: str, drop: int) -> _Column:
        return _Column(
            header,
            [_tokens(getattr(row, name)) for row in rows],
            _tokens(total(name)),
            drop=drop,
        )

    cost = sum((row.cost_usd for row in rows), Decimal(0))
    return {
        # Runs of different groups overlap (one run uses several models): no total.
        "runs": _Column("Runs", [_count(row.runs) for row in rows], drop=3),
        "calls": _Column("Calls", [_count(row.calls) for row in rows], _count(total("calls"))),
        "failed": _Column(
            "Failed",
            [f"[red]{row.failed_calls}[/]" if row.failed_calls else _count(0) for row in rows],
            _count(total("failed_calls")),
            drop=3,
        ),
        "in": tokens("In", "input_tokens", 4),
        "cached": tokens("Cached", "cached_tokens", 5),
        "out": tokens("Out", "output_tokens", 4),
        "reasoning": tokens("Reasoning", "reasoning_tokens", 6),
        "cost": _Column("Cost", [_money(row.cost_usd) for row in rows], _money(cost), style="bold"),
        "per_run": _Column(
            "Per run",
            [_money(row.cost_usd / row.runs) if row.runs else "" for row in rows],
            drop=2,
        ),
        "unpriced": _Column(
            "Unpriced",
            [
                f"[yellow]{row.unpriced_calls}[/]" if row.unpriced_calls else _count(0)
                for row in rows
            ],
            _count(total("unpriced_calls")),
        ),
    }


def report_table(
    rows: Sequence[ReportRow],
    by: Sequence[str],
    *,
    width: int,
    title: str | None = None,
    columns: Sequence[str] | None = None,
) -> _Table:
    """A table of report rows with a total line, used by ``report`` and ``demo``.

    ``columns`` picks from runs, calls, failed, in, cached, out, reasoning, cost, per_run
    and unpriced; by default failures, reasoning and unpriced calls appear when there
    are any, and cost per run when grouping by agent.
    """
    if columns is None:
        columns = ["runs", "calls"]
        if any(row.failed_calls for row in rows):
            columns.append("failed")
        columns += ["in", "cached", "out"]
        if any(row.reasoning_tokens for row in rows):
            columns.append("reasoning")
        columns.append("cost")
        if "agent" in by:
            columns.append("per_run")
        if any(row.unpriced_calls for row in rows):
            columns.append("unpriced")
    keys = []
    for position, name in enumerate(by):
        cells = []
        for row in rows:
            value = row.key[name]
            if value is None:
                missing = _KEY_MISSING.get(
                    name, "(no tag)" if name.startswith("tag:") else "(unknown)"
                )
                cells.append(f"[dim]{missing}[/]")
            else:
                cells.append(_status(value) if name == "status" else _escape(value))
        keys.append(
            _Column(
                _KEY_HEADERS.get(name, name),
                cells,
                "[bold]Total[/]" if position == 0 else "",
                name=True,
            )
        )
    figures = _report_columns(rows, by)
    return _fit_table(
        [*keys, *(figures[name] for name in columns)],
        width=width,
        title=title,
        caption=_REPORT_CAPTION,
        with_total=len(rows) > 1,
    )


def _runs_table(rows: Sequence[RunRow], *, width: int) -> _Table:
    def cost(row: RunRow) -> str:
        text = _money(row.cost_usd)
        return text + (f" [yellow]+{row.unpriced_calls} unpriced[/]" if row.unpriced_calls else "")

    def calls(row: RunRow) -> str:
        return _count(row.calls) + (
            f" [red]({row.failed_calls} failed)[/]" if row.failed_calls else ""
        )

    def tags(row: RunRow) -> str:
        return _escape(" ".join(f"{key}={value}" for key, value in sorted(row.tags.items())))

    return _fit_table(
        [
            _Column("Started", [_when(row.started_at) for row in rows], left=True),
            _Column(
                "Agent",
                [_escape(r.name) if r.is_root else f"[dim]↳[/] {_escape(r.name)}" for r in rows],
                name=True,
            ),
            _Column("Status", [_status(row.status) for row in rows], left=True),
            _Column("Calls", [calls(row) for row in rows]),
            _Column("In", [_tokens(row.input_tokens) for row in rows], drop=3),
            _Column("Out", [_tokens(row.output_tokens) for row in rows], drop=3),
            _Column("Cost", [cost(row) for row in rows], style="bold"),
            _Column("Tags", [tags(row) for row in rows], drop=4, name=True),
            _Column("Run id", [row.id for row in rows], left=True, style="dim"),
        ],
        width=width,
    )


def _calls_table(rows: Sequence[CallRow], *, width: int) -> _Table:
    def model(row: CallRow) -> str:
        if row.requested_model and row.model and row.requested_model != row.model:
            return f"{_escape(row.requested_model)} [dim]→[/] {_escape(row.model)}"
        return _escape(row.model or row.requested_model or "(unknown)")

    def status(row: CallRow) -> str:
        error = f" [dim]{_escape(row.error_type)}[/]" if row.error_type else ""
        return _status(row.status) + error

    def tokens_in(row: CallRow) -> str:
        # ~: counted by tokenledger because the provider reported no usage.
        return _tokens(row.input_tokens) + ("[dim]~[/]" if row.usage_estimated else "")

    return _fit_table(
        [
            _Column("Started", [_when(row.started_at) for row in rows], left=True),
            _Column(
                "Agent",
                [_escape(r.agent) if r.agent else "[dim](outside runs)[/]" for r in rows],
                name=True,
            ),
            _Column("Model", [model(row) for row in rows], name=True),
            _Column(
                "Operation",
                [row.operation + (" [dim]stream[/]" if row.streamed else "") for row in rows],
                drop=3,
            ),
            _Column("Status", [status(row) for row in rows], left=True),
            _Column("In", [tokens_in(row) for row in rows]),
            _Column(
                "Cached",
                [_tokens(r.cache_read_tokens + r.cache_write_tokens) for r in rows],
                drop=4,
            ),
            _Column("Out", [_tokens(row.output_tokens) for row in rows]),
            _Column("Reasoning", [_tokens(row.reasoning_tokens) for row in rows], drop=5),
            _Column("Cost", [_money(row.cost_usd) for row in rows], style="bold"),
            _Column(
                "Latency",
                [f"{row.latency_ms:,.0f} ms" if row.latency_ms is not None else "" for row in rows],
                drop=2,
            ),
        ],
        width=width,
    )


# -------------------------------------------------------------------------- commands


@click.group(cls=_LedgerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tokenledger")
def cli() -> None:
    """Token accounting for LLM agent loops: see what every run and model costs.

    Every command takes --db URL (default: $TOKENLEDGER_DATABASE_URL, else
    tokenledger.db in the current directory). Start with `tokenledger demo`.
    """


@cli.command()
@_db_option
@click.option(
    "--runs",
    "runs",
    type=click.IntRange(1, 10_000),
    default=20,
    show_default=True,
    help="How many support tickets to run through the demo agent.",
)
@click.option("--seed", type=int, default=7, show_default=True, help="Random seed.")
def demo(db_url: str | None, runs: int, seed: int) -> None:
    """Record an offline multi-step agent workflow and report what it cost.

    A support-triage agent (planner, retrieval, tool steps with one rate-limited retry,
    a policy check with reasoning, a researcher sub-agent and a streamed reply) makes
    real litellm calls answered by mock responses: nothing leaves this machine.
    """
    from tokenledger.demo import run_demo
    from tokenledger.ledger import Ledger
    from tokenledger.queries import report

    url, path = _resolve_url(db_url)
    console = _console()
    with console.status(f"Running {runs} support tickets through litellm (offline)…"):
        ledger = Ledger(url)
        try:
            summary = run_demo(ledger, runs=runs, seed=seed)
            by_agent = report(
                ledger.engine, by=("agent",), since=summary.started_at, root_only=False
            )
            by_model = report(ledger.engine, by=("model",), since=summary.started_at)
        finally:
            ledger.close()
    console.print(
        f"Recorded [bold]{summary.runs}[/] support-triage runs and "
        f"[bold]{summary.sub_runs}[/] researcher sub-runs, offline."
    )
    retried = f", {summary.failed_calls} failed and retried" if summary.failed_calls else ""
    console.print(
        f"[bold]{summary.calls}[/] model calls{retried}: "
        f"[bold green]{_money(summary.cost_usd)}[/] in all, "
        f"[bold green]{_money(summary.cost_usd / summary.runs)}[/] per run."
    )
    console.print()
    console.print(
        report_table(
            by_agent,
            ("agent",),
            title="By agent (each call counted once, in the agent that made it)",
            columns=("runs", "calls", "in", "cached", "out", "cost", "per_run"),
            width=console.width,
        )
    )
    console.print()
    console.print(
        report_table(
            by_model,
            ("model",),
            title="By model",
            columns=("calls", "in", "cached", "out", "reasoning", "cost"),
            width=console.width,
        )
    )
    console.print()
    where = path or ledger.url
    console.print(f"Ledger: [bold]{where}[/]")
    db_flag = f" --db {ledger.url}" if db_url else ""
    console.print("Explore it:")
    for command in (
        "runs --root-only",
        "report --by agent,model",
        f"calls --run {summary.run_ids[0]}",
    ):
        console.print(f"  [cyan]tokenledger {command}{db_flag}[/]", soft_wrap=True)


@cli.command()
@_db_option
def path(db_url: str | None) -> None:
    """Print where the ledger is: the SQLite file, or the database URL (password hidden).

    Open it with other tools: sqlite3 "$(tokenledger path)".
    """
    from tokenledger.storage import redact_url

    url, file = _resolve_url(db_url)
    click.echo(file if file is not None else redact_url(url))
    if file is not None and not os.path.exists(file):
        _say("(The file does not exist yet: it is created on first use.)", err=True)


@cli.command("runs")
@_db_option
@_limit_option
@click.option("--agent", metavar="NAME", help="Only runs of this agent.")
@click.option("--since", metavar="WHEN", help=_SINCE_HELP)
@click.option("--root-only", is_flag=True, help="Only root runs, not sub-agent runs.")
@_json_option
def runs_command(
    *,
    db_url: str | None,
    limit: int,
    agent: str | None,
    since: str | None,
    root_only: bool,
    as_json: bool,
) -> None:
    """List runs, newest first. A run's totals include its sub-agents' calls."""
    from tokenledger.queries import list_runs

    start = _since_value(since)
    rows, empty = _read(
        db_url,
        lambda engine: list_runs(
            engine, limit=limit, agent=agent, since=start, root_only=root_only
        ),
    )
    if as_json:
        _print_json(rows)
    elif rows:
        _show_table(lambda width: _runs_table(rows, width=width))
    else:
        _say(_EMPTY if empty else "No runs match these filters.")


@cli.command("calls")
@_db_option
@_limit_option
@click.option("--run", "run_id", metavar="ID", help="Only calls of this run and its sub-runs.")
@click.option("-m", "--model", metavar="MODEL", help="Only calls to this model.")
@click.option("--since", metavar="WHEN", help=_SINCE_HELP)
@_json_option
def calls_command(
    *,
    db_url: str | None,
    limit: int,
    run_id: str | None,
    model: str | None,
    since: str | None,
    as_json: bool,
) -> None:
    """List model calls, newest first (each retry and fallback is its own call)."""
    from tokenledger.queries import list_calls

    start = _since_value(since)
    rows, empty = _read(
        db_url,
        lambda engine: list_calls(engine, limit=limit, run_id=run_id, model=model, since=start),
    )
    if as_json:
        _print_json(rows)
    elif rows:
        _show_table(lambda width: _calls_table(rows, width=width))
    else:
        _say(_EMPTY if empty else "No calls match these filters.")


def _report_without_sqlalchemy(
    db_url: str | None,
    dimensions: tuple[str, ...],
    start: dt.datetime | None,
    *,
    root_only: bool,
) -> tuple[list[ReportRow], bool] | None:
    """`report`'s rows and whether the ledger is empty, read with `sqlite3` alone.

    Importing SQLAlchemy is most of this command's start-up, so a ledger that is a plain
    ``sqlite:///PATH`` file at this code's schema revision is read directly, with the
    SQL `tokenledger.queries.report` runs there too. None means "take the general
    path": another kind of URL, no such file, no ledger tables, another revision, or a
    file SQLite cannot open; that path gives the error or the upgrade advice.
    """
    from tokenledger import _location

    path = _location.plain_sqlite_file(db_url or _location.default_url())
    if path is None or not os.path.isfile(path):
        return None
    import sqlite3
    import urllib.parse

    from tokenledger._reporting import sqlite_report

    context = click.get_current_context().find_root()
    try:
        # mode=rw: never create a file, as every reading command promises. fsencode:
        # a path that is not valid UTF-8 (surrogate escapes) is quoted byte by byte.
        uri = f"file:{urllib.parse.quote(os.fsencode(path))}?mode=rw"
        connection = sqlite3.connect(uri, uri=True, timeout=_location.SQLITE_BUSY_TIMEOUT_S)
    except sqlite3.Error:
        return None
    try:
        try:
            found = connection.execute(
                f"SELECT version_num FROM {_location.VERSION_TABLE}"
            ).fetchall()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                # Locked for the whole busy timeout: the general path would only wait
                # as long again before saying the same.
                context.meta[_URL_KEY] = path
                raise
            return None  # no such table, and the like: the general path explains
        except sqlite3.Error:
            return None  # not a database, and the like
        if found != [(_location.KNOWN_REVISIONS[0],)]:
            return None
        context.meta[_URL_KEY] = path

        def execute(sql: str, params: Any) -> list[Any]:
            return connection.execute(sql, params).fetchall()

        rows = sqlite_report(execute, dimensions, start, None, root_only=root_only)
        if rows:
            return rows, False
        (held,) = connection.execute(
            "SELECT EXISTS (SELECT 1 FROM runs) OR EXISTS (SELECT 1 FROM calls)"
        ).fetchone()
        return rows, not held
    finally:
        connection.close()


@cli.command("report")
@_db_option
@click.option(
    "--by",
    "by",
    default="agent",
    show_default=True,
    metavar="DIMS",
    help="Group by one or more of agent, model, provider, status, day, hour, outcome or "
    "tag:KEY (comma-separated).",
)
@click.option("--since", metavar="WHEN", help=_SINCE_HELP)
@click.option(
    "--sub-agents",
    is_flag=True,
    help="Count each call in the run that made it, so sub-agents get rows of their own "
    "(default: in its root run, so an agent's cost includes its sub-agents').",
)
@_json_option
def report_command(
    *, db_url: str | None, by: str, since: str | None, sub_agents: bool, as_json: bool
) -> None:
    """Cost and tokens grouped by agent, model, provider, run status or day.

    Sums model calls, each counted once, so rows add up to the total however you group.
    """
    from tokenledger._reporting import REPORT_DIMENSIONS, parse_report_by

    try:
        dimensions = parse_report_by(by)
    except ConfigurationError as exc:
        raise click.BadParameter(
            f"{by!r} is not a list of report dimensions; use one or more of "
            f"{', '.join(REPORT_DIMENSIONS)} or tag:KEY, separated by commas (for example "
            "agent,model).",
            param_hint="'--by'",
        ) from exc
    start = _since_value(since)
    read = _report_without_sqlalchemy(db_url, dimensions, start, root_only=not sub_agents)
    if read is None:
        from tokenledger.queries import report

        read = _read(
            db_url,
            lambda engine: report(engine, by=dimensions, since=start, root_only=not sub_agents),
        )
    rows, empty = read
    if as_json:
        _print_json(rows)
    elif rows:
        title = "Cost by " + ", ".join(dimensions)
        if since is not None:
            title += f" since {since}"
        _show_table(lambda width: report_table(rows, dimensions, title=title, width=width))
    else:
        _say(_EMPTY if empty else "No runs match these filters.")


@cli.command()
@_db_option
@_json_option
def status(db_url: str | None, as_json: bool) -> None:
    """Where the ledger is, its schema revision, and what it holds."""
    from tokenledger import schema
    from tokenledger.queries import counts
    from tokenledger.storage import redact_url

    url, path = _resolve_url(db_url)
    if path is not None and not os.path.exists(path):
        _missing_file(path)
    engine = _engine(url)
    problem = None
    try:
        revision = schema.current_revision(engine)
        head = schema.head_revision()
        held = counts(engine) if revision == head else None
        if revision is not None and revision != head:
            try:
                schema.ensure_schema(engine)  # at a revision, this only checks
            except SchemaVersionError as exc:
                problem = str(exc)  # says whether to upgrade the ledger or the package
    finally:
        engine.dispose()
    info: dict[str, Any] = {
        "url": redact_url(url),
        "path": path,
        "revision": revision,
        "head_revision": head,
        "up_to_date": revision == head,
        "problem": problem,
    }
    if held is not None:
        info.update(
            runs=held.runs,
            root_runs=held.root_runs,
            calls=held.calls,
            failed_calls=held.failed_calls,
            unpriced_calls=held.unpriced_calls,
            cost_usd=held.cost_usd,
            first_call_at=held.first_call_at,
            last_call_at=held.last_call_at,
        )
    if as_json:
        _print_json(info)
        return
    lines = [("Ledger", path or redact_url(url))]
    if revision == head:
        lines.append(("Schema", f"{revision} (up to date)"))
    elif revision is None:
        lines.append(
            ("Schema", f"none yet: created on first write or by `tokenledger db upgrade` ({head})")
        )
    else:
        lines.append(("Schema", f"{revision}, not usable here. {problem or ''}".strip()))
    if held is not None:
        lines += [
            ("Runs", f"{held.runs:,} ({held.root_runs:,} root runs)"),
            (
                "Calls",
                f"{held.calls:,} ({held.failed_calls:,} failed, {held.unpriced_calls:,} unpriced)",
            ),
            ("Cost", _money(held.cost_usd)),
            ("Last call", _when(held.last_call_at) or "none yet"),
        ]
    for label, value in lines:
        _say(f"{label + ':':<11}{value}")
    if held is not None and held.runs == 0 and held.calls == 0:
        _say(_EMPTY)


# --------------------------------------------------------------------------- budgets

_NO_BUDGETS = "No budgets set. Set one with `tokenledger budgets set global --usd 5 --per day`."
_WINDOW_CHOICES = click.Choice(["hour", "day", "week", "month", "total"])
_ACTION_CHOICES = click.Choice(["raise", "warn", "downgrade"])


def _budget_store(engine: sa.Engine) -> BudgetStore:
    from tokenledger._reservations import BudgetStore

    # The lease applies to reservations, which these commands never take.
    return BudgetStore(engine, lease_seconds=120.0)


def _with_budgets(engine: sa.Engine, use: Callable[[BudgetStore], R]) -> R:
    store = _budget_store(engine)
    try:
        return use(store)
    finally:
        store.dispose()
        engine.dispose()


def _group_db(ctx: click.Context, db_url: str | None) -> str | None:
    """``--db`` given to the subcommand, else to ``budgets`` itself."""
    if db_url is not None or ctx.parent is None:
        return db_url
    parent: str | None = ctx.parent.params.get("db_url")
    return parent


def _budget_json(status: BudgetStatus) -> dict[str, Any]:
    return {
        "scope": status.scope,
        "per": status.per,
        "action": status.action,
        "downgrade_to": list(status.downgrade_to),
        "limit_usd": status.limit_usd,
        "spent_usd": status.spent_usd,
        "reserved_usd": status.reserved_usd,
        "remaining_usd": status.remaining_usd,
        "overshoot_usd": status.overshoot_usd,
        "limit_tokens": status.limit_tokens,
        "spent_tokens": status.spent_tokens,
        "reserved_tokens": status.reserved_tokens,
        "remaining_tokens": status.remaining_tokens,
        "window_start": status.window_start,
        "resets_at": status.resets_at,
    }


def _budget_figure(status: BudgetStatus, usd: Decimal | None, tokens: int | None) -> str:
    """A figure in the units the budget limits: dollars, tokens, or both."""
    parts = []
    if status.limit_usd is not None:
        parts.append(_money(usd if usd is not None else Decimal(0)))
    if status.limit_tokens is not None:
        parts.append(f"{tokens or 0:,} tok")
    return " + ".join(parts)


def _budgets_table(statuses: Sequence[BudgetStatus], *, width: int) -> _Table:
    def remaining(status: BudgetStatus) -> str:
        text = _budget_figure(status, status.remaining_usd, status.remaining_tokens)
        exhausted = status.remaining_usd == 0 or status.remaining_tokens == 0
        return f"[red]{text}[/]" if exhausted else text

    def action(status: BudgetStatus) -> str:
        if status.action != "downgrade":
            return status.action
        return f"downgrade [dim]→[/] {_escape(', '.join(status.downgrade_to))}"

    overshoots = [
        f"`{s.scope}` ({s.per}) {_money(s.overshoot_usd)}" for s in statuses if s.overshoot_usd
    ]
    caption = "Windows are UTC calendar windows; reset times are local."
    if overshoots:
        caption += (
            "\nOvershoot (calls without max_tokens that cost more than they reserved): "
            + "; ".join(overshoots)
        )
    return _fit_table(
        [
            _Column("Scope", [_escape(s.scope) for s in statuses], name=True),
            _Column("Window", [s.per for s in statuses], left=True),
            _Column("Limit", [_budget_figure(s, s.limit_usd, s.limit_tokens) for s in statuses]),
            _Column("Spent", [_budget_figure(s, s.spent_usd, s.spent_tokens) for s in statuses]),
            _Column(
                "Reserved",
                [_budget_figure(s, s.reserved_usd, s.reserved_tokens) for s in statuses],
                drop=2,
            ),
            _Column("Remaining", [remaining(s) for s in statuses], style="bold"),
            _Column("Resets", [_when(s.resets_at) or "never" for s in statuses], left=True, drop=3),
            _Column("Action", [action(s) for s in statuses], left=True, drop=1),
        ],
        width=width,
        caption=caption,
    )


def _list_budgets(db_url: str | None, as_json: bool) -> None:
    engine = _open_for_reading(db_url)
    statuses = [] if engine is None else _with_budgets(engine, lambda store: store.status())
    if as_json:
        click.echo(
            json.dumps(
                [_budget_json(s) for s in statuses],
                default=_json_default,
                indent=2,
                ensure_ascii=False,
            )
        )
    elif statuses:
        _show_table(lambda width: _budgets_table(statuses, width=width))
    else:
        _say(_NO_BUDGETS)


@cli.group("budgets", invoke_without_command=True)
@_db_option
@_json_option
@click.pass_context
def budgets(ctx: click.Context, db_url: str | None, as_json: bool) -> None:
    """List budgets (the default), set one, or remove one.

    A budget caps what calls may spend, checked before each call in every process that
    shares the ledger. The list shows each budget's limit and what its current window
    has spent, reserved (calls in flight) and has left, and when the window resets.
    """
    if ctx.invoked_subcommand is None:
        _list_budgets(db_url, as_json)


@budgets.command("list")
@_db_option
@_json_option
@click.pass_context
def budgets_list(ctx: click.Context, db_url: str | None, as_json: bool) -> None:
    """List budgets: limit, spent, reserved, remaining, and when each window resets."""
    parent_json = bool(ctx.parent.params.get("as_json")) if ctx.parent is not None else False
    _list_budgets(_group_db(ctx, db_url), as_json or parent_json)


@budgets.command("set")
@click.argument("scope")
@click.option("--usd", metavar="AMOUNT", help="Limit in US dollars, e.g. 5 or 0.50.")
@click.option("--tokens", type=int, metavar="N", help="Limit in tokens (input + output).")
@click.option(
    "--per",
    type=_WINDOW_CHOICES,
    default="day",
    show_default=True,
    help="The window: a UTC calendar hour, day, week or month, or total (never resets).",
)
@click.option(
    "--action",
    type=_ACTION_CHOICES,
    default="raise",
    show_default=True,
    help="When a call would pass the limit: raise BudgetExceeded (nothing is sent), warn "
    "and let it through, or downgrade to a cheaper model.",
)
@click.option(
    "--downgrade-to",
    "downgrade_to",
    metavar="MODELS",
    help="Cheaper models to fall back to, in order, comma-separated (with --action downgrade).",
)
@_db_option
@click.pass_context
def budgets_set(
    ctx: click.Context,
    scope: str,
    usd: str | None,
    tokens: int | None,
    per: str,
    action: str,
    downgrade_to: str | None,
    db_url: str | None,
) -> None:
    """Set (or replace) the budget of SCOPE for one window.

    SCOPE is global, agent:NAME, user:ID, tenant:ID, or any TAGKEY:VALUE of run tags.
    Replacing a budget keeps what its current window has spent. Creates the ledger if
    there is none yet. Example: tokenledger budgets set user:42 --usd 5 --per day
    """
    from tokenledger import schema
    from tokenledger.budgets import parse_shared_budget

    chain = [m.strip() for m in downgrade_to.split(",")] if downgrade_to is not None else []
    if usd is None and tokens is None:
        raise click.UsageError(
            f"Budget `{scope}` needs a limit: give --usd AMOUNT, --tokens N, or both "
            f"(e.g. tokenledger budgets set {scope} --usd 5)."
        )
    try:
        spec = parse_shared_budget(
            scope, usd=usd, tokens=tokens, per=per, action=action, downgrade_to=chain
        )
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from exc
    url, _path = _resolve_url(_group_db(ctx, db_url))
    engine = _engine(url)
    try:
        schema.ensure_schema(engine)  # a new ledger is created; one at another revision refused
    except BaseException:
        engine.dispose()
        raise

    def put(store: BudgetStore) -> BudgetStatus:
        store.put(*spec)
        return next(s for s in store.status() if (s.scope, s.per) == spec[:2])

    status = _with_budgets(engine, put)
    limit = " and ".join(
        part
        for part in (
            _plain_money(status.limit_usd) if status.limit_usd is not None else "",
            f"{status.limit_tokens:,} tokens" if status.limit_tokens is not None else "",
        )
        if part
    )
    window = "in total" if status.per == "total" else f"per {status.per} (UTC)"
    fallback = f" to {', '.join(status.downgrade_to)}" if status.downgrade_to else ""
    _say(
        f"Set budget `{status.scope}`: {limit} {window}, action {status.action}{fallback}. "
        f"Spent so far: {_plain_money(status.spent_usd)}, {status.spent_tokens:,} tokens."
    )


def _plain_money(value: Decimal | None) -> str:
    """Dollars for a sentence (no table markup)."""
    return _money(value) if value is not None else "unknown"


@budgets.command("rm")
@click.argument("scope")
@click.option(
    "--per",
    type=_WINDOW_CHOICES,
    default=None,
    help="Remove only this window's budget (default: every budget of SCOPE).",
)
@_db_option
@click.pass_context
def budgets_rm(ctx: click.Context, scope: str, per: str | None, db_url: str | None) -> None:
    """Remove the budget of SCOPE (every window, or only --per's)."""
    from tokenledger.budgets import parse_scope

    try:
        scope = parse_scope(scope)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="'SCOPE'") from exc
    engine = _open_for_reading(_group_db(ctx, db_url))
    removed = 0 if engine is None else _with_budgets(engine, lambda s: s.remove(scope, per))
    which = f"`{scope}` ({per})" if per else f"`{scope}`"
    if not removed:
        raise click.ClickException(
            f"There is no budget {which} in this ledger; `tokenledger budgets` lists them."
        )
    _say(f"Removed the budget {which}." if removed == 1 else f"Removed {removed} budgets {which}.")


# ------------------------------------------------------------------------ migrations


@cli.group()
def db() -> None:
    """Create, upgrade, downgrade or inspect the ledger's schema (Alembic migrations)."""


def _revision_text(revision: str | None) -> str:
    return revision if revision is not None else "none (empty)"


def _migrate(db_url: str | None, action: str, revision: str) -> None:
    from tokenledger import schema
    from tokenledger.storage import redact_url

    url, path = _resolve_url(db_url)
    if action != "upgrade" and path is not None and not os.path.exists(path):
        _missing_file(path)
    engine = _engine(url)
    try:
        before = schema.current_revision(engine)
        getattr(schema, action)(engine, revision)
        after = schema.current_revision(engine)
    finally:
        engine.dispose()
    where = path or redact_url(url)
    if before == after:
        _say(f"The ledger {where} is already at revision {_revision_text(after)}.")
    else:
        verb = {"upgrade": "Upgraded", "downgrade": "Downgraded", "stamp": "Stamped"}[action]
        _say(f"{verb} the ledger {where} from {_revision_text(before)} to {_revision_text(after)}.")


@db.command("upgrade")
@_db_option
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(db_url: str | None, revision: str) -> None:
    """Migrate the ledger up (creating it if needed). Safe to run from several hosts."""
    _migrate(db_url, "upgrade", revision)


@db.command("downgrade")
@_db_option
@click.option("--revision", required=True, help="Target revision; `base` drops every ledger table.")
def db_downgrade(db_url: str | None, revision: str) -> None:
    """Migrate the ledger down to an older revision."""
    _migrate(db_url, "downgrade", revision)


@db.command("stamp")
@click.argument("revision")
@_db_option
def db_stamp(revision: str, db_url: str | None) -> None:
    """Record REVISION as the ledger's schema revision without migrating anything.

    For a ledger whose tables tokenledger created but whose revision record was lost.
    """
    _migrate(db_url, "stamp", revision)


@db.command("current")
@_db_option
def db_current(db_url: str | None) -> None:
    """Print the ledger's schema revision and the one this tokenledger needs."""
    from tokenledger import schema

    url, path = _resolve_url(db_url)
    if path is not None and not os.path.exists(path):
        _missing_file(path)
    engine = _engine(url)
    try:
        revision = schema.current_revision(engine)
    finally:
        engine.dispose()
    head = schema.head_revision()
    note = "up to date" if revision == head else "run `tokenledger db upgrade`"
    _say(f"current: {_revision_text(revision)}\nhead:    {head} ({note})")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``tokenledger`` console script."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="tokenledger")


if __name__ == "__main__":
    # `python -m tokenledger.cli`: tokenledger.cli_reports imports tokenledger.cli, which
    # is not this module under that name, so run that module (commands and all) instead.
    from tokenledger.cli import main as _main

    _main()
else:
    # The reporting commands build on the helpers above, so they are registered last.
    from tokenledger.cli_reports import COMMANDS as _REPORT_COMMANDS

    for _command in _REPORT_COMMANDS:
        cli.add_command(_command)
