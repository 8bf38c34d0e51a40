"""Leased headroom: a busy process reserves a chunk of a budget's headroom ahead of its
calls, settles them in memory, and gives the rest back (`tokenledger._leases`).

The store is driven directly (`BudgetStore.reserve` and ``settle``, as the enforcer
calls them), on SQLite and PostgreSQL; two tests kill a leasing process (``spawn``) to
show its lease is reclaimed once it expires.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from budget_calls import kill_once_holding
from helpers import rows

from tokenledger import Ledger
from tokenledger._budget_scope import Amount
from tokenledger._leases import LEASE_CALLS, LEASE_MIN_CALLS, LEASE_SHARE, _chunk
from tokenledger._reservations import BudgetWindow
from tokenledger.records import utcnow

LEASE_SECONDS = 3
TENANT = "acme"

ESTIMATE = Decimal("0.001")  # each call reserves this and spends it all
ESTIMATE_TOKENS = 100


def tenant_line(ledger: Ledger, scope: str) -> BudgetWindow:
    """The budget ``scope`` and the start of its current day, as `BudgetStore.reserve`
    takes them."""
    from tokenledger.budgets import window_bounds

    definition = next(d for d in ledger._budgets.store.definitions(fresh=True) if d.scope == scope)
    return definition, window_bounds("day", utcnow())[0]


def reserve_and_settle(store: Any, line: BudgetWindow) -> bool:
    """One call through the store: True if it was reserved (and then settled in full)."""
    from tokenledger.records import new_id

    reservation_id = new_id()
    if store.reserve(reservation_id, [line], [], ESTIMATE, ESTIMATE_TOKENS) is not None:
        return False
    lines = [(line[0].id, line[1])]
    store.settle(reservation_id, lines, ESTIMATE, ESTIMATE_TOKENS, ESTIMATE, ESTIMATE_TOKENS)
    return True


def test_a_busy_process_reserves_out_of_a_leased_chunk_and_gives_it_back(db_url: str) -> None:
    with Ledger(db_url, capture=False) as ledger:
        ledger.set_budget("tenant:busy", usd="1000", per="day")
        line = tenant_line(ledger, "tenant:busy")
        store = ledger._budgets.store
        for _ in range(100):
            assert reserve_and_settle(store, line)
        (status,) = ledger.budgets()  # the spend is flushed before the figures are read
        (lease,) = rows(ledger, "reservations")  # one row holds the chunk, not 100
        assert (ESTIMATE * 100, 100 * ESTIMATE_TOKENS) == (status.spent_usd, status.spent_tokens)
        # What is reserved is exactly what the lease's row holds, and gives no call
        # more room than it asked for beyond LEASE_CALLS calls.
        assert lease["amount_usd"] <= 256 * ESTIMATE
        assert (status.reserved_usd, status.reserved_tokens) == (
            lease["amount_usd"],
            lease["tokens"],
        )
    with Ledger(db_url, capture=False) as reader:
        (closed,) = reader.budgets()
        assert [] == rows(reader, "reservations")
    assert (ESTIMATE * 100, Decimal(0), 0) == (
        closed.spent_usd,
        closed.reserved_usd,
        closed.reserved_tokens,
    )


def test_near_its_limit_a_budget_is_reserved_call_by_call(db_url: str) -> None:
    """A budget with room for 100 calls: 1/32 of it is under 8 calls, so no lease."""
    from tokenledger.records import new_id

    with Ledger(db_url, capture=False) as ledger:
        ledger.set_budget("tenant:tight", usd=ESTIMATE * 100, per="day")
        line = tenant_line(ledger, "tenant:tight")
        store = ledger._budgets.store
        for _ in range(20):
            assert reserve_and_settle(store, line)
        for _ in range(10):  # in flight
            assert store.reserve(new_id(), [line], [], ESTIMATE, ESTIMATE_TOKENS) is None
        (status,) = ledger.budgets()
        held = rows(ledger, "reservations")
    assert (ESTIMATE * 20, ESTIMATE * 10) == (status.spent_usd, status.reserved_usd)
    assert [ESTIMATE] * 10 == [r["amount_usd"] for r in held]


@pytest.mark.slow
def test_threads_of_two_leasing_processes_fill_a_budget_and_never_pass_it(db_url: str) -> None:
    """Two stores (as two processes would have) of eight threads each run a budget of
    400.5 calls dry: exactly 400 calls get through, and nothing stays reserved."""
    limit = ESTIMATE * 400 + ESTIMATE / 2
    with Ledger(db_url, capture=False) as ledger:
        ledger.set_budget("tenant:race", usd=limit, per="day")
        line = tenant_line(ledger, "tenant:race")
    ledgers = [Ledger(db_url, capture=False) for _ in range(2)]
    accepted = [0] * 16
    go = threading.Barrier(16)

    def worker(index: int) -> None:
        store = ledgers[index % 2]._budgets.store
        go.wait()
        refusals = 0
        while refusals < 20:  # a refusal may be for headroom another call still holds
            if reserve_and_settle(store, line):
                accepted[index] += 1
                refusals = 0
            else:
                refusals += 1
                time.sleep(0.01)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for each in ledgers:
            each.close()
    with Ledger(db_url, capture=False) as reader:
        (status,) = reader.budgets()
        assert [] == rows(reader, "reservations")
    assert (400, ESTIMATE * 400, Decimal(0)) == (
        sum(accepted),
        status.spent_usd,
        status.reserved_usd,
    )


def lease_holder(db_url: str, holding: Any) -> None:
    """Takes a lease, flushes its calls' spend, then hangs holding it until killed."""
    ledger = Ledger(db_url, capture=False, budget_lease_seconds=LEASE_SECONDS)
    line = tenant_line(ledger, f"tenant:{TENANT}")
    store = ledger._budgets.store
    for _ in range(20):
        reserve_and_settle(store, line)
    store.flush_leases()
    holding.set()
    time.sleep(3600)


@pytest.mark.slow
def test_the_lease_of_a_killed_process_is_reclaimed_once_it_expires(db_url: str) -> None:
    with Ledger(db_url, capture=False, budget_lease_seconds=LEASE_SECONDS) as ledger:
        ledger.set_budget(f"tenant:{TENANT}", usd="1000", per="day")
        # SIGKILL: the lease is neither flushed nor given back
        kill_once_holding(lease_holder, db_url, "leased")
        (held,) = ledger.budgets()
        (lease,) = rows(ledger, "reservations")
        assert (ESTIMATE * 20, lease["amount_usd"]) == (held.spent_usd, held.reserved_usd)
        assert Decimal(0) < held.reserved_usd
        expires_at = lease["expires_at"]
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=dt.timezone.utc)
        while utcnow() <= expires_at:
            time.sleep(0.05)
        (after,) = ledger.budgets()  # reclaims expired leases first
        assert (ESTIMATE * 20, Decimal(0), 0) == (
            after.spent_usd,
            after.reserved_usd,
            after.reserved_tokens,
        )
        assert [] == rows(ledger, "reservations")


# -- the size of a chunk (pure: no database) -----------------------------------------------


def window_row(limit_usd: str | None, spent: str, limit_tokens: int | None = None) -> Any:
    """A ``budget_windows`` row joined to its budget's limits, as a top-up reads it."""
    return SimpleNamespace(
        limit_usd=None if limit_usd is None else Decimal(limit_usd),
        spent_usd=Decimal(spent),
        reserved_usd=Decimal(0),
        limit_tokens=limit_tokens,
        spent_tokens=0,
        reserved_tokens=0,
    )


def test_a_chunk_is_lease_calls_worth_when_the_budget_has_plenty_left() -> None:
    assert (ESTIMATE * LEASE_CALLS, ESTIMATE_TOKENS * LEASE_CALLS) == _chunk(
        window_row("1000", "0"), Amount(ESTIMATE, ESTIMATE_TOKENS)
    )


def test_a_chunk_is_at_most_a_share_of_the_headroom_left() -> None:
    # $3.20 left: 1/32 of it is $0.10, 100 calls' worth (fewer than 256, more than 8)
    chunk = _chunk(window_row("4", "0.8"), Amount(ESTIMATE, ESTIMATE_TOKENS))
    assert chunk is not None
    assert Decimal("3.2") / LEASE_SHARE == chunk.usd


def test_no_chunk_is_leased_near_a_limit_in_usd_or_in_tokens() -> None:
    # 1/32 of $0.2 is under LEASE_MIN_CALLS calls of $0.001
    assert ESTIMATE * LEASE_MIN_CALLS > Decimal("0.2") / LEASE_SHARE
    assert _chunk(window_row("0.2", "0"), Amount(ESTIMATE, ESTIMATE_TOKENS)) is None
    tokens_left = ESTIMATE_TOKENS * LEASE_MIN_CALLS * LEASE_SHARE - 1
    assert _chunk(window_row(None, "0", tokens_left), Amount(ESTIMATE, ESTIMATE_TOKENS)) is None
