"""Outcomes on runs, and tool charges on calls.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

Append-only: never edit this revision once it has landed; write a new one.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(
            sa.Column(
                "outcome",
                sa.String(200),
                nullable=True,
                comment="What the run achieved (resolved, escalated, ...): cost per outcome.",
            )
        )
        batch.add_column(
            sa.Column(
                "outcome_value",
                sa.Numeric(24, 12),
                nullable=True,
                comment="What the outcome is worth in USD, for margins; NULL when unknown.",
            )
        )
        batch.add_column(
            sa.Column(
                "outcome_at",
                sa.DateTime(timezone=True),
                nullable=True,
                comment="When the outcome was recorded (often hours after the run).",
            )
        )
    op.create_index("ix_runs_outcome", "runs", ["outcome"])
    with op.batch_alter_table("calls") as batch:
        batch.add_column(
            sa.Column(
                "tool_name",
                sa.String(200),
                nullable=True,
                comment="For execute_tool rows: the paid tool or resource that was charged.",
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("calls") as batch:
        batch.drop_column("tool_name")
    op.drop_index("ix_runs_outcome", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("outcome_at")
        batch.drop_column("outcome_value")
        batch.drop_column("outcome")
