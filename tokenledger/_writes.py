"""The batch writer's side of the database: one batch written in one transaction.

Every write is idempotent (prices and calls: insert, ignore a known id; runs: an upsert
that only moves a run forward), so a batch retried after an ambiguous failure, or
replayed from the spool, can never duplicate a row or undo a newer state.

A failure is one of two kinds, and `is_refused_row` tells them apart: the database
refused some row on its own (retrying cannot help: the batch is bisected, the rest
written and the row kept aside), or the database failed (an `Outage`: the batch is
retried as it is).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import sqlalchemy as sa

from tokenledger import _tables
from tokenledger._batch import Batch, Row, as_dict, batch_form, dedupe_runs
from tokenledger._engine import SECRET_QUERY_KEYS, insert_for, redact_url
from tokenledger._rows import DriverInsert, RefusedValue

__all__ = ["LedgerWrites", "Outage", "RejectedRow", "is_refused_row", "sanitized", "secrets_of"]

logger = logging.getLogger("tokenledger.writer")

_OUTCOME_COLUMNS = frozenset({"outcome", "outcome_value", "outcome_at"})


@dataclasses.dataclass(frozen=True)
class RejectedRow:
    """A row the database refused while the rows around it were written.

    .. versionadded:: 0.1.0
    """

    table: str
    row: Row
    error: str


class Outage(Exception):
    """The database failed while a batch was written: retrying can help."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(cause)
        self.cause = cause


_REFUSED_ROW_CLASSES = frozenset({"22", "23", "54"})


def is_refused_row(exc: BaseException) -> bool:
    """True when ``exc`` says the rows are bad (retrying cannot help), not the database.

    A missing table or a permission error is treated as an outage: someone can fix it
    and the rows will then be written.
    """
    if isinstance(exc, (sa.exc.DataError, sa.exc.IntegrityError, RefusedValue)):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        # PostgreSQL names the class of an error in its SQLSTATE: 22 data exception,
        # 23 integrity constraint, 54 program limit exceeded (an index entry over its
        # ~2.7 kB limit, a row too big). All three are about the row, and a retry gets
        # the same answer; psycopg wraps class 54 as an OperationalError, like an outage.
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate[:2] in _REFUSED_ROW_CLASSES:
            return True
        # sqlite3 refusing a Python value it cannot bind; psycopg one it cannot adapt.
        message = str(exc.orig).lower()
        return "error binding parameter" in message or "cannot adapt type" in message
    # Raised in Python by a column type's bind processing (a naive datetime, a float
    # amount, a value JSON cannot encode): SQLAlchemy wraps it in a StatementError.
    # A string no driver can encode (a lone surrogate) may surface as a bare
    # UnicodeError; retrying it would stall the ledger forever.
    return isinstance(exc, (sa.exc.StatementError, UnicodeError))


def sanitized(value: Any) -> Any:
    """``value`` with every string made storable in any database: NUL and lone
    surrogates become U+FFFD. Used only to salvage a row the database refused."""
    if isinstance(value, str):
        text = value.replace("\x00", "\ufffd")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = "".join("\ufffd" if 0xD800 <= ord(char) <= 0xDFFF else char for char in text)
        return text
    if isinstance(value, dict):
        return {sanitized(key): sanitized(item) for key, item in value.items()}
    if isinstance(value, list):
        return [sanitized(item) for item in value]
    return value


def secrets_of(url: sa.URL) -> list[str]:
    """Every password in ``url``: its own, and any given as a query parameter."""
    found = [str(url.password)] if url.password else []
    for key in SECRET_QUERY_KEYS:
        value = url.query.get(key)
        values = [value] if isinstance(value, str) else list(value or ())
        found.extend(v for v in values if v)
    return sorted(set(found), key=len, reverse=True)


class LedgerWrites:
    """The statements the batch writer writes with, and one batch written with them.

    Prices: insert, ignore a known id. Runs: an upsert that only moves a run forward.
    Calls: a precompiled ``INSERT ... ON CONFLICT (id) DO NOTHING`` at the driver level
    (`DriverInsert`), or on PostgreSQL a COPY when the batch was never tried before.

    ``url`` is the ledger's URL as messages show it, with every password hidden.
    """

    def __init__(self, engine: sa.Engine) -> None:
        insert = insert_for(engine.dialect.name)
        self._engine = engine
        self._secrets = secrets_of(engine.url)
        self.url = self.hide(redact_url(engine.url))

        runs = _tables.runs
        self._insert_prices = insert(_tables.prices).on_conflict_do_nothing(index_elements=["id"])
        upsert_runs = insert(runs)
        stored, new = runs.c, upsert_runs.excluded
        run_state = [col.name for col in runs.c if col.name != "id"]
        self._upsert_runs = upsert_runs.on_conflict_do_update(
            index_elements=["id"],
            set_={
                name: (
                    # An outcome may be set later, by another process (set_outcome):
                    # a re-written run row never erases it.
                    sa.func.coalesce(new[name], stored[name])
                    if name in _OUTCOME_COLUMNS
                    else new[name]
                )
                for name in run_state
            },
            # A state only replaces a less advanced one: states replayed late (from the
            # spool, or a retried batch) never undo an end or shrink the totals.
            where=sa.and_(
                sa.or_(stored.ended_at.is_(None), new.ended_at.is_not(None)),
                new.calls >= stored.calls,
            ),
        )
        # Calls skip SQLAlchemy's per-row work: one precompiled INSERT ... ON CONFLICT
        # (id) DO NOTHING, handed values converted as the column types convert them.
        self._insert_calls = DriverInsert(_tables.calls, engine.dialect)

    def _execute(
        self,
        prices: list[Row],
        runs: list[Row],
        calls: list[tuple[Any, ...]],
        *,
        copy: bool = False,
    ) -> None:
        # Converted before the transaction opens: a refused value costs no round trip.
        values = self._insert_calls.convert(calls) if calls else []
        with self._engine.begin() as connection:
            if prices:
                connection.execute(self._insert_prices, prices)
            if runs:
                connection.execute(self._upsert_runs, dedupe_runs(runs))
            if values and not (copy and self._copy_calls(connection, values)):
                connection.exec_driver_sql(self._insert_calls.sql, values)

    def _copy_calls(self, connection: sa.Connection, values: list[tuple[Any, ...]]) -> bool:
        """COPY the calls of a fresh batch (PostgreSQL): half the CPU of an INSERT per row.

        COPY has no ON CONFLICT, so it runs in a savepoint. When PostgreSQL refuses the
        rows (a call id already stored: the same record put twice; or a value it cannot
        store) nothing is written and False is returned: the caller inserts them with
        ON CONFLICT DO NOTHING, which skips known ids and isolates a bad row. A lost
        connection is raised: the batch is retried, with INSERT, once it is back.
        """
        import psycopg  # only here: a SQLite ledger never needs it

        savepoint = connection.begin_nested()
        dbapi: Any = connection.connection.dbapi_connection
        try:
            with dbapi.cursor() as cursor, cursor.copy(self._insert_calls.copy_sql) as copy:
                write_row = copy.write_row
                for row in values:
                    write_row(row)
        except Exception as exc:
            if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)) or dbapi.broken:
                raise
            savepoint.rollback()
            logger.debug(
                "tokenledger's COPY of %d call(s) to %s was refused (%s); inserting them "
                "with ON CONFLICT DO NOTHING instead.",
                len(values),
                self.url,
                self.describe(exc),
            )
            return False
        savepoint.commit()
        return True

    def write(self, batch: Batch, *, copy: bool) -> tuple[int, list[RejectedRow]]:
        """Write ``batch`` in one transaction (its calls COPYed when ``copy``); returns
        the rows written and the rows the database refused on their own.

        When some row is refused, the batch is bisected to find it: the rest is
        written, and it comes back in the list (after one try with its text made
        storable, see `_salvage`).

        Raises:
            Outage: the database failed (not the rows); whatever committed before is
                written again, harmlessly, when the batch is retried.
        """
        try:
            self._execute(batch.prices, batch.runs, batch.calls, copy=copy)
        except Exception as exc:
            if not is_refused_row(exc):
                raise Outage(exc) from exc
            refused: list[RejectedRow] = []
            written = self._bisect("prices", batch.prices, refused)
            written += self._bisect("runs", dedupe_runs(batch.runs), refused)
            written += self._bisect("calls", batch.calls, refused)
            return written, refused
        return len(batch), []

    def _bisect(self, table: str, rows: list[Any], refused: list[RejectedRow]) -> int:
        if not rows:
            return 0
        try:
            self._write_rows(table, rows)
        except Exception as exc:
            if not is_refused_row(exc):
                raise Outage(exc) from exc
            if len(rows) == 1:
                return self._salvage(table, rows[0], exc, refused)
            middle = len(rows) // 2
            return self._bisect(table, rows[:middle], refused) + self._bisect(
                table, rows[middle:], refused
            )
        return len(rows)

    def _write_rows(self, table: str, rows: list[Any]) -> None:
        self._execute(
            rows if table == "prices" else [],
            rows if table == "runs" else [],
            rows if table == "calls" else [],
        )

    def _salvage(
        self, table: str, stored: Any, exc: BaseException, refused: list[RejectedRow]
    ) -> int:
        """One row is refused. If its text is what the database cannot store (NUL, a lone
        surrogate: PostgreSQL refuses both), write it with that text replaced rather
        than lose its tokens and cost."""
        row = as_dict(table, stored)
        clean = sanitized(row)
        if clean != row:
            try:
                self._write_rows(table, [batch_form(table, clean)])
            except Exception as again:
                if not is_refused_row(again):
                    raise Outage(again) from again
            else:
                logger.warning(
                    "tokenledger's ledger at %s refused a row of %s (id %s) for its text: "
                    "%s. It was written with NUL and unpaired surrogate characters replaced "
                    "by U+FFFD.",
                    self.url,
                    table,
                    row.get("id"),
                    self.describe(exc),
                )
                return 1
        refused.append(RejectedRow(table, row, self.describe(exc)))
        return 0

    def hide(self, text: str) -> str:
        """``text`` with every password of the ledger's URL replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def describe(self, exc: BaseException) -> str:
        """What went wrong, for a log line: the driver's error, passwords hidden."""
        if isinstance(exc, RefusedValue):
            return self.hide(str(exc))  # it names the column
        cause = getattr(exc, "orig", None) or exc
        return self.hide(f"{type(cause).__name__}: {cause}".strip())
