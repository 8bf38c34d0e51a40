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

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Iterable, Iterator, Mapping, Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, TypeVar

import sqlalchemy as sa

from tokenledger._money import QUANTUM as _MONEY_QUANTUM
from tokenledger._money import from_driver as _money
from tokenledger._report_sql import POSTGRESQL as _POSTGRESQL
from tokenledger._report_sql import SQLITE as _SQLITE
from tokenledger._reporting import FIGURES as _FIGURES
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
from tokenledger.exceptions import ConfigurationError
from tokenledger.storage import calls as calls_table
from tokenledger.storage import runs as runs_table

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

#: The per-run cost percentiles `cost_per_outcome` reports.
PERCENTILES: tuple[int, ...] = (50, 90, 99)

V = TypeVar("V")

# Rates and per-run means of counts: six places are more than any reader needs.
_RATIO_QUANTUM = Decimal("1e-6")
_FAILED_RUN_STATUSES = frozenset({"error", "budget_exceeded"})


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


@dataclasses.dataclass(frozen=True, slots=True)
class OutcomeEconomics:
    """What one successful outcome costs, from the root runs of one agent (or of all).

    ``total_cost_usd`` is the cost of **every** root run in the window (errored, over
    budget, still running, or without an outcome included): failures are part of what
    a success costs. ``cost_per_success_usd`` is that total divided by ``successes``
    (None when there are none). ``success_labels`` is the success rule applied (None:
    the default rule); `success_rule` says it in words.

    Per-run figures are over the same runs; a run's cost, tokens and calls include its
    sub-agents'. ``pNN_cost_per_run_usd`` are nearest-rank percentiles (see
    `nearest_rank`): each is the cost of an actual run, never an interpolation.
    ``outcome_value_usd`` sums the values recorded with outcomes (None when no run has
    one) and ``margin_usd`` is that value minus ``total_cost_usd``. ``unpriced_calls``
    counts calls whose model had no price: their cost is missing from every figure.

    .. versionadded:: 0.1.0
    """

    agent: str | None
    success_labels: tuple[str, ...] | None
    runs: int
    successes: int
    failed_runs: int
    runs_without_outcome: int
    success_rate: Decimal
    total_cost_usd: Decimal
    cost_per_success_usd: Decimal | None
    mean_cost_per_run_usd: Decimal
    p50_cost_per_run_usd: Decimal
    p90_cost_per_run_usd: Decimal
    p99_cost_per_run_usd: Decimal
    mean_tokens_per_run: Decimal
    mean_calls_per_run: Decimal
    outcome_value_usd: Decimal | None
    margin_usd: Decimal | None
    unpriced_calls: int

    @property
    def success_rule(self) -> str:
        """What counted as a success, as a phrase: see `success_rule`."""
        return success_rule(self.success_labels)


@dataclasses.dataclass(frozen=True, slots=True)
class OutcomeRow:
    """How many runs of one agent ended with one outcome label, and what they were worth.

    ``outcome`` None groups the runs with no outcome recorded (yet). ``share`` is the
    fraction of the agent's runs in the window. ``value_usd`` sums the values recorded
    with the outcome (None when none was), over ``runs_with_value`` runs; ``cost_usd`` is
    what those runs cost, sub-agents included.

    .. versionadded:: 0.1.0
    """

    agent: str
    outcome: str | None
    runs: int
    share: Decimal
    runs_with_value: int
    value_usd: Decimal | None
    cost_usd: Decimal


# ---------------------------------------------------------------------------- parsing


def parse_success(success: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """The outcome labels that count as a success; a string is split on commas.

    None keeps the default rule (see `success_rule`).

    Raises:
        ConfigurationError: no label, or a label that is not a string.

    .. versionadded:: 0.1.0
    """
    if success is None:
        return None
    items = success.split(",") if isinstance(success, str) else list(success)
    labels: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigurationError(
                f"`success` has {item!r}; outcome labels are strings, e.g. 'resolved'."
            )
        if item.strip():
            labels.append(item.strip())
    if not labels:
        raise ConfigurationError(
            f"`success` is {success!r}; name the outcome labels that count as a success, "
            "e.g. resolved,accepted (or leave it out for the default rule)."
        )
    return tuple(dict.fromkeys(labels))


def success_rule(labels: Sequence[str] | None) -> str:
    """What counts as a successful run, in words.

    * ``labels`` given: a root run whose outcome is one of them, whatever its status
      (an outcome is the business result, often recorded later from elsewhere, and it
      wins over how the agent's code ended).
    * ``None`` (the default): a root run that ended ``ok`` **and** has an outcome
      recorded, whatever the label. This suits ledgers that record an outcome only when
      something was achieved; if you also record failures as outcomes ("rejected",
      "escalated"), name the success labels instead.

    .. versionadded:: 0.1.0
    """
    if labels is None:
        return "a run that ended ok with an outcome recorded (any label)"
    return "a run whose outcome is " + " or ".join(repr(label) for label in labels)


def _check_limit(limit: int | None) -> int | None:
    if limit is None or limit == 0:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ConfigurationError(
            f"`limit` is {limit!r}; it must be a positive whole number (0 or None: no limit)."
        )
    return limit


def _optional_money(value: Any) -> Decimal | None:
    return None if value is None else _money(value)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=_UTC) if value.tzinfo is None else value.astimezone(_UTC)


def _ratio(numerator: Decimal | int, denominator: int) -> Decimal:
    return (Decimal(numerator) / denominator).quantize(_RATIO_QUANTUM, ROUND_HALF_EVEN)


def _per(amount: Decimal, count: int) -> Decimal:
    return (amount / count).quantize(_MONEY_QUANTUM, ROUND_HALF_EVEN)


# ------------------------------------------------------------------------------ runs

_RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunRow))


def _run_row(mapping: Any) -> RunRow:
    values = {name: mapping[name] for name in _RUN_FIELDS}
    values["cost_usd"] = _money(values["cost_usd"])
    values["outcome_value"] = _optional_money(values["outcome_value"])
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
    if start is not None:
        query = query.where(r.c.started_at >= start)
    if end is not None:
        query = query.where(r.c.started_at < end)
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
        values["cost_usd"] = _money(values["cost_usd"])
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
    if start is not None:
        query = query.where(c.c.started_at >= start)
    if end is not None:
        query = query.where(c.c.started_at < end)
    query = query.order_by(c.c.started_at.desc(), c.c.id.desc()).limit(limit)
    with engine.connect() as connection:
        return [_call_row(row._mapping) for row in connection.execute(query)]


# ---------------------------------------------------------------------------- report


def _unpriced(c: sa.Table) -> sa.ColumnElement[int]:
    # The same rule as Run.add_call: a call with no cost is "unpriced" when it succeeded
    # or used tokens; a failed call that used nothing cost nothing and is not.
    condition = sa.and_(
        c.c.id.is_not(None),
        c.c.cost_usd.is_(None),
        sa.or_(c.c.status == "ok", c.c.input_tokens > 0, c.c.output_tokens > 0),
    )
    return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)


@contextlib.contextmanager
def _reading(engine: sa.Engine) -> Iterator[sa.Connection]:
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


def _sums(c: sa.Table) -> list[sa.ColumnElement[Any]]:
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
        _unpriced(c).label("unpriced_calls"),
    ]


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


# ------------------------------------------------------------------------ outcomes


def nearest_rank(sorted_values: Sequence[V], percentile: int) -> V:
    """The ``percentile``-th percentile of ``sorted_values`` by the nearest-rank method.

    The smallest value such that at least ``percentile`` % of the values are less than
    or equal to it: the value at 1-based rank ``ceil(percentile / 100 * n)``. Always one
    of the observed values (an actual run's cost, exact), never an interpolation, so
    SQLite and PostgreSQL agree to the last digit. Of 0.10, 0.20, 0.30, 0.40 and 1.00,
    p50 is 0.30 (rank 3) and p90 and p99 are 1.00 (rank 5).

    .. versionadded:: 0.1.0
    """
    if not sorted_values:
        raise ConfigurationError("A percentile needs at least one value.")
    if isinstance(percentile, bool) or not isinstance(percentile, int) or not 0 < percentile <= 100:
        raise ConfigurationError(
            f"`percentile` is {percentile!r}; it must be a whole number from 1 to 100."
        )
    return sorted_values[_rank(len(sorted_values), percentile) - 1]


def _rank(count: int, percentile: int) -> int:
    """The 1-based nearest rank of ``percentile`` among ``count`` values."""
    return max(-(-percentile * count // 100), 1)  # ceil, in integers


# A constant, not a bound parameter: a partial index on running runs (see the
# benchmark notes) can only serve a query whose condition is literally its own.
_RUNNING: sa.ColumnElement[Any] = sa.literal_column("'running'")


def _run_totals(
    connection: sa.Connection,
    *,
    agent: str | None,
    start: dt.datetime | None,
    end: dt.datetime | None,
) -> tuple[sa.FromClause, dict[str, sa.ColumnElement[Any]]]:
    """The runs table with each root run's totals, right even while it is running.

    A run's row is written when it starts (totals zero) and again when it ends (final
    totals, sub-agents' calls and tool charges included); its calls are written as they
    happen. So an ended run's stored totals are its calls' sums, and reading them is
    what keeps reports fast: one row per run instead of one per call. A root run still
    ``running`` (in flight, or its process died before it ended) has stale totals: its
    figures are summed from its calls instead (``root_run_id`` is indexed, and such runs
    are few). Whether any root run in the window is running is asked first, so the
    common case reads the runs table alone. Sub-agent runs keep their stored totals.
    """
    c, r = calls_table, runs_table
    # Is any root run in the window running? Written so that SQLite answers it from the
    # partial index on running runs: given ``parent_id IS NULL`` it picks the index on
    # parent_id instead (its statistics cannot tell that nearly every run is a root) and
    # walks every root run, 25 ms at a million calls. ``parent_id || ''`` is NULL
    # exactly when parent_id is, and no index offers it.
    probe = _root_filter(
        sa.select(r.c.id).where(r.c.status == _RUNNING),
        agent=agent,
        start=start,
        end=end,
        root=(r.c.parent_id + "").is_(None),
    )
    if connection.execute(probe.limit(1)).first() is None:
        return r, {name: r.c[name] for name in _FIGURES}
    running_roots = _root_filter(
        sa.select(r.c.id).where(r.c.status == _RUNNING), agent=agent, start=start, end=end
    )
    live = (
        sa.select(c.c.root_run_id.label("root_id"), *_sums(c))
        .where(c.c.root_run_id.in_(running_roots))
        .group_by(c.c.root_run_id)
        .subquery("live")
    )
    from_clause = r.outerjoin(live, live.c.root_id == r.c.id)
    summed = sa.and_(r.c.status == _RUNNING, r.c.parent_id.is_(None))
    figures: dict[str, sa.ColumnElement[Any]] = {
        name: sa.case((summed, sa.func.coalesce(live.c[name], 0)), else_=r.c[name])
        for name in _FIGURES
    }
    return from_clause, figures


def _root_filter(
    query: sa.Select[Any],
    *,
    agent: str | None,
    start: dt.datetime | None,
    end: dt.datetime | None,
    root: sa.ColumnElement[bool] | None = None,
) -> sa.Select[Any]:
    """``query`` limited to root runs (``root``: the condition that says so) of ``agent``."""
    r = runs_table
    query = query.where(r.c.parent_id.is_(None) if root is None else root)
    if agent is not None:
        query = query.where(r.c.name == agent)
    if start is not None:
        query = query.where(r.c.started_at >= start)
    if end is not None:
        query = query.where(r.c.started_at < end)
    return query


def _outcome_economics(
    engine: sa.Engine,
    *,
    agent: str | None,
    start: dt.datetime | None,
    end: dt.datetime | None,
    labels: tuple[str, ...] | None,
    per_agent: bool,
) -> list[OutcomeEconomics]:
    """`OutcomeEconomics` of the root runs in the window: one per agent, or one in all.

    Counts and sums are SQL aggregates over the runs' totals (one row per run, not per
    call). Percentiles need every run's cost: only those are fetched, sorted in Python,
    and only the ranks reported are turned into Decimals. On SQLite the cost travels as
    the stored float, whose order is the amounts' order, and the chosen value becomes
    the same Decimal `list_runs` gives for that run.
    """
    with _reading(engine) as connection:
        from_clause, figures = _run_totals(connection, agent=agent, start=start, end=end)
        return _outcome_figures(
            connection, engine, from_clause, figures, agent, start, end, labels, per_agent
        )


def _raw_rows(connection: sa.Connection, query: sa.Select[Any]) -> list[Any]:
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


def _outcome_figures(
    connection: sa.Connection,
    engine: sa.Engine,
    from_clause: sa.FromClause,
    figures: dict[str, sa.ColumnElement[Any]],
    agent: str | None,
    start: dt.datetime | None,
    end: dt.datetime | None,
    labels: tuple[str, ...] | None,
    per_agent: bool,
) -> list[OutcomeEconomics]:
    r = runs_table
    success = (
        sa.and_(r.c.outcome.is_not(None), r.c.status == "ok")
        if labels is None
        else r.c.outcome.in_(labels)
    )

    def count_of(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
        return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

    def total(expression: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        return sa.func.coalesce(sa.func.sum(expression), 0)

    name = r.c.name if per_agent else sa.null()
    aggregates = _root_filter(
        sa.select(
            name.label("name"),
            sa.func.count(r.c.id).label("runs"),
            count_of(success).label("successes"),
            count_of(r.c.status.in_(tuple(_FAILED_RUN_STATUSES))).label("failed"),
            count_of(r.c.outcome.is_(None)).label("without_outcome"),
            sa.func.sum(figures["cost_usd"]).label("cost"),
            total(figures["input_tokens"] + figures["output_tokens"]).label("tokens"),
            total(figures["calls"]).label("calls"),
            sa.func.sum(r.c.outcome_value).label("value"),
            sa.func.count(r.c.outcome_value).label("valued"),
            total(figures["unpriced_calls"]).label("unpriced"),
        ).select_from(from_clause),
        agent=agent,
        start=start,
        end=end,
    )
    if per_agent:
        aggregates = aggregates.group_by(r.c.name)
    cost = figures["cost_usd"]
    sqlite = engine.dialect.name == "sqlite"
    if not sqlite:
        # percentile_disc(f) is the value at 1-based rank ceil(f * n) of the sorted costs:
        # the nearest rank. PostgreSQL computes f * n in float8, and for 50, 90 and 99 %
        # ceil of it equals the integer ceil(pct * n / 100) for every n up to 2 * 10^8
        # (checked exhaustively). Sorting in the server saves fetching one Decimal per
        # run: at a million calls that fetch and sort took two thirds of the time.
        aggregates = aggregates.add_columns(
            *(
                sa.func.percentile_disc(percentile / 100).within_group(cost).label(f"p{percentile}")
                for percentile in PERCENTILES
            )
        )
    costs: dict[str | None, list[Any]] = {}
    found = [row for row in connection.execute(aggregates) if row.runs]
    # Over an agent's whole history with no root run still running, its runs' stored
    # costs are in the ix_runs_root_cost index in order: read the value at each rank
    # there instead of fetching every cost (at a million calls, 100k floats fetched and
    # sorted took two thirds of the time). Within a window the index cannot tell which
    # runs are in it, so fetching that window's costs stays cheaper.
    by_index = (
        sqlite
        and from_clause is r
        and start is None
        and end is None
        and (per_agent or agent is not None)
    )
    if by_index:
        picked = {
            row.name: _costs_at_ranks(connection, row.name if per_agent else agent, int(row.runs))
            for row in found
        }
        if any(values is None for values in picked.values()):
            by_index = False  # runs went away between the two reads (a purge): fetch
    if sqlite and not by_index:
        # SQLite has no percentile aggregate (and a window function over the runs is
        # slower than this): fetch the costs as the stored floats, sort them here.
        costs_query = _root_filter(
            sa.select(
                name.label("name"), sa.type_coerce(cost, sa.Float()).label("cost")
            ).select_from(from_clause),
            agent=agent,
            start=start,
            end=end,
        )
        for row_name, amount in _raw_rows(connection, costs_query):
            costs.setdefault(row_name, []).append(amount)

    results = []
    for row in found:
        if by_index:
            p50, p90, p99 = (_money(amount) for amount in picked[row.name] or ())
        elif sqlite:
            ranked = sorted(costs[row.name])
            p50, p90, p99 = (_money(nearest_rank(ranked, pct)) for pct in PERCENTILES)
        else:
            p50, p90, p99 = (_money(row._mapping[f"p{pct}"]) for pct in PERCENTILES)
        count, successes = int(row.runs), int(row.successes)
        total_cost = _money(row.cost)
        value = _money(row.value) if row.valued else None
        results.append(
            OutcomeEconomics(
                agent=row.name if per_agent else agent,
                success_labels=labels,
                runs=count,
                successes=successes,
                failed_runs=int(row.failed),
                runs_without_outcome=int(row.without_outcome),
                success_rate=_ratio(successes, count),
                total_cost_usd=total_cost,
                cost_per_success_usd=_per(total_cost, successes) if successes else None,
                mean_cost_per_run_usd=_per(total_cost, count),
                p50_cost_per_run_usd=p50,
                p90_cost_per_run_usd=p90,
                p99_cost_per_run_usd=p99,
                mean_tokens_per_run=_ratio(int(row.tokens), count),
                mean_calls_per_run=_ratio(int(row.calls), count),
                outcome_value_usd=value,
                margin_usd=None if value is None else value - total_cost,
                unpriced_calls=int(row.unpriced),
            )
        )
    return results


def _costs_at_ranks(
    connection: sa.Connection, agent: str | None, count: int
) -> tuple[float, ...] | None:
    """The p50/p90/p99 stored costs of ``agent``'s ``count`` root runs, read by rank from
    the ix_runs_root_cost index; None if there are fewer runs than that now."""
    r = runs_table
    root: sa.ColumnElement[Any] = r.c.parent_id.is_(None)
    if connection.dialect.name == "sqlite":
        # Nearly every run is a root run, which SQLite's statistics cannot tell: without
        # ``likelihood`` it walks the index on parent_id and sorts instead.
        root = sa.func.likelihood(root, sa.literal_column("0.9"))
    picked = []
    for percentile in PERCENTILES:
        query = (
            sa.select(sa.type_coerce(r.c.cost_usd, sa.Float()))
            .where(root, r.c.name == agent)
            .order_by(r.c.cost_usd)
            .limit(1)
            .offset(_rank(count, percentile) - 1)
        )
        rows = _raw_rows(connection, query)
        if not rows:
            return None
        picked.append(rows[0][0])
    return tuple(picked)


def _no_runs(agent: str | None, start: dt.datetime | None, end: dt.datetime | None) -> str:
    which = f"of agent {agent!r}" if agent is not None else "at all"
    window = ""
    if start is not None:
        window += f" since {start.isoformat()}"
    if end is not None:
        window += f" until {end.isoformat()}"
    return f"The ledger has no root runs {which}{window}"


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
    are nearest-rank over the exact per-run costs, computed in Python (`nearest_rank`),
    so SQLite and PostgreSQL give identical Decimals.

    Raises:
        ConfigurationError: no root run matches (there is nothing to divide), or a bad
            ``success``, ``since`` or ``until``.

    .. versionadded:: 0.1.0
    """
    labels = parse_success(success)
    start, end = _window(since, until)
    found = _outcome_economics(
        engine, agent=agent, start=start, end=end, labels=labels, per_agent=False
    )
    if not found:
        raise ConfigurationError(
            _no_runs(agent, start, end) + ", so there is no cost per outcome to compute. "
            "Check the agent name (`tokenledger runs --root-only` lists them) and the window."
        )
    return found[0]


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
    rows = _outcome_economics(
        engine, agent=agent, start=start, end=end, labels=labels, per_agent=True
    )
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
    with _reading(engine) as connection:
        from_clause, figures = _run_totals(connection, agent=agent, start=start, end=end)
        found = connection.execute(
            _outcomes_query(from_clause, figures, agent, start, end, root_only=root_only)
        ).all()
    per_agent: dict[str, int] = {}
    for name, _, count, *_ in found:
        per_agent[name] = per_agent.get(name, 0) + int(count)
    rows = [
        OutcomeRow(
            agent=name,
            outcome=outcome,
            runs=int(count),
            share=_ratio(int(count), per_agent[name]),
            runs_with_value=int(valued),
            value_usd=_money(value) if valued else None,
            cost_usd=_money(cost),
        )
        for name, outcome, count, valued, value, cost in found
    ]
    rows.sort(key=lambda row: (row.agent, -row.runs, row.outcome is None, row.outcome or ""))
    return rows


def _outcomes_query(
    from_clause: sa.FromClause,
    figures: dict[str, sa.ColumnElement[Any]],
    agent: str | None,
    start: dt.datetime | None,
    end: dt.datetime | None,
    *,
    root_only: bool,
) -> sa.Select[Any]:
    r = runs_table
    query = (
        sa.select(
            r.c.name,
            r.c.outcome,
            sa.func.count(r.c.id),
            sa.func.count(r.c.outcome_value),
            sa.func.sum(r.c.outcome_value),
            sa.func.sum(figures["cost_usd"]),
        )
        .select_from(from_clause)
        .group_by(r.c.name, r.c.outcome)
    )
    if root_only:
        query = query.where(r.c.parent_id.is_(None))
    if agent is not None:
        query = query.where(r.c.name == agent)
    if start is not None:
        query = query.where(r.c.started_at >= start)
    if end is not None:
        query = query.where(r.c.started_at < end)
    return query


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
        _unpriced(c),
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
        cost_usd=_money(cost),
        first_call_at=_utc(first),
        last_call_at=_utc(last),
    )
