"""The ledger's tables and the engines that reach them.

SQLAlchemy Core, not the ORM: the batch writer inserts thousands of rows at a time with
``executemany`` and the query side builds aggregates, neither of which wants identity maps.

The tables mirror the dataclasses in `tokenledger.records` field for field. Their shape
on disk is owned by the Alembic revisions in ``tokenledger.migrations``; the metadata
here is what the code reads and writes with, and a test checks the two agree.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import re
import sqlite3
import time
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import QueuePool
from sqlalchemy.types import TypeDecorator, TypeEngine

from tokenledger._location import (
    DATABASE_URL_ENV,
    DEFAULT_SQLITE_FILENAME,
    SQLITE_BUSY_TIMEOUT_S,
    default_url,
)
from tokenledger._money import CONTEXT as MONEY_CONTEXT
from tokenledger.exceptions import ConfigurationError, LedgerError

__all__ = [
    "DATABASE_URL_ENV",
    "DEFAULT_SQLITE_FILENAME",
    "DriverInsert",
    "JSONDocument",
    "Money",
    "RefusedValue",
    "UTCDateTime",
    "budget_windows",
    "budgets",
    "calls",
    "create_engine_for",
    "database_path",
    "default_url",
    "metadata",
    "normalize_url",
    "prices",
    "redact_url",
    "reservations",
    "runs",
]


_ACCEPTED_URLS = (
    "tokenledger accepts `sqlite:///relative/path.db` or `sqlite:////absolute/path.db`, "
    "and `postgresql://user:password@host:5432/dbname` (also written `postgres://` or "
    "`postgresql+psycopg://`)."
)

# Applied on every new SQLite connection, after journal_mode=WAL (see _set_sqlite_pragmas).
_SQLITE_PRAGMAS = (
    "PRAGMA synchronous=NORMAL",  # durable across process crashes; WAL makes it safe
    "PRAGMA foreign_keys=ON",
)

_UTC = dt.timezone.utc


class Money(TypeDecorator[Decimal]):
    """An exact amount of US dollars: `~decimal.Decimal` in, `~decimal.Decimal` out.

    ``Money(24, 12)`` holds a cost (up to $999,999,999,999.999999999999);
    ``Money(30, 18)`` holds a price per token.

    On PostgreSQL the column is ``NUMERIC(precision, scale)`` and values travel as
    `Decimal` end to end: exact, never a float.

    SQLite has no exact decimal type: a ``NUMERIC`` column stores a number as an
    8-byte float, so an amount keeps about **15 significant digits** (``0.000285`` and
    ``1234.123456789012`` come back exactly; a sum of a million costs may be off in the
    16th digit). Values are bound as floats, so every amount is stored as a number and
    ``SUM``, ``ORDER BY`` and comparisons work; results come back as
    ``Decimal(repr(value))`` rounded to the column's scale. Use PostgreSQL where
    amounts need more digits than that.

    Non-finite amounts (NaN, infinity) are refused on both engines.

    .. versionadded:: 0.1.0
    """

    impl = sa.Numeric
    cache_ok = True

    def __init__(self, precision: int = 24, scale: int = 12) -> None:
        super().__init__(precision=precision, scale=scale, asdecimal=True)
        self.money_precision = precision
        self.money_scale = scale
        self._quantum = Decimal(1).scaleb(-scale)

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            # asdecimal=False: the driver gives us its float and we convert it ourselves,
            # instead of SQLAlchemy's generic float-to-Decimal path (and its warning).
            return dialect.type_descriptor(
                sa.Numeric(self.money_precision, self.money_scale, asdecimal=False)
            )
        return dialect.type_descriptor(sa.Numeric(self.money_precision, self.money_scale))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, float) or not isinstance(value, (Decimal, int, str)):
            raise TypeError(
                f"A money amount must be a Decimal (or int or str), not {type(value).__name__} "
                f"{value!r}; floats lose cents."
            )
        amount = value if isinstance(value, Decimal) else Decimal(value)
        if not amount.is_finite():
            raise ValueError(f"A money amount must be finite, not {amount!r}.")
        if dialect.name == "sqlite":
            return float(amount)
        return amount

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if isinstance(value, Decimal):
            return value
        # repr() is the shortest string that round-trips the float: 0.000285, not
        # 0.00028499999999999999.
        amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        return amount.quantize(self._quantum, context=MONEY_CONTEXT)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC `~datetime.datetime` in and out, on every engine.

    PostgreSQL stores ``TIMESTAMP WITH TIME ZONE``; values come back converted to UTC
    whatever the session's time zone. SQLite has no time zone support: values are
    stored as UTC text (which sorts and compares correctly) and get UTC back on the way
    out. Naive datetimes are refused rather than guessed at.

    .. versionadded:: 0.1.0
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"Expected a datetime, got {type(value).__name__} {value!r}.")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"Datetime {value.isoformat()} has no time zone; tokenledger stores "
                "timezone-aware datetimes only (use datetime.now(timezone.utc))."
            )
        aware: dt.datetime = value.astimezone(_UTC)
        if dialect.name == "sqlite":
            return aware.replace(tzinfo=None)
        return aware

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=_UTC)  # type: ignore[no-any-return]
        return value.astimezone(_UTC)  # type: ignore[no-any-return]


def _json_type() -> TypeEngine[Any]:
    # JSONB on PostgreSQL: it has equality (GROUP BY tags works) and can be indexed.
    # none_as_null: Python None is SQL NULL, not the JSON literal 'null'.
    return sa.JSON(none_as_null=True).with_variant(
        postgresql.JSONB(none_as_null=True), "postgresql"
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")  # positional notation: "0.0000003", not "3E-7"
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


class JSONDocument(TypeDecorator[Any]):
    """JSON (JSONB on PostgreSQL) that stores `~decimal.Decimal` values as exact strings.

    JSON numbers are floats to most readers, so a price inside a document is written
    as ``"0.0000025"``; the reader converts it back with ``Decimal(text)``.

    .. versionadded:: 0.1.0
    """

    impl = sa.JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.JSONB(none_as_null=True))
        return dialect.type_descriptor(sa.JSON(none_as_null=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else _json_safe(value)


def _id(
    name: str, comment: str, *, primary_key: bool = False, nullable: bool = True
) -> sa.Column[str]:
    """A 32-character row id column (client-generated, so no sequence and no round trip)."""
    return sa.Column(
        name,
        sa.String(32),
        primary_key=primary_key,
        nullable=nullable and not primary_key,
        comment=comment,
    )


metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

_TOKEN_COUNT = sa.BigInteger  # a root run's totals can pass 2**31 tokens

prices = sa.Table(
    "prices",
    metadata,
    _id(
        "id",
        "Content hash of everything that determines a cost: one row per price version.",
        primary_key=True,
    ),
    sa.Column("model", sa.String, nullable=False, comment="Model name the price applies to."),
    sa.Column(
        "provider",
        sa.String,
        nullable=True,
        comment="Provider the price applies to (openai, anthropic, ...); NULL for any.",
    ),
    sa.Column(
        "input_per_token",
        Money(30, 18),
        nullable=False,
        comment="USD per uncached input token.",
    ),
    sa.Column(
        "output_per_token",
        Money(30, 18),
        nullable=False,
        comment="USD per output token (reasoning included unless priced separately).",
    ),
    sa.Column(
        "cache_read_per_token",
        Money(30, 18),
        nullable=True,
        comment="USD per input token read from the prompt cache; NULL: the input price.",
    ),
    sa.Column(
        "cache_write_per_token",
        Money(30, 18),
        nullable=True,
        comment="USD per input token written to the prompt cache; NULL: the input price.",
    ),
    sa.Column(
        "reasoning_per_token",
        Money(30, 18),
        nullable=True,
        comment="USD per reasoning token when priced apart from output; NULL: output price.",
    ),
    sa.Column(
        "tiers",
        JSONDocument(),
        nullable=True,
        comment="Prices that apply above an input-token threshold, amounts as decimal strings.",
    ),
    sa.Column(
        "source",
        sa.String,
        nullable=False,
        comment="Where the price came from: 'litellm <version>' or 'user'.",
    ),
    sa.Column(
        "created_at",
        UTCDateTime(),
        nullable=False,
        comment="When this price version was first recorded (UTC).",
    ),
    comment="Every price version used to cost a call, so old costs stay reproducible.",
)

runs = sa.Table(
    "runs",
    metadata,
    _id("id", "Client-generated run id (32 hex digits).", primary_key=True),
    sa.Column("name", sa.String, nullable=False, comment="Agent name: what cost is grouped by."),
    _id("parent_id", "The run this one was started inside; NULL for a root run."),
    _id("root_id", "The outermost run of the tree; equals id for a root run.", nullable=False),
    sa.Column(
        "tags",
        _json_type(),
        nullable=False,
        comment="User tags (user, tenant, ...) as a JSON object of strings, for attribution.",
    ),
    sa.Column("started_at", UTCDateTime(), nullable=False, comment="When the run began (UTC)."),
    sa.Column(
        "ended_at",
        UTCDateTime(),
        nullable=True,
        comment="When the run ended (UTC); NULL while it is running.",
    ),
    sa.Column(
        "status",
        sa.String,
        nullable=False,
        comment="running, ok, error or budget_exceeded: filters successful runs.",
    ),
    sa.Column(
        "error_type",
        sa.String,
        nullable=True,
        comment="Exception class that ended the run, when it failed.",
    ),
    sa.Column(
        "calls",
        _TOKEN_COUNT,
        nullable=False,
        comment="Model calls in this run and its descendants.",
    ),
    sa.Column(
        "failed_calls",
        _TOKEN_COUNT,
        nullable=False,
        comment="Of those, calls that failed: retries cost money too.",
    ),
    sa.Column(
        "input_tokens",
        _TOKEN_COUNT,
        nullable=False,
        comment="Input tokens of all calls below, cached ones included.",
    ),
    sa.Column(
        "output_tokens",
        _TOKEN_COUNT,
        nullable=False,
        comment="Output tokens of all calls below, reasoning included.",
    ),
    sa.Column(
        "cache_read_tokens",
        _TOKEN_COUNT,
        nullable=False,
        comment="Input tokens served from the prompt cache (cheaper).",
    ),
    sa.Column(
        "cache_write_tokens",
        _TOKEN_COUNT,
        nullable=False,
        comment="Input tokens written to the prompt cache (dearer on some providers).",
    ),
    sa.Column(
        "reasoning_tokens",
        _TOKEN_COUNT,
        nullable=False,
        comment="Output tokens spent on hidden reasoning.",
    ),
    sa.Column(
        "cost_usd",
        Money(24, 12),
        nullable=False,
        comment="USD cost of the priced calls below; unpriced calls are counted apart.",
    ),
    sa.Column(
        "unpriced_calls",
        _TOKEN_COUNT,
        nullable=False,
        comment="Calls below whose model had no price: cost_usd excludes them.",
    ),
    sa.Column(
        "trace_id",
        sa.String(32),
        nullable=True,
        comment="OpenTelemetry trace id of the run's span, to jump to the trace.",
    ),
    sa.Column(
        "span_id",
        sa.String(16),
        nullable=True,
        comment="OpenTelemetry span id of the run's span.",
    ),
    sa.Column(
        "outcome",
        sa.String(200),
        nullable=True,
        comment="What the run achieved (resolved, escalated, ...): cost per outcome.",
    ),
    sa.Column(
        "outcome_value",
        Money(24, 12),
        nullable=True,
        comment="What the outcome is worth in USD, for margins; NULL when unknown.",
    ),
    sa.Column(
        "outcome_at",
        UTCDateTime(),
        nullable=True,
        comment="When the outcome was recorded (often hours after the run).",
    ),
    sa.Index(None, "name", "started_at"),  # cost per agent over time
    sa.Index(None, "root_id"),  # roll a tree up to its root
    sa.Index(None, "parent_id"),  # a run's children
    sa.Index(None, "started_at"),  # everything in a time window
    sa.Index(None, "outcome"),  # cost per outcome
    sa.Index(  # reports sum the calls of the few root runs still running
        "ix_runs_running",
        "parent_id",
        "started_at",
        postgresql_where=sa.text("status = 'running'"),
        sqlite_where=sa.text("status = 'running'"),
    ),
    sa.Index(  # cost per outcome: an agent's root runs in cost order, for percentiles
        "ix_runs_root_cost",
        "name",
        "cost_usd",
        postgresql_where=sa.text("parent_id IS NULL"),
        sqlite_where=sa.text("parent_id IS NULL"),
    ),
    comment="One row per agent run; totals roll up every descendant run's calls.",
)

calls = sa.Table(
    "calls",
    metadata,
    _id(
        "id",
        "Client-generated call id: a retried write can never duplicate it.",
        primary_key=True,
    ),
    # No foreign key to runs: writes are batched, so a call may land before its run.
    _id("run_id", "The run that made the call; NULL for a call made outside any run."),
    _id("root_run_id", "The root of that run's tree, so a tree's cost is one indexed query."),
    sa.Column(
        "operation",
        sa.String,
        nullable=False,
        comment="gen_ai.operation.name: chat, embeddings, text_completion, ...",
    ),
    sa.Column("provider", sa.String, nullable=True, comment="Provider that served the call."),
    sa.Column(
        "requested_model",
        sa.String,
        nullable=True,
        comment="Model the caller asked for (before aliases, fallbacks and downgrades).",
    ),
    sa.Column(
        "model",
        sa.String,
        nullable=True,
        comment="Model that served the call, as the provider reported it: what is billed.",
    ),
    sa.Column("started_at", UTCDateTime(), nullable=False, comment="When the call was sent (UTC)."),
    sa.Column(
        "ended_at",
        UTCDateTime(),
        nullable=True,
        comment="When the call finished (UTC); NULL if it never did.",
    ),
    sa.Column(
        "latency_ms", sa.Float, nullable=True, comment="Wall time of the call in milliseconds."
    ),
    sa.Column("streamed", sa.Boolean, nullable=False, comment="Whether the response was streamed."),
    sa.Column(
        "status",
        sa.String,
        nullable=False,
        comment="ok, error, abandoned (stream not read to the end) or refused (budget).",
    ),
    sa.Column(
        "error_type",
        sa.String,
        nullable=True,
        comment="Exception class of a failed call.",
    ),
    sa.Column(
        "input_tokens",
        _TOKEN_COUNT,
        nullable=False,
        comment="Input tokens, cached ones included (gen_ai.usage.input_tokens).",
    ),
    sa.Column(
        "output_tokens",
        _TOKEN_COUNT,
        nullable=False,
        comment="Output tokens, reasoning included (gen_ai.usage.output_tokens).",
    ),
    sa.Column(
        "cache_read_tokens",
        _TOKEN_COUNT,
        nullable=False,
        comment="Input tokens read from the prompt cache.",
    ),
    sa.Column(
        "cache_write_tokens",
        _TOKEN_COUNT,
        nullable=False,
        comment="Input tokens written to the prompt cache.",
    ),
    sa.Column(
        "reasoning_tokens",
        _TOKEN_COUNT,
        nullable=False,
        comment="Output tokens spent on hidden reasoning.",
    ),
    sa.Column(
        "usage_estimated",
        sa.Boolean,
        nullable=False,
        comment="True when tokenledger counted the tokens because the provider reported none.",
    ),
    sa.Column(
        "cost_usd",
        Money(24, 12),
        nullable=True,
        comment="USD cost of the call; NULL when the model has no price (never a fake $0).",
    ),
    sa.Column(
        "cost_source",
        sa.String,
        nullable=True,
        comment="local (priced from the prices table) or provider (cost the provider reported).",
    ),
    _id("price_id", "The price version the cost was computed with (prices.id)."),
    sa.Column(
        "finish_reasons",
        _json_type(),
        nullable=True,
        comment="Why generation stopped, per choice (stop, length, tool_calls, ...).",
    ),
    sa.Column(
        "litellm_call_id",
        sa.String,
        nullable=True,
        comment="litellm's id for the call, to match its logs and deduplicate its callbacks.",
    ),
    sa.Column(
        "trace_id",
        sa.String(32),
        nullable=True,
        comment="OpenTelemetry trace id of the call's span.",
    ),
    sa.Column(
        "span_id",
        sa.String(16),
        nullable=True,
        comment="OpenTelemetry span id of the call's span.",
    ),
    sa.Column(
        "max_tokens",
        _TOKEN_COUNT,
        nullable=True,
        comment="The call's max_tokens: with it a budget reservation is a true upper bound.",
    ),
    sa.Column(
        "tool_name",
        sa.String(200),
        nullable=True,
        comment="For execute_tool rows: the paid tool or resource that was charged.",
    ),
    sa.Index(None, "run_id"),  # a run's calls
    sa.Index(None, "root_run_id"),  # a run tree's calls
    sa.Index(None, "started_at"),  # everything in a time window
    sa.Index(None, "model", "started_at"),  # cost per model over time
    sa.Index(  # break-even separates tool charges from model cost
        "ix_calls_tool_charges",
        "root_run_id",
        postgresql_where=sa.text("operation = 'execute_tool'"),
        sqlite_where=sa.text("operation = 'execute_tool'"),
    ),
    comment="One row per model call (each retry and fallback its own), with tokens and cost.",
)

budgets = sa.Table(
    "budgets",
    metadata,
    _id("id", "Client-generated budget id.", primary_key=True),
    sa.Column(
        "scope",
        sa.String(300),
        nullable=False,
        comment="What the budget covers: global, agent:NAME, or TAGKEY:VALUE from run tags.",
    ),
    sa.Column(
        "per",
        sa.String(8),
        nullable=False,
        comment="UTC calendar window the limit applies to: hour, day, week, month or total.",
    ),
    sa.Column(
        "limit_usd", Money(24, 12), nullable=True, comment="Limit in USD per window; NULL: none."
    ),
    sa.Column(
        "limit_tokens",
        _TOKEN_COUNT,
        nullable=True,
        comment="Limit in tokens per window; NULL: none.",
    ),
    sa.Column(
        "action",
        sa.String(16),
        nullable=False,
        comment="What a call that would pass the limit gets: raise, warn or downgrade.",
    ),
    sa.Column(
        "downgrade_to",
        _json_type(),
        nullable=True,
        comment="Cheaper models tried in order when the action is downgrade.",
    ),
    sa.Column("created_at", UTCDateTime(), nullable=False, comment="When the budget was set."),
    sa.Column("updated_at", UTCDateTime(), nullable=False, comment="When it was last changed."),
    sa.UniqueConstraint("scope", "per"),
    comment="Shared budgets, enforced before each call by every process using the ledger.",
)

budget_windows = sa.Table(
    "budget_windows",
    metadata,
    _id("budget_id", "The budget (budgets.id).", primary_key=True),
    sa.Column(
        "window_start",
        UTCDateTime(),
        primary_key=True,
        comment="Start of the UTC window these figures belong to (1970-01-01 for total).",
    ),
    sa.Column(
        "spent_usd", Money(24, 12), nullable=False, comment="Settled cost of calls in the window."
    ),
    sa.Column(
        "reserved_usd",
        Money(24, 12),
        nullable=False,
        comment="Upper-bound estimates held by calls in flight; checked with spent atomically.",
    ),
    sa.Column("spent_tokens", _TOKEN_COUNT, nullable=False, comment="Settled tokens."),
    sa.Column("reserved_tokens", _TOKEN_COUNT, nullable=False, comment="Tokens held in flight."),
    sa.Column(
        "overshoot_usd",
        Money(24, 12),
        nullable=False,
        comment="How far actual costs passed their estimates (calls without max_tokens).",
    ),
    comment="Spent and reserved per budget and window: the row a reservation updates.",
)

reservations = sa.Table(
    "reservations",
    metadata,
    _id("id", "Client-generated reservation id.", primary_key=True),
    sa.Column(
        "holder",
        sa.String(300),
        nullable=False,
        comment="host:pid of the process holding it, to explain a reclaimed lease.",
    ),
    sa.Column("amount_usd", Money(24, 12), nullable=False, comment="USD reserved on each line."),
    sa.Column("tokens", _TOKEN_COUNT, nullable=False, comment="Tokens reserved on each line."),
    sa.Column(
        "lines",
        _json_type(),
        nullable=False,
        comment="[budget id, window start] pairs the amount is reserved on.",
    ),
    sa.Column("created_at", UTCDateTime(), nullable=False, comment="When it was taken."),
    sa.Column(
        "expires_at",
        UTCDateTime(),
        nullable=False,
        comment="End of the lease: after it any process may reclaim the reservation.",
    ),
    sa.Index(None, "expires_at"),  # finding expired leases
    comment="Budget reservations of calls in flight; a crashed process's expire and are reclaimed.",
)


def insert_for(dialect_name: str) -> Any:
    """The dialect's ``insert`` construct, which has ``on_conflict_do_*``."""
    if dialect_name == "sqlite":
        from sqlalchemy.dialects import sqlite

        return sqlite.insert
    if dialect_name == "postgresql":
        return postgresql.insert
    raise ConfigurationError(
        f"The ledger engine's dialect is {dialect_name!r}; tokenledger supports sqlite and "
        "postgresql."
    )


# ---------------------------------------------------------------------------- engines


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
    secret_keys = [k for k in ("password", "sslpassword") if k in url.query]
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


# ---------------------------------------------------------------- driver-level inserts


class RefusedValue(ValueError):
    """A value that its column's type refuses (a naive datetime, a float amount, a value
    JSON cannot encode), found while a row is converted for the driver.

    Internal to the batch writer, which keeps the row in ``BatchWriter.rejected``; it
    never reaches the user.
    """

    def __init__(self, table: str, column: str, cause: BaseException) -> None:
        super().__init__(f"{table}.{column}: {type(cause).__name__}: {cause}")
        self.column = column
        self.cause = cause


_Bind = Any  # Callable[[Any], Any]; SQLAlchemy types its processors loosely
# What json.dumps writes for a string, with its default ensure_ascii=True.
_json_string = json.encoder.encode_basestring_ascii


def _fast_bind(column: sa.Column[Any], dialect: Dialect, slow: _Bind) -> _Bind:
    """``slow`` (SQLAlchemy's own bind processing for the column) with a shortcut for
    the values the ledger writes nearly always. Each shortcut returns exactly what
    ``slow`` returns for those values; anything else goes through ``slow`` itself, so
    errors and edge cases (other time zones, int or str amounts) are SQLAlchemy's."""
    column_type = column.type
    sqlite = dialect.name == "sqlite"
    if isinstance(column_type, UTCDateTime):
        if sqlite:

            def utc_text(value: Any) -> Any:
                # SQLite's DATETIME text, "%04d-%02d-%02d %02d:%02d:%02d.%06d" in UTC.
                if value.__class__ is dt.datetime and value.tzinfo is _UTC:
                    return value.isoformat(" ", "microseconds")[:26]
                return slow(value)

            return utc_text

        def utc(value: Any) -> Any:
            if value.__class__ is dt.datetime and value.tzinfo is _UTC:
                return value
            return slow(value)

        return utc
    if isinstance(column_type, Money):
        if sqlite:

            def amount_float(value: Any) -> Any:
                if value.__class__ is Decimal and value.is_finite():
                    return float(value)
                return slow(value)

            return amount_float

        def amount(value: Any) -> Any:
            if value.__class__ is Decimal and value.is_finite():
                return value
            return slow(value)

        return amount
    if isinstance(column_type, sa.Boolean):

        def boolean(value: Any) -> Any:
            # sqlite3 binds True as 1, what SQLAlchemy's int(True) gives.
            if value is True or value is False:
                return value
            return slow(value)

        return boolean
    if isinstance(column_type, sa.Float) and sqlite:

        def real(value: Any) -> Any:
            return value if value.__class__ is float else slow(value)

        return real
    if isinstance(column_type, (sa.JSON, JSONDocument)) and not getattr(
        dialect, "_json_serializer", None
    ):
        # PostgreSQL: SQLAlchemy wraps the value in psycopg's Jsonb, which encodes it
        # inside the driver, where an error is a bare TypeError from deep in
        # executemany. The same json.dumps here, with the text bound as is (psycopg
        # sends a str as "unknown", which PostgreSQL reads as jsonb), fails with the
        # row in hand.
        prepare = column_type.process_bind_param if isinstance(column_type, TypeDecorator) else None

        def json_text(value: Any) -> Any:
            if prepare is not None:
                value = prepare(value, dialect)
            if value.__class__ is list:
                # A list of strings (finish_reasons): json.dumps's own output, without
                # the encoder it builds on every call.
                try:
                    return "[" + ", ".join(map(_json_string, value)) + "]"
                except TypeError:  # an item that is not a string
                    pass
            if sqlite:
                return slow(value)
            return None if value is None else json.dumps(value)

        return json_text
    return slow


class DriverInsert:
    """``INSERT ... ON CONFLICT (primary key) DO NOTHING`` into ``table``, run at the
    driver level: rows are tuples of the table's values in column order, converted
    once per value, instead of a dict per row and SQLAlchemy's per-row work.

    `convert` gives the values the driver is handed when SQLAlchemy inserts the same
    rows (its own bind processing, with shortcuts that return the same values for the
    common ones), so both paths store the same thing; a test compares every column.

    ``sql`` is for ``Connection.exec_driver_sql`` (executemany); ``copy_sql`` for
    psycopg's ``COPY ... FROM STDIN``, which has no ``ON CONFLICT``. Table names are
    unqualified: a PostgreSQL schema is chosen by the connection's search_path.

    .. versionadded:: 0.1.0
    """

    def __init__(self, table: sa.Table, dialect: Dialect) -> None:
        if dialect.name not in ("sqlite", "postgresql"):
            raise ConfigurationError(
                f"The ledger engine's dialect is {dialect.name!r}; tokenledger supports "
                "sqlite and postgresql."
            )
        quote = dialect.identifier_preparer.quote
        self.table = table.name
        self.columns = tuple(column.name for column in table.columns)
        names = ", ".join(quote(name) for name in self.columns)
        marks = ", ".join(["?" if dialect.name == "sqlite" else "%s"] * len(self.columns))
        keys = ", ".join(quote(column.name) for column in table.primary_key.columns)
        self.sql = (
            f"INSERT INTO {quote(table.name)} ({names}) VALUES ({marks}) "
            f"ON CONFLICT ({keys}) DO NOTHING"
        )
        self.copy_sql = f"COPY {quote(table.name)} ({names}) FROM STDIN"
        self._binds: list[tuple[int, _Bind]] = []
        for index, column in enumerate(table.columns):
            slow = column.type.dialect_impl(dialect).bind_processor(dialect)
            if slow is None:
                continue
            if slow(None) is not None:
                raise ConfigurationError(  # pragma: no cover - a type the ledger does not use
                    f"Column {table.name}.{column.name} binds None as {slow(None)!r}; "
                    "DriverInsert only supports types that store None as NULL."
                )
            self._binds.append((index, _fast_bind(column, dialect, slow)))

    def convert(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """The driver's values for ``rows`` (tuples in column order).

        Raises:
            RefusedValue: a value its column's type refuses; it names the column.
        """
        binds = self._binds
        converted = []
        for row in rows:
            values = list(row)
            index = -1
            try:
                for index, bind in binds:
                    value = values[index]
                    if value is not None:  # every bind processor here keeps None as NULL
                        values[index] = bind(value)
            except Exception as exc:
                raise RefusedValue(self.table, self.columns[index], exc) from exc
            converted.append(tuple(values))
        return converted
