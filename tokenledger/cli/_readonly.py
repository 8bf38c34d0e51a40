"""Reading a SQLite ledger that cannot be written: on read-only media, in a directory
the user may not write, or a file marked immutable.

tokenledger's engines (`tokenledger._storage.create_engine_for`) put every connection in
WAL mode, and reading a WAL database makes SQLite create its ``-shm`` and ``-wal``
files next to it: on read-only media even ``?mode=ro`` fails ("unable to open database
file"). Reading commands therefore open a file they cannot write themselves, first as
``file:PATH?mode=ro`` (enough when the directory is writable or the ``-shm`` file is
there) and, when that fails too, as ``file:PATH?immutable=1``, which reads the file
without locks or a ``-shm`` file: right for media nobody can write either.

Imports only the standard library at the top, so that ``tokenledger report`` can use it
without SQLAlchemy (see `tokenledger.cli.reports`).
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from typing import TYPE_CHECKING

from tokenledger._location import SQLITE_BUSY_TIMEOUT_S

if TYPE_CHECKING:
    import sqlalchemy as sa

__all__ = ["connect_read_only", "is_read_only", "read_only_engine", "sqlite_uri"]

# How a file SQLite cannot write is opened, in the order they are tried.
_READ_ONLY_MODES = ("mode=ro", "immutable=1")


def is_read_only(path: str) -> bool:
    """Whether this process cannot write the SQLite file ``path`` or its directory.

    `os.access` asks the kernel, so a read-only mount or an immutable file counts even
    for root, whom permission bits do not stop.
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    return not (os.access(path, os.W_OK) and os.access(directory, os.W_OK))


def sqlite_uri(path: str, query: str) -> str:
    """The SQLite URI ``file:PATH?QUERY``, the path quoted byte by byte (a path that is
    not valid UTF-8, or holds ``?``, ``#`` or ``%``, is still the same file)."""
    return f"file:{urllib.parse.quote(os.fsencode(os.path.abspath(path)))}?{query}"


def _read_only_query(path: str) -> str:
    """The first of `_READ_ONLY_MODES` with which SQLite can read ``path``.

    Raises the last mode's `sqlite3.Error` when none can (not a database, and the like).
    """
    error: sqlite3.Error | None = None
    for query in _READ_ONLY_MODES:
        try:
            connection = sqlite3.connect(sqlite_uri(path, query), uri=True)
            try:
                # Reading the schema is what needs the -shm file of a WAL database.
                connection.execute("SELECT count(*) FROM sqlite_master").fetchall()
            finally:
                connection.close()
        except sqlite3.Error as exc:
            error = exc
            continue
        return query
    assert error is not None
    raise error


def connect_read_only(path: str, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """A read-only `sqlite3` connection to the ledger file ``path``, which this process
    cannot write (`is_read_only`)."""
    return sqlite3.connect(
        sqlite_uri(path, _read_only_query(path)),
        uri=True,
        timeout=SQLITE_BUSY_TIMEOUT_S,
        check_same_thread=check_same_thread,
    )


def read_only_engine(path: str) -> sa.Engine:
    """A SQLAlchemy engine that reads the ledger file ``path`` read-only, and never
    switches it to WAL mode or creates anything next to it.

    The read-only mode is in the engine's URL (``sqlite+pysqlite:///file:PATH?mode=ro&
    uri=true``), so an engine made from ``engine.url`` (the budget store makes its own)
    reads the same way.
    """
    import sqlalchemy as sa

    name, _, value = _read_only_query(path).partition("=")
    url = sa.engine.URL.create(
        "sqlite+pysqlite",
        database=sqlite_uri(path, "").rstrip("?"),
        query={name: value, "uri": "true"},
    )
    return sa.create_engine(
        url,
        poolclass=sa.pool.NullPool,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
    )
