"""Outcomes on runs (now, from the decorator, later from another process) and tool charges."""

from __future__ import annotations

import multiprocessing
from decimal import Decimal

import litellm
import pytest
from helpers import calls_of, runs_by_name
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tokenledger import ConfigurationError, Ledger
from tokenledger import semconv as sc

MESSAGES = [{"role": "user", "content": "hi"}]


def test_an_outcome_set_inside_the_run_is_stored(ledger: Ledger) -> None:
    with ledger.run("triage") as run:
        run.outcome("resolved", value="4.00")
    ledger.flush()
    stored = runs_by_name(ledger)["triage"]
    assert ("resolved", Decimal("4.00")) == (stored["outcome"], stored["outcome_value"])
    assert stored["outcome_at"] is not None


def test_the_decorator_maps_the_return_value_to_an_outcome(ledger: Ledger) -> None:
    @ledger.agent("answer", outcome=lambda ok: ("accepted", "1.50") if ok else "rejected")
    def answer(ok: bool) -> bool:
        return ok

    assert answer(True) is True
    assert answer(False) is False
    ledger.flush()
    from helpers import rows

    got = sorted((r["outcome"], r["outcome_value"]) for r in rows(ledger, "runs"))
    assert [("accepted", Decimal("1.50")), ("rejected", None)] == got


async def test_an_async_agent_gets_its_outcome(ledger: Ledger) -> None:
    @ledger.agent("async-answer", outcome=lambda r: "done")
    async def answer() -> str:
        return "x"

    await answer()
    ledger.flush()
    assert "done" == runs_by_name(ledger)["async-answer"]["outcome"]


def _set_outcome_elsewhere(url: str, run_id: str) -> None:
    with Ledger(url, capture=False) as other:
        other.set_outcome(run_id, "ticket_closed", value="12")


@pytest.mark.slow
def test_an_outcome_set_later_from_another_process_survives_a_rewrite(
    ledger: Ledger, db_url: str
) -> None:
    with ledger.run("support") as run:
        ledger.record_call("gpt-4o-mini", input_tokens=10, output_tokens=5)
    ledger.flush()
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_set_outcome_elsewhere, args=(db_url, run.id))
    proc.start()
    proc.join(60)
    assert 0 == proc.exitcode
    # A late update of the run in this process (a stream finishing after its run) rewrites
    # the row; the outcome recorded elsewhere must survive it.
    ledger.recorder.put_run(run.snapshot())
    ledger.flush()
    stored = runs_by_name(ledger)["support"]
    assert ("ticket_closed", Decimal("12")) == (stored["outcome"], stored["outcome_value"])


def test_set_outcome_on_an_unknown_run_says_so(ledger: Ledger) -> None:
    with pytest.raises(ConfigurationError, match="No run with id 'nope' is in the ledger"):
        ledger.set_outcome("nope", "resolved")


@pytest.mark.parametrize(
    ("label", "value", "message"),
    [
        ("", None, "Outcome '' is invalid"),
        ("x" * 201, None, "Outcome 'xxx"),
        ("ok", -1, "must be an amount of US dollars from 0"),
        ("ok", 1.5, "give an amount of US dollars as a string or Decimal"),
        ("ok", "NaN", "must be an amount of US dollars from 0"),
        ("ok", "abc", "must be an amount of US dollars from 0"),
    ],
)
def test_bad_outcomes_get_a_clear_error(
    ledger: Ledger, label: str, value: object, message: str
) -> None:
    with ledger.run("r") as run, pytest.raises(ConfigurationError, match=message):
        run.outcome(label, value)


def test_a_charge_is_a_tool_row_counted_in_the_run(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    with ledger.run("research") as run:
        litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="x")
        run.charge("web_search", usd="0.005")
    # 10 x $0.15/M + 20 x $0.60/M for the model call, plus the search
    assert Decimal("0.0050135") == run.cost_usd
    assert 2 == run.calls
    ledger.flush()
    (tool,) = [c for c in calls_of(ledger) if c["operation"] == "execute_tool"]
    assert ("web_search", Decimal("0.005"), "charge", None) == (
        tool["tool_name"],
        tool["cost_usd"],
        tool["cost_source"],
        tool["requested_model"],
    )
    spans = {s.name: s for s in span_exporter.get_finished_spans()}
    assert "web_search" == spans["execute_tool web_search"].attributes[sc.GEN_AI_TOOL_NAME]
    assert Decimal("0.0050135") == runs_by_name(ledger)["research"]["cost_usd"]


def test_a_bad_charge_gets_a_clear_error(ledger: Ledger) -> None:
    with ledger.run("r") as run:
        with pytest.raises(ConfigurationError, match="Charge `x` has `usd`=-1"):
            run.charge("x", usd=-1)
        with pytest.raises(ConfigurationError, match="Charge name '' is invalid"):
            run.charge("", usd="1")


def test_the_ledger_reports_and_prices_outcomes_directly(ledger: Ledger) -> None:
    for ok in (True, True, False):
        with ledger.run("triage") as run:
            ledger.record_call("gpt-4o-mini", input_tokens=1000, output_tokens=1000)
            run.outcome("resolved" if ok else "escalated")
    (row,) = ledger.report(by=["agent"], since="7d")
    economics = ledger.cost_per_outcome(agent="triage", success=["resolved"])
    # 3 runs x (1000 x $0.15/M + 1000 x $0.60/M) over 2 successes
    assert Decimal("0.00225") == row.cost_usd
    assert (3, 2, Decimal("0.001125")) == (
        economics.runs,
        economics.successes,
        economics.cost_per_success_usd,
    )
