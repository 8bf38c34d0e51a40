"""Rows converted for the database driver, for inserts that skip SQLAlchemy's per-row work.

The batch writer hands calls, nearly every row it writes, to the driver as tuples in
column order. `DriverInsert` converts each value exactly as the column's type would
(SQLAlchemy's own bind processing, with shortcuts for the values the ledger writes
nearly always) and names the column of a value its type refuses (`RefusedValue`).
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from tokenledger._column_types import UTC, JSONDocument, Money, UTCDateTime
from tokenledger._engine import check_dialect
from tokenledger.exceptions import ConfigurationError

__all__ = ["DriverInsert", "RefusedValue"]


class RefusedValue(ValueError):
    """A value that its column's type refuses (a naive datetime, a float amount, a value
    JSON cannot encode), found while a row is converted for the driver.

    Internal to the batch writer, which keeps the row in ``BatchWriter.rejected``; it
    never reaches the user.
    """

    def __init__(self, table: str, column: str, cause: BaseException) -> None:
        super().__init__(f"{table}.{column}: {type(cause).__name__}: {cause}")
        self.column = column
        self.cause = cause


_Bind = Any  # Callable[[Any], Any]; SQLAlchemy types its processors loosely
# What json.dumps writes for a string, with its default ensure_ascii=True.
_json_string = json.encoder.encode_basestring_ascii


def _fast_bind(column: sa.Column[Any], dialect: Dialect, slow: _Bind) -> _Bind:
    """``slow`` (SQLAlchemy's own bind processing for the column) with a shortcut for
    the values the ledger writes nearly always. Each shortcut returns exactly what
    ``slow`` returns for those values; anything else goes through ``slow`` itself, so
    errors and edge cases (other time zones, int or str amounts) are SQLAlchemy's."""
    column_type = column.type
    sqlite = dialect.name == "sqlite"
    if isinstance(column_type, UTCDateTime):
        if sqlite:

            def utc_text(value: Any) -> Any:
                # SQLite's DATETIME text, "%04d-%02d-%02d %02d:%02d:%02d.%06d" in UTC.
                if value.__class__ is dt.datetime and value.tzinfo is UTC:
                    return value.isoformat(" ", "microseconds")[:26]
                return slow(value)

            return utc_text

        def utc(value: Any) -> Any:
            if value.__class__ is dt.datetime and value.tzinfo is UTC:
                return value
            return slow(value)

        return utc
    if isinstance(column_type, Money):
        if sqlite:

            def amount_float(value: Any) -> Any:
                if value.__class__ is Decimal and value.is_finite():
                    return float(value)
                return slow(value)

            return amount_float

        def amount(value: Any) -> Any:
            if value.__class__ is Decimal and value.is_finite():
                return value
            return slow(value)

        return amount
    if isinstance(column_type, sa.Boolean):

        def boolean(value: Any) -> Any:
            # sqlite3 binds True as 1, what SQLAlchemy's int(True) gives.
            if value is True or value is False:
                return value
            return slow(value)

        return boolean
    if isinstance(column_type, sa.Float) and sqlite:

        def real(value: Any) -> Any:
            return value if value.__class__ is float else slow(value)

        return real
    if isinstance(column_type, (sa.JSON, JSONDocument)) and not getattr(
        dialect, "_json_serializer", None
    ):
        # PostgreSQL: SQLAlchemy wraps the value in psycopg's Jsonb, which encodes it
        # inside the driver, where an error is a bare TypeError from deep in
        # executemany. The same json.dumps here, with the text bound as is (psycopg
        # sends a str as "unknown", which PostgreSQL reads as jsonb), fails with the
        # row in hand.
        prepare = column_type.process_bind_param if isinstance(column_type, TypeDecorator) else None

        def json_text(value: Any) -> Any:
            if prepare is not None:
                value = prepare(value, dialect)
            if value.__class__ is list:
                # A list of strings (finish_reasons): json.dumps's own output, without
                # the encoder it builds on every call.
                try:
                    return "[" + ", ".join(map(_json_string, value)) + "]"
                except TypeError:  # an item that is not a string
                    pass
            if sqlite:
                return slow(value)
            return None if value is None else json.dumps(value)

        return json_text
    return slow


class DriverInsert:
    """``INSERT ... ON CONFLICT (primary key) DO NOTHING`` into ``table``, run at the
    driver level: rows are tuples of the table's values in column order, converted
    once per value, instead of a dict per row and SQLAlchemy's per-row work.

    `convert` gives the values the driver is handed when SQLAlchemy inserts the same
    rows (its own bind processing, with shortcuts that return the same values for the
    common ones), so both paths store the same thing; a test compares every column.

    ``sql`` is for ``Connection.exec_driver_sql`` (executemany); ``copy_sql`` for
    psycopg's ``COPY ... FROM STDIN``, which has no ``ON CONFLICT``. Table names are
    unqualified: a PostgreSQL schema is chosen by the connection's search_path.

    .. versionadded:: 0.1.0
    """

    def __init__(self, table: sa.Table, dialect: Dialect) -> None:
        check_dialect(dialect.name)
        quote = dialect.identifier_preparer.quote
        self.table = table.name
        self.columns = tuple(column.name for column in table.columns)
        names = ", ".join(quote(name) for name in self.columns)
        marks = ", ".join(["?" if dialect.name == "sqlite" else "%s"] * len(self.columns))
        keys = ", ".join(quote(column.name) for column in table.primary_key.columns)
        self.sql = (
            f"INSERT INTO {quote(table.name)} ({names}) VALUES ({marks}) "
            f"ON CONFLICT ({keys}) DO NOTHING"
        )
        self.copy_sql = f"COPY {quote(table.name)} ({names}) FROM STDIN"
        self._binds: list[tuple[int, _Bind]] = []
        for index, column in enumerate(table.columns):
            slow = column.type.dialect_impl(dialect).bind_processor(dialect)
            if slow is None:
                continue
            if slow(None) is not None:
                raise ConfigurationError(  # pragma: no cover - a type the ledger does not use
                    f"Column {table.name}.{column.name} binds None as {slow(None)!r}; "
                    "DriverInsert only supports types that store None as NULL."
                )
            self._binds.append((index, _fast_bind(column, dialect, slow)))

    def convert(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """The driver's values for ``rows`` (tuples in column order).

        Raises:
            RefusedValue: a value its column's type refuses; it names the column.
        """
        binds = self._binds
        converted = []
        for row in rows:
            values = list(row)
            index = -1
            try:
                for index, bind in binds:
                    value = values[index]
                    if value is not None:  # every bind processor here keeps None as NULL
                        values[index] = bind(value)
            except Exception as exc:
                raise RefusedValue(self.table, self.columns[index], exc) from exc
            converted.append(tuple(values))
        return converted
