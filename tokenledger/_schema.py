"""Creating and upgrading the ledger's schema from code.

The Alembic scripts ship inside the package (``tokenledger.migrations``) and the Alembic
configuration is built here, so this works from a wheel with no ``alembic.ini``.
A ledger opens with `ensure_schema`: it creates a new database and refuses, with the
command that fixes it, a database at any other revision than this code's.

Alembic is imported only to migrate. Checking a ledger's revision, which every command and
every `~tokenledger.Ledger` does on open, is one SELECT compared against `KNOWN_REVISIONS`:
loading Alembic (and Mako, which it brings) would add a tenth of a second to every
``tokenledger report``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from importlib.resources import as_file, files
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from tokenledger._location import KNOWN_REVISIONS, VERSION_TABLE
from tokenledger._storage import redact_url
from tokenledger.exceptions import LedgerError, SchemaVersionError

if TYPE_CHECKING:
    from alembic.config import Config

    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

__all__ = [
    "KNOWN_REVISIONS",
    "LEDGER_TABLES",
    "MIGRATION_LOCK_ID",
    "VERSION_TABLE",
    "current_revision",
    "downgrade",
    "ensure_schema",
    "head_revision",
    "stamp",
    "upgrade",
]

# The PostgreSQL advisory lock that serialises concurrent upgrades. Any fixed 64-bit key
# works as long as every tokenledger version uses the same one: it is b"tokenldg".
MIGRATION_LOCK_ID = 0x746F6B656E6C6467

LEDGER_TABLES = ("budget_windows", "budgets", "calls", "prices", "reservations", "runs")


def _migrations_location() -> Traversable:
    # files() finds the scripts wherever the package is: a wheel install, an editable
    # install (package-dir maps tokenledger.migrations to ./migrations) or a checkout.
    # A function, so a test can point it at a copy with an extra revision.
    try:
        return files("tokenledger.migrations")
    except ModuleNotFoundError:
        # Imported straight from a source checkout (its root on sys.path, nothing
        # installed): the scripts sit beside the package, in ./migrations.
        checkout = Path(__file__).resolve().parent.parent / "migrations"
        if (checkout / "env.py").is_file():
            return checkout
        raise


@contextlib.contextmanager
def _alembic_config(connection: sa.Connection | None = None) -> Iterator[Config]:
    from alembic.config import Config

    with as_file(_migrations_location()) as location:
        config = Config()
        # ConfigParser interpolates '%': escape it in the path.
        config.set_main_option("script_location", str(location).replace("%", "%%"))
        config.set_main_option("path_separator", "os")
        if connection is not None:
            config.attributes["connection"] = connection
        yield config


def head_revision() -> str:
    """The schema revision this tokenledger writes (the newest migration's id).

    .. versionadded:: 0.1.0
    """
    return KNOWN_REVISIONS[0]


def _driver_reason(engine: sa.Engine, exc: BaseException) -> str:
    reason = str(getattr(exc, "orig", None) or exc).strip()
    password = engine.url.password
    if password:
        reason = reason.replace(str(password), "***")
    return reason


def _read_revision(connection: sa.Connection, *, exists: bool | None = None) -> str | None:
    """The revision in the version table, None when there is none (what Alembic would read).

    ``exists``: whether the version table exists, when the caller has already looked.
    """
    if exists is None:
        exists = sa.inspect(connection).has_table(VERSION_TABLE)
    if not exists:
        return None
    version_num = sa.column("version_num", sa.String)
    revisions = connection.scalars(sa.select(version_num).select_from(sa.table(VERSION_TABLE)))
    found = list(revisions)
    if len(found) > 1:
        # tokenledger's migrations are one line, so only a hand-edited table gets here.
        raise SchemaVersionError(
            f"The ledger at {redact_url(connection.engine.url)} has {len(found)} revisions "
            f"({', '.join(sorted(found))}) in its {VERSION_TABLE} table; tokenledger keeps "
            "exactly one. Delete the rows of the revisions the ledger is not at."
        )
    return found[0] if found else None


def current_revision(engine: sa.Engine) -> str | None:
    """The ledger's schema revision; None for a database tokenledger has not created.

    Raises:
        LedgerError: the database cannot be reached.

    .. versionadded:: 0.1.0
    """
    try:
        with engine.connect() as connection:
            return _read_revision(connection)
    except sa.exc.DBAPIError as exc:
        raise LedgerError(
            f"Cannot open the ledger at {redact_url(engine.url)}: {_driver_reason(engine, exc)}"
        ) from exc


def _newer_error(engine: sa.Engine, revision: str, head: str) -> SchemaVersionError:
    return SchemaVersionError(
        f"The ledger at {redact_url(engine.url)} is at schema revision {revision!r}, "
        f"which this tokenledger (newest revision {head!r}) does not know: it was written "
        "by a newer tokenledger. Upgrade the package (pip install -U tokenledger) on "
        "this host."
    )


def _migrate(engine: sa.Engine, action: str, revision: str) -> None:
    from alembic import command

    current = current_revision(engine)
    if current is not None and current not in KNOWN_REVISIONS:
        raise _newer_error(engine, current, head_revision())
    try:
        with engine.begin() as connection, _alembic_config(connection) as config:
            getattr(command, action)(config, revision)
    except sa.exc.DBAPIError as exc:
        raise LedgerError(
            f"Could not {action} the ledger at {redact_url(engine.url)} to {revision!r}: "
            f"{_driver_reason(engine, exc)}"
        ) from exc


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Migrate the ledger up to ``revision``; safe to run from several processes at once.

    .. versionadded:: 0.1.0
    """
    _migrate(engine, "upgrade", revision)


def downgrade(engine: sa.Engine, revision: str) -> None:
    """Migrate the ledger down to ``revision`` (``"base"`` drops every ledger table).

    .. versionadded:: 0.1.0
    """
    _migrate(engine, "downgrade", revision)


def stamp(engine: sa.Engine, revision: str) -> None:
    """Record ``revision`` as the ledger's revision without running any migration.

    For a ledger whose tables exist but whose revision row was lost.

    .. versionadded:: 0.1.0
    """
    _migrate(engine, "stamp", revision)


def ensure_schema(engine: sa.Engine) -> None:
    """Make sure the ledger is at this code's schema revision before it is used.

    An empty database is migrated to head (a new ledger needs no setup step). A ledger
    at head is left alone. Anything else raises rather than guess:

    Raises:
        SchemaVersionError: the ledger is at an older revision (the message gives the
            ``tokenledger db upgrade`` command), at a revision this code does not know
            (written by a newer tokenledger), or the database has tables named like
            the ledger's but no tokenledger revision.
        LedgerError: the database cannot be reached; the message has the URL (password
            hidden) and the driver's reason.

    .. versionadded:: 0.1.0
    """
    url = redact_url(engine.url)
    try:
        with engine.connect() as connection:
            tables = set(sa.inspect(connection).get_table_names())
            revision = _read_revision(connection, exists=VERSION_TABLE in tables)
    except sa.exc.DBAPIError as exc:
        raise LedgerError(
            f"Cannot open the ledger at {url}: {_driver_reason(engine, exc)}"
        ) from exc

    head = head_revision()
    if revision == head:
        return
    if revision is None:
        found = sorted(tables.intersection(LEDGER_TABLES))
        if found:
            raise SchemaVersionError(
                f"The database at {url} has table(s) {', '.join(found)} but no tokenledger "
                f"schema revision (table {VERSION_TABLE} is missing or empty), so tokenledger "
                "will not write to it. Point tokenledger at a database (or, on PostgreSQL, "
                "a schema: `?options=-csearch_path%3Dtokenledger`) of its own; if tokenledger "
                "created these tables and only the revision was lost, record it with "
                f"`tokenledger db stamp {head} --db {url}`."
            )
        upgrade(engine)
        return
    if revision not in KNOWN_REVISIONS:
        raise _newer_error(engine, revision, head)
    raise SchemaVersionError(
        f"The ledger at {url} is at schema revision {revision}; this tokenledger needs "
        f"{head}. Run `tokenledger db upgrade --db {url}`."
    )
