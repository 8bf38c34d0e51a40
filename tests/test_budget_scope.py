"""Which budgets apply to a call (scopes: global, agent, tags) and what a call is
estimated at before it is sent (`tokenledger._budget_scope`).

Calls go through real litellm with ``mock_response=`` (offline); the figures they assume
are explained in `budget_calls`.
"""

from __future__ import annotations

from decimal import Decimal

import litellm
import pytest
from budget_calls import (
    MESSAGES,
    MINI_CALL,
    PROMPT_TOKENS,
    SentRequests,
    ask,
    only_budget,
    sent_fixture,  # noqa: F401  (the `sent` fixture)
)
from helpers import runs_by_name

from tokenledger import BudgetExceeded, Ledger


def test_the_prompt_counts_the_tokens_the_figures_assume() -> None:
    assert PROMPT_TOKENS == litellm.token_counter(model="gpt-4o-mini", messages=MESSAGES)


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


# -- estimates ---------------------------------------------------------------------------


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


def test_with_max_tokens_a_call_never_overshoots(ledger: Ledger) -> None:
    ledger.set_budget("global", usd="1")
    with ledger.run("r"):
        for max_tokens in (1, 20, 300):
            ask(max_tokens=max_tokens)  # each uses all of its max_tokens
    assert Decimal(0) == only_budget(ledger).overshoot_usd
