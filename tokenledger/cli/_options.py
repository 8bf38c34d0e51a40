"""What every ``tokenledger`` command shares before it prints: the options (``--db``,
``--json``, ``--since``/``--until``, ``--agent``, ``--success``, ``--limit``), opening
the ledger those options name, and turning failures into one-line errors.

Like the rest of the package it imports only click at the top: SQLAlchemy, the schema
and the query layer are imported inside the functions that need them, so that a
command that never opens a ledger through SQLAlchemy never pays for it.

Reading commands never create or migrate a database (`open_for_reading`): a missing
SQLite file is an error, not a new ledger.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import click

from tokenledger.exceptions import ConfigurationError, LedgerError

if TYPE_CHECKING:
    import sqlalchemy as sa

__all__ = [
    "EMPTY",
    "SINCE_HELP",
    "Filters",
    "LedgerGroup",
    "db_option",
    "db_url_of",
    "engine_for",
    "existing_url",
    "filter_options",
    "json_option",
    "limit_option",
    "name_ledger",
    "open_for_reading",
    "parsed_by",
    "read_rows",
    "reading_engine",
    "resolve_url",
    "time_value",
    "window_options",
    "window_values",
    "with_history",
]

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")

#: What a reading command says about a ledger that holds nothing at all.
EMPTY = "No runs recorded yet. Try `tokenledger demo`."
SINCE_HELP = "Only runs/calls since then: 30m, 24h, 7d, 2w, or an ISO date (2025-01-31)."
_DB_HELP = (
    "The ledger: a SQLite file path (what `tokenledger path` prints) or a database URL "
    "(sqlite:///..., postgresql://...). Default: $TOKENLEDGER_DATABASE_URL, else "
    "tokenledger.db in the current directory."
)
_UNTIL_HELP = "Only runs/calls before then (exclusive): same forms as --since."
_AGENT_HELP = "Only root runs of this agent (default: every agent)."
_SUCCESS_HELP = (
    "Outcome labels that count as a success, comma-separated (e.g. resolved,accepted). "
    "Default: any outcome on a run that ended ok."
)
# Where the root context keeps the ledger's name (its file, or its redacted URL) for
# `LedgerGroup` to put in a database error.
_URL_KEY = "tokenledger.url"


# ---------------------------------------------------------------------------- errors


class LedgerGroup(click.Group):
    """Turns tokenledger's and the database driver's errors into one-line messages.

    ``Error: <sentence>`` on stderr and exit status 1, never a traceback: a user who
    mistyped a URL or forgot ``db upgrade`` needs the fix, not our stack.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except LedgerError as exc:  # SchemaVersionError included
            raise click.ClickException(str(exc)) from exc
        except ConfigurationError as exc:
            raise click.ClickException(str(exc)) from exc
        except ModuleNotFoundError as exc:
            if exc.name in ("psycopg", "psycopg2"):
                raise click.ClickException(str(exc)) from exc
            raise
        except Exception as exc:
            reason = _driver_failure(exc)
            if reason is None:
                raise
            url = ctx.meta.get(_URL_KEY, "the ledger")
            raise click.ClickException(f"The database at {url} failed: {reason}") from exc


def _driver_failure(exc: Exception) -> str | None:
    """What the database said, when ``exc`` is the database failing; else None.

    SQLAlchemy wraps the driver's errors; `tokenledger report` on a SQLite file calls
    `sqlite3` itself (see `tokenledger.cli.reports`). Neither module is imported here
    just to ask: an error of a module nobody loaded cannot have been raised.
    """
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(exc, sa_exc.DBAPIError):
        return str(exc.orig or exc).strip()
    sqlite3 = sys.modules.get("sqlite3")
    # The database's own failures only: a ProgrammingError or InterfaceError would be a
    # bug in tokenledger, and keeps its traceback.
    if sqlite3 is not None and (
        isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError
    ):
        return str(exc).strip() or type(exc).__name__
    return None


def name_ledger(name: str) -> None:
    """Name the ledger in any database error the command ends with (see `LedgerGroup`)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.find_root().meta[_URL_KEY] = name


# --------------------------------------------------------------------------- options


def db_url_of(text: str) -> str | None:
    """The ledger URL ``--db`` names: a URL as given; anything without ``://`` is the
    path of a SQLite file (``~`` expanded, made absolute); None for an empty value.

    ``?``, ``#`` and ``%`` in a path are escaped, since SQLAlchemy reads a URL's path
    percent-decoded: the URL names the file, whatever characters its name holds.
    """
    text = text.strip()
    if not text:
        return None
    if "://" in text:
        return text
    path = os.path.abspath(os.path.expanduser(text))
    for character, escaped in (("%", "%25"), ("?", "%3F"), ("#", "%23")):
        path = path.replace(character, escaped)
    return f"sqlite:///{path}"


def _db_value(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--db`` as a URL: the command's own, else the nearest enclosing command's
    (``tokenledger --db x.db report``, ``tokenledger budgets --db x.db set ...``)."""
    if value is not None:
        return db_url_of(value)
    parent = ctx.parent
    while parent is not None:
        inherited = parent.params.get("db_url")
        if inherited is not None:
            return cast("str", inherited)
        parent = parent.parent
    return None


def db_option(fn: F, *, help: str = _DB_HELP) -> F:
    """``--db PATH|URL`` (see `db_url_of`), inherited from an enclosing command."""
    return click.option(
        "--db",
        "db_url",
        metavar="PATH|URL",
        default=None,
        callback=_db_value,
        help=help,
    )(fn)


def json_option(fn: F) -> F:
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print JSON (Decimals as strings, ISO-8601 times), for scripts.",
    )(fn)


def _limit_value(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value < 0:
        raise click.BadParameter(f"{value} is negative; give a count, or 0 for all.")
    return value


def limit_option(fn: F) -> F:
    return click.option(
        "-n",
        "--limit",
        type=int,
        default=20,
        show_default=True,
        callback=_limit_value,
        help="How many to show, newest first (0: all).",
    )(fn)


def window_options(fn: F) -> F:
    """``--since`` and ``--until``, as text: commands read them with `window_values`."""
    fn = click.option("--until", metavar="WHEN", help=_UNTIL_HELP)(fn)
    return click.option("--since", metavar="WHEN", help=SINCE_HELP)(fn)


def time_value(text: str | None, flag: str) -> dt.datetime | None:
    """The time ``--since`` or ``--until`` (``flag``) names, or a usage error."""
    if text is None:
        return None
    from tokenledger._reporting import parse_since

    try:
        return parse_since(text)
    except ConfigurationError as exc:
        raise click.BadParameter(
            f"{text!r} is not a time. Use a duration back from now (30m, 24h, 7d, 2w) "
            "or an ISO date (2025-01-31).",
            param_hint=f"'{flag}'",
        ) from exc


def window_values(
    since: str | None, until: str | None
) -> tuple[dt.datetime | None, dt.datetime | None]:
    """The times `window_options` name."""
    return time_value(since, "--since"), time_value(until, "--until")


def parsed_by(
    parse: Callable[[str], Any], problem: str
) -> Callable[[click.Context, click.Parameter, str | None], Any]:
    """A click callback: the option's text through ``parse``, or a usage error that reads
    ``'<text>' <problem>`` when ``parse`` raises `ConfigurationError`.

    ``parse`` imports what it needs when called, so declaring the option stays cheap.
    """

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except ConfigurationError as exc:
            raise click.BadParameter(f"{value!r} {problem}") from exc

    return callback


def _parse_success(value: str) -> Any:
    from tokenledger.queries import parse_success

    return parse_success(value)


def _success_option(fn: F) -> F:
    return click.option(
        "--success",
        metavar="LABELS",
        callback=parsed_by(
            _parse_success,
            "names no outcome label; give the labels that count as a success, separated "
            "by commas (for example resolved,accepted).",
        ),
        help=_SUCCESS_HELP,
    )(fn)


@dataclasses.dataclass(frozen=True)
class Filters:
    """Which root runs a command reads: ``--agent``, ``--since``/``--until`` (as given)
    and ``--success`` (parsed; None when the command has no such option or it was not
    given)."""

    agent: str | None
    since: str | None
    until: str | None
    success: tuple[str, ...] | None

    def query(self) -> dict[str, Any]:
        """The filters as keyword arguments of the query and economics functions, or a
        usage error for a time that is none. ``success`` only when given: every function
        that takes it defaults it to None, and those that do not are never given it.
        Call it before opening the ledger, so that a bad flag is reported as such
        whatever the ledger."""
        since, until = window_values(self.since, self.until)
        query: dict[str, Any] = {"agent": self.agent, "since": since, "until": until}
        if self.success is not None:
            query["success"] = self.success
        return query


def filter_options(*, success: bool) -> Callable[[F], F]:
    """``--agent``, ``--since``, ``--until`` and, with ``success``, ``--success``, handed
    to the command as one `Filters` argument, ``filters``."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def command(
            *,
            agent: str | None,
            since: str | None,
            until: str | None,
            success: tuple[str, ...] | None = None,
            **options: Any,
        ) -> Any:
            return fn(filters=Filters(agent, since, until, success), **options)

        wrapped = _success_option(command) if success else command
        wrapped = window_options(wrapped)
        return cast("F", click.option("--agent", metavar="NAME", help=_AGENT_HELP)(wrapped))

    return decorate


# --------------------------------------------------------------------------- the ledger


def resolve_url(db_url: str | None) -> tuple[str, str | None]:
    """The URL to use and its SQLite path (None for a server), or a usage error."""
    from tokenledger import _storage as storage

    url = db_url or storage.default_url()
    try:
        path = storage.database_path(url)
    except ConfigurationError as exc:
        source = "--db" if db_url else storage.DATABASE_URL_ENV
        raise click.BadParameter(str(exc), param_hint=f"'{source}'") from exc
    if path is not None:
        path = _uri_file(path)
    name_ledger(path or storage.redact_url(url))
    return url, path


def _uri_file(database: str) -> str:
    """The file a SQLite database name names: the name itself, or the path inside a
    ``file:`` URI (``sqlite:///file:/data/ledger.db?mode=ro&uri=true``), so that such a
    ledger is found, named and opened like any other."""
    if not database.startswith("file:"):
        return database
    import urllib.parse

    path = database[len("file:") :].split("?", 1)[0].split("#", 1)[0]
    if path.startswith("//"):  # file://localhost/data/ledger.db: drop the authority
        path = "/" + path[2:].partition("/")[2]
    return os.path.abspath(urllib.parse.unquote(path))


def _missing_file(path: str) -> NoReturn:
    raise click.ClickException(
        f"The ledger {path} does not exist. Record a run with tokenledger, run "
        "`tokenledger demo`, or pass --db with the URL of an existing ledger."
    )


def existing_url(db_url: str | None) -> tuple[str, str | None]:
    """As `resolve_url`, and an error when the URL names a SQLite file that is not there:
    commands that only read or inspect a ledger never create one."""
    url, path = resolve_url(db_url)
    if path is not None and not os.path.exists(path):
        _missing_file(path)
    return url, path


def engine_for(url: str) -> sa.Engine:
    from tokenledger import _storage as storage

    return storage.create_engine_for(url)


def reading_engine(url: str, path: str | None) -> sa.Engine:
    """An engine that reads the ledger at ``url`` (its SQLite file ``path``, or None):
    read-only when this process cannot write the file or its directory (read-only
    media, an immutable file; see `tokenledger.cli._readonly`), else `engine_for`'s."""
    if path is not None and os.path.isfile(path):
        from tokenledger.cli import _readonly

        if _readonly.is_read_only(path):
            return _readonly.read_only_engine(path)
    return engine_for(url)


def open_for_reading(db_url: str | None) -> sa.Engine | None:
    """An engine on an existing ledger at this code's schema; None when it has no schema.

    Never creates a file or a table: a missing SQLite file is an error, an empty
    database is an empty ledger, and one at another revision raises `SchemaVersionError`.
    """
    from tokenledger import _schema as schema

    url, path = existing_url(db_url)
    if path is not None and os.path.isfile(path) and os.path.getsize(path) == 0:
        # An empty file is an empty SQLite database. Connecting would switch it to WAL,
        # which writes a header: reading commands leave files as they found them.
        return None
    engine = reading_engine(url, path)
    try:
        revision = schema.current_revision(engine)
        if revision == schema.head_revision():
            return engine  # what ensure_schema would find, without looking twice
        if revision is None and not _has_ledger_tables(engine):
            engine.dispose()
            return None
        # ensure_schema creates tables only in a database without any; here it checks
        # the revision and raises SchemaVersionError with the command that fixes it.
        schema.ensure_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _has_ledger_tables(engine: sa.Engine) -> bool:
    import sqlalchemy as sa

    from tokenledger._schema import LEDGER_TABLES

    with engine.connect() as connection:
        return bool(set(sa.inspect(connection).get_table_names()) & set(LEDGER_TABLES))


def read_rows(db_url: str | None, query: Callable[[sa.Engine], list[R]]) -> tuple[list[R], bool]:
    """Rows of ``query`` on the ledger, and whether the ledger holds nothing at all."""
    from tokenledger.queries import counts

    engine = open_for_reading(db_url)
    if engine is None:
        return [], True
    try:
        rows = query(engine)
        if rows:
            return rows, False
        held = counts(engine)
        return rows, held.runs == 0 and held.calls == 0
    finally:
        engine.dispose()


def with_history(db_url: str | None, purpose: str, compute: Callable[[sa.Engine], R]) -> R:
    """``compute`` on the ledger; a ledger without any schema yet has no history."""
    engine = open_for_reading(db_url)
    if engine is None:
        raise click.ClickException(
            f"No runs recorded yet, so there is no history to {purpose}. Record some runs "
            "or try `tokenledger demo`."
        )
    try:
        return compute(engine)
    finally:
        engine.dispose()
