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
import re
from collections.abc import Iterable
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa

from tokenledger._money import from_driver as _money
from tokenledger._reporting import window as _window
from tokenledger.exceptions import ConfigurationError
from tokenledger.pricing import PriceBook, default_price_book
from tokenledger.queries import (
    _no_runs,
    _outcome_economics,
    parse_success,
    success_rule,
)
from tokenledger.records import PriceRecord, TokenUsage
from tokenledger.storage import calls as calls_table
from tokenledger.storage import prices as prices_table
from tokenledger.storage import runs as runs_table

if TYPE_CHECKING:
    from tokenledger.queries import OutcomeEconomics

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

#: Why a repricing is an estimate; carried by every `Repricing` and printed by the CLI.
ESTIMATE_NOTE = (
    "Estimate: the ledger's recorded token counts priced at other prices. Another model "
    "tokenizes the same text differently and may need more or fewer calls and output "
    "tokens, so its real cost will differ."
)

#: What the p50 and p90 bands of a `Forecast` mean; carried by every forecast.
FORECAST_NOTE = (
    "Expected = mean cost per run x runs per day. The p50 and p90 bands price every run "
    "like the median or the 90th-percentile run of the history: with many runs a day's "
    "total converges on the expected figure, so the p90 band is a pessimistic bound "
    "(a costlier mix of requests), not a likely day."
)

_MONEY_QUANTUM = Decimal("1e-12")
_LEVEL_QUANTUM = Decimal("1e-4")  # price levels: hundredths of a percent
_MAX_RUNS_PER_DAY = 10**12
_MAX_PRICE_DROP = Decimal(1_000_000)
_MAX_USD = Decimal(1_000_000_000)
_PRICE_DROP = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*[xX]?\s*$")
_TOOL_OPERATION = "execute_tool"

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
    if isinstance(value, (bool, float)) or not isinstance(value, (str, int, Decimal)):
        raise ConfigurationError(
            f"{what} is {value!r}; give an amount of US dollars as a string or Decimal, "
            'e.g. "4.00".'
        )
    try:
        amount = Decimal(str(value).strip().lstrip("$"))
    except InvalidOperation:
        amount = Decimal("NaN")
    if not amount.is_finite() or amount < 0 or amount > _MAX_USD:
        raise ConfigurationError(
            f"{what} is {value!r}; it must be an amount of US dollars from 0 to "
            '1,000,000,000, e.g. "4.00".'
        )
    return amount


def parse_price_drop(value: object) -> Decimal:
    """How many times cheaper model prices get: ``"10x"``, ``"10"``, ``"2.5x"``, 10, Decimal.

    The result N divides every model price (``10x``: a tenth of today's prices). It must
    be at least 1 and at most 1,000,000.

    Raises:
        ConfigurationError: naming the value and the accepted forms.

    .. versionadded:: 0.1.0
    """
    factor: Decimal | None = None
    if isinstance(value, Decimal):
        factor = value
    elif isinstance(value, int) and not isinstance(value, bool):
        factor = Decimal(value)
    elif isinstance(value, str):
        match = _PRICE_DROP.match(value)
        factor = Decimal(match.group(1)) if match else None
    if factor is None or not factor.is_finite() or not 1 <= factor <= _MAX_PRICE_DROP:
        raise ConfigurationError(
            f"`price_drop` is {value!r}; give how many times cheaper model prices get, a "
            "number from 1 to 1,000,000 such as 10x (a tenth of today's prices) or 2.5x."
        )
    return factor


def _check_runs_per_day(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_RUNS_PER_DAY:
        raise ConfigurationError(
            f"`runs_per_day` is {value!r}; it must be a whole number of runs from 1 to "
            f"{_MAX_RUNS_PER_DAY:,}, e.g. 1000000."
        )
    return value


def _history(
    engine: sa.Engine,
    *,
    agent: str | None,
    success: str | Iterable[str] | None,
    since: str | dt.datetime | None,
    until: str | dt.datetime | None,
    purpose: str,
) -> OutcomeEconomics:
    """`cost_per_outcome` of the window, or a clear refusal when it holds no root run."""
    labels = parse_success(success)
    start, end = _window(since, until)
    found = _outcome_economics(
        engine, agent=agent, start=start, end=end, labels=labels, per_agent=False
    )
    if not found:
        raise ConfigurationError(
            _no_runs(agent, start, end) + f", so there is no history to {purpose}. Record "
            "some runs first, or check the agent name (`tokenledger runs --root-only` lists "
            "them) and the window."
        )
    return found[0]


def _quantize(amount: Decimal) -> Decimal:
    return amount.quantize(_MONEY_QUANTUM, ROUND_HALF_EVEN)


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
    history = _history(
        engine, agent=agent, success=success, since=since, until=until, purpose="forecast from"
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


# ---------------------------------------------------------------------------- reprice


@dataclasses.dataclass(frozen=True, slots=True)
class RepricedModel:
    """The recorded token volumes of one model and what they cost, now and repriced.

    ``model`` is the model that served the calls (else the one requested). ``cost_usd``
    is the recorded cost of its priced calls; ``estimated_cost_usd`` is the estimate
    (``unpriced_calls`` are included in it when repricing at another model's prices,
    which have a price for their tokens, and excluded after a price drop).

    .. versionadded:: 0.1.0
    """

    model: str | None
    calls: int
    uncached_input_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    unpriced_calls: int
    cost_usd: Decimal
    estimated_cost_usd: Decimal


@dataclasses.dataclass(frozen=True, slots=True)
class Repricing:
    """What the recorded token volumes would have cost at other prices: an estimate.

    Exactly one of ``as_model`` (every call priced at that model's prices, from
    ``price_source``) and ``price_drop`` (every model price divided by it) is set.
    Tool charges (``run.charge``) are not model prices: ``tool_cost_usd`` is the same on
    both sides. ``change_usd`` = ``estimated_total_usd`` - ``total_cost_usd``. ``note``
    says why this is an estimate.

    .. versionadded:: 0.1.0
    """

    as_model: str | None
    price_drop: Decimal | None
    price_source: str | None
    models: list[RepricedModel]
    calls: int
    unpriced_calls: int
    model_cost_usd: Decimal
    estimated_model_cost_usd: Decimal
    tool_cost_usd: Decimal
    total_cost_usd: Decimal
    estimated_total_usd: Decimal
    change_usd: Decimal
    note: str = ESTIMATE_NOTE


def target_price(
    engine: sa.Engine, model: str, *, price_book: PriceBook | None = None
) -> PriceRecord:
    """The price `reprice` uses for ``model``.

    A price set for exactly that name with `Ledger.set_price` (stored in the ledger's
    ``prices`` table; the newest wins) comes first, as it does when a ledger prices a
    call; then ``price_book`` (default: litellm's bundled map), which resolves names as
    `PriceBook.lookup` does.

    Raises:
        ConfigurationError: neither has a price for ``model``.

    .. versionadded:: 0.1.0
    """
    if not isinstance(model, str) or not model.strip():
        raise ConfigurationError(
            f"`as_model` is {model!r}; name a model as litellm callers write it, e.g. "
            "'gpt-4o-mini' or 'anthropic/claude-sonnet-4-5'."
        )
    p = prices_table
    query = (
        sa.select(p)
        .where(p.c.model == model, p.c.source == "user")
        .order_by(p.c.created_at.desc(), p.c.id)
        .limit(1)
    )
    with engine.connect() as connection:
        row = connection.execute(query).first()
    if row is not None:
        m = row._mapping
        return PriceRecord(**{f.name: m[f.name] for f in dataclasses.fields(PriceRecord)})
    book = price_book if price_book is not None else default_price_book()
    found = book.lookup(model)
    if found is None:
        raise ConfigurationError(
            f"No price is known for model {model!r}: it is not in litellm's price map and "
            "this ledger has no price set for it. Check the name (as litellm callers write "
            "it, e.g. 'gpt-4o-mini' or 'anthropic/claude-sonnet-4-5'), or set its price "
            f"with ledger.set_price({model!r}, input_per_million=..., output_per_million=...)."
        )
    return found


def _flat_price(price: PriceRecord, above: int) -> PriceRecord:
    """``price`` with the tier above ``above`` input tokens as its base (no tiers)."""
    if above < 0 or not price.tiers:
        return dataclasses.replace(price, tiers=None)
    tier = next(t for t in price.tiers if t["above_input_tokens"] == above)
    return dataclasses.replace(
        price,
        input_per_token=Decimal(tier["input_per_token"]),
        output_per_token=Decimal(tier["output_per_token"]),
        cache_read_per_token=_optional_decimal(tier.get("cache_read_per_token")),
        cache_write_per_token=_optional_decimal(tier.get("cache_write_per_token")),
        reasoning_per_token=_optional_decimal(tier.get("reasoning_per_token")),
        tiers=None,
    )


def _optional_decimal(value: Any) -> Decimal | None:
    return None if value is None else Decimal(value)


def _tier_bucket(price: PriceRecord | None) -> sa.ColumnElement[Any]:
    """The threshold of the highest tier a call's input passes (-1: none), in SQL.

    Tiers apply per call (a call above 200k input tokens is priced at the higher tier),
    so tiered volumes must be summed per tier, never as one total.
    """
    thresholds = sorted(
        {int(tier["above_input_tokens"]) for tier in (price.tiers or [])} if price else (),
        reverse=True,
    )
    if not thresholds:
        return sa.literal(-1)
    c = calls_table
    return sa.case(*((c.c.input_tokens > above, above) for above in thresholds), else_=-1)


def reprice(
    engine: sa.Engine,
    *,
    as_model: str | None = None,
    price_drop: Decimal | int | str | None = None,
    since: str | dt.datetime | None = None,
    until: str | dt.datetime | None = None,
    agent: str | None = None,
    price_book: PriceBook | None = None,
) -> Repricing:
    """What the recorded token volumes would have cost at other prices. **An estimate.**

    Give exactly one of:

    * ``as_model``: every recorded model call's uncached input, cache-read, cache-write,
      output and reasoning tokens priced at that model's prices (see `target_price`),
      per call so tiered prices apply as they would have;
    * ``price_drop``: every model price divided by N (``"10x"`` or 10: a tenth).

    Token counts differ from model to model (another tokenizer, another number of
    steps), hence the estimate: ``note`` says so. Calls are those of root runs of
    ``agent`` that started in the window (each run with its sub-agents' calls), plus,
    when no agent is given, calls made outside any run in the window.

    Raises:
        ConfigurationError: neither or both of ``as_model`` and ``price_drop``, a bad
            ``price_drop``, or no price for ``as_model``.

    .. versionadded:: 0.1.0
    """
    if (as_model is None) == (price_drop is None):
        raise ConfigurationError(
            "Give exactly one of `as_model` (reprice at another model's prices, e.g. "
            "'gpt-4o-mini') and `price_drop` (divide today's prices, e.g. '10x')."
        )
    factor = parse_price_drop(price_drop) if price_drop is not None else None
    start, end = _window(since, until)
    book = price_book if price_book is not None else default_price_book()
    target = target_price(engine, as_model, price_book=book) if as_model is not None else None
    c, r = calls_table, runs_table
    is_tool = sa.case((c.c.operation == _TOOL_OPERATION, 1), else_=0)
    model = sa.func.coalesce(c.c.model, c.c.requested_model)
    bucket = _tier_bucket(target)
    cached = c.c.cache_read_tokens + c.c.cache_write_tokens
    uncached = sa.case((c.c.input_tokens > cached, c.c.input_tokens - cached), else_=0)
    unpriced = sa.and_(
        c.c.cost_usd.is_(None),
        sa.or_(c.c.status == "ok", c.c.input_tokens > 0, c.c.output_tokens > 0),
    )

    def total(expression: Any) -> sa.ColumnElement[Any]:
        return sa.func.coalesce(sa.func.sum(expression), 0)

    keys = [is_tool.label("tool"), model.label("model"), bucket.label("bucket")]
    query = (
        sa.select(
            *keys,
            sa.func.count(c.c.id).label("calls"),
            total(uncached).label("uncached"),
            total(c.c.cache_read_tokens).label("cache_read"),
            total(c.c.cache_write_tokens).label("cache_write"),
            total(c.c.output_tokens).label("output"),
            total(c.c.reasoning_tokens).label("reasoning"),
            sa.func.sum(c.c.cost_usd).label("cost"),
            total(sa.case((unpriced, 1), else_=0)).label("unpriced"),
        )
        .select_from(c.outerjoin(r, c.c.root_run_id == r.c.id))
        .where(_in_scope(agent, start, end))
        .group_by(*keys)
    )
    with engine.connect() as connection:
        found = connection.execute(query).all()

    tool_cost = Decimal(0)
    per_model: dict[str | None, dict[str, Any]] = {}
    for row in found:
        cost = _money(row.cost)
        if row.tool:
            tool_cost += cost
            continue
        usage = TokenUsage(
            input_tokens=int(row.uncached) + int(row.cache_read) + int(row.cache_write),
            output_tokens=int(row.output),
            cache_read_tokens=int(row.cache_read),
            cache_write_tokens=int(row.cache_write),
            reasoning_tokens=int(row.reasoning),
        )
        if target is not None:
            estimate = book.cost(_flat_price(target, int(row.bucket)), usage)
        else:
            assert factor is not None
            estimate = cost / factor
        group = per_model.setdefault(
            row.model, {"usage": TokenUsage(), "calls": 0, "unpriced": 0, "cost": Decimal(0)}
        )
        group["usage"] += usage
        group["calls"] += int(row.calls)
        group["unpriced"] += int(row.unpriced)
        group["cost"] += cost
        group["estimate"] = group.get("estimate", Decimal(0)) + estimate

    models = [
        RepricedModel(
            model=name,
            calls=group["calls"],
            uncached_input_tokens=group["usage"].uncached_input_tokens,
            cache_read_tokens=group["usage"].cache_read_tokens,
            cache_write_tokens=group["usage"].cache_write_tokens,
            output_tokens=group["usage"].output_tokens,
            reasoning_tokens=group["usage"].reasoning_tokens,
            unpriced_calls=group["unpriced"],
            cost_usd=_quantize(group["cost"]),
            estimated_cost_usd=_quantize(group["estimate"]),
        )
        for name, group in per_model.items()
    ]
    models.sort(key=lambda m: (-m.cost_usd, m.model is None, m.model or ""))
    model_cost = sum((m.cost_usd for m in models), Decimal(0))
    estimated = sum((m.estimated_cost_usd for m in models), Decimal(0))
    tool_cost = _quantize(tool_cost)
    return Repricing(
        as_model=as_model,
        price_drop=factor,
        price_source=target.source if target is not None else None,
        models=models,
        calls=sum(m.calls for m in models),
        unpriced_calls=sum(m.unpriced_calls for m in models),
        model_cost_usd=model_cost,
        estimated_model_cost_usd=estimated,
        tool_cost_usd=tool_cost,
        total_cost_usd=model_cost + tool_cost,
        estimated_total_usd=estimated + tool_cost,
        change_usd=estimated - model_cost,
    )


def _in_scope(
    agent: str | None, start: dt.datetime | None, end: dt.datetime | None
) -> sa.ColumnElement[bool]:
    """Calls of root runs (of ``agent``) in the window, and calls outside runs if no agent.

    For use on calls outer-joined to runs on ``root_run_id``: each call then meets its
    root run, so a run and all of its calls stay together, as in `report`.
    """
    c, r = calls_table, runs_table
    in_runs: list[sa.ColumnElement[bool]] = [r.c.id.is_not(None)]
    if agent is not None:
        in_runs.append(r.c.name == agent)
    if start is not None:
        in_runs.append(r.c.started_at >= start)
    if end is not None:
        in_runs.append(r.c.started_at < end)
    if agent is not None:
        return sa.and_(*in_runs)
    outside: list[sa.ColumnElement[bool]] = [c.c.run_id.is_(None)]
    if start is not None:
        outside.append(c.c.started_at >= start)
    if end is not None:
        outside.append(c.c.started_at < end)
    return sa.or_(sa.and_(*in_runs), sa.and_(*outside))


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
    if amount is None:
        return "n/a"
    sign = "-" if amount < 0 else ""
    return f"{sign}${abs(amount):,.4f}"


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
        # A constant, not a bound parameter, so that a partial index on tool charges
        # (see the benchmark notes) can serve it.
        .where(c.c.operation == sa.literal_column(f"'{_TOOL_OPERATION}'"))
        .where(r.c.parent_id.is_(None))
    )
    if agent is not None:
        query = query.where(r.c.name == agent)
    if start is not None:
        query = query.where(r.c.started_at >= start)
    if end is not None:
        query = query.where(r.c.started_at < end)
    with engine.connect() as connection:
        return _money(connection.execute(query).scalar())


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
    history = _history(
        engine,
        agent=agent,
        success=success,
        since=since,
        until=until,
        purpose="compute a break-even from",
    )
    start, end = _window(since, until)
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
