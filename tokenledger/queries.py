"""Reading the ledger back: runs, calls and cost reports as typed rows.

Every query has bound parameters and returns the same rows on SQLite and on PostgreSQL.
Listings, counts and cost per outcome are SQLAlchemy Core; `report` is SQL text that one
builder (``tokenledger._report_sql``) writes for either engine, so that
``tokenledger report`` can run the very same SQL on a SQLite file without importing
SQLAlchemy. Money comes back as `~decimal.Decimal`, datetimes as timezone-aware
UTC. These functions only read: they never create or migrate a database.

How `report` avoids counting money twice
----------------------------------------
A run's stored totals include every descendant run's calls, so summing ``runs.cost_usd``
over all runs counts a sub-agent's calls once for itself and once more for each
ancestor, and run totals cannot be split by model at all. `report` therefore never sums
run totals: it sums **calls**, the one row per provider attempt, and attributes each call
to exactly one run:

* ``root_only=True`` (the default): the call counts towards its **root** run. "agent" is
  the root agent's name and a root agent's figures include its sub-agents' calls: the
  cost of one whole request, the number unit economics needs. The figures equal the sum
  of the root runs' stored totals.
* ``root_only=False``: the call counts towards the run **that made it**. Each agent,
  sub-agents included, shows only its own calls; the rows still add up to the total.

Either way each call is counted once, so grouping by model, by agent, or by both gives
rows that add up to the same total. Calls made outside any run are reported under agent
``None``.

Speed: a root run's stored totals *are* the sums of its tree's calls once it has ended
(its row is rewritten when it ends, after its calls), so a root-only report grouped by
properties of runs (agent, status, day, hour, outcome, tags) sums one row per root run
instead of one per call, and only root runs still ``running`` are summed from their
calls (see ``tokenledger._report_sql``). Grouping by model or provider, or with ``root_only=False``,
reads the calls. ``since`` selects runs by when they started (and calls outside runs by when
they were sent), so a run and all of its calls stay together; ``until`` is the
exclusive end of the same window.

Cost per successful outcome
---------------------------
`cost_per_outcome` answers "what does one successful outcome cost?" for **root runs**
(one whole request each, sub-agents included). It reads each root run's stored totals and
divides the cost of *every* run in the window (failed, errored, over budget, still
running, or without an outcome yet) by the number of successes; `success_rule`
documents what counts as one. Percentiles are nearest-rank over the exact per-run
costs (`nearest_rank`), so both engines give the same Decimal answer.

Tag keys and values, agent names and outcome labels reach the database only as bound
parameters, never as SQL text.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from tokenledger._money import from_driver
from tokenledger._outcome_sql import PERCENTILES, nearest_rank
from tokenledger._outcome_sql import economics as _economics
from tokenledger._outcome_sql import outcome_rows as _outcome_rows
from tokenledger._outcome_sql import root_history as _root_history
from tokenledger._outcomes import OutcomeEconomics, OutcomeRow, parse_success, success_rule
from tokenledger._read_sql import in_window as _in_window
from tokenledger._read_sql import reading as _reading
from tokenledger._read_sql import unpriced_count as _unpriced_count
from tokenledger._report_sql import POSTGRESQL as _POSTGRESQL
from tokenledger._report_sql import SQLITE as _SQLITE
from tokenledger._reporting import (
    REPORT_DIMENSIONS,
    TAG_PREFIX,
    ReportRow,
    parse_report_by,
    parse_since,
)
from tokenledger._reporting import UTC as _UTC
from tokenledger._reporting import report_rows as _report_rows
from tokenledger._reporting import window as _window
from tokenledger._storage import calls as calls_table
from tokenledger._storage import runs as runs_table
from tokenledger.exceptions import ConfigurationError

__all__ = [
    "PERCENTILES",
    "REPORT_DIMENSIONS",
    "TAG_PREFIX",
    "CallRow",
    "LedgerCounts",
    "OutcomeEconomics",
    "OutcomeRow",
    "ReportRow",
    "RunRow",
    "cost_per_outcome",
    "cost_per_outcome_by_agent",
    "counts",
    "list_calls",
    "list_runs",
    "nearest_rank",
    "outcomes",
    "parse_report_by",
    "parse_since",
    "parse_success",
    "report",
    "success_rule",
]


# ------------------------------------------------------------------------------- rows


@dataclasses.dataclass(frozen=True, slots=True)
class RunRow:
    """One run as stored; token and cost totals include its descendant runs.

    ``outcome`` and ``outcome_value`` are what the run achieved and what that is worth
    (None until an outcome is recorded, possibly hours later from another process).
    """

    id: str
    name: str
    parent_id: str | None
    root_id: str
    tags: dict[str, str]
    started_at: dt.datetime
    ended_at: dt.datetime | None
    status: str
    error_type: str | None
    calls: int
    failed_calls: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    cost_usd: Decimal
    unpriced_calls: int
    trace_id: str | None
    span_id: str | None
    outcome: str | None = None
    outcome_value: Decimal | None = None
    outcome_at: dt.datetime | None = None

    @property
    def is_root(self) -> bool:
        return self.parent_id is None

    @property
    def duration_ms(self) -> float | None:
        if self.ended_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds() * 1000.0


@dataclasses.dataclass(frozen=True, slots=True)
class CallRow:
    """One model call as stored, with the name of the run that made it (``agent``).

    A cost that is not a model call (``run.charge``) is a call with operation
    ``execute_tool``, no model, and the charged tool in ``tool_name``.
    """

    id: str
    run_id: str | None
    root_run_id: str | None
    agent: str | None
    operation: str
    provider: str | None
    requested_model: str | None
    model: str | None
    started_at: dt.datetime
    ended_at: dt.datetime | None
    latency_ms: float | None
    streamed: bool
    status: str
    error_type: str | None
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    usage_estimated: bool
    cost_usd: Decimal | None  # None: the model had no price (never shown as $0)
    cost_source: str | None
    price_id: str | None
    litellm_call_id: str | None
    trace_id: str | None
    span_id: str | None
    tool_name: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class LedgerCounts:
    """What a ledger holds, for ``tokenledger status``."""

    runs: int
    root_runs: int
    calls: int
    failed_calls: int
    unpriced_calls: int
    cost_usd: Decimal
    first_call_at: dt.datetime | None
    last_call_at: dt.datetime | None


# ---------------------------------------------------------------------------- helpers


def _check_limit(limit: int | None) -> int | None:
    if limit is None or limit == 0:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ConfigurationError(
            f"`limit` is {limit!r}; it must be a positive whole number (0 or None: no limit)."
        )
    return limit


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=_UTC) if value.tzinfo is None else value.astimezone(_UTC)


# ------------------------------------------------------------------------------ runs

_RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunRow))


def _run_row(mapping: Any) -> RunRow:
    values = {name: mapping[name] for name in _RUN_FIELDS}
    values["cost_usd"] = from_driver(values["cost_usd"])
    if values["outcome_value"] is not None:
        values["outcome_value"] = from_driver(values["outcome_value"])
    values["tags"] = dict(values["tags"] or {})
    values["started_at"] = _utc(values["started_at"])
    values["ended_at"] = _utc(values["ended_at"])
    values["outcome_at"] = _utc(values["outcome_at"])
    return RunRow(**values)


def list_runs(
    engine: sa.Engine,
    *,
    limit: int | None = 20,
    agent: str | None = None,
    since: str | dt.datetime | None = None,
    root_only: bool = False,
    until: str | dt.datetime | None = None,
) -> list[RunRow]:
    """The newest runs first, optionally only one agent's, only root runs, or recent ones.

    ``since`` and ``until`` select runs by when they started (``until`` exclusive).
    ``limit`` of 0 or None returns every match. .. versionadded:: 0.1.0
    """
    limit = _check_limit(limit)
    start, end = _window(since, until)
    r = runs_table
    query = sa.select(*(r.c[name] for name in _RUN_FIELDS))
    if agent is not None:
        query = query.where(r.c.name == agent)
    query = query.where(*_in_window(r.c.started_at, start, end))
    if root_only:
        query = query.where(r.c.parent_id.is_(None))
    query = query.order_by(r.c.started_at.desc(), r.c.id.desc()).limit(limit)
    with engine.connect() as connection:
        return [_run_row(row._mapping) for row in connection.execute(query)]


# ----------------------------------------------------------------------------- calls

_CALL_FIELDS = tuple(f.name for f in dataclasses.fields(CallRow) if f.name != "agent")


def _call_row(mapping: Any) -> CallRow:
    values = {name: mapping[name] for name in _CALL_FIELDS}
    values["agent"] = mapping["agent"]
    if values["cost_usd"] is not None:
        values["cost_usd"] = from_driver(values["cost_usd"])
    values["started_at"] = _utc(values["started_at"])
    values["ended_at"] = _utc(values["ended_at"])
    values["streamed"] = bool(values["streamed"])
    values["usage_estimated"] = bool(values["usage_estimated"])
    return CallRow(**values)


def list_calls(
    engine: sa.Engine,
    *,
    limit: int | None = 20,
    run_id: str | None = None,
    model: str | None = None,
    since: str | dt.datetime | None = None,
    until: str | dt.datetime | None = None,
) -> list[CallRow]:
    """The newest calls first.

    ``run_id`` selects the calls of that run and of every run below it (the calls its
    totals count). ``model`` matches the served or the requested model. ``since`` and
    ``until`` select calls by when they were sent (``until`` exclusive). ``limit`` of 0
    or None returns every match. .. versionadded:: 0.1.0
    """
    limit = _check_limit(limit)
    start, end = _window(since, until)
    c, r = calls_table, runs_table
    query = sa.select(*(c.c[name] for name in _CALL_FIELDS), r.c.name.label("agent")).select_from(
        c.outerjoin(r, c.c.run_id == r.c.id)
    )
    if run_id is not None:
        # The run and its descendants: a recursive walk down parent_id, the same on
        # SQLite and PostgreSQL.
        tree = sa.select(r.c.id).where(r.c.id == run_id).cte("run_tree", recursive=True)
        child = r.alias("child")
        tree = tree.union_all(sa.select(child.c.id).where(child.c.parent_id == tree.c.id))
        query = query.where(c.c.run_id.in_(sa.select(tree.c.id)))
    if model is not None:
        query = query.where(sa.or_(c.c.model == model, c.c.requested_model == model))
    query = query.where(*_in_window(c.c.started_at, start, end))
    query = query.order_by(c.c.started_at.desc(), c.c.id.desc()).limit(limit)
    with engine.connect() as connection:
        return [_call_row(row._mapping) for row in connection.execute(query)]


# ---------------------------------------------------------------------------- report


def report(
    engine: sa.Engine,
    *,
    by: str | Sequence[str] = ("agent",),
    since: str | dt.datetime | None = None,
    root_only: bool = True,
    until: str | dt.datetime | None = None,
) -> list[ReportRow]:
    """Cost and tokens grouped by agent, model, provider, status, day, hour, outcome or tag.

    * ``agent``: the name of the run each call is attributed to (see ``root_only``);
    * ``model``: the model that served the call, else the one requested; a tool charge
      (``run.charge``) is ``tool:NAME``;
    * ``provider``: the provider that served the call;
    * ``status``: the status of the attributed run (ok, error, budget_exceeded, ...);
    * ``day`` / ``hour``: when the attributed run started, UTC (``YYYY-MM-DD`` /
      ``YYYY-MM-DD HH:00``);
    * ``outcome``: the attributed run's outcome label (None: no outcome recorded);
    * ``tag:KEY``: the attributed run's value of tag ``KEY`` (None: no such tag).

    ``since`` / ``until`` bound when the attributed run started (``until`` exclusive).
    Every call, tool charges included, is attributed to exactly one run, so nothing is
    counted twice; root-only reports by properties of runs read each root run's totals
    (its calls' sums) instead of its calls, which is what keeps them fast (the module
    docstring explains both). Rows come most expensive first. .. versionadded:: 0.1.0
    """
    dimensions = parse_report_by(by)
    start, end = _window(since, until)
    sqlite = engine.dialect.name == "sqlite"
    with _reading(engine) as connection:

        def execute(sql: str, params: Mapping[str, Any]) -> list[Any]:
            if sqlite:
                # Handed to sqlite3 as is, exactly as ``tokenledger report`` runs it
                # without SQLAlchemy: the same statement, the same plan.
                return list(connection.exec_driver_sql(sql, dict(params)))
            # sa.text writes the named parameters in the driver's own style.
            return list(connection.execute(sa.text(sql), dict(params)))

        dialect = _SQLITE if sqlite else _POSTGRESQL
        return _report_rows(execute, dimensions, start, end, root_only=root_only, dialect=dialect)


# ---------------------------------------------------------------------------- outcomes


def cost_per_outcome(
    engine: sa.Engine,
    *,
    agent: str | None = None,
    success: str | Iterable[str] | None = None,
    since: str | dt.datetime | None = None,
    until: str | dt.datetime | None = None,
) -> OutcomeEconomics:
    """What one successful outcome of ``agent`` costs (``None``: all root runs together).

    **Cost per successful outcome = total cost of all root runs in the window ÷ number
    of successes**: errored runs, runs stopped by a budget, runs still running and runs
    with no outcome (yet) all count in the cost. ``success`` names the outcome labels
    that count as a success (a string is split on commas); by default a success is a
    run that ended ok with any outcome recorded (`success_rule` explains both rules).

    ``since`` / ``until`` bound when the runs started (``until`` exclusive). Percentiles
    are nearest-rank over the exact per-run costs (`nearest_rank`), so SQLite and
    PostgreSQL give identical Decimals.

    Raises:
        ConfigurationError: no root run matches (there is nothing to divide), or a bad
            ``success``, ``since`` or ``until``.

    .. versionadded:: 0.1.0
    """
    return _root_history(
        engine,
        agent,
        success,
        (since, until),
        refusal=", so there is no cost per outcome to compute. Check the agent name "
        "(`tokenledger runs --root-only` lists them) and the window.",
    )


def cost_per_outcome_by_agent(
    engine: sa.Engine,
    *,
    success: str | Iterable[str] | None = None,
    since: str | dt.datetime | None = None,
    until: str | dt.datetime | None = None,
    agent: str | None = None,
) -> list[OutcomeEconomics]:
    """`cost_per_outcome` for each agent that has root runs in the window, costliest first.

    ``agent`` keeps only that agent's row. An empty ledger (or window, or an agent with no
    root runs in it) gives an empty list instead of an error. .. versionadded:: 0.1.0
    """
    labels = parse_success(success)
    start, end = _window(since, until)
    rows = _economics(engine, agent=agent, start=start, end=end, labels=labels, per_agent=True)
    rows.sort(key=lambda row: (-row.total_cost_usd, row.agent or ""))
    return rows


def outcomes(
    engine: sa.Engine,
    *,
    agent: str | None = None,
    since: str | dt.datetime | None = None,
    until: str | dt.datetime | None = None,
    root_only: bool = True,
) -> list[OutcomeRow]:
    """How many runs of each agent ended with each outcome, and what they were worth.

    One row per agent and outcome label, runs with no outcome (yet) in a row of their
    own (``outcome`` None); by agent, then most frequent first. ``root_only`` (the
    default) counts root runs only; with False, sub-agent runs get rows too, and since a
    run's cost includes its sub-agents', costs of a parent's and a child's rows overlap.
    .. versionadded:: 0.1.0
    """
    start, end = _window(since, until)
    rows = _outcome_rows(engine, agent=agent, start=start, end=end, root_only=root_only)
    rows.sort(key=lambda row: (row.agent, -row.runs, row.outcome is None, row.outcome or ""))
    return rows


# ---------------------------------------------------------------------------- counts


def counts(engine: sa.Engine) -> LedgerCounts:
    """How many runs and calls the ledger holds, what they cost, and when the last was."""
    c, r = calls_table, runs_table
    run_query = sa.select(
        sa.func.count(r.c.id),
        sa.func.coalesce(sa.func.sum(sa.case((r.c.parent_id.is_(None), 1), else_=0)), 0),
    )
    call_query = sa.select(
        sa.func.count(c.c.id),
        sa.func.coalesce(sa.func.sum(sa.case((c.c.status != "ok", 1), else_=0)), 0),
        _unpriced_count(c),
        sa.func.sum(c.c.cost_usd),
        sa.func.min(c.c.started_at),
        sa.func.max(c.c.started_at),
    )
    with engine.connect() as connection:
        runs, root_runs = connection.execute(run_query).one()
        calls, failed, unpriced, cost, first, last = connection.execute(call_query).one()
    return LedgerCounts(
        runs=int(runs),
        root_runs=int(root_runs),
        calls=int(calls),
        failed_calls=int(failed),
        unpriced_calls=int(unpriced),
        cost_usd=from_driver(cost),
        first_call_at=_utc(first),
        last_call_at=_utc(last),
    )
