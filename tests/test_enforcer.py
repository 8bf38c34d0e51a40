"""The enforcer before and after a call: refusals and their wording, run budgets,
``warn`` and ``downgrade``, calls off the event loop, and budgets failing closed or open
(`tokenledger._enforcer`).

Calls go through real litellm with ``mock_response=`` (offline); the figures they assume
are explained in `budget_calls`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import time
import warnings
from decimal import Decimal
from typing import Any

import litellm
import pytest
from budget_calls import (
    GPT4O_CALL,
    MESSAGES,
    MINI_CALL,
    UTC,
    SentRequests,
    aask,
    ask,
    only_budget,
    sent_fixture,  # noqa: F401  (the `sent` fixture)
)
from helpers import calls_of, rows, runs_by_name
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tokenledger import (
    Budget,
    BudgetExceeded,
    BudgetWarning,
    ConfigurationError,
    Ledger,
    LedgerError,
)
from tokenledger.budgets import window_bounds
from tokenledger.testing import mock_response

# -- raise: refused before the request -----------------------------------------------------


def test_a_refused_call_sends_no_request(ledger: Ledger, sent: SentRequests) -> None:
    ledger.set_budget("global", usd=MINI_CALL * 2 + Decimal("0.00001"))
    with pytest.raises(BudgetExceeded), ledger.run("loop") as run:
        for _ in range(10):
            ask()
    assert ["gpt-4o-mini", "gpt-4o-mini"] == sent.models
    assert 2 == run.calls


def test_a_refused_call_ends_its_run_as_budget_exceeded(ledger: Ledger) -> None:
    ledger.set_budget("global", usd="0.00001")
    with pytest.raises(BudgetExceeded), ledger.run("loop") as run:
        ask()
    ledger.flush()
    stored = runs_by_name(ledger)["loop"]
    assert ("budget_exceeded", "budget_exceeded", "BudgetExceeded", 0) == (
        run.status,
        stored["status"],
        stored["error_type"],
        stored["calls"],
    )
    assert [] == calls_of(ledger)  # nothing was sent, so no call is recorded


def test_a_run_that_catches_the_refusal_still_ends_as_budget_exceeded(ledger: Ledger) -> None:
    ledger.set_budget("global", usd="0.00001")
    with ledger.run("careful") as run, pytest.raises(BudgetExceeded):
        ask()
    assert "budget_exceeded" == run.status


def test_budget_exceeded_names_the_budget_and_every_figure(ledger: Ledger) -> None:
    # A stream holds its reservation until it is read to the end.
    ledger.set_budget("user:42", usd="0.00009", per="month")
    with ledger.run("r", tags={"user": "42"}):
        ask()  # spends $0.0000324
        stream = ask(stream=True, mock_response="streamed")  # reserves $0.0000324
        with pytest.raises(BudgetExceeded) as refused:
            ask()  # 3 x 0.0000324 > 0.00009
        for _chunk in stream:
            pass
    _start, reset = window_bounds("month", dt.datetime.now(UTC))
    assert (
        "Budget `user:42` (month) would be exceeded: limit $0.00009, spent $0.000032, "
        "reserved $0.000032, and this call to gpt-4o-mini is estimated at $0.000032 (66 "
        f"tokens); the window resets at {reset.isoformat()}. No request was sent."
    ) == str(refused.value)


def test_a_total_budget_says_it_does_not_reset(ledger: Ledger) -> None:
    ledger.set_budget("global", tokens=10, per="total")
    with (
        pytest.raises(BudgetExceeded, match=r"limit 10 tokens, .*; it does not reset\."),
        ledger.run("r"),
    ):
        ask()


# -- per-run budgets -----------------------------------------------------------------------


def test_a_budget_on_the_decorator_caps_each_run_of_the_agent(
    ledger: Ledger, sent: SentRequests
) -> None:
    @ledger.agent("researcher", budget=Budget(usd="0.0001"))
    def research() -> None:
        for _ in range(10):
            ask()

    with pytest.raises(BudgetExceeded) as refused:
        research()
    assert str(refused.value).startswith(
        "Budget `run:researcher` (run) would be exceeded: limit $0.0001, spent $0.000097"
    )
    with pytest.raises(BudgetExceeded):
        research()  # a new run: a new budget
    assert 6 == len(sent.models)  # 3 calls per run: 4 x 0.0000324 > 0.0001
    ledger.flush()
    assert ["budget_exceeded"] * 2 == [r["status"] for r in rows(ledger, "runs")]


async def test_a_budget_on_an_async_agent_caps_its_run(ledger: Ledger) -> None:
    @ledger.agent("researcher", budget=Budget(usd="0.0001"))
    async def research() -> int:
        made = 0
        try:
            for _ in range(10):
                await aask()
                made += 1
        except BudgetExceeded:
            return made
        return made

    assert 3 == await research()


def test_a_budget_on_a_run_caps_that_run(ledger: Ledger) -> None:
    with pytest.raises(BudgetExceeded), ledger.run("triage", budget=Budget(usd="0.0001")) as run:
        for _ in range(10):
            ask()
    assert (3, MINI_CALL * 3, "budget_exceeded") == (run.calls, run.cost_usd, run.status)


def test_a_sub_run_spends_from_its_parents_run_budget(ledger: Ledger, sent: SentRequests) -> None:
    with (
        pytest.raises(BudgetExceeded, match="Budget `run:planner`"),
        ledger.run("planner", budget=Budget(usd="0.0001")) as planner,
    ):
        ask()
        with ledger.run("researcher") as researcher:
            ask()
            ask()
        ask()  # 4 x 0.0000324 > 0.0001
    assert (3, 2, 3) == (planner.calls, researcher.calls, len(sent.models))
    assert ("ok", "budget_exceeded") == (researcher.status, planner.status)


def test_a_run_budget_in_tokens(ledger: Ledger) -> None:
    with (
        pytest.raises(BudgetExceeded, match=r"limit 150 tokens"),
        ledger.run("r", budget=Budget(tokens=150)) as run,
    ):
        ask()
        ask()
        ask()  # 3 x 66 > 150
    assert 2 == run.calls


def test_the_tighter_of_a_run_budget_and_a_shared_budget_refuses(ledger: Ledger) -> None:
    ledger.set_budget("global", usd="1")
    with (
        pytest.raises(BudgetExceeded, match="run:r"),
        ledger.run("r", budget=Budget(usd=MINI_CALL)),
    ):
        ask()
        ask()
    status = only_budget(ledger)
    assert (MINI_CALL, Decimal(0)) == (status.spent_usd, status.reserved_usd)


# -- warn ----------------------------------------------------------------------------------


def test_a_warn_budget_lets_the_call_through_with_a_warning_and_a_span_event(
    ledger: Ledger, sent: SentRequests, span_exporter: InMemorySpanExporter
) -> None:
    ledger.set_budget("tenant:acme", usd="0.00001", action="warn")
    with pytest.warns(BudgetWarning) as caught, ledger.run("r", tags={"tenant": "acme"}) as run:
        ask()
    assert ("ok", 1, ["gpt-4o-mini"]) == (run.status, run.calls, sent.models)
    assert [
        "Budget `tenant:acme` (day) is over its limit of $0.00001 (spent $0, reserved "
        "$0.000032, this call included); the call to gpt-4o-mini, estimated at $0.000032, "
        "proceeds because the budget's action is `warn`."
    ] == [str(w.message) for w in caught if w.category is BudgetWarning]
    (run_span,) = [s for s in span_exporter.get_finished_spans() if s.name == "invoke_agent r"]
    events = [e for e in run_span.events if e.name == "tokenledger.budget.exceeded"]
    assert 1 == len(events)
    assert "warn" == events[0].attributes["tokenledger.budget.action"]
    status = only_budget(ledger)
    assert (MINI_CALL, Decimal(0)) == (status.spent_usd, status.reserved_usd)


def test_a_warn_budget_under_its_limit_is_silent(ledger: Ledger) -> None:
    ledger.set_budget("global", usd="1", action="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ledger.run("r"):
            ask()
    assert MINI_CALL == only_budget(ledger).spent_usd


def test_a_warn_budget_on_tokens_warns_too(ledger: Ledger) -> None:
    ledger.set_budget("global", tokens=10, action="warn")
    with (
        pytest.warns(BudgetWarning, match=r"over its limit of 10 tokens \(spent 0 tokens, "),
        ledger.run("r") as run,
    ):
        ask()
    assert ("ok", 66) == (run.status, only_budget(ledger).spent_tokens)


def test_a_warn_run_budget_lets_the_call_through(ledger: Ledger) -> None:
    with (
        pytest.warns(BudgetWarning, match="Run `r` budget is over its limit of \\$0.00001"),
        ledger.run("r", budget=Budget(usd="0.00001", action="warn")) as run,
    ):
        ask()
    assert ("ok", MINI_CALL) == (run.status, run.cost_usd)


def test_a_warn_run_budget_does_not_lift_the_budget_of_a_parent_run(
    ledger: Ledger, sent: SentRequests
) -> None:
    with (
        pytest.raises(BudgetExceeded, match="Budget `run:planner`"),
        ledger.run("planner", budget=Budget(usd=MINI_CALL)),
        ledger.run("researcher", budget=Budget(usd="0.00001", action="warn")),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", BudgetWarning)
        ask()
        ask()
    assert 1 == len(sent.models)


# -- downgrade -----------------------------------------------------------------------------


def test_downgrade_makes_the_call_with_the_first_cheaper_model_that_fits(
    ledger: Ledger, sent: SentRequests, caplog: pytest.LogCaptureFixture
) -> None:
    ledger.set_budget(
        "global", usd="0.0003", action="downgrade", downgrade_to=["gpt-4o-mini"]
    )  # a gpt-4o call is estimated at $0.00054
    with caplog.at_level(logging.WARNING, logger="tokenledger"), ledger.run("r") as run:
        response = ask("gpt-4o", mock_response="ok")  # litellm names the model that served it
    assert (["gpt-4o-mini"], "gpt-4o-mini", "ok") == (sent.models, response.model, run.status)
    ledger.flush()
    (call,) = calls_of(ledger)
    assert ("gpt-4o", "gpt-4o-mini", Decimal("0.0000135")) == (
        call["requested_model"],
        call["model"],
        call["cost_usd"],  # 10 x 0.15/M + 20 x 0.60/M, at the cheaper model's price
    )
    assert "downgraded a call from gpt-4o to gpt-4o-mini" in caplog.text
    assert Decimal("0.0000135") == only_budget(ledger).spent_usd


def test_downgrade_leaves_a_call_that_fits_alone(ledger: Ledger, sent: SentRequests) -> None:
    ledger.set_budget("global", usd="1", action="downgrade", downgrade_to=["gpt-4o-mini"])
    with ledger.run("r"):
        ask("gpt-4o")
    assert ["gpt-4o"] == sent.models
    assert GPT4O_CALL == only_budget(ledger).spent_usd


def test_downgrade_refuses_when_no_model_in_the_chain_fits(
    ledger: Ledger, sent: SentRequests
) -> None:
    ledger.set_budget("global", usd="0.00001", action="downgrade", downgrade_to=["gpt-4o-mini"])
    with pytest.raises(BudgetExceeded, match="this call to gpt-4o-mini"), ledger.run("r") as run:
        ask("gpt-4o")
    assert ([], "budget_exceeded") == (sent.models, run.status)


async def test_downgrade_works_for_async_calls(ledger: Ledger, sent: SentRequests) -> None:
    ledger.set_budget("global", usd="0.0003", action="downgrade", downgrade_to=["gpt-4o-mini"])
    async with ledger.run("r"):
        await aask("gpt-4o")  # the mock response names no model: the row still does
    assert ["gpt-4o-mini"] == sent.models
    ledger.flush()
    (call,) = calls_of(ledger)
    assert ("gpt-4o", "gpt-4o-mini", MINI_CALL) == (
        call["requested_model"],
        call["model"],
        call["cost_usd"],
    )
    status = only_budget(ledger)
    assert (MINI_CALL, Decimal(0)) == (status.spent_usd, status.overshoot_usd)


def test_a_call_with_a_positional_model_is_refused_rather_than_downgraded(
    ledger: Ledger, sent: SentRequests
) -> None:
    ledger.set_budget("global", usd="0.0003", action="downgrade", downgrade_to=["gpt-4o-mini"])
    with pytest.raises(BudgetExceeded, match="pass model= as a keyword"), ledger.run("r") as run:
        litellm.completion("gpt-4o", MESSAGES, max_tokens=50, mock_response="ok")
    status = only_budget(ledger)
    assert ([], "budget_exceeded") == (sent.models, run.status)
    assert (Decimal(0), Decimal(0)) == (status.spent_usd, status.reserved_usd)


def test_a_run_budget_can_downgrade(ledger: Ledger, sent: SentRequests) -> None:
    budget = Budget(usd="0.0003", action="downgrade", downgrade_to=["gpt-4o-mini"])
    with ledger.run("r", budget=budget):
        ask("gpt-4o")
    assert ["gpt-4o-mini"] == sent.models


# -- async -------------------------------------------------------------------------------


async def test_reserving_does_not_block_the_event_loop(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ticker task keeps ticking while each reservation is in progress.

    Each reservation waits until the ticker has ticked at least once after it started:
    that can only happen if the reservation runs off the event loop. (Were it on the
    loop, it would note that and not wait, and the assertions below would fail.)
    """
    ledger.set_budget("global", usd="1")
    loop_thread = threading.get_ident()
    ticks = 0
    done = False
    seen: list[tuple[bool, int, int]] = []  # (off the loop?, ticks before, ticks after)
    enforcer = ledger._budgets
    reserve = enforcer.before_call

    def observed(pending: Any, kwargs: Any) -> None:
        before = ticks
        off_loop = threading.get_ident() != loop_thread
        reserve(pending, kwargs)
        deadline = time.monotonic() + 30  # only reached if the loop is blocked
        while off_loop and ticks == before and time.monotonic() < deadline:
            time.sleep(0.001)
        seen.append((off_loop, before, ticks))

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    monkeypatch.setattr(enforcer, "before_call", observed)
    ticking = asyncio.create_task(ticker())
    async with ledger.run("r") as run:
        await asyncio.gather(*(aask() for _ in range(20)))
    done = True
    await ticking
    assert [True] * 20 == [off_loop for off_loop, _, _ in seen]
    assert all(after > before for _, before, after in seen), seen
    assert (20, MINI_CALL * 20) == (run.calls, only_budget(ledger).spent_usd)


# -- unpriced models ---------------------------------------------------------------------


def test_an_unpriced_model_under_a_usd_budget_is_refused_with_how_to_price_it(
    ledger: Ledger, sent: SentRequests
) -> None:
    ledger.set_budget("global", usd="5")
    with pytest.raises(BudgetExceeded) as refused, ledger.run("r") as run:
        ask("openai/acme-unpriced-9")
    assert (
        "No price is known for model `openai/acme-unpriced-9`, so tokenledger cannot bound "
        "its cost against a USD budget; set one with `ledger.set_price('openai/acme-unpriced-9', "
        "input_per_million=..., output_per_million=...)`."
    ) == str(refused.value)
    assert ([], "budget_exceeded") == (sent.models, run.status)
    ledger.set_price("acme-unpriced-9", input_per_million="1", output_per_million="1")
    with ledger.run("priced"):
        ask("openai/acme-unpriced-9", mock_response=mock_response(model="acme-unpriced-9"))
    assert ["acme-unpriced-9"] == sent.models


# -- the budget database fails -------------------------------------------------------------


def break_reservations(ledger: Ledger) -> None:
    """A real database failure: the table reservations are written to is gone."""
    with ledger.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE reservations")


def test_a_call_that_cannot_be_reserved_is_not_sent(ledger: Ledger, sent: SentRequests) -> None:
    ledger.set_budget("global", usd="1")
    break_reservations(ledger)
    with pytest.raises(LedgerError, match="budgets fail closed"), ledger.run("r"):
        ask()
    assert [] == sent.models


async def test_an_async_call_that_cannot_be_reserved_is_not_sent(
    ledger: Ledger, sent: SentRequests
) -> None:
    ledger.set_budget("global", usd="1")
    break_reservations(ledger)
    with pytest.raises(LedgerError, match="budgets fail closed"):
        async with ledger.run("r"):
            await aask()
    assert [] == sent.models


def test_fail_open_lets_a_call_through_unreserved_and_counts_it(
    db_url: str, sent: SentRequests
) -> None:
    with Ledger(db_url, budget_failure_policy="fail_open") as ledger:
        ledger.set_budget("global", usd="1")
        break_reservations(ledger)
        with ledger.run("r"):
            ask()
        assert ["gpt-4o-mini"] == sent.models
        assert 1 == ledger._budgets.unreserved_calls
        ledger.flush()
        assert 1 == len(calls_of(ledger))


def test_a_bad_failure_policy_is_refused(db_url: str) -> None:
    with pytest.raises(ConfigurationError, match="`budget_failure_policy` is 'maybe'"):
        Ledger(db_url, budget_failure_policy="maybe")


# -- wording -------------------------------------------------------------------------------


def test_a_refusal_never_reads_minus_zero() -> None:
    """SQLite keeps money as floats: a window whose reservations all settled may read
    back as -0, which a refusal must print as $0."""
    from tokenledger._budget_scope import Estimate, WindowFigures
    from tokenledger._enforcer import _Limit, _refusal_message

    figures = WindowFigures(Decimal("0.00009"), Decimal("-0E-12"), 0, 0)
    estimate = Estimate(usd=MINI_CALL, tokens=66, model="gpt-4o-mini")
    message = _refusal_message(_Limit("global", "total", MINI_CALL, None), figures, estimate, None)
    assert (
        "Budget `global` (total) would be exceeded: limit $0.000032, spent $0.00009, "
        "reserved $0, and this call to gpt-4o-mini is estimated at $0.000032 (66 tokens); "
        "it does not reset. No request was sent."
    ) == message
