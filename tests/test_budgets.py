"""Budgets: defined in the ledger, reserved before each call, settled after it.

Every call goes through real litellm with ``mock_response=`` (offline). Prices are
litellm's bundled map: gpt-4o-mini $0.15 / $0.60 per million input / output tokens,
gpt-4o $2.50 / $10. ``MESSAGES`` counts 16 input tokens, so a gpt-4o-mini call with
``max_tokens=50`` is estimated at 16 x 0.15/M + 50 x 0.60/M = $0.0000324; `ask()` makes
calls whose usage is exactly that, so cost equals estimate and the arithmetic is exact.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import threading
import time
import warnings
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import litellm
import pytest
from helpers import calls_of, rows, runs_by_name
from hypothesis import given
from hypothesis import strategies as st
from litellm.integrations.custom_logger import CustomLogger
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tokenledger import (
    Budget,
    BudgetExceeded,
    BudgetStatus,
    BudgetWarning,
    ConfigurationError,
    Ledger,
    LedgerError,
)
from tokenledger.budgets import window_bounds
from tokenledger.testing import mock_response

MESSAGES = [{"role": "user", "content": "Summarise the ticket in one line."}]
PROMPT_TOKENS = 16  # litellm.token_counter(model="gpt-4o-mini", messages=MESSAGES)
MINI_CALL = Decimal("0.0000324")  # 16 x $0.15/M + 50 x $0.60/M
GPT4O_CALL = Decimal("0.00054")  # 16 x $2.50/M + 50 x $10/M
UTC = dt.timezone.utc


def ask(model: str = "gpt-4o-mini", *, max_tokens: int | None = 50, **kwargs: Any) -> Any:
    """A call that uses exactly what it reserves: 16 tokens in, ``max_tokens`` out."""
    kwargs.setdefault(
        "mock_response",
        mock_response(prompt_tokens=PROMPT_TOKENS, completion_tokens=max_tokens or 20),
    )
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    return litellm.completion(model=model, messages=MESSAGES, **kwargs)


async def aask(model: str = "gpt-4o-mini", *, max_tokens: int = 50, **kwargs: Any) -> Any:
    kwargs.setdefault(
        "mock_response", mock_response(prompt_tokens=PROMPT_TOKENS, completion_tokens=max_tokens)
    )
    return await litellm.acompletion(
        model=model, messages=MESSAGES, max_tokens=max_tokens, **kwargs
    )


class SentRequests(CustomLogger):
    """Counts the requests litellm actually starts (``log_pre_api_call``)."""

    def __init__(self) -> None:
        super().__init__()
        self.models: list[str] = []

    def log_pre_api_call(self, model: Any, messages: Any, kwargs: Any) -> None:
        self.models.append(model)


# litellm copies a logger in `litellm.callbacks` into its other callback lists on the
# next call, and sets up the callbacks it finds only once: restore every list afterwards,
# or the user callbacks of later tests stop firing.
_CALLBACK_LISTS = (
    "callbacks",
    "input_callback",
    "success_callback",
    "failure_callback",
    "_async_input_callback",
    "_async_success_callback",
    "_async_failure_callback",
)


@pytest.fixture
def sent() -> Iterator[SentRequests]:
    import litellm.utils

    saved = {name: list(getattr(litellm, name)) for name in _CALLBACK_LISTS}
    saved_setup = list(litellm.utils.callback_list)
    spy = SentRequests()
    litellm.callbacks.append(spy)
    try:
        yield spy
    finally:
        for name, callbacks in saved.items():
            getattr(litellm, name)[:] = callbacks
        litellm.utils.callback_list = saved_setup


def only_budget(ledger: Ledger) -> BudgetStatus:
    (status,) = ledger.budgets()
    return status


def recorded_cost(ledger: Ledger) -> Decimal:
    ledger.flush()
    return sum((c["cost_usd"] for c in calls_of(ledger)), Decimal(0))


def calls_until_refused(limit: int = 100) -> tuple[int, BudgetExceeded]:
    """Make calls until one is refused: how many went through, and the refusal."""
    for made in range(limit):
        try:
            ask()
        except BudgetExceeded as exc:
            return made, exc
    raise AssertionError(f"no call was refused in {limit}")


def test_the_prompt_counts_the_tokens_the_figures_assume() -> None:
    assert PROMPT_TOKENS == litellm.token_counter(model="gpt-4o-mini", messages=MESSAGES)


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


# -- scopes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "tags"),
    [
        ("global", {}),
        ("user:42", {"user": "42"}),
        ("tenant:acme", {"tenant": "acme", "user": "7"}),
        ("team:search", {"team": "search"}),
        ("user:a:b", {"user": "a:b"}),
    ],
)
def test_a_budget_applies_to_runs_tagged_with_its_scope(
    ledger: Ledger, sent: SentRequests, scope: str, tags: dict[str, str]
) -> None:
    ledger.set_budget(scope, usd="0.00001")
    with pytest.raises(BudgetExceeded, match=f"Budget `{scope}`"), ledger.run("r", tags=tags):
        ask()
    assert [] == sent.models


def test_a_budget_for_another_user_does_not_apply(ledger: Ledger) -> None:
    ledger.set_budget("user:43", usd="0.00001")
    ledger.set_budget("tenant:other", usd="0.00001")
    with ledger.run("r", tags={"user": "42", "tenant": "acme"}) as run:
        ask()
    assert ("ok", MINI_CALL) == (run.status, run.cost_usd)
    assert [Decimal(0), Decimal(0)] == [b.spent_usd for b in ledger.budgets()]


def test_a_sub_run_inherits_the_tags_its_budgets_apply_by(ledger: Ledger) -> None:
    ledger.set_budget("user:42", usd="0.00001")
    with (
        pytest.raises(BudgetExceeded, match="Budget `user:42`"),
        ledger.run("planner", tags={"user": "42"}),
        ledger.run("researcher") as child,
    ):
        ask()
    assert "budget_exceeded" == child.status


def test_an_agent_budget_applies_to_that_agent_only(ledger: Ledger) -> None:
    ledger.set_budget("agent:triage", usd="0.00001")
    with ledger.run("billing") as other:
        ask()
    with pytest.raises(BudgetExceeded, match="Budget `agent:triage`"), ledger.run("triage"):
        ask()
    assert "ok" == other.status


def test_an_agent_budget_applies_to_the_runs_it_starts(ledger: Ledger) -> None:
    ledger.set_budget("agent:planner", usd=MINI_CALL, per="hour")

    @ledger.agent("researcher")
    def research() -> None:
        ask()

    with (
        pytest.raises(BudgetExceeded, match="Budget `agent:planner` \\(hour\\)"),
        ledger.run("planner") as planner,
    ):
        ask()
        research()
    ledger.flush()
    stored = runs_by_name(ledger)
    assert ("budget_exceeded", "budget_exceeded", 1) == (
        stored["planner"]["status"],
        stored["researcher"]["status"],
        planner.calls,
    )


def test_a_global_budget_also_covers_calls_made_outside_runs(
    ledger: Ledger, sent: SentRequests
) -> None:
    ledger.set_budget("global", usd="0.00001")
    with pytest.raises(BudgetExceeded):
        ask()
    assert [] == sent.models


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


# -- estimates -----------------------------------------------------------------------------


def test_without_max_tokens_the_estimate_uses_the_models_output_limit(
    ledger: Ledger, sent: SentRequests
) -> None:
    # gpt-4o-mini may write 16,384 tokens: 16 x 0.15/M + 16384 x 0.60/M = $0.0098328
    ledger.set_budget("global", usd="0.009")
    with pytest.raises(BudgetExceeded) as refused, ledger.run("r"):
        ask(max_tokens=None)
    assert "estimated at $0.009833 (16,400 tokens)" in str(refused.value)
    with ledger.run("bounded"):
        ask(max_tokens=50)
    assert ["gpt-4o-mini"] == sent.models


def test_without_a_known_output_limit_the_estimate_uses_the_configured_default(
    db_url: str,
) -> None:
    with Ledger(db_url, default_max_output_tokens=100) as ledger:
        ledger.set_price("acme-private-1", input_per_million="2", output_per_million="8")
        ledger.set_budget("global", usd="0.0001")
        # 16 x 2/M + 100 x 8/M = $0.000832
        with (
            pytest.raises(BudgetExceeded, match=r"estimated at \$0.000832 \(116 tokens\)"),
            ledger.run("r"),
        ):
            ask("openai/acme-private-1", max_tokens=None)


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


def test_with_max_tokens_a_call_never_overshoots(ledger: Ledger) -> None:
    ledger.set_budget("global", usd="1")
    with ledger.run("r"):
        for max_tokens in (1, 20, 300):
            ask(max_tokens=max_tokens)  # each uses all of its max_tokens
    assert Decimal(0) == only_budget(ledger).overshoot_usd


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


def test_recorded_calls_and_charges_count_against_budgets(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", usd="1", per="day")
    with ledger.run("r", tags={"tenant": "acme"}) as run:
        ledger.record_call("gpt-4o-mini", input_tokens=1000, output_tokens=1000)
        run.charge("web_search", usd="0.25")
    (status,) = ledger.budgets()
    # 1000 x $0.15/M + 1000 x $0.60/M + $0.25
    assert Decimal("0.25075") == status.spent_usd
