"""Cost reports without SQLAlchemy: the parsing and row shapes both engines share, and
the SQL `tokenledger.queries.report` runs on a SQLite ledger.

``import sqlalchemy`` is two thirds of ``tokenledger report``'s start-up, so on a plain
SQLite file the command opens the ledger with `sqlite3` and runs `sqlite_report` here
directly (see ``tokenledger.cli``); `tokenledger.queries.report` runs the same function on
an SQLAlchemy connection, so the library and the command give the same rows. The rules
(each call counted once, root runs read from their totals) are documented in
`tokenledger.queries`; PostgreSQL keeps its SQLAlchemy Core queries there.

The SQL is a constant skeleton: dimension names pick fixed expressions, and tag keys and
window bounds travel as named parameters, never as SQL text.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from tokenledger.exceptions import ConfigurationError

#: What a report can group by, in the order the CLI documents them; any run tag can be
#: grouped by too, written ``tag:KEY`` (`TAG_PREFIX`).
REPORT_DIMENSIONS: tuple[str, ...] = (
    "agent",
    "model",
    "provider",
    "status",
    "day",
    "hour",
    "outcome",
)
#: ``tag:tenant`` groups a report by the run tag ``tenant``.
TAG_PREFIX = "tag:"
#: Dimensions that are properties of calls; every other one is a property of runs.
CALL_DIMENSIONS = frozenset({"model", "provider"})

UTC = dt.timezone.utc
# Money columns are NUMERIC(24, 12): every amount is a whole number of 10^-12 dollars.
MONEY_QUANTUM = Decimal("1e-12")
#: Enough digits to quantize any money amount (24 digits at scale 12, or a price at
#: scale 18 with 12 integer digits), or a sum of many, without rounding its integer part.
MONEY_CONTEXT = decimal.Context(prec=48)
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

#: A run's (and a group's) totals, in the order the runs table and every report query
#: give them.
FIGURES: tuple[str, ...] = (
    "calls",
    "failed_calls",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_usd",
    "unpriced_calls",
)
#: The columns of a report query after its keys: the runs, then the `FIGURES`.
REPORT_FIELDS: tuple[str, ...] = ("runs", *FIGURES)
_COST = REPORT_FIELDS.index("cost_usd")


@dataclasses.dataclass(frozen=True, slots=True)
class ReportRow:
    """One group of a cost report.

    ``key`` maps each ``by`` dimension to its value (``None``: calls outside any run, a
    call with no model or provider recorded, a run without an outcome or without the
    tag). ``runs`` counts the distinct runs the group's calls were attributed to (runs
    that made no call count too when grouping by properties of runs only); ``cost_usd``
    includes tool charges and excludes the ``unpriced_calls``, whose models had no price.
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


# ---------------------------------------------------------------------------- parsing


def parse_since(value: str | dt.datetime, *, now: dt.datetime | None = None) -> dt.datetime:
    """The start of a time window, as an aware UTC datetime.

    Accepts a duration back from now (``30s``, ``30m``, ``24h``, ``7d``, ``2w``), an ISO
    date (``2025-01-31``, midnight UTC) or an ISO datetime (``2025-01-31T12:00``; UTC
    unless it carries an offset), or a datetime. The same forms give the end of a window
    (``until``).

    Raises:
        ConfigurationError: the value is none of these.

    .. versionadded:: 0.1.0
    """
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    text = value.strip() if isinstance(value, str) else ""
    match = _DURATION.match(text)
    if match:
        amount, unit = int(match.group(1)), match.group(2).lower()
        delta = dt.timedelta(**{_DURATION_UNITS[unit]: amount})
        return (now or dt.datetime.now(UTC)) - delta
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


def window(
    since: str | dt.datetime | None, until: str | dt.datetime | None
) -> tuple[dt.datetime | None, dt.datetime | None]:
    """``since`` and ``until`` as aware UTC datetimes, checked to be in order."""
    start = parse_since(since) if since is not None else None
    if until is None:
        return start, None
    try:
        end = parse_since(until)
    except ConfigurationError as exc:
        raise ConfigurationError(str(exc).replace("`since`", "`until`", 1)) from exc
    if start is not None and end < start:
        raise ConfigurationError(
            f"`until` ({end.isoformat()}) is before `since` ({start.isoformat()}); the "
            "window must end after it starts."
        )
    return start, end


def parse_report_by(by: str | Sequence[str]) -> tuple[str, ...]:
    """Check report dimensions; a string is split on commas (``"agent,tag:tenant"``).

    Dimension names are case-insensitive; the key of ``tag:KEY`` is kept exactly as
    written (tag keys are case-sensitive).

    Raises:
        ConfigurationError: an unknown, repeated or missing dimension.
    """
    items = by.split(",") if isinstance(by, str) else list(by)
    accepted = ", ".join(REPORT_DIMENSIONS) + f", or {TAG_PREFIX}KEY for any run tag"
    names: list[str] = []
    for item in items:
        text = str(item).strip()
        if text[: len(TAG_PREFIX)].lower() == TAG_PREFIX:
            key = text[len(TAG_PREFIX) :]
            if not key:
                raise ConfigurationError(
                    f"`by` has {text!r}, which names no tag key; write {TAG_PREFIX}KEY, "
                    f"for example {TAG_PREFIX}tenant."
                )
            names.append(TAG_PREFIX + key)
        else:
            names.append(text.lower())
    if not names or any(not name for name in names):
        raise ConfigurationError(
            f"`by` is {by!r}; give one or more of {accepted}, separated by commas."
        )
    for name in names:
        if name not in REPORT_DIMENSIONS and not name.startswith(TAG_PREFIX):
            raise ConfigurationError(
                f"`by` has {name!r}, which is not something a report can group by; "
                f"use one or more of {accepted}."
            )
    if len(set(names)) != len(names):
        raise ConfigurationError(f"`by` is {by!r}; name each dimension once.")
    return tuple(names)


def money(value: Any) -> Decimal:
    """A money amount (or a SUM of them) from the driver, as an exact Decimal.

    PostgreSQL returns NUMERIC values as Decimal already. SQLite has no decimal type and
    returns a float: it goes through ``repr`` (the shortest string that round-trips it,
    0.000285 rather than its binary expansion) and is quantized to the column's 12
    places, exactly as the ``Money`` column type reads it (`tokenledger.storage`), so a
    cost read raw and the same cost read through SQLAlchemy agree to the last digit.
    """
    if value is None:
        return Decimal(0).quantize(MONEY_QUANTUM)
    if isinstance(value, Decimal):
        amount = value
    else:
        amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))
    return amount.quantize(MONEY_QUANTUM, context=MONEY_CONTEXT)


def key_text(value: Any, dimension: str = "") -> str | None:
    """A report key as text: a day as ``YYYY-MM-DD``, an hour as ``YYYY-MM-DD HH:00``."""
    if value is None:
        return None
    if isinstance(value, dt.datetime) and dimension == "hour":
        return value.strftime("%Y-%m-%d %H:00")
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()[:10]
    return str(value)


def merge_report_rows(
    dimensions: Sequence[str], results: Iterable[Iterable[Sequence[Any]]]
) -> list[ReportRow]:
    """Report rows from query results whose columns are the keys, then `REPORT_FIELDS`.

    A model (or provider, or day) used both inside and outside runs comes back from both
    queries: the two rows are added up (the sets of runs are disjoint, so runs add too).
    Rows come most expensive first, then by key (None last).
    """
    width = len(dimensions)
    groups: dict[tuple[str | None, ...], list[Any]] = {}
    for result in results:
        for row in result:
            runs, calls = row[width], row[width + 1]
            if not calls and not runs:
                continue  # the outside query's single row when there are none
            key = tuple(key_text(row[i], name) for i, name in enumerate(dimensions))
            group = groups.get(key)
            if group is None:
                group = groups[key] = [0] * len(REPORT_FIELDS)
                group[_COST] = money(0)
            for index, value in enumerate(row[width:]):
                group[index] += money(value) if index == _COST else int(value)
    rows = [
        ReportRow(
            key=dict(zip(dimensions, key, strict=True)),
            **dict(zip(REPORT_FIELDS, group, strict=True)),
        )
        for key, group in groups.items()
    ]
    rows.sort(key=lambda row: (-row.cost_usd, [(v is None, v or "") for v in row.key.values()]))
    return rows


# ------------------------------------------------------------------------ SQLite SQL

#: ``execute(sql, params)``: the rows of one query with named parameters.
Execute = Callable[[str, Mapping[str, Any]], Iterable[Sequence[Any]]]

# Keys of the attributed run (alias r) and of the call (alias c). Days and hours: the
# UTC text "YYYY-MM-DD HH:MM:SS.ffffff" UTCDateTime stores on SQLite starts with both.
_RUN_KEYS = {
    "agent": "r.name",
    "status": "r.status",
    "day": "substr(r.started_at, 1, 10)",
    "hour": "substr(r.started_at, 1, 13) || ':00'",
    "outcome": "r.outcome",
}
# The served model, else the requested one; ``tool:NAME`` for a tool charge.
_MODEL_KEY = (
    "coalesce(c.model, c.requested_model, "
    "CASE WHEN c.operation = 'execute_tool' THEN 'tool:' || c.tool_name END)"
)
_CALL_KEYS = {"model": _MODEL_KEY, "provider": "c.provider"}
# Calls outside any run have no agent, run status, outcome or tags; they have a time.
_OUTSIDE_KEYS = {
    **_CALL_KEYS,
    "day": "substr(c.started_at, 1, 10)",
    "hour": "substr(c.started_at, 1, 13) || ':00'",
}
# The value of a run tag, through json_each rather than json_extract: a JSON path
# cannot name every key (SQLite does not unescape quotes or backslashes in a path, and
# the stored document escapes non-ASCII keys as \u00fc, which a path never matches),
# while json_each decodes keys.
_TAG_KEY = '(SELECT t.value FROM json_each(r.tags) AS t WHERE t."key" = :tag{index})'
# The same rule as Run.add_call: a call with no cost is "unpriced" when it succeeded or
# used tokens; a failed call that used nothing cost nothing and is not.
_CALL_SUMS = ", ".join(
    (
        "count(c.id) AS calls",
        "coalesce(sum(CASE WHEN c.status != 'ok' THEN 1 ELSE 0 END), 0) AS failed_calls",
        *(f"coalesce(sum(c.{name}), 0) AS {name}" for name in FIGURES if name.endswith("_tokens")),
        "sum(c.cost_usd) AS cost_usd",
        "coalesce(sum(CASE WHEN c.id IS NOT NULL AND c.cost_usd IS NULL AND (c.status = "
        "'ok' OR c.input_tokens > 0 OR c.output_tokens > 0) THEN 1 ELSE 0 END), 0) "
        "AS unpriced_calls",
    )
)


def sqlite_timestamp(value: dt.datetime) -> str:
    """An aware datetime as the UTC text UTCDateTime stores on SQLite (it sorts as time)."""
    utc = value.astimezone(UTC)
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d} "
        f"{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}.{utc.microsecond:06d}"
    )


def sqlite_report(
    execute: Execute,
    dimensions: Sequence[str],
    start: dt.datetime | None,
    end: dt.datetime | None,
    *,
    root_only: bool,
) -> list[ReportRow]:
    """`tokenledger.queries.report` on a SQLite ledger, through ``execute``.

    ``dimensions`` come from `parse_report_by` and ``start`` / ``end`` from `window`.
    """
    params: dict[str, Any] = {}
    keys: list[str] = []
    for index, name in enumerate(dimensions):
        if name.startswith(TAG_PREFIX):
            params[f"tag{index}"] = name[len(TAG_PREFIX) :]
            keys.append(_TAG_KEY.format(index=index))
        else:
            keys.append(_RUN_KEYS.get(name) or _CALL_KEYS[name])
    run_window = _started_between("r", start, end, params)
    grouping = ", ".join(keys)
    selected = ", ".join(f"{key} AS k{index}" for index, key in enumerate(keys))
    by_calls = any(name in CALL_DIMENSIONS for name in dimensions)
    if root_only and not by_calls:
        # Grouped by properties of root runs only: read one row of totals per root run.
        source, figures = _run_totals_sql(execute, run_window, params)
        sums = ", ".join(
            f"sum({figures[name]})" if name == "cost_usd" else f"coalesce(sum({figures[name]}), 0)"
            for name in FIGURES
        )
        in_runs = (
            f"SELECT {selected}, count(r.id) AS runs, {sums} FROM {source}"
            f"{_where('r.parent_id IS NULL', *run_window)} GROUP BY {grouping}"
        )
    else:
        # Calls attributed to a run (its root, or itself). Grouped by run only, a run
        # that made no call is still a run (an outer join); grouped by a property of
        # calls, it belongs to no group.
        link = "c.root_run_id" if root_only else "c.run_id"
        join = "JOIN" if by_calls else "LEFT OUTER JOIN"
        roots = ("r.parent_id IS NULL",) if root_only else ()
        in_runs = (
            f"SELECT {selected}, count(DISTINCT r.id) AS runs, {_CALL_SUMS} "
            f"FROM runs AS r {join} calls AS c ON {link} = r.id"
            f"{_where(*roots, *run_window)} GROUP BY {grouping}"
        )

    outside_keys = [_OUTSIDE_KEYS.get(name, "NULL") for name in dimensions]
    outside = (
        "SELECT "
        + ", ".join(f"{key} AS k{index}" for index, key in enumerate(outside_keys))
        + f", 0 AS runs, {_CALL_SUMS} FROM calls AS c "
        + _where("c.run_id IS NULL", *_started_between("c", start, end, params))
    )
    grouped = [key for key in outside_keys if key != "NULL"]
    if grouped:
        outside += " GROUP BY " + ", ".join(grouped)
    return merge_report_rows(dimensions, (execute(in_runs, params), execute(outside, params)))


def _started_between(
    alias: str, start: dt.datetime | None, end: dt.datetime | None, params: dict[str, Any]
) -> list[str]:
    """Conditions on ``alias.started_at``; the bounds go into ``params``."""
    conditions = []
    if start is not None:
        params["start"] = sqlite_timestamp(start)
        conditions.append(f"{alias}.started_at >= :start")
    if end is not None:
        params["end"] = sqlite_timestamp(end)
        conditions.append(f"{alias}.started_at < :end")
    return conditions


def _where(*conditions: str) -> str:
    return " WHERE " + " AND ".join(conditions) if conditions else ""


def _run_totals_sql(
    execute: Execute, run_window: Sequence[str], params: Mapping[str, Any]
) -> tuple[str, dict[str, str]]:
    """The FROM clause and figure expressions of root runs' totals: their stored totals,
    except for root runs still ``running``, whose figures are summed from their calls.
    ``_run_totals`` in `tokenledger.queries` builds the same in SQLAlchemy Core, for
    reports on PostgreSQL and for cost per outcome on both engines.
    """
    # Asked so that SQLite answers from the partial index on running runs: given
    # ``parent_id IS NULL`` it would pick the index on parent_id and walk every root run.
    # ``parent_id || ''`` is NULL exactly when parent_id is, and no index offers it.
    # 'running' is a constant, not a parameter, for the same reason.
    probe = "SELECT r.id FROM runs AS r" + _where(
        "r.status = 'running'", "(r.parent_id || '') IS NULL", *run_window
    )
    probe += " LIMIT 1"
    if not list(execute(probe, params)):
        return "runs AS r", {name: f"r.{name}" for name in FIGURES}
    running = "SELECT r.id FROM runs AS r" + _where(
        "r.status = 'running'", "r.parent_id IS NULL", *run_window
    )
    live = (
        f"(SELECT c.root_run_id AS root_id, {_CALL_SUMS} FROM calls AS c "
        f"WHERE c.root_run_id IN ({running}) GROUP BY c.root_run_id) AS live"
    )
    summed = "r.status = 'running' AND r.parent_id IS NULL"
    figures = {
        name: f"CASE WHEN {summed} THEN coalesce(live.{name}, 0) ELSE r.{name} END"
        for name in FIGURES
    }
    return f"runs AS r LEFT OUTER JOIN {live} ON live.root_id = r.id", figures
