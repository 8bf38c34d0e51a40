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
converted exactly as the column types convert them (`tokenledger.storage.DriverInsert`).
On PostgreSQL the calls of a batch never tried before are COPYed instead, in a savepoint;
COPY cannot skip a known id, so a batch it refuses, and every retried or replayed batch,
is inserted with ON CONFLICT DO NOTHING.

Faults (see docs/reliability.md for what is guaranteed and the tests that prove it):

* **The database goes away.** Nothing is raised into the caller. The writer retries
  with backoff; from the second failed attempt on it moves the rows it holds to the
  local spool (`tokenledger.spool`), so a long outage costs disk, not memory, and a
  crash during it loses little. Once the database is back the spool is replayed and
  removed.
* **Memory is full.** At most ``max_buffer_rows`` rows wait in memory; a put beyond
  that appends its row to the spool instead.
* **The process dies.** With ``durability="batched"`` the rows still in memory are lost:
  those put in the last ``max_delay`` seconds (plus the batch being committed) while the
  database is healthy. With ``durability="durable"`` every row is in the database or
  fsynced to the spool before ``put_*`` returns, and the next writer on the same ledger
  replays a dead process's spool when it starts.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import operator
import os
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from tokenledger import spool as _spool
from tokenledger import storage
from tokenledger.exceptions import ConfigurationError
from tokenledger.records import CallRecord, PriceRecord, RunRecord

__all__ = [
    "DEFAULT_MAX_BUFFER_ROWS",
    "DURABILITY_MODES",
    "EXIT_FLUSH_TIMEOUT",
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

Row = dict[str, Any]

# PriceRecord has no as_row(); prices are rare, so a plain field copy will do.
_PRICE_FIELDS = tuple(field.name for field in dataclasses.fields(PriceRecord))

# Calls, nearly every row, travel as tuples in the calls table's column order: one
# attrgetter call per record (a C loop), where as_row() built a dict field by field.
_CALL_COLUMNS = tuple(column.name for column in storage.calls.columns)
_call_values = operator.attrgetter(*_CALL_COLUMNS)
_call_values_of_row = operator.itemgetter(*_CALL_COLUMNS)


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


@dataclasses.dataclass(frozen=True)
class RejectedRow:
    """A row the database refused while the rows around it were written.

    .. versionadded:: 0.1.0
    """

    table: str
    row: Row
    error: str


class _FlushMarker:
    """Put in the queue by `BatchWriter.flush`; set once every row put before it is
    committed: the rows ahead of it in memory, and the spool segments up to ``spool_seq``.
    """

    __slots__ = ("done", "spool_seq")

    def __init__(self, spool_seq: int) -> None:
        self.done = threading.Event()
        self.spool_seq = spool_seq


class _Batch:
    """Rows to write in one transaction. Prices and runs are dicts; calls are tuples in
    `_CALL_COLUMNS` order.

    ``fresh``: taken from the queue and never tried. Only such a batch may have its
    calls written with COPY (which has no ON CONFLICT): a retried or replayed batch may
    hold calls already stored.
    """

    __slots__ = ("calls", "fresh", "markers", "prices", "runs")

    def __init__(self, *, fresh: bool = False) -> None:
        self.prices: list[Row] = []
        self.runs: list[Row] = []
        self.calls: list[tuple[Any, ...]] = []
        self.markers: list[_FlushMarker] = []
        self.fresh = fresh

    def __len__(self) -> int:
        return len(self.prices) + len(self.runs) + len(self.calls)

    def add(self, table: str, row: Row) -> None:
        if table == "calls":
            self.calls.append(_call_values_of_row(row))
        else:
            getattr(self, table).append(row)

    def rows(self) -> Iterable[tuple[str, Row]]:
        for table in ("prices", "runs"):
            for row in getattr(self, table):
                yield table, row
        for values in self.calls:
            yield "calls", dict(zip(_CALL_COLUMNS, values, strict=True))


def _as_dict(table: str, row: Any) -> Row:
    """A row of ``table`` as a dict, whichever form the batch holds it in."""
    return dict(zip(_CALL_COLUMNS, row, strict=True)) if table == "calls" else dict(row)


def _batch_form(table: str, row: Row) -> Any:
    return _call_values_of_row(row) if table == "calls" else row


class _Outage(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _is_refused_row(exc: BaseException) -> bool:
    """True when ``exc`` says the rows are bad (retrying cannot help), not the database.

    A missing table or a permission error is treated as an outage: someone can fix it
    and the rows will then be written.
    """
    if isinstance(exc, (sa.exc.DataError, sa.exc.IntegrityError, storage.RefusedValue)):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        # sqlite3 refusing a Python value it cannot bind; psycopg one it cannot adapt.
        message = str(exc.orig).lower()
        return "error binding parameter" in message or "cannot adapt type" in message
    # Raised in Python by a column type's bind processing (a naive datetime, a float
    # amount, a value JSON cannot encode): SQLAlchemy wraps it in a StatementError.
    # A string no driver can encode (a lone surrogate) may surface as a bare
    # UnicodeError; retrying it would stall the ledger forever.
    return isinstance(exc, (sa.exc.StatementError, UnicodeError))


_OUTCOME_COLUMNS = frozenset({"outcome", "outcome_value", "outcome_at"})


def _insert_function(dialect: str) -> Any:
    if dialect == "sqlite":
        return sqlite.insert
    if dialect == "postgresql":
        return postgresql.insert
    raise ConfigurationError(
        f"The ledger engine's dialect is {dialect!r}; the batch writer supports sqlite and "
        "postgresql. Make the engine with tokenledger.storage.create_engine_for."
    )


def _progress(row: Row) -> tuple[bool, int]:
    """How far a run had got when this state of it was put: ended, then calls counted.

    A run's states only move forward (it ends once; its totals only grow), so the most
    advanced state is the newest whatever order the states arrive in.
    """
    calls = row.get("calls")
    return row.get("ended_at") is not None, calls if isinstance(calls, int) else 0


def _dedupe_runs(rows: list[Row]) -> list[Row]:
    # A run is put when it starts and again when it ends: the most advanced state wins
    # (the later one on a tie), and one INSERT ... ON CONFLICT statement must not touch
    # the same row twice.
    newest: dict[Any, Row] = {}
    for row in rows:
        seen = newest.get(row["id"])
        if seen is None or _progress(row) >= _progress(seen):
            newest[row["id"]] = row
    return list(newest.values())


def _as_row(item: object) -> tuple[str, Row] | None:
    if isinstance(item, CallRecord):
        return "calls", item.as_row()
    if isinstance(item, RunRecord):
        return "runs", item.as_row()
    if isinstance(item, PriceRecord):
        return "prices", {name: getattr(item, name) for name in _PRICE_FIELDS}
    return None


def _sanitized(value: Any) -> Any:
    """``value`` with every string made storable in any database: NUL and lone
    surrogates become U+FFFD. Used only to salvage a row the database refused."""
    if isinstance(value, str):
        text = value.replace("\x00", "\ufffd")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = "".join("\ufffd" if 0xD800 <= ord(char) <= 0xDFFF else char for char in text)
        return text
    if isinstance(value, dict):
        return {_sanitized(key): _sanitized(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_sanitized(item) for item in value]
    return value


class BatchWriter:
    """Writes runs, calls and prices to the ledger from a background thread.

    Args:
        engine: an engine from `tokenledger.storage.create_engine_for` (SQLite or
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
        insert = _insert_function(engine.dialect.name)
        self.max_delay = float(max_delay)
        self.max_batch = max_batch
        self.durability: Durability = durability
        self.max_buffer_rows = max_buffer_rows
        self._stats = WriterStats()
        #: Rows the database refused (unbounded; kept so nothing vanishes silently).
        self.rejected: list[RejectedRow] = []
        self._engine = engine
        self._secrets = _secrets_of(engine.url)
        self._url = self._hide(storage.redact_url(engine.url))
        # A put spills to the spool once the queue holds this many items: one comparison
        # on the hot path serves both modes (0: every put goes to the spool).
        self._spill_at = 0 if durability == "durable" else max_buffer_rows
        self.spool = _spool.Spool(
            _spool.spool_directory(engine.url, spool_dir),
            _spool.ledger_key(engine.url),
            durable=durability == "durable",
        )

        self._insert_prices = insert(storage.prices).on_conflict_do_nothing(index_elements=["id"])
        upsert_runs = insert(storage.runs)
        stored, new = storage.runs.c, upsert_runs.excluded
        run_state = [col.name for col in storage.runs.c if col.name != "id"]
        self._upsert_runs = upsert_runs.on_conflict_do_update(
            index_elements=["id"],
            set_={
                name: (
                    # An outcome may be set later, by another process (set_outcome):
                    # a re-written run row never erases it.
                    sa.func.coalesce(new[name], stored[name])
                    if name in _OUTCOME_COLUMNS
                    else new[name]
                )
                for name in run_state
            },
            # A state only replaces a less advanced one: states replayed late (from the
            # spool, or a retried batch) never undo an end or shrink the totals.
            where=sa.and_(
                sa.or_(stored.ended_at.is_(None), new.ended_at.is_not(None)),
                new.calls >= stored.calls,
            ),
        )
        # Calls skip SQLAlchemy's per-row work: one precompiled INSERT ... ON CONFLICT
        # (id) DO NOTHING, handed values converted as the column types convert them.
        self._insert_calls = storage.DriverInsert(storage.calls, engine.dialect)
        # On PostgreSQL a fresh batch's calls are COPYed (see _copy_calls).
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
        self._pending: _Batch | None = None  # a batch that failed, retried first
        self._inflight: _Batch | None = None  # the batch being written
        self._waiting: list[_FlushMarker] = []  # markers waiting for the spool
        self._failing_since: float | None = None
        self._failure_streak = 0
        self._spool_failing = False

    def __repr__(self) -> str:
        return f"<BatchWriter {self._url} {self.durability} pending={self.pending}>"

    @property
    def stats(self) -> WriterStats:
        """What this writer has done (a live object; `WriterStats.spilled` is brought up
        to date on each read)."""
        self._stats.spilled = self.spool.appended
        return self._stats

    # -- the hot path: one deque append, no lock ---------------------------------------
    def put_call(self, call: CallRecord) -> None:
        """Queue a call to be inserted (a call id already in the ledger is ignored)."""
        queue = self._queue
        if len(queue) >= self._spill_at:
            self._put_to_spool(call)
            return
        queue.append(call)
        if self._thread is None:
            self._start()
        elif len(queue) >= self.max_batch and not self._wake.is_set():
            self._wake.set()

    def put_run(self, run: RunRecord) -> None:
        """Queue a run's current state; the most advanced state put for a run id wins."""
        queue = self._queue
        if len(queue) >= self._spill_at:
            self._put_to_spool(run)
            return
        queue.append(run)
        if self._thread is None:
            self._start()
        elif len(queue) >= self.max_batch and not self._wake.is_set():
            self._wake.set()

    def put_price(self, price: PriceRecord) -> None:
        """Queue a price version to be inserted if its id is new."""
        queue = self._queue
        if len(queue) >= self._spill_at:
            self._put_to_spool(price)
            return
        queue.append(price)
        if self._thread is None:
            self._start()
        elif len(queue) >= self.max_batch and not self._wake.is_set():
            self._wake.set()

    def _put_to_spool(self, record: object) -> None:
        """The slow path: ``durable`` mode, or the memory buffer is full."""
        converted = _as_row(record)
        if converted is None:
            self._queue.append(record)  # the thread rejects it, with a log line
        else:
            try:
                self.spool.append(*converted)
            except Exception as exc:  # never raise into the caller: keep it in memory
                self._spool_failed(exc, 1)
                self._queue.append(record)
            else:
                self._spool_failing = False
        if self._thread is None:
            self._start()
        elif self.durability == "durable" and self.spool.appended % self.max_batch == 0:
            self._wake.set()

    def _spool_failed(self, exc: BaseException, rows: int) -> None:
        self._stats.spool_errors += rows
        if self._spool_failing:
            return
        self._spool_failing = True
        logger.error(
            "tokenledger cannot write to its spool at %s: %s. Rows are kept in memory "
            "instead%s; they are lost if this process dies before the ledger at %s takes "
            "them.",
            self.spool.directory,
            exc,
            f" (beyond max_buffer_rows={self.max_buffer_rows})"
            if self.durability == "batched"
            else " (durability='durable' cannot be honoured)",
            self._url,
        )

    # -- waiting for the rows ----------------------------------------------------------
    @property
    def pending(self) -> int:
        """How many rows are put but not yet committed, in memory and in the spool
        (a snapshot; for tests and the CLI)."""
        batches = [self._pending, self._inflight]
        queued = list(self._queue)  # one C call: atomic with respect to other threads' puts
        waiting = sum(1 for item in queued if not isinstance(item, _FlushMarker))
        held = sum(len(batch) for batch in dict.fromkeys(b for b in batches if b is not None))
        return waiting + held + self.spool.rows

    @property
    def memory_rows(self) -> int:
        """Rows held in memory (queue, batch being retried, batch being written)."""
        batches = [b for b in (self._pending, self._inflight) if b is not None]
        return len(self._queue) + sum(len(b) for b in dict.fromkeys(batches))

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
        marker = _FlushMarker(self.spool.last_seq)
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
        if not flushed:
            self._spill_memory(include_inflight=True)
        # A thread still stuck in a write keeps the spool and replays it when it can;
        # otherwise let go of it: what is left is found by the next writer.
        left = self.spool.release() if self._thread is None else self.spool.rows
        if not flushed:
            logger.error(
                "tokenledger closed its writer to %s with %d row(s) not written; %d of "
                "them are in the spool at %s and will be written by the next writer on "
                "this ledger.",
                self._url,
                self.memory_rows + left,
                left,
                self.spool.directory,
            )
        return flushed

    # -- the writer thread -------------------------------------------------------------
    def _start(self) -> None:
        with self._start_lock:
            if self._thread is not None:
                return
            self._stopping = False
            thread = threading.Thread(target=self._run, name="tokenledger-writer", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # at interpreter shutdown: keep the rows, never raise
                logger.warning("tokenledger could not start its writer thread", exc_info=True)
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

    def _take(self) -> _Batch | None:
        with self._take_lock:
            batch = self._pending if self._pending is not None else _Batch(fresh=True)
            self._pending = None
            self._inflight = batch
            queue = self._queue
            size = len(batch)
            calls, call_values = batch.calls, _call_values
            while size < self.max_batch:
                try:
                    item = queue.popleft()
                except IndexError:
                    break
                if type(item) is CallRecord:
                    calls.append(call_values(item))
                elif isinstance(item, _FlushMarker):
                    batch.markers.append(item)
                    continue
                else:
                    converted = _as_row(item)
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

    def _done(self, batch: _Batch, ok: bool) -> None:
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

    def _release(self, markers: list[_FlushMarker]) -> None:
        for marker in markers:
            if self.spool.settled(marker.spool_seq):
                marker.done.set()
            else:
                self._waiting.append(marker)

    def _replay_spool(self) -> bool:
        """Write every spooled row to the database and remove the segments."""
        spool = self.spool
        for segment in spool.seal():
            try:
                for rows, offset in spool.read(segment, self.max_batch):
                    batch = _Batch()
                    for table, row in rows:
                        batch.add(table, row)
                    if len(batch) and not self._write_batch(batch):
                        return False
                    spool.committed(segment, len(batch), offset)
                    self._stats.replayed += len(batch)
            except OSError as exc:
                logger.error(
                    "tokenledger cannot read its spool file %s: %s; it is kept and retried.",
                    segment.path,
                    exc,
                )
                return False
            spool.remove(segment)
        if self._waiting:
            waiting, self._waiting = self._waiting, []
            self._release(waiting)
        return True

    def _spill_memory(self, *, include_inflight: bool) -> None:
        """Move every row held in memory to the spool (the database is down, or the
        writer is closing without having written them)."""
        with self._take_lock:
            batches = [self._pending]
            if include_inflight:
                batches.append(self._inflight)
            for batch in dict.fromkeys(b for b in batches if b is not None):
                if not self._spill_rows(batch.rows()):
                    return  # the spool is unusable: they stay in memory
                self._waiting.extend(batch.markers)
                batch.prices, batch.runs, batch.calls, batch.markers = [], [], [], []
            if self._pending is not None and not len(self._pending):
                self._pending = None
            queue = self._queue
            moved: list[Any] = []
            for _ in range(len(queue)):  # what is there now; new puts wait for next time
                try:
                    moved.append(queue.popleft())
                except IndexError:
                    break
            rows = [converted for item in moved if (converted := _as_row(item)) is not None]
            if not self._spill_rows(rows):
                queue.extendleft(reversed(moved))  # kept in memory: order does not matter
                return
            for item in moved:
                if isinstance(item, _FlushMarker):
                    self._waiting.append(item)
                elif _as_row(item) is None:
                    queue.append(item)  # not a record: the thread rejects it
            for marker in self._waiting:
                marker.spool_seq = max(marker.spool_seq, self.spool.last_seq)
        if rows:
            logger.info(
                "tokenledger moved %d row(s) to its spool at %s while the ledger at %s is "
                "unreachable.",
                len(rows),
                self.spool.directory,
                self._url,
            )

    def _spill_rows(self, rows: Iterable[tuple[str, Row]]) -> bool:
        rows = list(rows)
        for index, (table, row) in enumerate(rows):
            try:
                self.spool.append(table, row)
            except Exception as exc:
                self._spool_failed(exc, len(rows) - index)
                return False
        return True

    def _execute(
        self,
        prices: list[Row],
        runs: list[Row],
        calls: list[tuple[Any, ...]],
        *,
        copy: bool = False,
    ) -> None:
        # Converted before the transaction opens: a refused value costs no round trip.
        values = self._insert_calls.convert(calls) if calls else []
        with self._engine.begin() as connection:
            if prices:
                connection.execute(self._insert_prices, prices)
            if runs:
                connection.execute(self._upsert_runs, _dedupe_runs(runs))
            if values and not (copy and self._copy_calls(connection, values)):
                connection.exec_driver_sql(self._insert_calls.sql, values)

    def _copy_calls(self, connection: sa.Connection, values: list[tuple[Any, ...]]) -> bool:
        """COPY the calls of a fresh batch (PostgreSQL): half the CPU of an INSERT per row.

        COPY has no ON CONFLICT, so it runs in a savepoint. When PostgreSQL refuses the
        rows (a call id already stored: the same record put twice; or a value it cannot
        store) nothing is written and False is returned: the caller inserts them with
        ON CONFLICT DO NOTHING, which skips known ids and isolates a bad row. A lost
        connection is raised: the batch is retried, with INSERT, once it is back.
        """
        import psycopg  # only here: a SQLite ledger never needs it

        savepoint = connection.begin_nested()
        dbapi: Any = connection.connection.dbapi_connection
        try:
            with dbapi.cursor() as cursor, cursor.copy(self._insert_calls.copy_sql) as copy:
                write_row = copy.write_row
                for row in values:
                    write_row(row)
        except Exception as exc:
            if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)) or dbapi.broken:
                raise
            savepoint.rollback()
            logger.debug(
                "tokenledger's COPY of %d call(s) to %s was refused (%s); inserting them "
                "with ON CONFLICT DO NOTHING instead.",
                len(values),
                self._url,
                self._describe(exc),
            )
            return False
        savepoint.commit()
        return True

    def _write_batch(self, batch: _Batch) -> bool:
        try:
            self._execute(
                batch.prices,
                batch.runs,
                batch.calls,
                copy=batch.fresh and self._copy_calls_ok,
            )
        except Exception as exc:
            if _is_refused_row(exc):
                return self._write_isolating(batch)
            self._failed(exc)
            return False
        self._succeeded(len(batch))
        return True

    def _write_isolating(self, batch: _Batch) -> bool:
        """Some row is refused: bisect to find it, write the rest, keep it in `rejected`."""
        refused: list[RejectedRow] = []
        written = 0
        try:
            written += self._bisect("prices", batch.prices, refused)
            written += self._bisect("runs", _dedupe_runs(batch.runs), refused)
            written += self._bisect("calls", batch.calls, refused)
        except _Outage as outage:
            # Whatever committed before the outage is written again on retry, harmlessly.
            self._failed(outage.cause)
            return False
        for rejected in refused:
            self._reject(rejected.table, rejected.row, rejected.error)
        self._succeeded(written)
        return True

    def _bisect(self, table: str, rows: list[Any], refused: list[RejectedRow]) -> int:
        if not rows:
            return 0
        try:
            self._write_rows(table, rows)
        except Exception as exc:
            if not _is_refused_row(exc):
                raise _Outage(exc) from exc
            if len(rows) == 1:
                return self._salvage(table, rows[0], exc, refused)
            middle = len(rows) // 2
            return self._bisect(table, rows[:middle], refused) + self._bisect(
                table, rows[middle:], refused
            )
        return len(rows)

    def _write_rows(self, table: str, rows: list[Any]) -> None:
        self._execute(
            rows if table == "prices" else [],
            rows if table == "runs" else [],
            rows if table == "calls" else [],
        )

    def _salvage(
        self, table: str, stored: Any, exc: BaseException, refused: list[RejectedRow]
    ) -> int:
        """One row is refused. If its text is what the database cannot store (NUL, a lone
        surrogate: PostgreSQL refuses both), write it with that text replaced rather
        than lose its tokens and cost."""
        row = _as_dict(table, stored)
        clean = _sanitized(row)
        if clean != row:
            try:
                self._write_rows(table, [_batch_form(table, clean)])
            except Exception as again:
                if not _is_refused_row(again):
                    raise _Outage(again) from again
            else:
                logger.warning(
                    "tokenledger's ledger at %s refused a row of %s (id %s) for its text: "
                    "%s. It was written with NUL and unpaired surrogate characters replaced "
                    "by U+FFFD.",
                    self._url,
                    table,
                    row.get("id"),
                    self._describe(exc),
                )
                return 1
        refused.append(RejectedRow(table, row, self._describe(exc)))
        return 0

    def _hide(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, storage.RefusedValue):
            return self._hide(str(exc))  # it names the column
        cause = getattr(exc, "orig", None) or exc
        return self._hide(f"{type(cause).__name__}: {cause}".strip())

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

    def _failed(self, exc: BaseException) -> None:
        self._stats.failures += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            logger.warning(
                "tokenledger cannot write to the ledger at %s: %s. %d row(s) are kept (in "
                "memory, then in the spool at %s) and retried until it is back.",
                self._url,
                self._describe(exc),
                self.pending,
                self.spool.directory,
            )
        else:
            logger.debug("tokenledger write to %s failed again: %s", self._url, self._describe(exc))

    def _succeeded(self, rows: int) -> None:
        self._stats.rows_written += rows
        self._stats.batches += 1
        if self._failing_since is not None:
            logger.warning(
                "tokenledger writes to the ledger at %s resumed after %.1f s.",
                self._url,
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None

    def _after_fork_in_child(self) -> None:
        # The parent's rows are the parent's to write; the thread did not survive the
        # fork, and the parent's pooled connections and spool files must not be shared.
        self._reset()
        self._stats = WriterStats()
        self.rejected = []
        self.spool.after_fork_in_child()
        self._engine.dispose(close=False)


def _secrets_of(url: sa.URL) -> list[str]:
    """Every password in ``url``: its own, and any given as a query parameter."""
    found = [str(url.password)] if url.password else []
    for key in ("password", "sslpassword"):
        value = url.query.get(key)
        values = [value] if isinstance(value, str) else list(value or ())
        found.extend(v for v in values if v)
    return sorted(set(found), key=len, reverse=True)


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
        logger.error(
            "tokenledger exits with %d row(s) not written to %s; %d of them are in the "
            "spool at %s and will be written by the next writer on this ledger.",
            writer.memory_rows + left,
            writer._url,
            left,
            writer.spool.directory,
        )


def _after_fork_in_child() -> None:
    for writer in list(_live_writers):
        writer._after_fork_in_child()


atexit.register(_flush_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
