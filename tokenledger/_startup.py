"""Starting a ledger whose database may be down: check the schema within a bound, or
start degraded and keep checking in the background.

A service must not crash because its ledger is briefly unreachable. An unreachable (or
hung) PostgreSQL at start-up leaves the ledger degraded: rows are kept and spooled by
the writer, budgeted calls follow the failure policy, and a thread checks the schema
again until the database answers. A database that answers with an error (no such
database, a wrong password, another schema revision) is a mistake that waiting will not
fix: that raises at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import sqlalchemy

from tokenledger import _schema
from tokenledger._storage import redact_url
from tokenledger.exceptions import LedgerError, SchemaVersionError

__all__ = ["check_schema", "connect_in_background"]

logger = logging.getLogger("tokenledger")


def check_schema(engine: sqlalchemy.Engine, timeout: float) -> bool:
    """Check (or create) the schema, waiting at most ``timeout`` seconds. True when
    done; False when the database is unreachable or did not answer in time.

    Raises:
        SchemaVersionError, LedgerError: the server answered with an error.
    """
    outcome: list[BaseException | None] = []
    worker = threading.Thread(
        target=lambda: outcome.append(_attempt(_schema.ensure_schema, engine)),
        name="tokenledger-schema",
        daemon=True,
    )
    worker.start()
    worker.join(timeout)
    if not outcome:
        logger.warning(
            "tokenledger starts without its database: %s did not answer within %g s. "
            "Rows are kept and spooled, budgeted calls follow the failure policy, and "
            "the schema is checked again in the background.",
            redact_url(engine.url),
            timeout,
        )
        return False
    error = outcome[0]
    if error is None:
        return True
    if not _unreachable(engine, error):
        raise error
    logger.warning(
        "tokenledger starts without its database (%s). Rows are kept and spooled, "
        "budgeted calls follow the failure policy, and the schema is checked again in "
        "the background.",
        error,
    )
    return False


def connect_in_background(
    engine: sqlalchemy.Engine, *, stopped: Callable[[], bool], connected: Callable[[], None]
) -> threading.Thread:
    """Start a thread that retries the schema check, with backoff up to 30 s, until the
    database answers (then calls ``connected``) or ``stopped()`` is true."""

    def retry() -> None:
        delay = 0.5
        while not stopped():
            error = _attempt(_schema.ensure_schema, engine)
            if error is None:
                connected()
                logger.warning("tokenledger reached its database at %s", redact_url(engine.url))
                return
            if not _unreachable(engine, error):
                logger.error(
                    "tokenledger reached its database but cannot use it: %s; rows stay in "
                    "the spool until this is fixed",
                    error,
                )
                return
            time.sleep(delay)
            delay = min(delay * 2, 30.0)

    thread = threading.Thread(target=retry, name="tokenledger-connect", daemon=True)
    thread.start()
    return thread


def _unreachable(engine: sqlalchemy.Engine, error: BaseException) -> bool:
    """Whether ``error`` says the database server could not be reached (start degraded),
    rather than that it answered with a refusal (a wrong database name, password or
    schema revision: a mistake that waiting will not fix, raised at once).

    A PostgreSQL server that answers gives a SQLSTATE, or a "FATAL:" message while
    connecting; a refused, reset or timed-out connection has neither. A SQLite file
    that cannot be opened is a local mistake.
    """
    if isinstance(error, SchemaVersionError) or not isinstance(error, LedgerError):
        return False
    if engine.dialect.name != "postgresql":
        return False
    cause = getattr(error.__cause__, "orig", None)
    sqlstate = getattr(cause, "sqlstate", None)
    if isinstance(sqlstate, str) and (sqlstate[:2] in ("08", "53") or sqlstate.startswith("57P")):
        return True  # a connection failure, no resources, or a server starting or stopping
    if sqlstate is not None:
        return False
    text = str(cause)
    if any(s in text for s in ("starting up", "shutting down", "recovery mode", "too many")):
        return True  # a restart or failover in progress: it will answer soon
    # An error the server sent while the connection was being set up (no such
    # database, a wrong password) comes as libpq's text with the server's "FATAL:".
    return "FATAL:" not in str(cause)


def _attempt(
    work: Callable[[sqlalchemy.Engine], object], engine: sqlalchemy.Engine
) -> BaseException | None:
    """Run ``work(engine)``; the exception it raised, or None."""
    try:
        work(engine)
    except BaseException as exc:
        return exc
    return None
