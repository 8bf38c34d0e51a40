"""Unit economics from the ledger's own history: forecast, reprice and break-even.

Every figure here is derived from what the ledger recorded, never from a model of what
an agent "should" cost:

* `forecast`: what a day (and a 30-day month) of N runs costs, from the observed cost
  distribution of root runs, and what one success costs;
* `reprice`: what the recorded token volumes would have cost at another model's prices,
  or after a price cut. **An estimate**: the result says so in its ``note``;
* `break_even`: given what a success earns, the margin now and the level of model
  prices, as a fraction of today's, at which the workflow pays for itself.

Money is `~decimal.Decimal` throughout; amounts computed by division are rounded to the
ledger's 12 decimal places. Like `tokenledger.queries`, these functions only read.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from typing import Literal

import sqlalchemy as sa

from tokenledger._money import MAX_USD, AmountError, from_driver, usd_text
from tokenledger._money import parse_usd as _parse_usd
from tokenledger._outcome_sql import root_history
from tokenledger._outcomes import success_rule
from tokenledger._read_sql import root_runs
from tokenledger._reporting import window
from tokenledger._reprice import (
    ESTIMATE_NOTE,
    RepricedModel,
    Repricing,
    parse_price_drop,
    reprice,
    target_price,
)
from tokenledger._storage import calls as calls_table
from tokenledger._storage import runs as runs_table
from tokenledger.exceptions import ConfigurationError
from tokenledger.semconv import OP_EXECUTE_TOOL

__all__ = [
    "DAYS_PER_MONTH",
    "ESTIMATE_NOTE",
    "FORECAST_NOTE",
    "BreakEven",
    "BreakEvenStatus",
    "Forecast",
    "RepricedModel",
    "Repricing",
    "break_even",
    "forecast",
    "parse_price_drop",
    "parse_usd",
    "reprice",
    "target_price",
]

#: A month, for monthly figures: 30 days.
DAYS_PER_MONTH = 30

#: What the p50 and p90 bands of a `Forecast` mean; carried by every forecast.
FORECAST_NOTE = (
    "Expected = mean cost per run x runs per day. The p50 and p90 bands price every run "
    "like the median or the 90th-percentile run of the history: with many runs a day's "
    "total converges on the expected figure, so the p90 band is a pessimistic bound "
    "(a costlier mix of requests), not a likely day."
)

_LEVEL_QUANTUM = Decimal("1e-4")  # price levels: hundredths of a percent
_MAX_RUNS_PER_DAY = 10**12

BreakEvenStatus = Literal[
    "profitable", "profitable_at_lower_prices", "unprofitable_at_any_price", "no_successes"
]


# ------------------------------------------------------------------------------ input


def parse_usd(value: object, *, what: str) -> Decimal:
    """An amount of US dollars from 0 to 1,000,000,000, given as str, int or Decimal.

    Floats are refused: they cannot hold most cent amounts exactly.

    Raises:
        ConfigurationError: naming ``what``, the value and the fix.

    .. versionadded:: 0.1.0
    """
    try:
        return _parse_usd(value, allow_dollar_sign=True)
    except AmountError as exc:
        if exc.reason == "range":
            raise ConfigurationError(
                f"{what} is {value!r}; it must be an amount of US dollars from 0 to "
                f'{MAX_USD:,}, e.g. "4.00".'
            ) from None
        raise ConfigurationError(
            f"{what} is {value!r}; give an amount of US dollars as a string or Decimal, "
            'e.g. "4.00".'
        ) from None


def _check_runs_per_day(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_RUNS_PER_DAY:
        raise ConfigurationError(
            f"`runs_per_day` is {value!r}; it must be a whole number of runs from 1 to "
            f"{_MAX_RUNS_PER_DAY:,}, e.g. 1000000."
        )
    return value


def _no_history(purpose: str) -> str:
    """Why there is nothing to ``purpose`` when the window holds no root run."""
    return (
        f", so there is no history to {purpose}. Record some runs first, or check the agent "
        "name (`tokenledger runs --root-only` lists them) and the window."
    )


# --------------------------------------------------------------------------- forecast


@dataclasses.dataclass(frozen=True, slots=True)
class Forecast:
    """Projected cost of ``runs_per_day`` root runs, from the ledger's history.

    ``daily_cost_usd`` = mean cost per run x runs per day (the expected cost);
    ``daily_p50_cost_usd`` and ``daily_p90_cost_usd`` price every run like the median
    and the 90th-percentile run (nearest rank). Monthly figures are 30 days.
    ``cost_per_success_usd`` and ``success_rate`` are the history's (see
    `tokenledger.queries.cost_per_outcome`); ``successes_per_day`` = success rate x runs
    per day. ``note`` says how to read the bands.

    .. versionadded:: 0.1.0
    """

    agent: str | None
    runs_per_day: int
    observed_runs: int
    success_labels: tuple[str, ...] | None
    success_rate: Decimal
    cost_per_success_usd: Decimal | None
    mean_cost_per_run_usd: Decimal
    p50_cost_per_run_usd: Decimal
    p90_cost_per_run_usd: Decimal
    daily_cost_usd: Decimal
    daily_p50_cost_usd: Decimal
    daily_p90_cost_usd: Decimal
    monthly_cost_usd: Decimal
    monthly_p50_cost_usd: Decimal
    monthly_p90_cost_usd: Decimal
    successes_per_day: Decimal
    unpriced_calls: int
    note: str = FORECAST_NOTE

    @property
    def success_rule(self) -> str:
        return success_rule(self.success_labels)


def forecast(
    engine: sa.Engine,
    *,
    runs_per_day: int,
    agent: str | None = None,
    since: str | dt.datetime | None = None,
    until: str | dt.datetime | None = None,
    success: str | Iterable[str] | None = None,
) -> Forecast:
    """What ``runs_per_day`` root runs of ``agent`` (None: of the whole ledger's mix) cost.

    The history is the root runs that started in ``since``..``until`` (all of them by
    default); each run's cost includes its sub-agents' calls and tool charges, and
    failed runs count, as they will tomorrow. ``success`` as in
    `tokenledger.queries.cost_per_outcome`.

    Raises:
        ConfigurationError: ``runs_per_day`` is not a whole number from 1 to 10^12, or
            no root run matches (no history to forecast from).

    .. versionadded:: 0.1.0
    """
    runs_per_day = _check_runs_per_day(runs_per_day)
    history = root_history(
        engine, agent, success, (since, until), refusal=_no_history("forecast from")
    )
    month = runs_per_day * DAYS_PER_MONTH
    return Forecast(
        agent=agent,
        runs_per_day=runs_per_day,
        observed_runs=history.runs,
        success_labels=history.success_labels,
        success_rate=history.success_rate,
        cost_per_success_usd=history.cost_per_success_usd,
        mean_cost_per_run_usd=history.mean_cost_per_run_usd,
        p50_cost_per_run_usd=history.p50_cost_per_run_usd,
        p90_cost_per_run_usd=history.p90_cost_per_run_usd,
        daily_cost_usd=history.mean_cost_per_run_usd * runs_per_day,
        daily_p50_cost_usd=history.p50_cost_per_run_usd * runs_per_day,
        daily_p90_cost_usd=history.p90_cost_per_run_usd * runs_per_day,
        monthly_cost_usd=history.mean_cost_per_run_usd * month,
        monthly_p50_cost_usd=history.p50_cost_per_run_usd * month,
        monthly_p90_cost_usd=history.p90_cost_per_run_usd * month,
        successes_per_day=history.success_rate * runs_per_day,
        unpriced_calls=history.unpriced_calls,
    )


# ------------------------------------------------------------------------- break-even


@dataclasses.dataclass(frozen=True, slots=True)
class BreakEven:
    """Margin per success now, and the model price level at which the workflow pays.

    ``revenue_usd`` = ``revenue_per_success_usd`` x ``successes``; ``margin_usd`` =
    revenue - ``total_cost_usd`` (every root run's cost, failures included);
    ``margin_per_success_usd`` = revenue per success - cost per success.

    ``break_even_price_level`` is the fraction of today's **model** prices at which the
    margin is zero: ``(revenue - tool_cost) / model_cost``, rounded down to 0.0001 so
    that at that level the workflow does break even. Tool charges are assumed to stay as
    they are. ``status`` is:

    * ``profitable``: the margin is zero or more now (the level, when there are model
      costs, is 1 or more: how far prices could rise);
    * ``profitable_at_lower_prices``: profitable once model prices fall to the level;
    * ``unprofitable_at_any_price``: the tool charges alone exceed the revenue, or
      there is no model cost to cut (level None);
    * ``no_successes``: no run counted as a success, so there is no revenue (level and
      per-success figures None).

    ``summary`` says it in a sentence.

    .. versionadded:: 0.1.0
    """

    agent: str | None
    success_labels: tuple[str, ...] | None
    revenue_per_success_usd: Decimal
    runs: int
    successes: int
    revenue_usd: Decimal
    total_cost_usd: Decimal
    model_cost_usd: Decimal
    tool_cost_usd: Decimal
    cost_per_success_usd: Decimal | None
    margin_per_success_usd: Decimal | None
    margin_usd: Decimal
    break_even_price_level: Decimal | None
    status: BreakEvenStatus
    unpriced_calls: int

    @property
    def success_rule(self) -> str:
        return success_rule(self.success_labels)

    @property
    def summary(self) -> str:
        """The verdict in one or two sentences, amounts in USD."""
        level = self.break_even_price_level
        if self.status == "no_successes":
            return (
                f"No run counted as a success ({self.success_rule}), so there is no revenue "
                f"to set against the {_usd(self.total_cost_usd)} spent on {self.runs:,} runs. "
                "Record outcomes, or name the success labels."
            )
        per_success = (
            f"Each success costs {_usd(self.cost_per_success_usd)} against "
            f"{_usd(self.revenue_per_success_usd)} of revenue: a margin of "
            f"{_usd(self.margin_per_success_usd)} per success."
        )
        if self.status == "profitable":
            headroom = (
                f" Model prices could rise to {_percent(level)} of today's before it stops paying."
                if level is not None
                else ""
            )
            return f"Profitable now. {per_success}{headroom}"
        if self.status == "profitable_at_lower_prices":
            assert level is not None
            drop = (1 / level).quantize(Decimal("0.01"), ROUND_HALF_EVEN)
            return (
                f"Not profitable at today's prices. {per_success} It becomes profitable when "
                f"model prices fall to {_percent(level)} of today's (a {drop.normalize():f}x "
                "price drop)."
            )
        return (
            f"Not profitable at any model price. {per_success} Even free model calls leave "
            f"the tool charges ({_usd(self.tool_cost_usd)}) above the revenue "
            f"({_usd(self.revenue_usd)})."
        )


def _usd(amount: Decimal | None) -> str:
    return usd_text(amount, style="fixed", missing="n/a")


def _percent(level: Decimal | None) -> str:
    if level is None:
        return "n/a"
    return f"{(level * 100).normalize():f} %"


def _tool_cost(
    engine: sa.Engine, *, agent: str | None, start: dt.datetime | None, end: dt.datetime | None
) -> Decimal:
    """What the tool charges of root runs (of ``agent``) in the window cost."""
    c, r = calls_table, runs_table
    query = (
        sa.select(sa.func.sum(c.c.cost_usd))
        .select_from(c.join(r, c.c.root_run_id == r.c.id))
        # A constant, not a bound parameter, so that the partial index on tool charges
        # can serve it.
        .where(c.c.operation == sa.literal_column(f"'{OP_EXECUTE_TOOL}'"))
        .where(*root_runs(agent, start, end))
    )
    with engine.connect() as connection:
        return from_driver(connection.execute(query).scalar())


def break_even(
    engine: sa.Engine,
    *,
    revenue_per_success: Decimal | str | int,
    agent: str | None = None,
    since: str | dt.datetime | None = None,
    until: str | dt.datetime | None = None,
    success: str | Iterable[str] | None = None,
) -> BreakEven:
    """The margin now, and the model price level at which ``agent``'s workflow pays.

    ``revenue_per_success`` is what one successful outcome earns, in USD (str, int or
    Decimal). Costs and successes are those of `tokenledger.queries.cost_per_outcome`
    over the same root runs; the `BreakEven` docstring defines every figure and the
    four possible verdicts.

    Raises:
        ConfigurationError: a bad ``revenue_per_success``, or no root run matches.

    .. versionadded:: 0.1.0
    """
    revenue_per_success = parse_usd(revenue_per_success, what="`revenue_per_success`")
    history = root_history(
        engine, agent, success, (since, until), refusal=_no_history("compute a break-even from")
    )
    start, end = window(since, until)
    tool_cost = min(_tool_cost(engine, agent=agent, start=start, end=end), history.total_cost_usd)
    model_cost = history.total_cost_usd - tool_cost
    revenue = revenue_per_success * history.successes
    margin = revenue - history.total_cost_usd
    level: Decimal | None = None
    status: BreakEvenStatus
    if history.successes == 0:
        status = "no_successes"
    elif margin >= 0:
        status = "profitable"
        if model_cost > 0:
            level = ((revenue - tool_cost) / model_cost).quantize(_LEVEL_QUANTUM, ROUND_FLOOR)
    elif model_cost > 0 and revenue > tool_cost:
        status = "profitable_at_lower_prices"
        level = ((revenue - tool_cost) / model_cost).quantize(_LEVEL_QUANTUM, ROUND_FLOOR)
    else:
        status = "unprofitable_at_any_price"
    cost_per_success = history.cost_per_success_usd
    return BreakEven(
        agent=agent,
        success_labels=history.success_labels,
        revenue_per_success_usd=revenue_per_success,
        runs=history.runs,
        successes=history.successes,
        revenue_usd=revenue,
        total_cost_usd=history.total_cost_usd,
        model_cost_usd=model_cost,
        tool_cost_usd=tool_cost,
        cost_per_success_usd=cost_per_success,
        margin_per_success_usd=(
            None if cost_per_success is None else revenue_per_success - cost_per_success
        ),
        margin_usd=margin,
        break_even_price_level=level,
        status=status,
        unpriced_calls=history.unpriced_calls,
    )
