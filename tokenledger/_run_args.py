"""Checking what users pass to runs and calls: names, tags, outcomes, amounts, run
budgets, and the figures of a call recorded by hand.

Every check raises `ConfigurationError` with a message that names the argument, shows the
bad value (cut short when it is long: a megabyte-long tag must not be echoed whole) and
says what would be accepted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal

from tokenledger._money import MAX_USD, AmountError, parse_usd
from tokenledger._text import shown, unstorable
from tokenledger.exceptions import ConfigurationError, UsageError

__all__ = [
    "check_run_budget",
    "check_run_name",
    "latency_ms",
    "parse_outcome",
    "parse_usd_amount",
    "reported_cost",
    "shown",
    "unstorable",
    "validate_tags",
]

MAX_TAG_KEY_LENGTH = 128
MAX_TAG_VALUE_LENGTH = 1024
MAX_OUTCOME_LENGTH = 200
MAX_NAME_LENGTH = 200  # run names and charge names


def parse_outcome(label: object, value: object) -> tuple[str, Decimal | None]:
    """Check an outcome label and its optional USD value."""
    if not isinstance(label, str) or not label.strip() or len(label) > MAX_OUTCOME_LENGTH:
        raise ConfigurationError(
            f"Outcome {label!r} is invalid; an outcome must be a non-empty string of at most "
            f"{MAX_OUTCOME_LENGTH} characters, e.g. 'resolved'."
        )
    return label, parse_usd_amount(value, what=f"Outcome `{label}` has `value`")


def parse_usd_amount(value: object, *, what: str) -> Decimal | None:
    """An optional amount of US dollars given as str, int or Decimal."""
    if value is None:
        return None
    try:
        return parse_usd(value)
    except AmountError as exc:
        if exc.reason == "range":
            raise ConfigurationError(
                f"{what}={shown(value)}; it must be an amount of US dollars from 0 to "
                "1,000,000,000."
            ) from None
        raise ConfigurationError(
            f"{what}={shown(value)}; give an amount of US dollars as a string or Decimal, "
            'e.g. "4.00".'
        ) from None


def check_run_name(name: object) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH:
        raise ConfigurationError(
            f"Run name {shown(name)} is invalid; a run name must be a non-empty string of at "
            f"most {MAX_NAME_LENGTH} characters."
        )


def check_run_budget(budget: object, *, where: str) -> None:
    from tokenledger.budgets import Budget

    if budget is None:
        return
    if not isinstance(budget, Budget):
        raise ConfigurationError(
            f"`budget` of {where} is {shown(budget)}; give a tokenledger.Budget, "
            'e.g. budget=Budget(usd="0.50").'
        )
    if budget.per != "run":
        raise ConfigurationError(
            f"`budget` of {where} has per={budget.per!r}; a budget on a run caps that run "
            "(per='run'). For a window shared across runs use "
            f"ledger.set_budget('agent:NAME', usd=..., per={budget.per!r})."
        )


def validate_tags(tags: Mapping[str, object] | None, *, where: str) -> dict[str, str]:
    """Check tag keys and values; values are stored as strings."""
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise ConfigurationError(
            f"`tags` of {where} is {tags!r}; tags must be a mapping of str to str."
        )
    clean: dict[str, str] = {}
    for key, value in tags.items():
        if not isinstance(key, str) or not key or len(key) > MAX_TAG_KEY_LENGTH:
            raise ConfigurationError(
                f"Tag key {key!r} of {where} is invalid; a tag key must be a non-empty "
                f"string of at most {MAX_TAG_KEY_LENGTH} characters."
            )
        if value is None or isinstance(value, (dict, list, tuple, set)):
            raise ConfigurationError(
                f"Tag `{key}` of {where} is {value!r}; a tag value must be a string or number."
            )
        text = str(value)
        if unstorable(key) or unstorable(text):
            raise ConfigurationError(
                f"Tag `{key}` of {where} holds a NUL character or a lone surrogate, which "
                "no ledger database can store; remove it."
            )
        if len(text) > MAX_TAG_VALUE_LENGTH:
            raise ConfigurationError(
                f"Tag `{key}` of {where} is {len(text)} characters long; a tag value may "
                f"have at most {MAX_TAG_VALUE_LENGTH}."
            )
        clean[key] = text
    return clean


def reported_cost(value: object) -> Decimal | None:
    """``record_call``'s ``cost_usd``: a cost the provider reported, exactly."""
    if value is None:
        return None
    if isinstance(value, float) and math.isfinite(value):
        value = repr(value)  # the shortest text that round-trips: 0.0123, not its binary
    try:
        return parse_usd(value)
    except AmountError:
        raise UsageError(
            f"`cost_usd` is {shown(value)}; a reported cost must be a finite amount of US "
            f'dollars from 0 to {MAX_USD:,}, e.g. "0.0123".'
        ) from None


def latency_ms(value: object) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= _MAX_LATENCY_MS
    ):
        raise UsageError(
            f"`latency_ms` is {shown(value)}; give the call's duration in milliseconds, a "
            f"number from 0 to {_MAX_LATENCY_MS:,} (a week)."
        )
    return float(value)


_MAX_LATENCY_MS = 7 * 24 * 3600 * 1000
