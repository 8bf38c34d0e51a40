"""The reporting commands: ``outcomes``, ``economics``, ``export``, ``forecast``,
``reprice`` and ``breakeven``.

They are registered on the ``tokenledger`` group by `tokenledger.cli` (see `COMMANDS`)
and share its plumbing: ``--db`` and ``--json``, one-line errors, tables that fit the
terminal, and a start-up that imports only click: the query and economics modules (and
with them SQLAlchemy) are imported inside the commands, litellm never.

Exit status: 0 on success (an empty listing included), 1 when the ledger cannot answer
(unreachable, not migrated, or no history to compute from), 2 for a bad flag.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click

from tokenledger.cli import (
    _EMPTY,
    _SINCE_HELP,
    _Column,
    _console,
    _count,
    _db_option,
    _escape,
    _fit_table,
    _json_default,
    _json_option,
    _money,
    _open_for_reading,
    _print_json,
    _read,
    _say,
    _since_value,
    _tokens,
)
from tokenledger.exceptions import ConfigurationError

if TYPE_CHECKING:
    import sqlalchemy as sa

    from tokenledger.economics import BreakEven, Forecast, Repricing
    from tokenledger.queries import OutcomeEconomics, OutcomeRow

__all__ = [
    "COMMANDS",
    "breakeven_command",
    "economics_command",
    "export_command",
    "forecast_command",
    "outcomes_command",
    "reprice_command",
]

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")

_UNTIL_HELP = "Only runs/calls before then (exclusive): same forms as --since."
_AGENT_HELP = "Only root runs of this agent (default: every agent)."
_SUCCESS_HELP = (
    "Outcome labels that count as a success, comma-separated (e.g. resolved,accepted). "
    "Default: any outcome on a run that ended ok."
)
_NO_MATCH = "No runs match these filters."


# -------------------------------------------------------------------------- plumbing


def _until_value(until: str | None) -> dt.datetime | None:
    if until is None:
        return None
    from tokenledger.queries import parse_since

    try:
        return parse_since(until)
    except ConfigurationError as exc:
        raise click.BadParameter(
            f"{until!r} is not a time. Use a duration back from now (30m, 24h, 7d, 2w) "
            "or an ISO date (2025-01-31).",
            param_hint="'--until'",
        ) from exc


def _window_options(fn: F) -> F:
    fn = click.option("--until", metavar="WHEN", help=_UNTIL_HELP)(fn)
    return click.option("--since", metavar="WHEN", help=_SINCE_HELP)(fn)


def _agent_option(fn: F) -> F:
    return click.option("--agent", metavar="NAME", help=_AGENT_HELP)(fn)


def _success_value(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    from tokenledger.queries import parse_success

    try:
        return parse_success(value)
    except ConfigurationError as exc:
        raise click.BadParameter(
            f"{value!r} names no outcome label; give the labels that count as a success, "
            "separated by commas (for example resolved,accepted)."
        ) from exc


def _success_option(fn: F) -> F:
    return click.option("--success", metavar="LABELS", callback=_success_value, help=_SUCCESS_HELP)(
        fn
    )


def _with_history(db_url: str | None, purpose: str, compute: Callable[[sa.Engine], R]) -> R:
    """``compute`` on the ledger; a ledger without any schema yet has no history."""
    engine = _open_for_reading(db_url)
    if engine is None:
        raise click.ClickException(
            f"No runs recorded yet, so there is no history to {purpose}. Record some runs "
            "or try `tokenledger demo`."
        )
    try:
        return compute(engine)
    finally:
        engine.dispose()


def _percent(rate: Decimal) -> str:
    return f"{rate * 100:.1f} %"


def _usd(value: Decimal | None) -> str:
    """Dollars for a sentence or a table cell; negative amounts with a sign."""
    if value is None:
        return "[dim]n/a[/]"
    if value < 0:
        return "-" + _money(-value)
    return _money(value)


def _decimal_text(value: Decimal) -> str:
    """An exact Decimal as plain digits, without trailing zeros: 0.0012, 12, 0."""
    return format(value.normalize(), "f") if value else "0"


# -------------------------------------------------------------------------- outcomes


def _outcomes_table(rows: list[OutcomeRow], *, width: int) -> Any:
    return _fit_table(
        [
            _Column("Agent", [_escape(row.agent) for row in rows], name=True),
            _Column(
                "Outcome",
                [
                    _escape(row.outcome) if row.outcome is not None else "[dim](no outcome)[/]"
                    for row in rows
                ],
                name=True,
            ),
            _Column("Runs", [_count(row.runs) for row in rows]),
            _Column("Share", [_percent(row.share) for row in rows], drop=2),
            _Column(
                "Value",
                [_money(row.value_usd) if row.value_usd is not None else "" for row in rows],
            ),
            _Column("Cost", [_money(row.cost_usd) for row in rows], style="bold", drop=1),
        ],
        width=width,
        caption="Share: of the agent's runs. Value: recorded with the outcome. Cost in USD, "
        "sub-agents included.",
    )


@click.command("outcomes")
@_db_option
@_agent_option
@_window_options
@click.option("--sub-agents", is_flag=True, help="Count sub-agent runs too (default: root runs).")
@_json_option
def outcomes_command(
    *,
    db_url: str | None,
    agent: str | None,
    since: str | None,
    until: str | None,
    sub_agents: bool,
    as_json: bool,
) -> None:
    """How many runs of each agent ended with each outcome, and what they were worth.

    Runs with no outcome recorded (yet) get a row of their own.
    """
    from tokenledger.queries import outcomes

    start, end = _since_value(since), _until_value(until)
    rows, empty = _read(
        db_url,
        lambda engine: outcomes(
            engine, agent=agent, since=start, until=end, root_only=not sub_agents
        ),
    )
    if as_json:
        _print_json(rows)
    elif rows:
        console = _console()
        console.print(_outcomes_table(rows, width=console.width))
    else:
        _say(_EMPTY if empty else _NO_MATCH)


# ------------------------------------------------------------------------- economics


def _economics_table(rows: list[OutcomeEconomics], *, width: int, rule: str) -> Any:
    def success(row: OutcomeEconomics) -> str:
        return f"{_percent(row.success_rate)} [dim]({row.successes:,})[/]"

    def ratio(value: Decimal) -> str:
        return f"{value:,.1f}"

    return _fit_table(
        [
            _Column("Agent", [_escape(row.agent or "(all)") for row in rows], name=True),
            _Column("Runs", [_count(row.runs) for row in rows]),
            _Column("Success", [success(row) for row in rows]),
            _Column("Mean", [_money(row.mean_cost_per_run_usd) for row in rows]),
            _Column("p50", [_money(row.p50_cost_per_run_usd) for row in rows], drop=3),
            _Column("p90", [_money(row.p90_cost_per_run_usd) for row in rows], drop=2),
            _Column("p99", [_money(row.p99_cost_per_run_usd) for row in rows], drop=4),
            _Column(
                "Per success",
                [
                    _money(row.cost_per_success_usd)
                    if row.cost_per_success_usd is not None
                    else "[yellow]no success[/]"
                    for row in rows
                ],
                style="bold",
            ),
            _Column("Tokens/run", [ratio(row.mean_tokens_per_run) for row in rows], drop=5),
            _Column("Calls/run", [ratio(row.mean_calls_per_run) for row in rows], drop=6),
            _Column(
                "Margin",
                [_usd(row.margin_usd) if row.margin_usd is not None else "" for row in rows],
                drop=1,
            ),
        ],
        width=width,
        title="Cost per successful outcome",
        caption=(
            "Mean, p50, p90, p99: cost per run (nearest rank), sub-agents included. Per "
            "success: the cost of all runs, failed ones included, divided by the successes; "
            f"a success is {rule}. Margin: outcome values minus cost. USD."
        ),
    )


@click.command("economics")
@_db_option
@_agent_option
@_window_options
@_success_option
@_json_option
def economics_command(
    *,
    db_url: str | None,
    agent: str | None,
    since: str | None,
    until: str | None,
    success: tuple[str, ...] | None,
    as_json: bool,
) -> None:
    """Cost per successful outcome per agent: success rate, cost per run, margin.

    Cost per success = the cost of every root run (failed, over budget or without an
    outcome included) divided by the successful ones.
    """
    from tokenledger.queries import cost_per_outcome_by_agent, success_rule

    start, end = _since_value(since), _until_value(until)
    rows, empty = _read(
        db_url,
        lambda engine: cost_per_outcome_by_agent(
            engine, agent=agent, success=success, since=start, until=end
        ),
    )
    if as_json:
        _print_json(rows)
    elif rows:
        console = _console()
        console.print(_economics_table(rows, width=console.width, rule=success_rule(success)))
    else:
        _say(_EMPTY if empty else _NO_MATCH)


# ---------------------------------------------------------------------------- export


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return _decimal_text(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=_json_default, ensure_ascii=False, sort_keys=True)
    return value


def _jsonl_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return _decimal_text(value)
    return _json_default(value)


def _export_rows(
    engine: sa.Engine, what: str, start: dt.datetime | None, end: dt.datetime | None
) -> Iterator[dict[str, Any]]:
    """Every row of ``what`` in the window, oldest first, streamed in chunks of 1,000."""
    import sqlalchemy as sa

    from tokenledger import storage

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
    from tokenledger import storage

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
            out.write(json.dumps(row, default=_jsonl_default, ensure_ascii=False))
            out.write("\n")
            written += 1
    return written


@click.command("export")
@_db_option
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
@_window_options
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
    start, end = _since_value(since), _until_value(until)
    columns = _columns(what)
    engine = _open_for_reading(db_url)
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
        _say(f"Wrote {written:,} {what} to {output} ({fmt}).", err=True)
    if engine is None:
        _say(_EMPTY, err=True)


# -------------------------------------------------------------------------- forecast


def _runs_per_day_value(ctx: click.Context, param: click.Parameter, value: str) -> int:
    from tokenledger.economics import _MAX_RUNS_PER_DAY

    text = value.strip().replace("_", "").replace(",", "")
    if text.isdigit() and 1 <= int(text) <= _MAX_RUNS_PER_DAY:
        return int(text)
    raise click.BadParameter(
        f"{value!r} is not a number of runs; give a whole number from 1 to "
        f"{_MAX_RUNS_PER_DAY:,}, e.g. 1000000."
    )


def _forecast_output(result: Forecast) -> None:
    from rich import box
    from rich.table import Table

    console = _console()
    who = f"of {_escape(result.agent)}" if result.agent else "(all agents)"
    table = Table(
        title=f"Forecast for {result.runs_per_day:,} runs a day {who}",
        caption=f"From {result.observed_runs:,} recorded root runs. {result.note}",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        title_justify="left",
        title_style="bold",
        caption_justify="left",
        caption_style="dim",
        header_style="bold cyan",
    )
    table.add_column("")
    for header in ("Per run", "Per day", "Per 30 days"):
        table.add_column(header, justify="right", no_wrap=True)
    for label, run, day, month in (
        (
            "Expected (mean)",
            result.mean_cost_per_run_usd,
            result.daily_cost_usd,
            result.monthly_cost_usd,
        ),
        (
            "p50 band",
            result.p50_cost_per_run_usd,
            result.daily_p50_cost_usd,
            result.monthly_p50_cost_usd,
        ),
        (
            "p90 band",
            result.p90_cost_per_run_usd,
            result.daily_p90_cost_usd,
            result.monthly_p90_cost_usd,
        ),
    ):
        table.add_row(label, _money(run), _money(day), _money(month))
    console.print(table)
    console.print()
    per_success = (
        f"[bold]{_money(result.cost_per_success_usd)}[/] per success"
        if result.cost_per_success_usd is not None
        else "[yellow]no success recorded[/], so no cost per success"
    )
    console.print(
        f"{per_success} (success rate {_percent(result.success_rate)}; a success is "
        f"{_escape(result.success_rule)}): about {result.successes_per_day:,.0f} successes a day."
    )
    if result.unpriced_calls:
        console.print(
            f"[yellow]{result.unpriced_calls:,} recorded calls had no price: their cost is "
            "missing from these figures.[/]"
        )


@click.command("forecast")
@_db_option
@click.option(
    "--runs-per-day",
    required=True,
    metavar="N",
    callback=_runs_per_day_value,
    help="How many runs a day to project (1000000, 1_000_000 or 1,000,000).",
)
@_agent_option
@_window_options
@_success_option
@_json_option
def forecast_command(
    *,
    db_url: str | None,
    runs_per_day: int,
    agent: str | None,
    since: str | None,
    until: str | None,
    success: tuple[str, ...] | None,
    as_json: bool,
) -> None:
    """Project daily and monthly cost from the recorded cost of each run.

    Expected = mean cost per run x runs; p50/p90 bands price every run like the median
    or the 90th-percentile run. With the cost per success at the same history.
    """
    from tokenledger.economics import forecast

    start, end = _since_value(since), _until_value(until)
    result = _with_history(
        db_url,
        "forecast from",
        lambda engine: forecast(
            engine,
            runs_per_day=runs_per_day,
            agent=agent,
            since=start,
            until=end,
            success=success,
        ),
    )
    if as_json:
        _print_json({**dataclasses.asdict(result), "success_rule": result.success_rule})
    else:
        _forecast_output(result)


# --------------------------------------------------------------------------- reprice


def _price_drop_value(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    from tokenledger.economics import parse_price_drop

    try:
        return parse_price_drop(value)
    except ConfigurationError as exc:
        raise click.BadParameter(
            f"{value!r} is not a price drop; give how many times cheaper model prices get, "
            "from 1 to 1,000,000: 10x is a tenth of today's prices, 2.5x is 40 %."
        ) from exc


def _reprice_output(result: Repricing) -> None:
    console = _console()
    if result.as_model is not None:
        title = f"Repriced at {_escape(result.as_model)}'s prices ({result.price_source})"
    else:
        assert result.price_drop is not None
        title = f"Repriced after a {_decimal_text(result.price_drop)}x drop in model prices"
    rows = result.models
    tool = [result.tool_cost_usd] if result.tool_cost_usd else []

    def cells(values: list[str], tool_cell: str = "") -> list[str]:
        return values + ([tool_cell] if tool else [])

    table = _fit_table(
        [
            _Column(
                "Model",
                cells(
                    [_escape(row.model or "(unknown)") for row in rows],
                    "[dim]tool charges (unchanged)[/]",
                ),
                "[bold]Total[/]",
                name=True,
            ),
            _Column(
                "Calls",
                cells([_count(row.calls) for row in rows]),
                _count(result.calls),
                drop=3,
            ),
            _Column(
                "In",
                cells([_tokens(row.uncached_input_tokens) for row in rows]),
                drop=4,
            ),
            _Column(
                "Cached",
                cells([_tokens(row.cache_read_tokens + row.cache_write_tokens) for row in rows]),
                drop=5,
            ),
            _Column("Out", cells([_tokens(row.output_tokens) for row in rows]), drop=4),
            _Column(
                "Cost now",
                cells([_money(row.cost_usd) for row in rows], _money(result.tool_cost_usd)),
                _money(result.total_cost_usd),
            ),
            _Column(
                "Estimate",
                cells(
                    [_money(row.estimated_cost_usd) for row in rows],
                    _money(result.tool_cost_usd),
                ),
                _money(result.estimated_total_usd),
                style="bold",
            ),
        ],
        width=console.width,
        title=title,
        caption="In: uncached input tokens. Cached: cache reads and writes. Cost in USD.",
        with_total=True,
    )
    console.print(table)
    console.print()
    change = ""
    if result.total_cost_usd:
        fraction = result.change_usd / result.total_cost_usd
        change = f" ({'+' if fraction >= 0 else '-'}{_percent(abs(fraction))})"
    console.print(
        f"Total: {_money(result.total_cost_usd)} as recorded, "
        f"[bold]{_money(result.estimated_total_usd)}[/] estimated{change}."
    )
    if result.unpriced_calls:
        which = "are priced in the estimate" if result.as_model else "stay unpriced"
        console.print(
            f"[yellow]{result.unpriced_calls:,} calls had no price when recorded; they {which}.[/]"
        )
    console.print(f"[yellow]{_escape(result.note)}[/]")


@click.command("reprice")
@_db_option
@click.option(
    "--as",
    "as_model",
    metavar="MODEL",
    help="Price the recorded tokens at this model's prices (litellm's map, or a price set "
    "in the ledger).",
)
@click.option(
    "--price-drop",
    metavar="FACTOR",
    callback=_price_drop_value,
    help="Divide every model price by FACTOR: 10x is a tenth of today's prices.",
)
@_agent_option
@_window_options
@_json_option
def reprice_command(
    *,
    db_url: str | None,
    as_model: str | None,
    price_drop: Decimal | None,
    agent: str | None,
    since: str | None,
    until: str | None,
    as_json: bool,
) -> None:
    """Estimate what the recorded token volumes would cost at other prices.

    Give --as MODEL or --price-drop FACTOR. An estimate: another model would count the
    same text in other tokens and may take more or fewer steps. Tool charges stay as
    they are.
    """
    from tokenledger.economics import reprice, target_price

    if (as_model is None) == (price_drop is None):
        raise click.UsageError(
            "Give exactly one of --as MODEL (e.g. --as gpt-4o-mini) and --price-drop "
            "FACTOR (e.g. --price-drop 10x)."
        )
    start, end = _since_value(since), _until_value(until)

    def compute(engine: sa.Engine) -> Repricing:
        if as_model is not None:
            try:
                target_price(engine, as_model)
            except ConfigurationError as exc:
                raise click.BadParameter(str(exc), param_hint="'--as'") from exc
        return reprice(
            engine,
            as_model=as_model,
            price_drop=price_drop,
            agent=agent,
            since=start,
            until=end,
        )

    result = _with_history(db_url, "reprice", compute)
    if not result.calls and not result.tool_cost_usd:
        raise click.ClickException(
            "No calls match these filters, so there is nothing to reprice. Check --agent, "
            "--since and --until (`tokenledger calls` lists recorded calls)."
        )
    if as_json:
        _print_json(dataclasses.asdict(result))
    else:
        _reprice_output(result)


# ------------------------------------------------------------------------- breakeven


def _revenue_value(ctx: click.Context, param: click.Parameter, value: str) -> Decimal:
    from tokenledger.economics import parse_usd

    try:
        return parse_usd(value, what="--revenue-per-success")
    except ConfigurationError as exc:
        raise click.BadParameter(
            f"{value!r} is not an amount; give US dollars per successful outcome from 0 to "
            "1,000,000,000, e.g. 4.00."
        ) from exc


def _breakeven_output(result: BreakEven) -> None:
    level = result.break_even_price_level
    lines = [
        ("Runs", f"{result.runs:,} ({result.successes:,} successful)"),
        ("Success", f"{_escape(result.success_rule)}"),
        (
            "Revenue",
            f"{_money(result.revenue_usd)} ({_money(result.revenue_per_success_usd)} x "
            f"{result.successes:,})",
        ),
        (
            "Cost",
            f"{_money(result.total_cost_usd)} (models {_money(result.model_cost_usd)}, "
            f"tools {_money(result.tool_cost_usd)})",
        ),
        ("Per success", _usd(result.cost_per_success_usd)),
        (
            "Margin",
            f"{_usd(result.margin_usd)} ({_usd(result.margin_per_success_usd)} per success)",
        ),
        (
            "Break-even",
            f"model prices at {level * 100:.2f} % of today's"
            if level is not None
            else "[dim]n/a[/]",
        ),
    ]
    console = _console()
    for label, value in lines:
        console.print(f"{label + ':':<13}{value}")
    console.print()
    style = "green" if result.status == "profitable" else "yellow"
    console.print(f"[{style}]{_escape(result.summary)}[/]")


@click.command("breakeven")
@_db_option
@click.option(
    "--revenue-per-success",
    required=True,
    metavar="USD",
    callback=_revenue_value,
    help="What one successful outcome earns, in US dollars (e.g. 4.00).",
)
@_agent_option
@_window_options
@_success_option
@_json_option
def breakeven_command(
    *,
    db_url: str | None,
    revenue_per_success: Decimal,
    agent: str | None,
    since: str | None,
    until: str | None,
    success: tuple[str, ...] | None,
    as_json: bool,
) -> None:
    """The margin per success now, and the model price level at which it pays.

    For example: profitable when model prices fall to 62 % of today's. Tool charges are
    assumed to stay as they are.
    """
    from tokenledger.economics import break_even

    start, end = _since_value(since), _until_value(until)
    result = _with_history(
        db_url,
        "compute a break-even from",
        lambda engine: break_even(
            engine,
            revenue_per_success=revenue_per_success,
            agent=agent,
            since=start,
            until=end,
            success=success,
        ),
    )
    if as_json:
        _print_json(
            {
                **dataclasses.asdict(result),
                "success_rule": result.success_rule,
                "summary": result.summary,
            }
        )
    else:
        _breakeven_output(result)


#: Every reporting command, for `tokenledger.cli` to register on its group.
COMMANDS: list[click.Command] = [
    outcomes_command,
    economics_command,
    export_command,
    forecast_command,
    reprice_command,
    breakeven_command,
]
