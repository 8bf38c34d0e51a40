"""The background batch writer, on SQLite and PostgreSQL (see conftest's ``db_url``)."""
# Assertions put the expected value first (`assert expected == actual`), the project's
# convention for tests; ruff's SIM300 wants the opposite.

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tokenledger import _schema as schema
from tokenledger import _storage as storage
from tokenledger._writer import BatchWriter
from tokenledger.exceptions import ConfigurationError
from tokenledger.records import CallRecord, PriceRecord, RunRecord, new_id, utcnow


@pytest.fixture
def ledger_engine(engine: sa.Engine) -> sa.Engine:
    """An engine on a fresh database migrated to head."""
    schema.upgrade(engine)
    return engine


@pytest.fixture
def make_writer(tmp_path: Path) -> Iterator[Callable[..., BatchWriter]]:
    """Make writers; each is closed after the test (before its engine is disposed).

    Their spools live in the test's ``tmp_path`` unless ``spool_dir`` is given.
    """
    writers: list[BatchWriter] = []

    def make(engine: sa.Engine, **options: Any) -> BatchWriter:
        options.setdefault("spool_dir", tmp_path / "spool")
        writer = BatchWriter(engine, **options)
        writers.append(writer)
        return writer

    yield make
    for writer in writers:
        writer.close(timeout=1)


def a_call(run_id: str | None = None, **values: object) -> CallRecord:
    call = CallRecord(
        id=new_id(),
        run_id=run_id,
        root_run_id=run_id,
        operation="chat",
        provider="openai",
        requested_model="gpt-4o-mini",
        model="gpt-4o-mini",
        started_at=utcnow(),
        ended_at=utcnow(),
        latency_ms=812.5,
        input_tokens=1200,
        output_tokens=300,
        cache_read_tokens=1000,
        reasoning_tokens=100,
        cost_usd=Decimal("0.000285"),
        cost_source="local",
        finish_reasons=["stop"],
    )
    for name, value in values.items():
        setattr(call, name, value)
    return call


def a_run(run_id: str, **values: object) -> RunRecord:
    run = RunRecord(
        id=run_id, name="triage", parent_id=None, root_id=run_id, tags={}, started_at=utcnow()
    )
    for name, value in values.items():
        setattr(run, name, value)
    return run


def a_price(price_id: str, **values: object) -> PriceRecord:
    price = PriceRecord(
        id=price_id,
        model="gpt-4o-mini",
        provider="openai",
        input_per_token=Decimal("0.00000015"),
        output_per_token=Decimal("0.0000006"),
        cache_read_per_token=Decimal("0.000000075"),
        cache_write_per_token=None,
        reasoning_per_token=None,
        tiers=None,
        source="litellm 1.106.2",
    )
    for name, value in values.items():
        setattr(price, name, value)
    return price


def call_ids(engine: sa.Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(sa.select(storage.calls.c.id)).scalars())


def count(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


# -- every row lands exactly once -------------------------------------------------------


def test_calls_put_from_8_threads_land_exactly_once(
    ledger_engine: sa.Engine, make_writer: Callable[..., BatchWriter]
) -> None:
    writer = make_writer(ledger_engine, max_batch=100)  # several batches per thread
    runs = [new_id() for _ in range(50)]
    calls = [a_call(runs[i % 50]) for i in range(1000)]
    start = threading.Barrier(8)

    def put_share(share: list[CallRecord]) -> None:
        start.wait()
        for call in share:
            writer.put_call(call)

    threads = [threading.Thread(target=put_share, args=(calls[i::8],)) for i in range(8)]
    for run_id in runs:
        writer.put_run(a_run(run_id))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert writer.flush()
    assert sorted(call.id for call in calls) == sorted(call_ids(ledger_engine))
    assert 50 == count(ledger_engine, storage.runs)
    with ledger_engine.connect() as connection:
        per_run = connection.execute(
            sa.select(storage.calls.c.run_id, sa.func.count()).group_by(storage.calls.c.run_id)
        ).all()
    assert {(run_id, 20) for run_id in runs} == set(per_run)


def test_a_call_put_twice_is_stored_once(
    ledger_engine: sa.Engine, make_writer: Callable[..., BatchWriter]
) -> None:
    writer = make_writer(ledger_engine)
    call = a_call()

    writer.put_call(call)
    writer.put_call(call)  # in the same batch
    assert writer.flush()
    writer.put_call(call)  # and in a later one, as after a retried batch
    assert writer.flush()

    assert [call.id] == call_ids(ledger_engine)


@pytest.mark.parametrize("same_batch", [True, False], ids=["same-batch", "later-batch"])
def test_the_last_state_of_a_run_wins(
    ledger_engine: sa.Engine, make_writer: Callable[..., BatchWriter], same_batch: bool
) -> None:
    writer = make_writer(ledger_engine)
    run_id = new_id()
    ended = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.timezone.utc)

    writer.put_run(a_run(run_id))
    if not same_batch:
        assert writer.flush()
    writer.put_run(
        a_run(run_id, status="ok", ended_at=ended, calls=3, cost_usd=Decimal("0.000855"))
    )
    assert writer.flush()

    with ledger_engine.connect() as connection:
        stored = connection.execute(
            sa.select(
                storage.runs.c.status,
                storage.runs.c.ended_at,
                storage.runs.c.calls,
                storage.runs.c.cost_usd,
            )
        ).all()
    assert [("ok", ended, 3, Decimal("0.000855"))] == [tuple(row) for row in stored]


def test_a_price_is_inserted_once_and_never_overwritten(
    ledger_engine: sa.Engine, make_writer: Callable[..., BatchWriter]
) -> None:
    writer = make_writer(ledger_engine)

    writer.put_price(a_price("p1"))
    writer.put_price(a_price("p1", source="user"))
    assert writer.flush()
    writer.put_price(a_price("p1", input_per_token=Decimal(1)))
    assert writer.flush()

    with ledger_engine.connect() as connection:
        stored = connection.execute(
            sa.select(storage.prices.c.source, storage.prices.c.input_per_token)
        ).all()
    assert [("litellm 1.106.2", Decimal("0.00000015"))] == [tuple(row) for row in stored]


def test_every_field_of_a_call_round_trips(
    ledger_engine: sa.Engine, make_writer: Callable[..., BatchWriter]
) -> None:
    writer = make_writer(ledger_engine)
    call = a_call("r1", streamed=True, max_tokens=500, trace_id="a" * 32, span_id="b" * 16)

    writer.put_call(call)
    assert writer.flush()

    with ledger_engine.connect() as connection:
        stored = connection.execute(sa.select(storage.calls)).one()._asdict()
    assert call.as_row() == stored


def _varied_calls() -> list[CallRecord]:
    """Calls whose values exercise every conversion a column type makes."""
    utc = dt.timezone.utc
    india = dt.timezone(dt.timedelta(hours=5, minutes=30))
    pacific = dt.timezone(dt.timedelta(hours=-8))
    text = "tab\tnewline\nback\\slash 'single' \"double\" \\N ünïcödé ✓ 𝄞"
    return [
        a_call("r1", streamed=True, usage_estimated=True, max_tokens=512, tool_name="t" * 200),
        CallRecord(  # every optional column NULL
            id=new_id(),
            run_id=None,
            root_run_id=None,
            operation="chat",
            provider=None,
            requested_model=None,
            model=None,
            started_at=dt.datetime(2025, 6, 1, 12, 0, tzinfo=utc),  # no microseconds
        ),
        a_call(
            "r2",
            started_at=dt.datetime(2025, 6, 1, 17, 30, 0, 123456, tzinfo=india),
            ended_at=dt.datetime(2025, 5, 31, 23, 59, 59, 999999, tzinfo=pacific),
            cost_usd=Decimal("3E-7"),
            latency_ms=812,  # an int where a float goes
            finish_reasons=[text, "", "length"],
        ),
        a_call(
            "r3",
            started_at=dt.datetime(5, 1, 2, 3, 4, 5, 6, tzinfo=utc),  # a year below 1000
            cost_usd=Decimal("123456789012.123456789012"),
            input_tokens=2**40,
            finish_reasons=[],
            model=text,
            error_type="",
            status="error",
        ),
        a_call("r4", cost_usd=Decimal("-0.5"), latency_ms=float("inf"), streamed=1),
        a_call("r5", cost_usd=2, finish_reasons=["stop", {"nested": [1, 2.5, None, True]}]),
        a_call("r6", cost_usd="0.10", usage_estimated=0),
        a_call("r7", cost_usd=Decimal("0"), trace_id="a" * 32, span_id="b" * 16),
    ]


def _stored_calls(engine: sa.Engine) -> list[Any]:
    """Every stored call exactly as the database holds it, read at the driver level so
    no result processing can hide a difference: PostgreSQL's text of each row, and
    SQLite's values with their storage class."""
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            query = "SELECT c::text FROM calls AS c ORDER BY id"
            return list(connection.exec_driver_sql(query).scalars())
        stored = connection.exec_driver_sql("SELECT * FROM calls ORDER BY id").all()
    return [[(type(value).__name__, value) for value in row] for row in stored]


@pytest.mark.parametrize("route", ["batch", "batch-holding-a-stored-id", "spool"])
def test_every_column_is_stored_exactly_as_sqlalchemys_insert_stores_it(
    ledger_engine: sa.Engine, make_writer: Callable[..., BatchWriter], route: str
) -> None:
    """The writer binds calls at the driver level (and COPYs them on PostgreSQL); the
    stored values must be those of SQLAlchemy's insert with the column types, by every
    route: a fresh batch (COPY on PostgreSQL), a batch that falls back to INSERT ...
    ON CONFLICT because it holds a call already stored, and rows replayed from the spool.
    """
    calls = _varied_calls()
    known = a_call()
    insert = storage.insert_for(ledger_engine.dialect.name)(storage.calls)
    with ledger_engine.begin() as connection:
        connection.execute(insert, [call.as_row() for call in calls])
    expected = _stored_calls(ledger_engine)
    with ledger_engine.begin() as connection:
        connection.execute(storage.calls.delete())
    writer = make_writer(
        ledger_engine, max_delay=60, durability="durable" if route == "spool" else "batched"
    )
    if route == "batch-holding-a-stored-id":
        writer.put_call(known)
        assert writer.flush()

    for call in [known, *calls] if route == "batch-holding-a-stored-id" else calls:
        writer.put_call(call)
    assert writer.flush()

    with ledger_engine.begin() as connection:
        connection.execute(storage.calls.delete().where(storage.calls.c.id == known.id))
    assert expected == _stored_calls(ledger_engine)
    assert [] == writer.rejected


@pytest.mark.parametrize("durability", ["batched", "durable"])
def test_a_batch_holding_a_stored_call_writes_the_others_and_keeps_the_stored_row(
    ledger_engine: sa.Engine, make_writer: Callable[..., BatchWriter], durability: str
) -> None:
    """A replayed or re-put call never duplicates or overwrites a row: on PostgreSQL the
    COPY of the batch is refused, and the writer inserts with ON CONFLICT DO NOTHING."""
    writer = make_writer(ledger_engine, max_delay=60, durability=durability)
    stored = a_call(model="the-first-state")
    writer.put_call(stored)
    assert writer.flush()
    others = [a_call() for _ in range(20)]

    writer.put_call(a_call(id=stored.id, model="a-later-state"))
    for call in others:
        writer.put_call(call)
    assert writer.flush()

    assert sorted([stored.id] + [call.id for call in others]) == sorted(call_ids(ledger_engine))
    with ledger_engine.connect() as connection:
        model = connection.execute(
            sa.select(storage.calls.c.model).where(storage.calls.c.id == stored.id)
        ).scalar_one()
    assert "the-first-state" == model
    assert [] == writer.rejected


# -- when rows are written ------------------------------------------------------------


def test_rows_are_written_within_max_delay_without_a_flush(
    ledger_engine: sa.Engine, make_writer: Callable[..., BatchWriter]
) -> None:
    writer = make_writer(ledger_engine, max_delay=0.2)
    call = a_call()

    writer.put_call(call)

    deadline = time.monotonic() + 3
    while call_ids(ledger_engine) != [call.id] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [call.id] == call_ids(ledger_engine)


def test_flush_from_many_threads_at_once(
    ledger_engine: sa.Engine, make_writer: Callable[..., BatchWriter]
) -> None:
    writer = make_writer(ledger_engine, max_delay=60)  # only the flushes wake it
    results: list[bool] = []

    def put_and_flush() -> None:
        for _ in range(25):
            writer.put_call(a_call())
        results.append(writer.flush())

    threads = [threading.Thread(target=put_and_flush) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [True] * 8 == results
    assert 200 == count(ledger_engine, storage.calls)


def test_flush_with_nothing_put_returns_true_at_once(
    ledger_engine: sa.Engine, make_writer: Callable[..., BatchWriter]
) -> None:
    assert make_writer(ledger_engine).flush(timeout=0)


def test_close_writes_everything_and_stops_the_thread(
    ledger_engine: sa.Engine, make_writer: Callable[..., BatchWriter]
) -> None:
    writer = make_writer(ledger_engine, max_delay=60)
    writer.put_call(a_call())
    thread = writer._thread

    assert writer.close()

    assert 1 == count(ledger_engine, storage.calls)
    assert thread is not None
    assert not thread.is_alive()


def test_live_writers_are_flushed_at_interpreter_exit(db_url: str, engine: sa.Engine) -> None:
    schema.upgrade(engine)
    script = (
        "import sys\n"
        "from tokenledger import _storage as storage\n"
        "from tokenledger.records import CallRecord, new_id, utcnow\n"
        "from tokenledger._writer import BatchWriter\n"
        "writer = BatchWriter(storage.create_engine_for(sys.argv[1]), max_delay=3600)\n"
        "for _ in range(10):\n"
        "    writer.put_call(CallRecord(id=new_id(), run_id=None, root_run_id=None,\n"
        "        operation='chat', provider=None, requested_model=None, model=None,\n"
        "        started_at=utcnow()))\n"
        # no flush, no close: the atexit hook must write them
    )

    subprocess.run([sys.executable, "-c", script, db_url], check=True, timeout=60)

    assert 10 == count(engine, storage.calls)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_forked_child_gets_a_fresh_writer(
    ledger_engine: sa.Engine, make_writer: Callable[..., BatchWriter]
) -> None:
    writer = make_writer(ledger_engine, max_delay=60)
    for _ in range(5):
        writer.put_call(a_call())  # still in the parent's buffer at the fork
    assert 5 == writer.pending

    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a multi-threaded process is risky.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            inherited = writer.pending
            writer.put_call(a_call(run_id="from-the-child"))
            code = 0 if inherited == 0 and writer.flush(10) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)

    assert 0 == os.waitstatus_to_exitcode(status)
    assert writer.flush()
    with ledger_engine.connect() as connection:
        run_ids = list(connection.execute(sa.select(storage.calls.c.run_id)).scalars())
    assert [None] * 5 + ["from-the-child"] == sorted(run_ids, key=lambda r: r is not None)


# -- when the database fails ------------------------------------------------------------


def unreachable_url(db_url: str, tmp_path: Path) -> str:
    if db_url.startswith("sqlite"):
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        return f"sqlite:///{blocker / 'ledger.db'}"  # its directory is a regular file
    return "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/test"  # nothing listens on 1


def test_a_down_database_never_raises_into_put_or_flush(
    db_url: str,
    tmp_path: Path,
    make_engine: Callable[..., sa.Engine],
    make_writer: Callable[..., BatchWriter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = make_writer(make_engine(unreachable_url(db_url, tmp_path)), max_delay=0.05)

    with caplog.at_level(logging.DEBUG, logger="tokenledger.writer"):
        for _ in range(100):
            writer.put_call(a_call())
        assert not writer.flush(timeout=0.5)
        writer.put_run(a_run(new_id()))
        writer.put_price(a_price("p1"))
        assert not writer.flush(timeout=0.5)

    assert 102 == writer.pending  # every row kept
    assert writer.stats.failures >= 2
    assert 0 == writer.stats.rows_written
    warnings_logged = [
        r for r in caplog.records if r.name == "tokenledger.writer" and r.levelno >= logging.WARNING
    ]
    assert 1 == len(warnings_logged)  # once per outage, not once per retry
    assert "s3cret" not in caplog.text


def test_the_writer_recovers_when_the_database_comes_back(
    engine: sa.Engine, make_writer: Callable[..., BatchWriter], caplog: pytest.LogCaptureFixture
) -> None:
    """Tables missing (a real database error) until someone runs the upgrade."""
    writer = make_writer(engine, max_delay=0.05)
    calls = [a_call() for _ in range(50)]

    with caplog.at_level(logging.WARNING, logger="tokenledger.writer"):
        for call in calls:
            writer.put_call(call)
        assert not writer.flush(timeout=0.5)
        failures = writer.stats.failures

        schema.upgrade(engine)

        assert writer.flush(timeout=15)  # backoff is at most 5 s

    assert failures >= 1
    assert sorted(call.id for call in calls) == sorted(call_ids(engine))
    assert 0 == writer.pending
    assert ["cannot write", "resumed"] == [
        "cannot write" if "cannot write" in r.getMessage() else "resumed"
        for r in caplog.records
        if r.name == "tokenledger.writer"
    ]


def test_a_row_the_database_refuses_does_not_stop_the_others(
    ledger_engine: sa.Engine,
    make_writer: Callable[..., BatchWriter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = make_writer(ledger_engine, max_delay=60)
    good = [a_call() for _ in range(20)]
    bad = [
        a_call(operation=None),  # NOT NULL: refused by the database
        a_call(started_at=dt.datetime(2025, 1, 1)),  # noqa: DTZ001 - naive: refused by the type
    ]

    for call in good[:10] + bad[:1] + good[10:] + bad[1:]:
        writer.put_call(call)
    with caplog.at_level(logging.ERROR, logger="tokenledger.writer"):
        assert writer.flush()

    assert sorted(call.id for call in good) == sorted(call_ids(ledger_engine))
    assert sorted(call.id for call in bad) == sorted(r.row["id"] for r in writer.rejected)
    assert 2 == writer.stats.rejected
    assert 2 == len([r for r in caplog.records if r.name == "tokenledger.writer"])


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"started_at": dt.datetime(2025, 1, 1)}, "calls.started_at: ValueError: Datetime"),  # noqa: DTZ001
        ({"ended_at": "2025-01-01T00:00:00+00:00"}, "calls.ended_at: TypeError: Expected a"),
        ({"cost_usd": 0.1}, "calls.cost_usd: TypeError: A money amount must be a Decimal"),
        ({"cost_usd": Decimal("NaN")}, "calls.cost_usd: ValueError: A money amount must be"),
        ({"finish_reasons": [object()]}, "calls.finish_reasons: TypeError: Object of type"),
        ({"streamed": "yes"}, "calls.streamed: TypeError: Not a boolean value"),
        ({"model": {"not": "text"}}, ""),  # refused by the driver, not by a column type
    ],
    ids=["naive-time", "text-time", "float-amount", "nan-amount", "json", "bool", "dict-as-text"],
)
def test_a_value_the_column_type_refuses_rejects_its_row_alone(
    ledger_engine: sa.Engine,
    make_writer: Callable[..., BatchWriter],
    values: dict[str, Any],
    error: str,
) -> None:
    writer = make_writer(ledger_engine, max_delay=60)
    good = [a_call() for _ in range(9)]
    bad = a_call(**values)

    for call in [*good[:4], bad, *good[4:]]:
        writer.put_call(call)
    assert writer.flush()

    assert sorted(call.id for call in good) == sorted(call_ids(ledger_engine))
    (rejected,) = writer.rejected
    assert (bad.id, "calls") == (rejected.row["id"], rejected.table)
    assert bad.as_row() == rejected.row
    assert rejected.error.startswith(error)


# -- options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_delay": 0}, r"^`max_delay` is 0; it must be a number of seconds greater than 0"),
        ({"max_batch": 0}, r"^`max_batch` is 0; it must be a whole number of rows"),
        ({"durability": "sometimes"}, r"^`durability` is 'sometimes'; it must be 'batched'"),
        ({"max_buffer_rows": 0}, r"^`max_buffer_rows` is 0; it must be a whole number of rows"),
        ({"max_buffer_rows": True}, r"^`max_buffer_rows` is True"),
    ],
    ids=["max_delay", "max_batch", "durability", "max_buffer_rows", "max_buffer_rows-bool"],
)
def test_a_bad_option_is_refused_by_name_and_value(
    ledger_engine: sa.Engine, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        BatchWriter(ledger_engine, **options)


def test_under_the_memory_limit_a_batched_put_touches_no_file(
    ledger_engine: sa.Engine, make_writer: Callable[..., BatchWriter], tmp_path: Path
) -> None:
    writer = make_writer(ledger_engine, max_buffer_rows=1000)

    for _ in range(999):
        writer.put_call(a_call())
    assert writer.flush()

    assert 0 == writer.stats.spilled
    assert not (tmp_path / "spool").exists()


# -- how fast --------------------------------------------------------------------------


@pytest.mark.slow
def test_throughput_of_100k_calls(
    ledger_engine: sa.Engine, make_writer: Callable[..., BatchWriter]
) -> None:
    """Reports rows/s (run with -s to see it); asserts only that every row landed."""
    writer = make_writer(ledger_engine)
    calls = [a_call(f"run{i % 100}") for i in range(100_000)]

    started = time.perf_counter()
    for call in calls:
        writer.put_call(call)
    put_done = time.perf_counter()
    assert writer.flush(timeout=300)
    finished = time.perf_counter()

    print(
        f"\n{ledger_engine.dialect.name}: {len(calls) / (finished - started):,.0f} rows/s "
        f"through the writer; put() {(put_done - started) / len(calls) * 1e6:.2f} us per call"
    )
    assert 100_000 == count(ledger_engine, storage.calls)
