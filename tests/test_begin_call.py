"""The shared entry point integrations use: begin_call / abegin_call, succeed, fail."""

from __future__ import annotations

from decimal import Decimal

import pytest
from helpers import calls_of

from tokenledger import Budget, BudgetExceeded, Ledger
from tokenledger.capture import abegin_call, begin_call

MESSAGES = [{"role": "user", "content": "hello there"}]


def test_a_call_begun_and_succeeded_is_priced_and_attributed(ledger: Ledger) -> None:
    with ledger.run("sdk") as run:
        pending = begin_call(
            operation="chat",
            model="gpt-4o-mini",
            provider="openai",
            request={"messages": MESSAGES},
            max_tokens=100,
        )
        assert pending is not None
        assert "gpt-4o-mini" == pending.model_to_send
        pending.succeed(
            {
                "prompt_tokens": 1200,
                "completion_tokens": 300,
                "prompt_tokens_details": {"cached_tokens": 1000},
                "completion_tokens_details": {"reasoning_tokens": 100},
            },
            model="gpt-4o-mini-2024-07-18",
            finish_reasons=["stop"],
        )
        pending.succeed({"prompt_tokens": 1, "completion_tokens": 1})  # a duplicate: ignored
    ledger.flush()
    (call,) = calls_of(ledger)
    assert (run.id, "openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", 100) == (
        call["run_id"],
        call["provider"],
        call["requested_model"],
        call["model"],
        call["max_tokens"],
    )
    assert Decimal("0.000285") == call["cost_usd"]


def test_a_failed_call_is_recorded_as_an_error(ledger: Ledger) -> None:
    with ledger.run("sdk"):
        pending = begin_call(operation="chat", model="gpt-4o-mini", provider="openai")
        assert pending is not None
        pending.fail(TimeoutError("slow"))
    ledger.flush()
    (call,) = calls_of(ledger)
    assert ("error", "TimeoutError") == (call["status"], call["error_type"])


def test_begin_call_refuses_before_the_request_when_a_budget_would_pass(ledger: Ledger) -> None:
    with pytest.raises(BudgetExceeded), ledger.run("capped", budget=Budget(usd="0.000001")) as run:
        begin_call(
            operation="chat",
            model="gpt-4o",
            provider="openai",
            request={"messages": MESSAGES},
            max_tokens=1000,
        )
    assert "budget_exceeded" == run.status
    ledger.flush()
    assert [] == calls_of(ledger)


async def test_abegin_call_reserves_and_refuses_in_async_code(ledger: Ledger) -> None:
    async with ledger.run("async-sdk", budget=Budget(usd="0.01")):
        pending = await abegin_call(
            operation="chat",
            model="gpt-4o-mini",
            provider="openai",
            request={"messages": MESSAGES},
            max_tokens=50,
        )
        assert pending is not None
        pending.succeed({"prompt_tokens": 10, "completion_tokens": 20})
        with pytest.raises(BudgetExceeded):
            await abegin_call(
                operation="chat",
                model="gpt-4o",
                provider="openai",
                request={"messages": MESSAGES},
                max_tokens=100_000,
            )
    ledger.flush()
    assert 1 == len(calls_of(ledger))


def test_nothing_is_recorded_outside_runs_when_switched_off(db_url: str) -> None:
    with Ledger(db_url, record_calls_outside_runs=False):
        assert begin_call(operation="chat", model="gpt-4o-mini", provider="openai") is None
