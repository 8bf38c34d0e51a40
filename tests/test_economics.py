"""Forecast, reprice and break-even, on the hand-computed ledger of test_reports_queries.

Support's history (see that module's docstring): 5 root runs costing 0.10, 0.20, 0.30,
0.40 and 1.00 (2.00 in all; mean 0.40, p50 0.30, p90 1.00), 2 successes, so 1.00 per
success. Its calls: ``alpha`` (input $1, output $2 per million) 1,500,000 input and
25,000 output tokens costing 1.55; ``beta`` (input $2) 200,000 input tokens costing 0.40;
one tool charge of 0.05. Model cost 1.95, tool cost 0.05.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from test_reports_queries import HandLedger

from tokenledger import ConfigurationError, Ledger
from tokenledger.economics import (
    ESTIMATE_NOTE,
    RepricedModel,
    break_even,
    forecast,
    parse_price_drop,
    reprice,
)
from tokenledger.pricing import PriceBook

D = Decimal

pytestmark = pytest.mark.filterwarnings("ignore::tokenledger.exceptions.UnpricedModelWarning")


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    with Ledger(db_url, capture=False, price_book=PriceBook(source_map={})) as ledger:
        ledger.set_price("alpha", input_per_million="1", output_per_million="2")
        ledger.set_price("beta", input_per_million="2", output_per_million="4")
        yield ledger


@pytest.fixture
def hand(ledger: Ledger) -> HandLedger:
    return HandLedger(ledger)


def models(rows: list[RepricedModel]) -> list[tuple[Any, ...]]:
    """(model, calls, cost now, estimate) of each repriced model."""
    return [(row.model, row.calls, row.cost_usd, row.estimated_cost_usd) for row in rows]


# -- forecast ----------------------------------------------------------------------------


def test_forecast_multiplies_the_mean_and_the_bands_by_runs_per_day(hand: HandLedger) -> None:
    result = forecast(hand.engine, runs_per_day=1_000_000, agent="support")
    assert (D("400000"), D("300000"), D("1000000")) == (
        result.daily_cost_usd,
        result.daily_p50_cost_usd,
        result.daily_p90_cost_usd,
    )


def test_a_forecast_month_is_thirty_days(hand: HandLedger) -> None:
    result = forecast(hand.engine, runs_per_day=1_000_000, agent="support")
    assert (D("12000000"), D("9000000"), D("30000000")) == (
        result.monthly_cost_usd,
        result.monthly_p50_cost_usd,
        result.monthly_p90_cost_usd,
    )


def test_forecast_carries_the_cost_per_success_and_successes_per_day(hand: HandLedger) -> None:
    result = forecast(hand.engine, runs_per_day=1_000_000, agent="support")
    assert (5, D("1.00"), D("0.4"), D("400000")) == (
        result.observed_runs,
        result.cost_per_success_usd,
        result.success_rate,
        result.successes_per_day,
    )


def test_forecast_explains_its_bands(hand: HandLedger) -> None:
    note = forecast(hand.engine, runs_per_day=10, agent="support").note
    assert "pessimistic bound" in note


def test_forecast_of_an_empty_ledger_is_refused(ledger: Ledger) -> None:
    with pytest.raises(
        ConfigurationError, match="no root runs at all, so there is no history to forecast from"
    ):
        forecast(ledger.engine, runs_per_day=1000)


@pytest.mark.parametrize("runs_per_day", [0, -5, True, 1.5, "1000", 10**13])
def test_forecast_refuses_a_bad_runs_per_day(hand: HandLedger, runs_per_day: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"`runs_per_day` is {runs_per_day!r}"):
        forecast(hand.engine, runs_per_day=runs_per_day)


# -- reprice -----------------------------------------------------------------------------


def test_a_price_drop_divides_each_models_cost(hand: HandLedger) -> None:
    result = reprice(hand.engine, price_drop="10x", agent="support")
    assert [("alpha", 5, D("1.55"), D("0.155")), ("beta", 1, D("0.40"), D("0.04"))] == models(
        result.models
    )


def test_a_price_drop_leaves_tool_charges_as_they_are(hand: HandLedger) -> None:
    result = reprice(hand.engine, price_drop=10, agent="support")
    assert (D("0.05"), D("2.00"), D("0.245"), D("-1.755")) == (
        result.tool_cost_usd,
        result.total_cost_usd,
        result.estimated_total_usd,
        result.change_usd,
    )


def test_reprice_at_a_price_set_in_the_ledger(hand: HandLedger) -> None:
    hand.ledger.set_price("gamma", input_per_million="0.5", output_per_million="1")
    hand.ledger.flush()
    result = reprice(hand.engine, as_model="gamma", agent="support")
    # alpha: 1.5M x 0.5/M + 25k x 1/M = 0.775; beta: 200k x 0.5/M = 0.10
    assert [("alpha", 5, D("1.55"), D("0.775")), ("beta", 1, D("0.40"), D("0.1"))] == models(
        result.models
    )
    assert ("user", D("0.925")) == (result.price_source, result.estimated_total_usd)


def test_reprice_at_a_model_in_litellms_map(hand: HandLedger) -> None:
    result = reprice(hand.engine, as_model="gpt-4o-mini", agent="support")
    # gpt-4o-mini: $0.15 in, $0.60 out per million
    assert (D("0.27"), D("0.32")) == (result.estimated_model_cost_usd, result.estimated_total_usd)
    assert result.price_source is not None
    assert result.price_source.startswith("litellm")


TIERED = {
    "tiered-model": {
        "litellm_provider": "vertex_ai",
        "mode": "chat",
        "input_cost_per_token": 1.25e-06,
        "output_cost_per_token": 1e-05,
        "input_cost_per_token_above_200k_tokens": 2.5e-06,
        "output_cost_per_token_above_200k_tokens": 1.5e-05,
    }
}


def test_reprice_applies_tiered_prices_call_by_call(hand: HandLedger) -> None:
    """Above 200k input tokens a call costs more: tiers apply per call, not to the sum."""
    result = reprice(
        hand.engine,
        as_model="tiered-model",
        agent="support",
        price_book=PriceBook(source_map=TIERED),
    )
    # alpha: 100k + 100k in and 25k out at base prices (0.25 + 0.25), 300k + 400k + 600k
    # in at the higher tier (3.25); beta: 200k in is not above 200k (0.25).
    assert [("alpha", 5, D("1.55"), D("3.75")), ("beta", 1, D("0.40"), D("0.25"))] == models(
        result.models
    )


def test_reprice_without_an_agent_includes_calls_outside_runs(hand: HandLedger) -> None:
    result = reprice(hand.engine, price_drop="2x")
    # alpha 1.55 + 0.01 outside; beta 0.40 + billing's 0.10
    assert [("alpha", 6, D("1.56"), D("0.78")), ("beta", 2, D("0.50"), D("0.25"))] == models(
        result.models
    )


def test_a_repricing_says_it_is_an_estimate(hand: HandLedger) -> None:
    result = reprice(hand.engine, price_drop="10x")
    assert ESTIMATE_NOTE == result.note
    assert "tokenizes the same text differently" in result.note


def test_reprice_prices_unpriced_calls_only_at_another_models_prices(ledger: Ledger) -> None:
    with ledger.run("support"):
        ledger.record_call("mystery", input_tokens=1_000_000)
        ledger.record_call("alpha", input_tokens=1_000_000)
    ledger.flush()
    at_beta = reprice(ledger.engine, as_model="beta")
    dropped = reprice(ledger.engine, price_drop="2x")
    assert (1, D("1"), D("4")) == (
        at_beta.unpriced_calls,
        at_beta.model_cost_usd,
        at_beta.estimated_model_cost_usd,
    )
    assert (1, D("0.5")) == (dropped.unpriced_calls, dropped.estimated_model_cost_usd)


def test_reprice_of_an_unknown_model_names_it_and_the_fix(hand: HandLedger) -> None:
    with pytest.raises(ConfigurationError) as error:
        reprice(hand.engine, as_model="no-such-model")
    assert "No price is known for model 'no-such-model'" in str(error.value)
    assert "ledger.set_price('no-such-model'" in str(error.value)


@pytest.mark.parametrize(
    "arguments", [{}, {"as_model": "alpha", "price_drop": "2x"}], ids=["neither", "both"]
)
def test_reprice_wants_exactly_one_of_as_model_and_price_drop(
    hand: HandLedger, arguments: dict[str, Any]
) -> None:
    with pytest.raises(ConfigurationError, match="exactly one of `as_model`"):
        reprice(hand.engine, **arguments)


@pytest.mark.parametrize(
    ("text", "factor"),
    [
        ("10x", D(10)),
        ("10X", D(10)),
        (" 2.5x ", D("2.5")),
        ("10", D(10)),
        (10, D(10)),
        (D("1"), D(1)),
    ],
)
def test_parse_price_drop_reads_a_factor(text: Any, factor: Decimal) -> None:
    assert factor == parse_price_drop(text)


@pytest.mark.parametrize("text", ["0x", "0.5x", "x", "ten", "-2x", "10%", 2.5, True, "1e9x"])
def test_parse_price_drop_refuses_anything_else(text: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"`price_drop` is .*10x"):
        parse_price_drop(text)


# -- break-even --------------------------------------------------------------------------


def test_break_even_names_the_price_level_that_makes_it_profitable(hand: HandLedger) -> None:
    """(2 x 0.6295 - 0.05 tools) / 1.95 model cost = 0.62: prices at 62 % of today's."""
    result = break_even(hand.engine, revenue_per_success="0.6295", agent="support")
    assert ("profitable_at_lower_prices", D("0.62"), D("-0.3705"), D("-0.741")) == (
        result.status,
        result.break_even_price_level,
        result.margin_per_success_usd,
        result.margin_usd,
    )
    assert "profitable when model prices fall to 62 % of today's" in result.summary


def test_break_even_splits_model_and_tool_cost(hand: HandLedger) -> None:
    result = break_even(hand.engine, revenue_per_success="1", agent="support")
    assert (D("2.00"), D("1.95"), D("0.05"), D("1.00")) == (
        result.total_cost_usd,
        result.model_cost_usd,
        result.tool_cost_usd,
        result.cost_per_success_usd,
    )


def test_break_even_when_already_profitable_gives_the_headroom(hand: HandLedger) -> None:
    result = break_even(hand.engine, revenue_per_success="1.50", agent="support")
    # (3.00 - 0.05) / 1.95 = 1.51282..., rounded down
    assert ("profitable", D("1.5128"), D("0.50"), D("1.00")) == (
        result.status,
        result.break_even_price_level,
        result.margin_per_success_usd,
        result.margin_usd,
    )
    assert result.summary.startswith("Profitable now.")


def test_break_even_when_tool_charges_alone_exceed_revenue(hand: HandLedger) -> None:
    result = break_even(hand.engine, revenue_per_success="0.02", agent="support")
    assert ("unprofitable_at_any_price", None, D("0.04")) == (
        result.status,
        result.break_even_price_level,
        result.revenue_usd,
    )
    assert "Not profitable at any model price" in result.summary


def test_break_even_without_successes_says_there_is_no_revenue(hand: HandLedger) -> None:
    result = break_even(hand.engine, revenue_per_success="4", agent="support", success="never")
    assert ("no_successes", None, None, None, D("-2.00")) == (
        result.status,
        result.break_even_price_level,
        result.cost_per_success_usd,
        result.margin_per_success_usd,
        result.margin_usd,
    )
    assert "No run counted as a success" in result.summary


@pytest.mark.parametrize("revenue", [4.0, "-1", "NaN", "four", None])
def test_break_even_refuses_a_bad_revenue(hand: HandLedger, revenue: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"`revenue_per_success` is {revenue!r}"):
        break_even(hand.engine, revenue_per_success=revenue)


def test_break_even_of_an_empty_ledger_is_refused(ledger: Ledger) -> None:
    with pytest.raises(ConfigurationError, match="no history to compute a break-even from"):
        break_even(ledger.engine, revenue_per_success="4")
