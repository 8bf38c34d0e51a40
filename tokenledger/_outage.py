"""What the batch writer does when the database or the spool fails.

**The database goes away.** Nothing is raised into the caller: the writer thread
retries with backoff, and from the second failed attempt on it moves the rows it holds
in memory to the local spool (`OutageHandling._spill_memory`), so a long outage costs
disk, not memory. Once the database is back the spool is replayed and removed
(`OutageHandling._replay_spool`). The outage is logged once, and its end.

**The spool cannot be written** (disk full, directory not writable). Rows stay in
memory instead, and that is logged once until the spool works again.

`OutageHandling` is a part of `~tokenledger._writer.BatchWriter`, kept here so that the
writer's module is its public methods and its thread; the attributes it declares are
the writer's, set up by ``BatchWriter.__init__`` and ``_reset``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tokenledger._batch import Batch, FlushMarker, Row, record_row

if TYPE_CHECKING:
    from tokenledger import _spool
    from tokenledger._writer import Durability, WriterStats
    from tokenledger._writes import LedgerWrites

__all__ = ["OutageHandling"]

logger = logging.getLogger("tokenledger.writer")


class OutageHandling:
    """Spilling rows to the spool, replaying it, and the log lines of an outage."""

    # The writer's, declared here for the type checker.
    max_batch: int
    max_buffer_rows: int
    durability: Durability
    spool: _spool.Spool
    _stats: WriterStats
    _writes: LedgerWrites
    _url: str
    _queue: collections.deque[Any]
    _wake: threading.Event
    _take_lock: threading.Lock
    _thread: threading.Thread | None
    _pending: Batch | None
    _inflight: Batch | None
    _waiting: list[FlushMarker]
    _failing_since: float | None
    _spool_failing: bool
    _hang_logged: bool

    # The writer's methods this part calls.
    @property
    def pending(self) -> int:
        """Rows put and not yet committed: see `BatchWriter.pending`."""
        raise NotImplementedError

    def _start(self) -> None:
        """Start the writer thread if it is not running."""
        raise NotImplementedError

    def _write_batch(self, batch: Batch) -> bool:
        """Write ``batch`` in one transaction; False when the database failed."""
        raise NotImplementedError

    def _put_to_spool(self, record: object) -> None:
        """The slow path: ``durable`` mode, or the memory buffer is full."""
        converted = record_row(record)
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

    def _release(self, markers: list[FlushMarker]) -> None:
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
                    batch = Batch()
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
        # A spill that fails part way (disk full, a file size limit) keeps in memory
        # only the rows it did not append: a row is never spooled twice, so a spool
        # that keeps failing cannot fill the disk with copies of the same rows.
        spilled = 0
        with self._take_lock:
            batches = [self._pending]
            if include_inflight:
                batches.append(self._inflight)
            for batch in dict.fromkeys(b for b in batches if b is not None):
                rows = list(batch.rows())
                done = self._spill_rows(rows)
                spilled += done
                _drop_first(batch, done)
                if done < len(rows):
                    # The spool is unusable: the rest stay in memory, and the batch's
                    # flushes also wait for the rows that did reach the spool.
                    self._wait_for_spool(batch.markers)
                    return
                self._waiting.extend(batch.markers)
                batch.markers = []
            if self._pending is not None and not len(self._pending):
                self._pending = None
            queue = self._queue
            moved: list[Any] = []
            for _ in range(len(queue)):  # what is there now; new puts wait for next time
                try:
                    moved.append(queue.popleft())
                except IndexError:
                    break
            records = [
                (item, converted) for item in moved if (converted := record_row(item)) is not None
            ]
            done = self._spill_rows(converted for _, converted in records)
            spilled += done
            gone = {id(item) for item, _ in records[:done]}
            kept = [item for item in moved if id(item) not in gone]
            if done < len(records):
                # Kept in memory (order does not matter), and so are the flushes among
                # them, which now also wait for what reached the spool.
                queue.extendleft(reversed(kept))
                self._wait_for_spool([m for m in kept if isinstance(m, FlushMarker)])
                return
            for item in kept:
                if isinstance(item, FlushMarker):
                    self._waiting.append(item)
                else:
                    queue.append(item)  # not a record: the thread rejects it
            self._wait_for_spool(self._waiting)
        if spilled:
            self._spool_failing = False
            logger.info(
                "tokenledger moved %d row(s) to its spool at %s while the ledger at %s is "
                "unreachable.",
                spilled,
                self.spool.directory,
                self._url,
            )

    def _wait_for_spool(self, markers: Iterable[FlushMarker]) -> None:
        """Make ``markers`` wait also for every segment written so far."""
        last = self.spool.last_seq
        for marker in markers:
            marker.spool_seq = max(marker.spool_seq, last)

    def _spill_rows(self, rows: Iterable[tuple[str, Row]]) -> int:
        """Append ``rows`` to the spool; returns how many were appended: all of them, or
        those before the first that failed (logged once)."""
        rows = list(rows)
        index, failed_at = 0, -1
        while index < len(rows):
            try:
                self.spool.append(*rows[index])
            except Exception as exc:
                # A write that fails seals its segment. After progress, try the row
                # once more in a new segment (a per-file size limit); failing again on
                # the same row, or a row that cannot be encoded, ends the spill.
                if failed_at == index or not isinstance(exc, OSError):
                    self._spool_failed(exc, len(rows) - index)
                    return index
                failed_at = index
                continue
            index += 1
        return len(rows)

    def _failed(self, exc: BaseException) -> None:
        self._stats.failures += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            logger.warning(
                "tokenledger cannot write to the ledger at %s: %s. %d row(s) are kept (in "
                "memory, then in the spool at %s) and retried until it is back.",
                self._url,
                self._writes.describe(exc),
                self.pending,
                self.spool.directory,
            )
        else:
            logger.debug(
                "tokenledger write to %s failed again: %s", self._url, self._writes.describe(exc)
            )

    def _succeeded(self, rows: int) -> None:
        self._stats.rows_written += rows
        self._stats.batches += 1
        self._hang_logged = False
        if self._failing_since is not None:
            logger.warning(
                "tokenledger writes to the ledger at %s resumed after %.1f s.",
                self._url,
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None


def _drop_first(batch: Batch, count: int) -> None:
    """Remove the first ``count`` rows of ``batch``, in `Batch.rows` order (prices,
    runs, calls). New lists: a write in progress keeps the ones it was given."""
    for name in ("prices", "runs", "calls"):
        rows = getattr(batch, name)
        taken = min(count, len(rows))
        if taken:
            setattr(batch, name, rows[taken:])
        count -= taken
