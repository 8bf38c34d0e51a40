"""The offline demo: real litellm calls with ``mock_response=``, recorded and priced."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from helpers import calls_of, rows

from tokenledger import ConfigurationError, Ledger
from tokenledger._demo import (
    AGENT_NAME,
    DEMO_TAGS,
    MODELS,
    SUB_AGENT_NAME,
    DemoSummary,
    run_demo,
)
from tokenledger.queries import report


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    with Ledger(db_url) as ledger:
        yield ledger


@pytest.fixture
def demo(ledger: Ledger) -> DemoSummary:
    return run_demo(ledger)


def roots(ledger: Ledger) -> list[dict[str, Any]]:
    return [run for run in rows(ledger, "runs") if run["parent_id"] is None]


def test_demo_records_twenty_tagged_root_runs_with_researcher_sub_runs(
    ledger: Ledger, demo: DemoSummary
) -> None:
    root_runs = roots(ledger)
    assert 20 == demo.runs == len(root_runs)
    assert {AGENT_NAME} == {run["name"] for run in root_runs}
    assert all({"tenant", "user", "channel"} <= set(run["tags"]) for run in root_runs)
    assert {"ok"} == {run["status"] for run in root_runs}
    subs = [run for run in rows(ledger, "runs") if run["parent_id"] is not None]
    assert demo.sub_runs == len(subs)
    assert {SUB_AGENT_NAME} == {run["name"] for run in subs}
    assert {run["parent_id"] for run in subs} <= {run["id"] for run in root_runs}


def test_demo_calls_several_models_and_every_call_is_priced(
    ledger: Ledger, demo: DemoSummary
) -> None:
    calls = calls_of(ledger)
    assert demo.calls == len(calls)
    assert set(MODELS.values()) == {call["requested_model"] for call in calls}
    assert {"openai", "anthropic"} == {call["provider"] for call in calls}
    assert {"chat", "embeddings"} == {call["operation"] for call in calls}
    assert [] == [call for call in calls if call["cost_usd"] is None]
    assert 0 == sum(row.unpriced_calls for row in report(ledger.engine, by=["model"]))


def test_demo_has_one_rate_limited_call_retried_on_another_model(
    ledger: Ledger, demo: DemoSummary
) -> None:
    calls = calls_of(ledger)
    [failed] = [call for call in calls if call["status"] != "ok"]
    assert ("error", "RateLimitError", MODELS["tools"]) == (
        failed["status"],
        failed["error_type"],
        failed["requested_model"],
    )
    retry = [
        call
        for call in calls
        if call["run_id"] == failed["run_id"] and call["requested_model"] == MODELS["fallback"]
    ]
    assert 1 == len(retry)
    assert 1 == demo.failed_calls


def test_demo_streams_caches_and_reasons(ledger: Ledger, demo: DemoSummary) -> None:
    calls = calls_of(ledger)
    streamed = [call for call in calls if call["streamed"]]
    assert 20 == len(streamed)
    assert {("ok", False)} == {(c["status"], c["usage_estimated"]) for c in streamed}
    planner = [c for c in calls if c["requested_model"] == MODELS["planner"]]
    assert sum(c["cache_read_tokens"] for c in planner) > 0  # OpenAI cached_tokens
    researcher = [c for c in calls if c["requested_model"] == MODELS["researcher"]]
    assert sum(c["cache_write_tokens"] for c in researcher) > 0  # Anthropic cache write
    assert sum(c["cache_read_tokens"] for c in researcher) > 0  # ...and reads
    policy = [c for c in calls if c["requested_model"] == MODELS["policy"]]
    assert policy
    assert all(0 < c["reasoning_tokens"] < c["output_tokens"] for c in policy)


def test_demo_token_counts_are_realistic(ledger: Ledger, demo: DemoSummary) -> None:
    chats = [c for c in calls_of(ledger) if c["operation"] == "chat" and c["status"] == "ok"]
    assert all(300 <= c["input_tokens"] <= 5_000 for c in chats)
    assert all(40 <= c["output_tokens"] <= 2_000 for c in chats)


def test_demo_total_is_the_sum_of_its_call_costs(ledger: Ledger, demo: DemoSummary) -> None:
    call_costs = sum((call["cost_usd"] for call in calls_of(ledger)), Decimal(0))
    root_costs = sum((run["cost_usd"] for run in roots(ledger)), Decimal(0))
    by_agent = sum((row.cost_usd for row in report(ledger.engine)), Decimal(0))
    assert demo.cost_usd == call_costs == root_costs == by_agent
    assert Decimal("0.05") < demo.cost_usd < Decimal("5")


def test_demo_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    def tokens(seed: int, name: str) -> list[tuple[Any, ...]]:
        with Ledger(f"sqlite:///{tmp_path / name}") as ledger:
            run_demo(ledger, runs=5, seed=seed)
            calls = sorted(calls_of(ledger), key=lambda call: call["id"])
        return [
            (c["requested_model"], c["input_tokens"], c["output_tokens"], c["cost_usd"])
            for c in calls
        ]

    assert tokens(7, "a.db") == tokens(7, "b.db")
    assert tokens(7, "a.db") != tokens(8, "c.db")


def test_demo_sends_nothing_over_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect = socket.socket.connect

    def local_only(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost") and not str(host).startswith("/"):
            raise AssertionError(f"the demo tried to connect to {address!r}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    with Ledger(f"sqlite:///{tmp_path / 'offline.db'}") as ledger:
        summary = run_demo(ledger, runs=3)
    assert 3 == summary.runs


@pytest.mark.parametrize("runs", [0, -1, True, 2.5])
def test_run_demo_rejects_a_bad_run_count(tmp_path: Path, runs: Any) -> None:
    with (
        Ledger(f"sqlite:///{tmp_path / 'x.db'}") as ledger,
        pytest.raises(ConfigurationError, match="`runs` is"),
    ):
        run_demo(ledger, runs=runs)


def test_every_demo_run_is_tagged_as_the_demo(ledger: Ledger, demo: DemoSummary) -> None:
    assert all(DEMO_TAGS.items() <= run["tags"].items() for run in rows(ledger, "runs"))


def test_demo_root_runs_record_outcomes(ledger: Ledger, demo: DemoSummary) -> None:
    outcomes = [(run["outcome"], run["outcome_value"]) for run in roots(ledger)]
    resolved = [value for label, value in outcomes if label == "resolved"]
    assert 0 < len(resolved) < len(outcomes)
    assert {Decimal("4.00")} == set(resolved)
    assert {("escalated", None)} == {o for o in outcomes if o[0] != "resolved"}
