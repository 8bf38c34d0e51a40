"""An index on root runs' costs by agent, for cost-per-outcome percentiles.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

Append-only: never edit this revision once it has landed; write a new one.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ROOT = sa.text("parent_id IS NULL")


def upgrade() -> None:
    # Cost per outcome reads an agent's p50/p90/p99 run cost as the run at that rank in
    # this index (ORDER BY cost_usd LIMIT 1 OFFSET rank - 1): a walk of index entries in
    # the engine, instead of fetching and sorting every root run's cost in Python.
    op.create_index(
        "ix_runs_root_cost",
        "runs",
        ["name", "cost_usd"],
        postgresql_where=_ROOT,
        sqlite_where=_ROOT,
    )


def downgrade() -> None:
    op.drop_index("ix_runs_root_cost", table_name="runs")
