"""Reading the ledger back: runs, calls and cost reports as typed rows.

Every query is SQLAlchemy Core with bound parameters and returns the same rows on SQLite
and on PostgreSQL. Money comes back as `~decimal.Decimal`, datetimes as timezone-aware
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
``None``. ``since`` selects runs by when they started (and calls outside runs by when
they were sent), so a run and all of its calls stay together.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from tokenledger.exceptions import ConfigurationError
from tokenledger.storage import calls as calls_table
from tokenledger.storage import runs as runs_table

__all__ = [
    "REPORT_DIMENSIONS",
    "CallRow",
    "LedgerCounts",
    "ReportRow",
    "RunRow",
    "counts",
    "list_calls",
    "list_runs",
    "parse_report_by",
    "parse_since",
    "report",
]

#: What `report` can group by, in the order the CLI documents them.
REPORT_DIMENSIONS: tuple[str, ...] = ("agent", "model", "provider", "status", "day")

_UTC = dt.timezone.utc
# Money columns are NUMERIC(24, 12): every amount is a whole number of 10^-12 dollars.
_MONEY_QUANTUM = Decimal("1e-12")
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


# ------------------------------------------------------------------------------- rows


@dataclasses.dataclass(frozen=True, slots=True)
class RunRow:
    """One run as stored; token and cost totals include its descendant runs."""

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
    """One model call as stored, with the name of the run that made it (``agent``)."""

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


@dataclasses.dataclass(frozen=True, slots=True)
class ReportRow:
    """One group of a cost report.

    ``key`` maps each ``by`` dimension to its value (``None``: calls outside any run, or
    a call with no model or provider recorded). ``runs`` counts the distinct runs the
    group's calls were attributed to (runs that made no call count too when grouping
    by agent, status or day only); ``cost_usd`` excludes the ``unpriced_calls``, whose
    models had no price.
    """

    key: dict[str, str | None]
    runs: int
    calls: int
    failed_calls: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    cost_usd: Decimal
    unpriced_calls: int

    @property
    def cached_tokens(self) -> int:
        """Input tokens read from or written to a prompt cache."""
        return self.cache_read_tokens + self.cache_write_tokens


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


# ---------------------------------------------------------------------------- parsing


def parse_since(value: str | dt.datetime, *, now: dt.datetime | None = None) -> dt.datetime:
    """The start of a time window, as an aware UTC datetime.

    Accepts a duration back from now (``30s``, ``30m``, ``24h``, ``7d``, ``2w``), an ISO
    date (``2025-01-31``, midnight UTC) or an ISO datetime (``2025-01-31T12:00``; UTC
    unless it carries an offset), or a datetime.

    Raises:
        ConfigurationError: the value is none of these.

    .. versionadded:: 0.1.0
    """
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=_UTC) if value.tzinfo is None else value.astimezone(_UTC)
    text = value.strip() if isinstance(value, str) else ""
    match = _DURATION.match(text)
    if match:
        amount, unit = int(match.group(1)), match.group(2).lower()
        delta = dt.timedelta(**{_DURATION_UNITS[unit]: amount})
        return (now or dt.datetime.now(_UTC)) - delta
    if text:
        try:
            parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return parse_since(parsed)
    raise ConfigurationError(
        f"`since` is {value!r}; use a duration back from now such as 30m, 24h, 7d or 2w, "
        "or an ISO date such as 2025-01-31."
    )


def parse_report_by(by: str | Sequence[str]) -> tuple[str, ...]:
    """Check report dimensions; a string is split on commas (``"agent,model"``).

    Raises:
        ConfigurationError: an unknown, repeated or missing dimension.
    """
    items = by.split(",") if isinstance(by, str) else list(by)
    names = tuple(str(item).strip().lower() for item in items)
    accepted = ", ".join(REPORT_DIMENSIONS)
    if not names or any(not name for name in names):
        raise ConfigurationError(
            f"`by` is {by!r}; give one or more of {accepted}, separated by commas."
        )
    for name in names:
        if name not in REPORT_DIMENSIONS:
            raise ConfigurationError(
                f"`by` has {name!r}, which is not something a report can group by; "
                f"use one or more of {accepted}."
            )
    if len(set(names)) != len(names):
        raise ConfigurationError(f"`by` is {by!r}; name each dimension once.")
    return names


def _check_limit(limit: int | None) -> int | None:
    if limit is None or limit == 0:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ConfigurationError(
            f"`limit` is {limit!r}; it must be a positive whole number (0 or None: no limit)."
        )
    return limit


def _money(value: Any) -> Decimal:
    """A money amount (or a SUM of them) from the driver, as an exact Decimal.

    PostgreSQL returns NUMERIC sums as Decimal already. SQLite has no decimal type and a
    SUM over the cost column can come back as a float: go through ``str`` (the shortest
    repr that round-trips) rather than ``Decimal(float)``'s binary expansion, then
    quantize to the column's 12 places so float noise in the 16th digit disappears.
    """
    if value is None:
        return Decimal(0).quantize(_MONEY_QUANTUM)
    amount = value if isinstance(value, Decimal) else Decimal(str(value))
    return amount.quantize(_MONEY_QUANTUM)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=_UTC) if value.tzinfo is None else value.astimezone(_UTC)


# ------------------------------------------------------------------------------ runs

_RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunRow))


def _run_row(mapping: Any) -> RunRow:
    values = {name: mapping[name] for name in _RUN_FIELDS}
    values["cost_usd"] = _money(values["cost_usd"])
    values["tags"] = dict(values["tags"] or {})
    values["started_at"] = _utc(values["started_at"])
    values["ended_at"] = _utc(values["ended_at"])
    return RunRow(**values)


def list_runs(
    engine: sa.Engine,
    *,
    limit: int | None = 20,
    agent: str | None = None,
    since: str | dt.datetime | None = None,
    root_only: bool = False,
) -> list[RunRow]:
    """The newest runs first, optionally only one agent's, only root runs, or recent ones.

    ``limit`` of 0 or None returns every match. .. versionadded:: 0.1.0
    """
    limit = _check_limit(limit)
    r = runs_table
    query = sa.select(*(r.c[name] for name in _RUN_FIELDS))
    if agent is not None:
        query = query.where(r.c.name == agent)
    if since is not None:
        query = query.where(r.c.started_at >= parse_since(since))
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
) -> list[CallRow]:
    """The newest calls first.

    ``run_id`` selects the calls of that run and of every run below it (the calls its
    totals count). ``model`` matches the served or the requested model. ``limit`` of 0
    or None returns every match. .. versionadded:: 0.1.0
    """
    limit = _check_limit(limit)
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
    if since is not None:
        query = query.where(c.c.started_at >= parse_since(since))
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


def _day(engine: sa.Engine, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """The UTC calendar date of a timestamp, as ``YYYY-MM-DD`` text, on either engine."""
    if engine.dialect.name == "postgresql":
        return sa.func.to_char(sa.func.timezone("UTC", column), "YYYY-MM-DD")
    # SQLite: UTCDateTime stores UTC text "YYYY-MM-DD HH:MM:SS.ffffff".
    return sa.func.substr(column, 1, 10)


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
) -> list[ReportRow]:
    """Cost and tokens grouped by any of agent, model, provider, status and day.

    * ``agent``: the name of the run each call is attributed to (see ``root_only``);
    * ``model``: the model that served the call, else the one requested;
    * ``provider``: the provider that served the call;
    * ``status``: the status of the attributed run (ok, error, budget_exceeded, ...);
    * ``day``: the UTC date the attributed run started (``YYYY-MM-DD``).

    Sums are over calls, each attributed to exactly one run, so nothing is counted twice
    (the module docstring explains why run totals are not summed). Rows come most
    expensive first. .. versionadded:: 0.1.0
    """
    dimensions = parse_report_by(by)
    start = parse_since(since) if since is not None else None
    c, r = calls_table, runs_table

    # Calls attributed to a run (its root, or itself): runs joined to calls.
    run_keys: dict[str, sa.ColumnElement[Any]] = {
        "agent": r.c.name,
        "model": sa.func.coalesce(c.c.model, c.c.requested_model),
        "provider": c.c.provider,
        "status": r.c.status,
        "day": _day(engine, r.c.started_at),
    }
    link = c.c.root_run_id if root_only else c.c.run_id
    # Grouped by run only, a run that made no call is still a run (an outer join);
    # grouped by a property of calls (model, provider), it belongs to no group.
    by_calls = any(name in ("model", "provider") for name in dimensions)
    joined = r.join(c, link == r.c.id) if by_calls else r.outerjoin(c, link == r.c.id)
    keys = [run_keys[name].label(f"k_{name}") for name in dimensions]
    in_runs = (
        sa.select(*keys, sa.func.count(sa.distinct(r.c.id)).label("runs"), *_sums(c))
        .select_from(joined)
        .group_by(*keys)
    )
    if root_only:
        in_runs = in_runs.where(r.c.parent_id.is_(None))
    if start is not None:
        in_runs = in_runs.where(r.c.started_at >= start)

    # Calls made outside any run: no agent, no run status; their own day.
    outside_keys: dict[str, sa.ColumnElement[Any]] = {
        "agent": sa.null(),
        "model": sa.func.coalesce(c.c.model, c.c.requested_model),
        "provider": c.c.provider,
        "status": sa.null(),
        "day": _day(engine, c.c.started_at),
    }
    okeys = [outside_keys[name].label(f"k_{name}") for name in dimensions]
    outside = sa.select(*okeys, sa.literal(0).label("runs"), *_sums(c)).where(c.c.run_id.is_(None))
    if start is not None:
        outside = outside.where(c.c.started_at >= start)
    # group_by on expressions that are NULL constants is not portable; group by the
    # real columns only and let the constant ride along.
    real = [outside_keys[name] for name in dimensions if name not in ("agent", "status")]
    if real:
        outside = outside.group_by(*real)

    # A model (or provider, or day) used both inside and outside runs comes back from
    # both queries: add the two rows up. The sets of runs are disjoint, so runs add too.
    groups: dict[tuple[str | None, ...], dict[str, Any]] = {}
    with engine.connect() as connection:
        for query in (in_runs, outside):
            for row in connection.execute(query):
                m = row._mapping
                if not m["calls"] and not m["runs"]:
                    continue  # the outside query's single row when there are none
                key = tuple(_key_text(m[f"k_{name}"]) for name in dimensions)
                group = groups.setdefault(key, dict.fromkeys(_REPORT_FIELDS, 0))
                for name in _REPORT_FIELDS:
                    group[name] += _money(m[name]) if name == "cost_usd" else int(m[name])
    rows = [
        ReportRow(key=dict(zip(dimensions, key, strict=True)), **values)
        for key, values in groups.items()
    ]
    rows.sort(key=lambda row: (-row.cost_usd, [(v is None, v or "") for v in row.key.values()]))
    return rows


_REPORT_FIELDS = tuple(f.name for f in dataclasses.fields(ReportRow) if f.name != "key")


def _key_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()[:10]
    return str(value)


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
