"""Engines for the ledger: which URLs it accepts, how they are shown, how SQLite is set up.

`normalize_url` turns every accepted spelling of a ledger URL into the one tokenledger
connects with; `redact_url` is how a URL appears in messages and logs (never with a
password); `create_engine_for` makes the pooled engine, creating a SQLite ledger's file
with owner-only permissions and putting every SQLite connection in WAL mode.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import sqlite3
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import QueuePool

from tokenledger._location import SQLITE_BUSY_TIMEOUT_S, default_url
from tokenledger.exceptions import ConfigurationError, LedgerError

__all__ = [
    "SECRET_QUERY_KEYS",
    "WriterEngine",
    "check_dialect",
    "create_engine_for",
    "database_path",
    "insert_for",
    "normalize_url",
    "redact_url",
]


_ACCEPTED_URLS = (
    "tokenledger accepts `sqlite:///relative/path.db` or `sqlite:////absolute/path.db`, "
    "and `postgresql://user:password@host:5432/dbname` (also written `postgres://` or "
    "`postgresql+psycopg://`)."
)

#: Connection parameters that are secrets wherever they appear in a URL's query (libpq
#: takes a password there too): hidden in messages, left out of a ledger's identity.
SECRET_QUERY_KEYS = ("password", "sslpassword")

# Applied on every new SQLite connection, after journal_mode=WAL (see _set_sqlite_pragmas).
_SQLITE_PRAGMAS = (
    "PRAGMA synchronous=NORMAL",  # durable across process crashes; WAL makes it safe
    "PRAGMA foreign_keys=ON",
)


def check_dialect(dialect_name: str, *, who: str = "tokenledger", advice: str = "") -> None:
    """Raise `ConfigurationError` unless ``dialect_name`` is one the ledger runs on.

    ``who`` names what needs the dialect in the message; ``advice`` is appended to it.
    """
    if dialect_name not in ("sqlite", "postgresql"):
        raise ConfigurationError(
            f"The ledger engine's dialect is {dialect_name!r}; {who} supports sqlite and "
            f"postgresql.{advice}"
        )


def insert_for(dialect_name: str) -> Any:
    """The dialect's ``insert`` construct, which has ``on_conflict_do_*``."""
    check_dialect(dialect_name)
    if dialect_name == "sqlite":
        from sqlalchemy.dialects import sqlite

        return sqlite.insert
    return postgresql.insert


def redact_url(url: str | URL) -> str:
    """The URL as text with any password replaced by ``***``, for messages and logs.

    .. versionadded:: 0.1.0
    """
    if not isinstance(url, URL):
        try:
            url = make_url(url)
        except (ArgumentError, ValueError, TypeError):
            # Not parseable as a URL: still never print what looks like a password.
            text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", str(url))
            return re.sub(r"((?:ssl)?password=)[^&\s]*", r"\1***", text)
    # A password may also travel as a query parameter (?password=..., libpq style).
    secret_keys = [k for k in SECRET_QUERY_KEYS if k in url.query]
    if secret_keys:
        url = url.update_query_dict(dict.fromkeys(secret_keys, "***"))
    return url.render_as_string(hide_password=True)


def database_path(url: str | URL | None = None) -> str | None:
    """The absolute path of the SQLite file behind ``url``; None for a server database.

    ``None`` means the default URL. This is what ``tokenledger path`` prints, so other
    tools (``sqlite3``, Datasette) can open the ledger.

    .. versionadded:: 0.1.0
    """
    parsed = normalize_url(default_url() if url is None else url)
    if parsed.get_backend_name() != "sqlite":
        return None
    return parsed.database


def normalize_url(url: str | URL) -> URL:
    """Parse ``url`` and turn it into the form tokenledger connects with.

    ``postgres://`` and ``postgresql://`` become ``postgresql+psycopg://``; a relative
    SQLite path becomes absolute. Raises `ConfigurationError` for anything else.

    .. versionadded:: 0.1.0
    """
    if isinstance(url, URL):
        parsed = url
    else:
        try:
            parsed = make_url(url.strip())
        except (ArgumentError, ValueError, AttributeError) as exc:
            raise ConfigurationError(
                f"Database URL {redact_url(str(url))!r} is not a valid URL. {_ACCEPTED_URLS}"
            ) from exc
    driver = parsed.drivername
    if driver in ("postgres", "postgresql", "postgres+psycopg", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if driver in ("sqlite", "sqlite+pysqlite"):
        database = parsed.database or ""
        if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
            raise ConfigurationError(
                f"Database URL {redact_url(parsed)!r} is an in-memory SQLite database; the "
                "batch writer runs in its own thread and needs a database it can open "
                "again. Use a file, for example `sqlite:////tmp/ledger.db`."
            )
        if parsed.query.get("uri") in ("true", "1") or database.startswith("file:"):
            return parsed
        return parsed.set(drivername="sqlite", database=os.path.abspath(database))
    raise ConfigurationError(
        f"Database URL {redact_url(parsed)!r} uses driver {driver!r}, which tokenledger "
        f"does not support. {_ACCEPTED_URLS}"
    )


def _ensure_sqlite_file(path: str) -> None:
    """Create the ledger file, readable by its owner only, before SQLite opens it.

    SQLite would create it with the umask's permissions (often world-readable); its
    -wal and -shm files copy the main file's mode.
    """
    if os.path.exists(path):
        return
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return  # another process or thread created it first
    except OSError as exc:
        raise LedgerError(
            f"Cannot create the ledger file {path}: {exc.strerror or exc}. Check that the "
            "directory exists and is writable, or set TOKENLEDGER_DATABASE_URL."
        ) from exc
    os.close(fd)


def create_engine_for(url: str | URL | None = None) -> sa.Engine:
    """An engine for the ledger at ``url`` (``None``: `default_url`).

    SQLite: a file-backed database in WAL mode with ``synchronous=NORMAL``, a 30 s busy
    timeout and foreign keys on, shared by threads through a `~sqlalchemy.pool.QueuePool`;
    the file (and its directory) is created with mode 0600 (0700) on first connect.
    PostgreSQL: psycopg 3, ``pool_pre_ping``, a pool of 5 (+10 overflow) and a 10 s
    connect timeout unless the URL sets one.

    Raises:
        ConfigurationError: the URL cannot be parsed or names an unsupported database.
        ModuleNotFoundError: a PostgreSQL URL, and psycopg is not installed.

    .. versionadded:: 0.1.0
    """
    parsed = normalize_url(default_url() if url is None else url)
    if parsed.get_backend_name() == "postgresql":
        if importlib.util.find_spec("psycopg") is None:
            raise ModuleNotFoundError(
                f"The ledger at {redact_url(parsed)} is a PostgreSQL database, which needs "
                "psycopg: pip install 'tokenledger[postgres]'",
                name="psycopg",
            )
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = 10
        return sa.create_engine(
            parsed,
            pool_pre_ping=True,
            pool_size=5,
            max_overflow=10,
            pool_recycle=1800,
            connect_args=connect_args,
        )

    engine = sa.create_engine(
        parsed,
        poolclass=QueuePool,
        pool_size=5,
        max_overflow=10,
        connect_args={"check_same_thread": False},
    )
    path = parsed.database
    if path and not (parsed.query.get("uri") in ("true", "1") or path.startswith("file:")):

        @event.listens_for(engine, "do_connect")
        def _create_file(*_: Any) -> None:
            _ensure_sqlite_file(path)

    event.listen(engine, "connect", _set_sqlite_pragmas)
    return engine


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        # WAL: readers never block the writer and the writer never blocks them. The mode
        # is stored in the file, so only its first opener switches it; but that switch
        # needs an exclusive lock and SQLite reports "database is locked" at once, busy
        # timeout or not, when two processes open a new ledger together. Retry it.
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
        while True:
            try:
                if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    cursor.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()


def _libpq_version() -> int:
    try:
        import psycopg

        return int(psycopg.pq.version())
    except Exception:  # no psycopg: create_engine fails with its own clear message
        return 0


class WriterEngine:
    """The batch writer's own engine on a ledger, with bounded waits, and a way to abort
    what it is waiting for from another thread.

    The writer does not share the ledger's engine: its connections carry timeouts the
    ledger's reads must not have. PostgreSQL: ``connect_timeout`` (psycopg enforces it
    itself, so a server that accepts the TCP connection and then says nothing is
    covered), and ``statement_timeout`` and ``tcp_user_timeout`` set in the startup
    packet (no extra round trip). SQLite: the busy timeout of every ledger connection.

    A server that hangs mid-statement (or a network path that swallows packets while
    the kernel keeps acknowledging them) never answers, and no server-side timeout can
    help: `abort` shuts down the socket of every connection of this engine (PostgreSQL)
    or interrupts its statement (SQLite), so the write raises and the writer's outage
    path takes over.
    """

    def __init__(self, url: URL, *, connect_timeout: float, statement_timeout: float) -> None:
        self._raw: dict[int, Any] = {}
        # SQLite: the (device, inode) of the file each open connection writes to.
        self._files: dict[int, tuple[int, int]] = {}
        self.dialect_name = url.get_backend_name()
        database = url.database or ""
        #: The SQLite ledger's file (None: a server, or a ``file:`` URI).
        self.sqlite_path: str | None = (
            database
            if self.dialect_name == "sqlite"
            and database
            and not (url.query.get("uri") in ("true", "1") or database.startswith("file:"))
            else None
        )
        if self.dialect_name == "postgresql":
            connect_args: dict[str, Any] = {
                "connect_timeout": max(1, round(connect_timeout)),
            }
            given = url.query.get("connect_timeout")
            if isinstance(given, str) and given.isdigit() and 0 < int(given) < connect_timeout:
                connect_args["connect_timeout"] = int(given)
            options = url.query.get("options")
            millis = max(1, round(statement_timeout * 1000))
            connect_args["options"] = " ".join(
                part
                for part in (
                    options if isinstance(options, str) else "",
                    f"-c statement_timeout={millis}",
                )
                if part
            )
            if _libpq_version() >= 120000:  # an older libpq refuses the option
                connect_args["tcp_user_timeout"] = millis
            self.engine = sa.create_engine(
                url,
                pool_pre_ping=True,
                pool_size=1,
                max_overflow=2,
                pool_recycle=1800,
                connect_args=connect_args,
            )
        else:
            self.engine = create_engine_for(url)
        event.listen(self.engine, "connect", self._connected)
        event.listen(self.engine, "close", self._closed)
        event.listen(self.engine, "close_detached", self._closed_detached)

    def _connected(self, dbapi_connection: Any, _record: Any) -> None:
        self._raw[id(dbapi_connection)] = dbapi_connection
        if self.sqlite_path is not None:
            try:
                found = os.stat(self.sqlite_path)
            except OSError:
                return
            self._files[id(dbapi_connection)] = (found.st_dev, found.st_ino)

    def _closed(self, dbapi_connection: Any, _record: Any) -> None:
        self._raw.pop(id(dbapi_connection), None)
        self._files.pop(id(dbapi_connection), None)

    def _closed_detached(self, dbapi_connection: Any) -> None:
        self._closed(dbapi_connection, None)

    def file_replaced(self) -> bool:
        """SQLite: whether the ledger's path no longer names the file some open
        connection writes to (it was deleted, or replaced by another file). Rows
        committed through such a connection go to a file no one can open again.

        One ``stat(2)``: cheap enough to call after every committed batch.
        """
        path, files = self.sqlite_path, self._files
        if path is None or not files:
            return False
        try:
            found = os.stat(path)
        except FileNotFoundError:
            return True
        except OSError:
            return False  # cannot tell (permissions): the next write says what is wrong
        now = (found.st_dev, found.st_ino)
        return any(opened != now for opened in list(files.values()))

    def abort(self) -> int:
        """Make whatever this engine's connections wait for fail now; returns how many
        connections were aborted. Safe to call from any thread."""
        aborted = 0
        for connection in list(self._raw.values()):
            try:
                if self.dialect_name == "postgresql":
                    if connection.closed:
                        continue
                    fd = connection.pgconn.socket
                    # shutdown(2) on a duplicate acts on the shared socket: a thread
                    # blocked reading it wakes to end-of-file, and libpq reports the
                    # connection lost. The descriptor itself stays the driver's.
                    with socket.socket(fileno=os.dup(fd)) as sock:
                        sock.shutdown(socket.SHUT_RDWR)
                else:
                    connection.interrupt()
            except Exception:  # noqa: S112 - closed meanwhile: nothing to abort
                continue
            aborted += 1
        return aborted

    def dispose(self, *, close: bool = True) -> None:
        self.engine.dispose(close=close)
        if not close:
            self._raw.clear()
            self._files.clear()
