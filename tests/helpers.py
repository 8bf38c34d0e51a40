"""Reading back what a ledger wrote, for assertions."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from tokenledger import Ledger
from tokenledger._storage import metadata


def rows(ledger: Ledger, table: str) -> list[dict[str, Any]]:
    with ledger.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(metadata.tables[table]))]


def calls_of(ledger: Ledger) -> list[dict[str, Any]]:
    return rows(ledger, "calls")


def runs_by_name(ledger: Ledger) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in rows(ledger, "runs")}
