"""Reading cost per outcome from the ledger: root runs' totals, aggregates, percentiles.

Everything here reads each root run's stored totals (one row per run, not per call),
except for root runs still ``running``, whose figures are summed from their calls
(`run_totals`). `economics` gives the `OutcomeEconomics` of root runs (`root_history`:
of all of them, or a refusal), `outcome_rows` the `OutcomeRow` of each agent and label.
Percentiles are nearest-rank (`nearest_rank`): each is the cost of an actual run, so
both engines give the same Decimal.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any, TypeVar

import sqlalchemy as sa

from tokenledger._money import from_driver, quantize
from tokenledger._outcomes import OutcomeEconomics, OutcomeRow, parse_success, ratio
from tokenledger._read_sql import call_sums, in_window, raw_rows, reading, root_runs
from tokenledger._report_sql import FIGURES
from tokenledger._reporting import window
from tokenledger._storage import calls as calls_table
from tokenledger._storage import runs as runs_table
from tokenledger.exceptions import ConfigurationError

__all__ = [
    "PERCENTILES",
    "costs_at_ranks",
    "economics",
    "nearest_rank",
    "outcome_rows",
    "root_history",
    "run_totals",
]

#: The per-run cost percentiles `cost_per_outcome` reports.
PERCENTILES: tuple[int, ...] = (50, 90, 99)

V = TypeVar("V")

_FAILED_RUN_STATUSES = ("budget_exceeded", "error")
# A constant, not a bound parameter: a partial index on running runs can only serve a
# query whose condition is literally its own.
_RUNNING: sa.ColumnElement[Any] = sa.literal_column("'running'")


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


def run_totals(
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
    what keeps these queries fast: one row per run instead of one per call. A root run
    still ``running`` (in flight, or its process died before it ended) has stale totals:
    its figures are summed from its calls instead (``root_run_id`` is indexed, and such
    runs are few). Whether any root run in the window is running is asked first, so the
    common case reads the runs table alone. Sub-agent runs keep their stored totals.
    The report SQL (``tokenledger._report_sql``) applies the same rule in text.
    """
    c, r = calls_table, runs_table
    # Is any root run in the window running? Written so that SQLite answers it from the
    # partial index on running runs: given ``parent_id IS NULL`` it picks the index on
    # parent_id instead (its statistics cannot tell that nearly every run is a root) and
    # walks every root run, 25 ms at a million calls. ``parent_id || ''`` is NULL
    # exactly when parent_id is, and no index offers it.
    probe = sa.select(r.c.id).where(
        r.c.status == _RUNNING, *root_runs(agent, start, end, root=(r.c.parent_id + "").is_(None))
    )
    if connection.execute(probe.limit(1)).first() is None:
        return r, {name: r.c[name] for name in FIGURES}
    running_roots = sa.select(r.c.id).where(r.c.status == _RUNNING, *root_runs(agent, start, end))
    live = (
        sa.select(c.c.root_run_id.label("root_id"), *call_sums(c))
        .where(c.c.root_run_id.in_(running_roots))
        .group_by(c.c.root_run_id)
        .subquery("live")
    )
    from_clause = r.outerjoin(live, live.c.root_id == r.c.id)
    summed = sa.and_(r.c.status == _RUNNING, r.c.parent_id.is_(None))
    figures: dict[str, sa.ColumnElement[Any]] = {
        name: sa.case((summed, sa.func.coalesce(live.c[name], 0)), else_=r.c[name])
        for name in FIGURES
    }
    return from_clause, figures


def economics(
    engine: sa.Engine,
    *,
    agent: str | None,
    start: dt.datetime | None,
    end: dt.datetime | None,
    labels: tuple[str, ...] | None,
    per_agent: bool,
) -> list[OutcomeEconomics]:
    """`OutcomeEconomics` of the root runs in the window: one per agent that has any
    (``per_agent``), or one for ``agent`` (None: all agents together) if it has any.

    Counts and sums are SQL aggregates over the runs' totals. Percentiles need every
    run's cost: PostgreSQL computes them; on SQLite only the costs are fetched, sorted
    in Python, and only the ranks reported are turned into Decimals (the cost travels as
    the stored float, whose order is the amounts' order, and the chosen value becomes
    the same Decimal `tokenledger.queries.list_runs` gives for that run).
    """
    r = runs_table
    with reading(engine) as connection:
        from_clause, figures = run_totals(connection, agent=agent, start=start, end=end)
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
        aggregates = (
            sa.select(
                name.label("name"),
                sa.func.count(r.c.id).label("runs"),
                count_of(success).label("successes"),
                count_of(r.c.status.in_(_FAILED_RUN_STATUSES)).label("failed"),
                count_of(r.c.outcome.is_(None)).label("without_outcome"),
                sa.func.sum(figures["cost_usd"]).label("cost"),
                total(figures["input_tokens"] + figures["output_tokens"]).label("tokens"),
                total(figures["calls"]).label("calls"),
                sa.func.sum(r.c.outcome_value).label("value"),
                sa.func.count(r.c.outcome_value).label("valued"),
                total(figures["unpriced_calls"]).label("unpriced"),
            )
            .select_from(from_clause)
            .where(*root_runs(agent, start, end))
        )
        if per_agent:
            aggregates = aggregates.group_by(r.c.name)
        cost = figures["cost_usd"]
        sqlite = engine.dialect.name == "sqlite"
        if not sqlite:
            # percentile_disc(f) is the value at 1-based rank ceil(f * n) of the sorted
            # costs: the nearest rank. PostgreSQL computes f * n in float8, and for 50,
            # 90 and 99 % ceil of it equals the integer ceil(pct * n / 100) for every n
            # up to 2 * 10^8 (checked exhaustively). Sorting in the server saves fetching
            # one Decimal per run: at a million calls that fetch and sort took two thirds
            # of the time.
            aggregates = aggregates.add_columns(
                *(
                    sa.func.percentile_disc(pct / 100).within_group(cost).label(f"p{pct}")
                    for pct in PERCENTILES
                )
            )
        found = [row for row in connection.execute(aggregates) if row.runs]
        if sqlite:
            picked = _sqlite_percentiles(
                connection, found, from_clause, cost, agent, start, end, per_agent=per_agent
            )
        else:
            picked = {
                row.name: tuple(from_driver(row._mapping[f"p{pct}"]) for pct in PERCENTILES)
                for row in found
            }
    return [
        _economics_row(row, picked[row.name], row.name if per_agent else agent, labels)
        for row in found
    ]


def _economics_row(
    row: Any, percentiles: Sequence[Decimal], agent: str | None, labels: tuple[str, ...] | None
) -> OutcomeEconomics:
    """One row of `economics`' aggregate query, with its p50, p90 and p99 cost per run."""
    count, successes = int(row.runs), int(row.successes)
    total_cost = from_driver(row.cost)
    value = from_driver(row.value) if row.valued else None
    p50, p90, p99 = percentiles
    return OutcomeEconomics(
        agent=agent,
        success_labels=labels,
        runs=count,
        successes=successes,
        failed_runs=int(row.failed),
        runs_without_outcome=int(row.without_outcome),
        success_rate=ratio(successes, count),
        total_cost_usd=total_cost,
        cost_per_success_usd=quantize(total_cost / successes) if successes else None,
        mean_cost_per_run_usd=quantize(total_cost / count),
        p50_cost_per_run_usd=p50,
        p90_cost_per_run_usd=p90,
        p99_cost_per_run_usd=p99,
        mean_tokens_per_run=ratio(int(row.tokens), count),
        mean_calls_per_run=ratio(int(row.calls), count),
        outcome_value_usd=value,
        margin_usd=None if value is None else value - total_cost,
        unpriced_calls=int(row.unpriced),
    )


def root_history(
    engine: sa.Engine,
    agent: str | None,
    success: str | Iterable[str] | None,
    window_bounds: tuple[str | dt.datetime | None, str | dt.datetime | None],
    *,
    refusal: str,
) -> OutcomeEconomics:
    """`OutcomeEconomics` of all root runs of ``agent`` (None: of every agent) that
    started in ``window_bounds`` (since, until): `tokenledger.queries.cost_per_outcome`,
    and the history the economics build on.

    Raises:
        ConfigurationError: a bad ``success`` or window; or no root run matches: a
            sentence saying so, then ``refusal`` (what cannot be done without them, and
            what to check).
    """
    labels = parse_success(success)
    start, end = window(*window_bounds)
    found = economics(engine, agent=agent, start=start, end=end, labels=labels, per_agent=False)
    if found:
        return found[0]
    which = f"of agent {agent!r}" if agent is not None else "at all"
    bounds = f" since {start.isoformat()}" if start is not None else ""
    bounds += f" until {end.isoformat()}" if end is not None else ""
    raise ConfigurationError(f"The ledger has no root runs {which}{bounds}{refusal}")


def _sqlite_percentiles(
    connection: sa.Connection,
    found: list[Any],
    from_clause: sa.FromClause,
    cost: sa.ColumnElement[Any],
    agent: str | None,
    start: dt.datetime | None,
    end: dt.datetime | None,
    *,
    per_agent: bool,
) -> dict[str | None, tuple[Decimal, ...]]:
    """The p50, p90 and p99 cost per run of each row's agent, on SQLite."""
    r = runs_table
    # Over an agent's whole history with no root run still running, its runs' stored
    # costs are in the ix_runs_root_cost index in order: read the value at each rank
    # there instead of fetching every cost (at a million calls, 100k floats fetched and
    # sorted took two thirds of the time). Within a window the index cannot tell which
    # runs are in it, so fetching that window's costs stays cheaper.
    if from_clause is r and start is None and end is None and (per_agent or agent is not None):
        by_index = {
            row.name: costs_at_ranks(connection, row.name if per_agent else agent, int(row.runs))
            for row in found
        }
        if all(values is not None for values in by_index.values()):
            return {
                name: tuple(from_driver(amount) for amount in values or ())
                for name, values in by_index.items()
            }
        # Runs went away between the two reads (a purge): fetch the costs instead.
    # SQLite has no percentile aggregate (and a window function over the runs is slower
    # than this): fetch the costs as the stored floats, sort them here.
    name = r.c.name if per_agent else sa.null()
    costs_query = (
        sa.select(name.label("name"), sa.type_coerce(cost, sa.Float()).label("cost"))
        .select_from(from_clause)
        .where(*root_runs(agent, start, end))
    )
    costs: dict[str | None, list[Any]] = {}
    for row_name, amount in raw_rows(connection, costs_query):
        costs.setdefault(row_name, []).append(amount)
    picked = {}
    for row_name, amounts in costs.items():
        ranked = sorted(amounts)
        picked[row_name] = tuple(from_driver(nearest_rank(ranked, pct)) for pct in PERCENTILES)
    return picked


def costs_at_ranks(
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
        rows = raw_rows(connection, query)
        if not rows:
            return None
        picked.append(rows[0][0])
    return tuple(picked)


def outcome_rows(
    engine: sa.Engine,
    *,
    agent: str | None,
    start: dt.datetime | None,
    end: dt.datetime | None,
    root_only: bool,
) -> list[OutcomeRow]:
    """An `OutcomeRow` for each agent and outcome label among the runs (root runs only,
    with ``root_only``) that started in the window, unsorted."""
    r = runs_table
    with reading(engine) as connection:
        from_clause, figures = run_totals(connection, agent=agent, start=start, end=end)
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
        query = query.where(*in_window(r.c.started_at, start, end))
        found = connection.execute(query).all()
    per_agent: dict[str, int] = {}
    for name, _, count, *_ in found:
        per_agent[name] = per_agent.get(name, 0) + int(count)
    return [
        OutcomeRow(
            agent=name,
            outcome=outcome,
            runs=int(count),
            share=ratio(int(count), per_agent[name]),
            runs_with_value=int(valued),
            value_usd=from_driver(value) if valued else None,
            cost_usd=from_driver(cost),
        )
        for name, outcome, count, valued, value, cost in found
    ]
