"""Money: the one quantum, context, parser and formatter for US dollar amounts.

Every amount tokenledger stores is a `~decimal.Decimal` with at most 12 places (the
money columns are ``NUMERIC(24, 12)``), never a float. Parsing and wording live here so
that a budget limit, an outcome value, a tool charge and a what-if revenue accept the
same inputs and print the same way; callers add only the sentence that names their
argument.
"""

from __future__ import annotations

import decimal
import math
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Literal

__all__ = [
    "CONTEXT",
    "MAX_USD",
    "QUANTUM",
    "AmountError",
    "from_driver",
    "nonnegative_number",
    "parse_usd",
    "quantize",
    "usd_text",
]

#: Money columns are NUMERIC(24, 12): every amount is a whole number of 10^-12 dollars.
QUANTUM = Decimal("1e-12")
#: Enough digits to quantize any money amount (24 digits at scale 12, or a price at
#: scale 18 with 12 integer digits), or a sum of many, without rounding its integer part.
CONTEXT = decimal.Context(prec=48)
#: The largest amount a single figure (a limit, a charge, an outcome value) may hold.
MAX_USD = Decimal(1_000_000_000)

Reason = Literal["float", "type", "range"]


class AmountError(ValueError):
    """An amount of US dollars that cannot be taken; ``reason`` says why.

    ``float``: a finite float (binary rounding would leak into money); ``type``: not a
    str, int or Decimal (or a bool, or a non-finite float); ``range``: not a finite
    number, or outside the bounds the caller asked for. Callers turn it into a
    `ConfigurationError` or `UsageError` that names their argument.
    """

    def __init__(self, value: object, reason: Reason) -> None:
        super().__init__(f"{value!r} is not an amount of US dollars ({reason})")
        self.value = value
        self.reason: Reason = reason


def parse_usd(
    value: object,
    *,
    positive: bool = False,
    maximum: Decimal = MAX_USD,
    allow_dollar_sign: bool = False,
) -> Decimal:
    """An amount of US dollars from a str, int or Decimal.

    ``positive`` refuses zero; every amount must be finite, not negative and at most
    ``maximum``. Raises `AmountError` with the reason, for the caller to word.
    """
    if isinstance(value, float) and math.isfinite(value):
        raise AmountError(value, "float")
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise AmountError(value, "type")
    text = str(value).strip()
    if allow_dollar_sign:
        text = text.removeprefix("$")
    try:
        amount = Decimal(text)
    except (InvalidOperation, ValueError):
        raise AmountError(value, "range") from None
    if not amount.is_finite() or amount < 0 or (positive and amount == 0) or amount > maximum:
        raise AmountError(value, "range")
    return amount


def nonnegative_number(value: object) -> Decimal | None:
    """``value`` (a str, int, float or Decimal) as a finite Decimal >= 0, or None when it
    is of another type (a bool too) or no such number; the caller words the refusal.

    Unlike `parse_usd` it takes a float, through its shortest repr (0.15, not the
    binary expansion): a user's price and a provider-reported cost may be floats.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        number = value
    elif isinstance(value, float):
        number = Decimal(repr(value))
    elif isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            return None
    else:
        return None
    return number if number.is_finite() and number >= 0 else None


def quantize(amount: Decimal) -> Decimal:
    """``amount`` rounded half-even to the money columns' 12 places."""
    return amount.quantize(QUANTUM, ROUND_HALF_EVEN, context=CONTEXT)


def from_driver(value: Any) -> Decimal:
    """A money amount (or a SUM of them) from a database driver, as an exact Decimal.

    PostgreSQL returns NUMERIC values as Decimal already. SQLite has no decimal type and
    returns a float: it goes through ``repr`` (the shortest string that round-trips it,
    0.000285 rather than its binary expansion) and is quantized to the columns' 12
    places, so a cost read raw and the same cost read through SQLAlchemy agree to the
    last digit. None (an empty SUM) reads as zero.
    """
    if value is None:
        return Decimal(0).quantize(QUANTUM)
    if isinstance(value, Decimal):
        amount = value
    else:
        amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))
    return amount.quantize(QUANTUM, context=CONTEXT)


def usd_text(
    value: Decimal | None,
    *,
    style: Literal["table", "exact", "fixed"] = "table",
    missing: str = "unknown",
) -> str:
    """Dollars as text, with a leading ``-`` for a negative amount.

    ``table``: 4 places, or 2 significant digits below a tenth of a cent ($0.00023), so a
    cheap call never reads as $0.0000. ``exact``: rounded to a millionth of a dollar with
    trailing zeros dropped, for error messages ($0.0125). ``fixed``: 4 places with
    thousands separators ($1,234.5000). None reads as ``missing``.
    """
    if value is None:
        return missing
    if value.is_zero():
        value = abs(value)  # never "$-0"
    if value < 0:
        return "-" + usd_text(-value, style=style, missing=missing)
    if style == "exact":
        return f"${value.quantize(Decimal('0.000001')).normalize():f}"
    if style == "fixed" or value == 0 or value >= Decimal("0.001"):
        return f"${value:,.4f}"
    # Two significant digits: $0.00023, $0.000004.
    quantum = Decimal(1).scaleb(value.adjusted() - 1)
    return f"${value.quantize(quantum).normalize():f}"
