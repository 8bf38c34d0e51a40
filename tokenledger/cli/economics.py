"""What the recorded history means in money: ``economics`` (cost per successful
outcome), ``forecast`` (cost at a given volume), ``reprice`` (the same tokens at other
prices) and ``breakeven`` (the price level at which a success pays).

The computations live in `tokenledger.economics` and `tokenledger.queries`, imported
inside the commands (with them SQLAlchemy); litellm is never imported. Exit status: 1
when the ledger has no history to compute from.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tokenledger.cli._options import (
    Filters,
    db_option,
    filter_options,
    json_option,
    parsed_by,
    read_rows,
    with_history,
)
from tokenledger.cli._render import (
    NOT_APPLICABLE,
    Column,
    Table,
    count_text,
    decimal_text,
    escape,
    fit_table,
    make_console,
    money,
    percent,
    print_json,
    print_rows,
    rich_table,
    tokens_text,
)
from tokenledger.exceptions import ConfigurationError

if TYPE_CHECKING:
    import sqlalchemy as sa
    from _typeshed import DataclassInstance

    from tokenledger.economics import BreakEven, Forecast, Repricing
    from tokenledger.queries import OutcomeEconomics

__all__ = ["breakeven_command", "economics_command", "forecast_command", "reprice_command"]

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R", bound="DataclassInstance")


def _print_result(
    result: R, *, as_json: bool, extra: tuple[str, ...], words: Callable[[R], None]
) -> None:
    """A computed result (a dataclass) as JSON, its fields and the properties named in
    ``extra``, or in the ``words`` a person reads."""
    if as_json:
        print_json(
            {**dataclasses.asdict(result), **{name: getattr(result, name) for name in extra}}
        )
    else:
        words(result)


# ------------------------------------------------------------------------- economics


def _economics_table(rows: list[OutcomeEconomics], *, width: int, rule: str) -> Table:
    def success(row: OutcomeEconomics) -> str:
        return f"{percent(row.success_rate)} [dim]({row.successes:,})[/]"

    def ratio(value: Decimal) -> str:
        return f"{value:,.1f}"

    return fit_table(
        [
            Column("Agent", [escape(row.agent or "(all)") for row in rows], name=True),
            Column("Runs", [count_text(row.runs) for row in rows]),
            Column("Success", [success(row) for row in rows]),
            Column("Mean", [money(row.mean_cost_per_run_usd) for row in rows]),
            Column("p50", [money(row.p50_cost_per_run_usd) for row in rows], drop=3),
            Column("p90", [money(row.p90_cost_per_run_usd) for row in rows], drop=2),
            Column("p99", [money(row.p99_cost_per_run_usd) for row in rows], drop=4),
            Column(
                "Per success",
                [money(row.cost_per_success_usd, missing="[yellow]no success[/]") for row in rows],
                style="bold",
            ),
            Column("Tokens/run", [ratio(row.mean_tokens_per_run) for row in rows], drop=5),
            Column("Calls/run", [ratio(row.mean_calls_per_run) for row in rows], drop=6),
            Column(
                "Margin",
                [money(row.margin_usd, missing="") for row in rows],
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
@db_option
@filter_options(success=True)
@json_option
def economics_command(
    *,
    db_url: str | None,
    filters: Filters,
    as_json: bool,
) -> None:
    """Cost per successful outcome per agent: success rate, cost per run, margin.

    Cost per success = the cost of every root run (failed, over budget or without an
    outcome included) divided by the successful ones.
    """
    from tokenledger.queries import cost_per_outcome_by_agent, success_rule

    query = filters.query()
    print_rows(
        read_rows(db_url, functools.partial(cost_per_outcome_by_agent, **query)),
        as_json=as_json,
        table=functools.partial(_economics_table, rule=success_rule(filters.success)),
        no_match="No runs match these filters.",
        rich_only=True,
    )


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
    console = make_console()
    who = f"of {escape(result.agent)}" if result.agent else "(all agents)"
    table = rich_table(
        title=f"Forecast for {result.runs_per_day:,} runs a day {who}",
        caption=f"From {result.observed_runs:,} recorded root runs. {result.note}",
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
        table.add_row(label, money(run), money(day), money(month))
    console.print(table)
    console.print()
    per_success = (
        f"[bold]{money(result.cost_per_success_usd)}[/] per success"
        if result.cost_per_success_usd is not None
        else "[yellow]no success recorded[/], so no cost per success"
    )
    console.print(
        f"{per_success} (success rate {percent(result.success_rate)}; a success is "
        f"{escape(result.success_rule)}): about {result.successes_per_day:,.0f} successes a day."
    )
    if result.unpriced_calls:
        console.print(
            f"[yellow]{result.unpriced_calls:,} recorded calls had no price: their cost is "
            "missing from these figures.[/]"
        )


@click.command("forecast")
@db_option
@click.option(
    "--runs-per-day",
    required=True,
    metavar="N",
    callback=_runs_per_day_value,
    help="How many runs a day to project (1000000, 1_000_000 or 1,000,000).",
)
@filter_options(success=True)
@json_option
def forecast_command(
    *,
    db_url: str | None,
    runs_per_day: int,
    filters: Filters,
    as_json: bool,
) -> None:
    """Project daily and monthly cost from the recorded cost of each run.

    Expected = mean cost per run x runs; p50/p90 bands price every run like the median
    or the 90th-percentile run. With the cost per success at the same history.
    """
    from tokenledger.economics import forecast

    compute = functools.partial(forecast, runs_per_day=runs_per_day, **filters.query())
    result = with_history(db_url, "forecast from", compute)
    _print_result(result, as_json=as_json, extra=("success_rule",), words=_forecast_output)


# --------------------------------------------------------------------------- reprice


_NOT_A_PRICE_DROP = (
    "is not a price drop; give how many times cheaper model prices get, from 1 to "
    "1,000,000: 10x is a tenth of today's prices, 2.5x is 40 %."
)


def _parse_price_drop(value: str) -> Decimal:
    from tokenledger.economics import parse_price_drop

    return parse_price_drop(value)


def _reprice_output(result: Repricing) -> None:
    console = make_console()
    if result.as_model is not None:
        title = f"Repriced at {escape(result.as_model)}'s prices ({result.price_source})"
    else:
        assert result.price_drop is not None
        title = f"Repriced after a {decimal_text(result.price_drop)}x drop in model prices"
    rows = result.models
    tool = [result.tool_cost_usd] if result.tool_cost_usd else []

    def cells(values: list[str], tool_cell: str = "") -> list[str]:
        return values + ([tool_cell] if tool else [])

    table = fit_table(
        [
            Column(
                "Model",
                cells(
                    [escape(row.model or "(unknown)") for row in rows],
                    "[dim]tool charges (unchanged)[/]",
                ),
                "[bold]Total[/]",
                name=True,
            ),
            Column(
                "Calls",
                cells([count_text(row.calls) for row in rows]),
                count_text(result.calls),
                drop=3,
            ),
            Column(
                "In",
                cells([tokens_text(row.uncached_input_tokens) for row in rows]),
                drop=4,
            ),
            Column(
                "Cached",
                cells(
                    [tokens_text(row.cache_read_tokens + row.cache_write_tokens) for row in rows]
                ),
                drop=5,
            ),
            Column("Out", cells([tokens_text(row.output_tokens) for row in rows]), drop=4),
            Column(
                "Cost now",
                cells([money(row.cost_usd) for row in rows], money(result.tool_cost_usd)),
                money(result.total_cost_usd),
            ),
            Column(
                "Estimate",
                cells(
                    [money(row.estimated_cost_usd) for row in rows],
                    money(result.tool_cost_usd),
                ),
                money(result.estimated_total_usd),
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
        change = f" ({'+' if fraction >= 0 else '-'}{percent(abs(fraction))})"
    console.print(
        f"Total: {money(result.total_cost_usd)} as recorded, "
        f"[bold]{money(result.estimated_total_usd)}[/] estimated{change}."
    )
    if result.unpriced_calls:
        which = "are priced in the estimate" if result.as_model else "stay unpriced"
        console.print(
            f"[yellow]{result.unpriced_calls:,} calls had no price when recorded; they {which}.[/]"
        )
    console.print(f"[yellow]{escape(result.note)}[/]")


def _price_options(fn: F) -> F:
    """``--as`` and ``--price-drop``: the two ways to name the prices to reprice at, of
    which ``reprice`` takes exactly one."""
    fn = click.option(
        "--price-drop",
        metavar="FACTOR",
        callback=parsed_by(_parse_price_drop, _NOT_A_PRICE_DROP),
        help="Divide every model price by FACTOR: 10x is a tenth of today's prices.",
    )(fn)
    return click.option(
        "--as",
        "as_model",
        metavar="MODEL",
        help="Price the recorded tokens at this model's prices (litellm's map, or a price "
        "set in the ledger).",
    )(fn)


@click.command("reprice")
@db_option
@_price_options
@filter_options(success=False)
@json_option
def reprice_command(
    *,
    db_url: str | None,
    as_model: str | None,
    price_drop: Decimal | None,
    filters: Filters,
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
    query = filters.query()

    def compute(engine: sa.Engine) -> Repricing:
        if as_model is not None:
            try:
                target_price(engine, as_model)
            except ConfigurationError as exc:
                raise click.BadParameter(str(exc), param_hint="'--as'") from exc
        return reprice(engine, as_model=as_model, price_drop=price_drop, **query)

    result = with_history(db_url, "reprice", compute)
    if not result.calls and not result.tool_cost_usd:
        raise click.ClickException(
            "No calls match these filters, so there is nothing to reprice. Check --agent, "
            "--since and --until (`tokenledger calls` lists recorded calls)."
        )
    _print_result(result, as_json=as_json, extra=(), words=_reprice_output)


# ------------------------------------------------------------------------- breakeven


_NOT_A_REVENUE = (
    "is not an amount; give US dollars per successful outcome from 0 to 1,000,000,000, e.g. 4.00."
)


def _parse_revenue(value: str) -> Decimal:
    from tokenledger.economics import parse_usd

    return parse_usd(value, what="--revenue-per-success")


def _breakeven_output(result: BreakEven) -> None:
    level = result.break_even_price_level
    lines = [
        ("Runs", f"{result.runs:,} ({result.successes:,} successful)"),
        ("Success", f"{escape(result.success_rule)}"),
        (
            "Revenue",
            f"{money(result.revenue_usd)} ({money(result.revenue_per_success_usd)} x "
            f"{result.successes:,})",
        ),
        (
            "Cost",
            f"{money(result.total_cost_usd)} (models {money(result.model_cost_usd)}, "
            f"tools {money(result.tool_cost_usd)})",
        ),
        ("Per success", money(result.cost_per_success_usd, missing=NOT_APPLICABLE)),
        (
            "Margin",
            f"{money(result.margin_usd)} "
            f"({money(result.margin_per_success_usd, missing=NOT_APPLICABLE)} per success)",
        ),
        (
            "Break-even",
            f"model prices at {level * 100:.2f} % of today's"
            if level is not None
            else "[dim]n/a[/]",
        ),
    ]
    console = make_console()
    for label, value in lines:
        console.print(f"{label + ':':<13}{value}")
    console.print()
    style = "green" if result.status == "profitable" else "yellow"
    console.print(f"[{style}]{escape(result.summary)}[/]")


@click.command("breakeven")
@db_option
@click.option(
    "--revenue-per-success",
    required=True,
    metavar="USD",
    callback=parsed_by(_parse_revenue, _NOT_A_REVENUE),
    help="What one successful outcome earns, in US dollars (e.g. 4.00).",
)
@filter_options(success=True)
@json_option
def breakeven_command(
    *,
    db_url: str | None,
    revenue_per_success: Decimal,
    filters: Filters,
    as_json: bool,
) -> None:
    """The margin per success now, and the model price level at which it pays.

    For example: profitable when model prices fall to 62 % of today's. Tool charges are
    assumed to stay as they are.
    """
    from tokenledger.economics import break_even

    compute = functools.partial(
        break_even, revenue_per_success=revenue_per_success, **filters.query()
    )
    result = with_history(db_url, "compute a break-even from", compute)
    _print_result(
        result, as_json=as_json, extra=("success_rule", "summary"), words=_breakeven_output
    )
