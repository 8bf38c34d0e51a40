"""Budgets as defined: setting, listing, replacing and removing shared budgets, the
sentences that refuse a bad definition, and the UTC calendar windows (`tokenledger.budgets`).

Calls go through real litellm with ``mock_response=`` (offline); the figures they assume
are explained in `budget_calls`.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from budget_calls import MINI_CALL, UTC, SentRequests, ask, sent_fixture  # noqa: F401 (fixture)
from hypothesis import given
from hypothesis import strategies as st

from tokenledger import Budget, BudgetExceeded, ConfigurationError, Ledger
from tokenledger.budgets import window_bounds

# -- defining budgets ----------------------------------------------------------------------


def test_set_budget_returns_the_budget_with_an_empty_current_window(ledger: Ledger) -> None:
    status = ledger.set_budget("user:42", usd="5.00", per="day")
    start, reset = window_bounds("day", dt.datetime.now(UTC))
    assert ("user:42", "day", Decimal("5"), None, "raise", ()) == (
        status.scope,
        status.per,
        status.limit_usd,
        status.limit_tokens,
        status.action,
        status.downgrade_to,
    )
    assert (Decimal(0), Decimal(0), Decimal("5"), start, reset) == (
        status.spent_usd,
        status.reserved_usd,
        status.remaining_usd,
        status.window_start,
        status.resets_at,
    )


def test_budgets_lists_every_budget_by_scope_then_window(ledger: Ledger) -> None:
    ledger.set_budget("user:42", usd="5", per="month")
    ledger.set_budget("global", tokens=1_000_000, per="total")
    ledger.set_budget("user:42", usd="1", per="day")
    ledger.set_budget("agent:triage", usd="2", per="hour", action="warn")
    assert [
        ("agent:triage", "hour", Decimal(2), None, "warn"),
        ("global", "total", None, 1_000_000, "raise"),
        ("user:42", "day", Decimal(1), None, "raise"),
        ("user:42", "month", Decimal(5), None, "raise"),
    ] == [(b.scope, b.per, b.limit_usd, b.limit_tokens, b.action) for b in ledger.budgets()]


def test_setting_a_budget_again_replaces_its_limit_and_keeps_its_spend(ledger: Ledger) -> None:
    ledger.set_budget("global", usd="1")
    with ledger.run("r"):
        ask()
    replaced = ledger.set_budget("global", usd="2", tokens=500, action="warn")
    assert (1, Decimal(2), 500, "warn", MINI_CALL) == (
        len(ledger.budgets()),
        replaced.limit_usd,
        replaced.limit_tokens,
        replaced.action,
        replaced.spent_usd,
    )


def test_remove_budget_removes_one_window_or_every_window_of_a_scope(ledger: Ledger) -> None:
    ledger.set_budget("user:42", usd="1", per="day")
    ledger.set_budget("user:42", usd="5", per="month")
    ledger.set_budget("user:7", usd="1", per="day")
    assert 1 == ledger.remove_budget("user:42", per="day")
    assert [("user:42", "month"), ("user:7", "day")] == [(b.scope, b.per) for b in ledger.budgets()]
    assert 0 == ledger.remove_budget("user:42", per="day")
    assert 1 == ledger.remove_budget("user:42")
    assert ["user:7"] == [b.scope for b in ledger.budgets()]


def test_a_removed_budget_no_longer_refuses_calls(ledger: Ledger, sent: SentRequests) -> None:
    ledger.set_budget("global", usd="0.00001")
    with pytest.raises(BudgetExceeded), ledger.run("r"):
        ask()
    ledger.remove_budget("global")
    with ledger.run("r"):
        ask()
    assert ["gpt-4o-mini"] == sent.models


def test_budgets_live_in_the_database_shared_by_every_ledger(db_url: str) -> None:
    with Ledger(db_url) as first:
        first.set_budget("tenant:acme", usd="0.00001", per="week")
    with Ledger(db_url) as second:
        assert ["tenant:acme"] == [b.scope for b in second.budgets()]
        with pytest.raises(BudgetExceeded), second.run("r", tags={"tenant": "acme"}):
            ask()


BAD_BUDGETS = [
    pytest.param({"per": "year"}, "`per='year'`; the window must be one of hour, day", id="window"),
    pytest.param({"per": "run"}, "`per='run'`; the window must be one of hour", id="run-window"),
    pytest.param({"usd": "-5"}, "`usd=-5`; a limit must be a positive amount", id="negative"),
    pytest.param({"usd": 0}, "`usd=0`; a limit must be a positive amount", id="zero"),
    pytest.param({"usd": "NaN"}, "`usd=NaN`; a limit must be a positive amount", id="nan"),
    pytest.param({"usd": Decimal("Infinity")}, "`usd=Infinity`; a limit", id="infinite"),
    pytest.param({"usd": float("nan")}, "`usd=nan`; a limit must be a positive", id="float-nan"),
    pytest.param(
        {"usd": 0.5},
        '`usd=0.5`; give the amount as a string or Decimal, e.g. usd="0.5"',
        id="float",
    ),
    pytest.param({"usd": True}, "`usd=True`; a limit must be a positive amount", id="bool"),
    pytest.param({"usd": "five"}, "`usd='five'`; a limit must be a positive amount", id="text"),
    pytest.param(
        {"usd": None}, "has neither `usd` nor `tokens`; give at least one limit", id="no-limit"
    ),
    pytest.param(
        {"usd": None, "tokens": 0}, "`tokens=0`; a token limit must be a whole", id="tokens-0"
    ),
    pytest.param({"usd": None, "tokens": 2.5}, "`tokens=2.5`; a token limit", id="tokens-float"),
    pytest.param(
        {"action": "explode"},
        "`action='explode'`; it must be one of raise, warn, downgrade",
        id="action",
    ),
    pytest.param(
        {"action": "downgrade"}, "`action='downgrade'` but no `downgrade_to`", id="no-chain"
    ),
    pytest.param(
        {"action": "downgrade", "downgrade_to": "gpt-4o-mini"},
        "`downgrade_to='gpt-4o-mini'`; it must be a list of model names",
        id="chain-str",
    ),
    pytest.param(
        {"action": "downgrade", "downgrade_to": [""]},
        "`downgrade_to=['']`; it must be a list",
        id="chain-empty-name",
    ),
    pytest.param(
        {"downgrade_to": ["gpt-4o-mini"]},
        "but `action='raise'`; the fallback models are used only with action='downgrade'",
        id="chain-without-downgrade",
    ),
]


@pytest.mark.parametrize(("changes", "message"), BAD_BUDGETS)
def test_a_bad_budget_is_refused_with_a_sentence_naming_field_and_value(
    ledger: Ledger, changes: dict[str, Any], message: str
) -> None:
    spec: dict[str, Any] = {"usd": "5", "per": "day", **changes}
    with pytest.raises(ConfigurationError) as refused:
        ledger.set_budget("user:42", **spec)
    text = str(refused.value)
    assert text.startswith("Budget `user:42` has ")
    assert message in text
    assert text.endswith(".")
    assert [] == ledger.budgets()  # nothing stored


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        ("user", "Budget scope `user` is invalid; use `global`, `agent:NAME`, `user:ID`"),
        ("user:", "Budget scope `user:` is invalid"),
        (":42", "Budget scope `:42` is invalid"),
        ("", "Budget scope '' is invalid"),
        (42, "Budget scope 42 is invalid"),
        ("tag:" + "x" * 300, "(at most 300 characters)"),
    ],
)
def test_a_bad_scope_is_refused_naming_it(ledger: Ledger, scope: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match="TAGKEY:VALUE") as refused:
        ledger.set_budget(scope, usd="5")
    assert message in str(refused.value)
    with pytest.raises(ConfigurationError, match="is invalid"):
        ledger.remove_budget(scope)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "Budget has neither `usd` nor `tokens`"),
        ({"usd": "-1"}, "Budget has `usd=-1`; a limit must be a positive amount"),
        (
            {"usd": 0.25},
            'Budget has `usd=0.25`; give the amount as a string or Decimal, e.g. usd="0.25"',
        ),
        (
            {"usd": "1", "per": "fortnight"},
            "Budget has `per='fortnight'`; the window must be one of run, hour",
        ),
        (
            {"usd": "1", "action": "downgrade"},
            "Budget has `action='downgrade'` but no `downgrade_to`",
        ),
    ],
)
def test_a_bad_run_budget_is_refused_naming_field_and_value(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError) as refused:
        Budget(**kwargs)
    assert message in str(refused.value)


def test_a_run_budget_with_a_calendar_window_is_refused_on_the_decorator(ledger: Ledger) -> None:
    with pytest.raises(ConfigurationError) as refused:
        ledger.agent("researcher", budget=Budget(usd="1", per="day"))
    assert (
        "`budget` of agent `researcher` has per='day'; a budget on a run caps that run "
        "(per='run'). For a window shared across runs use "
        "ledger.set_budget('agent:NAME', usd=..., per='day')."
    ) == str(refused.value)


def test_a_run_budget_with_a_calendar_window_is_refused_on_a_run(ledger: Ledger) -> None:
    with pytest.raises(ConfigurationError, match=r"`budget` of run `triage` has per='week'"):
        ledger.run("triage", budget=Budget(usd="1", per="week"))


def test_a_run_budget_that_is_not_a_budget_is_refused(ledger: Ledger) -> None:
    with pytest.raises(ConfigurationError, match=r"`budget` of run `triage` is '0.50'; give a"):
        ledger.run("triage", budget="0.50")


# -- windows (pure: no database) -----------------------------------------------------------


def at(*parts: int, tz: dt.tzinfo = UTC) -> dt.datetime:
    return dt.datetime(*parts, tzinfo=tz)


@pytest.mark.parametrize(
    ("per", "now", "start", "reset"),
    [
        ("hour", at(2025, 3, 14, 15, 42, 7, 500), at(2025, 3, 14, 15), at(2025, 3, 14, 16)),
        ("hour", at(2025, 3, 14, 16), at(2025, 3, 14, 16), at(2025, 3, 14, 17)),
        ("hour", at(2025, 12, 31, 23, 59, 59), at(2025, 12, 31, 23), at(2026, 1, 1)),
        ("day", at(2025, 3, 14, 15, 42), at(2025, 3, 14), at(2025, 3, 15)),
        ("day", at(2025, 3, 14), at(2025, 3, 14), at(2025, 3, 15)),
        ("day", at(2025, 12, 31, 12), at(2025, 12, 31), at(2026, 1, 1)),
        ("day", at(2024, 2, 28, 12), at(2024, 2, 28), at(2024, 2, 29)),
        ("week", at(2025, 3, 14, 15), at(2025, 3, 10), at(2025, 3, 17)),  # Friday
        ("week", at(2025, 3, 10), at(2025, 3, 10), at(2025, 3, 17)),  # Monday 00:00
        ("week", at(2025, 3, 16, 23, 59), at(2025, 3, 10), at(2025, 3, 17)),  # Sunday
        ("week", at(2025, 12, 31, 8), at(2025, 12, 29), at(2026, 1, 5)),
        ("month", at(2025, 3, 14, 15), at(2025, 3, 1), at(2025, 4, 1)),
        ("month", at(2025, 12, 31, 23, 59, 59), at(2025, 12, 1), at(2026, 1, 1)),
        ("month", at(2026, 1, 1), at(2026, 1, 1), at(2026, 2, 1)),
        ("month", at(2024, 2, 29, 12), at(2024, 2, 1), at(2024, 3, 1)),
        ("total", at(2025, 3, 14, 15), at(1970, 1, 1), None),
    ],
)
def test_window_bounds_are_utc_calendar_windows(
    per: str, now: dt.datetime, start: dt.datetime, reset: dt.datetime | None
) -> None:
    assert (start, reset) == window_bounds(per, now)


def test_a_time_in_another_zone_falls_in_its_utc_window() -> None:
    tokyo = dt.timezone(dt.timedelta(hours=9))
    # 2026-01-01 05:00 in Tokyo is 2025-12-31 20:00 UTC: still December, still 2025.
    now = at(2026, 1, 1, 5, tz=tokyo)
    assert (at(2025, 12, 31), at(2026, 1, 1)) == window_bounds("day", now)
    assert (at(2025, 12, 1), at(2026, 1, 1)) == window_bounds("month", now)
    assert UTC == window_bounds("hour", now)[0].tzinfo


@given(
    now=st.datetimes(
        min_value=dt.datetime(1971, 1, 1),  # noqa: DTZ001 (hypothesis wants naive bounds)
        max_value=dt.datetime(2999, 12, 1),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
    per=st.sampled_from(["hour", "day", "week", "month"]),
)
def test_every_instant_lies_in_exactly_one_window(now: dt.datetime, per: str) -> None:
    start, reset = window_bounds(per, now)
    assert reset is not None
    assert start <= now < reset
    assert (start, reset) == window_bounds(per, start)  # the start belongs to its window
    assert window_bounds(per, reset)[0] == reset  # and the next window starts at the reset


def test_run_is_not_a_calendar_window() -> None:
    with pytest.raises(ConfigurationError, match="Unknown budget window 'run'"):
        window_bounds("run", dt.datetime.now(UTC))
