"""One budget shared by many processes and threads: never passed, and never leaked.

Worker processes are started with ``spawn`` (a fresh interpreter each, as separate
hosts would be), make their own `Ledger` on the test's database, and make real
``litellm.completion(..., mock_response=...)`` calls. Every call sets ``max_tokens`` and
uses exactly what it reserves (``PROMPT_TOKENS`` in, ``MAX_TOKENS`` out), so a budget
that let one call too many through would show as spent > limit.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import litellm
import pytest
import sqlalchemy as sa
from budget_calls import CALLBACK_LISTS, kill_once_holding
from helpers import calls_of, rows
from litellm.integrations.custom_logger import CustomLogger

from tokenledger import BudgetExceeded, Ledger
from tokenledger.records import utcnow
from tokenledger.testing import mock_response

pytestmark = pytest.mark.slow  # multi-process budget tests

PROCESSES = 8
THREADS = 4
CALLS_PER_THREAD = 8
MESSAGES = [{"role": "user", "content": "Summarise the ticket in one line."}]
PROMPT_TOKENS = 16  # litellm.token_counter(model="gpt-4o-mini", messages=MESSAGES)
MAX_TOKENS = 100
CALL = Decimal("0.0000624")  # 16 x $0.15/M + 100 x $0.60/M, reserved and spent alike
FITS = 80  # calls the shared budget has room for
LIMIT = CALL * FITS + CALL / 2  # not a whole number of calls: the last half never fits
TENANT = "acme"


class SentRequests(CustomLogger):
    """Counts the requests litellm actually starts, in this process."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.count = 0

    def log_pre_api_call(self, model: Any, messages: Any, kwargs: Any) -> None:
        with self.lock:
            self.count += 1


def call_worker(db_url: str, start: Any) -> dict[str, int]:
    """One worker process's share: THREADS threads, each making CALLS_PER_THREAD calls,
    each call in its own run tagged with the budget's tenant, on its own `Ledger`."""
    import litellm.utils

    ledger = Ledger(db_url)
    # litellm copies `litellm.callbacks` into its other callback lists: put them all back
    # afterwards, for this process's next run.
    saved = {name: list(getattr(litellm, name)) for name in CALLBACK_LISTS}
    saved_setup = list(litellm.utils.callback_list)
    sent = SentRequests()
    litellm.callbacks.append(sent)
    counts = {"attempted": 0, "accepted": 0, "refused": 0}
    lock = threading.Lock()
    ready = threading.Barrier(THREADS)

    def thread(index: int) -> None:
        ready.wait()
        for call in range(CALLS_PER_THREAD):
            with lock:
                counts["attempted"] += 1
            try:
                with ledger.run("worker", tags={"tenant": TENANT, "thread": f"{index}.{call}"}):
                    litellm.completion(
                        model="gpt-4o-mini",
                        messages=MESSAGES,
                        max_tokens=MAX_TOKENS,
                        mock_response=mock_response(
                            prompt_tokens=PROMPT_TOKENS, completion_tokens=MAX_TOKENS
                        ),
                    )
            except BudgetExceeded:
                outcome = "refused"
            else:
                outcome = "accepted"
            with lock:
                counts[outcome] += 1

    try:
        start.wait(timeout=120)  # every process is ready: start together, for contention
        threads = [threading.Thread(target=thread, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        ledger.close()  # flushes every row
        for name, callbacks in saved.items():
            getattr(litellm, name)[:] = callbacks
        litellm.utils.callback_list = saved_setup
    return {**counts, "sent": sent.count, "pid": os.getpid()}


def serve(tasks: Any, results: Any, start: Any) -> None:
    """A worker process: runs `call_worker` for each database URL it is sent."""
    while (db_url := tasks.get()) is not None:
        try:
            results.put(call_worker(db_url, start))
        except BaseException:
            start.abort()  # do not leave the other workers waiting
            results.put({"error": traceback.format_exc()})


class Workers:
    """PROCESSES spawned worker processes, started once for this module's tests.

    Importing litellm takes seconds of CPU in each new interpreter; the SQLite and the
    PostgreSQL run share the processes, and each run still makes a new `Ledger` in each.
    Every process gets exactly one share of a run, so all PROCESSES take part in it.
    """

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.results = context.Queue()
        self.start = context.Barrier(PROCESSES)
        self.tasks = [context.Queue() for _ in range(PROCESSES)]
        self.processes = [
            context.Process(target=serve, args=(tasks, self.results, self.start), daemon=True)
            for tasks in self.tasks
        ]
        for process in self.processes:
            process.start()

    def run(self, db_url: str) -> list[dict[str, Any]]:
        self.start.reset()
        for tasks in self.tasks:
            tasks.put(db_url)
        reports = [self.results.get(timeout=240) for _ in self.processes]
        errors = [r["error"] for r in reports if "error" in r]
        assert not errors, errors[0]
        return reports

    def close(self) -> None:
        # Idle, holding nothing: no need to wait for litellm's exit handlers.
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.join(timeout=30)


@pytest.fixture(scope="module")
def workers() -> Iterator[Workers]:
    pool = Workers()
    try:
        yield pool
    finally:
        pool.close()


def test_the_shared_budget_is_correct_under_eight_processes_of_four_threads(
    db_url: str, workers: Workers
) -> None:
    with Ledger(db_url) as ledger:
        ledger.set_budget(f"tenant:{TENANT}", usd=LIMIT, per="day")
    attempts = PROCESSES * THREADS * CALLS_PER_THREAD
    assert attempts * CALL >= 3 * LIMIT  # demand is at least three times the budget

    reports = workers.run(db_url)
    assert PROCESSES == len({r["pid"] for r in reports})

    attempted = sum(r["attempted"] for r in reports)
    accepted = sum(r["accepted"] for r in reports)
    refused = sum(r["refused"] for r in reports)
    sent = sum(r["sent"] for r in reports)
    assert attempts == attempted == accepted + refused
    assert accepted == sent  # every refused call sent no request
    assert all(r["accepted"] + r["refused"] == r["attempted"] for r in reports)

    with Ledger(db_url) as reader:
        (status,) = reader.budgets()
        calls = calls_of(reader)
        runs = rows(reader, "runs")
    recorded = sum((c["cost_usd"] for c in calls), Decimal(0))
    assert status.spent_usd <= LIMIT
    assert recorded == status.spent_usd
    assert (Decimal(0), 0) == (status.reserved_usd, status.reserved_tokens)
    assert Decimal(0) == status.overshoot_usd
    # Every call costs exactly what it reserved, so the budget fills to the last whole call.
    assert (FITS, FITS * CALL) == (accepted, status.spent_usd)
    assert accepted == len(calls) == sum(1 for r in runs if r["status"] == "ok")
    assert refused == sum(1 for r in runs if r["status"] == "budget_exceeded")


# -- a worker killed while holding a reservation -------------------------------------------

LEASE_SECONDS = 3
BIG_MAX_TOKENS = 1000
BIG_CALL = Decimal("0.0006024")  # 16 x $0.15/M + 1000 x $0.60/M


class HangBeforeTheRequest(CustomLogger):
    """In the doomed worker: tell the test the reservation is held, then never return."""

    def __init__(self, holding: Any) -> None:
        super().__init__()
        self.holding = holding
        self.calls = 0

    def log_pre_api_call(self, model: Any, messages: Any, kwargs: Any) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call goes through; the second hangs
            self.holding.set()
            time.sleep(3600)


def doomed_worker(db_url: str, holding: Any) -> None:
    ledger = Ledger(db_url, budget_lease_seconds=LEASE_SECONDS)
    litellm.callbacks.append(HangBeforeTheRequest(holding))
    with ledger.run("doomed", tags={"tenant": TENANT}):
        litellm.completion(
            model="gpt-4o-mini",
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,
            mock_response=mock_response(prompt_tokens=PROMPT_TOKENS, completion_tokens=MAX_TOKENS),
        )
        ledger.flush()  # the first call's row is in the ledger before the crash
        litellm.completion(  # reserves BIG_CALL, then hangs in log_pre_api_call
            model="gpt-4o-mini",
            messages=MESSAGES,
            max_tokens=BIG_MAX_TOKENS,
            mock_response="never sent",
        )


def big_call(ledger: Ledger) -> None:
    with ledger.run("survivor", tags={"tenant": TENANT}):
        litellm.completion(
            model="gpt-4o-mini",
            messages=MESSAGES,
            max_tokens=BIG_MAX_TOKENS,
            mock_response=mock_response(
                prompt_tokens=PROMPT_TOKENS, completion_tokens=BIG_MAX_TOKENS
            ),
        )


def test_a_reservation_of_a_killed_worker_blocks_the_budget_until_its_lease_ends(
    db_url: str,
) -> None:
    # Room for the first call and one big call, not two big calls.
    limit = CALL + BIG_CALL + BIG_CALL / 2
    ledger = Ledger(db_url, budget_lease_seconds=LEASE_SECONDS)
    try:
        ledger.set_budget(f"tenant:{TENANT}", usd=limit, per="day")
        # SIGKILL: no exit handler, no settle, no release
        assert -signal.SIGKILL == kill_once_holding(doomed_worker, db_url, "reserved")

        (held,) = ledger.budgets()
        assert (CALL, BIG_CALL) == (held.spent_usd, held.reserved_usd)
        (lease,) = rows(ledger, "reservations")
        expires_at = lease["expires_at"]
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=dt.timezone.utc)

        # Until the lease ends, the dead worker's reservation holds the headroom.
        with pytest.raises(BudgetExceeded, match=r"reserved \$0\.000602"):
            big_call(ledger)
        assert utcnow() < expires_at  # refused while the lease was live, not for another reason

        while utcnow() <= expires_at:
            time.sleep(0.05)
        big_call(ledger)  # reclaims the expired reservation, then fits

        (after,) = ledger.budgets()
        assert (CALL + BIG_CALL, Decimal(0), 0) == (
            after.spent_usd,
            after.reserved_usd,
            after.reserved_tokens,
        )
        ledger.flush()
        calls = calls_of(ledger)
        assert [CALL, BIG_CALL] == sorted(c["cost_usd"] for c in calls)  # nothing lost
        assert after.spent_usd == sum(c["cost_usd"] for c in calls)
        assert [] == rows(ledger, "reservations")
    finally:
        ledger.close()


def test_reclaiming_leaves_live_reservations_alone(db_url: str) -> None:
    """Only expired leases are reclaimed: a slow call in a live process keeps its hold."""
    with Ledger(db_url, budget_lease_seconds=60) as ledger:
        ledger.set_budget("global", usd="1", per="day")
        with ledger.run("slow"):
            stream = litellm.completion(
                model="gpt-4o-mini",
                messages=MESSAGES,
                max_tokens=MAX_TOKENS,
                stream=True,
                mock_response="a slow stream",
            )
            assert 0 == ledger._budgets.store.reclaim_expired()
            (held,) = ledger.budgets()
            for _chunk in stream:
                pass
        (settled,) = ledger.budgets()
        with ledger.engine.connect() as connection:
            left = connection.execute(sa.text("SELECT COUNT(*) FROM reservations")).scalar()
    assert (CALL, Decimal(0), 0) == (held.reserved_usd, settled.reserved_usd, left)
