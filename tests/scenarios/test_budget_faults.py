"""Budgets when the database misbehaves or the usage lies: bounded waits, and no free
spending.

The faults are real: another connection holding SQLite's exclusive lock (as a second
process doing a long write would), and responses whose usage a broken provider could
send. Each test names the bound it checks; before these guarantees, a locked ledger held
every call for SQLite's 30 s busy timeout, budgets or not, and a call with unreadable
usage was settled at $0.
"""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from faults import PgProxy, pg_proxy

from tokenledger import BudgetExceeded, Ledger, LedgerError

__all__ = ["pg_proxy"]  # a fixture, imported to be used

MESSAGES = [{"role": "user", "content": "2+2?"}]


def _response_with_usage(**bad: object) -> Any:
    from litellm import ModelResponse, Usage

    usage = Usage(prompt_tokens=10, completion_tokens=3, total_tokens=13)
    for name, value in bad.items():
        object.__setattr__(usage, name, value)  # set after validation, as a proxy could
    response = ModelResponse(
        model="gpt-4o-mini",
        choices=[
            {"message": {"role": "assistant", "content": "4"}, "finish_reason": "stop", "index": 0}
        ],
    )
    response.usage = usage
    return response


@pytest.fixture
def sqlite_ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", budget_timeout=0.5) as ledger:
        yield ledger


@pytest.fixture
def locked(sqlite_ledger: Ledger) -> Iterator[sqlite3.Connection]:
    """Another connection holds the ledger file's exclusive lock until the test ends."""
    assert sqlite_ledger.path is not None
    other = sqlite3.connect(sqlite_ledger.path, timeout=0, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    yield other
    other.execute("ROLLBACK")
    other.close()


def _timed_call(**kwargs: Any) -> float:
    import litellm

    started = time.monotonic()
    litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="4", **kwargs)
    return time.monotonic() - started


def test_a_locked_ledger_never_holds_a_call_that_no_budget_applies_to(
    sqlite_ledger: Ledger,
) -> None:
    """Before: every call waited for SQLite's 30 s busy timeout. The bound checked here,
    2 s for a mocked call, is far below that and far above a loaded machine's noise."""
    with sqlite_ledger.run("warm-up"):
        _timed_call()  # litellm builds its response models on the first call
    # The worst case: the cached list of budgets is stale at every call.
    sqlite_ledger.recorder.budgets.store.cache_ttl = 0.0
    assert sqlite_ledger.path is not None
    other = sqlite3.connect(sqlite_ledger.path, timeout=0, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with sqlite_ledger.run("agent"):
            slowest = max(_timed_call() for _ in range(20))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert slowest < 2.0, f"a call waited {slowest:.2f} s on a locked ledger with no budget"


def test_a_locked_ledger_refuses_a_budgeted_call_within_the_timeout(
    sqlite_ledger: Ledger, locked: sqlite3.Connection
) -> None:
    locked.execute("ROLLBACK")
    sqlite_ledger.set_budget("global", usd="5.00")
    locked.execute("BEGIN EXCLUSIVE")
    started = time.monotonic()
    with pytest.raises(LedgerError, match=r"budgets fail closed"), sqlite_ledger.run("agent"):
        _timed_call(max_tokens=50)
    waited = time.monotonic() - started
    assert waited < 0.5 + 1.0, f"the refusal took {waited:.2f} s (budget_timeout is 0.5 s)"


def test_a_locked_ledger_lets_a_budgeted_call_through_within_the_timeout_when_failing_open(
    tmp_path: Path,
) -> None:
    with Ledger(
        f"sqlite:///{tmp_path / 'ledger.db'}", budget_timeout=0.5, budget_failure_policy="fail_open"
    ) as ledger:
        ledger.set_budget("global", usd="5.00")
        assert ledger.path is not None
        other = sqlite3.connect(ledger.path, timeout=0, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            with ledger.run("agent"):
                waited = _timed_call(max_tokens=50)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert waited < 0.5 + 1.0
        assert 1 == ledger.recorder.budgets.unreserved_calls


@pytest.mark.parametrize(
    "bad",
    [{"prompt_tokens": -5}, {"prompt_tokens": math.nan}, {"prompt_tokens": 10**15}, {}],
    ids=["negative", "nan", "absurd", "none"],
)
def test_a_call_whose_usage_cannot_be_read_is_charged_its_estimate_not_zero(
    db_url: str, bad: dict[str, object]
) -> None:
    """With max_tokens=100 a gpt-4o-mini call is reserved at a known estimate; a budget
    of 16 such estimates must stop the 17th call however the usage comes back."""
    import litellm

    from tokenledger._budget_scope import estimate_call

    with Ledger(db_url) as ledger:
        each = estimate_call(
            ledger.prices,
            _probe_call(),
            {"messages": MESSAGES, "max_tokens": 100},
            "gpt-4o-mini",
            default_max_output_tokens=4096,
        ).usd
        assert each is not None
        assert each > 0
        ledger.set_budget("global", usd=str(each * 16 + each / 2))
        accepted = 0
        with pytest.raises(BudgetExceeded), ledger.run("loop"):
            for _ in range(100):
                response = _response_with_usage(**bad) if bad else _response_without_usage()
                litellm.completion(
                    model="gpt-4o-mini", messages=MESSAGES, mock_response=response, max_tokens=100
                )
                accepted += 1
        assert 16 == accepted
        [status] = ledger.budgets()
        assert status.spent_usd == each * 16


def _probe_call() -> Any:
    from tokenledger.records import new_call

    return new_call(None, operation="chat", model="gpt-4o-mini", max_tokens=100)


def _response_without_usage() -> Any:
    response = _response_with_usage()
    object.__setattr__(response, "usage", None)
    return response


def test_spent_stays_exact_for_calls_whose_usage_is_read(db_url: str) -> None:
    import litellm

    with Ledger(db_url) as ledger:
        ledger.set_budget("global", usd="5.00")
        with ledger.run("loop"):
            for _ in range(3):
                litellm.completion(
                    model="gpt-4o-mini", messages=MESSAGES, mock_response="4", max_tokens=100
                )
        [status] = ledger.budgets()
        assert Decimal(0) < status.spent_usd < Decimal("0.001")
        assert 0 == status.reserved_usd


# -- PostgreSQL behind a proxy that stalls, refuses or resets -------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["stall", "refuse", "reset"])
def test_a_budgeted_call_on_a_failing_postgresql_is_refused_within_the_timeout(
    postgres_url: str, pg_proxy: PgProxy, fault: str
) -> None:
    """A hung server (accepts, never answers) is handled exactly like a refused or
    reset one: the budgeted call is refused (fail closed) within budget_timeout."""
    url = pg_proxy.url(postgres_url)
    with Ledger(url, budget_timeout=1.0) as ledger:
        ledger.set_budget("global", usd="5.00")
        with ledger.run("warm-up"):
            _timed_call(max_tokens=50)
        getattr(pg_proxy, fault)()
        try:
            started = time.monotonic()
            with pytest.raises(LedgerError, match="budgets fail closed"), ledger.run("agent"):
                _timed_call(max_tokens=50)
            waited = time.monotonic() - started
        finally:
            pg_proxy.pass_through()
    assert waited < 1.0 + 1.5, f"the refusal took {waited:.2f} s (budget_timeout is 1 s)"


@pytest.mark.slow
def test_a_call_no_budget_applies_to_never_waits_on_a_stalled_postgresql(
    postgres_url: str, pg_proxy: PgProxy
) -> None:
    url = pg_proxy.url(postgres_url)
    with Ledger(url) as ledger:
        with ledger.run("warm-up"):
            _timed_call()
        ledger.recorder.budgets.store.cache_ttl = 0.0  # stale at every call: the worst case
        pg_proxy.stall()
        try:
            with ledger.run("agent"):
                slowest = max(_timed_call() for _ in range(20))
        finally:
            pg_proxy.pass_through()
    assert slowest < 2.0, f"a call waited {slowest:.2f} s on a stalled server with no budget"


@pytest.mark.slow
def test_a_ledger_starts_within_its_startup_timeout_on_a_stalled_postgresql(
    postgres_url: str, pg_proxy: PgProxy, tmp_path: Path
) -> None:
    url = pg_proxy.url(postgres_url)
    pg_proxy.stall()
    started = time.monotonic()
    ledger = Ledger(url, startup_timeout=1.0, spool_dir=tmp_path / "spool")
    try:
        took = time.monotonic() - started
        assert ledger.connected is False
        assert took < 1.0 + 1.5
        pg_proxy.pass_through()
        deadline = time.monotonic() + 30
        while not ledger.connected and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ledger.connected  # the background check found the server once it answered
    finally:
        pg_proxy.pass_through()
        ledger.close(timeout=5)


@pytest.mark.slow
def test_a_program_exits_promptly_while_its_budget_io_hangs(
    postgres_url: str, pg_proxy: PgProxy
) -> None:
    """A worker thread stuck on a stalled server must not keep the program from ending
    (a thread pool joins its threads at exit; ours are daemon threads)."""
    url = pg_proxy.url(postgres_url)
    with Ledger(url) as ledger:
        ledger.set_budget("global", usd="5.00")
    code = (
        "import litellm, tokenledger as tl\n"
        f"ledger = tl.Ledger({url!r}, budget_timeout=0.5, flush_interval=0.2)\n"
        "with ledger.run('warm-up'):\n"
        "    litellm.completion(model='gpt-4o-mini', messages=[{'role': 'user', 'content': "
        "'x'}], mock_response='y', max_tokens=5)\n"
        "print('ready', flush=True)\n"
        "input()\n"
        "try:\n"
        "    with ledger.run('agent'):\n"
        "        litellm.completion(model='gpt-4o-mini', messages=[{'role': 'user', "
        "'content': 'x'}], mock_response='y', max_tokens=5)\n"
        "except tl.LedgerError:\n"
        "    print('refused', flush=True)\n"
    )
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None
        assert child.stdin is not None
        assert "ready" == child.stdout.readline().strip()
        pg_proxy.stall()
        child.stdin.write("\n")
        child.stdin.flush()
        assert "refused" == child.stdout.readline().strip()
        # Its exit waits for the writer's close (bounded) but never for the stuck worker.
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
        pg_proxy.pass_through()
    assert 0 == child.returncode


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
def test_until_its_budgets_are_read_every_call_follows_the_failure_policy(
    tmp_path: Path, policy: str
) -> None:
    """A ledger started while its PostgreSQL is unreachable cannot know which budgets
    exist: each call is treated as budgeted, without waiting on the database again."""
    with Ledger(
        "postgresql+psycopg://postgres@127.0.0.1:1/test",
        startup_timeout=1.0,
        budget_failure_policy=policy,
        spool_dir=tmp_path / "spool",
    ) as ledger:
        assert ledger.connected is False
        for attempt in range(3):
            started = time.monotonic()
            if policy == "fail_closed":
                with pytest.raises(LedgerError, match="fail closed"), ledger.run("agent"):
                    _timed_call()
            else:
                with ledger.run("agent"):
                    _timed_call()
            if attempt:  # the first also pays litellm's first-call set-up
                assert time.monotonic() - started < 1.0
        if policy == "fail_open":
            assert 3 == ledger.recorder.budgets.unreserved_calls
