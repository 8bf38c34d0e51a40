"""The batch writer under real faults: a hung server, a deleted SQLite file, a spool that
cannot be written, a spool planted by someone else.

Faults are real: `faults.PgProxy` (a TCP proxy in front of the test server) stalls or
resets connections, files are really deleted, the spool really sits on a full
filesystem or behind a file size limit. The expected value comes first.
"""

from __future__ import annotations

import socket
import threading
import time

import psycopg
import pytest
import sqlalchemy as sa
from faults import PgProxy, pg_proxy

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
