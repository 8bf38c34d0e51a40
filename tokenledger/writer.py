"""The background batch writer: records leave the model-call path in about a microsecond.

``put_*`` appends the record to a `collections.deque` (whose ``append`` is thread-safe)
and returns: no lock, no I/O, no conversion. A daemon thread wakes when a batch is full,
at least every ``max_delay`` seconds, or on `BatchWriter.flush`, and writes everything
waiting in one transaction per batch.

Every write is idempotent (prices and calls: insert, ignore a known id; runs: upsert),
so a batch retried after an ambiguous failure can never duplicate a row.
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
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from tokenledger import storage
from tokenledger.exceptions import ConfigurationError
from tokenledger.records import CallRecord, PriceRecord, RunRecord

__all__ = ["EXIT_FLUSH_TIMEOUT", "BatchWriter", "RejectedRow", "WriterStats"]

logger = logging.getLogger("tokenledger.writer")

#: Seconds the interpreter waits at exit for every live writer to write what it holds.
EXIT_FLUSH_TIMEOUT = 10.0

_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0

Row = dict[str, Any]

# PriceRecord has no as_row(); prices are rare, so a plain field copy will do.
_PRICE_FIELDS = tuple(field.name for field in dataclasses.fields(PriceRecord))


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


@dataclasses.dataclass(frozen=True)
class RejectedRow:
    """A row the database refused while the rows around it were written.

    .. versionadded:: 0.1.0
    """

    table: str
    row: Row
    error: str


class _FlushMarker:
    """Put in the queue by `BatchWriter.flush`; set once every row ahead of it is committed."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class _Batch:
    __slots__ = ("calls", "markers", "prices", "runs")

    def __init__(self) -> None:
        self.prices: list[Row] = []
        self.runs: list[Row] = []
        self.calls: list[Row] = []
        self.markers: list[_FlushMarker] = []

    def __len__(self) -> int:
        return len(self.prices) + len(self.runs) + len(self.calls)


class _Outage(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _is_refused_row(exc: BaseException) -> bool:
    """True when ``exc`` says the rows are bad (retrying cannot help), not the database.

    A missing table or a permission error is treated as an outage: someone can fix it
    and the rows will then be written.
    """
    if isinstance(exc, (sa.exc.DataError, sa.exc.IntegrityError)):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        # sqlite3 refusing a Python value it cannot bind.
        return "error binding parameter" in str(exc.orig).lower()
    # Raised in Python by a column type's bind processing (a naive datetime, a float
    # amount, a value JSON cannot encode): SQLAlchemy wraps it in a StatementError.
    return isinstance(exc, sa.exc.StatementError)


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


def _dedupe_runs(rows: list[Row]) -> list[Row]:
    # A run is put when it starts and again when it ends: the last state wins, and one
    # INSERT ... ON CONFLICT statement must not touch the same row twice.
    return list({row["id"]: row for row in rows}.values())


class BatchWriter:
    """Writes runs, calls and prices to the ledger from a background thread.

    Args:
        engine: an engine from `tokenledger.storage.create_engine_for` (SQLite or
            PostgreSQL) whose schema is at head.
        max_delay: the longest, in seconds, a row waits in memory before the writer
            thread tries to write it.
        max_batch: rows per transaction; a full batch wakes the thread at once.

    The ``put_*`` methods never block and never raise on account of the database.
    When the database is unreachable the rows stay in memory and are retried with
    backoff (0.1 s doubling to 5 s); the outage is logged once, and its end. The
    buffer is **unbounded** in this version: a long outage grows memory by roughly a
    kilobyte per call until the database comes back. A row the database refuses on its
    own (a value it cannot store) is logged and kept in `rejected`, and the rest of its
    batch is written, so one bad row cannot stop the ledger.

    Live writers are flushed at interpreter exit (for up to `EXIT_FLUSH_TIMEOUT`
    seconds in all). A forked child starts with an empty buffer and its own thread.

    .. versionadded:: 0.1.0
    """

    def __init__(self, engine: sa.Engine, *, max_delay: float = 1.0, max_batch: int = 2000) -> None:
        if not isinstance(max_delay, (int, float)) or not max_delay > 0:
            raise ConfigurationError(
                f"`max_delay` is {max_delay!r}; it must be a number of seconds greater than 0."
            )
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigurationError(
                f"`max_batch` is {max_batch!r}; it must be a whole number of rows, at least 1."
            )
        insert = _insert_function(engine.dialect.name)
        self.max_delay = float(max_delay)
        self.max_batch = max_batch
        self.stats = WriterStats()
        #: Rows the database refused (unbounded; kept so nothing vanishes silently).
        self.rejected: list[RejectedRow] = []
        self._engine = engine
        self._url = storage.redact_url(engine.url)

        self._insert_prices = insert(storage.prices).on_conflict_do_nothing(index_elements=["id"])
        upsert_runs = insert(storage.runs)
        run_state = [col.name for col in storage.runs.c if col.name != "id"]
        self._upsert_runs = upsert_runs.on_conflict_do_update(
            index_elements=["id"],
            set_={
                name: (
                    # An outcome may be set later, by another process (set_outcome):
                    # a re-written run row never erases it.
                    sa.func.coalesce(upsert_runs.excluded[name], storage.runs.c[name])
                    if name in _OUTCOME_COLUMNS
                    else upsert_runs.excluded[name]
                )
                for name in run_state
            },
        )
        self._insert_calls = insert(storage.calls).on_conflict_do_nothing(index_elements=["id"])

        self._reset()
        _live_writers.add(self)

    def _reset(self) -> None:
        self._queue: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._pending: _Batch | None = None  # a batch that failed, retried first
        self._failing_since: float | None = None

    def __repr__(self) -> str:
        return f"<BatchWriter {self._url} pending={self.pending}>"

    # -- the hot path: one deque append, no lock ---------------------------------------
    def put_call(self, call: CallRecord) -> None:
        """Queue a call to be inserted (a call id already in the ledger is ignored)."""
        self._queue.append(call)
        if self._thread is None:
            self._start()
        elif len(self._queue) >= self.max_batch and not self._wake.is_set():
            self._wake.set()

    def put_run(self, run: RunRecord) -> None:
        """Queue a run's current state; the last state put for a run id wins."""
        self._queue.append(run)
        if self._thread is None:
            self._start()
        elif len(self._queue) >= self.max_batch and not self._wake.is_set():
            self._wake.set()

    def put_price(self, price: PriceRecord) -> None:
        """Queue a price version to be inserted if its id is new."""
        self._queue.append(price)
        if self._thread is None:
            self._start()
        elif len(self._queue) >= self.max_batch and not self._wake.is_set():
            self._wake.set()

    # -- waiting for the rows ----------------------------------------------------------
    @property
    def pending(self) -> int:
        """How many rows are put but not yet committed (a snapshot; for tests and the CLI)."""
        batch = self._pending
        queued = list(self._queue)  # one C call: atomic with respect to other threads' puts
        waiting = sum(1 for item in queued if not isinstance(item, _FlushMarker))
        return waiting + (len(batch) if batch is not None else 0)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Block until every row put before this call is committed.

        Returns True when they are, False when ``timeout`` seconds pass first (the
        database is down, say); the rows are kept and written later either way. Safe to
        call from any number of threads at once.
        """
        if self._thread is None and not self._queue and self._pending is None:
            return True
        if threading.current_thread() is self._thread:
            return False  # the writer thread cannot wait for itself
        marker = _FlushMarker()
        self._queue.append(marker)
        if self._thread is None:
            self._start()
        self._wake.set()
        return marker.done.wait(timeout)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Flush, then stop the writer thread. True when every row was written.

        A put after close starts a new thread.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        flushed = self.flush(timeout)
        thread = self._thread
        if thread is not None:
            self._stopping = True
            self._wake.set()
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if not thread.is_alive():
                self._thread = None
        if not flushed:
            logger.error(
                "tokenledger closed its writer to %s with %d row(s) not written.",
                self._url,
                self.pending,
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
        while True:
            self._sleep(backoff)
            try:
                healthy = self._write_available()
            except Exception:  # a bug here must not kill the thread and strand the rows
                logger.exception("tokenledger's writer failed unexpectedly; retrying")
                healthy = False
            if healthy:
                backoff = 0.0
            else:
                backoff = min(backoff * 2, _BACKOFF_MAX) if backoff else _BACKOFF_FIRST
            if self._stopping:
                with self._start_lock:
                    if self._thread is threading.current_thread():
                        self._thread = None
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
        batch = self._pending or _Batch()
        self._pending = None
        queue = self._queue
        size = len(batch)
        while size < self.max_batch:
            try:
                item = queue.popleft()
            except IndexError:
                break
            if isinstance(item, CallRecord):
                batch.calls.append(item.as_row())
            elif isinstance(item, RunRecord):
                batch.runs.append(item.as_row())
            elif isinstance(item, PriceRecord):
                batch.prices.append({name: getattr(item, name) for name in _PRICE_FIELDS})
            elif isinstance(item, _FlushMarker):
                batch.markers.append(item)
                continue
            else:
                self._reject(
                    "?", {"value": repr(item)}, "not a CallRecord, RunRecord or PriceRecord"
                )
                continue
            size += 1
        if size == 0 and not batch.markers:
            return None
        return batch

    def _write_available(self) -> bool:
        """Write everything queued, batch by batch. False when the database failed."""
        while True:
            batch = self._take()
            if batch is None:
                return True
            if len(batch) and not self._write_batch(batch):
                self._pending = batch
                return False
            for marker in batch.markers:
                marker.done.set()
            if not self._queue:
                return True

    def _execute(self, prices: list[Row], runs: list[Row], calls: list[Row]) -> None:
        with self._engine.begin() as connection:
            if prices:
                connection.execute(self._insert_prices, prices)
            if runs:
                connection.execute(self._upsert_runs, _dedupe_runs(runs))
            if calls:
                connection.execute(self._insert_calls, calls)

    def _write_batch(self, batch: _Batch) -> bool:
        try:
            self._execute(batch.prices, batch.runs, batch.calls)
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

    def _bisect(self, table: str, rows: list[Row], refused: list[RejectedRow]) -> int:
        if not rows:
            return 0
        try:
            self._execute(
                rows if table == "prices" else [],
                rows if table == "runs" else [],
                rows if table == "calls" else [],
            )
        except Exception as exc:
            if not _is_refused_row(exc):
                raise _Outage(exc) from exc
            if len(rows) == 1:
                refused.append(RejectedRow(table, rows[0], self._describe(exc)))
                return 0
            middle = len(rows) // 2
            return self._bisect(table, rows[:middle], refused) + self._bisect(
                table, rows[middle:], refused
            )
        return len(rows)

    def _describe(self, exc: BaseException) -> str:
        cause = getattr(exc, "orig", None) or exc
        text = f"{type(cause).__name__}: {cause}".strip()
        password = self._engine.url.password
        return text.replace(str(password), "***") if password else text

    def _reject(self, table: str, row: Row, error: str) -> None:
        self.stats.rejected += 1
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
        self.stats.failures += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            logger.warning(
                "tokenledger cannot write to the ledger at %s: %s. %d row(s) are kept in "
                "memory and retried until it is back.",
                self._url,
                self._describe(exc),
                self.pending,
            )
        else:
            logger.debug("tokenledger write to %s failed again: %s", self._url, self._describe(exc))

    def _succeeded(self, rows: int) -> None:
        self.stats.rows_written += rows
        self.stats.batches += 1
        if self._failing_since is not None:
            logger.warning(
                "tokenledger writes to the ledger at %s resumed after %.1f s.",
                self._url,
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None

    def _after_fork_in_child(self) -> None:
        # The parent's rows are the parent's to write; the thread did not survive the
        # fork, and the parent's pooled connections must not be shared.
        self._reset()
        self.stats = WriterStats()
        self.rejected = []
        self._engine.dispose(close=False)


_live_writers: weakref.WeakSet[BatchWriter] = weakref.WeakSet()


def _flush_at_exit() -> None:
    deadline = time.monotonic() + EXIT_FLUSH_TIMEOUT
    for writer in list(_live_writers):
        if not writer.flush(max(0.0, deadline - time.monotonic())):
            logger.error(
                "tokenledger exits with %d row(s) not written to %s.", writer.pending, writer._url
            )


def _after_fork_in_child() -> None:
    for writer in list(_live_writers):
        writer._after_fork_in_child()


atexit.register(_flush_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
