"""Budget enforcement: the reservations store and the per-call enforcer.

Kept apart from `tokenledger.budgets` (the public definitions) so that ``import
tokenledger`` does not import SQLAlchemy; see `tokenledger.budgets` for how it works.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from decimal import ROUND_DOWN, Decimal
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from tokenledger._money import MAX_USD
from tokenledger.budgets import (
    MAX_TOKENS,
    WINDOWS,
    BudgetDef,
    BudgetStatus,
    Estimate,
    Reservation,
    parse_shared_budget,
    window_bounds,
)
from tokenledger.exceptions import (
    BudgetExceeded,
    BudgetWarning,
    ConfigurationError,
    LedgerError,
)
from tokenledger.records import TokenUsage, new_id, utcnow

if TYPE_CHECKING:
    from tokenledger.capture import PendingCall
    from tokenledger.ledger import Ledger
    from tokenledger.runs import Run

logger = logging.getLogger("tokenledger")

# Leases (see "reservations" in BudgetStore): a process leases a chunk of a budget's
# headroom once it has made HOT_CALLS calls on it within HOT_SECONDS; a chunk is
# LEASE_CALLS calls' worth, at most 1/LEASE_SHARE of what the budget has left, and none
# is taken when that would be under LEASE_MIN_CALLS calls.
HOT_CALLS = 8
HOT_SECONDS = 1.0
LEASE_CALLS = 256
LEASE_SHARE = 32
LEASE_MIN_CALLS = 8
#: How often the spend of leased calls is moved into the budget windows.
LEASE_FLUSH_SECONDS = 0.05
#: A lease no call has used for this long is given back.
LEASE_IDLE_SECONDS = 0.5

_USD_QUANTUM = Decimal("0.000000000001")  # the scale of the money columns
# Stand-ins for "no limit" in one dimension of a budget limited in the other.
_NO_USD_LIMIT = MAX_USD * 1000
_NO_TOKEN_LIMIT = MAX_TOKENS * 10

# PostgreSQL, a call on one budget: the conditional UPDATE and the reservation row in
# one statement (nothing is inserted when the budget has no room), and the settle's
# DELETE and UPDATE in another; each atomic on its own, run in autocommit.
_PG_RESERVE_ONE = """\
WITH held AS (
    UPDATE budget_windows AS w
    SET reserved_usd = w.reserved_usd + %(usd)s, reserved_tokens = w.reserved_tokens + %(tok)s
    FROM budgets AS b
    WHERE w.budget_id = %(bid)s AND w.window_start = %(ws)s AND b.id = w.budget_id
      AND w.spent_usd + w.reserved_usd + %(usd)s <= COALESCE(b.limit_usd, %(big_usd)s)
      AND w.spent_tokens + w.reserved_tokens + %(tok)s <= COALESCE(b.limit_tokens, %(big_tok)s)
    RETURNING w.budget_id
)
INSERT INTO reservations (id, holder, amount_usd, tokens, lines, created_at, expires_at)
SELECT %(id)s, %(holder)s, %(usd)s, %(tok)s, CAST(%(lines)s AS jsonb), %(now)s, %(expires)s
FROM held"""
# If the lease ran out and another process reclaimed it, the reserved amount was
# already given back: only the spend remains to add.
_PG_SETTLE_ONE = """\
WITH gone AS (DELETE FROM reservations WHERE id = %(rid)s RETURNING id)
UPDATE budget_windows
SET reserved_usd = reserved_usd - CASE WHEN EXISTS (SELECT FROM gone) THEN %(give_usd)s ELSE 0 END,
    reserved_tokens = reserved_tokens
        - CASE WHEN EXISTS (SELECT FROM gone) THEN %(give_tok)s ELSE 0 END,
    spent_usd = spent_usd + %(add_usd)s,
    spent_tokens = spent_tokens + %(add_tok)s,
    overshoot_usd = overshoot_usd + %(over)s
WHERE budget_id = %(bid)s AND window_start = %(ws)s"""

# What a flush moves: (covered USD, covered tokens, spent USD, spent tokens, overshoot).
_Snapshot = tuple[Decimal, int, Decimal, int, Decimal]


@dataclasses.dataclass(eq=False)
class _Lease:
    """Headroom this process reserved on one budget window ahead of its calls.

    ``size`` is what its ``reservations`` row holds on the window; calls in flight hold
    ``held`` of it; ``covered`` is what settled calls spent within their estimates, not
    yet moved to spent (``spent`` and ``overshoot`` are all of what they spent). Free
    for new calls: size - held - covered.
    """

    line: tuple[str, dt.datetime]
    id: str
    size_usd: Decimal = Decimal(0)
    size_tokens: int = 0
    held_usd: Decimal = Decimal(0)
    held_tokens: int = 0
    covered_usd: Decimal = Decimal(0)
    covered_tokens: int = 0
    spent_usd: Decimal = Decimal(0)
    spent_tokens: int = 0
    overshoot_usd: Decimal = Decimal(0)
    expires: float = 0.0  # time.monotonic() by which it must be renewed
    used_at: float = 0.0
    gone: bool = False  # its row is no longer ours: given back, or reclaimed

    @property
    def free_usd(self) -> Decimal:
        return self.size_usd - self.held_usd - self.covered_usd

    @property
    def free_tokens(self) -> int:
        return self.size_tokens - self.held_tokens - self.covered_tokens

    def has_pending(self) -> bool:
        return bool(self.spent_usd or self.spent_tokens or self.overshoot_usd)

    def snapshot(self) -> _Snapshot:
        return (
            self.covered_usd,
            self.covered_tokens,
            self.spent_usd,
            self.spent_tokens,
            self.overshoot_usd,
        )

    def applied(
        self, snap: _Snapshot, give: tuple[Decimal, int], *, alive: bool, expires: float
    ) -> None:
        """Take a committed flush of ``snap`` (and give-back of ``give``) off the books."""
        covered_usd, covered_tokens, spent_usd, spent_tokens, over = snap
        self.covered_usd -= covered_usd
        self.covered_tokens -= covered_tokens
        self.spent_usd -= spent_usd
        self.spent_tokens -= spent_tokens
        self.overshoot_usd -= over
        if alive:
            self.size_usd -= covered_usd + give[0]
            self.size_tokens -= covered_tokens + give[1]
            self.expires = expires


def _by_line(item: tuple[_Lease, Any, Any, Any]) -> tuple[str, dt.datetime]:
    return item[0].line


# -- the store --------------------------------------------------------------------------


class BudgetStore:
    """Budget definitions and atomic reservations in the ledger database."""

    def __init__(self, engine: sa.Engine, *, lease_seconds: float) -> None:
        from tokenledger import storage

        self._storage = storage
        self.lease_seconds = lease_seconds
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        if engine.dialect.name == "sqlite":
            # Reservations take the write lock up front (BEGIN IMMEDIATE) so the checks
            # and updates of several budgets happen as one serialised step across
            # processes; a separate engine keeps that away from the writer and readers.
            self.engine = sa.create_engine(engine.url, pool_size=8, max_overflow=32)
            self._sqlite_setup(self.engine)
        else:
            # Its own pool, apart from the writer's, and without a ping on every
            # checkout: a reservation is two round trips on the call path, and a ping
            # would add a third. A connection lost to a restart is invalidated on its
            # first error and the reservation retried once (see `_retrying`).
            self.engine = sa.create_engine(
                engine.url, pool_size=10, max_overflow=20, pool_pre_ping=False
            )
        self._pg = self.engine.dialect.name == "postgresql"
        self._windows_seen: set[tuple[str, dt.datetime]] = set()
        self._cache: list[BudgetDef] | None = None
        self._cache_at = 0.0
        self._cache_lock = threading.Lock()
        self.cache_ttl = 2.0
        self._stmts = self._statements()
        #: Whether a busy process reserves out of leased chunks (see "reservations").
        self.leasing = True
        self._pid = os.getpid()
        self._lock = threading.Lock()  # the leases' figures; never held across I/O
        self._acquire_lock = threading.Lock()  # one lease transaction at a time
        self._leases: dict[tuple[str, dt.datetime], _Lease] = {}
        self._leased: dict[str, list[_Lease]] = {}  # reservation id -> leases it holds
        self._draining: list[_Lease] = []  # no longer handed out, still to flush
        self._heat: dict[tuple[tuple[str, dt.datetime], ...], collections.deque[float]] = {}
        self._no_lease_until: dict[tuple[tuple[str, dt.datetime], ...], float] = {}
        self._flusher: threading.Thread | None = None
        self._stop = threading.Event()

    @staticmethod
    def _sqlite_setup(engine: sa.Engine) -> None:
        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    # -- definitions -------------------------------------------------------------------
    def known_empty(self) -> bool:
        cached = self._cache
        return (
            cached is not None and not cached and time.monotonic() - self._cache_at < self.cache_ttl
        )

    def definitions(self, *, fresh: bool = False) -> list[BudgetDef]:
        """All shared budgets, cached for ``cache_ttl`` seconds (budgets change rarely;
        a change made by another process is seen within that time)."""
        now = time.monotonic()
        cached = self._cache
        if not fresh and cached is not None and now - self._cache_at < self.cache_ttl:
            return cached
        with self._cache_lock:
            table = self._storage.budgets
            try:
                with self.engine.connect() as conn:
                    rows = conn.execute(sa.select(table)).all()
            except sa.exc.DBAPIError as exc:
                if cached is None or fresh:
                    raise LedgerError(
                        f"tokenledger could not read the budgets of the ledger at "
                        f"{self._storage.redact_url(self.engine.url)}: "
                        f"{exc.__class__.__name__}."
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
                    id=r.id,
                    scope=r.scope,
                    per=r.per,
                    usd=r.limit_usd,
                    tokens=r.limit_tokens,
                    action=r.action,
                    downgrade_to=tuple(r.downgrade_to or ()),
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
        table = self._storage.budgets
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
        table = self._storage.budgets
        windows = self._storage.budget_windows
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
        windows = self._storage.budget_windows
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
                out.append(
                    BudgetStatus(
                        scope=d.scope,
                        per=d.per,
                        limit_usd=d.usd,
                        limit_tokens=d.tokens,
                        action=d.action,
                        downgrade_to=d.downgrade_to,
                        spent_usd=row.spent_usd if row else Decimal(0),
                        reserved_usd=row.reserved_usd if row else Decimal(0),
                        spent_tokens=row.spent_tokens if row else 0,
                        reserved_tokens=row.reserved_tokens if row else 0,
                        overshoot_usd=row.overshoot_usd if row else Decimal(0),
                        window_start=start,
                        resets_at=reset,
                    )
                )
        return out

    # -- reservations ------------------------------------------------------------------
    #
    # A call's estimate is held in one of two ways, both reservations in the database:
    #
    # * exact: the call's own ``reservations`` row and a conditional UPDATE of each of
    #   its budget windows, settled right after the call. On PostgreSQL a call on one
    #   budget is one statement in autocommit (one round trip to reserve, one to settle);
    #   several budgets take one transaction that locks the windows in sorted order.
    # * leased: a process busy on the same budgets reserves a chunk of headroom per
    #   window (a lease: one ``reservations`` row, reserved on the window like any other,
    #   reclaimed like any other if the process dies) and hands it out to its calls
    #   under a local lock. Their spend is moved from reserved to spent in batches by a
    #   flusher thread, which also renews the leases and gives back idle ones. The limit
    #   is checked in the database when a chunk is reserved, and a call takes only what
    #   a chunk has left, so spend can no more pass a limit than with exact
    #   reservations. A chunk is at most 1/`LEASE_SHARE` of the headroom left and none
    #   is taken when that is under `LEASE_MIN_CALLS` calls: near its limit a budget is
    #   reserved call by call, and no process sits on headroom another one needs.

    def _statements(self) -> dict[str, Any]:
        """The statements reservations use, built once with bind parameters (SQLAlchemy
        then reuses their compiled form)."""
        windows = self._storage.budget_windows
        budgets = self._storage.budgets
        reservations = self._storage.reservations
        money = windows.c.reserved_usd.type
        count = windows.c.reserved_tokens.type
        key = (windows.c.budget_id == sa.bindparam("bid")) & (
            windows.c.window_start == sa.bindparam("ws")
        )
        usd = sa.bindparam("usd", type_=money)
        tok = sa.bindparam("tok", type_=count)
        limit_usd = (
            sa.select(sa.func.coalesce(budgets.c.limit_usd, _NO_USD_LIMIT))
            .where(budgets.c.id == sa.bindparam("bid"))
            .scalar_subquery()
        )
        limit_tokens = (
            sa.select(sa.func.coalesce(budgets.c.limit_tokens, _NO_TOKEN_LIMIT))
            .where(budgets.c.id == sa.bindparam("bid"))
            .scalar_subquery()
        )
        figures = (
            sa.select(
                windows.c.spent_usd,
                windows.c.reserved_usd,
                windows.c.spent_tokens,
                windows.c.reserved_tokens,
                budgets.c.limit_usd,
                budgets.c.limit_tokens,
            )
            .select_from(windows.join(budgets, budgets.c.id == windows.c.budget_id))
            .where(key)
        )
        if self.engine.dialect.name == "postgresql":
            figures = figures.with_for_update(of=windows)
        return {
            "reserve": sa.update(windows)
            .where(
                key,
                windows.c.spent_usd + windows.c.reserved_usd + usd <= limit_usd,
                windows.c.spent_tokens + windows.c.reserved_tokens + tok <= limit_tokens,
            )
            .values(
                reserved_usd=windows.c.reserved_usd + usd,
                reserved_tokens=windows.c.reserved_tokens + tok,
            ),
            "add": sa.update(windows)
            .where(key)
            .values(
                reserved_usd=windows.c.reserved_usd + usd,
                reserved_tokens=windows.c.reserved_tokens + tok,
            ),
            "move": sa.update(windows)
            .where(key)
            .values(
                reserved_usd=windows.c.reserved_usd - sa.bindparam("give_usd", type_=money),
                reserved_tokens=windows.c.reserved_tokens - sa.bindparam("give_tok", type_=count),
                spent_usd=windows.c.spent_usd + sa.bindparam("add_usd", type_=money),
                spent_tokens=windows.c.spent_tokens + sa.bindparam("add_tok", type_=count),
                overshoot_usd=windows.c.overshoot_usd + sa.bindparam("over", type_=money),
            ),
            "figures": figures,
            "insert": sa.insert(reservations),
            "delete": sa.delete(reservations).where(reservations.c.id == sa.bindparam("rid")),
            "resize": sa.update(reservations)
            .where(reservations.c.id == sa.bindparam("rid"))
            .values(
                amount_usd=sa.bindparam("size_usd", type_=money),
                tokens=sa.bindparam("size_tok", type_=count),
                expires_at=sa.bindparam("until", type_=reservations.c.expires_at.type),
            ),
        }

    def _ensure_windows(self, conn: sa.Connection, keys: Iterable[tuple[str, dt.datetime]]) -> None:
        windows = self._storage.budget_windows
        missing = [k for k in keys if k not in self._windows_seen]
        if not missing:
            return
        insert = self._storage.insert_for(conn.dialect.name)
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

    def reserve(
        self,
        reservation_id: str,
        enforce: Sequence[tuple[BudgetDef, dt.datetime]],
        track: Sequence[tuple[BudgetDef, dt.datetime]],
        usd: Decimal,
        tokens: int,
    ) -> tuple[BudgetDef, dt.datetime] | None:
        """Reserve on every budget in ``enforce`` (all or none) and ``track``
        (unconditionally). Returns the first budget that refused, or None.

        Taken out of this process's leases when they have room; otherwise reserved
        exactly, retried once when the connection was lost (a restart).
        """
        if self.leasing and enforce and not track:
            lines = sorted({(d.id, s) for d, s in enforce})
            if self._lease_mode(reservation_id, lines, usd, tokens):
                return None
        try:
            refused = self._reserve(reservation_id, enforce, track, usd, tokens)
        except sa.exc.DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            refused = self._reserve(reservation_id, enforce, track, usd, tokens)
        if refused is not None and self._give_back_free({(d.id, s) for d, s in enforce}):
            # This process's own lease held the headroom: it is back, so try once more.
            refused = self._reserve(reservation_id, enforce, track, usd, tokens)
        return refused

    def _reserve(
        self,
        reservation_id: str,
        enforce: Sequence[tuple[BudgetDef, dt.datetime]],
        track: Sequence[tuple[BudgetDef, dt.datetime]],
        usd: Decimal,
        tokens: int,
    ) -> tuple[BudgetDef, dt.datetime] | None:
        ordered = sorted(enforce, key=lambda item: (item[0].id, item[1]))
        tracked = sorted(track, key=lambda item: (item[0].id, item[1]))
        keys = [(d.id, s) for d, s in ordered + tracked]
        if not keys:
            return None
        now = utcnow()
        lines = [[d, s.isoformat()] for d, s in keys]
        expires = now + dt.timedelta(seconds=self.lease_seconds)
        if self._pg and len(ordered) == 1 and not tracked and keys[0] in self._windows_seen:
            # The conditional UPDATE and the reservation row in one statement, atomic
            # on its own: no BEGIN and no COMMIT round trips.
            definition, start = ordered[0]
            with self._autocommit() as conn:
                inserted = conn.exec_driver_sql(
                    _PG_RESERVE_ONE,
                    {
                        "id": reservation_id,
                        "holder": self.holder,
                        "usd": usd,
                        "tok": tokens,
                        "bid": definition.id,
                        "ws": start,
                        "big_usd": _NO_USD_LIMIT,
                        "big_tok": _NO_TOKEN_LIMIT,
                        "lines": json.dumps(lines),
                        "now": now,
                        "expires": expires,
                    },
                ).rowcount
            return None if inserted == 1 else (definition, start)
        stmts = self._stmts
        with self.engine.begin() as conn:
            self._ensure_windows(conn, keys)
            for definition, start in ordered:
                params = {"bid": definition.id, "ws": start, "usd": usd, "tok": tokens}
                if conn.execute(stmts["reserve"], params).rowcount != 1:
                    conn.rollback()
                    return definition, start
            for definition, start in tracked:
                conn.execute(
                    stmts["add"], {"bid": definition.id, "ws": start, "usd": usd, "tok": tokens}
                )
            conn.execute(
                stmts["insert"],
                {
                    "id": reservation_id,
                    "holder": self.holder,
                    "amount_usd": usd,
                    "tokens": tokens,
                    "lines": lines,
                    "created_at": now,
                    "expires_at": expires,
                },
            )
        self._windows_seen.update(keys)
        return None

    def _autocommit(self) -> sa.Connection:
        return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def window_figures(
        self, budget_id: str, start: dt.datetime
    ) -> tuple[Decimal, Decimal, int, int]:
        self.flush_leases()
        windows = self._storage.budget_windows
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(windows).where(
                    windows.c.budget_id == budget_id, windows.c.window_start == start
                )
            ).one_or_none()
        if row is None:
            return Decimal(0), Decimal(0), 0, 0
        return row.spent_usd, row.reserved_usd, row.spent_tokens, row.reserved_tokens

    def add_spend(
        self, lines: Sequence[tuple[str, dt.datetime]], usd: Decimal, tokens: int
    ) -> None:
        """Add spend with no reservation behind it (a call recorded after the fact)."""
        params = {"give_usd": Decimal(0), "give_tok": 0, "add_usd": usd, "add_tok": tokens}
        with self.engine.begin() as conn:
            self._ensure_windows(conn, lines)
            for budget_id, start in sorted(lines):
                conn.execute(
                    self._stmts["move"],
                    {**params, "over": Decimal(0), "bid": budget_id, "ws": start},
                )
        self._windows_seen.update(lines)

    def settle(
        self,
        reservation_id: str,
        lines: Sequence[tuple[str, dt.datetime]],
        reserved_usd: Decimal,
        reserved_tokens: int,
        spent_usd: Decimal,
        spent_tokens: int,
    ) -> None:
        """Move a reservation into spent (``spent_usd`` 0 for a release)."""
        if not lines:
            return
        if self._leased and self._settle_leased(
            reservation_id, reserved_usd, reserved_tokens, spent_usd, spent_tokens
        ):
            return
        params = {
            "rid": reservation_id,
            "give_usd": reserved_usd,
            "give_tok": reserved_tokens,
            "add_usd": spent_usd,
            "add_tok": spent_tokens,
            "over": max(spent_usd - reserved_usd, Decimal(0)),
        }
        if self._pg and len(lines) == 1:
            budget_id, start = lines[0]
            with self._autocommit() as conn:
                conn.exec_driver_sql(_PG_SETTLE_ONE, {**params, "bid": budget_id, "ws": start})
            return
        with self.engine.begin() as conn:
            # If the lease ran out and another process reclaimed it, the reserved amount
            # was already given back: only the spend remains to add.
            if not conn.execute(self._stmts["delete"], {"rid": reservation_id}).rowcount:
                params.update(give_usd=Decimal(0), give_tok=0)
            for budget_id, start in sorted(lines):
                conn.execute(self._stmts["move"], {**params, "bid": budget_id, "ws": start})

    def reclaim_expired(self) -> int:
        """Give back the reservations of processes that died holding them."""
        windows = self._storage.budget_windows
        reservations = self._storage.reservations
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

    # -- leases ------------------------------------------------------------------------
    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            # A forked child holds none of its parent's leases, nor its flusher.
            self._pid = os.getpid()
            self.holder = f"{socket.gethostname()}:{self._pid}"
            self._lock = threading.Lock()
            self._acquire_lock = threading.Lock()
            self._leases = {}
            self._leased = {}
            self._draining = []
            self._heat = {}
            self._no_lease_until = {}
            self._flusher = None
            self._stop = threading.Event()

    def _is_hot(self, lines: list[tuple[str, dt.datetime]], now: float) -> bool:
        """Whether this process reserved `HOT_CALLS` calls on these budgets within
        `HOT_SECONDS`: only then is a lease worth its transactions. Under ``_lock``."""
        key = tuple(lines)
        recent = self._heat.get(key)
        if recent is None:
            if len(self._heat) > 4096:
                self._heat = {k: v for k, v in self._heat.items() if now - v[-1] < HOT_SECONDS}
                self._no_lease_until = {k: v for k, v in self._no_lease_until.items() if v > now}
            recent = self._heat[key] = collections.deque(maxlen=HOT_CALLS)
        recent.append(now)
        return len(recent) == HOT_CALLS and now - recent[0] <= HOT_SECONDS

    def _take(
        self,
        reservation_id: str,
        lines: list[tuple[str, dt.datetime]],
        usd: Decimal,
        tokens: int,
        now: float,
    ) -> bool:
        """Hand a call its estimate out of the leases on its budgets, if each has room
        and time left. Under ``_lock``."""
        leases = []
        for line in lines:
            lease = self._leases.get(line)
            if (
                lease is None
                or lease.expires - now < self.lease_seconds / 2
                or lease.free_usd < usd
                or lease.free_tokens < tokens
            ):
                return False
            leases.append(lease)
        for lease in leases:
            lease.held_usd += usd
            lease.held_tokens += tokens
            lease.used_at = now
        self._leased[reservation_id] = leases
        return True

    def _lease_mode(
        self,
        reservation_id: str,
        lines: list[tuple[str, dt.datetime]],
        usd: Decimal,
        tokens: int,
    ) -> bool:
        """Reserve a call out of leases, taking or topping them up when this process is
        busy on its budgets. False: reserve it exactly."""
        self._check_fork()
        now = time.monotonic()
        key = tuple(lines)
        with self._lock:
            if self._take(reservation_id, lines, usd, tokens, now):
                return True
            if not self._is_hot(lines, now) or self._no_lease_until.get(key, 0.0) > now:
                return False
        with self._acquire_lock:
            with self._lock:
                if self._take(reservation_id, lines, usd, tokens, time.monotonic()):
                    return True
            if not self._top_up(lines, usd, tokens):
                with self._lock:
                    self._no_lease_until[key] = time.monotonic() + HOT_SECONDS
                return False
            with self._lock:
                return self._take(reservation_id, lines, usd, tokens, time.monotonic())

    def _chunk(self, row: Any, usd: Decimal, tokens: int) -> tuple[Decimal, int] | None:
        """What to lease on a window: `LEASE_CALLS` calls' worth, at most 1/`LEASE_SHARE`
        of the headroom left; None when that is under `LEASE_MIN_CALLS` calls."""
        chunk_usd = usd * LEASE_CALLS
        chunk_tokens = tokens * LEASE_CALLS
        if row.limit_usd is not None:
            left = row.limit_usd - row.spent_usd - row.reserved_usd
            share = (left / LEASE_SHARE).quantize(_USD_QUANTUM, rounding=ROUND_DOWN)
            chunk_usd = min(chunk_usd, share)
            if chunk_usd < usd * LEASE_MIN_CALLS:
                return None
        if row.limit_tokens is not None:
            left_tokens = row.limit_tokens - row.spent_tokens - row.reserved_tokens
            chunk_tokens = min(chunk_tokens, left_tokens // LEASE_SHARE)
            if chunk_tokens < tokens * LEASE_MIN_CALLS:
                return None
        return chunk_usd, chunk_tokens

    def _top_up(self, lines: list[tuple[str, dt.datetime]], usd: Decimal, tokens: int) -> bool:
        """Lease a chunk on each of ``lines`` whose lease cannot cover the call, all in
        one transaction; False, with nothing leased, when one of them is near its limit.
        Under ``_acquire_lock``."""
        stmts = self._stmts
        wall = utcnow()
        until = wall + dt.timedelta(seconds=self.lease_seconds)
        with self._lock:
            work = [
                (line, lease, lease.snapshot() if lease is not None else None)
                for line in lines
                if (lease := self._leases.get(line)) is None
                or lease.free_usd < usd
                or lease.free_tokens < tokens
            ]
        done: list[tuple[_Lease, _Snapshot, bool]] = []
        grown: list[tuple[_Lease, Decimal, int]] = []
        with self.engine.begin() as conn:
            self._ensure_windows(conn, lines)
            for line, lease, snap in work:
                params = {"bid": line[0], "ws": line[1]}
                alive = False
                if lease is not None and snap is not None:
                    # Settle what the lease's calls spent first: the chunk is sized on
                    # the window as it stands.
                    alive = self._sync(conn, lease, snap, (Decimal(0), 0), until, release=False)
                    done.append((lease, snap, alive))
                row = conn.execute(stmts["figures"], params).one()
                chunk = self._chunk(row, usd, tokens)
                if (
                    chunk is None
                    or conn.execute(
                        stmts["reserve"], {**params, "usd": chunk[0], "tok": chunk[1]}
                    ).rowcount
                    != 1
                ):
                    conn.rollback()
                    return False
                if alive and lease is not None and snap is not None:
                    conn.execute(
                        stmts["resize"],
                        {
                            "rid": lease.id,
                            "size_usd": lease.size_usd - snap[0] + chunk[0],
                            "size_tok": lease.size_tokens - snap[1] + chunk[1],
                            "until": until,
                        },
                    )
                    grown.append((lease, chunk[0], chunk[1]))
                else:
                    fresh = _Lease(line=line, id=new_id())
                    conn.execute(
                        stmts["insert"],
                        {
                            "id": fresh.id,
                            "holder": self.holder,
                            "amount_usd": chunk[0],
                            "tokens": chunk[1],
                            "lines": [[line[0], line[1].isoformat()]],
                            "created_at": wall,
                            "expires_at": until,
                        },
                    )
                    grown.append((fresh, chunk[0], chunk[1]))
        self._windows_seen.update(lines)
        now = time.monotonic()
        with self._lock:
            for lease, snap, alive in done:
                lease.applied(snap, (Decimal(0), 0), alive=alive, expires=now + self.lease_seconds)
                if not alive:  # reclaimed by another process: a fresh lease replaces it
                    lease.gone = True
                    lease.size_usd, lease.size_tokens = Decimal(0), 0
                    self._retire(lease)
            for lease, chunk_usd, chunk_tokens in grown:
                lease.size_usd += chunk_usd
                lease.size_tokens += chunk_tokens
                lease.expires = now + self.lease_seconds
                lease.used_at = now
                self._leases[lease.line] = lease
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_loop, name="tokenledger-budget-leases", daemon=True
                )
                self._flusher.start()
        return True

    def _retire(self, lease: _Lease) -> None:
        """No call takes from ``lease`` any more (given back, or reclaimed by another
        process); what its calls in flight spend is still flushed. Under ``_lock``."""
        if self._leases.get(lease.line) is lease:
            del self._leases[lease.line]
        busy = lease.held_usd or lease.held_tokens or lease.has_pending()
        if busy and lease not in self._draining:
            self._draining.append(lease)
        elif not busy and lease in self._draining:
            self._draining.remove(lease)

    def _sync(
        self,
        conn: sa.Connection,
        lease: _Lease,
        snap: _Snapshot,
        give: tuple[Decimal, int],
        until: dt.datetime,
        *,
        release: bool,
    ) -> bool:
        """In ``conn``'s transaction: move the spend the lease's calls settled (``snap``)
        from reserved to spent, give back ``give`` of its headroom (all of it, and its
        row, with ``release``) and renew it. False: another process had reclaimed it,
        so nothing is reserved for it any more and only the spend is added."""
        covered_usd, covered_tokens, spent_usd, spent_tokens, over = snap
        alive = False
        if not lease.gone:
            if release:
                alive = conn.execute(self._stmts["delete"], {"rid": lease.id}).rowcount == 1
            else:
                params = {
                    "rid": lease.id,
                    "size_usd": lease.size_usd - covered_usd - give[0],
                    "size_tok": lease.size_tokens - covered_tokens - give[1],
                    "until": until,
                }
                alive = conn.execute(self._stmts["resize"], params).rowcount == 1
        if alive or spent_usd or spent_tokens or over:
            conn.execute(
                self._stmts["move"],
                {
                    "bid": lease.line[0],
                    "ws": lease.line[1],
                    "give_usd": covered_usd + give[0] if alive else Decimal(0),
                    "give_tok": covered_tokens + give[1] if alive else 0,
                    "add_usd": spent_usd,
                    "add_tok": spent_tokens,
                    "over": over,
                },
            )
        return alive

    def _settle_leased(
        self,
        reservation_id: str,
        reserved_usd: Decimal,
        reserved_tokens: int,
        spent_usd: Decimal,
        spent_tokens: int,
    ) -> bool:
        """Settle a call reserved out of leases, in memory (the flusher moves its spend
        into the database). False: the call was reserved exactly."""
        with self._lock:
            leases = self._leased.pop(reservation_id, None)
            if leases is None:
                return False
            now = time.monotonic()
            covered_usd = min(spent_usd, reserved_usd)
            covered_tokens = min(spent_tokens, reserved_tokens)
            over = max(spent_usd - reserved_usd, Decimal(0))
            for lease in leases:
                lease.held_usd -= reserved_usd
                lease.held_tokens -= reserved_tokens
                lease.covered_usd += covered_usd
                lease.covered_tokens += covered_tokens
                lease.spent_usd += spent_usd
                lease.spent_tokens += spent_tokens
                lease.overshoot_usd += over
                lease.used_at = now
        return True

    def _flush_loop(self) -> None:
        stop = self._stop
        while not stop.wait(LEASE_FLUSH_SECONDS):
            try:
                self.flush_leases(release_idle=True)
            except Exception as exc:
                # The leases stay; their spend is flushed on a later round, and they stop
                # handing out headroom well before their lease could run out.
                logger.warning(
                    "tokenledger could not flush budget leases (%s); retrying",
                    exc.__class__.__name__,
                )

    def flush_leases(self, *, release_idle: bool = False, release_all: bool = False) -> None:
        """Move the spend of calls reserved out of leases into the budget windows and
        renew the leases; give back the headroom of those idle for `LEASE_IDLE_SECONDS`
        (``release_idle``), or of all of them (``release_all``, on close)."""
        if not self._leases and not self._draining:
            return
        self._check_fork()
        with self._acquire_lock:
            now = time.monotonic()
            with self._lock:
                work = []
                for lease in [*self._leases.values(), *self._draining]:
                    held = bool(lease.held_usd or lease.held_tokens)
                    live = self._leases.get(lease.line) is lease
                    idle = release_all or (
                        release_idle and now - lease.used_at > LEASE_IDLE_SECONDS
                    )
                    release = not lease.gone and not held and (idle or not live)
                    give_back = not lease.gone and held and live and idle
                    renew = not lease.gone and lease.expires - now < self.lease_seconds * 0.75
                    if release or give_back:
                        self._retire(lease)  # no call takes from it from now on
                        free = (lease.free_usd, lease.free_tokens)
                        work.append((lease, lease.snapshot(), free, release))
                    elif renew or lease.has_pending():
                        work.append((lease, lease.snapshot(), (Decimal(0), 0), False))
                    elif not live:
                        self._retire(lease)  # reclaimed, and nothing left to flush
            if not work:
                return
            until = utcnow() + dt.timedelta(seconds=self.lease_seconds)
            try:
                with self.engine.begin() as conn:
                    results = [
                        (
                            lease,
                            snap,
                            give,
                            release,
                            self._sync(conn, lease, snap, give, until, release=release),
                        )
                        for lease, snap, give, release in sorted(work, key=_by_line)
                    ]
            except Exception:
                with self._lock:
                    for lease, _snap, give, release in work:
                        if (release or any(give)) and lease.line not in self._leases:
                            # Nothing was given back: the lease still holds its headroom.
                            self._leases[lease.line] = lease
                            if lease in self._draining:
                                self._draining.remove(lease)
                raise
            self._applied(results)

    def _give_back_free(self, lines: set[tuple[str, dt.datetime]]) -> bool:
        """Give back the unused headroom of this process's leases on ``lines``: a call
        must not be refused for headroom its own process sits on."""
        if not self._leases or not any(line in self._leases for line in lines):
            return False
        with self._acquire_lock:
            with self._lock:
                work = []
                for line in sorted(lines):
                    lease = self._leases.get(line)
                    if lease is None:
                        continue
                    held = bool(lease.held_usd or lease.held_tokens)
                    give = (lease.free_usd, lease.free_tokens)
                    self._retire(lease)
                    work.append((lease, lease.snapshot(), give, not held))
            if not work:
                return False
            until = utcnow() + dt.timedelta(seconds=self.lease_seconds)
            with self.engine.begin() as conn:
                results = [
                    (
                        lease,
                        snap,
                        give,
                        release,
                        self._sync(conn, lease, snap, give, until, release=release),
                    )
                    for lease, snap, give, release in work
                ]
            self._applied(results)
        return True

    def _applied(
        self,
        results: list[tuple[_Lease, _Snapshot, tuple[Decimal, int], bool, bool]],
    ) -> None:
        """Bring the leases' figures in line with a committed flush or give-back."""
        expires = time.monotonic() + self.lease_seconds
        with self._lock:
            for lease, snap, give, release, alive in results:
                lease.applied(snap, give, alive=alive, expires=expires)
                if release or not alive:
                    lease.gone = True
                    lease.size_usd, lease.size_tokens = Decimal(0), 0
                if lease.gone or self._leases.get(lease.line) is not lease:
                    self._retire(lease)

    def dispose(self) -> None:
        """Give back this process's leases and close the connections."""
        self.leasing = False
        self._stop.set()
        flusher = self._flusher
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join(timeout=5)
        try:
            self.flush_leases(release_all=True)
        except Exception:
            logger.exception(
                "tokenledger could not give back its budget leases; they expire and are "
                "reclaimed after %s s",
                self.lease_seconds,
            )
        if self.engine is not None:
            self.engine.dispose()


# -- enforcement ------------------------------------------------------------------------


def _scopes_for(run: Run | None) -> set[str]:
    scopes = {"global"}
    node = run
    while node is not None:
        scopes.add(f"agent:{node.name}")
        node = node.parent
    if run is not None:
        for key, value in run.record.tags.items():
            scopes.add(f"{key}:{value}")
    return scopes


class BudgetEnforcer:
    """Decides, before each captured call, whether it may spend; settles it after."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        lease_seconds: float = 120.0,
        default_max_output_tokens: int = 4096,
        failure_policy: str = "fail_closed",
    ) -> None:
        if failure_policy not in ("fail_closed", "fail_open"):
            raise ConfigurationError(
                f"`budget_failure_policy` is {failure_policy!r}; it must be 'fail_closed' "
                "(refuse budgeted calls while the database is unreachable) or 'fail_open' "
                "(let them through and report it)."
            )
        self.failure_policy = failure_policy
        #: Calls let through unreserved under ``fail_open`` while the database was down.
        self.unreserved_calls = 0
        self.ledger = ledger
        self.store = BudgetStore(ledger.engine, lease_seconds=lease_seconds)
        self.default_max_output_tokens = default_max_output_tokens
        self._run_lock = threading.Lock()
        self._run_reserved: dict[str, tuple[Decimal, int]] = {}

    # -- public surface used by the Ledger ---------------------------------------------
    def set_budget(
        self,
        scope: str,
        *,
        usd: Any,
        tokens: Any,
        per: str,
        action: str,
        downgrade_to: Sequence[str],
    ) -> BudgetDef:
        spec = parse_shared_budget(
            scope, usd=usd, tokens=tokens, per=per, action=action, downgrade_to=downgrade_to
        )
        return self.store.put(*spec)

    # -- before / after a call ---------------------------------------------------------
    def may_apply(self, run: Run | None) -> bool:
        """Whether a budget might apply to a call in ``run``, without any I/O: False only
        when no run in the chain has a budget and the cached list of shared budgets is
        fresh and empty."""
        node = run
        while node is not None:
            if node.budget is not None:
                return True
            node = node.parent
        return not self.store.known_empty()

    def applicable(self, run: Run | None) -> tuple[list[BudgetDef], list[Run]]:
        run_budgets: list[Run] = []
        node = run
        while node is not None:
            if node.budget is not None:
                run_budgets.append(node)
            node = node.parent
        defs = self.store.definitions()
        if not defs:
            return [], run_budgets
        scopes = _scopes_for(run)
        return [d for d in defs if d.scope in scopes], run_budgets

    def estimate(self, pending: PendingCall, kwargs: dict[str, Any], model: str) -> Estimate:
        book = self.ledger.prices
        call = pending.call
        max_out = call.max_tokens
        if max_out is None:
            max_out = book.max_output_tokens(model) or self.default_max_output_tokens
        input_tokens = _count_input_tokens(model, kwargs)
        usage = TokenUsage(input_tokens=input_tokens, output_tokens=max_out)
        price = book.lookup(model)
        usd = book.cost(price, usage) if price is not None else None
        if call.operation == "embeddings":
            usage = TokenUsage(input_tokens=input_tokens)
            usd = book.cost(price, usage) if price is not None else None
            return Estimate(usd=usd, tokens=input_tokens, model=model)
        return Estimate(usd=usd, tokens=input_tokens + max_out, model=model)

    def before_call(self, pending: PendingCall, kwargs: dict[str, Any]) -> None:
        shared, run_budgets = self.applicable(pending.run)
        if not shared and not run_budgets:
            return
        requested = pending.call.requested_model or ""
        candidates = [requested]
        downgrade = [d for d in shared if d.action == "downgrade"]
        for d in downgrade:
            candidates.extend(m for m in d.downgrade_to if m not in candidates)
        for run in run_budgets:
            if run.budget.action == "downgrade":
                candidates.extend(m for m in run.budget.downgrade_to if m not in candidates)
        refusal: tuple[str, Any, Estimate] | None = None
        for model in candidates:
            estimate = self.estimate(pending, kwargs, model)
            refusal = self._try_reserve(pending, shared, run_budgets, estimate)
            if refusal is None:
                if model != requested:
                    if "model" not in kwargs:
                        # model given positionally: litellm reuses the positional args.
                        # Give back what was just reserved for the cheaper model.
                        self.release(pending)
                        if pending.run is not None:
                            pending.run.mark_budget_exceeded()
                        raise BudgetExceeded(
                            f"Budget would be exceeded by this call to {requested} and it "
                            f"cannot be downgraded to {model} because its model was passed "
                            "positionally; pass model= as a keyword. No request was sent."
                        )
                    kwargs["model"] = model
                    pending.call.requested_model = requested
                    # The model the request goes to: the row keeps it (and is priced at
                    # it) even when the response does not name the model that served it.
                    pending.call.model = model
                    pending.downgraded_to = model
                    logger.warning(
                        "tokenledger downgraded a call from %s to %s to fit a budget",
                        requested,
                        model,
                    )
                return
            if refusal[0] == "raise":
                break
        assert refusal is not None
        _action, message, _estimate = refusal
        if pending.run is not None:
            pending.run.mark_budget_exceeded()
        raise BudgetExceeded(message)

    def _try_reserve(
        self,
        pending: PendingCall,
        shared: list[BudgetDef],
        run_budgets: list[Run],
        estimate: Estimate,
    ) -> tuple[str, str, Estimate] | None:
        now = utcnow()
        usd = estimate.usd
        enforce: list[tuple[BudgetDef, dt.datetime]] = []
        track: list[tuple[BudgetDef, dt.datetime]] = []
        for d in shared:
            start, _reset = window_bounds(d.per, now)
            (track if d.action == "warn" else enforce).append((d, start))
        if usd is None and (
            any(d.usd is not None for d, _ in enforce)
            or any(r.budget.usd is not None for r in run_budgets if r.budget.action != "warn")
        ):
            return (
                "raise",
                f"No price is known for model `{estimate.model}`, so tokenledger cannot "
                "bound its cost against a USD budget; set one with "
                f"`ledger.set_price('{estimate.model}', input_per_million=..., "
                "output_per_million=...)`.",
                estimate,
            )
        amount = usd or Decimal(0)
        # In-memory run budgets first: cheapest to check, no I/O.
        held_runs: list[Run] = []
        passed: list[tuple[Run, tuple[Decimal, Decimal, int, int]]] = []
        refusal = self._reserve_runs(run_budgets, amount, estimate.tokens, held_runs, passed)
        if refusal is not None:
            self._release_runs(held_runs, amount, estimate.tokens)
            run, figures = refusal
            budget = run.budget
            return (
                budget.action,
                _refusal_message(
                    f"run:{run.name}", "run", budget.usd, budget.tokens, figures, estimate, None
                ),
                estimate,
            )
        reservation_id = new_id()
        if enforce or track:
            try:
                refused = self.store.reserve(
                    reservation_id, enforce, track, amount, estimate.tokens
                )
                # A dead process's reservations may be holding the budget: reclaim
                # expired leases and try once more before refusing.
                if refused is not None and self.store.reclaim_expired():
                    refused = self.store.reserve(
                        reservation_id, enforce, track, amount, estimate.tokens
                    )
            except BudgetExceeded:
                raise
            except Exception as exc:
                if self.failure_policy == "fail_closed":
                    self._release_runs(held_runs, amount, estimate.tokens)
                    raise LedgerError(
                        f"tokenledger could not reserve budget for a call to {estimate.model} "
                        f"(database at {self.ledger.url}: {exc.__class__.__name__}); the call "
                        "was not sent because budgets fail closed."
                    ) from exc
                # fail_open: the call proceeds unreserved, and says so.
                self.unreserved_calls += 1
                logger.warning(
                    "tokenledger could not reserve budget for a call to %s (database at %s: "
                    "%s); the call proceeds unreserved because budget_failure_policy is "
                    "fail_open (%d such calls so far)",
                    estimate.model,
                    self.ledger.url,
                    exc.__class__.__name__,
                    self.unreserved_calls,
                )
                enforce, track, refused = [], [], None
            if refused is not None:
                self._release_runs(held_runs, amount, estimate.tokens)
                definition, start = refused
                figures = self.store.window_figures(definition.id, start)
                _s, reset = window_bounds(definition.per, now)
                return (
                    definition.action,
                    _refusal_message(
                        definition.scope,
                        definition.per,
                        definition.usd,
                        definition.tokens,
                        figures,
                        estimate,
                        reset,
                    ),
                    estimate,
                )
        # Warn only once the call is sure to proceed.
        for run, figures in passed:
            budget = run.budget
            label = f"Run `{run.name}` budget"
            self._warn(label, budget.usd, budget.tokens, figures, estimate, pending)
        for d, start in track:
            figures = self.store.window_figures(d.id, start)
            if _over(d.usd, d.tokens, figures):
                label = f"Budget `{d.scope}` ({d.per})"
                self._warn(label, d.usd, d.tokens, figures, estimate, pending)
        pending.reservation = Reservation(
            id=reservation_id,
            estimate=estimate,
            lines=[(d.id, s) for d, s in enforce + track],
            run_lines=held_runs,
            warn_only=[(d.id, s) for d, s in track],
        )
        return None

    def _warn(
        self,
        label: str,
        limit_usd: Decimal | None,
        limit_tokens: int | None,
        figures: tuple[Decimal, Decimal, int, int],
        estimate: Estimate,
        pending: PendingCall,
    ) -> None:
        spent, reserved = _figures_text(limit_usd, limit_tokens, figures)
        message = (
            f"{label} is over its limit of {_limit_text(limit_usd, limit_tokens)} (spent "
            f"{spent}, reserved {reserved}, this call included); the call to "
            f"{estimate.model}, estimated at {_fmt_usd(estimate.usd)}, proceeds because the "
            "budget's action is `warn`."
        )
        warnings.warn(message, BudgetWarning, stacklevel=4)
        logger.warning(message)
        span = pending.run.span if pending.run is not None else None
        if span is not None and span.is_recording():
            span.add_event(
                "tokenledger.budget.exceeded",
                {"tokenledger.budget": label, "tokenledger.budget.action": "warn"},
            )

    def _reserve_runs(
        self,
        runs: list[Run],
        usd: Decimal,
        tokens: int,
        held: list[Run],
        passed: list[tuple[Run, tuple[Decimal, Decimal, int, int]]],
    ) -> tuple[Run, tuple[Decimal, Decimal, int, int]] | None:
        """Reserve on the in-memory run budgets of the run and its ancestors.

        Returns the first budget that refuses and its figures, or None. A ``warn``
        budget that this call passes holds the call too and is added to ``passed``;
        the budgets above it are still checked.
        """
        with self._run_lock:
            for run in runs:
                budget = run.budget
                spent = run.cost_usd
                reserved_usd, reserved_tokens = self._run_reserved.get(run.id, (Decimal(0), 0))
                used_tokens = run.input_tokens + run.output_tokens
                over_usd = budget.usd is not None and spent + reserved_usd + usd > budget.usd
                over_tokens = budget.tokens is not None and (
                    used_tokens + reserved_tokens + tokens > budget.tokens
                )
                if (over_usd or over_tokens) and budget.action != "warn":
                    return run, (spent, reserved_usd, used_tokens, reserved_tokens)
                self._run_reserved[run.id] = (reserved_usd + usd, reserved_tokens + tokens)
                held.append(run)
                if over_usd or over_tokens:
                    figures = (spent, reserved_usd + usd, used_tokens, reserved_tokens + tokens)
                    passed.append((run, figures))
        return None

    def _release_runs(self, runs: list[Run], usd: Decimal, tokens: int) -> None:
        with self._run_lock:
            for run in runs:
                reserved_usd, reserved_tokens = self._run_reserved.get(run.id, (Decimal(0), 0))
                left = (reserved_usd - usd, reserved_tokens - tokens)
                if left[0] <= 0 and left[1] <= 0:
                    self._run_reserved.pop(run.id, None)
                else:
                    self._run_reserved[run.id] = left

    def after_call(self, pending: PendingCall) -> None:
        reservation: Reservation | None = pending.reservation
        if reservation is None:
            return
        pending.reservation = None
        call = pending.call
        estimate = reservation.estimate
        est_usd = estimate.usd or Decimal(0)
        spent_usd = call.cost_usd or Decimal(0)
        spent_tokens = call.input_tokens + call.output_tokens
        self._release_runs(reservation.run_lines, est_usd, estimate.tokens)
        if estimate.usd is not None and spent_usd > est_usd:
            logger.warning(
                "Call %s to %s cost $%s, more than the $%s reserved for it (no max_tokens?); "
                "the overshoot is recorded on its budgets.",
                call.id,
                call.model or call.requested_model,
                spent_usd,
                est_usd,
            )
        try:
            self.store.settle(
                reservation.id, reservation.lines, est_usd, estimate.tokens, spent_usd, spent_tokens
            )
        except Exception:
            logger.exception(
                "tokenledger could not settle budget reservation %s; its lease will expire "
                "and be reclaimed",
                reservation.id,
            )

    def add_spend(self, pending: PendingCall) -> None:
        """Add a call that was never reserved (``record_call``, ``run.charge``) to the
        shared budgets that apply, so recorded spend counts against them too."""
        call = pending.call
        usd = call.cost_usd or Decimal(0)
        tokens = call.input_tokens + call.output_tokens
        if not usd and not tokens:
            return
        try:
            shared, _runs = self.applicable(pending.run)
            if not shared:
                return
            now = utcnow()
            lines = [(d.id, window_bounds(d.per, now)[0]) for d in shared]
            self.store.add_spend(lines, usd, tokens)
        except Exception:
            logger.exception("tokenledger could not add call %s to its budgets", call.id)

    def release(self, pending: PendingCall) -> None:
        reservation: Reservation | None = pending.reservation
        if reservation is None:
            return
        pending.reservation = None
        est_usd = reservation.estimate.usd or Decimal(0)
        self._release_runs(reservation.run_lines, est_usd, reservation.estimate.tokens)
        try:
            self.store.settle(
                reservation.id,
                reservation.lines,
                est_usd,
                reservation.estimate.tokens,
                Decimal(0),
                0,
            )
        except Exception:
            logger.exception("tokenledger could not release budget reservation %s", reservation.id)

    def forget_run(self, run: Run) -> None:
        with self._run_lock:
            self._run_reserved.pop(run.id, None)


def _count_input_tokens(model: str, kwargs: dict[str, Any]) -> int:
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


def _fmt_usd(amount: Decimal | None) -> str:
    if amount is None:
        return "unknown"
    return f"${amount.quantize(Decimal('0.000001')).normalize():f}"


def _over(
    limit_usd: Decimal | None, limit_tokens: int | None, figures: tuple[Decimal, Decimal, int, int]
) -> bool:
    spent, reserved, spent_tokens, reserved_tokens = figures
    return (limit_usd is not None and spent + reserved > limit_usd) or (
        limit_tokens is not None and spent_tokens + reserved_tokens > limit_tokens
    )


def _limit_text(limit_usd: Decimal | None, limit_tokens: int | None) -> str:
    return " and ".join(
        part
        for part in (
            _fmt_usd(limit_usd) if limit_usd is not None else "",
            f"{limit_tokens:,} tokens" if limit_tokens is not None else "",
        )
        if part
    )


def _figures_text(
    limit_usd: Decimal | None, limit_tokens: int | None, figures: tuple[Decimal, Decimal, int, int]
) -> tuple[str, str]:
    """Spent and reserved in the units the budget is limited in (USD, tokens, or both)."""
    spent, reserved, spent_tokens, reserved_tokens = figures
    texts = []
    for usd, tokens in ((spent, spent_tokens), (reserved, reserved_tokens)):
        parts = []
        if limit_usd is not None or limit_tokens is None:
            parts.append(_fmt_usd(usd))
        if limit_tokens is not None:
            parts.append(f"{tokens:,} tokens")
        texts.append(" and ".join(parts))
    return texts[0], texts[1]


def _refusal_message(
    scope: str,
    per: str,
    limit_usd: Decimal | None,
    limit_tokens: int | None,
    figures: tuple[Decimal, Decimal, int, int],
    estimate: Estimate,
    resets_at: dt.datetime | None,
) -> str:
    spent, reserved = _figures_text(limit_usd, limit_tokens, figures)
    reset = (
        f"; the window resets at {resets_at.isoformat()}"
        if resets_at is not None
        else ("; it does not reset" if per == "total" else "")
    )
    limit = _limit_text(limit_usd, limit_tokens)
    return (
        f"Budget `{scope}` ({per}) would be exceeded: limit {limit}, "
        f"spent {spent}, reserved {reserved}, and this call to {estimate.model} is estimated at "
        f"{_fmt_usd(estimate.usd)} ({estimate.tokens:,} tokens){reset}. No request was sent."
    )
