"""The background batch writer: records leave the model-call path in about a microsecond.

``put_*`` appends the record to a `collections.deque` (whose ``append`` is thread-safe)
and returns: no lock, no I/O, no conversion. A daemon thread wakes when a batch is full,
at least every ``max_delay`` seconds, or on `BatchWriter.flush`, and writes everything
waiting in one transaction per batch.

Every write is idempotent (prices and calls: insert, ignore a known id; runs: upsert that
only moves a run forward), so a batch retried after an ambiguous failure, or replayed
from the spool by another process, can never duplicate a row or undo a newer state.

Calls, nearly every row, bypass SQLAlchemy's per-row work: they travel as tuples and are
written with one precompiled ``INSERT ... ON CONFLICT (id) DO NOTHING``, their values
converted exactly as the column types convert them (`tokenledger._storage.DriverInsert`).
On PostgreSQL the calls of a batch never tried before are COPYed instead, in a savepoint;
COPY cannot skip a known id, so a batch it refuses, and every retried or replayed batch,
is inserted with ON CONFLICT DO NOTHING.

Faults (see docs/reliability.md for what is guaranteed and the tests that prove it):

* **The database goes away.** Nothing is raised into the caller. The writer retries
  with backoff; from the second failed attempt on it moves the rows it holds to the
  local spool (`tokenledger._spool`), so a long outage costs disk, not memory, and a
  crash during it loses little. Once the database is back the spool is replayed and
  removed.
* **The database hangs** (answers nothing). The writer's own engine has bounded waits
  (connect and statement timeouts), and a watchdog thread moves the rows in memory to
  the spool once a write has not returned for `BatchWriter.hang_after` seconds, then
  shuts the hung connection down after `WRITE_TIMEOUT` + 5 s.
* **The SQLite file is deleted** under the writer: found after the next batch (one
  ``stat``), a new ledger is migrated at the path and the batch written again there.
* **Memory is full.** At most ``max_buffer_rows`` rows wait in memory; a put beyond
  that appends its row to the spool instead.
* **The process dies.** With ``durability="batched"`` the rows still in memory are lost:
  those put in the last ``max_delay`` seconds (plus the batch being committed) while the
  database is healthy. With ``durability="durable"`` every row is in the database or
  fsynced to the spool before ``put_*`` returns, and the next writer on the same ledger
  replays a dead process's spool when it starts.

This module is the writer's public methods and its thread. The forms rows take on the
way are in `tokenledger._batch`, the database side of writing a batch (the statements,
COPY, finding a refused row) in `tokenledger._writes`, and what the writer does in an
outage (spilling to the spool, replaying it, logging) in `tokenledger._outage`.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import sqlalchemy as sa

from tokenledger import _spool
from tokenledger._batch import Batch, FlushMarker, Row, call_values, record_row
from tokenledger._engine import WriterEngine, check_dialect
from tokenledger._outage import OutageHandling
from tokenledger._writes import LedgerWrites, Outage, RejectedRow
from tokenledger.exceptions import ConfigurationError
from tokenledger.records import CallRecord, PriceRecord, RunRecord

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_MAX_BUFFER_ROWS",
    "DURABILITY_MODES",
    "EXIT_FLUSH_TIMEOUT",
    "WRITE_TIMEOUT",
    "BatchWriter",
    "Durability",
    "RejectedRow",
    "WriterStats",
]

logger = logging.getLogger("tokenledger.writer")

#: Seconds the interpreter waits at exit for every live writer to write what it holds.
EXIT_FLUSH_TIMEOUT = 10.0

#: Rows a writer keeps in memory before it spills new ones to the spool.
DEFAULT_MAX_BUFFER_ROWS = 100_000

#: Seconds the writer waits for a connection to the ledger (PostgreSQL) before the
#: attempt counts as failed.
CONNECT_TIMEOUT = 10.0
#: Seconds one statement of the writer may run: PostgreSQL cancels it after this
#: (``statement_timeout``), and a write that has still not returned
#: `_ABORT_GRACE` seconds later has its connection shut down by the writer's watchdog
#: (a server or network that hangs never answers a cancel).
WRITE_TIMEOUT = 30.0
_ABORT_GRACE = 5.0
# A write that has not returned after this many max_delay (and at least _HANG_MIN
# seconds) is hung: the watchdog moves the rows in memory to the spool.
_HANG_AFTER_DELAYS = 2.0
_HANG_MIN = 1.0
# How often the watchdog looks, at most (less often only when max_delay is small).
_WATCH_MAX = 1.0

Durability = Literal["batched", "durable"]
DURABILITY_MODES: tuple[Durability, ...] = ("batched", "durable")

_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0
# Consecutive failed attempts after which the rows in memory move to the spool: the first
# retry (0.1 s later) rides out a blip without touching the disk.
_SPILL_AFTER_FAILURES = 2
# How often the writer thread looks for spools that processes died holding.
_ORPHAN_SCAN_INTERVAL = 30.0
# The most of close()'s timeout kept to stop the thread after the flush.
_CLOSE_RESERVE = 0.5


@dataclasses.dataclass
class WriterStats:
    """What a `BatchWriter` has done since it was made (or since a fork).

    .. versionadded:: 0.1.0
    """

    #: Rows in committed transactions (rows the database ignored as already present
    #: included: a retried batch counts again).
    rows_written: int = 0
    #: Committed transactions.
    batches: int = 0
    #: Failed write attempts (each retry of an outage counts).
    failures: int = 0
    #: Rows the database refused on their own (see `BatchWriter.rejected`).
    rejected: int = 0
    #: Rows appended to the spool (all of them in ``durable`` mode).
    spilled: int = 0
    #: Rows committed from the spool (this process's and dead processes').
    replayed: int = 0
    #: Rows that could not be spooled (disk full, directory not writable) and were
    #: kept in memory instead.
    spool_errors: int = 0
    #: Write attempts that did not return within the hang bound (see
    #: `BatchWriter.hang_after`); the rows in memory were moved to the spool meanwhile.
    hung_writes: int = 0
    #: Times the SQLite ledger file was found deleted or replaced while in use, and a
    #: new one was created (migrated) at its path; see docs/reliability.md.
    ledger_recreated: int = 0
    #: Rows lost: still in memory when the interpreter exited, neither written nor
    #: spooled (the spool could not be written either). Logged once, with the count.
    lost: int = 0


_Record = TypeVar("_Record", CallRecord, RunRecord, PriceRecord)


def _put_method(kind: type[_Record], name: str, doc: str) -> Callable[[BatchWriter, _Record], None]:
    """One of `BatchWriter`'s ``put_*`` methods, which take a ``kind`` of record.

    The three share this one body, made into a method each rather than each calling a
    shared helper: a put is all the model-call path pays for its row to be written (on the
    order of a hundred nanoseconds), and a second Python call would add about half as
    much again.
    """

    def put(self: BatchWriter, record: _Record) -> None:
        queue = self._queue
        if len(queue) >= self._spill_at:
            self._put_to_spool(record)
            return
        queue.append(record)
        if self._thread is None:
            self._start()
        elif len(queue) >= self.max_batch and not self._wake.is_set():
            self._wake.set()

    put.__name__ = name
    put.__qualname__ = f"BatchWriter.{name}"
    put.__doc__ = doc
    return put


class BatchWriter(OutageHandling):
    """Writes runs, calls and prices to the ledger from a background thread.

    Args:
        engine: an engine from `tokenledger._storage.create_engine_for` (SQLite or
            PostgreSQL) whose schema is at head.
        max_delay: the longest, in seconds, a row waits in memory before the writer
            thread tries to write it.
        max_batch: rows per transaction; a full batch wakes the thread at once.
        durability: ``"batched"`` (the default) keeps rows in memory until they are
            written: a killed process loses those of the last ``max_delay`` seconds.
            ``"durable"`` appends each row to the spool and fsyncs it before ``put_*``
            returns: a killed process loses nothing, and each call pays one
            ``fdatasync`` (0.1-3 ms on the virtual disk we measured, shared by threads
            putting at the same time; see docs/reliability.md).
        max_buffer_rows: the most rows kept in memory; beyond it rows go to the spool.
        spool_dir: where spools are kept (a subdirectory per ledger). Default:
            ``$TOKENLEDGER_SPOOL_DIR``, else next to a SQLite ledger
            (``ledger.db-spool/``) or ``~/.cache/tokenledger/spool/`` for PostgreSQL.

    The ``put_*`` methods never block on the database and never raise on account of it.
    When the database is unreachable the rows are kept and retried with backoff (0.1 s
    doubling to 5 s); from the second failed attempt they are moved to the spool, and
    replayed from there once the database is back. The outage is logged once, and its
    end. A row the database refuses on its own (a value it cannot store) is retried once
    with its text made storable (NUL and lone surrogates replaced), else logged and
    kept in `rejected`; the rest of its batch is written, so one bad row cannot stop
    the ledger.

    At start the writer replays any spool a dead process left on the same ledger.
    Live writers are flushed at interpreter exit (for up to `EXIT_FLUSH_TIMEOUT`
    seconds in all); rows still not written then are left in the spool for the next
    writer. A forked child starts with an empty buffer, no spool and its own thread.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        engine: sa.Engine,
        *,
        max_delay: float = 1.0,
        max_batch: int = 2000,
        durability: Durability = "batched",
        max_buffer_rows: int = DEFAULT_MAX_BUFFER_ROWS,
        spool_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if (
            isinstance(max_delay, bool)
            or not isinstance(max_delay, (int, float))
            or not max_delay > 0
        ):
            raise ConfigurationError(
                f"`max_delay` is {max_delay!r}; it must be a number of seconds greater than 0."
            )
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigurationError(
                f"`max_batch` is {max_batch!r}; it must be a whole number of rows, at least 1."
            )
        if durability not in DURABILITY_MODES:
            raise ConfigurationError(
                f"`durability` is {durability!r}; it must be 'batched' (rows wait in memory "
                "up to `max_delay` seconds) or 'durable' (each row is fsynced to the local "
                "spool before the call returns)."
            )
        if (
            isinstance(max_buffer_rows, bool)
            or not isinstance(max_buffer_rows, int)
            or max_buffer_rows < 1
        ):
            raise ConfigurationError(
                f"`max_buffer_rows` is {max_buffer_rows!r}; it must be a whole number of "
                "rows, at least 1 (rows beyond it go to the local spool)."
            )
        check_dialect(
            engine.dialect.name,
            who="the batch writer",
            advice=" Make the engine with tokenledger._storage.create_engine_for.",
        )
        # The writer's own engine on the same ledger: its connections carry timeouts
        # the ledger's reads must not have, and it can be aborted from the watchdog.
        self._db = WriterEngine(
            engine.url, connect_timeout=CONNECT_TIMEOUT, statement_timeout=WRITE_TIMEOUT
        )
        self._writes = LedgerWrites(self._db.engine)
        self.max_delay = float(max_delay)
        #: Seconds after which a write attempt that has not returned counts as hung and
        #: the rows in memory are moved to the spool (checked every `_watch_every` s).
        self.hang_after = max(_HANG_AFTER_DELAYS * self.max_delay, _HANG_MIN)
        self._watch_every = min(self.max_delay / 2, _WATCH_MAX)
        self.max_batch = max_batch
        self.durability: Durability = durability
        self.max_buffer_rows = max_buffer_rows
        self._stats = WriterStats()
        #: Rows the database refused (unbounded; kept so nothing vanishes silently).
        self.rejected: list[RejectedRow] = []
        self._engine = engine
        self._url = self._writes.url
        # A put spills to the spool once the queue holds this many items: one comparison
        # on the hot path serves both modes (0: every put goes to the spool).
        self._spill_at = 0 if durability == "durable" else max_buffer_rows
        self.spool = _spool.Spool(
            _spool.spool_directory(engine.url, spool_dir),
            _spool.ledger_key(engine.url),
            durable=durability == "durable",
        )

        # On PostgreSQL a fresh batch's calls are COPYed (see LedgerWrites._copy_calls).
        self._copy_calls_ok = engine.dialect.name == "postgresql"

        self._reset()
        _live_writers.add(self)
        # A spool left by a process that died on this ledger: take it now, so a flush
        # right after this waits for it, and replay it from the thread.
        if self.spool.files_on_disk():
            self.spool.claim_orphans()
            if self.spool.has_rows:
                self._start()

    def _reset(self) -> None:
        self._queue: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()
        self._start_lock = threading.Lock()
        # Held while rows move between the queue, the batch being written and the
        # spool, so a spill from another thread (at close) never misses a batch.
        self._take_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._pending: Batch | None = None  # a batch that failed, retried first
        self._inflight: Batch | None = None  # the batch being written
        self._waiting: list[FlushMarker] = []  # markers waiting for the spool
        self._failing_since: float | None = None
        self._failure_streak = 0
        self._spool_failing = False
        # When the write attempt in progress started (None: none is), read by the
        # watchdog; and the attempt it last found hung, and last aborted.
        self._busy_since: float | None = None
        self._hang_seen: float | None = None
        self._hang_logged = False
        self._aborted: float | None = None
        self._watch_stop = threading.Event()

    def __repr__(self) -> str:
        return f"<BatchWriter {self._url} {self.durability} pending={self.pending}>"

    @property
    def stats(self) -> WriterStats:
        """What this writer has done (a live object; `WriterStats.spilled` is brought up
        to date on each read)."""
        self._stats.spilled = self.spool.appended
        return self._stats

    # -- the hot path: one deque append, no lock ---------------------------------------
    put_call = _put_method(
        CallRecord,
        "put_call",
        "Queue a call to be inserted (a call id already in the ledger is ignored).",
    )
    put_run = _put_method(
        RunRecord,
        "put_run",
        "Queue a run's current state; the most advanced state put for a run id wins.",
    )
    put_price = _put_method(
        PriceRecord, "put_price", "Queue a price version to be inserted if its id is new."
    )

    # -- waiting for the rows ----------------------------------------------------------
    @property
    def pending(self) -> int:
        """How many rows are put but not yet committed, in memory and in the spool
        (a snapshot; for tests and the CLI)."""
        batches = [self._pending, self._inflight]
        queued = list(self._queue)  # one C call: atomic with respect to other threads' puts
        waiting = sum(1 for item in queued if not isinstance(item, FlushMarker))
        held = sum(len(batch) for batch in dict.fromkeys(b for b in batches if b is not None))
        return waiting + held + self.spool.rows

    @property
    def memory_rows(self) -> int:
        """Rows held in memory (queue, batch being retried, batch being written)."""
        batches = [b for b in (self._pending, self._inflight) if b is not None]
        queued = list(self._queue)  # one C call: atomic with respect to other threads' puts
        waiting = sum(1 for item in queued if not isinstance(item, FlushMarker))
        return waiting + sum(len(b) for b in dict.fromkeys(batches))

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Block until every row put before this call is committed.

        Returns True when they are, False when ``timeout`` seconds pass first (the
        database is down, say); the rows are kept and written later either way. Safe to
        call from any number of threads at once.
        """
        if (
            self._thread is None
            and not self._queue
            and self._pending is None
            and not self.spool.has_rows
        ):
            return True
        if threading.current_thread() is self._thread:
            return False  # the writer thread cannot wait for itself
        marker = FlushMarker(self.spool.last_seq)
        self._queue.append(marker)
        if self._thread is None:
            self._start()
        self._wake.set()
        return marker.done.wait(timeout)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Flush, then stop the writer thread. True when every row was written.

        Rows that could not be written in time are left in the spool, where the next
        writer on this ledger (in this process or another) finds them. A put after
        close starts a new thread.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        # Keep a little of the time to stop the thread, so that it lets go of the spool
        # (it makes one last attempt and exits when told to stop).
        reserve = 0.0 if timeout is None else min(_CLOSE_RESERVE, timeout / 4)
        flushed = self.flush(None if timeout is None else timeout - reserve)
        thread = self._thread
        if thread is not None:
            self._stopping = True
            self._wake.set()
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if not thread.is_alive():
                self._thread = None
            else:
                # Stuck in a write to a server that does not answer: make it fail now,
                # so the thread lets go of the spool instead of holding it for as long
                # as the hang lasts.
                self._db.abort()
        if not flushed:
            self._spill_memory(include_inflight=True)
        # A thread still stuck in a write keeps the spool and replays it when it can;
        # otherwise let go of it: what is left is found by the next writer.
        left = self.spool.release() if self._thread is None else self.spool.rows
        if self._thread is None:
            self._db.dispose()  # a put after close connects again
        if not flushed:
            logger.error(
                "tokenledger closed its writer to %s with %d row(s) not written; %d of "
                "them are in the spool at %s and will be written by the next writer on "
                "this ledger.%s",
                self._url,
                self.memory_rows + left,
                left,
                self.spool.directory,
                f" {self.memory_rows} row(s) could not be spooled and are held only in "
                "this writer's memory: they are lost unless it is used again before the "
                "process ends."
                if self.memory_rows
                else "",
            )
        return flushed

    # -- the writer thread -------------------------------------------------------------
    def _start(self) -> None:
        with self._start_lock:
            if self._thread is not None:
                return
            self._stopping = False
            thread = threading.Thread(target=self._run, name="tokenledger-writer", daemon=True)
            stop = self._watch_stop = threading.Event()
            watchdog = threading.Thread(
                target=self._watch,
                args=(thread, stop),
                name="tokenledger-writer-watchdog",
                daemon=True,
            )
            try:
                thread.start()
                watchdog.start()
            except RuntimeError:  # at interpreter shutdown: keep the rows, never raise
                logger.warning("tokenledger could not start its writer thread", exc_info=True)
                if not thread.is_alive():
                    return
            self._thread = thread

    def _run(self) -> None:
        backoff = 0.0
        scanned_at = -_ORPHAN_SCAN_INTERVAL
        while True:
            if time.monotonic() - scanned_at >= _ORPHAN_SCAN_INTERVAL:
                # Segments this writer left when it was closed, or that a process on
                # this ledger died holding since.
                scanned_at = time.monotonic()
                if self.spool.files_on_disk():
                    self.spool.claim_orphans()
            self._sleep(backoff)
            try:
                healthy = self._write_available()
            except Exception:  # a bug here must not kill the thread and strand the rows
                logger.exception("tokenledger's writer failed unexpectedly; retrying")
                healthy = False
            if healthy:
                backoff = 0.0
                self._failure_streak = 0
            else:
                backoff = min(backoff * 2, _BACKOFF_MAX) if backoff else _BACKOFF_FIRST
                self._failure_streak += 1
                if self._failure_streak >= _SPILL_AFTER_FAILURES:
                    # A real outage: hold its rows on disk, not in memory.
                    self._spill_memory(include_inflight=False)
            if self._stopping:
                with self._start_lock:
                    if self._thread is threading.current_thread():
                        self._thread = None
                        # What is left in the spool is for the next writer to replay.
                        self.spool.release()
                    self._watch_stop.set()
                return

    def _sleep(self, backoff: float) -> None:
        """Wait ``max_delay``, or less when woken; in an outage wait out the backoff."""
        deadline = time.monotonic() + (backoff or self.max_delay)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._wake.wait(remaining):
                self._wake.clear()
                if not backoff or self._stopping:
                    return

    def _take(self) -> Batch | None:
        with self._take_lock:
            batch = self._pending if self._pending is not None else Batch(fresh=True)
            self._pending = None
            self._inflight = batch
            queue = self._queue
            size = len(batch)
            calls, values_of = batch.calls, call_values
            while size < self.max_batch:
                try:
                    item = queue.popleft()
                except IndexError:
                    break
                if type(item) is CallRecord:
                    calls.append(values_of(item))
                elif isinstance(item, FlushMarker):
                    batch.markers.append(item)
                    continue
                else:
                    converted = record_row(item)
                    if converted is None:
                        self._reject(
                            "?",
                            {"value": repr(item)},
                            "not a CallRecord, RunRecord or PriceRecord",
                        )
                        continue
                    batch.add(*converted)
                size += 1
            if size == 0 and not batch.markers:
                self._inflight = None
                return None
            return batch

    def _done(self, batch: Batch, ok: bool) -> None:
        with self._take_lock:
            self._inflight = None
            if not ok:
                batch.fresh = False  # it may have been committed: never COPY it again
                self._pending = batch

    def _write_available(self) -> bool:
        """Write the spool, then everything queued, batch by batch. False when the
        database failed."""
        if self.spool.has_rows and not self._replay_spool():
            return False
        while True:
            batch = self._take()
            if batch is None:
                return self._replay_spool()
            ok = not len(batch) or self._write_batch(batch)
            self._done(batch, ok)
            if not ok:
                return False
            self._release(batch.markers)
            if not self._queue:
                return self._replay_spool()

    def _write_batch(self, batch: Batch) -> bool:
        self._busy_since = time.monotonic()
        try:
            written, refused = self._writes.write(batch, copy=batch.fresh and self._copy_calls_ok)
            if self._db.file_replaced():
                # The batch may have gone into a deleted file: make a new ledger file
                # and write it again there (a row already there is ignored).
                self._recreate_ledger_file()
                written, refused = self._writes.write(batch, copy=False)
        except Outage as outage:
            self._failed(outage.cause)
            return False
        finally:
            self._busy_since = None
        for rejected in refused:
            self._reject(rejected.table, rejected.row, rejected.error)
        self._succeeded(written)
        return True

    def _reject(self, table: str, row: Row, error: str) -> None:
        self._stats.rejected += 1
        self.rejected.append(RejectedRow(table, row, error))
        logger.error(
            "tokenledger's ledger at %s refused a row of %s (id %s): %s. The row is kept in "
            "BatchWriter.rejected; the rows around it were written.",
            self._url,
            table,
            row.get("id"),
            error,
        )

    def _recreate_ledger_file(self) -> None:
        """The SQLite ledger file was deleted (or replaced) under the writer: let go of
        the old file and write to a new one, migrated to head, at the same path.

        Raises `Outage` when that fails (the directory is gone, say): the rows are kept
        and spooled, and retried, as in any outage.
        """
        from tokenledger import _schema as schema  # loads Alembic: only in this rare case

        path = self._db.sqlite_path
        self._db.dispose()
        self._engine.dispose()  # the ledger's reads must see the new file too
        try:
            schema.ensure_schema(self._db.engine)
        except Exception as exc:
            raise Outage(exc) from exc
        self._stats.ledger_recreated += 1
        logger.error(
            "tokenledger's ledger file %s was deleted or replaced while in use. Rows are "
            "written to the file now at that path from now on (a new ledger, migrated, if "
            "it was deleted), the last batch again; the rows only the old file held are "
            "gone with it.",
            path,
        )

    # -- the watchdog: a write that hangs ----------------------------------------------
    def _watch(self, thread: threading.Thread, stop: threading.Event) -> None:
        """Runs beside the writer thread (``thread``) until it ends: a write attempt that
        does not return is what no error reports, so it is watched from outside."""
        while not stop.wait(self._watch_every) and thread.is_alive():
            try:
                self._check_hang()
            except Exception:  # never let the watchdog die and leave a hang unwatched
                logger.exception("tokenledger's writer watchdog failed unexpectedly")

    def _check_hang(self) -> None:
        since = self._busy_since
        if since is None:
            return
        waited = time.monotonic() - since
        if waited < self.hang_after:
            return
        if self._hang_seen != since:
            self._hang_seen = since
            self._stats.hung_writes += 1
            if not self._hang_logged and self._failing_since is None:
                self._hang_logged = True
                logger.warning(
                    "tokenledger's write to the ledger at %s has not returned for %.1f s; "
                    "the rows waiting in memory are moved to the spool at %s until it "
                    "does (and the connection is aborted after %.0f s).",
                    self._url,
                    waited,
                    self.spool.directory,
                    WRITE_TIMEOUT + _ABORT_GRACE,
                )
        # Rows put since the last look, and the batch the hung attempt holds: the
        # attempt may still commit it, which a replay then finds already written.
        if self.memory_rows:
            self._spill_memory(include_inflight=True)
        if waited >= WRITE_TIMEOUT + _ABORT_GRACE and self._aborted != since:
            self._aborted = since
            aborted = self._db.abort()
            logger.debug(
                "tokenledger aborted %d connection(s) to %s after a write hung %.1f s",
                aborted,
                self._url,
                waited,
            )

    def _after_fork_in_child(self) -> None:
        # The parent's rows are the parent's to write; the thread did not survive the
        # fork, and the parent's pooled connections and spool files must not be shared.
        self._reset()
        self._stats = WriterStats()
        self.rejected = []
        self.spool.after_fork_in_child()
        self._db.dispose(close=False)
        self._engine.dispose(close=False)


_live_writers: weakref.WeakSet[BatchWriter] = weakref.WeakSet()


def _flush_at_exit() -> None:
    deadline = time.monotonic() + EXIT_FLUSH_TIMEOUT
    for writer in list(_live_writers):
        if writer.flush(max(0.0, deadline - time.monotonic())):
            continue
        # Rows the database has not taken go to the spool, for the next writer on this
        # ledger. The process is ending: the kernel drops its spool locks.
        writer._spill_memory(include_inflight=True)
        left = writer.spool.rows
        lost = writer.memory_rows  # neither written nor spooled: gone with the process
        writer._stats.lost += lost
        logger.error(
            "tokenledger exits with %d row(s) not written to %s; %d of them are in the "
            "spool at %s and will be written by the next writer on this ledger.%s",
            lost + left,
            writer._url,
            left,
            writer.spool.directory,
            f" {lost} row(s) are LOST: the spool could not be written either." if lost else "",
        )


def _after_fork_in_child() -> None:
    for writer in list(_live_writers):
        writer._after_fork_in_child()


atexit.register(_flush_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
