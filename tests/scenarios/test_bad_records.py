"""Bad figures and huge text handed to the ledger: refused at the call, or stored cut
short, and never able to stop the recording of the rows around them.

Every test writes through a real ledger on SQLite and on PostgreSQL (conftest's
``db_url``). The expected value comes first.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from helpers import calls_of

from tokenledger import ConfigurationError, Ledger, UsageError
from tokenledger._recorder import MAX_TEXT_LENGTH
from tokenledger.records import new_call


@pytest.mark.parametrize(
    "cost",
    [math.nan, math.inf, -math.inf, -5, "-5", "abc", 1e300, Decimal("NaN"), True, [1]],
    ids=[
        "nan",
        "inf",
        "-inf",
        "negative",
        "negative-text",
        "text",
        "1e300",
        "decimal-nan",
        "bool",
        "list",
    ],
)
def test_record_call_refuses_an_impossible_cost_and_records_nothing(
    ledger: Ledger, cost: object
) -> None:
    with pytest.raises(UsageError, match=r"`cost_usd` is .*a reported cost must be a finite"):
        ledger.record_call("gpt-4o-mini", input_tokens=10, output_tokens=5, cost_usd=cost)
    ledger.flush()
    assert [] == calls_of(ledger)


@pytest.mark.parametrize("latency", [math.nan, math.inf, -1, "12", 10**12])
def test_record_call_refuses_an_impossible_latency_and_records_nothing(
    ledger: Ledger, latency: object
) -> None:
    with pytest.raises(UsageError, match=r"`latency_ms` is .*duration in milliseconds"):
        ledger.record_call("gpt-4o-mini", input_tokens=10, latency_ms=latency)
    ledger.flush()
    assert [] == calls_of(ledger)


def test_a_float_cost_the_provider_reported_is_kept_exactly(ledger: Ledger) -> None:
    ledger.record_call("gpt-4o-mini", input_tokens=10, output_tokens=5, cost_usd=0.0123)
    ledger.flush()
    [call] = calls_of(ledger)
    assert Decimal("0.0123") == call["cost_usd"]
    assert "provider" == call["cost_source"]


def test_a_megabyte_value_is_cut_short_in_the_error_message(ledger: Ledger) -> None:
    huge = "x" * 1_000_000
    with pytest.raises(UsageError) as raised:
        ledger.record_call("gpt-4o-mini", input_tokens=1, cost_usd=huge)
    assert len(str(raised.value)) < 400


def test_a_huge_model_name_is_stored_cut_short_and_the_calls_after_it_are_written(
    ledger: Ledger,
) -> None:
    """A 3,000-character model name once made PostgreSQL refuse the row for its index
    and, treated as an outage, stopped every later row. Names are cut at capture."""
    with ledger.run("agent"):
        ledger.record_call("m" * 3000, input_tokens=10, output_tokens=5, cost_usd="0.01")
        for _ in range(300):
            ledger.record_call("gpt-4o-mini", input_tokens=10, output_tokens=5)
    assert ledger.flush(30)
    calls = calls_of(ledger)
    assert 301 == len(calls)
    [long] = [c for c in calls if c["model"].startswith("m")]
    assert MAX_TEXT_LENGTH == len(long["model"]) == len(long["requested_model"])
    assert long["model"].endswith("…")
    assert 0 == ledger.recorder.writer.stats.rejected


def test_a_row_the_database_refuses_for_its_size_is_set_aside_not_retried_forever(
    ledger: Ledger,
) -> None:
    """A row that reaches the writer with a value no index can hold (here put straight
    into the writer, past the cut at capture) is refused on its own: the writer keeps
    it aside, counts it, and writes the rest, on both engines."""
    writer = ledger.recorder.writer
    bad = new_call(None, operation="chat", model="ok")
    # 3,000 characters that compress badly: PostgreSQL compresses an index entry before
    # checking it against its ~2.7 kB limit.
    bad.model = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(3000))
    writer.put_call(bad)
    for _ in range(50):
        good = new_call(None, operation="chat", model="gpt-4o-mini")
        writer.put_call(good)
    assert ledger.flush(30)
    calls = calls_of(ledger)
    engine = ledger.engine.dialect.name
    if engine == "postgresql":
        assert 50 == len(calls)
        assert 1 == writer.stats.rejected
        assert [bad.id] == [r.row["id"] for r in writer.rejected]
    else:  # SQLite has no index entry limit: the row is simply stored
        assert 51 == len(calls)
        assert 0 == writer.stats.rejected


@pytest.mark.slow
def test_a_calls_latency_is_the_providers_not_the_reservations(tmp_path: Path) -> None:
    """The first budgeted call of a process imports litellm's tokenizer to count its
    input (seconds); that wait is tokenledger's, and must not be recorded as the
    provider's latency. Run in a fresh process, where litellm is not yet imported."""
    code = (
        "import sys, time, tokenledger as tl\n"
        "from tokenledger.capture import begin_call\n"
        f"ledger = tl.Ledger({f'sqlite:///{tmp_path}/l.db'!r})\n"
        "ledger.set_budget('global', usd='5')\n"
        "with ledger.run('agent'):\n"
        "    started = time.perf_counter()\n"
        "    pending = begin_call(operation='chat', model='gpt-4o-mini', provider='openai',\n"
        "        request={'messages': [{'role': 'user', 'content': 'hi'}]}, max_tokens=10)\n"
        "    reserving = time.perf_counter() - started\n"
        "    pending.succeed({'prompt_tokens': 5, 'completion_tokens': 2})\n"
        "print(reserving, 'litellm' in sys.modules, pending.call.latency_ms)\n"
        "ledger.close()\n"
    )
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    reserving, imported, latency_ms = float(out[0]), out[1], float(out[2])
    assert "True" == imported
    assert reserving > 0.3  # the tokenizer's import was paid during the reservation
    assert latency_ms < 100.0


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        ("user:\x00a", "holds a NUL character or a lone surrogate"),
        ("user:\ud800", "holds a NUL character or a lone surrogate"),
        ("user:" + "x" * 1_000_000, "is invalid"),
    ],
    ids=["nul", "lone-surrogate", "a-megabyte"],
)
def test_a_budget_scope_no_database_can_store_is_refused_by_name(
    ledger: Ledger, scope: str, message: str
) -> None:
    """Before: a raw UnicodeEncodeError or psycopg.DataError (with SQL text), or a NUL
    accepted on SQLite; a megabyte scope echoed whole."""
    with pytest.raises(ConfigurationError, match=message) as raised:
        ledger.set_budget(scope, usd="5")
    assert len(str(raised.value)) < 400
    assert [] == ledger.budgets()
