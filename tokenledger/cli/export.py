"""``tokenledger export``: runs or calls as CSV or JSON Lines, every column as stored.

Rows are streamed from the database and written as they come, so a ledger of any size
exports in constant memory; a file is written beside its destination and moved into
place only once complete.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import IO, TYPE_CHECKING, Any

import click

from tokenledger.cli._options import (
    EMPTY,
    db_option,
    open_for_reading,
    window_options,
    window_values,
)
from tokenledger.cli._render import decimal_text, json_default, say

if TYPE_CHECKING:
    import sqlalchemy as sa

__all__ = ["export_command"]


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return decimal_text(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=json_default, ensure_ascii=False, sort_keys=True)
    return value


def _export_rows(
    engine: sa.Engine, what: str, start: dt.datetime | None, end: dt.datetime | None
) -> Iterator[dict[str, Any]]:
    """Every row of ``what`` in the window, oldest first, streamed in chunks of 1,000."""
    import sqlalchemy as sa

    from tokenledger import _storage as storage

    table = storage.runs if what == "runs" else storage.calls
    query = sa.select(table).order_by(table.c.started_at, table.c.id)
    if start is not None:
        query = query.where(table.c.started_at >= start)
    if end is not None:
        query = query.where(table.c.started_at < end)
    with engine.connect() as connection:
        # yield_per streams: a server-side cursor on PostgreSQL, so a million rows never
        # sit in memory at once.
        result = connection.execution_options(yield_per=1000).execute(query)
        for row in result:
            yield dict(row._mapping)


def _columns(what: str) -> list[str]:
    from tokenledger import _storage as storage

    table = storage.runs if what == "runs" else storage.calls
    return [column.name for column in table.columns]


def _write_export(
    out: IO[str], fmt: str, columns: list[str], rows: Iterator[dict[str, Any]]
) -> int:
    written = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row[name]) for name in columns])
            written += 1
    else:
        for row in rows:
            out.write(json.dumps(row, default=json_default, ensure_ascii=False))
            out.write("\n")
            written += 1
    return written


@click.command("export")
@db_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    default="csv",
    show_default=True,
    help="CSV with a header line, or one JSON object per line.",
)
@click.option(
    "--what",
    type=click.Choice(["runs", "calls"]),
    default="calls",
    show_default=True,
    help="Which rows: one per model call (and tool charge), or one per run.",
)
@window_options
@click.option(
    "-o",
    "--output",
    metavar="FILE",
    default="-",
    help="Write to FILE (replaced only once complete) instead of standard output.",
)
def export_command(
    *,
    db_url: str | None,
    fmt: str,
    what: str,
    since: str | None,
    until: str | None,
    output: str,
) -> None:
    """Export runs or calls as CSV or JSON Lines, oldest first, every column as stored.

    Rows are streamed, so any size of ledger exports in constant memory. Amounts are
    exact decimal strings (never floats), times ISO-8601 UTC; in CSV, tags and other
    JSON columns are JSON text and an empty cell is a NULL.
    """
    start, end = window_values(since, until)
    columns = _columns(what)
    engine = open_for_reading(db_url)
    rows: Iterator[dict[str, Any]] = (
        iter(()) if engine is None else _export_rows(engine, what, start, end)
    )
    try:
        if output == "-":
            written = _write_export(sys.stdout, fmt, columns, rows)
        else:
            partial = f"{output}.partial"
            try:
                with open(partial, "w", encoding="utf-8", newline="") as out:
                    written = _write_export(out, fmt, columns, rows)
                os.replace(partial, output)
            except OSError as exc:
                raise click.ClickException(
                    f"Cannot write {output}: {exc.strerror or exc}. Check that the directory "
                    "exists and is writable."
                ) from exc
            finally:
                if os.path.exists(partial):
                    os.unlink(partial)
    finally:
        if engine is not None:
            engine.dispose()
    if output != "-":
        say(f"Wrote {written:,} {what} to {output} ({fmt}).", err=True)
    if engine is None:
        say(EMPTY, err=True)
