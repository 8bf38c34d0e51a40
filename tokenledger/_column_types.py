"""The ledger's column types: exact money, UTC datetimes and JSON, alike on every engine.

SQLite and PostgreSQL store amounts, times and documents differently; these
`~sqlalchemy.types.TypeDecorator` classes give the code the same Python values back from
both (`~decimal.Decimal`, aware UTC `~datetime.datetime`, JSON with exact amounts), and
refuse the values that would be stored wrongly (floats, naive datetimes, NaN).
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

from tokenledger._money import CONTEXT, QUANTUM

__all__ = ["COST_SCALE", "UTC", "JSONDocument", "Money", "UTCDateTime", "json_type"]

UTC = dt.timezone.utc

#: Places of a cost column (``NUMERIC(24, 12)``): those of the money quantum, 10^-12.
COST_SCALE = -int(QUANTUM.as_tuple().exponent)


class Money(TypeDecorator[Decimal]):
    """An exact amount of US dollars: `~decimal.Decimal` in, `~decimal.Decimal` out.

    ``Money(24, 12)`` holds a cost (up to $999,999,999,999.999999999999);
    ``Money(30, 18)`` holds a price per token.

    On PostgreSQL the column is ``NUMERIC(precision, scale)`` and values travel as
    `Decimal` end to end: exact, never a float.

    SQLite has no exact decimal type: a ``NUMERIC`` column stores a number as an
    8-byte float, so an amount keeps about **15 significant digits** (``0.000285`` and
    ``1234.123456789012`` come back exactly; a sum of a million costs may be off in the
    16th digit). Values are bound as floats, so every amount is stored as a number and
    ``SUM``, ``ORDER BY`` and comparisons work; results come back as
    ``Decimal(repr(value))`` rounded to the column's scale. Use PostgreSQL where
    amounts need more digits than that.

    Non-finite amounts (NaN, infinity) are refused on both engines.

    .. versionadded:: 0.1.0
    """

    impl = sa.Numeric
    cache_ok = True

    def __init__(self, precision: int = 24, scale: int = COST_SCALE) -> None:
        super().__init__(precision=precision, scale=scale, asdecimal=True)
        self.money_precision = precision
        self.money_scale = scale
        # The money quantum moved to this column's scale: 10^-12 for a cost, 10^-18 for
        # a price per token.
        self._quantum = QUANTUM.scaleb(COST_SCALE - scale)

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            # asdecimal=False: the driver gives us its float and we convert it ourselves,
            # instead of SQLAlchemy's generic float-to-Decimal path (and its warning).
            return dialect.type_descriptor(
                sa.Numeric(self.money_precision, self.money_scale, asdecimal=False)
            )
        return dialect.type_descriptor(sa.Numeric(self.money_precision, self.money_scale))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, float) or not isinstance(value, (Decimal, int, str)):
            raise TypeError(
                f"A money amount must be a Decimal (or int or str), not {type(value).__name__} "
                f"{value!r}; floats lose cents."
            )
        amount = value if isinstance(value, Decimal) else Decimal(value)
        if not amount.is_finite():
            raise ValueError(f"A money amount must be finite, not {amount!r}.")
        if dialect.name == "sqlite":
            return float(amount)
        return amount

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if isinstance(value, Decimal):
            return value
        # repr() is the shortest string that round-trips the float: 0.000285, not
        # 0.00028499999999999999.
        amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        return amount.quantize(self._quantum, context=CONTEXT)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC `~datetime.datetime` in and out, on every engine.

    PostgreSQL stores ``TIMESTAMP WITH TIME ZONE``; values come back converted to UTC
    whatever the session's time zone. SQLite has no time zone support: values are
    stored as UTC text (which sorts and compares correctly) and get UTC back on the way
    out. Naive datetimes are refused rather than guessed at.

    .. versionadded:: 0.1.0
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"Expected a datetime, got {type(value).__name__} {value!r}.")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"Datetime {value.isoformat()} has no time zone; tokenledger stores "
                "timezone-aware datetimes only (use datetime.now(timezone.utc))."
            )
        aware: dt.datetime = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return aware.replace(tzinfo=None)
        return aware

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]


def json_type() -> TypeEngine[Any]:
    # JSONB on PostgreSQL: it has equality (GROUP BY tags works) and can be indexed.
    # none_as_null: Python None is SQL NULL, not the JSON literal 'null'.
    return sa.JSON(none_as_null=True).with_variant(
        postgresql.JSONB(none_as_null=True), "postgresql"
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")  # positional notation: "0.0000003", not "3E-7"
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


class JSONDocument(TypeDecorator[Any]):
    """JSON (JSONB on PostgreSQL) that stores `~decimal.Decimal` values as exact strings.

    JSON numbers are floats to most readers, so a price inside a document is written
    as ``"0.0000025"``; the reader converts it back with ``Decimal(text)``.

    .. versionadded:: 0.1.0
    """

    impl = sa.JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.JSONB(none_as_null=True))
        return dialect.type_descriptor(sa.JSON(none_as_null=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else _json_safe(value)
