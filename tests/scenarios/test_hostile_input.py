"""Hostile input and secrets: bad numbers, odd shapes, nasty text, wrong URLs, leaks.

Each bad input gets a clear error naming the field and the value, and nothing already
recorded is lost. Nothing secret or private leaves the process: no prompt or completion
text in the ledger, its spool or its spans; no database password in a log line, an
error, a span or the CLI's output; ledger and spool files readable by their owner only.
Storage tests run on SQLite and PostgreSQL (conftest's ``db_url``).
"""
# Expected value first, on purpose (the suite's convention).

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import traceback
from collections.abc import Iterator
from decimal import Context, Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from helpers import rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenledger import Ledger, queries
from tokenledger import _schema as schema
from tokenledger import _storage as storage
from tokenledger._writer import BatchWriter
from tokenledger.capture import PendingCall
from tokenledger.cli import cli
from tokenledger.exceptions import (
    ConfigurationError,
    LedgerError,
    PriceError,
    SchemaVersionError,
    UsageError,
)
from tokenledger.pricing import PriceBook
from tokenledger.records import CallRecord, TokenUsage, new_id, utcnow
from tokenledger.usage import MAX_TOKENS_PER_CALL, usage_from_response

PROMPT = "PROMPT-8f3e1c-the-patient-is-allergic-to-penicillin"
COMPLETION = "COMPLETION-b71d09-prescribe-amoxicillin-500mg"
PASSWORD = "hunter2-Zq9"


def stored_calls(ledger: Ledger) -> list[dict[str, Any]]:
    assert ledger.flush()
    return rows(ledger, "calls")


# -- token usage from a provider ------------------------------------------------------------


def response_with_usage(**bad: object) -> Any:
    """A litellm ModelResponse whose usage carries ``bad`` values, as a broken provider
    (or proxy) could send them: set after validation, which is how they slip through."""
    from litellm import ModelResponse, Usage

    usage = Usage(prompt_tokens=10, completion_tokens=3, total_tokens=13)
    for name, value in bad.items():
        object.__setattr__(usage, name, value)
    response = ModelResponse(
        model="gpt-4o-mini",
        choices=[
            {"message": {"role": "assistant", "content": "4"}, "finish_reason": "stop", "index": 0}
        ],
    )
    response.usage = usage
    return response


class UnknownUsage:
    """A usage object of a shape no provider documents."""

    tokens = 13
    cost_cents = 2


def response_with_unknown_usage() -> Any:
    response = response_with_usage()
    object.__setattr__(response, "usage", UnknownUsage())
    return response


BAD_PROVIDER_USAGE = {
    "negative": (lambda: response_with_usage(prompt_tokens=-5), "`prompt_tokens` is -5"),
    "nan": (lambda: response_with_usage(prompt_tokens=math.nan), "`prompt_tokens` is nan"),
    "non-integer": (
        lambda: response_with_usage(completion_tokens=1.5),
        "`completion_tokens` is 1.5",
    ),
    "absurd": (
        lambda: response_with_usage(prompt_tokens=10**13),
        "`prompt_tokens` is 10000000000000",
    ),
    "text": (lambda: response_with_usage(prompt_tokens="lots"), "`prompt_tokens` is 'lots'"),
    "unknown-shape": (response_with_unknown_usage, "type `UnknownUsage` has no token counts"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROVIDER_USAGE))
def test_a_call_with_impossible_usage_is_recorded_with_usage_unknown(
    ledger: Ledger, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    import litellm

    make_response, named = BAD_PROVIDER_USAGE[case]
    messages = [{"role": "user", "content": "2+2?"}]

    with caplog.at_level(logging.WARNING, logger="tokenledger"), ledger.run("agent") as run:
        good = litellm.completion(model="gpt-4o-mini", messages=messages, mock_response="4")
        answer = litellm.completion(
            model="gpt-4o-mini", messages=messages, mock_response=make_response()
        )

    assert "4" == good.choices[0].message.content == answer.choices[0].message.content
    calls = sorted(stored_calls(ledger), key=lambda call: call["started_at"])
    assert [False, True] == [call["usage_estimated"] for call in calls]
    assert [(10, 20), (0, 0)] == [(c["input_tokens"], c["output_tokens"]) for c in calls]
    assert ["ok", "ok"] == [call["status"] for call in calls]
    assert 2 == run.calls
    assert 1 == len([r for r in caplog.records if named in r.getMessage()])


def test_a_call_with_unknown_usage_is_never_priced_at_zero(ledger: Ledger) -> None:
    import litellm

    with ledger.run("agent"):
        litellm.completion(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "2+2?"}],
            mock_response=response_with_usage(prompt_tokens=-5),
        )

    (call,) = stored_calls(ledger)
    assert call["usage_estimated"]
    assert call["cost_usd"] is None or call["input_tokens"] > 0


def test_bad_counts_given_to_record_call_raise_and_lose_nothing(ledger: Ledger) -> None:
    with ledger.run("agent") as run:
        kept = ledger.record_call("gpt-4o-mini", input_tokens=100, output_tokens=10)
        for field, value in [
            ("input_tokens", -1),
            ("output_tokens", math.nan),
            ("cache_read_tokens", 2.5),
            ("reasoning_tokens", 10**12),
        ]:
            counts: dict[str, Any] = {"input_tokens": 10, "output_tokens": 5, field: value}
            shown = re.escape(repr(value))
            with pytest.raises(UsageError, match=rf"^Usage field `{field}` is {shown}"):
                ledger.record_call("gpt-4o-mini", **counts)
        also_kept = ledger.record_call("gpt-4o-mini", input_tokens=7)

    assert {kept.id, also_kept.id} == {call["id"] for call in stored_calls(ledger)}
    assert 2 == run.calls
    (stored_run,) = rows(ledger, "runs")
    assert (2, 107) == (stored_run["calls"], stored_run["input_tokens"])


# -- properties of usage parsing (tests/test_usage.py has the per-field ones) -------------------

USAGE_FIELDS = [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "input_tokens",
    "output_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
    "input_tokens_details",
    "output_tokens_details",
    "cached_tokens",
    "reasoning_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "cache_write_tokens",
    "prompt_cache_hit_tokens",
    "tokenledger_shape",
    "cost",
]
keys = st.one_of(st.sampled_from(USAGE_FIELDS), st.text(max_size=6))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=0, max_value=5000),
    st.floats(),
    st.decimals(),
    st.text(max_size=8),
    st.just("canonical"),
)
json_like = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.dictionaries(keys, children, max_size=5), st.lists(children, max_size=3)
    ),
    max_leaves=15,
)
any_usage = st.one_of(st.dictionaries(keys, json_like, max_size=7), json_like)


def assert_consistent(usage: TokenUsage) -> None:
    for count in (
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_tokens,
        usage.cache_write_tokens,
        usage.reasoning_tokens,
    ):
        assert type(count) is int
        assert 0 <= count <= 3 * MAX_TOKENS_PER_CALL
    assert usage.cache_read_tokens + usage.cache_write_tokens <= usage.input_tokens
    assert usage.reasoning_tokens <= usage.output_tokens


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(raw=any_usage)
def test_any_usage_whatever_its_shape_is_read_consistently_or_refused_with_a_usage_error(
    raw: object,
) -> None:
    try:
        usage = usage_from_response(raw)
    except UsageError as exc:
        message = str(exc)
        assert message.startswith("Usage ")
        assert "`" in message  # names a field (or the type of the object)
        return
    assert_consistent(usage)


def test_any_usage_a_provider_reports_is_recorded_and_never_raised(tmp_path: Path) -> None:
    """Capture hands the provider's usage to `PendingCall.succeed`: whatever it is, the
    call is recorded, with consistent counts or with its usage marked unknown."""
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", capture=False) as ledger:
        recorded: list[CallRecord] = []

        @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(raw=any_usage)
        def record(raw: object) -> None:
            with ledger.run("property") as run:
                call = CallRecord(
                    id=new_id(),
                    run_id=run.id,
                    root_run_id=run.root_id,
                    operation="chat",
                    provider="openai",
                    requested_model="gpt-4o-mini",
                    model=None,
                    started_at=utcnow(),
                )
                pending = PendingCall(ledger.recorder, run, call)
                pending.provider = "openai"
                pending.succeed(raw, model="gpt-4o-mini")
            recorded.append(call)
            assert_consistent(call.usage)
            if not call.usage_estimated:
                assert usage_from_response(raw) == call.usage

        logging.disable(logging.WARNING)  # one "unknown usage" line per bad example
        try:
            record()
        finally:
            logging.disable(logging.NOTSET)
        assert ledger.flush()
        assert sorted(call.id for call in recorded) == sorted(
            c["id"] for c in rows(ledger, "calls")
        )


# -- prices --------------------------------------------------------------------------------------

BAD_PRICES = [
    ("-0.15", "'-0.15'"),
    (-1, "-1"),
    (math.nan, "nan"),
    (math.inf, "inf"),
    ("NaN", "'NaN'"),
    ("0.15 USD", "'0.15 USD'"),
    ("", "''"),
    (None, "None"),
    (True, "True"),
    ([1], r"\[1\]"),
    (Decimal("-0.000001"), r"Decimal\('-0.000001'\)"),
    ("20000", "'20000'"),  # more than $10,000 per million: a unit mistake
]


@pytest.mark.parametrize(("value", "shown"), BAD_PRICES, ids=[repr(v) for v, _ in BAD_PRICES])
def test_a_bad_price_is_refused_by_name_and_value_and_loses_nothing(
    ledger: Ledger, value: object, shown: str
) -> None:
    ledger.set_price("acme/model", input_per_million="1.00", output_per_million="2.00")
    with ledger.run("agent"):
        kept = ledger.record_call("acme/model", input_tokens=1_000_000, output_tokens=0)

        with pytest.raises(
            PriceError, match=rf"^Price `input_per_million` for model `acme/model` is {shown}"
        ):
            ledger.set_price("acme/model", input_per_million=value, output_per_million="2.00")
        after = ledger.record_call("acme/model", input_tokens=1_000_000, output_tokens=0)

    calls = {call["id"]: call["cost_usd"] for call in stored_calls(ledger)}
    assert {kept.id: Decimal("1.00"), after.id: Decimal("1.00")} == calls  # the old price holds
    assert 1 == len(rows(ledger, "prices"))


price_inputs = st.one_of(
    st.decimals(),
    st.floats(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.text(max_size=12),
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=400, deadline=None)
@given(value=price_inputs)
def test_any_price_is_accepted_exactly_or_refused_by_name_and_value(value: object) -> None:
    """tests/test_pricing.py checks that good price strings parse exactly; this checks
    that nothing else gets through, and that every refusal says what and why."""
    book = PriceBook(source_map={})
    try:
        record = book.set_price("m", input_per_million=value, output_per_million="1")
    except PriceError as exc:
        message = str(exc)
        assert message.startswith("Price `input_per_million` for model `m` is ")
        assert repr(value)[:40] in message
        return
    price = record.input_per_token
    assert isinstance(price, Decimal)
    assert price.is_finite()
    assert Decimal(0) <= price <= Decimal("0.01")  # $10,000 per million at most
    expected = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value).strip())
    assert expected.scaleb(-6, Context(prec=60)) == price


# -- tags --------------------------------------------------------------------------------------

HOSTILE_TAGS = {
    "sql": "'; DROP TABLE runs; --",
    "sql-quote-key'\"": '" OR 1=1 --',
    "shell": "$(rm -rf ~) `reboot` && echo pwned | tee /etc/passwd; ${HOME}",
    "json": '{"user": "admin", "tags": null}',
    "printf": "%s %d %(user)s {0} {user} $1 ?",
    "path": "../../etc/passwd\\..\\windows",
    "unicode": "Zoë 😀 مرحبا 中文 e\u0301 \u202eRTL\u202c \u200b",
    "whitespace": " \t\r\n leading and trailing \n",
    "k" * 128: "v" * 1024,  # the largest key and value
    "😀": "",
}


def test_hostile_tags_round_trip_exactly_through_every_query_path(ledger: Ledger) -> None:
    with ledger.run("agent", tags=HOSTILE_TAGS) as run:
        ledger.record_call("gpt-4o-mini", input_tokens=10, output_tokens=1)
    assert ledger.flush()

    (stored,) = rows(ledger, "runs")
    assert HOSTILE_TAGS == stored["tags"]
    (listed,) = queries.list_runs(ledger.engine)
    assert HOSTILE_TAGS == listed.tags
    for key, value in HOSTILE_TAGS.items():
        (row,) = queries.report(ledger.engine, by=[f"tag:{key}"])
        assert {f"tag:{key}": value} == row.key, key
    assert [run.id] == [c.run_id for c in queries.list_calls(ledger.engine, run_id=run.id)]
    assert {"calls", "runs", "prices"} <= set(sa.inspect(ledger.engine).get_table_names())


def test_hostile_tags_round_trip_through_the_cli(db_url: str) -> None:
    tags = {key: value for key, value in HOSTILE_TAGS.items() if "," not in key}
    with Ledger(db_url, capture=False) as ledger, ledger.run("agent", tags=tags):
        ledger.record_call("gpt-4o-mini", input_tokens=10)

    result = CliRunner().invoke(cli, ["runs", "--json", "--db", db_url])
    assert 0 == result.exit_code, result.output
    (listed,) = json.loads(result.stdout)
    assert tags == listed["tags"]
    for key in ("sql", "shell", "unicode"):
        result = CliRunner().invoke(cli, ["report", "--json", "--by", f"tag:{key}", "--db", db_url])
        assert 0 == result.exit_code, result.output
        assert [{f"tag:{key}": tags[key]}] == [row["key"] for row in json.loads(result.stdout)]


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({"k" * 129: "v"}, r"^Tag key 'k{129}' of run `agent` is invalid; a tag key must"),
        ({"": "v"}, r"^Tag key '' of run `agent` is invalid"),
        ({"user": "v" * 1025}, r"^Tag `user` of run `agent` is 1025 characters long"),
        ({"user": None}, r"^Tag `user` of run `agent` is None; a tag value must be"),
        ({"user": ["a"]}, r"^Tag `user` of run `agent` is \['a'\]"),
        ({1: "v"}, r"^Tag key 1 of run `agent` is invalid"),
    ],
    ids=["key-too-long", "key-empty", "value-too-long", "value-none", "value-list", "key-int"],
)
def test_a_bad_tag_is_refused_by_name_before_anything_is_recorded(
    ledger: Ledger, tags: dict[Any, Any], message: str
) -> None:
    with ledger.run("earlier"):
        kept = ledger.record_call("gpt-4o-mini", input_tokens=1)

    with pytest.raises(ConfigurationError, match=message):
        ledger.run("agent", tags=tags)

    assert [kept.id] == [call["id"] for call in stored_calls(ledger)]


@pytest.mark.parametrize("text", ["a\x00b", "a\ud800b"], ids=["nul", "lone-surrogate"])
def test_a_tag_no_database_can_store_is_refused_by_name(ledger: Ledger, text: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^Tag `user` of run `agent`"):
        ledger.run("agent", tags={"user": text})


@pytest.mark.parametrize("text", ["gpt\x00-4o", "gpt\ud800-4o"], ids=["nul", "lone-surrogate"])
def test_a_call_whose_text_the_database_cannot_store_is_salvaged_not_lost(
    ledger: Ledger, text: str
) -> None:
    """A provider may return any model name: the call's tokens must still be counted."""
    with ledger.run("agent") as run:
        call = ledger.record_call(text, input_tokens=42, output_tokens=7)
    assert ledger.flush()

    (stored,) = rows(ledger, "calls")
    assert (call.id, 42, 7) == (stored["id"], stored["input_tokens"], stored["output_tokens"])
    assert stored["model"] in (text, "gpt\ufffd-4o")
    assert [] == ledger._writer.rejected
    assert 1 == run.calls


# -- database URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "error", "message"),
    [
        (
            f"mysql://root:{PASSWORD}@db/ledger",
            ConfigurationError,
            r"^Database URL 'mysql://root:\*\*\*@db/ledger' uses driver 'mysql'",
        ),
        ("not a url at all", ConfigurationError, r"^Database URL 'not a url at all' is not a"),
        ("sqlite://", ConfigurationError, r"is an in-memory SQLite database"),
        (
            f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/no_such_database_here",
            LedgerError,
            r'^Cannot open the ledger at .*:\*\*\*@.*database "no_such_database_here" does not',
        ),
    ],
    ids=["unsupported", "garbage", "in-memory", "no-such-database"],
)
def test_a_wrong_database_url_is_a_clear_error_without_its_password(
    url: str, error: type[Exception], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG), pytest.raises(error, match=message) as raised:
        Ledger(url)

    assert PASSWORD not in "".join(traceback.format_exception(raised.value))
    assert PASSWORD not in caplog.text


def test_a_sqlite_ledger_in_a_directory_that_cannot_exist_is_a_clear_error(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    with pytest.raises(LedgerError, match=r"Cannot (create|open) the ledger"):
        Ledger(f"sqlite:///{blocker / 'ledger.db'}")


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/test",
        f"postgresql://postgres@127.0.0.1:1/test?password={PASSWORD}",
    ],
    ids=["in-the-url", "as-a-url-parameter"],
)
def test_an_unreachable_database_starts_the_ledger_degraded_without_showing_its_password(
    url: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Nothing listens on port 1: the ledger starts anyway (a service must not crash
    because its ledger is briefly down), says so once, and keeps what it records."""
    with caplog.at_level(logging.DEBUG, logger="tokenledger"):
        ledger = Ledger(url, spool_dir=tmp_path / "spool")
        try:
            assert ledger.connected is False
            ledger.record_call("gpt-4o-mini", input_tokens=10, output_tokens=5)
            assert ledger.flush(timeout=0.5) is False  # nowhere to write it yet
        finally:
            ledger.close(timeout=2)
    assert "starts without its database" in caplog.text
    assert "Connection refused" in caplog.text or "connection failed" in caplog.text.lower()
    assert PASSWORD not in caplog.text
    assert PASSWORD not in repr(ledger)
    assert any((tmp_path / "spool").rglob("*.jsonl")), "the call was not kept in the spool"


def test_a_ledger_at_a_newer_schema_revision_refuses_to_write(
    db_url: str, engine: sa.Engine
) -> None:
    with Ledger(db_url, capture=False) as ledger, ledger.run("agent"):
        kept = ledger.record_call("gpt-4o-mini", input_tokens=1)
    with engine.begin() as connection:
        connection.execute(
            sa.text(f"UPDATE {schema.VERSION_TABLE} SET version_num = '0099_from_the_future'")
        )

    with pytest.raises(SchemaVersionError) as raised:
        Ledger(db_url)

    message = str(raised.value)
    assert "'0099_from_the_future'" in message
    assert f"newest revision '{schema.head_revision()}'" in message
    assert "pip install -U tokenledger" in message
    with engine.connect() as connection:
        assert [kept.id] == list(connection.execute(sa.select(storage.calls.c.id)).scalars())


# -- nothing private is kept ---------------------------------------------------------------------


def everything_stored(engine: sa.Engine) -> Iterator[tuple[str, str, object]]:
    """Every value of every column of every table in the ledger's database."""
    inspector = sa.inspect(engine)
    with engine.connect() as connection:
        for table in inspector.get_table_names():
            reflected = sa.Table(table, sa.MetaData(), autoload_with=connection)
            for row in connection.execute(sa.select(reflected)):
                for column, value in row._mapping.items():
                    yield table, str(column), value


def test_no_prompt_or_completion_text_is_stored_or_put_on_spans(
    db_url: str, tmp_path: Path, span_exporter: Any
) -> None:
    import litellm

    messages = [{"role": "user", "content": PROMPT}]
    with Ledger(db_url) as ledger:
        # Durable: every row passes through the spool file first.
        ledger._writer.close()
        ledger._writer = BatchWriter(
            ledger.engine, durability="durable", max_delay=3600, spool_dir=tmp_path / "spool"
        )
        with ledger.run("agent", tags={"tenant": "acme"}):
            litellm.completion(model="gpt-4o-mini", messages=messages, mock_response=COMPLETION)
            stream = litellm.completion(
                model="gpt-4o-mini", messages=messages, mock_response=COMPLETION, stream=True
            )
            assert COMPLETION == "".join(chunk.choices[0].delta.content or "" for chunk in stream)
            with pytest.raises(litellm.exceptions.APIError):
                litellm.completion(
                    model="gpt-4o-mini",
                    messages=messages,
                    mock_response=litellm.exceptions.APIError(
                        500, f"upstream echoed {PROMPT}", "openai", "gpt-4o-mini"
                    ),
                )
        spool = ledger._writer.spool.directory
        spooled = b"".join(path.read_bytes() for path in spool.iterdir())
        assert ledger.flush()
        values = list(everything_stored(ledger.engine))
        path = ledger.path

    assert 3 == len([1 for table, column, _ in values if (table, column) == ("calls", "id")])
    for table, column, value in values:
        text = str(value)
        assert PROMPT not in text, (table, column)
        assert COMPLETION not in text, (table, column)
    assert PROMPT.encode() not in spooled
    assert COMPLETION.encode() not in spooled
    if path is not None:  # SQLite: the file itself, and its write-ahead log
        for file in (path, f"{path}-wal"):
            if os.path.exists(file):
                data = Path(file).read_bytes()
                assert PROMPT.encode() not in data
                assert COMPLETION.encode() not in data
    spans = span_exporter.get_finished_spans()
    assert spans
    for span in spans:
        seen = [span.name, str(span.status.description), *map(str, span.attributes.values())]
        for event in span.events:
            seen += [event.name, *map(str, (event.attributes or {}).values())]
        assert not any(PROMPT in text or COMPLETION in text for text in seen), span.name


# -- no password leaves the process ------------------------------------------------------------


def test_a_database_password_never_appears_in_logs_errors_spans_or_the_cli(
    postgres_admin_engine: Any,
    tmp_path: Path,
    span_exporter: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The test server trusts local connections, so it takes a URL with any password:
    a working ledger whose URL holds a password, then the same password on a server
    that is not there."""
    if isinstance(postgres_admin_engine, str):
        pytest.skip(postgres_admin_engine)
    server = postgres_admin_engine.url
    schema_name = f"tl_pw_{new_id()[:12]}"
    with postgres_admin_engine.begin() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema_name}")
    working = (
        server.set(password=PASSWORD)
        .update_query_dict({"options": f"-csearch_path={schema_name}"})
        .render_as_string(hide_password=False)
    )
    unreachable = server.set(password=PASSWORD, port=1).render_as_string(hide_password=False)
    seen: list[str] = []
    try:
        with caplog.at_level(logging.DEBUG):
            with Ledger(working, capture=False) as ledger:
                seen += [ledger.url, repr(ledger), repr(ledger._writer)]
                with ledger.run("agent"):
                    ledger.record_call("gpt-4o-mini", input_tokens=1)
                assert ledger.flush()
            for args in (["status"], ["runs"], ["calls"], ["report"], ["path"], ["db", "current"]):
                result = CliRunner().invoke(cli, [*args, "--db", working])
                seen.append(result.output)
                result = CliRunner().invoke(cli, [*args, "--db", unreachable])
                seen.append(result.output)
                if result.exception is not None and not isinstance(result.exception, SystemExit):
                    seen.append("".join(traceback.format_exception(result.exception)))
            try:
                Ledger(unreachable)
            except LedgerError as exc:
                seen.append("".join(traceback.format_exception(exc)))
            writer = BatchWriter(
                storage.create_engine_for(unreachable), max_delay=0.05, spool_dir=tmp_path
            )
            writer.put_call(
                CallRecord(
                    id=new_id(),
                    run_id=None,
                    root_run_id=None,
                    operation="chat",
                    provider=None,
                    requested_model=None,
                    model=None,
                    started_at=utcnow(),
                )
            )
            assert not writer.flush(timeout=0.5)
            seen.append(repr(writer))
            writer.close(timeout=0.5)
        seen.append(caplog.text)
        for span in span_exporter.get_finished_spans():
            seen += [span.name, *map(str, span.attributes.values())]
    finally:
        with postgres_admin_engine.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema_name} CASCADE")

    assert "Cannot open the ledger" in "".join(seen)  # the failures were seen
    assert not [text for text in seen if PASSWORD in text]


# -- files ---------------------------------------------------------------------------------------


def test_a_sqlite_ledger_is_created_readable_by_its_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "new" / "ledger.db"
        with Ledger(f"sqlite:///{path}", capture=False) as ledger, ledger.run("agent"):
            ledger.record_call("gpt-4o-mini", input_tokens=1)
            assert ledger.flush()
            created = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
            modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in created if p.exists()}
    finally:
        os.umask(old)

    assert {"ledger.db": 0o600, "ledger.db-wal": 0o600, "ledger.db-shm": 0o600} == modes
    assert 0o700 == stat.S_IMODE(os.stat(path.parent).st_mode)


def test_a_spool_is_created_readable_by_its_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOKENLEDGER_SPOOL_DIR", raising=False)  # the default location
    old = os.umask(0o022)
    try:
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
        engine = storage.create_engine_for(url)  # no schema: every row stays in the spool
        writer = BatchWriter(engine, durability="durable", max_delay=3600)
        writer.put_call(
            CallRecord(
                id=new_id(),
                run_id=None,
                root_run_id=None,
                operation="chat",
                provider=None,
                requested_model=None,
                model=None,
                started_at=utcnow(),
            )
        )
        directory = writer.spool.directory
        modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in directory.iterdir()}
        writer.close(timeout=0.5)
        engine.dispose()
    finally:
        os.umask(old)

    assert tmp_path / "ledger.db-spool" == directory
    assert 0o700 == stat.S_IMODE(os.stat(directory).st_mode)
    assert [0o600] == list(modes.values())
