"""The ledger's tables: SQLAlchemy Core metadata that the code reads and writes with.

The tables mirror the dataclasses in `tokenledger.records` field for field. Their shape
on disk is owned by the Alembic revisions in ``tokenledger.migrations``; the metadata
here is what the code reads and writes with, and a test checks the two agree (types,
nullability, indexes, and on PostgreSQL every table's and column's comment), so a
column declared here must say exactly what its migration said.

Columns are declared one per line with a helper per kind of value; the token counts and
OpenTelemetry ids that runs and calls both carry are made by one function each, with
each table's own comments.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.schema import SchemaItem
from sqlalchemy.types import TypeEngine

from tokenledger._column_types import COST_SCALE, JSONDocument, Money, UTCDateTime, json_type

__all__ = ["budget_windows", "budgets", "calls", "metadata", "prices", "reservations", "runs"]


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
# The token counts a call reports and a run sums, in column order (`TokenUsage`'s fields).
_TOKEN_KINDS = ("input", "output", "cache_read", "cache_write", "reasoning")


def _column(
    name: str, type_: TypeEngine[Any] | type[TypeEngine[Any]], comment: str, nullable: bool
) -> sa.Column[Any]:
    return sa.Column(name, type_, nullable=nullable, comment=comment)


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


def _text(
    name: str, comment: str, *, length: int | None = None, nullable: bool = False
) -> sa.Column[Any]:
    return _column(name, sa.String(length) if length else sa.String, comment, nullable)


def _count(name: str, comment: str, *, nullable: bool = False) -> sa.Column[Any]:
    return _column(name, _TOKEN_COUNT, comment, nullable)


def _usd(name: str, comment: str, *, nullable: bool = False) -> sa.Column[Any]:
    """An amount in dollars: a cost, a limit, a value."""
    return _column(name, Money(24, COST_SCALE), comment, nullable)


def _per_token(name: str, comment: str, *, nullable: bool = False) -> sa.Column[Any]:
    """A price per token: six more places than a cost, as providers quote them."""
    return _column(name, Money(30, 18), comment, nullable)


def _time(name: str, comment: str, *, nullable: bool = False) -> sa.Column[Any]:
    return _column(name, UTCDateTime(), comment, nullable)


def _json(name: str, comment: str, *, nullable: bool = False) -> sa.Column[Any]:
    return _column(name, json_type(), comment, nullable)


def _flag(name: str, comment: str) -> sa.Column[Any]:
    return _column(name, sa.Boolean, comment, False)


def _token_counts(**comments: str) -> list[sa.Column[Any]]:
    """The ``<kind>_tokens`` columns, one per `_TOKEN_KINDS` entry, with these comments."""
    return [_count(f"{kind}_tokens", comments[kind]) for kind in _TOKEN_KINDS]


def _otel_ids(*, trace: str, span: str) -> list[sa.Column[Any]]:
    """The OpenTelemetry trace and span ids of a row's span (32 and 16 hex digits)."""
    return [
        _column("trace_id", sa.String(32), trace, True),
        _column("span_id", sa.String(16), span, True),
    ]


def _table(name: str, comment: str, *items: SchemaItem) -> sa.Table:
    """A table of the ledger's `metadata`; ``comment`` says what its rows are."""
    return sa.Table(name, metadata, *items, comment=comment)


def _partial_index(name: str, *columns: str, where: str) -> sa.Index:
    """An index of only the rows matching ``where``, on both engines."""
    condition = sa.text(where)
    return sa.Index(name, *columns, postgresql_where=condition, sqlite_where=condition)


prices = _table(
    "prices",
    "Every price version used to cost a call, so old costs stay reproducible.",
    _id(
        "id",
        "Content hash of everything that determines a cost: one row per price version.",
        primary_key=True,
    ),
    _text("model", "Model name the price applies to."),
    _text(
        "provider",
        "Provider the price applies to (openai, anthropic, ...); NULL for any.",
        nullable=True,
    ),
    _per_token("input_per_token", "USD per uncached input token."),
    _per_token(
        "output_per_token", "USD per output token (reasoning included unless priced separately)."
    ),
    _per_token(
        "cache_read_per_token",
        "USD per input token read from the prompt cache; NULL: the input price.",
        nullable=True,
    ),
    _per_token(
        "cache_write_per_token",
        "USD per input token written to the prompt cache; NULL: the input price.",
        nullable=True,
    ),
    _per_token(
        "reasoning_per_token",
        "USD per reasoning token when priced apart from output; NULL: output price.",
        nullable=True,
    ),
    _column(
        "tiers",
        JSONDocument(),
        "Prices that apply above an input-token threshold, amounts as decimal strings.",
        True,
    ),
    _text("source", "Where the price came from: 'litellm <version>' or 'user'."),
    _time("created_at", "When this price version was first recorded (UTC)."),
)

runs = _table(
    "runs",
    "One row per agent run; totals roll up every descendant run's calls.",
    _id("id", "Client-generated run id (32 hex digits).", primary_key=True),
    _text("name", "Agent name: what cost is grouped by."),
    _id("parent_id", "The run this one was started inside; NULL for a root run."),
    _id("root_id", "The outermost run of the tree; equals id for a root run.", nullable=False),
    _json("tags", "User tags (user, tenant, ...) as a JSON object of strings, for attribution."),
    _time("started_at", "When the run began (UTC)."),
    _time("ended_at", "When the run ended (UTC); NULL while it is running.", nullable=True),
    _text("status", "running, ok, error or budget_exceeded: filters successful runs."),
    _text("error_type", "Exception class that ended the run, when it failed.", nullable=True),
    _count("calls", "Model calls in this run and its descendants."),
    _count("failed_calls", "Of those, calls that failed: retries cost money too."),
    *_token_counts(
        input="Input tokens of all calls below, cached ones included.",
        output="Output tokens of all calls below, reasoning included.",
        cache_read="Input tokens served from the prompt cache (cheaper).",
        cache_write="Input tokens written to the prompt cache (dearer on some providers).",
        reasoning="Output tokens spent on hidden reasoning.",
    ),
    _usd("cost_usd", "USD cost of the priced calls below; unpriced calls are counted apart."),
    _count("unpriced_calls", "Calls below whose model had no price: cost_usd excludes them."),
    *_otel_ids(
        trace="OpenTelemetry trace id of the run's span, to jump to the trace.",
        span="OpenTelemetry span id of the run's span.",
    ),
    _text(
        "outcome",
        "What the run achieved (resolved, escalated, ...): cost per outcome.",
        length=200,
        nullable=True,
    ),
    _usd(
        "outcome_value",
        "What the outcome is worth in USD, for margins; NULL when unknown.",
        nullable=True,
    ),
    _time(
        "outcome_at", "When the outcome was recorded (often hours after the run).", nullable=True
    ),
    sa.Index(None, "name", "started_at"),  # cost per agent over time
    sa.Index(None, "root_id"),  # roll a tree up to its root
    sa.Index(None, "parent_id"),  # a run's children
    sa.Index(None, "started_at"),  # everything in a time window
    sa.Index(None, "outcome"),  # cost per outcome
    # Reports sum the calls of the few root runs still running.
    _partial_index("ix_runs_running", "parent_id", "started_at", where="status = 'running'"),
    # Cost per outcome: an agent's root runs in cost order, for percentiles.
    _partial_index("ix_runs_root_cost", "name", "cost_usd", where="parent_id IS NULL"),
)

calls = _table(
    "calls",
    "One row per model call (each retry and fallback its own), with tokens and cost.",
    _id(
        "id",
        "Client-generated call id: a retried write can never duplicate it.",
        primary_key=True,
    ),
    # No foreign key to runs: writes are batched, so a call may land before its run.
    _id("run_id", "The run that made the call; NULL for a call made outside any run."),
    _id("root_run_id", "The root of that run's tree, so a tree's cost is one indexed query."),
    _text("operation", "gen_ai.operation.name: chat, embeddings, text_completion, ..."),
    _text("provider", "Provider that served the call.", nullable=True),
    _text(
        "requested_model",
        "Model the caller asked for (before aliases, fallbacks and downgrades).",
        nullable=True,
    ),
    _text(
        "model",
        "Model that served the call, as the provider reported it: what is billed.",
        nullable=True,
    ),
    _time("started_at", "When the call was sent (UTC)."),
    _time("ended_at", "When the call finished (UTC); NULL if it never did.", nullable=True),
    _column("latency_ms", sa.Float, "Wall time of the call in milliseconds.", True),
    _flag("streamed", "Whether the response was streamed."),
    _text("status", "ok, error, abandoned (stream not read to the end) or refused (budget)."),
    _text("error_type", "Exception class of a failed call.", nullable=True),
    *_token_counts(
        input="Input tokens, cached ones included (gen_ai.usage.input_tokens).",
        output="Output tokens, reasoning included (gen_ai.usage.output_tokens).",
        cache_read="Input tokens read from the prompt cache.",
        cache_write="Input tokens written to the prompt cache.",
        reasoning="Output tokens spent on hidden reasoning.",
    ),
    _flag(
        "usage_estimated",
        "True when tokenledger counted the tokens because the provider reported none.",
    ),
    _usd(
        "cost_usd",
        "USD cost of the call; NULL when the model has no price (never a fake $0).",
        nullable=True,
    ),
    _text(
        "cost_source",
        "local (priced from the prices table) or provider (cost the provider reported).",
        nullable=True,
    ),
    _id("price_id", "The price version the cost was computed with (prices.id)."),
    _json(
        "finish_reasons",
        "Why generation stopped, per choice (stop, length, tool_calls, ...).",
        nullable=True,
    ),
    _text(
        "litellm_call_id",
        "litellm's id for the call, to match its logs and deduplicate its callbacks.",
        nullable=True,
    ),
    *_otel_ids(
        trace="OpenTelemetry trace id of the call's span.",
        span="OpenTelemetry span id of the call's span.",
    ),
    _count(
        "max_tokens",
        "The call's max_tokens: with it a budget reservation is a true upper bound.",
        nullable=True,
    ),
    _text(
        "tool_name",
        "For execute_tool rows: the paid tool or resource that was charged.",
        length=200,
        nullable=True,
    ),
    sa.Index(None, "run_id"),  # a run's calls
    sa.Index(None, "root_run_id"),  # a run tree's calls
    sa.Index(None, "started_at"),  # everything in a time window
    sa.Index(None, "model", "started_at"),  # cost per model over time
    # Break-even separates tool charges from model cost.
    _partial_index("ix_calls_tool_charges", "root_run_id", where="operation = 'execute_tool'"),
)

budgets = _table(
    "budgets",
    "Shared budgets, enforced before each call by every process using the ledger.",
    _id("id", "Client-generated budget id.", primary_key=True),
    _text(
        "scope",
        "What the budget covers: global, agent:NAME, or TAGKEY:VALUE from run tags.",
        length=300,
    ),
    _text(
        "per",
        "UTC calendar window the limit applies to: hour, day, week, month or total.",
        length=8,
    ),
    _usd("limit_usd", "Limit in USD per window; NULL: none.", nullable=True),
    _count("limit_tokens", "Limit in tokens per window; NULL: none.", nullable=True),
    _text(
        "action",
        "What a call that would pass the limit gets: raise, warn or downgrade.",
        length=16,
    ),
    _json(
        "downgrade_to", "Cheaper models tried in order when the action is downgrade.", nullable=True
    ),
    _time("created_at", "When the budget was set."),
    _time("updated_at", "When it was last changed."),
    sa.UniqueConstraint("scope", "per"),
)

budget_windows = _table(
    "budget_windows",
    "Spent and reserved per budget and window: the row a reservation updates.",
    _id("budget_id", "The budget (budgets.id).", primary_key=True),
    sa.Column(
        "window_start",
        UTCDateTime(),
        primary_key=True,
        comment="Start of the UTC window these figures belong to (1970-01-01 for total).",
    ),
    _usd("spent_usd", "Settled cost of calls in the window."),
    _usd(
        "reserved_usd",
        "Upper-bound estimates held by calls in flight; checked with spent atomically.",
    ),
    _count("spent_tokens", "Settled tokens."),
    _count("reserved_tokens", "Tokens held in flight."),
    _usd(
        "overshoot_usd",
        "How far actual costs passed their estimates (calls without max_tokens).",
    ),
)

reservations = _table(
    "reservations",
    "Budget reservations of calls in flight; a crashed process's expire and are reclaimed.",
    _id("id", "Client-generated reservation id.", primary_key=True),
    _text(
        "holder",
        "host:pid of the process holding it, to explain a reclaimed lease.",
        length=300,
    ),
    _usd("amount_usd", "USD reserved on each line."),
    _count("tokens", "Tokens reserved on each line."),
    _json("lines", "[budget id, window start] pairs the amount is reserved on."),
    _time("created_at", "When it was taken."),
    _time(
        "expires_at",
        "End of the lease: after it any process may reclaim the reservation.",
    ),
    sa.Index(None, "expires_at"),  # finding expired leases
)
