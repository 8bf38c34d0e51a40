"""Leased headroom: a busy process reserves budget ahead of its calls, in chunks.

A process that makes `HOT_CALLS` calls on the same budgets within `HOT_SECONDS`
reserves a chunk of each budget window's headroom (a lease: one ``reservations`` row,
reserved on the window like any other and reclaimed like any other if the process dies)
and hands it out to its calls under a local lock. A flusher thread moves their spend
from reserved to spent every `LEASE_FLUSH_SECONDS`, renews the leases, and gives back
those idle for `LEASE_IDLE_SECONDS`; closing the store gives back the rest.

The limit is checked in the database when a chunk is reserved, and a call takes only
what a chunk has left, so spend can no more pass a limit than with exact reservations.
A chunk is `LEASE_CALLS` calls' worth, at most 1/`LEASE_SHARE` of the headroom left, and
none is taken when that is under `LEASE_MIN_CALLS` calls: near its limit a budget is
reserved call by call, and no process sits on headroom another one needs.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Iterable
from decimal import ROUND_DOWN, Decimal
from typing import TYPE_CHECKING, Any, NamedTuple

from tokenledger._budget_scope import NOTHING, Amount, WindowKey
from tokenledger._money import QUANTUM
from tokenledger.records import new_id, utcnow

if TYPE_CHECKING:
    import sqlalchemy as sa

    from tokenledger._reservations import BudgetStore

__all__ = ["Leases"]

logger = logging.getLogger("tokenledger")

HOT_CALLS = 8
HOT_SECONDS = 1.0
LEASE_CALLS = 256
LEASE_SHARE = 32
LEASE_MIN_CALLS = 8
#: How often the spend of leased calls is moved into the budget windows.
LEASE_FLUSH_SECONDS = 0.05
#: A lease no call has used for this long is given back.
LEASE_IDLE_SECONDS = 0.5


class _Snapshot(NamedTuple):
    """What one flush of a lease moves into its window: the spend its calls settled
    within their estimates (``covered``, leaving reserved), all of their spend, and the
    overshoot beyond their estimates."""

    covered_usd: Decimal
    covered_tokens: int
    spent_usd: Decimal
    spent_tokens: int
    overshoot_usd: Decimal


@dataclasses.dataclass(eq=False)
class _Lease:
    """Headroom this process reserved on one budget window ahead of its calls.

    ``size`` is what its ``reservations`` row holds on the window; calls in flight hold
    ``held`` of it; ``covered`` is what settled calls spent within their estimates, not
    yet moved to spent (``spent`` and ``overshoot`` are all of what they spent). Free
    for new calls: size - held - covered.
    """

    line: WindowKey
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
    def free(self) -> Amount:
        return Amount(
            self.size_usd - self.held_usd - self.covered_usd,
            self.size_tokens - self.held_tokens - self.covered_tokens,
        )

    def fits(self, amount: Amount) -> bool:
        free = self.free
        return free.usd >= amount.usd and free.tokens >= amount.tokens

    def is_held(self) -> bool:
        return bool(self.held_usd or self.held_tokens)

    def has_pending(self) -> bool:
        return bool(self.spent_usd or self.spent_tokens or self.overshoot_usd)

    def snapshot(self) -> _Snapshot:
        covered = (self.covered_usd, self.covered_tokens)
        return _Snapshot(*covered, self.spent_usd, self.spent_tokens, self.overshoot_usd)

    def applied(self, snap: _Snapshot, give: Amount, *, alive: bool, expires: float) -> None:
        """Take a committed flush of ``snap`` (and give-back of ``give``) off the books."""
        self.covered_usd -= snap.covered_usd
        self.covered_tokens -= snap.covered_tokens
        self.spent_usd -= snap.spent_usd
        self.spent_tokens -= snap.spent_tokens
        self.overshoot_usd -= snap.overshoot_usd
        if alive:
            self.size_usd -= snap.covered_usd + give.usd
            self.size_tokens -= snap.covered_tokens + give.tokens
            self.expires = expires

    def drop(self) -> None:
        """Its row is no longer ours: it holds nothing on the window any more."""
        self.gone = True
        self.size_usd, self.size_tokens = Decimal(0), 0


class _Sync(NamedTuple):
    """One lease to bring in line with the database: flush ``snap``, give back ``give``
    of its headroom, and with ``release`` give back all of it and its row."""

    lease: _Lease
    snap: _Snapshot
    give: Amount
    release: bool


class _Synced(NamedTuple):
    """A `_Sync` committed, and whether the lease's row was still there (False: another
    process had reclaimed it)."""

    sync: _Sync
    alive: bool


def _chunk(row: Any, amount: Amount) -> Amount | None:
    """What to lease on a window: `LEASE_CALLS` calls' worth, at most 1/`LEASE_SHARE` of
    the headroom left; None when that is under `LEASE_MIN_CALLS` calls."""
    usd, tokens = amount
    chunk_usd = usd * LEASE_CALLS
    chunk_tokens = tokens * LEASE_CALLS
    if row.limit_usd is not None:
        left = row.limit_usd - row.spent_usd - row.reserved_usd
        share = (left / LEASE_SHARE).quantize(QUANTUM, rounding=ROUND_DOWN)
        chunk_usd = min(chunk_usd, share)
        if chunk_usd < usd * LEASE_MIN_CALLS:
            return None
    if row.limit_tokens is not None:
        left_tokens = row.limit_tokens - row.spent_tokens - row.reserved_tokens
        chunk_tokens = min(chunk_tokens, left_tokens // LEASE_SHARE)
        if chunk_tokens < tokens * LEASE_MIN_CALLS:
            return None
    return Amount(chunk_usd, chunk_tokens)


class Leases:
    """This process's leases on the windows of ``store``, and their flusher thread."""

    def __init__(self, store: BudgetStore) -> None:
        self.store = store
        #: Whether a busy process reserves out of leased chunks (off once closed).
        self.enabled = True
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()  # the leases' figures; never held across I/O
        self._acquire_lock = threading.Lock()  # one lease transaction at a time
        self._leases: dict[WindowKey, _Lease] = {}
        self._leased: dict[str, list[_Lease]] = {}  # reservation id -> leases it holds
        self._draining: list[_Lease] = []  # no longer handed out, still to flush
        self._heat: dict[tuple[WindowKey, ...], collections.deque[float]] = {}
        self._no_lease_until: dict[tuple[WindowKey, ...], float] = {}
        self._flusher: threading.Thread | None = None
        self._stop = threading.Event()

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            # A forked child holds none of its parent's leases, nor its flusher.
            self._reset()

    # -- reserving out of leases -------------------------------------------------------
    def take(self, reservation_id: str, lines: list[WindowKey], amount: Amount) -> bool:
        """Reserve a call out of the leases held now, if they have room: no I/O, no
        waiting on a top-up. False: try `reserve` (which may top up) or reserve exactly."""
        if not self.enabled or not self._leases:
            return False
        self._check_fork()
        with self._lock:
            return self._take(reservation_id, lines, amount, time.monotonic())

    def reserve(self, reservation_id: str, lines: list[WindowKey], amount: Amount) -> bool:
        """Reserve a call out of leases, taking or topping them up when this process is
        busy on its budgets. False: reserve it exactly."""
        if not self.enabled:
            return False
        self._check_fork()
        now = time.monotonic()
        key = tuple(lines)
        with self._lock:
            if self._take(reservation_id, lines, amount, now):
                return True
            if not self._is_hot(key, now) or self._no_lease_until.get(key, 0.0) > now:
                return False
        with self._acquire_lock:
            with self._lock:
                if self._take(reservation_id, lines, amount, time.monotonic()):
                    return True
            if not self._top_up(lines, amount):
                with self._lock:
                    self._no_lease_until[key] = time.monotonic() + HOT_SECONDS
                return False
            with self._lock:
                return self._take(reservation_id, lines, amount, time.monotonic())

    def _is_hot(self, key: tuple[WindowKey, ...], now: float) -> bool:
        """Whether this process reserved `HOT_CALLS` calls on these budgets within
        `HOT_SECONDS`: only then is a lease worth its transactions. Under ``_lock``."""
        recent = self._heat.get(key)
        if recent is None:
            if len(self._heat) > 4096:
                self._heat = {k: v for k, v in self._heat.items() if now - v[-1] < HOT_SECONDS}
                self._no_lease_until = {k: v for k, v in self._no_lease_until.items() if v > now}
            recent = self._heat[key] = collections.deque(maxlen=HOT_CALLS)
        recent.append(now)
        return len(recent) == HOT_CALLS and now - recent[0] <= HOT_SECONDS

    def _take(
        self, reservation_id: str, lines: list[WindowKey], amount: Amount, now: float
    ) -> bool:
        """Hand a call its estimate out of the leases on its budgets, if each has room
        and time left. Under ``_lock``."""
        leases = []
        for line in lines:
            lease = self._leases.get(line)
            if (
                lease is None
                or lease.expires - now < self.store.lease_seconds / 2
                or not lease.fits(amount)
            ):
                return False
            leases.append(lease)
        for lease in leases:
            lease.held_usd += amount.usd
            lease.held_tokens += amount.tokens
            lease.used_at = now
        self._leased[reservation_id] = leases
        return True

    def _top_up(self, lines: list[WindowKey], amount: Amount) -> bool:
        """Lease a chunk on each of ``lines`` whose lease cannot cover the call, all in
        one transaction; False, with nothing leased, when one of them is near its limit.
        Under ``_acquire_lock``."""
        store = self.store
        stmts = store.statements
        wall = utcnow()
        until = wall + dt.timedelta(seconds=store.lease_seconds)
        with self._lock:
            # Each line to top up, with the lease already on it (None: a fresh one).
            work = [
                (line, None if lease is None else _Sync(lease, lease.snapshot(), NOTHING, False))
                for line in lines
                if (lease := self._leases.get(line)) is None or not lease.fits(amount)
            ]
        done: list[_Synced] = []
        grown: list[tuple[_Lease, Amount]] = []
        with store.engine.begin() as conn:
            store.ensure_windows(conn, lines)
            for line, sync in work:
                params = {"bid": line.budget_id, "ws": line.window_start}
                alive = False
                if sync is not None:
                    # Settle what the lease's calls spent first: the chunk is sized on
                    # the window as it stands.
                    alive = self._sync(conn, sync, until)
                    done.append(_Synced(sync, alive))
                chunk = _chunk(conn.execute(stmts.figures, params).one(), amount)
                if chunk is None or (
                    conn.execute(
                        stmts.reserve, {**params, "usd": chunk.usd, "tok": chunk.tokens}
                    ).rowcount
                    != 1
                ):
                    conn.rollback()
                    return False
                if alive and sync is not None:
                    lease, snap = sync.lease, sync.snap
                    conn.execute(
                        stmts.resize,
                        {
                            "rid": lease.id,
                            "size_usd": lease.size_usd - snap.covered_usd + chunk.usd,
                            "size_tok": lease.size_tokens - snap.covered_tokens + chunk.tokens,
                            "until": until,
                        },
                    )
                    grown.append((lease, chunk))
                else:
                    fresh = _Lease(line=line, id=new_id())
                    lease_lines = [[line.budget_id, line.window_start.isoformat()]]
                    store.insert_reservation(conn, fresh.id, chunk, lease_lines, wall, until)
                    grown.append((fresh, chunk))
        store.windows_committed(lines)
        self._grown(done, grown)
        return True

    def _grown(self, done: list[_Synced], grown: list[tuple[_Lease, Amount]]) -> None:
        """Bring the leases in line with a committed top-up, and start the flusher."""
        now = time.monotonic()
        expires = now + self.store.lease_seconds
        with self._lock:
            for sync, alive in done:
                sync.lease.applied(sync.snap, NOTHING, alive=alive, expires=expires)
                if not alive:  # reclaimed by another process: a fresh lease replaces it
                    sync.lease.drop()
                    self._retire(sync.lease)
            for lease, chunk in grown:
                lease.size_usd += chunk.usd
                lease.size_tokens += chunk.tokens
                lease.expires = expires
                lease.used_at = now
                self._leases[lease.line] = lease
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_loop, name="tokenledger-budget-leases", daemon=True
                )
                self._flusher.start()

    def _retire(self, lease: _Lease) -> None:
        """No call takes from ``lease`` any more (given back, or reclaimed by another
        process); what its calls in flight spend is still flushed. Under ``_lock``."""
        if self._leases.get(lease.line) is lease:
            del self._leases[lease.line]
        busy = lease.is_held() or lease.has_pending()
        if busy and lease not in self._draining:
            self._draining.append(lease)
        elif not busy and lease in self._draining:
            self._draining.remove(lease)

    # -- settling ----------------------------------------------------------------------
    def settle(self, reservation_id: str, reserved: Amount, spent: Amount) -> bool:
        """Settle a call reserved out of leases, in memory (the flusher moves its spend
        into the database). False: the call was reserved exactly."""
        if not self._leased:
            return False
        with self._lock:
            leases = self._leased.pop(reservation_id, None)
            if leases is None:
                return False
            now = time.monotonic()
            covered_usd = min(spent.usd, reserved.usd)
            covered_tokens = min(spent.tokens, reserved.tokens)
            over = max(spent.usd - reserved.usd, Decimal(0))
            for lease in leases:
                lease.held_usd -= reserved.usd
                lease.held_tokens -= reserved.tokens
                lease.covered_usd += covered_usd
                lease.covered_tokens += covered_tokens
                lease.spent_usd += spent.usd
                lease.spent_tokens += spent.tokens
                lease.overshoot_usd += over
                lease.used_at = now
        return True

    # -- flushing and giving back ------------------------------------------------------
    def _sync(self, conn: sa.Connection, sync: _Sync, until: dt.datetime) -> bool:
        """In ``conn``'s transaction: move the spend the lease's calls settled (``snap``)
        from reserved to spent, give back ``give`` of its headroom (all of it, and its
        row, with ``release``) and renew it. False: another process had reclaimed it,
        so nothing is reserved for it any more and only the spend is added."""
        stmts = self.store.statements
        lease, snap, give, release = sync
        alive = False
        if not lease.gone:
            if release:
                alive = conn.execute(stmts.delete, {"rid": lease.id}).rowcount == 1
            else:
                params = {
                    "rid": lease.id,
                    "size_usd": lease.size_usd - snap.covered_usd - give.usd,
                    "size_tok": lease.size_tokens - snap.covered_tokens - give.tokens,
                    "until": until,
                }
                alive = conn.execute(stmts.resize, params).rowcount == 1
        if alive or snap.spent_usd or snap.spent_tokens or snap.overshoot_usd:
            covered = Amount(snap.covered_usd + give.usd, snap.covered_tokens + give.tokens)
            spent = Amount(snap.spent_usd, snap.spent_tokens)
            conn.execute(
                stmts.move,
                stmts.move_args(
                    lease.line, covered if alive else NOTHING, spent, snap.overshoot_usd
                ),
            )
        return alive

    def _flush_loop(self) -> None:
        stop = self._stop
        while not stop.wait(LEASE_FLUSH_SECONDS):
            try:
                self.flush(release_idle=True)
            except Exception as exc:
                # The leases stay; their spend is flushed on a later round, and they stop
                # handing out headroom well before their lease could run out.
                logger.warning(
                    "tokenledger could not flush budget leases (%s); retrying",
                    exc.__class__.__name__,
                )

    def flush(self, *, release_idle: bool = False, release_all: bool = False) -> None:
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
                    held = lease.is_held()
                    live = self._leases.get(lease.line) is lease
                    idle = release_all or (
                        release_idle and now - lease.used_at > LEASE_IDLE_SECONDS
                    )
                    release = not lease.gone and not held and (idle or not live)
                    give_back = not lease.gone and held and live and idle
                    renew = not lease.gone and lease.expires - now < self.store.lease_seconds * 0.75
                    if release or give_back:
                        self._retire(lease)  # no call takes from it from now on
                        work.append(_Sync(lease, lease.snapshot(), lease.free, release))
                    elif renew or lease.has_pending():
                        work.append(_Sync(lease, lease.snapshot(), NOTHING, release=False))
                    elif not live:
                        self._retire(lease)  # reclaimed, and nothing left to flush
            if not work:
                return
            try:
                results = self._commit(work)
            except Exception:
                with self._lock:
                    for sync in work:
                        lease = sync.lease
                        if (sync.release or any(sync.give)) and lease.line not in self._leases:
                            # Nothing was given back: the lease still holds its headroom.
                            self._leases[lease.line] = lease
                            if lease in self._draining:
                                self._draining.remove(lease)
                raise
            self._applied(results)

    def give_back_free(self, lines: Iterable[WindowKey]) -> bool:
        """Give back the unused headroom of this process's leases on ``lines``: a call
        must not be refused for headroom its own process sits on."""
        wanted = sorted(lines)
        if not self._leases or not any(line in self._leases for line in wanted):
            return False
        with self._acquire_lock:
            with self._lock:
                work = []
                for line in wanted:
                    lease = self._leases.get(line)
                    if lease is None:
                        continue
                    held = lease.is_held()
                    give = lease.free
                    self._retire(lease)
                    work.append(_Sync(lease, lease.snapshot(), give, not held))
            if not work:
                return False
            self._applied(self._commit(work))
        return True

    def _commit(self, work: list[_Sync]) -> list[_Synced]:
        """Sync each lease of ``work`` in one transaction, in window order (so two
        processes lock windows in the same order); each with whether it was alive."""
        until = utcnow() + dt.timedelta(seconds=self.store.lease_seconds)
        with self.store.engine.begin() as conn:
            return [
                _Synced(sync, self._sync(conn, sync, until))
                for sync in sorted(work, key=lambda sync: sync.lease.line)
            ]

    def _applied(self, results: list[_Synced]) -> None:
        """Bring the leases' figures in line with a committed flush or give-back."""
        expires = time.monotonic() + self.store.lease_seconds
        with self._lock:
            for (lease, snap, give, release), alive in results:
                lease.applied(snap, give, alive=alive, expires=expires)
                if release or not alive:
                    lease.drop()
                if lease.gone or self._leases.get(lease.line) is not lease:
                    self._retire(lease)

    def close(self) -> None:
        """Stop leasing, stop the flusher and give back every lease."""
        self.enabled = False
        self._stop.set()
        flusher = self._flusher
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join(timeout=5)
        try:
            self.flush(release_all=True)
        except Exception:
            logger.exception(
                "tokenledger could not give back its budget leases; they expire and are "
                "reclaimed after %s s",
                self.store.lease_seconds,
            )
