"""The forms a row takes between `BatchWriter.put_* <tokenledger._writer.BatchWriter>`
and the database, and the batch that carries them there.

A record is put as itself (a `CallRecord`, `RunRecord` or `PriceRecord`) and taken off
the queue into a `Batch`: calls as tuples in the calls table's column order (the form
`tokenledger._rows.DriverInsert` hands to the driver), runs and prices as dicts. The
spool holds ``(table, dict)`` pairs, which `Batch.add` takes back.
"""

from __future__ import annotations

import dataclasses
import operator
import threading
from collections.abc import Iterable
from typing import Any

from tokenledger._tables import calls
from tokenledger.records import CallRecord, PriceRecord, RunRecord

__all__ = [
    "CALL_COLUMNS",
    "Batch",
    "FlushMarker",
    "Row",
    "as_dict",
    "batch_form",
    "call_values",
    "dedupe_runs",
    "record_row",
]

Row = dict[str, Any]

# PriceRecord has no as_row(); prices are rare, so a plain field copy will do.
_PRICE_FIELDS = tuple(field.name for field in dataclasses.fields(PriceRecord))

# Calls, nearly every row, travel as tuples in the calls table's column order: one
# attrgetter call per record (a C loop), where as_row() built a dict field by field.
CALL_COLUMNS = tuple(column.name for column in calls.columns)
call_values = operator.attrgetter(*CALL_COLUMNS)
call_values_of_row = operator.itemgetter(*CALL_COLUMNS)


class FlushMarker:
    """Put in the queue by `BatchWriter.flush`; set once every row put before it is
    committed: the rows ahead of it in memory, and the spool segments up to ``spool_seq``.
    """

    __slots__ = ("done", "spool_seq")

    def __init__(self, spool_seq: int) -> None:
        self.done = threading.Event()
        self.spool_seq = spool_seq


class Batch:
    """Rows to write in one transaction. Prices and runs are dicts; calls are tuples in
    `CALL_COLUMNS` order.

    ``fresh``: taken from the queue and never tried. Only such a batch may have its
    calls written with COPY (which has no ON CONFLICT): a retried or replayed batch may
    hold calls already stored.
    """

    __slots__ = ("calls", "fresh", "markers", "prices", "runs")

    def __init__(self, *, fresh: bool = False) -> None:
        self.prices: list[Row] = []
        self.runs: list[Row] = []
        self.calls: list[tuple[Any, ...]] = []
        self.markers: list[FlushMarker] = []
        self.fresh = fresh

    def __len__(self) -> int:
        return len(self.prices) + len(self.runs) + len(self.calls)

    def add(self, table: str, row: Row) -> None:
        if table == "calls":
            self.calls.append(call_values_of_row(row))
        else:
            getattr(self, table).append(row)

    def rows(self) -> Iterable[tuple[str, Row]]:
        for table in ("prices", "runs"):
            for row in getattr(self, table):
                yield table, row
        for values in self.calls:
            yield "calls", as_dict("calls", values)


def as_dict(table: str, row: Any) -> Row:
    """A row of ``table`` as a dict, whichever form the batch holds it in."""
    return dict(zip(CALL_COLUMNS, row, strict=True)) if table == "calls" else dict(row)


def batch_form(table: str, row: Row) -> Any:
    """A dict row of ``table`` in the form a `Batch` holds it: calls as tuples."""
    return call_values_of_row(row) if table == "calls" else row


def _progress(row: Row) -> tuple[bool, int]:
    """How far a run had got when this state of it was put: ended, then calls counted.

    A run's states only move forward (it ends once; its totals only grow), so the most
    advanced state is the newest whatever order the states arrive in.
    """
    calls = row.get("calls")
    return row.get("ended_at") is not None, calls if isinstance(calls, int) else 0


def dedupe_runs(rows: list[Row]) -> list[Row]:
    # A run is put when it starts and again when it ends: the most advanced state wins
    # (the later one on a tie), and one INSERT ... ON CONFLICT statement must not touch
    # the same row twice.
    newest: dict[Any, Row] = {}
    for row in rows:
        seen = newest.get(row["id"])
        if seen is None or _progress(row) >= _progress(seen):
            newest[row["id"]] = row
    return list(newest.values())


def record_row(item: object) -> tuple[str, Row] | None:
    """``(table, row)`` for a record, as the spool stores it; None for anything else."""
    if isinstance(item, CallRecord):
        return "calls", item.as_row()
    if isinstance(item, RunRecord):
        return "runs", item.as_row()
    if isinstance(item, PriceRecord):
        return "prices", {name: getattr(item, name) for name in _PRICE_FIELDS}
    return None
