"""Cost per outcome, outcomes, and reports by outcome, hour and tag, checked by hand.

Prices are set per test (USD per million tokens): ``alpha`` input $1, output $2;
``beta`` input $2, output $4. The ledger built by `HandLedger`, each cost worked out next
to the call that makes it:

    support  r1  tenant=acme    alpha 100k in                   0.10  resolved, value 0.50
    support  r2                 alpha 100k in, 25k out = 0.15
                                web_search charge      = 0.05   0.20  resolved, value 0.75
    support  r3  tenant=globex  alpha 300k in, then RuntimeError 0.30  (status error)
    support  r4                 alpha 400k in, then BudgetExceeded 0.40  (budget_exceeded)
    support  r5                 alpha 600k in          = 0.60
               researcher (child of r5): beta 200k in = 0.40   1.00  no outcome
    billing  b1                 beta 50k in                     0.10  rejected
    outside any run:            alpha 10k in                    0.01

So for support: 5 root runs costing 2.00 in all, 2 successes under the default rule (r1,
r2: ended ok with an outcome), **cost per success 2.00 / 2 = 1.00**; per-run costs
0.10 0.20 0.30 0.40 1.00, mean 0.40, nearest-rank p50 0.30 (rank 3 of 5), p90 and p99 1.00
(rank 5); tokens 1,725,000 / 5 = 345,000 per run; calls 7 / 5 = 1.4 per run (r2's charge
and r5's sub-agent call included); outcome values 1.25, margin 1.25 - 2.00 = -0.75.
Under the default rule billing's "rejected" run counts as a success too (it ended ok with
an outcome); naming the success labels (``success="resolved"``) excludes it.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from tokenledger import (
    BudgetExceeded,
    ConfigurationError,
    Ledger,
    Run,
    _outcome_sql,
    economics,
    queries,
)
from tokenledger._writer import BatchWriter
from tokenledger.pricing import PriceBook
from tokenledger.queries import (
    OutcomeEconomics,
    OutcomeRow,
    ReportRow,
    cost_per_outcome,
    cost_per_outcome_by_agent,
    list_calls,
    list_runs,
    nearest_rank,
    outcomes,
    parse_report_by,
    report,
)
from tokenledger.records import CallRecord, RunRecord, new_id

UTC = dt.timezone.utc
D = Decimal


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    with Ledger(db_url, capture=False, price_book=PriceBook(source_map={})) as ledger:
        ledger.set_price("alpha", input_per_million="1", output_per_million="2")
        ledger.set_price("beta", input_per_million="2", output_per_million="4")
        yield ledger


class HandLedger:
    """The runs of the module docstring, by name."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.engine = ledger.engine
        with ledger.run("support", tags={"tenant": "acme"}) as self.r1:
            ledger.record_call("alpha", input_tokens=100_000)
            self.r1.outcome("resolved", value="0.50")
        with ledger.run("support") as self.r2:
            ledger.record_call("alpha", input_tokens=100_000, output_tokens=25_000)
            self.r2.charge("web_search", usd="0.05")
        self.r3 = self._ending_with(RuntimeError("the agent gave up"), tenant="globex")
        self.r4 = self._ending_with(BudgetExceeded("run budget of $0.35 reached"))
        with ledger.run("support") as self.r5:
            ledger.record_call("alpha", input_tokens=600_000)
            with ledger.run("researcher") as self.researcher:
                ledger.record_call("beta", input_tokens=200_000)
        with ledger.run("billing") as self.b1:
            ledger.record_call("beta", input_tokens=50_000)
            self.b1.outcome("rejected")
        ledger.record_call("alpha", input_tokens=10_000)
        assert ledger.flush()
        # Known later, as outcomes often are: recorded after the run has been written.
        ledger.set_outcome(self.r2.id, "resolved", value="0.75")

    def _ending_with(self, error: Exception, **tags: str) -> Run:
        tokens = 300_000 if isinstance(error, RuntimeError) else 400_000
        with pytest.raises(type(error)), self.ledger.run("support", tags=tags) as run:
            self.ledger.record_call("alpha", input_tokens=tokens)
            raise error
        return run


@pytest.fixture
def hand(ledger: Ledger) -> HandLedger:
    return HandLedger(ledger)


def figures(rows: list[ReportRow]) -> list[tuple[Any, ...]]:
    """(key values, runs, calls, cost) of each report row, in order."""
    return [(tuple(row.key.values()), row.runs, row.calls, row.cost_usd) for row in rows]


# -- cost per outcome --------------------------------------------------------------------


def test_cost_per_success_is_the_cost_of_every_run_divided_by_the_successes(
    hand: HandLedger,
) -> None:
    result = cost_per_outcome(hand.engine, agent="support")
    assert (5, 2, D("0.4"), D("2.00"), D("1.00")) == (
        result.runs,
        result.successes,
        result.success_rate,
        result.total_cost_usd,
        result.cost_per_success_usd,
    )


def test_failed_runs_and_runs_without_an_outcome_are_counted(hand: HandLedger) -> None:
    result = cost_per_outcome(hand.engine, agent="support")
    assert (2, 3) == (result.failed_runs, result.runs_without_outcome)


def test_per_run_cost_percentiles_are_nearest_rank(hand: HandLedger) -> None:
    result = cost_per_outcome(hand.engine, agent="support")
    assert (D("0.40"), D("0.30"), D("1.00"), D("1.00")) == (
        result.mean_cost_per_run_usd,
        result.p50_cost_per_run_usd,
        result.p90_cost_per_run_usd,
        result.p99_cost_per_run_usd,
    )


def test_tokens_and_calls_per_run_include_sub_agents_and_tool_charges(hand: HandLedger) -> None:
    result = cost_per_outcome(hand.engine, agent="support")
    assert (D("345000"), D("1.4")) == (result.mean_tokens_per_run, result.mean_calls_per_run)


def test_margin_is_the_outcome_values_minus_the_cost_of_all_runs(hand: HandLedger) -> None:
    result = cost_per_outcome(hand.engine, agent="support")
    assert (D("1.25"), D("-0.75")) == (result.outcome_value_usd, result.margin_usd)


def test_money_stays_decimal(hand: HandLedger) -> None:
    result = cost_per_outcome(hand.engine, agent="support")
    amounts = [
        result.total_cost_usd,
        result.cost_per_success_usd,
        result.mean_cost_per_run_usd,
        result.p50_cost_per_run_usd,
        result.margin_usd,
    ]
    assert all(isinstance(amount, Decimal) for amount in amounts)


def test_without_an_agent_every_root_run_counts_together(hand: HandLedger) -> None:
    result = cost_per_outcome(hand.engine)
    # support's 2.00 and billing's 0.10; billing's "rejected" ended ok: a default success.
    assert (None, 6, 3, D("2.10"), D("0.70")) == (
        result.agent,
        result.runs,
        result.successes,
        result.total_cost_usd,
        result.cost_per_success_usd,
    )


def test_naming_success_labels_counts_only_those_outcomes(hand: HandLedger) -> None:
    default = cost_per_outcome(hand.engine, agent="billing")
    named = cost_per_outcome(hand.engine, agent="billing", success="resolved,accepted")
    assert (1, D("0.10")) == (default.successes, default.cost_per_success_usd)
    assert (0, None, ("resolved", "accepted")) == (
        named.successes,
        named.cost_per_success_usd,
        named.success_labels,
    )


def test_a_named_label_counts_even_on_a_run_that_errored(hand: HandLedger) -> None:
    """The outcome is the business result; the default rule also wants status ok."""
    hand.ledger.set_outcome(hand.r3.id, "resolved")
    assert 2 == cost_per_outcome(hand.engine, agent="support").successes
    assert 3 == cost_per_outcome(hand.engine, agent="support", success=["resolved"]).successes


def test_the_success_rule_is_stated_in_words(hand: HandLedger) -> None:
    assert "a run that ended ok with an outcome recorded (any label)" == (
        cost_per_outcome(hand.engine, agent="support").success_rule
    )
    assert "a run whose outcome is 'resolved' or 'accepted'" == (
        cost_per_outcome(hand.engine, agent="support", success="resolved, accepted").success_rule
    )


def _resolve_elsewhere(url: str, run_id: str) -> None:
    with Ledger(url, capture=False) as other:
        other.set_outcome(run_id, "resolved", value="2.00")


def test_an_outcome_recorded_by_another_process_is_reported(hand: HandLedger, db_url: str) -> None:
    process = multiprocessing.get_context("spawn").Process(
        target=_resolve_elsewhere, args=(db_url, hand.r5.id)
    )
    process.start()
    process.join(60)
    assert 0 == process.exitcode
    result = cost_per_outcome(hand.engine, agent="support")
    # 2.00 / 3 successes, rounded to the ledger's 12 places.
    assert (3, D("0.666666666667"), D("3.25")) == (
        result.successes,
        result.cost_per_success_usd,
        result.outcome_value_usd,
    )
    assert [(None, 2), ("resolved", 3)] == sorted(
        ((row.outcome, row.runs) for row in outcomes(hand.engine, agent="support")),
        key=lambda pair: pair[0] or "",
    )


def test_cost_per_outcome_by_agent_has_a_row_per_agent_costliest_first(hand: HandLedger) -> None:
    rows = cost_per_outcome_by_agent(hand.engine)
    assert [("support", 5, D("1.00")), ("billing", 1, D("0.10"))] == [
        (row.agent, row.runs, row.cost_per_success_usd) for row in rows
    ]
    assert cost_per_outcome(hand.engine, agent="support") == rows[0]


def test_cost_per_outcome_by_agent_of_an_unknown_agent_is_empty(hand: HandLedger) -> None:
    assert [] == cost_per_outcome_by_agent(hand.engine, agent="nobody")


def test_cost_per_outcome_of_an_unknown_agent_is_refused_clearly(hand: HandLedger) -> None:
    with pytest.raises(ConfigurationError, match="no root runs of agent 'nobody'"):
        cost_per_outcome(hand.engine, agent="nobody")


def test_cost_per_outcome_of_an_empty_ledger_is_refused_clearly(ledger: Ledger) -> None:
    with pytest.raises(ConfigurationError, match="no root runs at all"):
        cost_per_outcome(ledger.engine)


def test_the_window_selects_runs_by_when_they_started(hand: HandLedger) -> None:
    later = dt.datetime.now(UTC) + dt.timedelta(hours=1)
    assert 5 == cost_per_outcome(hand.engine, agent="support", since="1h", until=later).runs
    with pytest.raises(ConfigurationError, match="since"):
        cost_per_outcome(hand.engine, agent="support", since=later)


def test_an_empty_success_list_is_refused(hand: HandLedger) -> None:
    with pytest.raises(ConfigurationError, match="`success` is ' , '"):
        cost_per_outcome(hand.engine, success=" , ")


def test_nearest_rank_of_the_hand_computed_costs() -> None:
    """Pure arithmetic, no database: the definition every engine's answer follows."""
    costs = [D("0.10"), D("0.20"), D("0.30"), D("0.40"), D("1.00")]
    assert [D("0.10"), D("0.30"), D("0.40"), D("1.00"), D("1.00")] == [
        nearest_rank(costs, p) for p in (20, 50, 80, 90, 99)
    ]
    hundred = [D(n) for n in range(1, 101)]
    assert [D(50), D(90), D(99), D(100)] == [nearest_rank(hundred, p) for p in (50, 90, 99, 100)]


def test_percentiles_read_from_the_cost_index_match_the_hand_computed_ranks(
    ledger: Ledger,
) -> None:
    """Over an agent's whole history SQLite reads each percentile at its rank in the
    ix_runs_root_cost index; a window fetches and sorts the costs. Both must give the
    nearest rank of the root runs' costs, sub-agent runs of the same name excluded.

    support: 40 root runs costing 0.001 x i (alpha, 1000 x i input tokens) for i = 40..1,
    written out of order, run 7 also holding a "support" sub-agent costing 0.5 (so the
    root costs 0.507 and the sub-agent is not a root run). Sorted: 0.001 .. 0.040 without
    0.007, then 0.507. p50 = rank 20 = 0.021, p90 = rank 36 = 0.037, p99 = rank 40 = 0.507.
    billing: 3 root runs of 0.002, 0.004, 0.006: p50 = rank 2 = 0.004, p90 = p99 = 0.006.
    """
    for i in [*range(40, 0, -2), *range(1, 41, 2)]:
        with ledger.run("support"):
            ledger.record_call("alpha", input_tokens=1000 * i)
            if i == 7:
                with ledger.run("support"):
                    ledger.record_call("alpha", input_tokens=500_000)
    for i in (3, 1, 2):
        with ledger.run("billing"):
            ledger.record_call("alpha", input_tokens=2000 * i)
    assert ledger.flush()
    support = (D("0.021"), D("0.037"), D("0.507"))
    billing = (D("0.004"), D("0.006"), D("0.006"))

    def percentiles(result: OutcomeEconomics) -> tuple[Decimal, ...]:
        return (
            result.p50_cost_per_run_usd,
            result.p90_cost_per_run_usd,
            result.p99_cost_per_run_usd,
        )

    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    sa.event.listen(ledger.engine, "before_cursor_execute", seen)
    try:
        whole = cost_per_outcome(ledger.engine, agent="support")
    finally:
        sa.event.remove(ledger.engine, "before_cursor_execute", seen)
    if ledger.engine.dialect.name == "sqlite":  # the index path was taken: a read per rank
        assert 3 == sum("ORDER BY runs.cost_usd" in statement for statement in statements)
    windowed = cost_per_outcome(ledger.engine, agent="support", since="1h")
    assert (40, support) == (whole.runs, percentiles(whole))
    assert support == percentiles(windowed)
    by_agent = cost_per_outcome_by_agent(ledger.engine)
    assert [("support", support), ("billing", billing)] == [
        (row.agent, percentiles(row)) for row in by_agent
    ]
    assert by_agent == cost_per_outcome_by_agent(ledger.engine, since="1h")
    # All agents pooled: 43 runs. Up to 0.006 there are 9 (support's 6, billing's 3),
    # so support's 0.00k for k >= 8 is at rank k + 2: p50 = rank 22 = 0.020, p90 =
    # rank 39 = 0.037, p99 = rank 43 = 0.507.
    pooled = cost_per_outcome(ledger.engine)
    assert (43, (D("0.020"), D("0.037"), D("0.507"))) == (pooled.runs, percentiles(pooled))


def test_a_percentile_rank_past_the_runs_there_are_is_read_as_missing(ledger: Ledger) -> None:
    """Runs purged between the count and the rank read: the caller falls back to fetching."""
    with ledger.run("support"):
        ledger.record_call("alpha", input_tokens=1000)
    assert ledger.flush()
    with ledger.engine.connect() as connection:
        assert _outcome_sql.costs_at_ranks(connection, "support", 1) is not None
        assert _outcome_sql.costs_at_ranks(connection, "support", 3) is None


def test_a_run_still_running_counts_with_the_calls_it_has_made(ledger: Ledger) -> None:
    """Its row still holds the totals of when it started: its calls are summed instead."""
    with ledger.run("support"):
        ledger.record_call("alpha", input_tokens=100_000)
        ledger.record_call("alpha", input_tokens=200_000)
        assert ledger.flush()
        result = cost_per_outcome(ledger.engine)
        rows = report(ledger.engine, by=["agent", "status"])
        [row] = outcomes(ledger.engine)
    assert (1, D("0.30"), D("0.30"), D("300000"), D("2")) == (
        result.runs,
        result.total_cost_usd,
        result.p50_cost_per_run_usd,
        result.mean_tokens_per_run,
        result.mean_calls_per_run,
    )
    assert [(("support", "running"), 1, 2, D("0.30"))] == figures(rows)
    assert D("0.30") == row.cost_usd


# -- outcomes ----------------------------------------------------------------------------


def test_outcomes_count_runs_and_values_per_agent_and_label(hand: HandLedger) -> None:
    assert [
        OutcomeRow("billing", "rejected", 1, D("1"), 0, None, D("0.10")),
        OutcomeRow("support", None, 3, D("0.6"), 0, None, D("1.70")),
        OutcomeRow("support", "resolved", 2, D("0.4"), 2, D("1.25"), D("0.30")),
    ] == outcomes(hand.engine)


def test_outcomes_of_sub_agents_appear_when_asked(hand: HandLedger) -> None:
    rows = outcomes(hand.engine, root_only=False, agent="researcher")
    assert [("researcher", None, 1, D("0.40"))] == [
        (row.agent, row.outcome, row.runs, row.cost_usd) for row in rows
    ]


def test_outcomes_of_an_empty_ledger_are_empty(ledger: Ledger) -> None:
    assert [] == outcomes(ledger.engine)


# -- report by outcome, hour and tag -----------------------------------------------------


def test_report_by_outcome_uses_the_root_runs_outcome(hand: HandLedger) -> None:
    assert [
        # r3, r4, r5 (with its sub-agent's call), and the call outside any run
        ((None,), 3, 5, D("1.71")),
        (("resolved",), 2, 3, D("0.30")),  # r1, r2 and r2's charge
        (("rejected",), 1, 1, D("0.10")),
    ] == figures(report(hand.engine, by=["outcome"]))


def test_report_by_model_shows_a_tool_charge_as_its_tool(hand: HandLedger) -> None:
    assert [
        (("alpha",), 5, 6, D("1.56")),
        (("beta",), 2, 2, D("0.50")),
        (("tool:web_search",), 1, 1, D("0.05")),
    ] == figures(report(hand.engine, by="model"))


def test_report_totals_include_tool_charges(hand: HandLedger) -> None:
    for by in (["agent"], ["model"], ["outcome"], ["hour"], ["tag:tenant"]):
        assert D("2.11") == sum((row.cost_usd for row in report(hand.engine, by=by)), D(0)), by


def test_report_by_tag_groups_runs_by_the_tag_value(hand: HandLedger) -> None:
    rows = report(hand.engine, by=["agent", "tag:tenant"])
    assert [
        (("support", None), 3, 5, D("1.60")),
        (("support", "globex"), 1, 1, D("0.30")),
        (("billing", None), 1, 1, D("0.10")),
        (("support", "acme"), 1, 1, D("0.10")),
        ((None, None), 0, 1, D("0.01")),
    ] == figures(rows)
    assert {"agent": "support", "tag:tenant": "globex"} == rows[1].key


def test_report_by_a_tag_of_sub_agents_uses_the_run_that_made_the_call(
    hand: HandLedger,
) -> None:
    rows = report(hand.engine, by=["tag:tenant"], root_only=False, since="1h")
    assert D("2.11") == sum((row.cost_usd for row in rows), D(0))


def _write_old_run(engine: sa.Engine, started: dt.datetime, cost: str, tags: dict[str, str]) -> str:
    """A root run with one call, written through the real batch writer."""
    run_id = new_id()
    run = RunRecord(id=run_id, name="support", parent_id=None, root_id=run_id, tags=tags,
                    started_at=started, ended_at=started + dt.timedelta(seconds=20),
                    status="ok", calls=1, input_tokens=1000, cost_usd=D(cost))  # fmt: skip
    call = CallRecord(id=new_id(), run_id=run_id, root_run_id=run_id, operation="chat",
                      provider="openai", requested_model="alpha", model="alpha",
                      started_at=started + dt.timedelta(seconds=5), input_tokens=1000,
                      cost_usd=D(cost), cost_source="local")  # fmt: skip
    writer = BatchWriter(engine)
    try:
        writer.put_run(run)
        writer.put_call(call)
        assert writer.flush()
    finally:
        writer.close()
    return run_id


def test_report_by_hour_groups_by_the_utc_hour_the_run_started(hand: HandLedger) -> None:
    _write_old_run(hand.engine, dt.datetime(2025, 1, 2, 23, 59, 50, tzinfo=UTC), "0.5", {})
    _write_old_run(hand.engine, dt.datetime(2025, 1, 3, 0, 0, 1, tzinfo=UTC), "0.25", {})
    rows = report(hand.engine, by=["hour"], until="2025-01-04")
    assert [(("2025-01-02 23:00",), 1, 1, D("0.5")), (("2025-01-03 00:00",), 1, 1, D("0.25"))] == (
        figures(rows)
    )


def test_report_by_day_and_hour_and_since_until(hand: HandLedger) -> None:
    _write_old_run(hand.engine, dt.datetime(2025, 1, 2, 23, 30, tzinfo=UTC), "0.5", {})
    rows = report(hand.engine, by=["day", "hour"], since="2025-01-02", until="2025-01-03")
    assert [(("2025-01-02", "2025-01-02 23:00"), 1, 1, D("0.5"))] == figures(rows)
    assert D("2.11") == sum(
        (row.cost_usd for row in report(hand.engine, by="hour", since="1d")), D(0)
    )


def test_report_until_before_since_is_refused(hand: HandLedger) -> None:
    with pytest.raises(ConfigurationError, match=r"`until` .* is before `since`"):
        report(hand.engine, since="2025-02-01", until="2025-01-01")


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        ("agent,tag:tenant", ("agent", "tag:tenant")),
        (["TAG:Tenant"], ("tag:Tenant",)),  # the key keeps its case
        (["tag:a,b"], ("tag:a,b",)),  # a sequence may carry commas inside a key
        ("Hour, OUTCOME", ("hour", "outcome")),
    ],
)
def test_parse_report_by_reads_tag_keys_verbatim(by: Any, expected: tuple[str, ...]) -> None:
    assert expected == parse_report_by(by)


def test_parse_report_by_wants_a_key_after_tag() -> None:
    with pytest.raises(ConfigurationError, match="names no tag key; write tag:KEY"):
        parse_report_by("agent,tag:")


# -- runs and calls carry outcomes and tools ---------------------------------------------


def test_list_runs_returns_outcomes(hand: HandLedger) -> None:
    [r2] = [run for run in list_runs(hand.engine, limit=0) if run.id == hand.r2.id]
    assert ("resolved", D("0.75")) == (r2.outcome, r2.outcome_value)
    assert r2.outcome_at is not None
    assert r2.outcome_at.tzinfo is not None


def test_list_calls_returns_the_tool_a_charge_paid_for(hand: HandLedger) -> None:
    tools = [call for call in list_calls(hand.engine, limit=0) if call.operation == "execute_tool"]
    assert [("web_search", D("0.05"), None)] == [(c.tool_name, c.cost_usd, c.model) for c in tools]


def test_list_runs_until_excludes_later_runs(hand: HandLedger) -> None:
    assert [] == list_runs(hand.engine, until="2000-01-01")


# -- hostile input -----------------------------------------------------------------------

HOSTILE = [
    "'; DROP TABLE runs; --",
    "$(rm -rf /)",
    'a"b',
    "a\\b",
    "x.y[0]",
    "%(key)s",
    ":key",
    "ünï",
    "' OR '1'='1",
]
HOSTILE_NAME = "'); DELETE FROM calls; --"


@pytest.fixture
def hostile(ledger: Ledger) -> Ledger:
    """Two runs of an agent whose name, tags and outcome are SQL and shell fragments."""
    tags = {key: f"{key}={value}" for key, value in zip(HOSTILE, reversed(HOSTILE), strict=True)}
    with ledger.run(HOSTILE_NAME, tags=tags) as run:
        ledger.record_call("alpha", input_tokens=100_000)
        run.outcome("$(rm -rf /)", value="1.00")
    with ledger.run(HOSTILE_NAME, tags={HOSTILE[0]: "other"}):
        ledger.record_call("alpha", input_tokens=200_000)
    assert ledger.flush()
    return ledger


def _query_paths(ledger: Ledger) -> dict[str, Callable[[], Any]]:
    engine = ledger.engine
    paths: dict[str, Callable[[], Any]] = {
        f"report tag:{key}": (lambda key=key: report(engine, by=["agent", f"tag:{key}"]))
        for key in HOSTILE
    }
    paths.update(
        {
            "list_runs": lambda: list_runs(engine, agent=HOSTILE_NAME, since="1h"),
            "list_calls": lambda: list_calls(engine, model=HOSTILE[0]),
            "cost_per_outcome": lambda: cost_per_outcome(
                engine, agent=HOSTILE_NAME, success=HOSTILE
            ),
            "cost_per_outcome_by_agent": lambda: cost_per_outcome_by_agent(
                engine, agent=HOSTILE_NAME, success=[HOSTILE[1]]
            ),
            "outcomes": lambda: outcomes(engine, agent=HOSTILE_NAME),
            "forecast": lambda: economics.forecast(
                engine, runs_per_day=10, agent=HOSTILE_NAME, success=HOSTILE
            ),
            "reprice": lambda: economics.reprice(engine, price_drop="2x", agent=HOSTILE_NAME),
            "break_even": lambda: economics.break_even(
                engine, revenue_per_success="1", agent=HOSTILE_NAME, success=[HOSTILE[1]]
            ),
        }
    )
    return paths


def _answers(results: dict[str, Any]) -> dict[str, Any]:
    """The figure each path must get right."""
    answers: dict[str, Any] = {}
    for name, result in results.items():
        if name.startswith("report tag:"):
            answers[name] = sorted(
                (row.key[name[len("report ") :]] or "", row.cost_usd) for row in result
            )
        elif name in ("list_runs", "list_calls", "outcomes"):
            answers[name] = len(result)
        elif name == "cost_per_outcome_by_agent":
            answers[name] = [(row.agent, row.successes) for row in result]
        elif isinstance(result, OutcomeEconomics):
            answers[name] = (result.runs, result.successes, result.total_cost_usd)
        elif isinstance(result, economics.Forecast):
            answers[name] = result.daily_cost_usd
        elif isinstance(result, economics.Repricing):
            answers[name] = result.estimated_total_usd
        else:
            answers[name] = (result.successes, result.margin_usd)
    return answers


def test_hostile_names_tags_and_labels_are_data_in_every_query(hostile: Ledger) -> None:
    results = {name: query() for name, query in _query_paths(hostile).items()}
    expected: dict[str, Any] = {
        f"report tag:{key}": sorted(
            [(f"{key}={value}", D("0.1")), ("other" if key == HOSTILE[0] else "", D("0.2"))]
        )
        for key, value in zip(HOSTILE, reversed(HOSTILE), strict=True)
    }
    expected.update(
        {
            "list_runs": 2,
            "list_calls": 0,
            "cost_per_outcome": (2, 1, D("0.3")),
            "cost_per_outcome_by_agent": [(HOSTILE_NAME, 1)],
            "outcomes": 2,
            "forecast": D("1.5"),  # mean 0.15 x 10
            "reprice": D("0.15"),  # 0.30 / 2
            "break_even": (1, D("0.7")),  # 1 x 1.00 - 0.30
        }
    )
    assert expected == _answers(results)
    with hostile.engine.connect() as connection:
        tables = set(sa.inspect(connection).get_table_names())
        held = queries.counts(hostile.engine)
    assert {"runs", "calls", "prices"} <= tables
    assert (2, 2) == (held.runs, held.calls)
