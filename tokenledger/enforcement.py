"""Budget enforcement: the reservations store and the per-call enforcer.

Kept apart from `tokenledger.budgets` (the public definitions) so that ``import
tokenledger`` does not import SQLAlchemy; see `tokenledger.budgets` for how it works.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from tokenledger.budgets import (
    MAX_TOKENS,
    MAX_USD,
    WINDOWS,
    BudgetDef,
    BudgetStatus,
    BudgetWarning,
    Estimate,
    Reservation,
    parse_shared_budget,
    window_bounds,
)
from tokenledger.exceptions import BudgetExceeded, ConfigurationError, LedgerError
from tokenledger.records import TokenUsage, new_id, utcnow

if TYPE_CHECKING:
    from tokenledger.capture import PendingCall
    from tokenledger.ledger import Ledger
    from tokenledger.runs import Run

logger = logging.getLogger("tokenledger")


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
        self._windows_seen: set[tuple[str, dt.datetime]] = set()
        self._cache: list[BudgetDef] | None = None
        self._cache_at = 0.0
        self._cache_lock = threading.Lock()
        self.cache_ttl = 2.0

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

    def reserve(self, *args: Any) -> tuple[BudgetDef, dt.datetime] | None:
        """See `_reserve`; retried once when the connection was lost (a restart)."""
        try:
            return self._reserve(*args)
        except sa.exc.DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            return self._reserve(*args)

    def _reserve(
        self,
        reservation_id: str,
        enforce: Sequence[tuple[BudgetDef, dt.datetime]],
        track: Sequence[tuple[BudgetDef, dt.datetime]],
        usd: Decimal,
        tokens: int,
    ) -> tuple[BudgetDef, dt.datetime] | None:
        """Reserve on every budget in ``enforce`` (all or none) and ``track``
        (unconditionally). Returns the first budget that refused, or None."""
        windows = self._storage.budget_windows
        budgets = self._storage.budgets
        reservations = self._storage.reservations
        ordered = sorted(enforce, key=lambda item: (item[0].id, item[1]))
        tracked = sorted(track, key=lambda item: (item[0].id, item[1]))
        keys = [(d.id, s) for d, s in ordered + tracked]
        big = Decimal(MAX_USD) * 1000
        with self.engine.begin() as conn:
            self._ensure_windows(conn, keys)
            for definition, start in ordered:
                limit_usd = (
                    sa.select(sa.func.coalesce(budgets.c.limit_usd, big))
                    .where(budgets.c.id == definition.id)
                    .scalar_subquery()
                )
                limit_tokens = (
                    sa.select(sa.func.coalesce(budgets.c.limit_tokens, MAX_TOKENS * 10))
                    .where(budgets.c.id == definition.id)
                    .scalar_subquery()
                )
                result = conn.execute(
                    sa.update(windows)
                    .where(
                        windows.c.budget_id == definition.id,
                        windows.c.window_start == start,
                        windows.c.spent_usd + windows.c.reserved_usd + usd <= limit_usd,
                        windows.c.spent_tokens + windows.c.reserved_tokens + tokens <= limit_tokens,
                    )
                    .values(
                        reserved_usd=windows.c.reserved_usd + usd,
                        reserved_tokens=windows.c.reserved_tokens + tokens,
                    )
                )
                if result.rowcount != 1:
                    conn.rollback()
                    return definition, start
            for definition, start in tracked:
                conn.execute(
                    sa.update(windows)
                    .where(windows.c.budget_id == definition.id, windows.c.window_start == start)
                    .values(
                        reserved_usd=windows.c.reserved_usd + usd,
                        reserved_tokens=windows.c.reserved_tokens + tokens,
                    )
                )
            if keys:
                now = utcnow()
                conn.execute(
                    sa.insert(reservations).values(
                        id=reservation_id,
                        holder=self.holder,
                        amount_usd=usd,
                        tokens=tokens,
                        lines=[[d, s.isoformat()] for d, s in keys],
                        created_at=now,
                        expires_at=now + dt.timedelta(seconds=self.lease_seconds),
                    )
                )
        self._windows_seen.update(keys)
        return None

    def window_figures(
        self, budget_id: str, start: dt.datetime
    ) -> tuple[Decimal, Decimal, int, int]:
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
        windows = self._storage.budget_windows
        with self.engine.begin() as conn:
            self._ensure_windows(conn, lines)
            for budget_id, start in sorted(lines):
                conn.execute(
                    sa.update(windows)
                    .where(windows.c.budget_id == budget_id, windows.c.window_start == start)
                    .values(
                        spent_usd=windows.c.spent_usd + usd,
                        spent_tokens=windows.c.spent_tokens + tokens,
                    )
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
        windows = self._storage.budget_windows
        reservations = self._storage.reservations
        overshoot = max(spent_usd - reserved_usd, Decimal(0))
        with self.engine.begin() as conn:
            deleted = conn.execute(
                sa.delete(reservations).where(reservations.c.id == reservation_id)
            ).rowcount
            # If the lease ran out and another process reclaimed it, the reserved amount
            # was already given back: only the spend remains to add.
            give_back_usd = reserved_usd if deleted else Decimal(0)
            give_back_tokens = reserved_tokens if deleted else 0
            for budget_id, start in sorted(lines):
                conn.execute(
                    sa.update(windows)
                    .where(windows.c.budget_id == budget_id, windows.c.window_start == start)
                    .values(
                        reserved_usd=windows.c.reserved_usd - give_back_usd,
                        reserved_tokens=windows.c.reserved_tokens - give_back_tokens,
                        spent_usd=windows.c.spent_usd + spent_usd,
                        spent_tokens=windows.c.spent_tokens + spent_tokens,
                        overshoot_usd=windows.c.overshoot_usd + overshoot,
                    )
                )

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

    def dispose(self) -> None:
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
