"""Partial indexes for reports: root runs still running, and tool charges.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

Append-only: never edit this revision once it has landed; write a new one.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RUNNING = sa.text("status = 'running'")
_TOOL = sa.text("operation = 'execute_tool'")


def upgrade() -> None:
    # Reports sum the calls of root runs still running: find those few without a scan.
    op.create_index(
        "ix_runs_running",
        "runs",
        ["parent_id", "started_at"],
        postgresql_where=_RUNNING,
        sqlite_where=_RUNNING,
    )
    # Break-even splits tool charges from model cost: find them without scanning calls.
    op.create_index(
        "ix_calls_tool_charges",
        "calls",
        ["root_run_id"],
        postgresql_where=_TOOL,
        sqlite_where=_TOOL,
    )


def downgrade() -> None:
    op.drop_index("ix_calls_tool_charges", table_name="calls")
    op.drop_index("ix_runs_running", table_name="runs")
