"""Budgets enforced before the money is spent, atomically, across every process.

Before a captured call leaves the process, tokenledger estimates an upper bound of its
cost (input tokens counted from the request, output bounded by ``max_tokens``, else the
model's output limit, else a configured default) and **reserves** it on every budget that
applies, in one transaction: all or none. The reservation is a conditional
``UPDATE budget_windows SET reserved = reserved + x WHERE ... spent + reserved + x <=
limit``, so two processes can never both take the last dollar. After the call the actual
cost is settled (``spent += actual``, ``reserved -= estimate``); a failed call releases
its reservation. A reservation carries a lease: if its process dies before settling,
any process reclaims it once the lease has passed.

A process that makes many calls on the same budgets (8 within a second) reserves ahead:
it leases a chunk of a budget's headroom (256 calls' worth, at most 1/32 of what is
left) with the same conditional UPDATE, hands it out to its calls in memory, moves their
spend from reserved to spent every 50 ms, and gives the rest back once idle for half a
second or when the ledger is closed. A lease is a reservation with a lease like any
other: a process that dies holding one loses it when the lease passes. While it is held
the budget's ``reserved`` includes its unused part, which no other process can take.
Near a limit (1/32 of the headroom left under 8 calls) every call is reserved on its own,
so no busy process sits on headroom the others need.

With ``max_tokens`` on every call the estimate is a true upper bound and spend can never
pass a limit. Without it, the estimate uses the model's output limit (or
``default_max_output_tokens``); if a call still costs more than reserved, the overshoot
is recorded on the window (``overshoot_usd``) and logged — never silent.

Budgets that apply to a call made inside a run:
``global``; ``agent:NAME`` for the run and each of its ancestors; ``KEY:VALUE`` for each
of the run's tags (``user:42``, ``tenant:acme``); and the ``budget=`` given to the runs
themselves (window ``run``, held in memory: a run lives in one process).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from tokenledger._money import MAX_USD, AmountError, parse_usd
from tokenledger._text import shown, unstorable
from tokenledger.exceptions import ConfigurationError

__all__ = [
    "WINDOWS",
    "Budget",
    "BudgetStatus",
    "parse_scope",
    "window_bounds",
]

logger = logging.getLogger("tokenledger")

Window = Literal["run", "hour", "day", "week", "month", "total"]
Action = Literal["raise", "warn", "downgrade"]
WINDOWS: tuple[str, ...] = ("run", "hour", "day", "week", "month", "total")
ACTIONS: tuple[str, ...] = ("raise", "warn", "downgrade")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
MAX_TOKENS = 10**15
MAX_SCOPE_LENGTH = 300


# -- parsing and validation -------------------------------------------------------------


def _parse_limit_usd(value: Any, *, where: str) -> Decimal | None:
    """A USD limit: positive, at most `MAX_USD`, never a float; None for no limit."""
    if value is None:
        return None
    try:
        return parse_usd(value, positive=True)
    except AmountError as exc:
        reason = exc.reason
    if reason == "float" and value > 0:
        # floats carry binary rounding into money; say so rather than guess
        raise ConfigurationError(
            f"{where} has `usd={value!r}`; give the amount as a string or Decimal, "
            f'e.g. usd="{value}".'
        )
    if isinstance(value, (bool, float)):
        raise ConfigurationError(
            f"{where} has `usd={value!r}`; a limit must be a positive amount of US dollars, "
            'given as a string or Decimal, e.g. usd="5.00".'
        )
    if reason == "type" or (isinstance(value, str) and not _is_number(value)):
        raise ConfigurationError(
            f"{where} has `usd={value!r}`; a limit must be a positive amount of US dollars."
        )
    raise ConfigurationError(
        f"{where} has `usd={value}`; a limit must be a positive amount of US dollars "
        f"no larger than {MAX_USD:,}."
    )


def _is_number(text: str) -> bool:
    """Whether ``text`` reads as a number at all (NaN and -5 do; "five" does not), so
    that an amount out of range is told apart from text that is no amount."""
    try:
        Decimal(text.strip())
    except InvalidOperation:
        return False
    return True


def _parse_tokens(value: Any, *, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_TOKENS:
        raise ConfigurationError(
            f"{where} has `tokens={value!r}`; a token limit must be a whole number from 1 "
            f"to {MAX_TOKENS:,}."
        )
    return value


def parse_scope(scope: Any) -> str:
    """Check a budget scope: ``global``, ``agent:NAME``, ``user:ID``, ``tenant:ID`` or any
    ``TAGKEY:VALUE``."""
    if not isinstance(scope, str) or not scope.strip():
        raise ConfigurationError(
            f"Budget scope {shown(scope)} is invalid; use `global`, `agent:NAME`, `user:ID`, "
            "`tenant:ID` or `TAGKEY:VALUE`."
        )
    if scope == "global":
        return scope
    if unstorable(scope):
        raise ConfigurationError(
            f"Budget scope {shown(scope)} holds a NUL character or a lone surrogate, which "
            "no ledger database can store; remove it."
        )
    key, sep, value = scope.partition(":")
    if not sep or not key.strip() or not value.strip() or len(scope) > MAX_SCOPE_LENGTH:
        label = f"`{scope}`" if len(scope) <= 80 else shown(scope)  # never echo a megabyte
        raise ConfigurationError(
            f"Budget scope {label} is invalid; use `global`, `agent:NAME`, `user:ID`, "
            f"`tenant:ID` or `TAGKEY:VALUE` (at most {MAX_SCOPE_LENGTH} characters)."
        )
    return scope


def _parse_window(per: Any, *, where: str, allow_run: bool) -> str:
    allowed = WINDOWS if allow_run else WINDOWS[1:]
    if per not in allowed:
        raise ConfigurationError(
            f"{where} has `per={per!r}`; the window must be one of {', '.join(allowed)}."
        )
    return str(per)


def _parse_chain(downgrade_to: Any, *, where: str) -> tuple[str, ...]:
    # A bare string is iterable too: "gpt-4o-mini" must not become a chain of letters.
    if isinstance(downgrade_to, (str, bytes)) or not isinstance(downgrade_to, Iterable):
        raise ConfigurationError(
            f"{where} has `downgrade_to={downgrade_to!r}`; it must be a list of model names, "
            "e.g. downgrade_to=['gpt-4o-mini']."
        )
    chain = tuple(downgrade_to)
    if any(not isinstance(m, str) or not m.strip() for m in chain):
        raise ConfigurationError(
            f"{where} has `downgrade_to={list(chain)!r}`; it must be a list of model names."
        )
    return chain


def _parse_action(action: Any, downgrade_to: Sequence[str], *, where: str) -> str:
    if action not in ACTIONS:
        raise ConfigurationError(
            f"{where} has `action={action!r}`; it must be one of {', '.join(ACTIONS)}."
        )
    if action == "downgrade" and not downgrade_to:
        raise ConfigurationError(
            f"{where} has `action='downgrade'` but no `downgrade_to`; give the cheaper "
            "models to fall back to, e.g. downgrade_to=['gpt-4o-mini']."
        )
    if action != "downgrade" and downgrade_to:
        # Almost certainly a forgotten action="downgrade": say so rather than ignore it.
        raise ConfigurationError(
            f"{where} has `downgrade_to={list(downgrade_to)!r}` but `action={action!r}`; "
            "the fallback models are used only with action='downgrade'."
        )
    return str(action)


def parse_shared_budget(
    scope: Any,
    *,
    usd: Any,
    tokens: Any,
    per: Any,
    action: Any,
    downgrade_to: Any,
) -> tuple[str, str, Decimal | None, int | None, str, tuple[str, ...]]:
    """Check a shared budget's definition, as `Ledger.set_budget` and the CLI take it.

    Returns ``(scope, per, usd, tokens, action, downgrade_to)``; raises
    `ConfigurationError` naming the first bad field and its value.
    """
    scope = parse_scope(scope)
    where = f"Budget `{scope}`"
    parsed_usd = _parse_limit_usd(usd, where=where)
    parsed_tokens = _parse_tokens(tokens, where=where)
    if parsed_usd is None and parsed_tokens is None:
        raise ConfigurationError(
            f'{where} has neither `usd` nor `tokens`; give at least one limit, e.g. usd="5.00".'
        )
    window = _parse_window(per, where=where, allow_run=False)
    chain = _parse_chain(downgrade_to, where=where)
    act = _parse_action(action, chain, where=where)
    return scope, window, parsed_usd, parsed_tokens, act, chain


@dataclasses.dataclass(frozen=True)
class Budget:
    """A limit in USD and/or tokens over a window, and what to do when a call would pass it.

    Given to ``@ledger.agent(..., budget=Budget(usd="0.50"))`` or ``ledger.run(...,
    budget=...)`` it caps one run (window ``run``, the default). Shared budgets over
    time windows are set with `Ledger.set_budget`. .. versionadded:: 0.1.0
    """

    usd: Decimal | None = None
    tokens: int | None = None
    per: str = "run"
    action: str = "raise"
    downgrade_to: tuple[str, ...] = ()

    def __init__(
        self,
        usd: Any = None,
        *,
        tokens: int | None = None,
        per: str = "run",
        action: str = "raise",
        downgrade_to: Sequence[str] = (),
    ) -> None:
        where = "Budget"
        parsed_usd = _parse_limit_usd(usd, where=where)
        parsed_tokens = _parse_tokens(tokens, where=where)
        if parsed_usd is None and parsed_tokens is None:
            raise ConfigurationError(
                "Budget has neither `usd` nor `tokens`; give at least one limit, "
                'e.g. Budget(usd="0.50").'
            )
        object.__setattr__(self, "usd", parsed_usd)
        object.__setattr__(self, "tokens", parsed_tokens)
        object.__setattr__(self, "per", _parse_window(per, where=where, allow_run=True))
        chain = _parse_chain(downgrade_to, where=where)
        object.__setattr__(self, "action", _parse_action(action, chain, where=where))
        object.__setattr__(self, "downgrade_to", chain)


def window_bounds(per: str, now: dt.datetime) -> tuple[dt.datetime, dt.datetime | None]:
    """The UTC calendar window containing ``now``: (start, reset time or None)."""
    now = now.astimezone(dt.timezone.utc)
    if per == "hour":
        start = now.replace(minute=0, second=0, microsecond=0)
        return start, start + dt.timedelta(hours=1)
    if per == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + dt.timedelta(days=1)
    if per == "week":
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        start = day - dt.timedelta(days=day.weekday())
        return start, start + dt.timedelta(days=7)
    if per == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
        return start, nxt
    if per == "total":
        return _EPOCH, None
    raise ConfigurationError(f"Unknown budget window {per!r}.")


@dataclasses.dataclass(frozen=True)
class BudgetDef:
    """A shared budget as stored in the ``budgets`` table."""

    id: str
    scope: str
    per: str
    usd: Decimal | None
    tokens: int | None
    action: str
    downgrade_to: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class BudgetStatus:
    """A budget with its current window's figures, as listed by `Ledger.budgets`."""

    scope: str
    per: str
    limit_usd: Decimal | None
    limit_tokens: int | None
    action: str
    downgrade_to: tuple[str, ...]
    spent_usd: Decimal
    reserved_usd: Decimal
    spent_tokens: int
    reserved_tokens: int
    overshoot_usd: Decimal
    window_start: dt.datetime
    resets_at: dt.datetime | None

    @property
    def remaining_usd(self) -> Decimal | None:
        if self.limit_usd is None:
            return None
        return max(self.limit_usd - self.spent_usd - self.reserved_usd, Decimal(0))

    @property
    def remaining_tokens(self) -> int | None:
        if self.limit_tokens is None:
            return None
        return max(self.limit_tokens - self.spent_tokens - self.reserved_tokens, 0)
