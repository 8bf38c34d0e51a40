"""The SQL of a cost report, as text with named parameters, for SQLite and PostgreSQL.

One builder writes the report queries for both engines; the few expressions in which
they differ (bucketing a timestamp into a day or an hour, reading a tag out of the JSON
document, binding a time) come from a per-engine `Dialect`. The text runs through
whatever the caller has: `sqlite3` for ``tokenledger report`` on a SQLite file (this
module imports no SQLAlchemy, which is most of that command's start-up), a SQLAlchemy
connection for `tokenledger.queries.report` on either engine.

The SQL is a constant skeleton: dimension names pick fixed expressions, and tag keys and
window bounds travel as named parameters (``:tag0``, ``:start``, ``:end``), never as SQL
text. The rules (each call counted once, root runs read from their totals) are
documented in `tokenledger.queries`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

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

#: ``execute(sql, params)``: the rows of one query with named (``:name``) parameters.
Execute = Callable[[str, Mapping[str, Any]], Iterable[Sequence[Any]]]

UTC = dt.timezone.utc


def sqlite_timestamp(value: dt.datetime) -> str:
    """An aware datetime as the UTC text UTCDateTime stores on SQLite (it sorts as time)."""
    utc = value.astimezone(UTC)
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d} "
        f"{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}.{utc.microsecond:06d}"
    )


def _aware(value: dt.datetime) -> dt.datetime:
    return value.astimezone(UTC)


@dataclasses.dataclass(frozen=True, slots=True)
class Dialect:
    """The expressions in which one engine's report SQL differs from the other's.

    ``day`` and ``hour`` format a timestamp column (``{0}``) into its UTC bucket; ``tag``
    reads the value of the run tag whose key is the parameter named ``{0}``; ``time``
    turns a window bound into the value the engine compares ``started_at`` with.
    """

    day: str
    hour: str
    tag: str
    time: Callable[[dt.datetime], object]


#: SQLite stores UTCDateTime as UTC text "YYYY-MM-DD HH:MM:SS.ffffff", which starts with
#: the day and the hour. A tag is read through json_each rather than json_extract: a JSON
#: path cannot name every key (SQLite does not unescape quotes or backslashes in a path,
#: and the stored document escapes non-ASCII keys as \u00fc, which a path never
#: matches), while json_each decodes keys.
SQLITE = Dialect(
    day="substr({0}, 1, 10)",
    hour="substr({0}, 1, 13) || ':00'",
    tag='(SELECT t.value FROM json_each(r.tags) AS t WHERE t."key" = :{0})',
    time=sqlite_timestamp,
)
#: PostgreSQL buckets with ``date_trunc`` (much cheaper per row than ``to_char``, which
#: matters over a hundred thousand runs) and returns a timestamp the caller formats. The
#: tag key is cast so ``->>`` takes it as a key, never as an array index.
POSTGRESQL = Dialect(
    day="date_trunc('day', timezone('UTC', {0}))",
    hour="date_trunc('hour', timezone('UTC', {0}))",
    tag="(r.tags ->> CAST(:{0} AS TEXT))",
    time=_aware,
)

# The served model, else the requested one; ``tool:NAME`` for a tool charge.
_MODEL_KEY = (
    "coalesce(c.model, c.requested_model, "
    "CASE WHEN c.operation = 'execute_tool' THEN 'tool:' || c.tool_name END)"
)
# The same rule as RunRecord.add_call: a call with no cost is "unpriced" when it
# succeeded or used tokens; a failed call that used nothing cost nothing and is not.
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


def report_results(
    execute: Execute,
    dialect: Dialect,
    dimensions: Sequence[str],
    start: dt.datetime | None,
    end: dt.datetime | None,
    *,
    root_only: bool,
) -> tuple[Iterable[Sequence[Any]], Iterable[Sequence[Any]]]:
    """The rows of a report's two queries: calls attributed to runs, and calls outside
    any run. Their columns are the keys (``k0``, ``k1``, ...), then `REPORT_FIELDS`.

    ``dimensions`` are checked names (``tag:KEY`` included); ``start`` / ``end`` bound
    when the attributed run started (calls outside runs: when they were sent).
    """
    params: dict[str, Any] = {}
    run_keys = {
        "agent": "r.name",
        "status": "r.status",
        "day": dialect.day.format("r.started_at"),
        "hour": dialect.hour.format("r.started_at"),
        "outcome": "r.outcome",
        "model": _MODEL_KEY,
        "provider": "c.provider",
    }
    keys: list[str] = []
    for index, name in enumerate(dimensions):
        if name.startswith(TAG_PREFIX):
            params[f"tag{index}"] = name[len(TAG_PREFIX) :]
            keys.append(dialect.tag.format(f"tag{index}"))
        else:
            keys.append(run_keys[name])
    run_window = _started_between(dialect, "r", start, end, params)
    grouping = ", ".join(keys)
    by_calls = any(name in CALL_DIMENSIONS for name in dimensions)
    if root_only and not by_calls:
        # Grouped by properties of root runs only: read one row of totals per root run.
        source, figures = _run_totals(execute, run_window, params)
        sums = ", ".join(
            f"sum({figures[name]})" if name == "cost_usd" else f"coalesce(sum({figures[name]}), 0)"
            for name in FIGURES
        )
        in_runs = (
            f"SELECT {_selected(keys)}, count(r.id) AS runs, {sums} FROM {source}"
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
            f"SELECT {_selected(keys)}, count(DISTINCT r.id) AS runs, {_CALL_SUMS} "
            f"FROM runs AS r {join} calls AS c ON {link} = r.id"
            f"{_where(*roots, *run_window)} GROUP BY {grouping}"
        )

    # Calls outside any run have no agent, run status, outcome or tags; they have a time.
    outside_keys = {
        "model": _MODEL_KEY,
        "provider": "c.provider",
        "day": dialect.day.format("c.started_at"),
        "hour": dialect.hour.format("c.started_at"),
    }
    okeys = [outside_keys.get(name, "NULL") for name in dimensions]
    outside = f"SELECT {_selected(okeys)}, 0 AS runs, {_CALL_SUMS} FROM calls AS c" + _where(
        "c.run_id IS NULL", *_started_between(dialect, "c", start, end, params)
    )
    # GROUP BY a NULL constant is not portable: group by the real keys only and let the
    # constants ride along. With none, the query gives its single row of totals.
    grouped = [key for key in okeys if key != "NULL"]
    if grouped:
        outside += " GROUP BY " + ", ".join(grouped)
    return execute(in_runs, params), execute(outside, params)


def _selected(keys: Sequence[str]) -> str:
    # Labels are positional (k0, k1, ...) so no user text (a tag key) ever becomes SQL.
    return ", ".join(f"{key} AS k{index}" for index, key in enumerate(keys))


def _started_between(
    dialect: Dialect,
    alias: str,
    start: dt.datetime | None,
    end: dt.datetime | None,
    params: dict[str, Any],
) -> list[str]:
    """Conditions on ``alias.started_at``; the bounds go into ``params``."""
    conditions = []
    if start is not None:
        params["start"] = dialect.time(start)
        conditions.append(f"{alias}.started_at >= :start")
    if end is not None:
        params["end"] = dialect.time(end)
        conditions.append(f"{alias}.started_at < :end")
    return conditions


def _where(*conditions: str) -> str:
    return " WHERE " + " AND ".join(conditions) if conditions else ""


def _run_totals(
    execute: Execute, run_window: Sequence[str], params: Mapping[str, Any]
) -> tuple[str, dict[str, str]]:
    """The FROM clause and figure expressions of root runs' totals, right even while a
    root run is running.

    A run's row is written when it starts (totals zero) and again when it ends (final
    totals, sub-agents' calls and tool charges included); its calls are written as they
    happen. So an ended root run's stored totals are its calls' sums, and reading them
    is what keeps reports fast: one row per run instead of one per call. A root run
    still ``running`` (in flight, or its process died before it ended) has stale
    totals: its figures are summed from its calls instead (``root_run_id`` is indexed,
    and such runs are few). Whether any root run in the window is running is asked
    first, so the common case reads the runs table alone.
    """
    # Asked so that SQLite answers from the partial index on running runs: given
    # ``parent_id IS NULL`` it would pick the index on parent_id and walk every root run.
    # ``parent_id || ''`` is NULL exactly when parent_id is, and no index offers it.
    # 'running' is a constant, not a parameter, for the same reason (a partial index
    # serves only a condition that is literally its own).
    probe = "SELECT r.id FROM runs AS r" + _where(
        "r.status = 'running'", "(r.parent_id || '') IS NULL", *run_window
    )
    if not list(execute(probe + " LIMIT 1", params)):
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
