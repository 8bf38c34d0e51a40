"""Budgets: definitions, per-window counters, and reservations with leases.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

Append-only: never edit this revision once it has landed; write a new one.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COST = sa.Numeric(24, 12)
TIMESTAMP = sa.DateTime(timezone=True)
ID = sa.String(32)


def _json() -> sa.types.TypeEngine[object]:
    return sa.JSON(none_as_null=True).with_variant(
        postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
    )


def upgrade() -> None:
    op.create_table(
        "budgets",
        sa.Column("id", ID, nullable=False, comment="Client-generated budget id."),
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
        sa.Column("limit_usd", COST, nullable=True, comment="Limit in USD per window; NULL: none."),
        sa.Column(
            "limit_tokens",
            sa.BigInteger(),
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
            _json(),
            nullable=True,
            comment="Cheaper models tried in order when the action is downgrade.",
        ),
        sa.Column("created_at", TIMESTAMP, nullable=False, comment="When the budget was set."),
        sa.Column("updated_at", TIMESTAMP, nullable=False, comment="When it was last changed."),
        sa.PrimaryKeyConstraint("id", name="pk_budgets"),
        sa.UniqueConstraint("scope", "per", name="uq_budgets_scope_per"),
        comment="Shared budgets, enforced before each call by every process using the ledger.",
    )
    op.create_table(
        "budget_windows",
        sa.Column("budget_id", ID, nullable=False, comment="The budget (budgets.id)."),
        sa.Column(
            "window_start",
            TIMESTAMP,
            nullable=False,
            comment="Start of the UTC window these figures belong to (1970-01-01 for total).",
        ),
        sa.Column(
            "spent_usd", COST, nullable=False, comment="Settled cost of calls in the window."
        ),
        sa.Column(
            "reserved_usd",
            COST,
            nullable=False,
            comment="Upper-bound estimates held by calls in flight; checked with spent atomically.",
        ),
        sa.Column("spent_tokens", sa.BigInteger(), nullable=False, comment="Settled tokens."),
        sa.Column(
            "reserved_tokens", sa.BigInteger(), nullable=False, comment="Tokens held in flight."
        ),
        sa.Column(
            "overshoot_usd",
            COST,
            nullable=False,
            comment="How far actual costs passed their estimates (calls without max_tokens).",
        ),
        sa.PrimaryKeyConstraint("budget_id", "window_start", name="pk_budget_windows"),
        comment="Spent and reserved per budget and window: the row a reservation updates.",
    )
    op.create_table(
        "reservations",
        sa.Column("id", ID, nullable=False, comment="Client-generated reservation id."),
        sa.Column(
            "holder",
            sa.String(300),
            nullable=False,
            comment="host:pid of the process holding it, to explain a reclaimed lease.",
        ),
        sa.Column("amount_usd", COST, nullable=False, comment="USD reserved on each line."),
        sa.Column(
            "tokens", sa.BigInteger(), nullable=False, comment="Tokens reserved on each line."
        ),
        sa.Column(
            "lines",
            _json(),
            nullable=False,
            comment="[budget id, window start] pairs the amount is reserved on.",
        ),
        sa.Column("created_at", TIMESTAMP, nullable=False, comment="When it was taken."),
        sa.Column(
            "expires_at",
            TIMESTAMP,
            nullable=False,
            comment="End of the lease: after it any process may reclaim the reservation.",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_reservations"),
        comment="Budget reservations of calls in flight; a crashed process's expire and are reclaimed.",
    )
    op.create_index("ix_reservations_expires_at", "reservations", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_reservations_expires_at", table_name="reservations")
    op.drop_table("reservations")
    op.drop_table("budget_windows")
    op.drop_table("budgets")
