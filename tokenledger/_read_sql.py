"""SQLAlchemy building blocks that the ledger's read queries share.

The listings and counts of `tokenledger.queries`, cost per outcome and the economics
all filter runs and calls by the same window, count unpriced calls by the same rule and
read large aggregates on the same kind of connection; each of those rules is written
once, here. (Cost reports are SQL text built by ``tokenledger._report_sql``, which holds
the same rules for an engine-independent text builder.)
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from tokenledger._storage import runs as runs_table

__all__ = ["call_sums", "in_window", "raw_rows", "reading", "root_runs", "unpriced_count"]


@contextlib.contextmanager
def reading(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection for an aggregate over many rows.

    On PostgreSQL the transaction gets ``work_mem`` of 64 MB (``SET LOCAL``: only until
    it ends). Grouping runs by a computed key (the day, a tag), the planner cannot
    estimate the number of groups and sorts every row; at the 4 MB default that sort of
    a hundred thousand runs spills to disk and takes several times longer.
    """
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection.exec_driver_sql("SET LOCAL work_mem = '64MB'")
        yield connection


def in_window(
    started_at: sa.ColumnElement[Any], start: dt.datetime | None, end: dt.datetime | None
) -> list[sa.ColumnElement[bool]]:
    """Conditions that ``started_at`` falls in ``start`` .. ``end`` (``end`` exclusive;
    either None: unbounded on that side)."""
    conditions: list[sa.ColumnElement[bool]] = []
    if start is not None:
        conditions.append(started_at >= start)
    if end is not None:
        conditions.append(started_at < end)
    return conditions


def root_runs(
    agent: str | None,
    start: dt.datetime | None,
    end: dt.datetime | None,
    *,
    root: sa.ColumnElement[bool] | None = None,
) -> list[sa.ColumnElement[bool]]:
    """Conditions on the runs table: a root run (``root``: the condition that says so)
    of ``agent`` (None: of any) that started in the window."""
    r = runs_table
    conditions = [r.c.parent_id.is_(None) if root is None else root]
    if agent is not None:
        conditions.append(r.c.name == agent)
    return conditions + in_window(r.c.started_at, start, end)


def unpriced_count(c: sa.Table) -> sa.ColumnElement[int]:
    """How many of the calls ``c`` are unpriced (0 when there are none).

    The same rule as `tokenledger.records.RunRecord.add_call`: a call with no cost is
    unpriced when it succeeded or used tokens; a failed call that used nothing cost
    nothing and is not. ``c.id IS NOT NULL`` skips the empty side of an outer join.
    """
    condition = sa.and_(
        c.c.id.is_not(None),
        c.c.cost_usd.is_(None),
        sa.or_(c.c.status == "ok", c.c.input_tokens > 0, c.c.output_tokens > 0),
    )
    return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)


def call_sums(c: sa.Table) -> list[sa.ColumnElement[Any]]:
    """A run's figures (the columns its row stores) summed over the calls ``c``."""

    def total(name: str) -> sa.ColumnElement[Any]:
        return sa.func.coalesce(sa.func.sum(c.c[name]), 0).label(name)

    return [
        sa.func.count(c.c.id).label("calls"),
        sa.func.coalesce(sa.func.sum(sa.case((c.c.status != "ok", 1), else_=0)), 0).label(
            "failed_calls"
        ),
        total("input_tokens"),
        total("output_tokens"),
        total("cache_read_tokens"),
        total("cache_write_tokens"),
        total("reasoning_tokens"),
        sa.func.sum(c.c.cost_usd).label("cost_usd"),
        unpriced_count(c).label("unpriced_calls"),
    ]


def raw_rows(connection: sa.Connection, query: sa.Select[Any]) -> list[Any]:
    """The rows of ``query`` as the driver returns them, with no `Row` objects.

    For a hundred thousand per-run costs, building SQLAlchemy rows takes longer than
    the query; the columns are plain types (no result processing to lose).
    """
    result = connection.execute(query)
    try:
        rows = list(result.cursor.fetchall())
    finally:
        result.close()
    return rows
