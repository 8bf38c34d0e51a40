"""The first ledger: prices, runs and calls.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

Append-only: never edit this revision once it has landed; write a new one. It spells
out every type instead of importing tokenledger._storage, so later changes to the code's
metadata cannot change what this revision creates.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[object]:
    return sa.JSON(none_as_null=True).with_variant(
        postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
    )


COST = sa.Numeric(24, 12)
PER_TOKEN = sa.Numeric(30, 18)
TIMESTAMP = sa.DateTime(timezone=True)
ID = sa.String(32)


def upgrade() -> None:
    op.create_table(
        "prices",
        sa.Column(
            "id",
            ID,
            nullable=False,
            comment="Content hash of everything that determines a cost: one row per price version.",
        ),
        sa.Column("model", sa.String(), nullable=False, comment="Model name the price applies to."),
        sa.Column(
            "provider",
            sa.String(),
            nullable=True,
            comment="Provider the price applies to (openai, anthropic, ...); NULL for any.",
        ),
        sa.Column(
            "input_per_token", PER_TOKEN, nullable=False, comment="USD per uncached input token."
        ),
        sa.Column(
            "output_per_token",
            PER_TOKEN,
            nullable=False,
            comment="USD per output token (reasoning included unless priced separately).",
        ),
        sa.Column(
            "cache_read_per_token",
            PER_TOKEN,
            nullable=True,
            comment="USD per input token read from the prompt cache; NULL: the input price.",
        ),
        sa.Column(
            "cache_write_per_token",
            PER_TOKEN,
            nullable=True,
            comment="USD per input token written to the prompt cache; NULL: the input price.",
        ),
        sa.Column(
            "reasoning_per_token",
            PER_TOKEN,
            nullable=True,
            comment="USD per reasoning token when priced apart from output; NULL: output price.",
        ),
        sa.Column(
            "tiers",
            _json(),
            nullable=True,
            comment="Prices that apply above an input-token threshold, amounts as decimal strings.",
        ),
        sa.Column(
            "source",
            sa.String(),
            nullable=False,
            comment="Where the price came from: 'litellm <version>' or 'user'.",
        ),
        sa.Column(
            "created_at",
            TIMESTAMP,
            nullable=False,
            comment="When this price version was first recorded (UTC).",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_prices"),
        comment="Every price version used to cost a call, so old costs stay reproducible.",
    )

    op.create_table(
        "runs",
        sa.Column("id", ID, nullable=False, comment="Client-generated run id (32 hex digits)."),
        sa.Column(
            "name", sa.String(), nullable=False, comment="Agent name: what cost is grouped by."
        ),
        sa.Column(
            "parent_id",
            ID,
            nullable=True,
            comment="The run this one was started inside; NULL for a root run.",
        ),
        sa.Column(
            "root_id",
            ID,
            nullable=False,
            comment="The outermost run of the tree; equals id for a root run.",
        ),
        sa.Column(
            "tags",
            _json(),
            nullable=False,
            comment="User tags (user, tenant, ...) as a JSON object of strings, for attribution.",
        ),
        sa.Column("started_at", TIMESTAMP, nullable=False, comment="When the run began (UTC)."),
        sa.Column(
            "ended_at",
            TIMESTAMP,
            nullable=True,
            comment="When the run ended (UTC); NULL while it is running.",
        ),
        sa.Column(
            "status",
            sa.String(),
            nullable=False,
            comment="running, ok, error or budget_exceeded: filters successful runs.",
        ),
        sa.Column(
            "error_type",
            sa.String(),
            nullable=True,
            comment="Exception class that ended the run, when it failed.",
        ),
        sa.Column(
            "calls",
            sa.BigInteger(),
            nullable=False,
            comment="Model calls in this run and its descendants.",
        ),
        sa.Column(
            "failed_calls",
            sa.BigInteger(),
            nullable=False,
            comment="Of those, calls that failed: retries cost money too.",
        ),
        sa.Column(
            "input_tokens",
            sa.BigInteger(),
            nullable=False,
            comment="Input tokens of all calls below, cached ones included.",
        ),
        sa.Column(
            "output_tokens",
            sa.BigInteger(),
            nullable=False,
            comment="Output tokens of all calls below, reasoning included.",
        ),
        sa.Column(
            "cache_read_tokens",
            sa.BigInteger(),
            nullable=False,
            comment="Input tokens served from the prompt cache (cheaper).",
        ),
        sa.Column(
            "cache_write_tokens",
            sa.BigInteger(),
            nullable=False,
            comment="Input tokens written to the prompt cache (dearer on some providers).",
        ),
        sa.Column(
            "reasoning_tokens",
            sa.BigInteger(),
            nullable=False,
            comment="Output tokens spent on hidden reasoning.",
        ),
        sa.Column(
            "cost_usd",
            COST,
            nullable=False,
            comment="USD cost of the priced calls below; unpriced calls are counted apart.",
        ),
        sa.Column(
            "unpriced_calls",
            sa.BigInteger(),
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
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
        comment="One row per agent run; totals roll up every descendant run's calls.",
    )
    op.create_index("ix_runs_name_started_at", "runs", ["name", "started_at"])
    op.create_index("ix_runs_root_id", "runs", ["root_id"])
    op.create_index("ix_runs_parent_id", "runs", ["parent_id"])
    op.create_index("ix_runs_started_at", "runs", ["started_at"])

    # No foreign key from calls.run_id to runs: writes are batched, so a call's row may
    # land before its run's row.
    op.create_table(
        "calls",
        sa.Column(
            "id",
            ID,
            nullable=False,
            comment="Client-generated call id: a retried write can never duplicate it.",
        ),
        sa.Column(
            "run_id",
            ID,
            nullable=True,
            comment="The run that made the call; NULL for a call made outside any run.",
        ),
        sa.Column(
            "root_run_id",
            ID,
            nullable=True,
            comment="The root of that run's tree, so a tree's cost is one indexed query.",
        ),
        sa.Column(
            "operation",
            sa.String(),
            nullable=False,
            comment="gen_ai.operation.name: chat, embeddings, text_completion, ...",
        ),
        sa.Column("provider", sa.String(), nullable=True, comment="Provider that served the call."),
        sa.Column(
            "requested_model",
            sa.String(),
            nullable=True,
            comment="Model the caller asked for (before aliases, fallbacks and downgrades).",
        ),
        sa.Column(
            "model",
            sa.String(),
            nullable=True,
            comment="Model that served the call, as the provider reported it: what is billed.",
        ),
        sa.Column("started_at", TIMESTAMP, nullable=False, comment="When the call was sent (UTC)."),
        sa.Column(
            "ended_at",
            TIMESTAMP,
            nullable=True,
            comment="When the call finished (UTC); NULL if it never did.",
        ),
        sa.Column(
            "latency_ms",
            sa.Float(),
            nullable=True,
            comment="Wall time of the call in milliseconds.",
        ),
        sa.Column(
            "streamed", sa.Boolean(), nullable=False, comment="Whether the response was streamed."
        ),
        sa.Column(
            "status",
            sa.String(),
            nullable=False,
            comment="ok, error, abandoned (stream not read to the end) or refused (budget).",
        ),
        sa.Column(
            "error_type", sa.String(), nullable=True, comment="Exception class of a failed call."
        ),
        sa.Column(
            "input_tokens",
            sa.BigInteger(),
            nullable=False,
            comment="Input tokens, cached ones included (gen_ai.usage.input_tokens).",
        ),
        sa.Column(
            "output_tokens",
            sa.BigInteger(),
            nullable=False,
            comment="Output tokens, reasoning included (gen_ai.usage.output_tokens).",
        ),
        sa.Column(
            "cache_read_tokens",
            sa.BigInteger(),
            nullable=False,
            comment="Input tokens read from the prompt cache.",
        ),
        sa.Column(
            "cache_write_tokens",
            sa.BigInteger(),
            nullable=False,
            comment="Input tokens written to the prompt cache.",
        ),
        sa.Column(
            "reasoning_tokens",
            sa.BigInteger(),
            nullable=False,
            comment="Output tokens spent on hidden reasoning.",
        ),
        sa.Column(
            "usage_estimated",
            sa.Boolean(),
            nullable=False,
            comment="True when tokenledger counted the tokens because the provider reported none.",
        ),
        sa.Column(
            "cost_usd",
            COST,
            nullable=True,
            comment="USD cost of the call; NULL when the model has no price (never a fake $0).",
        ),
        sa.Column(
            "cost_source",
            sa.String(),
            nullable=True,
            comment="local (priced from the prices table) or provider (cost the provider reported).",
        ),
        sa.Column(
            "price_id",
            ID,
            nullable=True,
            comment="The price version the cost was computed with (prices.id).",
        ),
        sa.Column(
            "finish_reasons",
            _json(),
            nullable=True,
            comment="Why generation stopped, per choice (stop, length, tool_calls, ...).",
        ),
        sa.Column(
            "litellm_call_id",
            sa.String(),
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
            sa.BigInteger(),
            nullable=True,
            comment="The call's max_tokens: with it a budget reservation is a true upper bound.",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_calls"),
        comment="One row per model call (each retry and fallback its own), with tokens and cost.",
    )
    op.create_index("ix_calls_run_id", "calls", ["run_id"])
    op.create_index("ix_calls_root_run_id", "calls", ["root_run_id"])
    op.create_index("ix_calls_started_at", "calls", ["started_at"])
    op.create_index("ix_calls_model_started_at", "calls", ["model", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_calls_model_started_at", table_name="calls")
    op.drop_index("ix_calls_started_at", table_name="calls")
    op.drop_index("ix_calls_root_run_id", table_name="calls")
    op.drop_index("ix_calls_run_id", table_name="calls")
    op.drop_table("calls")
    op.drop_index("ix_runs_started_at", table_name="runs")
    op.drop_index("ix_runs_parent_id", table_name="runs")
    op.drop_index("ix_runs_root_id", table_name="runs")
    op.drop_index("ix_runs_name_started_at", table_name="runs")
    op.drop_table("runs")
    op.drop_table("prices")
