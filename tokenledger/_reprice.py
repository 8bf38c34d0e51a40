"""Repricing: what the ledger's recorded token volumes would have cost at other prices.

`reprice` prices every recorded model call's tokens at another model's prices, or
divides today's prices by a factor. **An estimate**: another model tokenizes the same
text differently, so every `Repricing` carries `ESTIMATE_NOTE`. `tokenledger.economics`
re-exports everything public here.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from tokenledger._money import from_driver, quantize
from tokenledger._read_sql import in_window, unpriced_count
from tokenledger._reporting import window
from tokenledger._storage import calls as calls_table
from tokenledger._storage import prices as prices_table
from tokenledger._storage import runs as runs_table
from tokenledger.exceptions import ConfigurationError
from tokenledger.pricing import PriceBook, default_price_book
from tokenledger.records import PriceRecord, TokenUsage
from tokenledger.semconv import OP_EXECUTE_TOOL

__all__ = [
    "ESTIMATE_NOTE",
    "RepricedModel",
    "Repricing",
    "parse_price_drop",
    "reprice",
    "target_price",
]

#: Why a repricing is an estimate; carried by every `Repricing` and printed by the CLI.
ESTIMATE_NOTE = (
    "Estimate: the ledger's recorded token counts priced at other prices. Another model "
    "tokenizes the same text differently and may need more or fewer calls and output "
    "tokens, so its real cost will differ."
)


_MAX_PRICE_DROP = Decimal(1_000_000)
_PRICE_DROP = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*[xX]?\s*$")


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
    start, end = window(since, until)
    book = price_book if price_book is not None else default_price_book()
    target = target_price(engine, as_model, price_book=book) if as_model is not None else None
    c, r = calls_table, runs_table
    is_tool = sa.case((c.c.operation == OP_EXECUTE_TOOL, 1), else_=0)
    model = sa.func.coalesce(c.c.model, c.c.requested_model)
    bucket = _tier_bucket(target)
    cached = c.c.cache_read_tokens + c.c.cache_write_tokens
    uncached = sa.case((c.c.input_tokens > cached, c.c.input_tokens - cached), else_=0)

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
            unpriced_count(c).label("unpriced"),
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
        cost = from_driver(row.cost)
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
            cost_usd=quantize(group["cost"]),
            estimated_cost_usd=quantize(group["estimate"]),
        )
        for name, group in per_model.items()
    ]
    models.sort(key=lambda m: (-m.cost_usd, m.model is None, m.model or ""))
    model_cost = sum((m.cost_usd for m in models), Decimal(0))
    estimated = sum((m.estimated_cost_usd for m in models), Decimal(0))
    tool_cost = quantize(tool_cost)
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
    in_runs = sa.and_(
        r.c.id.is_not(None),
        *([r.c.name == agent] if agent is not None else []),
        *in_window(r.c.started_at, start, end),
    )
    if agent is not None:
        return in_runs
    outside = sa.and_(c.c.run_id.is_(None), *in_window(c.c.started_at, start, end))
    return sa.or_(in_runs, outside)
