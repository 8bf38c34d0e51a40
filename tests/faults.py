"""Real network faults for tests: a loopback TCP proxy in front of PostgreSQL.

`PgProxy` listens on an ephemeral port of 127.0.0.1, forwards to the test server
(127.0.0.1:5432 by default) from a thread, and can be switched at any moment between:

* ``pass_through()``: bytes flow both ways (a healthy server).
* ``refuse()``: it stops listening, so new connections are refused, and closes every
  open connection (a stopped server).
* ``reset()``: every open connection is reset (RST: ``SO_LINGER`` 0, then close), and so
  is every new one as soon as it is accepted (a crashing server, a middlebox dropping
  state).
* ``stall()``: connections are accepted and kept open, but nothing is forwarded in
  either direction (a hung server, a blackholed network path). Switching back to
  ``pass_through()`` lets the held bytes flow again.

Usage::

    from faults import PgProxy

    with PgProxy() as proxy:
        url = proxy.url(schema_url)   # conftest's postgres_url/db_url, host and port rewritten
        proxy.stall()
        ...
        proxy.pass_through()

or the ``pg_proxy`` fixture (``from faults import pg_proxy``), which needs
``postgres_url`` and yields a started proxy in front of its server.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Literal

import pytest
import sqlalchemy as sa

__all__ = ["Mode", "PgProxy", "pg_proxy"]

Mode = Literal["pass", "refuse", "reset", "stall"]

_POLL = 0.05  # how often a connection's thread looks at the mode


def _rst(sock: socket.socket) -> None:
    """Close ``sock`` with a RST rather than a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Connection:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.closed = False

    def close(self, *, rst: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.server):
            if rst:
                _rst(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()


class PgProxy:
    """A switchable TCP proxy on 127.0.0.1 to ``upstream`` (see the module docstring).

    The port is chosen once, when the proxy is made, and kept across ``refuse()`` and
    ``pass_through()``, so a URL from `url` stays valid.
    """

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.upstream = upstream
        self.mode: Mode = "pass"
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._closed = False
        self.port: int = self._listen(0)
        #: Connections accepted so far (in any mode).
        self.accepted = 0

    # -- life --------------------------------------------------------------------------
    def __enter__(self) -> PgProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening, reset every connection and join every thread."""
        self._closed = True
        self._stop_listening()
        self._drop_connections(rst=True)
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(timeout=2)

    def url(self, url: str | sa.URL) -> str:
        """``url`` (a SQLAlchemy URL) with its host and port replaced by this proxy's;
        everything else (user, database, ``options=-csearch_path=...``) is kept."""
        parsed = sa.make_url(url).set(host="127.0.0.1", port=self.port)
        return parsed.render_as_string(hide_password=False)

    # -- modes -------------------------------------------------------------------------
    def pass_through(self) -> None:
        """Forward bytes both ways, listening again if it was refusing."""
        self.mode = "pass"
        if self._listener is None and not self._closed:
            self._listen(self.port)

    def refuse(self) -> None:
        """Stop listening (new connections are refused) and close every open one."""
        self.mode = "refuse"
        self._stop_listening()
        self._drop_connections(rst=False)

    def reset(self) -> None:
        """Reset every open connection, and every new one as soon as it is accepted."""
        self.mode = "reset"
        if self._listener is None and not self._closed:
            self._listen(self.port)
        self._drop_connections(rst=True)

    def stall(self) -> None:
        """Accept connections and keep them open, forwarding nothing either way."""
        self.mode = "stall"
        if self._listener is None and not self._closed:
            self._listen(self.port)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for c in self._connections if not c.closed)

    # -- machinery ---------------------------------------------------------------------
    def _listen(self, port: int) -> int:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        listener.settimeout(_POLL)
        self._listener = listener
        self._acceptor = self._spawn(self._accept, listener)
        return int(listener.getsockname()[1])

    def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        # shutdown() stops a listening socket at once on Linux (and wakes accept());
        # close() alone waits until no thread is blocked in it.
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            listener.close()
        thread = self._acceptor
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)

    def _drop_connections(self, *, rst: bool) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close(rst=rst)

    def _spawn(self, target: object, *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return thread

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.mode == "reset":
                _rst(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _rst(client)
                continue
            client.setblocking(True)
            server.setblocking(True)
            connection = _Connection(client, server)
            with self._lock:
                self._connections.append(connection)
            self._spawn(self._pump, connection)

    def _pump(self, connection: _Connection) -> None:
        client, server = connection.client, connection.server
        peer = {client: server, server: client}
        try:
            while not connection.closed:
                if self.mode != "pass":
                    threading.Event().wait(_POLL)  # stalled: read nothing, send nothing
                    continue
                readable, _, _ = select.select([client, server], [], [], _POLL)
                for source in readable:
                    if self.mode != "pass":
                        break
                    data = source.recv(65536)
                    if not data:
                        connection.close(rst=False)
                        return
                    peer[source].sendall(data)
        except (OSError, ValueError):
            connection.close(rst=False)


@pytest.fixture
def pg_proxy(postgres_url: str) -> Iterator[PgProxy]:
    """A started `PgProxy` in front of the server of conftest's ``postgres_url``."""
    parsed = sa.make_url(postgres_url)
    with PgProxy((parsed.host or "127.0.0.1", parsed.port or 5432)) as proxy:
        yield proxy
