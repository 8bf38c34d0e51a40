"""Reservations in the database: all or none across budgets, settled at the actual cost,
released when a call fails, held while a stream is read, exact under concurrent calls,
and a refusal that carries its own figures (`tokenledger._reservations`).

Every test runs on SQLite and on PostgreSQL (the ``db_url`` fixture).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import warnings
from decimal import Decimal

import litellm
import pytest
from budget_calls import (
    MESSAGES,
    MINI_CALL,
    PROMPT_TOKENS,
    UTC,
    SentRequests,
    aask,
    ask,
    calls_until_refused,
    only_budget,
    recorded_cost,
    sent_fixture,  # noqa: F401  (the `sent` fixture)
)
from helpers import calls_of

from tokenledger import BudgetExceeded, Ledger
from tokenledger._budget_scope import WindowFigures
from tokenledger.budgets import window_bounds
from tokenledger.records import new_id
from tokenledger.testing import mock_response

# -- settling and all or none ------------------------------------------------------------


def test_spent_equals_the_sum_of_the_recorded_call_costs(ledger: Ledger) -> None:
    ledger.set_budget("global", usd="0.0005")
    with ledger.run("loop"):
        for _ in range(3):  # each reserves $0.0000324 and spends $0.0000135
            litellm.completion(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=50, mock_response="short"
            )
        made, _refusal = calls_until_refused()
    status = only_budget(ledger)
    assert recorded_cost(ledger) == status.spent_usd  # flushes
    assert 3 + made == len(calls_of(ledger))
    assert (Decimal(0), 0) == (status.reserved_usd, status.reserved_tokens)
    # 3 x 0.0000135 + 14 x 0.0000324 = 0.0004941; a 15th would pass 0.0005
    assert (14, Decimal("0.0004941")) == (made, status.spent_usd)


def test_a_refusal_holds_nothing_on_the_budgets_that_had_room(ledger: Ledger) -> None:
    """All or none: the roomy budget is not charged for a call another budget refused."""
    ledger.set_budget("global", usd="1")
    ledger.set_budget("user:42", usd=MINI_CALL)
    with (
        pytest.raises(BudgetExceeded, match="Budget `user:42`"),
        ledger.run("r", tags={"user": "42"}),
    ):
        ask()
        ask()
    roomy, tight = ledger.budgets()
    assert (MINI_CALL, Decimal(0), MINI_CALL, Decimal(0)) == (
        roomy.spent_usd,
        roomy.reserved_usd,
        tight.spent_usd,
        tight.reserved_usd,
    )


# -- token limits ----------------------------------------------------------------------------


def test_a_token_limit_refuses_a_call_that_could_pass_it(
    ledger: Ledger, sent: SentRequests
) -> None:
    ledger.set_budget("global", tokens=100)
    with pytest.raises(BudgetExceeded) as refused, ledger.run("r"):
        ask()  # reserves 16 + 50 = 66 tokens, spends 66
        ask()  # 66 + 66 > 100
    assert "limit 100 tokens, spent 66 tokens, reserved 0 tokens, and" in str(refused.value)
    status = only_budget(ledger)
    assert (66, 0, 34, 1) == (
        status.spent_tokens,
        status.reserved_tokens,
        status.remaining_tokens,
        len(sent.models),
    )


def test_a_budget_may_limit_usd_and_tokens_together(ledger: Ledger) -> None:
    ledger.set_budget("global", usd="1", tokens=100)
    message = r"limit \$1 and 100 tokens, spent \$0.000032 and 66 tokens, reserved \$0 and 0 tokens"
    with pytest.raises(BudgetExceeded, match=message), ledger.run("r"):
        ask()
        ask()


def test_an_unpriced_model_is_counted_against_a_token_limit(ledger: Ledger) -> None:
    ledger.set_budget("global", tokens=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unpriced-model warning
        with ledger.run("r"):
            ask("openai/acme-unpriced-7", mock_response=mock_response(prompt_tokens=300))
    assert 320 == only_budget(ledger).spent_tokens


# -- failures, streams ---------------------------------------------------------------------


def test_a_failed_call_releases_its_reservation(ledger: Ledger) -> None:
    ledger.set_budget("global", usd=MINI_CALL)
    error = litellm.RateLimitError("slow down", llm_provider="openai", model="gpt-4o-mini")
    with pytest.raises(litellm.RateLimitError), ledger.run("r"):
        ask(mock_response=error)
    status = only_budget(ledger)
    assert (Decimal(0), Decimal(0), 0) == (
        status.spent_usd,
        status.reserved_usd,
        status.reserved_tokens,
    )
    with ledger.run("retry"):
        ask()  # the whole budget is there again
    assert MINI_CALL == only_budget(ledger).spent_usd


async def test_a_failed_async_call_releases_its_reservation(ledger: Ledger) -> None:
    ledger.set_budget("global", usd="1")
    error = litellm.APIError(500, "boom", llm_provider="openai", model="gpt-4o-mini")
    with pytest.raises(litellm.APIError):
        async with ledger.run("r"):
            await aask(mock_response=error)
    status = only_budget(ledger)
    assert (Decimal(0), Decimal(0)) == (status.spent_usd, status.reserved_usd)


def test_a_stream_holds_its_reservation_until_it_is_read(ledger: Ledger) -> None:
    ledger.set_budget("global", usd="1")
    with ledger.run("r"):
        stream = ask(stream=True, mock_response="one two three")
        held = only_budget(ledger)
        for _chunk in stream:
            pass
    settled = only_budget(ledger)
    assert (MINI_CALL, Decimal(0)) == (held.reserved_usd, held.spent_usd)
    assert Decimal(0) == settled.reserved_usd
    assert recorded_cost(ledger) == settled.spent_usd > 0


def test_an_abandoned_stream_is_settled_when_its_run_ends(ledger: Ledger) -> None:
    ledger.set_budget("global", usd="1")
    with ledger.run("r"):
        stream = ask(stream=True, mock_response="a long answer read only in part")
        for _chunk in stream:
            break
    status = only_budget(ledger)
    assert Decimal(0) == status.reserved_usd
    assert recorded_cost(ledger) == status.spent_usd > 0


# -- async ---------------------------------------------------------------------------------


async def test_acompletion_reserves_and_settles(ledger: Ledger) -> None:
    ledger.set_budget("global", usd="1")
    async with ledger.run("r"):
        await aask()
    status = only_budget(ledger)
    assert (MINI_CALL, Decimal(0)) == (status.spent_usd, status.reserved_usd)


async def test_a_refused_acompletion_sends_no_request(ledger: Ledger, sent: SentRequests) -> None:
    ledger.set_budget("global", usd=MINI_CALL)
    with pytest.raises(BudgetExceeded, match="Budget `global` \\(day\\)"):
        async with ledger.run("r") as run:
            await aask()
            await aask()
    assert (["gpt-4o-mini"], "budget_exceeded", 1) == (sent.models, run.status, run.calls)
    status = only_budget(ledger)
    assert (MINI_CALL, Decimal(0)) == (status.spent_usd, status.reserved_usd)


async def test_concurrent_acompletions_accept_exactly_what_fits(
    ledger: Ledger, sent: SentRequests
) -> None:
    ledger.set_budget("global", usd=MINI_CALL * 12 + Decimal("0.00001"))

    async def one() -> bool:
        try:
            async with ledger.run("task"):
                await aask()
        except BudgetExceeded:
            return False
        return True

    outcomes = await asyncio.gather(*(one() for _ in range(20)))
    status = only_budget(ledger)
    assert (12, 8, 12) == (outcomes.count(True), outcomes.count(False), len(sent.models))
    assert (MINI_CALL * 12, Decimal(0)) == (status.spent_usd, status.reserved_usd)
    assert recorded_cost(ledger) == status.spent_usd


def test_an_estimate_that_was_too_low_is_recorded_as_overshoot_and_logged(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with Ledger(db_url, default_max_output_tokens=1) as ledger:
        ledger.set_price("acme-private-1", input_per_million="2", output_per_million="8")
        ledger.set_budget("global", usd="1")
        reply = mock_response(
            model="acme-private-1", prompt_tokens=PROMPT_TOKENS, completion_tokens=500
        )
        with caplog.at_level(logging.WARNING, logger="tokenledger"), ledger.run("r"):
            ask("openai/acme-private-1", max_tokens=None, mock_response=reply)
        status = only_budget(ledger)
        # reserved 16 x 2/M + 1 x 8/M = $0.00004; spent 16 x 2/M + 500 x 8/M = $0.004032
        assert (Decimal("0.004032"), Decimal("0.003992"), Decimal(0)) == (
            status.spent_usd,
            status.overshoot_usd,
            status.reserved_usd,
        )
        assert recorded_cost(ledger) == status.spent_usd
    assert re.search(
        r"cost \$0\.004032\d*, more than the \$0\.00004\d* reserved for it \(no max_tokens\?\)",
        caplog.text,
    )


def test_recorded_calls_and_charges_count_against_budgets(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", usd="1", per="day")
    with ledger.run("r", tags={"tenant": "acme"}) as run:
        ledger.record_call("gpt-4o-mini", input_tokens=1000, output_tokens=1000)
        run.charge("web_search", usd="0.25")
    (status,) = ledger.budgets()
    # 1000 x $0.15/M + 1000 x $0.60/M + $0.25
    assert Decimal("0.25075") == status.spent_usd


# -- a refusal carries its figures ---------------------------------------------------------


def test_a_refusal_names_the_window_and_its_figures_as_they_stood(ledger: Ledger) -> None:
    """The store words nothing: it hands back the budget, its window and its figures, so
    the enforcer need not ask the database again to say why a call was refused."""
    ledger.set_budget("tenant:acme", usd=MINI_CALL * 2, tokens=1000, per="day")
    with ledger.run("r", tags={"tenant": "acme"}):
        ask()  # spends MINI_CALL and 66 tokens
    store = ledger._budgets.store
    (definition,) = store.definitions(fresh=True)
    start, _reset = window_bounds("day", dt.datetime.now(UTC))
    line = (definition, start)
    assert store.reserve(new_id(), [line], [], MINI_CALL, 66) is None  # held, not settled
    refusal = store.reserve(new_id(), [line], [], MINI_CALL, 66)
    assert refusal is not None
    assert (definition, start) == (refusal.budget, refusal.window_start)
    assert WindowFigures(MINI_CALL, MINI_CALL, 66, 66) == refusal.figures
    status = only_budget(ledger)  # the refusal held nothing
    assert (MINI_CALL, MINI_CALL, 66, 66) == (
        status.spent_usd,
        status.reserved_usd,
        status.spent_tokens,
        status.reserved_tokens,
    )
