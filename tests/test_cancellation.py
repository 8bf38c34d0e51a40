"""An async call cancelled while its reservation is being taken gives the reservation back.

The reservation runs in a worker thread (the event loop is never blocked), so a caller
that times out meanwhile leaves the thread to finish it. Nothing is sent after that, so
whatever the thread reserved must be released — on the shared budget (else it waits for
its lease) and on the run's own budget (else the run's later calls are refused).
"""

from __future__ import annotations

import asyncio
import threading
import time
from decimal import Decimal
from typing import Any

import litellm
import pytest

from tokenledger import Budget, Ledger
from tokenledger.capture import abegin_call
from tokenledger.testing import mock_response

MESSAGES = [{"role": "user", "content": "Summarise the ticket in one line."}]
MINI_CALL = Decimal("0.0000324")  # 16 input x $0.15/M + 50 output x $0.60/M


def _slow_reservations(monkeypatch: pytest.MonkeyPatch, ledger: Ledger) -> threading.Event:
    """Make the (real) reservation take 0.3 s, so the caller can be cancelled meanwhile;
    the event is set once a reservation has been taken."""
    enforcer = ledger._budgets
    real = enforcer.before_call
    reserved = threading.Event()

    def before_call(pending: Any, kwargs: Any) -> None:
        time.sleep(0.3)
        real(pending, kwargs)
        reserved.set()

    monkeypatch.setattr(enforcer, "before_call", before_call)
    return reserved


async def _settled(ledger: Ledger) -> tuple[Decimal, Decimal]:
    for _ in range(100):
        (status,) = ledger.budgets()
        if status.reserved_usd == 0:
            break
        await asyncio.sleep(0.05)
    return status.spent_usd, status.reserved_usd


async def test_a_litellm_call_cancelled_during_its_reservation_gives_it_back(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger.set_budget("global", usd="1")
    reserved = _slow_reservations(monkeypatch, ledger)
    async with ledger.run("r", budget=Budget(usd=MINI_CALL)) as run:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(
                litellm.acompletion(
                    model="gpt-4o-mini",
                    messages=MESSAGES,
                    max_tokens=50,
                    mock_response=mock_response(prompt_tokens=16, completion_tokens=50),
                ),
                timeout=0.05,
            )
        assert await asyncio.to_thread(reserved.wait, 5)
        assert (Decimal(0), Decimal(0)) == await _settled(ledger)
        monkeypatch.undo()
        # The run's own budget holds exactly one call: it must not still be held.
        await litellm.acompletion(
            model="gpt-4o-mini",
            messages=MESSAGES,
            max_tokens=50,
            mock_response=mock_response(prompt_tokens=16, completion_tokens=50),
        )
    assert (1, "ok", MINI_CALL) == (run.calls, run.status, run.cost_usd)
    assert (MINI_CALL, Decimal(0)) == await _settled(ledger)


async def test_abegin_call_cancelled_during_its_reservation_gives_it_back(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger.set_budget("global", usd="1")
    reserved = _slow_reservations(monkeypatch, ledger)
    async with ledger.run("r"):
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(
                abegin_call(
                    operation="chat",
                    model="gpt-4o-mini",
                    provider="openai",
                    request={"messages": MESSAGES},
                    max_tokens=50,
                ),
                timeout=0.05,
            )
        assert await asyncio.to_thread(reserved.wait, 5)
        assert (Decimal(0), Decimal(0)) == await _settled(ledger)
