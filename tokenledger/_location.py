"""Where the ledger is and which schema it must have, without importing SQLAlchemy.

`tokenledger._storage` and `tokenledger._schema` publish these names; they live here so that
``tokenledger report`` on a SQLite ledger can find the file and check its revision before
(and, when both are as expected, instead of) loading SQLAlchemy, which is two thirds of
that command's start-up.
"""

from __future__ import annotations

import os

#: The environment variable naming the ledger's database URL.
DATABASE_URL_ENV = "TOKENLEDGER_DATABASE_URL"
#: The SQLite file used, in the current directory, when no URL is configured.
DEFAULT_SQLITE_FILENAME = "tokenledger.db"

# Not Alembic's default "alembic_version": a user's own migrations in the same database
# keep theirs untouched.
VERSION_TABLE = "tokenledger_alembic_version"

# Every revision in tokenledger.migrations, newest first: the first is the one this code
# writes. Written out so that opening a ledger need not load Alembic to list the scripts;
# a test keeps it equal to what Alembic finds there, so a new migration must add its id.
KNOWN_REVISIONS: tuple[str, ...] = ("0005", "0004", "0003", "0002", "0001")

#: How long a SQLite connection waits for another process's lock before failing.
SQLITE_BUSY_TIMEOUT_S = 30

_PLAIN_SQLITE_PREFIXES = ("sqlite:///", "sqlite+pysqlite:///")


def default_url() -> str:
    """The ledger URL used when none is given.

    ``$TOKENLEDGER_DATABASE_URL`` if set, else the SQLite file ``tokenledger.db`` in the
    current working directory (as an absolute path, so a later ``chdir`` does not move it).

    .. versionadded:: 0.1.0
    """
    configured = os.environ.get(DATABASE_URL_ENV, "").strip()
    if configured:
        return configured
    return f"sqlite:///{os.path.abspath(DEFAULT_SQLITE_FILENAME)}"


def plain_sqlite_file(url: str) -> str | None:
    """The absolute path behind ``sqlite:///PATH``; None for every other kind of URL.

    Only the plain form: a URL with a query, a fragment, a ``%`` escape or a ``file:``
    path is left to SQLAlchemy's parser (`tokenledger._storage.normalize_url`), which
    gives the same path for every URL this accepts.
    """
    url = url.strip()
    for prefix in _PLAIN_SQLITE_PREFIXES:
        if url.startswith(prefix):
            database = url[len(prefix) :]
            break
    else:
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    if any(character in database for character in "?#%"):
        return None
    return os.path.abspath(database)
