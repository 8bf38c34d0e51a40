"""The read API: runs, calls and reports, checked against figures computed by hand.

Prices are set per test (USD per million tokens), so the figures do not depend on
litellm's map:

* ``alpha``: input $1, output $2, cache reads $0.50;
* ``beta``: input $3, output $15;
* ``mystery``: no price at all.

The ledger built by ``book`` (each cost worked out next to the call that makes it):

    triage   (root A, tenant acme)
      alpha  1000 in, 100 out                          0.001 + 0.0002        = 0.0012
      researcher (child of A)
        beta 2000 in, 500 out                          0.006 + 0.0075        = 0.0135
      mystery 50 in, 5 out                             unpriced
    triage   (root B, fails with RuntimeError)
      alpha  3000 in (2000 cached), 200 out            0.001 + 0.001 + 0.0004 = 0.0024
      alpha  failed, no tokens                                                 0
    billing  (root C)
      beta   100 in, 10 out                            0.0003 + 0.00015      = 0.00045
    idle     (root D, no calls)
    outside any run:
      alpha  10 in, 10 out                             0.00001 + 0.00002     = 0.00003

Total: 0.01758.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from tokenledger import ConfigurationError, Ledger, queries
from tokenledger import _storage as storage
from tokenledger.pricing import PriceBook
from tokenledger.queries import ReportRow, list_calls, list_runs, parse_since, report
from tokenledger.records import CallRecord, RunRecord

pytestmark = pytest.mark.filterwarnings("ignore::tokenledger.exceptions.UnpricedModelWarning")

UTC = dt.timezone.utc
TOTAL = Decimal("0.01758")


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    book = PriceBook(source_map={})
    with Ledger(db_url, capture=False, price_book=book) as ledger:
        ledger.set_price("alpha", input_per_million="1", output_per_million="2",
                         cache_read_per_million="0.50")  # fmt: skip
        ledger.set_price("beta", input_per_million="3", output_per_million="15")
        yield ledger


class Book:
    """The runs of the module docstring's ledger, by letter."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.engine = ledger.engine
        with ledger.run("triage", tags={"tenant": "acme"}) as self.a:
            ledger.record_call("alpha", input_tokens=1000, output_tokens=100)
            with ledger.run("researcher") as self.researcher:
                ledger.record_call("beta", input_tokens=2000, output_tokens=500)
            ledger.record_call("mystery", input_tokens=50, output_tokens=5)
        with pytest.raises(RuntimeError, match="gave up"):
            self.failing_triage()
        with ledger.run("billing") as self.c:
            ledger.record_call("beta", input_tokens=100, output_tokens=10)
        with ledger.run("idle") as self.d:
            pass
        ledger.record_call("alpha", input_tokens=10, output_tokens=10)
        assert ledger.flush()

    def failing_triage(self) -> None:
        with self.ledger.run("triage") as self.b:
            self.ledger.record_call(
                "alpha", input_tokens=3000, cache_read_tokens=2000, output_tokens=200
            )
            self.ledger.record_call("alpha", status="error", error_type="RateLimitError")
            raise RuntimeError("the agent gave up")


@pytest.fixture
def book(ledger: Ledger) -> Book:
    return Book(ledger)


def figures(rows: list[ReportRow]) -> list[tuple[Any, ...]]:
    """(key values, runs, calls, cost, unpriced calls) of each row, in order."""
    return [
        (tuple(row.key.values()), row.runs, row.calls, row.cost_usd, row.unpriced_calls)
        for row in rows
    ]


def total(rows: list[ReportRow]) -> Decimal:
    return sum((row.cost_usd for row in rows), Decimal(0))


# -- report ------------------------------------------------------------------------------


def test_report_by_agent_counts_each_call_once_in_its_root_run(book: Book) -> None:
    rows = report(book.engine, by=["agent"])
    assert [
        (("triage",), 2, 5, Decimal("0.0171"), 1),
        (("billing",), 1, 1, Decimal("0.00045"), 0),
        ((None,), 0, 1, Decimal("0.00003"), 0),  # the call outside any run
        (("idle",), 1, 0, Decimal("0"), 0),  # a run with no calls is still a run
    ] == figures(rows)
    triage = rows[0]
    assert (6050, 805, 2000, 0, 0, 1) == (
        triage.input_tokens,
        triage.output_tokens,
        triage.cache_read_tokens,
        triage.cache_write_tokens,
        triage.reasoning_tokens,
        triage.failed_calls,
    )


def test_report_by_agent_matches_the_root_runs_stored_totals(book: Book) -> None:
    """Summing calls per root agent gives what the runs table says the roots cost."""
    with book.engine.connect() as connection:
        stored = dict(
            connection.execute(
                sa.select(storage.runs.c.name, sa.func.sum(storage.runs.c.cost_usd))
                .where(storage.runs.c.parent_id.is_(None))
                .group_by(storage.runs.c.name)
            ).all()
        )
    rows = {row.key["agent"]: row.cost_usd for row in report(book.engine, by=["agent"])}
    for name in ("triage", "billing", "idle"):
        assert Decimal(str(stored[name])) == rows[name]


def test_report_with_sub_agents_counts_each_call_in_the_run_that_made_it(book: Book) -> None:
    rows = report(book.engine, by=["agent"], root_only=False)
    assert [
        (("researcher",), 1, 1, Decimal("0.0135"), 0),
        (("triage",), 2, 4, Decimal("0.0036"), 1),
        (("billing",), 1, 1, Decimal("0.00045"), 0),
        ((None,), 0, 1, Decimal("0.00003"), 0),
        (("idle",), 1, 0, Decimal("0"), 0),
    ] == figures(rows)
    assert TOTAL == total(rows)


def test_report_by_model_sums_calls_inside_and_outside_runs(book: Book) -> None:
    rows = report(book.engine, by="model")
    assert [
        (("beta",), 2, 2, Decimal("0.01395"), 0),
        (("alpha",), 2, 4, Decimal("0.00363"), 0),
        (("mystery",), 1, 1, Decimal("0"), 1),
    ] == figures(rows)
    assert 1 == rows[1].failed_calls


def test_report_by_agent_and_model_joins_calls_to_their_root_run(book: Book) -> None:
    rows = report(book.engine, by=("agent", "model"))
    assert [
        (("triage", "beta"), 1, 1, Decimal("0.0135"), 0),
        (("triage", "alpha"), 2, 3, Decimal("0.0036"), 0),
        (("billing", "beta"), 1, 1, Decimal("0.00045"), 0),
        ((None, "alpha"), 0, 1, Decimal("0.00003"), 0),
        (("triage", "mystery"), 1, 1, Decimal("0"), 1),
    ] == figures(rows)


def test_every_grouping_adds_up_to_the_same_total(book: Book) -> None:
    for by in (["agent"], ["model"], ["provider"], ["status"], ["day"], ["agent", "model"]):
        for root_only in (True, False):
            assert TOTAL == total(report(book.engine, by=by, root_only=root_only)), by


def test_report_by_status_uses_the_status_of_the_root_run(book: Book) -> None:
    rows = report(book.engine, by=["status"])
    assert [
        (("ok",), 3, 4, Decimal("0.01515"), 1),
        (("error",), 1, 2, Decimal("0.0024"), 0),
        ((None,), 0, 1, Decimal("0.00003"), 0),
    ] == figures(rows)


def test_report_by_day_and_since_select_runs_by_when_they_started(book: Book) -> None:
    old = dt.datetime(2025, 1, 2, 23, 30, tzinfo=UTC)
    run = RunRecord(id="old-run", name="triage", parent_id=None, root_id="old-run",
                    tags={}, started_at=old, status="ok", calls=1,
                    cost_usd=Decimal("0.5"))  # fmt: skip
    call = CallRecord(id="old-call", run_id="old-run", root_run_id="old-run",
                      operation="chat", provider=None, requested_model="alpha",
                      model="alpha", started_at=old, cost_usd=Decimal("0.5"))  # fmt: skip
    with book.engine.begin() as connection:
        connection.execute(storage.runs.insert(), [run.as_row()])
        connection.execute(storage.calls.insert(), [call.as_row()])
    today = dt.datetime.now(UTC).date().isoformat()
    assert [
        (("2025-01-02",), 1, 1, Decimal("0.5"), 0),
        ((today,), 4, 7, TOTAL, 1),
    ] == figures(report(book.engine, by=["day"]))
    assert [((today,), 4, 7, TOTAL, 1)] == figures(report(book.engine, by=["day"], since="30d"))
    assert [] == report(book.engine, by=["day"], since=dt.datetime.now(UTC) + dt.timedelta(1))


def test_report_costs_are_exact_decimals_even_where_sqlite_sums_floats(ledger: Ledger) -> None:
    with ledger.run("sums"):
        for cost in ("0.1", "0.2", "0.000000000001"):
            ledger.record_call("beta", input_tokens=1, cost_usd=cost)
    ledger.flush()
    [row] = report(ledger.engine, by=["agent"])
    assert Decimal("0.300000000001") == row.cost_usd
    assert isinstance(row.cost_usd, Decimal)


def test_report_of_an_empty_ledger_is_empty(ledger: Ledger) -> None:
    assert [] == report(ledger.engine, by=["agent", "model"])


@pytest.mark.parametrize(
    ("by", "named"),
    [
        ("colour", "'colour'"),
        (["agent", "tenant"], "'tenant'"),
        ("", "''"),
        ("agent,agent", "'agent,agent'"),
    ],
)
def test_report_rejects_unknown_dimensions_naming_them(ledger: Ledger, by: Any, named: str) -> None:
    with pytest.raises(ConfigurationError, match=r"agent, model, provider, status, day|once") as e:
        report(ledger.engine, by=by)
    assert named in str(e.value)


# -- runs and calls ----------------------------------------------------------------------


def test_list_runs_is_newest_first_with_totals_including_sub_runs(book: Book) -> None:
    rows = list_runs(book.engine)
    assert [book.d.id, book.c.id, book.b.id, book.researcher.id, book.a.id] == [
        row.id for row in rows
    ]
    a = rows[-1]
    assert ("triage", {"tenant": "acme"}, "ok", 3, Decimal("0.0147"), 1) == (
        a.name,
        a.tags,
        a.status,
        a.calls,
        a.cost_usd,
        a.unpriced_calls,
    )
    assert a.started_at.tzinfo is not None
    assert a.duration_ms is not None
    assert a.duration_ms >= 0
    assert (book.a.id, False) == (rows[3].parent_id, rows[3].is_root)
    assert ("error", "RuntimeError") == (rows[2].status, rows[2].error_type)


def test_list_runs_filters_by_agent_root_since_and_limit(book: Book) -> None:
    assert [book.b.id, book.a.id] == [r.id for r in list_runs(book.engine, agent="triage")]
    assert book.researcher.id not in [r.id for r in list_runs(book.engine, root_only=True)]
    assert [book.d.id, book.c.id] == [r.id for r in list_runs(book.engine, limit=2)]
    assert 5 == len(list_runs(book.engine, since="1h", limit=0))
    future = dt.datetime.now(UTC) + dt.timedelta(hours=1)
    assert [] == list_runs(book.engine, since=future)


def test_list_calls_of_a_run_include_its_sub_runs(book: Book) -> None:
    calls = list_calls(book.engine, run_id=book.a.id)
    assert ["mystery", "beta", "alpha"] == [c.model for c in calls]
    assert ["triage", "researcher", "triage"] == [c.agent for c in calls]
    assert [None, Decimal("0.0135"), Decimal("0.0012")] == [c.cost_usd for c in calls]
    assert ["beta"] == [c.model for c in list_calls(book.engine, run_id=book.researcher.id)]


def test_list_calls_filters_by_model_and_shows_calls_outside_runs(book: Book) -> None:
    betas = list_calls(book.engine, model="beta")
    assert [book.c.id, book.a.id] == [c.root_run_id for c in betas]
    newest = list_calls(book.engine, limit=1)[0]
    assert (None, None, "alpha", 10) == (
        newest.run_id,
        newest.agent,
        newest.model,
        newest.input_tokens,
    )
    failed = [c for c in list_calls(book.engine, limit=0) if c.status == "error"]
    assert [("RateLimitError", Decimal("0"))] == [(c.error_type, c.cost_usd) for c in failed]


def test_list_functions_reject_a_negative_limit(ledger: Ledger) -> None:
    with pytest.raises(ConfigurationError, match="`limit` is -1"):
        list_runs(ledger.engine, limit=-1)
    with pytest.raises(ConfigurationError, match="`limit` is -1"):
        list_calls(ledger.engine, limit=-1)


def test_counts_summarise_the_ledger(book: Book) -> None:
    held = queries.counts(book.engine)
    assert (5, 4, 7, 1, 1, TOTAL) == (
        held.runs,
        held.root_runs,
        held.calls,
        held.failed_calls,
        held.unpriced_calls,
        held.cost_usd,
    )
    assert held.last_call_at is not None
    assert held.first_call_at is not None
    assert held.first_call_at <= held.last_call_at


# -- parse_since -------------------------------------------------------------------------

NOW = dt.datetime(2025, 3, 10, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", NOW - dt.timedelta(days=7)),
        ("24h", NOW - dt.timedelta(hours=24)),
        ("30m", NOW - dt.timedelta(minutes=30)),
        ("45s", NOW - dt.timedelta(seconds=45)),
        ("2w", NOW - dt.timedelta(weeks=2)),
        (" 7D ", NOW - dt.timedelta(days=7)),
        ("2025-01-31", dt.datetime(2025, 1, 31, tzinfo=UTC)),
        ("2025-01-31T12:30", dt.datetime(2025, 1, 31, 12, 30, tzinfo=UTC)),
        ("2025-01-31T12:30+02:00", dt.datetime(2025, 1, 31, 10, 30, tzinfo=UTC)),
        ("2025-01-31T12:30Z", dt.datetime(2025, 1, 31, 12, 30, tzinfo=UTC)),
    ],
)
def test_parse_since_reads_durations_and_iso_dates(text: str, expected: dt.datetime) -> None:
    assert expected == parse_since(text, now=NOW)


@pytest.mark.parametrize("text", ["yesterday", "", "7x", "-7d", "7 days", "2025-13-01"])
def test_parse_since_names_a_bad_value(text: str) -> None:
    with pytest.raises(ConfigurationError) as e:
        parse_since(text)
    assert f"`since` is {text!r}" in str(e.value)
    assert "7d" in str(e.value)


def test_parse_since_takes_a_naive_datetime_as_utc() -> None:
    naive = dt.datetime(2025, 1, 1)  # noqa: DTZ001 - the point of the test
    assert dt.datetime(2025, 1, 1, tzinfo=UTC) == parse_since(naive)
