"""The budgets in the ledger database and the exact reservations made on them.

`BudgetStore` holds the shared budget definitions (cached: they change rarely) and
reserves a call's estimate on its budget windows atomically, all or none: a
conditional ``UPDATE budget_windows SET reserved = reserved + x WHERE spent + reserved
+ x <= limit`` per window and a ``reservations`` row that carries the lease, in one
transaction (on PostgreSQL, a call on one budget is one statement in autocommit: one
round trip to reserve, one to settle). Several budgets lock their windows in sorted
order, so two calls never deadlock. Settling moves the estimate out of reserved and the
actual cost into spent; a reservation whose process died is given back by any process
once its lease has passed (`BudgetStore.reclaim_expired`).

A busy process reserves out of leased chunks of headroom instead (`tokenledger._leases`);
the store tries them first and falls back to an exact reservation. This module imports
SQLAlchemy, so `tokenledger.budgets` (imported by ``import tokenledger``) does not.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa

from tokenledger import _storage as storage
from tokenledger._budget_scope import (
    EMPTY_WINDOW,
    NOTHING,
    Amount,
    WindowFigures,
    WindowKey,
)
from tokenledger._budget_sql import (
    NO_TOKEN_LIMIT,
    NO_USD_LIMIT,
    PG_RESERVE_ONE,
    PG_SETTLE_ONE,
    build_statements,
    sqlite_setup,
)
from tokenledger._leases import Leases
from tokenledger._workers import DaemonWorkers
from tokenledger.budgets import WINDOWS, BudgetDef, BudgetStatus, window_bounds
from tokenledger.exceptions import LedgerError
from tokenledger.records import new_id, utcnow

__all__ = ["BudgetStore", "BudgetWindow", "Refusal"]

logger = logging.getLogger("tokenledger")

#: A budget and the start of its window, as a call reserves on it.
BudgetWindow = tuple[BudgetDef, dt.datetime]


T = TypeVar("T")
Late = Callable[["concurrent.futures.Future[Any]"], None]


class _Request(NamedTuple):
    """One call's reservation: the budgets it must fit (all or none), those it is only
    tracked on (``warn``), and its estimate."""

    reservation_id: str
    enforce: Sequence[BudgetWindow]
    track: Sequence[BudgetWindow]
    amount: Amount


class BudgetStoreStalled(LedgerError):
    """The ledger database did not answer a budget operation within `BudgetStore.io_timeout`.

    A hung database (connection accepted, no answer) is handled exactly like a refused
    one: budgets fail closed or open per policy, and the call is never held longer.
    """


class Refusal(NamedTuple):
    """The budget window that had no room for a call, with its figures once the store
    gave up, so the refusal can be worded without asking the database again."""

    budget: BudgetDef
    window_start: dt.datetime
    figures: WindowFigures


class BudgetStore:
    """Budget definitions and atomic reservations in the ledger database."""

    def __init__(self, engine: sa.Engine, *, lease_seconds: float, io_timeout: float = 1.0) -> None:
        self.lease_seconds = lease_seconds
        self._host = socket.gethostname()
        if engine.dialect.name == "sqlite":
            # Reservations take the write lock up front (BEGIN IMMEDIATE) so the checks
            # and updates of several budgets happen as one serialised step across
            # processes; a separate engine keeps that away from the writer and readers.
            self.engine = sa.create_engine(engine.url, pool_size=8, max_overflow=32)
            sqlite_setup(self.engine)
        else:
            # Its own pool, apart from the writer's, and without a ping on every
            # checkout: a reservation is two round trips on the call path, and a ping
            # would add a third. A connection lost to a restart is invalidated on its
            # first error and the reservation retried once (see `reserve`).
            self.engine = sa.create_engine(
                engine.url, pool_size=10, max_overflow=20, pool_pre_ping=False
            )
        self._pg = self.engine.dialect.name == "postgresql"
        self._windows_seen: set[WindowKey] = set()
        self._cache: list[BudgetDef] | None = None
        self._cache_at = 0.0
        self._cache_lock = threading.Lock()
        self.cache_ttl = 2.0
        self.statements = build_statements(self.engine.dialect.name)
        self.leases = Leases(self)
        #: The longest a caller waits for the database on a budget operation (seconds).
        self.io_timeout = io_timeout
        # Budget I/O runs on these threads, so the caller can stop waiting at
        # `io_timeout` while a hung connection stays stuck on a worker, not on the call.
        self._io = DaemonWorkers(4, "tokenledger-budget-io")
        self._refreshing = False
        self._refresh_lock = threading.Lock()
        self._unread_since = -float("inf")  # when reading the budgets first failed

    @property
    def holder(self) -> str:
        """Who holds this process's reservations, for whoever reads the table: host and
        process id (read afresh, so a forked child names itself)."""
        return f"{self._host}:{os.getpid()}"

    # -- definitions -------------------------------------------------------------------
    def known_empty(self) -> bool:
        cached = self._cache
        return (
            cached is not None and not cached and time.monotonic() - self._cache_at < self.cache_ttl
        )

    def definitions(self, *, fresh: bool = False) -> list[BudgetDef]:
        """All shared budgets, cached for ``cache_ttl`` seconds (budgets change rarely;
        a change made by another process is seen within that time).

        A stale cache is served as it is while a worker thread reads the table again, so
        a call never waits for the database to learn that no budget applies. Only the
        first read (nothing cached yet) and ``fresh`` wait, at most `io_timeout`.

        Raises:
            LedgerError: nothing is cached and the database did not answer.
        """
        now = time.monotonic()
        cached = self._cache
        if not fresh and cached is not None:
            if now - self._cache_at >= self.cache_ttl:
                self._refresh_in_background()
            return cached
        if not fresh and now - self._unread_since < self.cache_ttl:
            # Never read, and the last try failed moments ago: say so at once rather
            # than make every call wait `io_timeout` again; a worker keeps trying.
            self._refresh_in_background()
            raise BudgetStoreStalled(
                f"the budgets of the ledger at {storage.redact_url(self.engine.url)} could "
                "not be read yet"
            )
        try:
            return self.bounded(self._read_definitions, fresh)
        except LedgerError:
            self._unread_since = time.monotonic()
            raise

    def _refresh_in_background(self) -> None:
        # Its own lock: `_cache_lock` is held across the read itself, which may hang.
        with self._refresh_lock:
            if self._refreshing:
                return
            self._refreshing = True

        def refresh() -> None:
            try:
                self._read_definitions(False)
            except Exception:
                logger.debug("tokenledger could not refresh budgets", exc_info=True)
            finally:
                self._refreshing = False

        try:
            self._io.submit(refresh)
        except RuntimeError:  # shut down: nothing more to refresh
            self._refreshing = False

    def bounded(self, work: Callable[..., T], *args: Any, on_late: Late | None = None) -> T:
        """Run ``work(*args)`` on a budget I/O thread and wait at most `io_timeout`.

        Raises `BudgetStoreStalled` when the database has not answered by then; the work
        goes on in its thread, and ``on_late`` is called with its future once it ends
        (to give back a reservation nobody is waiting for).
        """
        future = self._io.submit(work, *args)
        try:
            return future.result(timeout=self.io_timeout)
        except concurrent.futures.TimeoutError:
            if on_late is not None:
                future.add_done_callback(on_late)
            raise BudgetStoreStalled(
                f"the ledger database at {storage.redact_url(self.engine.url)} did not answer "
                f"a budget operation within {self.io_timeout:g} s"
            ) from None

    def _read_definitions(self, fresh: bool) -> list[BudgetDef]:
        cached = self._cache
        with self._cache_lock:
            try:
                with self.engine.connect() as conn:
                    rows = conn.execute(sa.select(storage.budgets)).all()
            except sa.exc.DBAPIError as exc:
                if cached is None or fresh:
                    raise LedgerError(
                        f"tokenledger could not read the budgets of the ledger at "
                        f"{storage.redact_url(self.engine.url)}: {exc.__class__.__name__}."
                    ) from exc
                # The database is unreachable: keep enforcing the budgets last seen.
                logger.warning(
                    "tokenledger could not refresh budgets (%s); using the %d last read",
                    exc.__class__.__name__,
                    len(cached),
                )
                self._cache_at = time.monotonic()
                return cached
            defs = [
                BudgetDef(
                    r.id,
                    r.scope,
                    r.per,
                    r.limit_usd,
                    r.limit_tokens,
                    r.action,
                    tuple(r.downgrade_to or ()),
                )
                for r in rows
            ]
            self._cache = defs
            self._cache_at = time.monotonic()
            return defs

    def put(
        self,
        scope: str,
        per: str,
        usd: Decimal | None,
        tokens: int | None,
        action: str,
        downgrade_to: tuple[str, ...],
    ) -> BudgetDef:
        table = storage.budgets
        now = utcnow()
        with self.engine.begin() as conn:
            existing = conn.execute(
                sa.select(table.c.id).where(table.c.scope == scope, table.c.per == per)
            ).scalar_one_or_none()
            values = {
                "limit_usd": usd,
                "limit_tokens": tokens,
                "action": action,
                "downgrade_to": list(downgrade_to),
                "updated_at": now,
            }
            if existing is None:
                budget_id = new_id()
                conn.execute(
                    sa.insert(table).values(
                        id=budget_id, scope=scope, per=per, created_at=now, **values
                    )
                )
            else:
                budget_id = existing
                conn.execute(sa.update(table).where(table.c.id == budget_id).values(**values))
        self._cache = None
        return BudgetDef(budget_id, scope, per, usd, tokens, action, downgrade_to)

    def remove(self, scope: str, per: str | None) -> int:
        table = storage.budgets
        windows = storage.budget_windows
        with self.engine.begin() as conn:
            query = sa.select(table.c.id).where(table.c.scope == scope)
            if per is not None:
                query = query.where(table.c.per == per)
            ids = list(conn.execute(query).scalars())
            if ids:
                conn.execute(sa.delete(windows).where(windows.c.budget_id.in_(ids)))
                conn.execute(sa.delete(table).where(table.c.id.in_(ids)))
        self._cache = None
        return len(ids)

    def status(self, now: dt.datetime | None = None) -> list[BudgetStatus]:
        now = now or utcnow()
        self.flush_leases()  # this process's leased calls' spend, in the figures
        self.reclaim_expired()
        windows = storage.budget_windows
        out = []
        defs = self.definitions(fresh=True)
        with self.engine.connect() as conn:
            for d in sorted(defs, key=lambda d: (d.scope, WINDOWS.index(d.per))):
                start, reset = window_bounds(d.per, now)
                row = conn.execute(
                    sa.select(windows).where(
                        windows.c.budget_id == d.id, windows.c.window_start == start
                    )
                ).one_or_none()
                figures = _figures_of(row)
                out.append(
                    BudgetStatus(
                        scope=d.scope,
                        per=d.per,
                        limit_usd=d.usd,
                        limit_tokens=d.tokens,
                        action=d.action,
                        downgrade_to=d.downgrade_to,
                        spent_usd=figures.spent_usd,
                        reserved_usd=figures.reserved_usd,
                        spent_tokens=figures.spent_tokens,
                        reserved_tokens=figures.reserved_tokens,
                        overshoot_usd=row.overshoot_usd if row else Decimal(0),
                        window_start=start,
                        resets_at=reset,
                    )
                )
        return out

    def window_figures(self, budget_id: str, start: dt.datetime) -> WindowFigures:
        """A window's figures, this process's leased spend included."""
        self.flush_leases()
        windows = storage.budget_windows
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(windows).where(
                    windows.c.budget_id == budget_id, windows.c.window_start == start
                )
            ).one_or_none()
        return _figures_of(row)

    # -- windows -----------------------------------------------------------------------
    def ensure_windows(self, conn: sa.Connection, keys: Iterable[WindowKey]) -> None:
        """In ``conn``'s transaction, create the window rows not yet known to exist."""
        windows = storage.budget_windows
        missing = [k for k in keys if k not in self._windows_seen]
        if not missing:
            return
        insert = storage.insert_for(conn.dialect.name)
        for budget_id, start in missing:
            conn.execute(
                insert(windows)
                .values(
                    budget_id=budget_id,
                    window_start=start,
                    spent_usd=Decimal(0),
                    reserved_usd=Decimal(0),
                    spent_tokens=0,
                    reserved_tokens=0,
                    overshoot_usd=Decimal(0),
                )
                .on_conflict_do_nothing(index_elements=["budget_id", "window_start"])
            )

    def windows_committed(self, keys: Iterable[WindowKey]) -> None:
        """Note that the rows of ``keys`` exist, once the transaction that ensured them
        has committed (a rolled-back one may have created none)."""
        self._windows_seen.update(keys)

    # -- reservations ------------------------------------------------------------------
    def reserve(
        self,
        reservation_id: str,
        enforce: Sequence[BudgetWindow],
        track: Sequence[BudgetWindow],
        usd: Decimal,
        tokens: int,
        *,
        reclaim: bool = False,
    ) -> Refusal | None:
        """Reserve on every budget in ``enforce`` (all or none) and ``track``
        (unconditionally). Returns the first budget that refused, or None.

        Taken out of this process's leases when they have room; otherwise reserved
        exactly, retried once when the connection was lost (a restart). With
        ``reclaim``, a refusal reclaims expired reservations (a dead process's may be
        holding the budget) and tries once more.
        """
        call = _Request(reservation_id, enforce, track, Amount(usd, tokens))
        if self._leased_now(call):
            return None

        def late(future: concurrent.futures.Future[Refusal | None]) -> None:
            # The caller stopped waiting: whatever this reserved is held by nobody.
            if not future.cancelled() and future.exception() is None and future.result() is None:
                lines = [WindowKey(d.id, s) for d, s in [*enforce, *track]]
                held, none = Amount(usd, tokens), Amount(Decimal(0), 0)
                # Already on a budget I/O thread: release here, not through `bounded`,
                # which would wait on this same pool (stuck, if the database hangs).
                with contextlib.suppress(Exception):
                    if lines and not self.leases.settle(reservation_id, held, none):
                        self._settle_exactly(reservation_id, lines, held, none)

        return self.bounded(self._reserve_with_retries, call, reclaim, on_late=late)

    def _leased_now(self, call: _Request) -> bool:
        """Reserve out of this process's leases if they have room now (no I/O)."""
        if not call.enforce or call.track:
            return False
        keys = sorted({WindowKey(d.id, s) for d, s in call.enforce})
        return self.leases.take(call.reservation_id, keys, call.amount)

    def _reserve_with_retries(self, call: _Request, reclaim: bool) -> Refusal | None:
        refused = self._attempt(call)
        if refused is not None and reclaim and self.reclaim_expired():
            refused = self._attempt(call)
        if refused is None:
            return None
        budget, start = refused
        return Refusal(budget, start, self.window_figures(budget.id, start))

    def _attempt(self, call: _Request) -> BudgetWindow | None:
        """Leases first, else exactly; one refusal retried when this process's own
        leases were holding the headroom."""
        keys = {WindowKey(d.id, s) for d, s in call.enforce}
        if (
            call.enforce
            and not call.track
            and self.leases.reserve(call.reservation_id, sorted(keys), call.amount)
        ):
            return None
        try:
            refused = self._reserve(call)
        except sa.exc.DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            refused = self._reserve(call)
        if refused is not None and self.leases.give_back_free(keys):
            # This process's own lease held the headroom: it is back, so try once more.
            refused = self._reserve(call)
        return refused

    def _reserve(self, call: _Request) -> BudgetWindow | None:
        """One exact reservation: the first budget that refused, or None."""
        reservation_id, amount = call.reservation_id, call.amount
        ordered = sorted(call.enforce, key=lambda item: (item[0].id, item[1]))
        tracked = sorted(call.track, key=lambda item: (item[0].id, item[1]))
        keys = [WindowKey(d.id, s) for d, s in ordered + tracked]
        if not keys:
            return None
        now = utcnow()
        lines = [[d, s.isoformat()] for d, s in keys]
        expires = now + dt.timedelta(seconds=self.lease_seconds)
        usd, tokens = amount
        if self._pg and len(ordered) == 1 and not tracked and keys[0] in self._windows_seen:
            # The conditional UPDATE and the reservation row in one statement, atomic
            # on its own: no BEGIN and no COMMIT round trips.
            definition, start = ordered[0]
            with self._autocommit() as conn:
                inserted = conn.exec_driver_sql(
                    PG_RESERVE_ONE,
                    {
                        "id": reservation_id,
                        "holder": self.holder,
                        "usd": usd,
                        "tok": tokens,
                        "bid": definition.id,
                        "ws": start,
                        "big_usd": NO_USD_LIMIT,
                        "big_tok": NO_TOKEN_LIMIT,
                        "lines": json.dumps(lines),
                        "now": now,
                        "expires": expires,
                    },
                ).rowcount
            return None if inserted == 1 else (definition, start)
        stmts = self.statements
        with self.engine.begin() as conn:
            self.ensure_windows(conn, keys)
            for definition, start in ordered:
                params = {"bid": definition.id, "ws": start, "usd": usd, "tok": tokens}
                if conn.execute(stmts.reserve, params).rowcount != 1:
                    conn.rollback()
                    return definition, start
            for definition, start in tracked:
                conn.execute(
                    stmts.add, {"bid": definition.id, "ws": start, "usd": usd, "tok": tokens}
                )
            self.insert_reservation(conn, reservation_id, amount, lines, now, expires)
        self.windows_committed(keys)
        return None

    def insert_reservation(
        self,
        conn: sa.Connection,
        reservation_id: str,
        amount: Amount,
        lines: list[list[Any]],
        created: dt.datetime,
        expires: dt.datetime,
    ) -> None:
        """The ``reservations`` row that holds ``amount`` on each of ``lines`` (budget
        id, window start in ISO form) until ``expires``."""
        conn.execute(
            self.statements.insert,
            {
                "id": reservation_id,
                "holder": self.holder,
                "amount_usd": amount.usd,
                "tokens": amount.tokens,
                "lines": lines,
                "created_at": created,
                "expires_at": expires,
            },
        )

    def _autocommit(self) -> sa.Connection:
        return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def add_spend(self, lines: Sequence[WindowKey], usd: Decimal, tokens: int) -> None:
        """Add spend with no reservation behind it (a call recorded after the fact)."""
        self.bounded(self._add_spend, lines, usd, tokens)

    def _add_spend(self, lines: Sequence[WindowKey], usd: Decimal, tokens: int) -> None:
        with self.engine.begin() as conn:
            self.ensure_windows(conn, lines)
            for key in sorted(lines):
                conn.execute(
                    self.statements.move,
                    self.statements.move_args(
                        WindowKey(*key), NOTHING, Amount(usd, tokens), Decimal(0)
                    ),
                )
        self.windows_committed(lines)

    def settle(
        self,
        reservation_id: str,
        lines: Sequence[WindowKey],
        reserved_usd: Decimal,
        reserved_tokens: int,
        spent_usd: Decimal,
        spent_tokens: int,
    ) -> None:
        """Move a reservation into spent (``spent_usd`` 0 for a release)."""
        if not lines:
            return
        reserved = Amount(reserved_usd, reserved_tokens)
        spent = Amount(spent_usd, spent_tokens)
        if self.leases.settle(reservation_id, reserved, spent):
            return
        self.bounded(self._settle_exactly, reservation_id, lines, reserved, spent)

    def _settle_exactly(
        self, reservation_id: str, lines: Sequence[WindowKey], reserved: Amount, spent: Amount
    ) -> None:
        over = max(spent.usd - reserved.usd, Decimal(0))
        if self._pg and len(lines) == 1:
            params = self.statements.move_args(WindowKey(*lines[0]), reserved, spent, over)
            with self._autocommit() as conn:
                conn.exec_driver_sql(PG_SETTLE_ONE, {**params, "rid": reservation_id})
            return
        with self.engine.begin() as conn:
            # If the lease ran out and another process reclaimed it, the reserved amount
            # was already given back: only the spend remains to add.
            if not conn.execute(self.statements.delete, {"rid": reservation_id}).rowcount:
                reserved = NOTHING
            for key in sorted(lines):
                args = self.statements.move_args(WindowKey(*key), reserved, spent, over)
                conn.execute(self.statements.move, args)

    def reclaim_expired(self) -> int:
        """Give back the reservations of processes that died holding them."""
        windows = storage.budget_windows
        reservations = storage.reservations
        now = utcnow()
        reclaimed = 0
        with self.engine.begin() as conn:
            query = sa.select(reservations).where(reservations.c.expires_at < now)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            expired = conn.execute(query).all()
            for row in expired:
                if not conn.execute(
                    sa.delete(reservations).where(reservations.c.id == row.id)
                ).rowcount:
                    continue
                reclaimed += 1
                for budget_id, start_iso in sorted(row.lines):
                    start = dt.datetime.fromisoformat(start_iso)
                    conn.execute(
                        sa.update(windows)
                        .where(windows.c.budget_id == budget_id, windows.c.window_start == start)
                        .values(
                            reserved_usd=windows.c.reserved_usd - row.amount_usd,
                            reserved_tokens=windows.c.reserved_tokens - row.tokens,
                        )
                    )
        if reclaimed:
            logger.warning("tokenledger reclaimed %d expired budget reservation(s)", reclaimed)
        return reclaimed

    # -- leases and shutdown -----------------------------------------------------------
    def flush_leases(self, *, release_idle: bool = False, release_all: bool = False) -> None:
        """Move the spend of calls reserved out of leases into the budget windows (see
        `tokenledger._leases.Leases.flush`)."""
        self.leases.flush(release_idle=release_idle, release_all=release_all)

    def dispose(self) -> None:
        """Give back this process's leases and close the connections."""
        self.leases.close()
        # Stuck workers (a hung database) are left to their connections' fate.
        self._io.shutdown()
        if self.engine is not None:
            self.engine.dispose()


def _figures_of(row: Any) -> WindowFigures:
    """The figures of a ``budget_windows`` row; a window not yet created holds nothing."""
    if row is None:
        return EMPTY_WINDOW
    return WindowFigures(row.spent_usd, row.reserved_usd, row.spent_tokens, row.reserved_tokens)
