"""Worker threads that never hold up the interpreter's exit.

`concurrent.futures.ThreadPoolExecutor` joins its threads when the interpreter exits,
so one worker stuck on a hung database connection would keep the user's program from
ending. These workers are daemon threads: work still running at exit is abandoned
(whatever it would have written is in the spool or expires with its lease).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["DaemonWorkers"]

T = TypeVar("T")

_STOP: Any = object()


class DaemonWorkers:
    """Up to ``size`` daemon threads running submitted work, started as needed."""

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False

    def submit(self, work: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name} workers are shut down")
            if self._idle == 0 and len(self._threads) < self._size:
                thread = threading.Thread(
                    target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            else:
                self._idle -= 1 if self._idle else 0
        self._queue.put((future, work, args))
        return future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            future, work, args = item
            if future.set_running_or_notify_cancel():
                try:
                    result = work(*args)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            with self._lock:
                self._idle += 1

    def shutdown(self) -> None:
        """Stop taking work; idle threads end, busy ones end after their work."""
        with self._lock:
            self._closed = True
            count = len(self._threads)
        for _ in range(count):
            self._queue.put(_STOP)
