"""The listings of what the ledger recorded: ``runs``, ``calls``, ``report`` and
``outcomes``, and `report_table`, which ``demo`` prints too.

``tokenledger report`` on a plain SQLite file reads it with `sqlite3` and never imports
SQLAlchemy (see `_report_without_sqlalchemy`): SQLAlchemy is most of the command's
start-up, and the command is run in loops and scripts.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import click

from tokenledger.cli._options import (
    SINCE_HELP,
    Filters,
    db_option,
    filter_options,
    json_option,
    limit_option,
    name_ledger,
    read_rows,
    time_value,
)
from tokenledger.cli._render import (
    Column,
    Table,
    count_text,
    escape,
    fit_table,
    money,
    percent,
    print_rows,
    status_text,
    tokens_text,
    when,
)
from tokenledger.exceptions import ConfigurationError

if TYPE_CHECKING:
    from tokenledger.queries import CallRow, OutcomeRow, ReportRow, RunRow

__all__ = [
    "REPORT_CAPTION",
    "calls_command",
    "outcomes_command",
    "report_command",
    "report_table",
    "runs_command",
]

_NO_RUNS = "No runs match these filters."

# ---------------------------------------------------------------------------- tables

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
REPORT_CAPTION = "Tokens: In includes Cached, Out includes Reasoning. Cost in USD."


def _report_columns(rows: Sequence[ReportRow], by: Sequence[str]) -> dict[str, Column]:
    def total(name: str) -> int:
        return sum(getattr(row, name) for row in rows)

    def tokens(header: str, name: str, drop: int) -> Column:
        return Column(
            header,
            [tokens_text(getattr(row, name)) for row in rows],
            tokens_text(total(name)),
            drop=drop,
        )

    cost = sum((row.cost_usd for row in rows), Decimal(0))
    return {
        # Runs of different groups overlap (one run uses several models): no total.
        "runs": Column("Runs", [count_text(row.runs) for row in rows], drop=3),
        "calls": Column(
            "Calls", [count_text(row.calls) for row in rows], count_text(total("calls"))
        ),
        "failed": Column(
            "Failed",
            [f"[red]{row.failed_calls}[/]" if row.failed_calls else count_text(0) for row in rows],
            count_text(total("failed_calls")),
            drop=3,
        ),
        "in": tokens("In", "input_tokens", 4),
        "cached": tokens("Cached", "cached_tokens", 5),
        "out": tokens("Out", "output_tokens", 4),
        "reasoning": tokens("Reasoning", "reasoning_tokens", 6),
        "cost": Column("Cost", [money(row.cost_usd) for row in rows], money(cost), style="bold"),
        "per_run": Column(
            "Per run",
            [money(row.cost_usd / row.runs) if row.runs else "" for row in rows],
            drop=2,
        ),
        "unpriced": Column(
            "Unpriced",
            [
                f"[yellow]{row.unpriced_calls}[/]" if row.unpriced_calls else count_text(0)
                for row in rows
            ],
            count_text(total("unpriced_calls")),
        ),
    }


def report_table(
    rows: Sequence[ReportRow],
    by: Sequence[str],
    *,
    width: int,
    title: str | None = None,
    columns: Sequence[str] | None = None,
) -> Table:
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
                cells.append(status_text(value) if name == "status" else escape(value))
        keys.append(
            Column(
                _KEY_HEADERS.get(name, name),
                cells,
                "[bold]Total[/]" if position == 0 else "",
                name=True,
            )
        )
    figures = _report_columns(rows, by)
    return fit_table(
        [*keys, *(figures[name] for name in columns)],
        width=width,
        title=title,
        caption=REPORT_CAPTION,
        with_total=len(rows) > 1,
    )


def _runs_table(rows: Sequence[RunRow], *, width: int) -> Table:
    def cost(row: RunRow) -> str:
        text = money(row.cost_usd)
        return text + (f" [yellow]+{row.unpriced_calls} unpriced[/]" if row.unpriced_calls else "")

    def calls(row: RunRow) -> str:
        return count_text(row.calls) + (
            f" [red]({row.failed_calls} failed)[/]" if row.failed_calls else ""
        )

    def tags(row: RunRow) -> str:
        return escape(" ".join(f"{key}={value}" for key, value in sorted(row.tags.items())))

    return fit_table(
        [
            Column("Started", [when(row.started_at) for row in rows], left=True),
            Column(
                "Agent",
                [escape(r.name) if r.is_root else f"[dim]↳[/] {escape(r.name)}" for r in rows],
                name=True,
            ),
            Column("Status", [status_text(row.status) for row in rows], left=True),
            Column("Calls", [calls(row) for row in rows]),
            Column("In", [tokens_text(row.input_tokens) for row in rows], drop=3),
            Column("Out", [tokens_text(row.output_tokens) for row in rows], drop=3),
            Column("Cost", [cost(row) for row in rows], style="bold"),
            Column("Tags", [tags(row) for row in rows], drop=4, name=True),
            Column("Run id", [row.id for row in rows], left=True, style="dim"),
        ],
        width=width,
    )


def _calls_table(rows: Sequence[CallRow], *, width: int) -> Table:
    def model(row: CallRow) -> str:
        if row.requested_model and row.model and row.requested_model != row.model:
            return f"{escape(row.requested_model)} [dim]→[/] {escape(row.model)}"
        return escape(row.model or row.requested_model or "(unknown)")

    def status(row: CallRow) -> str:
        error = f" [dim]{escape(row.error_type)}[/]" if row.error_type else ""
        return status_text(row.status) + error

    def tokens_in(row: CallRow) -> str:
        # ~: counted by tokenledger because the provider reported no usage.
        return tokens_text(row.input_tokens) + ("[dim]~[/]" if row.usage_estimated else "")

    return fit_table(
        [
            Column("Started", [when(row.started_at) for row in rows], left=True),
            Column(
                "Agent",
                [escape(r.agent) if r.agent else "[dim](outside runs)[/]" for r in rows],
                name=True,
            ),
            Column("Model", [model(row) for row in rows], name=True),
            Column(
                "Operation",
                [row.operation + (" [dim]stream[/]" if row.streamed else "") for row in rows],
                drop=3,
            ),
            Column("Status", [status(row) for row in rows], left=True),
            Column("In", [tokens_in(row) for row in rows]),
            Column(
                "Cached",
                [tokens_text(r.cache_read_tokens + r.cache_write_tokens) for r in rows],
                drop=4,
            ),
            Column("Out", [tokens_text(row.output_tokens) for row in rows]),
            Column("Reasoning", [tokens_text(row.reasoning_tokens) for row in rows], drop=5),
            Column("Cost", [money(row.cost_usd) for row in rows], style="bold"),
            Column(
                "Latency",
                [f"{row.latency_ms:,.0f} ms" if row.latency_ms is not None else "" for row in rows],
                drop=2,
            ),
        ],
        width=width,
    )


# -------------------------------------------------------------------------- commands


@click.command("runs")
@db_option
@limit_option
@click.option("--agent", metavar="NAME", help="Only runs of this agent.")
@click.option("--since", metavar="WHEN", help=SINCE_HELP)
@click.option("--root-only", is_flag=True, help="Only root runs, not sub-agent runs.")
@json_option
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

    start = time_value(since, "--since")
    query = functools.partial(list_runs, limit=limit, agent=agent, since=start, root_only=root_only)
    runs = read_rows(db_url, query)
    print_rows(runs, as_json=as_json, table=_runs_table, no_match=_NO_RUNS)


@click.command("calls")
@db_option
@limit_option
@click.option("--run", "run_id", metavar="ID", help="Only calls of this run and its sub-runs.")
@click.option("-m", "--model", metavar="MODEL", help="Only calls to this model.")
@click.option("--since", metavar="WHEN", help=SINCE_HELP)
@json_option
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

    start = time_value(since, "--since")
    query = functools.partial(list_calls, limit=limit, run_id=run_id, model=model, since=start)
    calls = read_rows(db_url, query)
    print_rows(calls, as_json=as_json, table=_calls_table, no_match="No calls match these filters.")


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

    from tokenledger._reporting import sqlite_report
    from tokenledger.cli import _readonly

    try:
        if _readonly.is_read_only(path):
            # Read-only media or an immutable file: WAL would need files SQLite cannot
            # create there, so the file is read as such.
            connection = _readonly.connect_read_only(path)
        else:
            # mode=rw: never create a file, as every reading command promises.
            connection = sqlite3.connect(
                _readonly.sqlite_uri(path, "mode=rw"),
                uri=True,
                timeout=_location.SQLITE_BUSY_TIMEOUT_S,
            )
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
                name_ledger(path)
                raise
            return None  # no such table, and the like: the general path explains
        except sqlite3.Error:
            return None  # not a database, and the like
        if found != [(_location.KNOWN_REVISIONS[0],)]:
            return None
        name_ledger(path)

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


@click.command("report")
@db_option
@click.option(
    "--by",
    "by",
    default="agent",
    show_default=True,
    metavar="DIMS",
    help="Group by one or more of agent, model, provider, status, day, hour, outcome or "
    "tag:KEY (comma-separated).",
)
@click.option("--since", metavar="WHEN", help=SINCE_HELP)
@click.option(
    "--sub-agents",
    is_flag=True,
    help="Count each call in the run that made it, so sub-agents get rows of their own "
    "(default: in its root run, so an agent's cost includes its sub-agents').",
)
@json_option
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
    start = time_value(since, "--since")
    read = _report_without_sqlalchemy(db_url, dimensions, start, root_only=not sub_agents)
    if read is None:
        from tokenledger.queries import report

        read = read_rows(
            db_url,
            lambda engine: report(engine, by=dimensions, since=start, root_only=not sub_agents),
        )
    title = "Cost by " + ", ".join(dimensions)
    if since is not None:
        title += f" since {since}"
    table = functools.partial(report_table, by=dimensions, title=title)
    print_rows(read, as_json=as_json, table=table, no_match=_NO_RUNS)


def _outcomes_table(rows: list[OutcomeRow], *, width: int) -> Table:
    return fit_table(
        [
            Column("Agent", [escape(row.agent) for row in rows], name=True),
            Column(
                "Outcome",
                [
                    escape(row.outcome) if row.outcome is not None else "[dim](no outcome)[/]"
                    for row in rows
                ],
                name=True,
            ),
            Column("Runs", [count_text(row.runs) for row in rows]),
            Column("Share", [percent(row.share) for row in rows], drop=2),
            Column(
                "Value",
                [money(row.value_usd, missing="") for row in rows],
            ),
            Column("Cost", [money(row.cost_usd) for row in rows], style="bold", drop=1),
        ],
        width=width,
        caption="Share: of the agent's runs. Value: recorded with the outcome. Cost in USD, "
        "sub-agents included.",
    )


@click.command("outcomes")
@db_option
@filter_options(success=False)
@click.option("--sub-agents", is_flag=True, help="Count sub-agent runs too (default: root runs).")
@json_option
def outcomes_command(
    *,
    db_url: str | None,
    filters: Filters,
    sub_agents: bool,
    as_json: bool,
) -> None:
    """How many runs of each agent ended with each outcome, and what they were worth.

    Runs with no outcome recorded (yet) get a row of their own.
    """
    from tokenledger.queries import outcomes

    query = filters.query()
    print_rows(
        read_rows(db_url, functools.partial(outcomes, root_only=not sub_agents, **query)),
        as_json=as_json,
        table=_outcomes_table,
        no_match=_NO_RUNS,
        rich_only=True,
    )
