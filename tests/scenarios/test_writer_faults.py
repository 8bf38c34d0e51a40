"""The batch writer under real faults: a hung server, a deleted SQLite file, a spool that
cannot be written, a spool planted by someone else.

Faults are real: `faults.PgProxy` (a TCP proxy in front of the test server) stalls or
resets connections, files are really deleted, the spool really sits on a full
filesystem or behind a file size limit. The expected value comes first.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from faults import PgProxy, pg_proxy

from tokenledger import _schema as schema
from tokenledger import _storage as storage
from tokenledger._writer import BatchWriter
from tokenledger.records import CallRecord, new_id, utcnow

pytestmark = pytest.mark.slow  # real faults: stalls, SIGKILL, full disks

__all__ = ["pg_proxy"]  # a fixture, imported to be used


# -- the fault proxy itself -------------------------------------------------------------


def _select_one(url: str, *, timeout: int = 2) -> object:
    """``SELECT current_setting('search_path')`` over a fresh connection to ``url``."""
    parsed = sa.make_url(url)
    options = parsed.query.get("options")
    with psycopg.connect(
        host=parsed.host,
        port=parsed.port,
        user=parsed.username,
        dbname=parsed.database,
        options=options if isinstance(options, str) else "",
        connect_timeout=timeout,
    ) as connection:
        return connection.execute("SELECT current_setting('search_path')").fetchone()


def test_the_proxy_keeps_everything_but_host_and_port(postgres_url: str, pg_proxy: PgProxy) -> None:
    url = pg_proxy.url(postgres_url)
    original, proxied = sa.make_url(postgres_url), sa.make_url(url)

    assert (original.drivername, original.username, original.database, original.query) == (
        proxied.drivername,
        proxied.username,
        proxied.database,
        proxied.query,
    )
    assert ("127.0.0.1", pg_proxy.port) == (proxied.host, proxied.port)
    schema = str(original.query["options"]).removeprefix("-csearch_path=")
    assert (schema,) == _select_one(url)


def test_the_proxy_refuses_resets_stalls_and_passes_again(
    postgres_url: str, pg_proxy: PgProxy
) -> None:
    url = pg_proxy.url(postgres_url)
    parsed = sa.make_url(url)

    pg_proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", pg_proxy.port), timeout=2).close()

    pg_proxy.reset()
    with pytest.raises(psycopg.OperationalError):
        _select_one(url)

    # A connection opened while passing, then the server hangs: a query on it never
    # returns, and a new connection cannot even log in.
    pg_proxy.pass_through()
    held = psycopg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, dbname=parsed.database
    )
    pg_proxy.stall()
    answered = threading.Event()

    def query() -> None:
        held.execute("SELECT 1").fetchone()
        answered.set()

    worker = threading.Thread(target=query, daemon=True)
    worker.start()
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        _select_one(url, timeout=1)
    assert time.monotonic() - started >= 0.9  # it timed out; nothing refused it
    assert not answered.wait(0.5)

    # Passing again lets the held bytes through: the hung query completes.
    pg_proxy.pass_through()
    assert answered.wait(5)
    worker.join(5)
    held.close()
    assert _select_one(url) is not None

    # Resetting kills the connections that are open.
    held = psycopg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, dbname=parsed.database
    )
    pg_proxy.reset()
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")
    held.close()


def test_closing_the_proxy_leaves_no_port_open(postgres_url: str) -> None:
    with PgProxy() as proxy:
        _select_one(proxy.url(postgres_url))
        port = proxy.port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# -- helpers -------------------------------------------------------------------------------


def a_call() -> CallRecord:
    return CallRecord(
        id=new_id(),
        run_id=None,
        root_run_id=None,
        operation="chat",
        provider="openai",
        requested_model="gpt-4o-mini",
        model="gpt-4o-mini",
        started_at=utcnow(),
        ended_at=utcnow(),
        input_tokens=1200,
        output_tokens=300,
        cost_usd=Decimal("0.000285"),
        cost_source="local",
    )


def call_ids(engine: sa.Engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.execute(sa.select(storage.calls.c.id)).scalars())


def spool_files(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(name for name in directory.iterdir() if name.name.endswith(".jsonl"))


@pytest.fixture
def make_writer(tmp_path: Path) -> Iterator[Callable[..., BatchWriter]]:
    """Make writers (spool in the test's ``tmp_path``); each is closed after the test."""
    writers: list[BatchWriter] = []

    def make(engine: sa.Engine, **options: Any) -> BatchWriter:
        options.setdefault("spool_dir", tmp_path / "spool")
        writer = BatchWriter(engine, **options)
        writers.append(writer)
        return writer

    yield make
    for writer in writers:
        writer.close(timeout=1)


# -- 1. a write that hangs ------------------------------------------------------------------

# Puts one call and waits for it (the writer holds a live connection), says "ready",
# waits for "go" (the database hangs meanwhile), puts N calls, prints their ids and
# waits to be killed.
HUNG_WORKER = textwrap.dedent(
    """
    import sys, time
    from decimal import Decimal
    from tokenledger import _storage as storage
    from tokenledger.records import CallRecord, new_id, utcnow
    from tokenledger._writer import BatchWriter
    url, spool_dir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    writer = BatchWriter(storage.create_engine_for(url), max_delay=0.2, spool_dir=spool_dir)
    def a_call():
        return CallRecord(id=new_id(), run_id=None, root_run_id=None, operation="chat",
            provider="openai", requested_model="gpt-4o-mini", model="gpt-4o-mini",
            started_at=utcnow(), input_tokens=100, output_tokens=20,
            cost_usd=Decimal("0.0001"))
    writer.put_call(a_call())
    assert writer.flush(10)
    print("ready", getattr(writer, "hang_after", 1.0), flush=True)
    sys.stdin.readline()
    ids = []
    for _ in range(n):
        call = a_call()
        writer.put_call(call)
        ids.append(call.id)
        time.sleep(0.002)
    print(" ".join(ids), flush=True)
    time.sleep(3600)
    """
)


@pytest.mark.parametrize("fault", ["postgres-stalled", "sqlite-locked"])
def test_rows_waiting_on_a_hung_write_reach_the_spool_and_survive_a_sigkill(
    fault: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    make_writer: Callable[..., BatchWriter],
) -> None:
    """Issue: "kill -9 ten seconds into a stalled database lost all 437 calls made since
    the stall". The writer's write hangs (PostgreSQL behind a proxy that forwards
    nothing; SQLite locked by another connection); 437 calls are put; past the hang
    bound the process is SIGKILLed. A new writer on the same ledger writes all 437."""
    n = 437
    spool_dir = tmp_path / "spool"
    lock: sqlite3.Connection | None = None
    proxy: PgProxy | None = None
    if fault == "postgres-stalled":
        proxy = request.getfixturevalue("pg_proxy")
        url = proxy.url(request.getfixturevalue("postgres_url"))
    else:
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = storage.create_engine_for(url)
    schema.upgrade(engine)
    worker = subprocess.Popen(
        [sys.executable, "-c", HUNG_WORKER, url, str(spool_dir), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdin is not None
    assert worker.stdout is not None
    try:
        ready, hang_after = worker.stdout.readline().split()
        assert "ready" == ready
        if proxy is not None:
            proxy.stall()
        else:
            lock = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")  # every other writer waits for it
        worker.stdin.write("go\n")
        worker.stdin.flush()
        put = worker.stdout.readline().split()
        # The documented bound: hang_after, plus one watchdog tick, plus max_delay.
        time.sleep(float(hang_after) + 0.1 + 0.2 + 1.0)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
    if lock is not None:
        lock.rollback()
        lock.close()
    if proxy is not None:
        proxy.pass_through()

    replayer = make_writer(storage.create_engine_for(url), spool_dir=spool_dir)
    assert replayer.flush(timeout=30)
    stored = call_ids(engine)
    engine.dispose()
    print(
        f"\n{fault}: {len(put)} calls put during the hang, "
        f"{len(set(put) & stored)} in the ledger after a SIGKILL, "
        f"{replayer.stats.replayed} replayed from the spool"
    )
    assert n == len(put)
    assert set() == set(put) - stored


def test_a_write_to_a_stalled_server_fails_within_its_timeouts_and_resumes(
    postgres_url: str,
    pg_proxy: PgProxy,
    make_writer: Callable[..., BatchWriter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hang becomes an error the outage path handles: the stalled statement is cut
    after WRITE_TIMEOUT + the grace, a new connection gives up after CONNECT_TIMEOUT.
    Once the server answers again everything put is written. (The timeouts are made
    short here; they are 30 + 5 s and 10 s by default.)"""
    from tokenledger import _writer as writer_module

    monkeypatch.setattr(writer_module, "WRITE_TIMEOUT", 1.0)
    monkeypatch.setattr(writer_module, "_ABORT_GRACE", 0.5)
    monkeypatch.setattr(writer_module, "CONNECT_TIMEOUT", 1.0)
    url = pg_proxy.url(postgres_url)
    engine = storage.create_engine_for(url)
    schema.upgrade(engine)
    writer = make_writer(engine, max_delay=0.1)
    writer.put_call(a_call())
    assert writer.flush(timeout=10)

    pg_proxy.stall()
    calls = [a_call() for _ in range(50)]
    for call in calls:
        writer.put_call(call)
    deadline = time.monotonic() + 10
    while writer.stats.failures < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    failures, hung = writer.stats.failures, writer.stats.hung_writes
    pg_proxy.pass_through()

    assert failures >= 2  # the stalled statement, then a connection that timed out
    assert hung >= 1
    assert writer.flush(timeout=30)
    assert {call.id for call in calls} <= call_ids(engine)
    engine.dispose()


# -- 2. the SQLite ledger file is deleted ----------------------------------------------------


@pytest.mark.parametrize("deleted", ["ledger.db", "ledger.db*", "replaced"])
def test_a_deleted_sqlite_ledger_is_recreated_and_said_once(
    deleted: str,
    tmp_path: Path,
    make_writer: Callable[..., BatchWriter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue: "3,223 calls returned, 0 in the ledger, writer stats say success". The
    file is really deleted (``rm ledger.db``, or with its -wal and -shm), or another
    ledger moved over it, while the writer holds it open; every call put afterwards is
    in the ledger now at that path."""
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    engine = storage.create_engine_for(url)
    schema.upgrade(engine)
    writer = make_writer(engine, max_delay=0.05)
    before = [a_call() for _ in range(10)]
    for call in before:
        writer.put_call(call)
    assert writer.flush(timeout=10)

    if deleted == "replaced":  # mv another (empty, migrated) ledger over it
        other = storage.create_engine_for(f"sqlite:///{tmp_path / 'other.db'}")
        schema.upgrade(other)
        other.dispose()
        os.replace(tmp_path / "other.db", path)
    else:
        for name in tmp_path.glob(deleted):
            name.unlink()
    after = [a_call() for _ in range(3223)]
    with caplog.at_level("ERROR", logger="tokenledger.writer"):
        for call in after:
            writer.put_call(call)
        assert writer.flush(timeout=30)
    reader = storage.create_engine_for(url)
    stored = call_ids(reader) if path.exists() else set()
    integrity: list[Any] = []
    if path.exists():
        with reader.connect() as connection:
            integrity = [tuple(r) for r in connection.exec_driver_sql("PRAGMA integrity_check")]
    reader.dispose()
    engine.dispose()
    said = [r for r in caplog.records if "was deleted or replaced" in r.getMessage()]
    print(
        f"\nrm {deleted}: {len(after)} calls put after it, {len(stored & {c.id for c in after})}"
        f" in the ledger, {len(said)} error logged, "
        f"ledger_recreated={getattr(writer.stats, 'ledger_recreated', None)}"
    )

    if deleted == "replaced":
        # The old file's -wal stays at the path, and SQLite may apply it to the new
        # file when it is opened (SQLite's own limit: never move a live WAL database).
        assert {call.id for call in after} <= stored
    else:
        assert {call.id for call in after} == stored
    assert 1 == writer.stats.ledger_recreated
    assert 1 == len(said)
    assert [("ok",)] == integrity
    assert 0o600 == path.stat().st_mode & 0o777


# -- 3. the spool cannot be written ----------------------------------------------------------

# The database is down all along (no tables yet). Puts N calls, prints their ids, waits
# until every row left memory or 3 s passed, and exits normally (the exit flush given
# 1 s): whatever could not be spooled is lost, and must be said.
FULL_SPOOL_WORKER = textwrap.dedent(
    """
    import resource, signal, sys, time
    from tokenledger import _storage as storage, _writer as writer_module
    from tokenledger.records import CallRecord, new_id, utcnow
    from tokenledger._writer import BatchWriter
    fault, url, spool_dir, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    writer_module.EXIT_FLUSH_TIMEOUT = 1.0
    writer = BatchWriter(storage.create_engine_for(url), max_delay=0.05, spool_dir=spool_dir)
    if fault == "file-size-limit":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
    ids = []
    for _ in range(n):
        call = CallRecord(id=new_id(), run_id=None, root_run_id=None, operation="chat",
            provider="openai", requested_model="gpt-4o-mini", model="gpt-4o-mini",
            started_at=utcnow(), input_tokens=100, output_tokens=20)
        writer.put_call(call)
        ids.append(call.id)
    print(" ".join(ids), flush=True)
    deadline = time.monotonic() + 3
    while writer.memory_rows and time.monotonic() < deadline:
        time.sleep(0.05)
    print(writer.stats.spool_errors, flush=True)
    """
)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a disk that fills up for real (needs root)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def spooled_call_ids(directory: Path) -> list[str]:
    """The call id of every complete row line in every segment (repeats included)."""
    ids = []
    for path in directory.rglob("*.jsonl"):
        for line in path.read_bytes().splitlines(keepends=True)[1:]:
            if line.endswith(b"\n"):
                ids.append(json.loads(line)["r"]["id"])
    return ids


@pytest.mark.parametrize("fault", ["disk-full", "file-size-limit"])
def test_a_failing_spool_never_spools_a_row_twice_and_says_what_is_lost(
    fault: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Issue: "a failed spill writes a new spool segment with the same rows each time
    (18 copies of 265 calls) and the rest is lost at exit". The database is down; the
    spool sits on a 64 KiB tmpfs that fills up, or every file is limited to 16 KiB
    (RLIMIT_FSIZE). No row is in the spool twice; the rows that fit are written once
    the database is back; the rest are counted in one error at exit."""
    n = 600
    spool_dir = (
        request.getfixturevalue("tiny_tmpfs") if fault == "disk-full" else tmp_path / "spool"
    )
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    worker = subprocess.run(
        [sys.executable, "-c", FULL_SPOOL_WORKER, fault, url, str(spool_dir), str(n)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 == worker.returncode, worker.stderr
    put = worker.stdout.split("\n")[0].split()
    spooled = spooled_call_ids(spool_dir)
    said = [line for line in worker.stderr.splitlines() if "LOST" in line]
    lost = int(said[0].split(" row(s) are LOST")[0].rsplit(" ", 1)[1]) if said else 0

    engine = storage.create_engine_for(url)
    schema.upgrade(engine)
    replayer = BatchWriter(engine, spool_dir=spool_dir)
    try:
        assert replayer.flush(timeout=30)
    finally:
        replayer.close(timeout=5)
    stored = call_ids(engine)
    engine.dispose()
    copies = len(spooled) - len(set(spooled))
    print(
        f"\n{fault}: {n} calls put, {len(spooled)} rows in the spool ({copies} copies), "
        f"{len(stored)} in the ledger after replay, {lost} said lost in "
        f"{len(said)} log line(s)"
    )

    assert n == len(put)
    assert 0 == copies
    assert set(spooled) == stored
    assert n == len(stored) + lost
    if lost:
        assert 1 == len(said)
    if fault == "disk-full":
        assert lost > 0  # 64 KiB cannot hold 600 rows: the test must exercise a loss
    else:
        assert 0 == lost  # each new segment takes the rows the last one could not


# -- 4. a spool someone else could have written ------------------------------------------


def plant_segment(engine: sa.Engine, spool_dir: Path) -> tuple[Path, str]:
    """A genuine orphaned segment of the ledger holding one $999,999.99 call, as a dead
    process would leave it; returns its path and the call's id."""
    from tokenledger._spool import Spool, ledger_key, spool_directory

    spool = Spool(spool_directory(engine.url, spool_dir), ledger_key(engine.url), durable=True)
    call = a_call()
    call.cost_usd = Decimal("999999.99")
    spool.append("calls", call.as_row())
    spool.release()
    (path,) = spool.directory.glob("*.jsonl")
    return path, call.id


@pytest.mark.parametrize("planted", ["directory-0777", "file-of-another-user", "file-0666"])
def test_a_spool_someone_else_could_have_written_is_never_replayed(
    planted: str,
    tmp_path: Path,
    make_writer: Callable[..., BatchWriter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue: "a spool directory created by another user (or world-writable) is trusted,
    and a planted $999,999.99 call was replayed into the ledger"."""
    engine = storage.create_engine_for(f"sqlite:///{tmp_path / 'ledger.db'}")
    schema.upgrade(engine)
    spool_dir = tmp_path / "spool"
    segment, planted_id = plant_segment(engine, spool_dir)
    if planted == "directory-0777":
        segment.parent.chmod(0o777)
    elif planted == "file-of-another-user":
        os.chown(segment, 12345, -1)
    else:
        segment.chmod(0o666)

    with caplog.at_level("ERROR", logger="tokenledger.writer"):
        writer = make_writer(engine, max_delay=0.05, spool_dir=spool_dir)
        honest = a_call()
        writer.put_call(honest)
        assert writer.flush(timeout=10)
        writer.spool.claim_orphans()  # the periodic scan: still not replayed, not said again
        assert writer.flush(timeout=10)
    stored = call_ids(engine)
    engine.dispose()
    said = [r for r in caplog.records if "does not trust spool" in r.getMessage()]
    print(
        f"\n{planted}: planted call replayed: {planted_id in stored}, "
        f"{len(said)} error logged, honest call stored: {honest.id in stored}"
    )

    assert honest.id in stored
    assert planted_id not in stored
    assert segment.exists()  # left alone for whoever investigates
    assert 1 == len(said)


def test_spool_directories_are_created_0700_whatever_the_umask(
    tmp_path: Path, make_writer: Callable[..., BatchWriter]
) -> None:
    engine = storage.create_engine_for(f"sqlite:///{tmp_path / 'ledger.db'}")
    schema.upgrade(engine)
    base = tmp_path / "a" / "b"
    old = os.umask(0)
    try:
        writer = make_writer(engine, durability="durable", max_delay=60, spool_dir=base)
        writer.put_call(a_call())
    finally:
        os.umask(old)
    directory = writer.spool.directory
    modes = {
        str(path.relative_to(tmp_path)): oct(path.stat().st_mode & 0o777)
        for path in (tmp_path / "a", base, directory, *directory.glob("*.jsonl"))
    }
    engine.dispose()
    print(f"\numask 0: {modes}")

    assert {"a": "0o700", "a/b": "0o700", f"a/b/{directory.name}": "0o700"} == {
        name: mode for name, mode in modes.items() if not name.endswith(".jsonl")
    }
    assert {"0o600"} == {mode for name, mode in modes.items() if name.endswith(".jsonl")}


def test_rows_are_never_spooled_into_a_directory_someone_else_can_write(
    tmp_path: Path, make_writer: Callable[..., BatchWriter]
) -> None:
    """The database is down (no tables) and memory is full: rows would be spooled, but
    the spool directory is world-writable. They stay in memory and are all written
    once the database is back; the directory gets no new file."""
    engine = storage.create_engine_for(f"sqlite:///{tmp_path / 'ledger.db'}")
    spool_dir = tmp_path / "spool"
    segment, _ = plant_segment(engine, spool_dir)
    segment.parent.chmod(0o777)
    writer = make_writer(engine, max_delay=0.05, max_buffer_rows=5, spool_dir=spool_dir)
    calls = [a_call() for _ in range(50)]
    for call in calls:
        writer.put_call(call)
    assert not writer.flush(timeout=0.5)
    files = sorted(p.name for p in segment.parent.iterdir())
    schema.upgrade(engine)
    assert writer.flush(timeout=15)
    stored = call_ids(engine)
    engine.dispose()

    assert [segment.name] == files
    assert {call.id for call in calls} <= stored
