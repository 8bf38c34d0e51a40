"""Which budgets apply to a call, on which windows, and the estimate of its cost.

Nothing here touches the database: the shared budgets come in as the definitions the
store last read, the run budgets from the chain of runs the call is made in. What a
window holds (`WindowFigures`) and which window a call reserves on (`WindowKey`) are
named here because every layer above (store, leases, enforcer) speaks of them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Iterable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple

from tokenledger.budgets import BudgetDef, window_bounds
from tokenledger.records import TokenUsage

if TYPE_CHECKING:
    from tokenledger.pricing import PriceBook
    from tokenledger.records import CallRecord
    from tokenledger.runs import Run

__all__ = [
    "Amount",
    "Estimate",
    "WindowFigures",
    "WindowKey",
    "count_input_tokens",
    "estimate_call",
    "runs_with_budgets",
    "shared_budgets_for",
    "window_keys",
]

logger = logging.getLogger("tokenledger")


class WindowKey(NamedTuple):
    """One window of a shared budget: the ``budget_windows`` row a call reserves on."""

    budget_id: str
    window_start: dt.datetime


class Amount(NamedTuple):
    """Some money and some tokens held together: an estimate reserved, a chunk of
    headroom leased or given back, what a run has reserved."""

    usd: Decimal
    tokens: int


NOTHING = Amount(Decimal(0), 0)


class WindowFigures(NamedTuple):
    """What a budget window holds: spent and reserved, in USD and in tokens."""

    spent_usd: Decimal
    reserved_usd: Decimal
    spent_tokens: int
    reserved_tokens: int

    def over(self, limit_usd: Decimal | None, limit_tokens: int | None) -> bool:
        """Whether spent and reserved together pass either limit."""
        return (limit_usd is not None and self.spent_usd + self.reserved_usd > limit_usd) or (
            limit_tokens is not None and self.spent_tokens + self.reserved_tokens > limit_tokens
        )


EMPTY_WINDOW = WindowFigures(Decimal(0), Decimal(0), 0, 0)


@dataclasses.dataclass
class Estimate:
    """An upper bound of what a call to ``model`` may cost, reserved before it is sent."""

    usd: Decimal | None  # None: the model has no price
    tokens: int
    model: str


# -- which budgets apply ------------------------------------------------------------------


def _scopes_for(run: Run | None) -> set[str]:
    """``global``, ``agent:NAME`` for the run and each ancestor, ``KEY:VALUE`` per tag
    (a sub-run inherits its parent's tags, so its own are enough)."""
    scopes = {"global"}
    node = run
    while node is not None:
        scopes.add(f"agent:{node.name}")
        node = node.parent
    if run is not None:
        for key, value in run.record.tags.items():
            scopes.add(f"{key}:{value}")
    return scopes


def runs_with_budgets(run: Run | None) -> list[Run]:
    """The run and those of its ancestors that carry a ``budget=``, innermost first."""
    found: list[Run] = []
    node = run
    while node is not None:
        if node.budget is not None:
            found.append(node)
        node = node.parent
    return found


def shared_budgets_for(defs: list[BudgetDef], run: Run | None) -> list[BudgetDef]:
    """The shared budgets among ``defs`` whose scope covers a call made in ``run``."""
    if not defs:
        return []
    scopes = _scopes_for(run)
    return [d for d in defs if d.scope in scopes]


def window_keys(defs: Iterable[BudgetDef], now: dt.datetime) -> list[WindowKey]:
    """The window of each budget that ``now`` falls in."""
    return [WindowKey(d.id, window_bounds(d.per, now)[0]) for d in defs]


# -- the estimate -------------------------------------------------------------------------


def count_input_tokens(model: str, kwargs: dict[str, Any]) -> int:
    """The input tokens of a request, by the model's tokenizer where litellm has one."""
    import litellm

    messages = kwargs.get("messages")
    try:
        if messages:
            return int(litellm.token_counter(model=model, messages=messages))
        text = kwargs.get("input") or kwargs.get("prompt")
        if isinstance(text, str):
            return int(litellm.token_counter(model=model, text=text))
        if isinstance(text, list):
            return sum(int(litellm.token_counter(model=model, text=str(t))) for t in text)
    except Exception:
        logger.debug("token counting failed for %s; estimating from characters", model)
    # Upper-bound fallback: no tokenizer yields more than one token per byte.
    return len(repr(messages or kwargs.get("input") or "").encode())


def estimate_call(
    book: PriceBook,
    call: CallRecord,
    kwargs: dict[str, Any],
    model: str,
    *,
    default_max_output_tokens: int,
) -> Estimate:
    """An upper bound of the cost of ``call`` sent to ``model``: its input counted from
    the request, its output bounded by ``max_tokens``, else the model's output limit,
    else ``default_max_output_tokens``. An embedding has no output."""
    input_tokens = count_input_tokens(model, kwargs)
    price = book.lookup(model)
    if call.operation == "embeddings":
        usage = TokenUsage(input_tokens=input_tokens)
        usd = book.cost(price, usage) if price is not None else None
        return Estimate(usd=usd, tokens=input_tokens, model=model)
    max_out = call.max_tokens
    if max_out is None:
        max_out = book.max_output_tokens(model) or default_max_output_tokens
    usage = TokenUsage(input_tokens=input_tokens, output_tokens=max_out)
    usd = book.cost(price, usage) if price is not None else None
    return Estimate(usd=usd, tokens=input_tokens + max_out, model=model)
