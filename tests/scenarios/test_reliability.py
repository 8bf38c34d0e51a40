"""Faults: the database goes away, memory fills up, a process is killed, many write at once.

Each fault test prints its figures (run with ``-s`` to see them); docs/reliability.md
quotes them. Storage tests run on SQLite and PostgreSQL (conftest's ``db_url``).

The outage test needs a PostgreSQL it can take away without disturbing anyone else who
uses the test server: `CuttableProxy` is a TCP proxy on loopback, in this process, in
front of the test server. Cutting it resets every connection through it and refuses new
ones, as a stopped server does; restoring it listens on the same port again. Set
``TOKENLEDGER_TEST_OUTAGE_SECONDS`` to change the outage's length (default 30 s).
"""
# Expected value first, on purpose (the suite's convention).

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tokenledger import Ledger
from tokenledger import _schema as schema
from tokenledger import _storage as storage
from tokenledger._spool import Spool, decode_line, encode_row, ledger_key, spool_directory
from tokenledger._writer import BatchWriter
from tokenledger.records import CallRecord, PriceRecord, RunRecord, new_id, utcnow

pytestmark = pytest.mark.slow  # outages, killed processes and many writers

OUTAGE_SECONDS = float(os.environ.get("TOKENLEDGER_TEST_OUTAGE_SECONDS", "30"))
WRITER_OPTIONS = ("durability", "max_buffer_rows", "spool_dir", "max_batch")


# -- helpers ---------------------------------------------------------------------------


def open_ledger(url: str, *, flush_interval: float = 1.0, **options: Any) -> Ledger:
    """A ledger whose writer has ``options`` (durability, max_buffer_rows, spool_dir...).

    Passed to `Ledger` when it takes them; until then its writer is replaced by one made
    with them (the same thing `Ledger.__init__` will do).
    """
    writer_options = {k: options.pop(k) for k in WRITER_OPTIONS if k in options}
    accepted = inspect.signature(Ledger).parameters
    if all(name in accepted for name in writer_options if name != "max_batch"):
        max_batch = writer_options.pop("max_batch", None)
        ledger = Ledger(url, flush_interval=flush_interval, **options, **writer_options)
        if max_batch is not None:
            ledger._writer.max_batch = max_batch
        return ledger
    ledger = Ledger(url, flush_interval=flush_interval, **options)
    ledger._writer.close()
    ledger._writer = BatchWriter(ledger.engine, max_delay=flush_interval, **writer_options)
    return ledger


OPEN_LEDGER_SOURCE = inspect.getsource(open_ledger)
WORKER_PRELUDE = (
    "import inspect, os, sys, time, json\n"
    "from typing import Any\n"
    "from tokenledger import Ledger\n"
    "from tokenledger._writer import BatchWriter\n"
    f"WRITER_OPTIONS = {WRITER_OPTIONS!r}\n" + OPEN_LEDGER_SOURCE
)


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


def call_ids(engine: sa.Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(sa.select(storage.calls.c.id)).scalars())


def spool_files(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(name for name in os.listdir(directory) if name.endswith(".jsonl"))


def assert_run_totals_equal_their_calls(engine: sa.Engine) -> int:
    """Every ended run's totals equal the sum of the calls below it; returns how many."""
    r, c = storage.runs, storage.calls
    with engine.connect() as connection:
        runs = [row._asdict() for row in connection.execute(sa.select(r))]
        calls = [row._asdict() for row in connection.execute(sa.select(c))]
    children: dict[str, list[str]] = {}
    for run in runs:
        if run["parent_id"] is not None:
            children.setdefault(run["parent_id"], []).append(run["id"])
    by_run: dict[str | None, list[dict[str, Any]]] = {}
    for call in calls:
        by_run.setdefault(call["run_id"], []).append(call)
    checked = 0
    for run in runs:
        if run["status"] == "running":
            continue
        subtree, stack = [], [run["id"]]
        while stack:
            current = stack.pop()
            subtree.append(current)
            stack.extend(children.get(current, []))
        below = [call for run_id in subtree for call in by_run.get(run_id, [])]
        expected = {
            "calls": len(below),
            "input_tokens": sum(call["input_tokens"] for call in below),
            "output_tokens": sum(call["output_tokens"] for call in below),
            "cost_usd": sum((call["cost_usd"] or Decimal(0) for call in below), Decimal(0)),
        }
        assert expected == {name: run[name] for name in expected}, run["id"]
        checked += 1
    return checked


@pytest.fixture
def postgres_only(db_url: str) -> str:
    if not db_url.startswith("postgresql"):
        pytest.skip("this fault is taken on PostgreSQL")
    return db_url


# -- the spool's format ---------------------------------------------------------------


def test_a_spooled_call_run_and_price_come_back_exactly() -> None:
    call = a_call("r1", streamed=True, max_tokens=500, trace_id="a" * 32, span_id="b" * 16)
    run = a_run(
        "r1",
        tags={"user": "42", "q": "'; DROP TABLE runs; --", "ü": "😀"},
        cost_usd=Decimal("1234.123456789012"),
        ended_at=utcnow(),
        status="ok",
        outcome="resolved",
        outcome_value=Decimal("4.00"),
    )
    price = PriceRecord(
        id="p1",
        model="gpt-4o-mini",
        provider="openai",
        input_per_token=Decimal("1.5E-7"),
        output_per_token=Decimal("0.0000006"),
        cache_read_per_token=None,
        cache_write_per_token=None,
        reasoning_per_token=None,
        tiers=[{"above_input_tokens": 200000, "input_per_token": "0.0000003"}],
        source="user",
    )

    for table, row in (
        ("calls", call.as_row()),
        ("runs", run.as_row()),
        ("prices", price.as_row()),
    ):
        assert (table, row) == decode_line(encode_row(table, row))


def test_the_ledger_key_ignores_the_password(tmp_path: Path) -> None:
    one = sa.make_url("postgresql+psycopg://u:secret@db:5432/ledger?options=-csearch_path%3Dx")
    other = sa.make_url("postgresql://u:other@db:5432/ledger?options=-csearch_path%3Dx")
    elsewhere = sa.make_url("postgresql://u:secret@db:5432/ledger?options=-csearch_path%3Dy")

    assert ledger_key(one) == ledger_key(other)
    assert ledger_key(one) != ledger_key(elsewhere)
    assert "secret" not in str(spool_directory(one))


def test_the_default_spool_sits_next_to_a_sqlite_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOKENLEDGER_SPOOL_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    sqlite_url = sa.make_url(f"sqlite:///{tmp_path / 'ledger.db'}")
    postgres_url = sa.make_url("postgresql://u@db/ledger")

    assert tmp_path / "ledger.db-spool" == spool_directory(sqlite_url)
    assert tmp_path / "cache" / "tokenledger" / "spool" / ledger_key(
        postgres_url
    ) == spool_directory(postgres_url)
    monkeypatch.setenv("TOKENLEDGER_SPOOL_DIR", str(tmp_path / "spools"))
    assert tmp_path / "spools" / ledger_key(postgres_url) == spool_directory(postgres_url)


@pytest.mark.parametrize("durable", [False, True], ids=["batched", "durable"])
def test_spool_files_are_readable_by_their_owner_only(tmp_path: Path, durable: bool) -> None:
    old = os.umask(0o022)
    try:
        spool = Spool(tmp_path / "spool" / "key", "key", durable=durable)
        spool.append("calls", a_call().as_row())
    finally:
        os.umask(old)

    (name,) = spool_files(spool.directory)
    assert 0o700 == stat.S_IMODE(os.stat(spool.directory).st_mode)
    assert 0o600 == stat.S_IMODE(os.stat(spool.directory / name).st_mode)
    spool.release()


def test_a_torn_last_line_is_ignored_and_a_corrupt_line_kept_for_inspection(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "s", "key", durable=False)
    rows = [a_call().as_row() for _ in range(3)]
    for row in rows:
        spool.append("calls", row)
    assert 3 == spool.release()
    (name,) = spool_files(spool.directory)
    path = spool.directory / name
    lines = path.read_bytes().splitlines(keepends=True)
    # A line mangled in the middle, and a last line cut short by a crash mid-write.
    corrupt, torn = b'{"t":"calls","r":{"id":\n', b'{"t":"ca'
    path.write_bytes(lines[0] + lines[1] + corrupt + lines[2] + lines[3] + torn)

    reader = Spool(tmp_path / "s", "key", durable=False)
    assert 4 == reader.claim_orphans()  # lines, counted before they are read
    (segment,) = reader.seal()
    read = [row for batch, _ in reader.read(segment, 100) for _, row in batch]
    reader.remove(segment)

    assert [row["id"] for row in rows] == [row["id"] for row in read]
    assert [f"{name}.corrupt"] == sorted(os.listdir(reader.directory))


def test_a_spool_of_another_ledger_is_left_alone(tmp_path: Path) -> None:
    theirs = Spool(tmp_path / "s", "their-key", durable=False)
    theirs.append("calls", a_call().as_row())
    theirs.release()

    ours = Spool(tmp_path / "s", "our-key", durable=False)

    assert 0 == ours.claim_orphans()
    assert not ours.has_rows
    assert 1 == len(spool_files(tmp_path / "s"))


def test_a_live_writers_spool_is_never_taken_by_another(tmp_path: Path) -> None:
    owner = Spool(tmp_path / "s", "key", durable=True)
    owner.append("calls", a_call().as_row())

    other = Spool(tmp_path / "s", "key", durable=True)

    assert 0 == other.claim_orphans()  # flock: its owner is alive
    assert 1 == owner.release()
    assert 1 == other.claim_orphans()  # and once it lets go, it is an orphan
    other.release()


# -- the writer and its spool --------------------------------------------------------------


@pytest.fixture
def make_writer(tmp_path: Path) -> Iterator[Callable[..., BatchWriter]]:
    writers: list[BatchWriter] = []

    def make(engine: sa.Engine, **options: Any) -> BatchWriter:
        options.setdefault("spool_dir", tmp_path / "spool")
        writer = BatchWriter(engine, **options)
        writers.append(writer)
        return writer

    yield make
    for writer in writers:
        writer.close(timeout=1)


def test_rows_beyond_the_memory_limit_are_spooled_then_written_once_the_database_is_back(
    engine: sa.Engine, make_writer: Callable[..., BatchWriter]
) -> None:
    """No tables (a real database error) until someone runs the upgrade."""
    writer = make_writer(engine, max_delay=0.05, max_buffer_rows=10)
    calls = [a_call() for _ in range(500)]

    most_in_memory = 0
    for call in calls:
        writer.put_call(call)
        most_in_memory = max(most_in_memory, writer.memory_rows)
    assert not writer.flush(timeout=0.5)
    spooled = writer.stats.spilled
    on_disk = spool_files(writer.spool.directory)
    schema.upgrade(engine)
    assert writer.flush(timeout=15)

    assert most_in_memory <= 10
    assert spooled >= 490
    assert on_disk
    assert sorted(call.id for call in calls) == sorted(call_ids(engine))
    assert [] == spool_files(writer.spool.directory)  # replayed, then removed
    assert 0 == writer.pending


def test_in_an_outage_rows_leave_memory_for_the_spool(
    engine: sa.Engine, make_writer: Callable[..., BatchWriter]
) -> None:
    writer = make_writer(engine, max_delay=0.05)  # a memory limit it never reaches
    calls = [a_call() for _ in range(300)]

    for call in calls:
        writer.put_call(call)
    deadline = time.monotonic() + 5
    while writer.memory_rows and time.monotonic() < deadline:
        time.sleep(0.05)
    in_memory = writer.memory_rows
    schema.upgrade(engine)

    assert 0 == in_memory  # a crash now would lose nothing
    assert writer.flush(timeout=15)
    assert sorted(call.id for call in calls) == sorted(call_ids(engine))


def test_closing_in_an_outage_leaves_the_rows_for_the_next_writer(
    engine: sa.Engine, make_writer: Callable[..., BatchWriter]
) -> None:
    closing = make_writer(engine, max_delay=60)  # rows stay in memory until close
    calls = [a_call() for _ in range(50)]
    for call in calls:
        closing.put_call(call)

    assert not closing.close(timeout=0.5)
    assert 1 == len(spool_files(closing.spool.directory))
    schema.upgrade(engine)
    next_writer = make_writer(engine)

    assert next_writer.flush(timeout=10)
    assert sorted(call.id for call in calls) == sorted(call_ids(engine))
    assert [] == spool_files(next_writer.spool.directory)


def test_a_durable_put_is_on_disk_before_it_returns(
    engine: sa.Engine, make_writer: Callable[..., BatchWriter]
) -> None:
    schema.upgrade(engine)
    writer = make_writer(engine, durability="durable", max_delay=60)
    call = a_call()

    writer.put_call(call)

    (name,) = spool_files(writer.spool.directory)
    lines = (writer.spool.directory / name).read_bytes().splitlines()
    assert ("calls", call.as_row()) == decode_line(lines[-1])
    assert writer.flush()
    assert [call.id] == call_ids(engine)
    assert [] == spool_files(writer.spool.directory)


def test_a_durable_writer_flushes_under_a_steady_stream_of_puts(
    engine: sa.Engine, make_writer: Callable[..., BatchWriter]
) -> None:
    schema.upgrade(engine)
    writer = make_writer(engine, durability="durable", max_delay=0.05)
    stop = threading.Event()

    def keep_putting() -> None:
        while not stop.is_set():
            writer.put_call(a_call())

    putter = threading.Thread(target=keep_putting)
    putter.start()
    try:
        time.sleep(0.2)
        assert writer.flush(timeout=10)  # never waits for rows put after it
    finally:
        stop.set()
        putter.join()
    assert writer.flush(timeout=10)
    assert writer.stats.spilled == len(call_ids(engine))


@pytest.mark.parametrize("order", ["end-first", "start-first"])
def test_a_run_never_moves_backwards_whatever_order_its_states_arrive_in(
    engine: sa.Engine, make_writer: Callable[..., BatchWriter], order: str
) -> None:
    """States replayed from a spool can arrive after newer ones were written."""
    schema.upgrade(engine)
    writer = make_writer(engine)
    run_id = new_id()
    started = a_run(run_id)
    ended = a_run(run_id, status="ok", ended_at=utcnow(), calls=3, cost_usd=Decimal("0.5"))
    late_call = a_run(run_id, status="ok", ended_at=ended.ended_at, calls=4, cost_usd=Decimal(1))

    states = [late_call, ended, started] if order == "end-first" else [started, ended, late_call]
    for state in states:
        writer.put_run(state)
        assert writer.flush()

    with engine.connect() as connection:
        stored = connection.execute(
            sa.select(storage.runs.c.status, storage.runs.c.calls, storage.runs.c.cost_usd)
        ).one()
    assert ("ok", 4, Decimal(1)) == tuple(stored)


def test_when_the_spool_cannot_be_written_rows_stay_in_memory(
    engine: sa.Engine,
    make_writer: Callable[..., BatchWriter],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    writer = make_writer(engine, max_delay=0.05, max_buffer_rows=5, spool_dir=blocker)
    calls = [a_call() for _ in range(20)]

    with caplog.at_level("ERROR", logger="tokenledger.writer"):
        for call in calls:
            writer.put_call(call)
        assert not writer.flush(timeout=0.5)
    schema.upgrade(engine)

    assert writer.flush(timeout=15)
    assert sorted(call.id for call in calls) == sorted(call_ids(engine))
    assert writer.stats.spool_errors >= 15
    assert 1 == len([r for r in caplog.records if "cannot write to its spool" in r.getMessage()])


# -- the database goes away ------------------------------------------------------------------


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 to ``upstream`` that can be cut and restored.

    Cut: the listening socket closes (new connections are refused) and every open
    connection is shut down, as when a server stops. Restore: it listens again on the
    same port.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=2)
        self._threads = []

    restore = start

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            server.settimeout(None)
            with self._lock:
                self._sockets.update((client, server))
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def proxy(postgres_only: str) -> Iterator[CuttableProxy]:
    url = sa.make_url(postgres_only)
    proxy = CuttableProxy((url.host or "127.0.0.1", url.port or 5432))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.cut()  # always: no thread or port is left behind


SHORT_OUTAGE_SECONDS = min(OUTAGE_SECONDS, 5.0)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("path", ["litellm", "record_call"])
def test_an_outage_of_the_database_loses_and_duplicates_nothing(
    postgres_only: str, proxy: CuttableProxy, tmp_path: Path, path: str
) -> None:
    """1,000 calls in 100 runs; PostgreSQL disappears after 300 of them and comes back
    ``OUTAGE_SECONDS`` later, 400 calls on; the agent never notices and no row is lost.

    ``litellm``: real ``litellm.completion(mock_response=...)`` calls captured by the
    ledger, for the full outage. ``record_call``: `Ledger.record_call`, the path of
    integrations' calls, for a shorter one (``SHORT_OUTAGE_SECONDS``).
    """
    outage = OUTAGE_SECONDS if path == "litellm" else SHORT_OUTAGE_SECONDS
    through_proxy = (
        sa.make_url(postgres_only)
        .set(host="127.0.0.1", port=proxy.port)
        .render_as_string(hide_password=False)
    )
    ledger = open_ledger(
        through_proxy,
        flush_interval=0.2,
        capture=path == "litellm",
        record_calls_outside_runs=False,
        max_buffer_rows=100,
        spool_dir=tmp_path / "spool",
    )
    direct = storage.create_engine_for(postgres_only)
    if path == "litellm":
        import litellm

        messages = [{"role": "user", "content": "Which invoice is overdue?"}]

        def call() -> None:
            litellm.completion(model="gpt-4o-mini", messages=messages, mock_response="ok")

        call()  # warm-up, outside any run: not recorded
    else:

        def call() -> None:
            ledger.record_call("gpt-4o-mini", input_tokens=1200, output_tokens=300)

    pause = outage / 400
    slowest_in_outage = 0.0
    most_in_memory = 0
    outage_started = restored_at = 0.0
    try:
        made = 0
        for _ in range(100):
            with ledger.run("triage", tags={"tenant": "acme"}):
                for _ in range(10):
                    if made == 300:
                        proxy.cut()
                        outage_started = time.monotonic()
                    if made == 700:
                        time.sleep(max(0.0, outage_started + outage - time.monotonic()))
                        proxy.restore()
                        restored_at = time.monotonic()
                    started = time.perf_counter()
                    call()
                    made += 1
                    if 300 <= made < 700:
                        slowest_in_outage = max(slowest_in_outage, time.perf_counter() - started)
                        most_in_memory = max(most_in_memory, ledger._writer.memory_rows)
                        time.sleep(pause)
        assert ledger.flush(timeout=60)
        caught_up = time.monotonic() - restored_at
        stats = ledger._writer.stats

        with direct.connect() as connection:
            rows, distinct = connection.execute(
                sa.select(sa.func.count(), sa.func.count(sa.distinct(storage.calls.c.id)))
            ).one()
            runs = connection.execute(
                sa.select(sa.func.count()).select_from(storage.runs)
            ).scalar_one()
        checked = assert_run_totals_equal_their_calls(direct)
    finally:
        ledger.close(timeout=5)
        direct.dispose()

    print(
        f"\noutage of {outage:.0f} s ({path}): 1000 calls made, {rows} written, "
        f"{1000 - rows} lost, {rows - distinct} duplicated; {stats.spilled} spooled, "
        f"{stats.replayed} replayed, {stats.failures} failed attempts; at most "
        f"{most_in_memory} rows in memory; slowest call in the outage "
        f"{slowest_in_outage * 1000:.1f} ms; caught up {caught_up:.1f} s after the "
        "database came back"
    )
    assert (1000, 1000) == (rows, distinct)
    assert 100 == runs == checked
    assert stats.failures >= 1
    assert stats.spilled >= 300
    # The rows waiting (max_buffer_rows) and the batch being retried, taken from them.
    assert most_in_memory <= 2 * 100 + 1
    assert slowest_in_outage < 0.5  # no call waits for the database
    assert [] == spool_files(ledger._writer.spool.directory)


# -- a process is killed ---------------------------------------------------------------------

KILLED_WORKER = WORKER_PRELUDE + textwrap.dedent(
    """
    url, spool_dir, durability = sys.argv[1:4]
    ledger = open_ledger(
        url, flush_interval=0.25, capture=False, durability=durability, spool_dir=spool_dir
    )
    out = sys.stdout
    while True:
        with ledger.run("worker"):
            for _ in range(5):
                call = ledger.record_call("gpt-4o-mini", input_tokens=100, output_tokens=20)
                # Written only once record_call has returned.
                out.write(f"{call.id} {time.time()}\\n")
                out.flush()
                time.sleep(0.0005)
    """
)


# The database is unreachable all along (its tables do not exist yet): the worker uses a
# BatchWriter directly, since a Ledger would create them.
KILLED_IN_AN_OUTAGE_WORKER = textwrap.dedent(
    """
    import sys, time
    from tokenledger import _storage as storage
    from tokenledger.records import CallRecord, new_id, utcnow
    from tokenledger._writer import BatchWriter
    url, spool_dir = sys.argv[1:3]
    writer = BatchWriter(storage.create_engine_for(url), max_delay=0.25, spool_dir=spool_dir)
    out = sys.stdout
    while True:
        call = CallRecord(id=new_id(), run_id=None, root_run_id=None, operation="chat",
            provider="openai", requested_model="gpt-4o-mini", model="gpt-4o-mini",
            started_at=utcnow(), input_tokens=100, output_tokens=20)
        writer.put_call(call)
        out.write(f"{call.id} {time.time()}\\n")
        out.flush()
        time.sleep(0.0005)
    """
)


@pytest.mark.parametrize("durability", ["batched", "durable", "batched-in-an-outage"])
def test_a_killed_worker_loses_at_most_the_documented_bound(
    db_url: str, engine: sa.Engine, tmp_path: Path, durability: str
) -> None:
    """SIGKILL after 1.5 s of work. ``durable``: every call that returned is in the
    ledger once another process has replayed the spool. ``batched``: the lost calls are
    those of the last ``max_delay`` (0.25 s) before the kill, plus the commit under way.
    ``batched-in-an-outage``: the database was unreachable all along; the lost calls are
    those put since the writer last moved its memory to the spool (one backoff interval,
    at most 5 s; about 0.4 s here, 1.5 s into the outage)."""
    if durability != "batched-in-an-outage":
        schema.upgrade(engine)
    spool_dir = tmp_path / "spool"
    script = KILLED_IN_AN_OUTAGE_WORKER if durability == "batched-in-an-outage" else KILLED_WORKER
    worker = subprocess.Popen(
        [sys.executable, "-c", script, db_url, str(spool_dir), durability],
        stdout=subprocess.PIPE,
    )
    assert worker.stdout is not None
    reported: dict[str, float] = {}
    first = worker.stdout.readline()  # the first call has returned: the worker is running
    deadline = time.monotonic() + 1.5
    lines = [first]
    while time.monotonic() < deadline:
        lines.append(worker.stdout.readline())
    worker.send_signal(signal.SIGKILL)
    killed_at = time.time()
    lines.extend(worker.stdout.readlines())
    worker.wait(timeout=10)
    for line in lines:
        if line.endswith(b"\n"):
            call_id, at = line.decode().split()
            reported[call_id] = float(at)

    if durability == "batched-in-an-outage":
        schema.upgrade(engine)  # the database is back
    replayer = BatchWriter(engine, spool_dir=spool_dir)  # another process, same ledger
    try:
        assert replayer.flush(timeout=30)
        replayed = replayer.stats.replayed
    finally:
        replayer.close(timeout=5)
    stored = set(call_ids(engine))
    lost = set(reported) - stored
    unreported = stored - set(reported)
    window = killed_at - min((reported[call_id] for call_id in lost), default=killed_at)

    print(
        f"\nSIGKILL, {durability} on {engine.dialect.name}: {len(reported)} calls returned, "
        f"{len(stored)} in the ledger ({replayed} replayed from the spool), {len(lost)} lost "
        f"(all returned in the last {window:.2f} s), 0 duplicated"
    )
    assert len(unreported) <= 1  # a call recorded, then killed before it was reported
    if durability == "durable":
        assert set() == lost
    elif durability == "batched":
        assert window < 0.25 + 1.0  # max_delay, plus a commit under way on a slow machine
    else:
        assert replayed > 0
        assert window < 0.8 + 1.0  # the last backoff interval (0.1 + 0.2 + 0.4 s), plus slack
    assert_run_totals_equal_their_calls(engine)
    assert [] == spool_files(spool_directory(engine.url, spool_dir))


# -- many writers at once ----------------------------------------------------------------------

CONCURRENT_WORKER = WORKER_PRELUDE + textwrap.dedent(
    """
    import asyncio, random, threading
    url, out_path, process = sys.argv[1], sys.argv[2], sys.argv[3]
    ledger = open_ledger(url, flush_interval=0.2, capture=False)
    recorded = []  # list.append is atomic
    start = threading.Barrier(17)

    def calls(n, rng):
        for _ in range(n):
            call = ledger.record_call(
                "gpt-4o-mini",
                input_tokens=rng.randrange(1, 5000),
                output_tokens=rng.randrange(0, 800),
            )
            recorded.append(call.id)

    def in_a_thread(t):
        rng = random.Random(f"{process}-{t}")
        start.wait()
        for r in range(RUNS):
            with ledger.run("threaded", tags={"process": process, "thread": str(t)}):
                calls(1, rng)
                with ledger.run("threaded-child"):
                    calls(3, rng)

    async def in_a_task(t, rng):
        for r in range(RUNS):
            async with ledger.run("async", tags={"process": process, "task": str(t)}):
                calls(1, rng)
                await asyncio.sleep(0)
                async with ledger.run("async-child"):
                    for _ in range(3):
                        calls(1, rng)
                        await asyncio.sleep(0)

    async def tasks():
        start.wait()
        await asyncio.gather(*(in_a_task(t, random.Random(f"{process}-a{t}")) for t in range(16)))

    RUNS = int(sys.argv[4])
    threads = [threading.Thread(target=in_a_thread, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    asyncio.run(tasks())
    for thread in threads:
        thread.join()
    ledger.close()
    with open(out_path, "w") as out:
        json.dump(recorded, out)
    """
)


def test_4_processes_x_16_threads_and_16_tasks_write_every_row_exactly_once(
    db_url: str, engine: sa.Engine, tmp_path: Path
) -> None:
    schema.upgrade(engine)
    runs_each = 5
    started = time.perf_counter()
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CONCURRENT_WORKER,
                db_url,
                str(tmp_path / f"process-{p}.json"),
                str(p),
                str(runs_each),
            ]
        )
        for p in range(4)
    ]
    for worker in workers:
        assert 0 == worker.wait(timeout=120)
    elapsed = time.perf_counter() - started
    recorded = [
        call_id
        for p in range(4)
        for call_id in json.loads((tmp_path / f"process-{p}.json").read_text())
    ]

    stored = call_ids(engine)
    with engine.connect() as connection:
        runs = connection.execute(sa.select(sa.func.count()).select_from(storage.runs)).scalar_one()
    checked = assert_run_totals_equal_their_calls(engine)
    print(
        f"\n4 processes x (16 threads + 16 tasks) on {engine.dialect.name}: {len(recorded)} "
        f"calls recorded, {len(stored)} stored, {len(set(stored))} distinct; {runs} runs, "
        f"each equal to the sum of its calls; {elapsed:.1f} s"
    )
    expected_calls = 4 * 32 * runs_each * 4
    assert expected_calls == len(recorded) == len(stored)
    assert sorted(recorded) == sorted(stored)
    assert 4 * 32 * runs_each * 2 == runs == checked


# -- what durability costs -------------------------------------------------------------------


def test_what_a_put_costs_in_each_mode(
    tmp_path: Path, make_writer: Callable[..., BatchWriter]
) -> None:
    """Reports the cost of ``put_call`` (run with -s); asserts only loose bounds."""
    engine = storage.create_engine_for(f"sqlite:///{tmp_path / 'ledger.db'}")
    schema.upgrade(engine)
    try:
        batched = make_writer(engine, max_delay=60, max_batch=10**9)
        durable = make_writer(engine, durability="durable", max_delay=60, max_batch=10**9)
        calls = [a_call() for _ in range(100_001)]
        batched.put_call(calls.pop())  # starts the thread

        started = time.perf_counter()
        for call in calls:
            batched.put_call(call)
        per_batched = (time.perf_counter() - started) / len(calls)

        sequential = [a_call() for _ in range(200)]
        started = time.perf_counter()
        for call in sequential:
            durable.put_call(call)
        per_durable = (time.perf_counter() - started) / len(sequential)

        threaded = [[a_call() for _ in range(50)] for _ in range(16)]

        def put_all(share: list[CallRecord]) -> None:
            for call in share:
                durable.put_call(call)

        threads = [threading.Thread(target=put_all, args=(share,)) for share in threaded]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        per_durable_16 = (time.perf_counter() - started) / (16 * 50)
        batched._queue.clear()
    finally:
        for writer in (batched, durable):
            writer.close(timeout=30)
        engine.dispose()

    print(
        f"\nput_call: batched {per_batched * 1e9:.0f} ns; durable {per_durable * 1e6:.0f} µs "
        f"one thread, {per_durable_16 * 1e6:.0f} µs per call with 16 threads "
        "(fdatasync shared)"
    )
    assert per_batched < 5e-6
    assert per_durable < 0.1


def test_a_durable_call_is_recorded_before_record_call_returns(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = open_ledger(url, capture=False, durability="durable", spool_dir=tmp_path / "s")
    try:
        ledger._writer.max_delay = 60  # nothing reaches the database by itself
        call = ledger.record_call("gpt-4o-mini", input_tokens=10, output_tokens=5)
        directory = ledger._writer.spool.directory
        spooled = [
            (table, row["id"])
            for name in spool_files(directory)
            for line in (directory / name).read_bytes().splitlines()[1:]
            for table, row in [decode_line(line)]
        ]
        assert [("calls", call.id)] == [item for item in spooled if item[0] == "calls"]
    finally:
        ledger.close()


def test_record_call_latency_is_in_the_durable_row(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with open_ledger(url, capture=False, durability="durable", spool_dir=tmp_path) as ledger:
        call = ledger.record_call("gpt-4o-mini", input_tokens=10, latency_ms=250.0)
        assert ledger.flush()
        with ledger.engine.connect() as connection:
            stored = connection.execute(
                sa.select(storage.calls.c.latency_ms).where(storage.calls.c.id == call.id)
            ).scalar_one()
    assert 250.0 == stored


def test_the_run_upsert_on_conflict_keeps_outcomes_set_by_another_process(
    engine: sa.Engine, make_writer: Callable[..., BatchWriter]
) -> None:
    schema.upgrade(engine)
    writer = make_writer(engine)
    run_id = new_id()
    writer.put_run(a_run(run_id, status="ok", ended_at=utcnow(), calls=1))
    assert writer.flush()
    with engine.begin() as connection:
        connection.execute(
            sa.update(storage.runs)
            .where(storage.runs.c.id == run_id)
            .values(outcome="resolved", outcome_at=dt.datetime.now(dt.timezone.utc))
        )

    writer.put_run(a_run(run_id, status="ok", ended_at=utcnow(), calls=1))
    assert writer.flush()

    with engine.connect() as connection:
        assert "resolved" == connection.execute(sa.select(storage.runs.c.outcome)).scalar_one()
