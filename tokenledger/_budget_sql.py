"""The SQL that reservations and leases run on the budget windows.

Built once per store with bind parameters, so SQLAlchemy reuses their compiled form on
every call; PostgreSQL also gets two hand-written statements that reserve or settle a
call on one budget in a single round trip. SQLite takes its write lock up front (BEGIN
IMMEDIATE), so the checks and updates of several budgets are one serialised step across
processes.
"""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from tokenledger import _storage as storage
from tokenledger._budget_scope import Amount, WindowKey
from tokenledger._money import MAX_USD
from tokenledger.budgets import MAX_TOKENS

__all__ = [
    "NO_TOKEN_LIMIT",
    "NO_USD_LIMIT",
    "PG_RESERVE_ONE",
    "PG_SETTLE_ONE",
    "Statements",
    "build_statements",
    "sqlite_setup",
]

# Stand-ins for "no limit" in one dimension of a budget limited in the other.
NO_USD_LIMIT = MAX_USD * 1000
NO_TOKEN_LIMIT = MAX_TOKENS * 10

# PostgreSQL, a call on one budget: the conditional UPDATE and the reservation row in
# one statement (nothing is inserted when the budget has no room), and the settle's
# DELETE and UPDATE in another; each atomic on its own, run in autocommit.
PG_RESERVE_ONE = """\
WITH held AS (
    UPDATE budget_windows AS w
    SET reserved_usd = w.reserved_usd + %(usd)s, reserved_tokens = w.reserved_tokens + %(tok)s
    FROM budgets AS b
    WHERE w.budget_id = %(bid)s AND w.window_start = %(ws)s AND b.id = w.budget_id
      AND w.spent_usd + w.reserved_usd + %(usd)s <= COALESCE(b.limit_usd, %(big_usd)s)
      AND w.spent_tokens + w.reserved_tokens + %(tok)s <= COALESCE(b.limit_tokens, %(big_tok)s)
    RETURNING w.budget_id
)
INSERT INTO reservations (id, holder, amount_usd, tokens, lines, created_at, expires_at)
SELECT %(id)s, %(holder)s, %(usd)s, %(tok)s, CAST(%(lines)s AS jsonb), %(now)s, %(expires)s
FROM held"""
# If the lease ran out and another process reclaimed it, the reserved amount was
# already given back: only the spend remains to add.
PG_SETTLE_ONE = """\
WITH gone AS (DELETE FROM reservations WHERE id = %(rid)s RETURNING id)
UPDATE budget_windows
SET reserved_usd = reserved_usd - CASE WHEN EXISTS (SELECT FROM gone) THEN %(give_usd)s ELSE 0 END,
    reserved_tokens = reserved_tokens
        - CASE WHEN EXISTS (SELECT FROM gone) THEN %(give_tok)s ELSE 0 END,
    spent_usd = spent_usd + %(add_usd)s,
    spent_tokens = spent_tokens + %(add_tok)s,
    overshoot_usd = overshoot_usd + %(over)s
WHERE budget_id = %(bid)s AND window_start = %(ws)s"""


@dataclasses.dataclass(frozen=True)
class Statements:
    """The statements reservations and leases use, built once with bind parameters
    (SQLAlchemy then reuses their compiled form). Window statements take ``bid`` and
    ``ws``; reservation-row statements take ``rid``."""

    reserve: Any  # reserved += usd/tok, only if the limits still hold
    add: Any  # reserved += usd/tok unconditionally (a ``warn`` budget)
    move: Any  # reserved -= give_*, spent += add_*, overshoot += over
    figures: Any  # the window's figures and its budget's limits (locked on PostgreSQL)
    insert: Any  # a reservations row
    delete: Any  # a reservations row, by id
    resize: Any  # a reservations row's amount and expiry

    @staticmethod
    def move_args(key: WindowKey, give: Amount, add: Amount, over: Decimal) -> dict[str, Any]:
        """The parameters of `move` on one window."""
        return {
            "bid": key.budget_id,
            "ws": key.window_start,
            "give_usd": give.usd,
            "give_tok": give.tokens,
            "add_usd": add.usd,
            "add_tok": add.tokens,
            "over": over,
        }


def build_statements(dialect: str) -> Statements:
    windows = storage.budget_windows
    budgets = storage.budgets
    reservations = storage.reservations
    money = windows.c.reserved_usd.type
    count = windows.c.reserved_tokens.type
    key = (windows.c.budget_id == sa.bindparam("bid")) & (
        windows.c.window_start == sa.bindparam("ws")
    )
    usd = sa.bindparam("usd", type_=money)
    tok = sa.bindparam("tok", type_=count)
    limit_usd = (
        sa.select(sa.func.coalesce(budgets.c.limit_usd, NO_USD_LIMIT))
        .where(budgets.c.id == sa.bindparam("bid"))
        .scalar_subquery()
    )
    limit_tokens = (
        sa.select(sa.func.coalesce(budgets.c.limit_tokens, NO_TOKEN_LIMIT))
        .where(budgets.c.id == sa.bindparam("bid"))
        .scalar_subquery()
    )
    figures = (
        sa.select(
            windows.c.spent_usd,
            windows.c.reserved_usd,
            windows.c.spent_tokens,
            windows.c.reserved_tokens,
            budgets.c.limit_usd,
            budgets.c.limit_tokens,
        )
        .select_from(windows.join(budgets, budgets.c.id == windows.c.budget_id))
        .where(key)
    )
    if dialect == "postgresql":
        figures = figures.with_for_update(of=windows)
    held = {
        "reserved_usd": windows.c.reserved_usd + usd,
        "reserved_tokens": windows.c.reserved_tokens + tok,
    }
    return Statements(
        reserve=sa.update(windows)
        .where(
            key,
            windows.c.spent_usd + windows.c.reserved_usd + usd <= limit_usd,
            windows.c.spent_tokens + windows.c.reserved_tokens + tok <= limit_tokens,
        )
        .values(**held),
        add=sa.update(windows).where(key).values(**held),
        move=sa.update(windows)
        .where(key)
        .values(
            reserved_usd=windows.c.reserved_usd - sa.bindparam("give_usd", type_=money),
            reserved_tokens=windows.c.reserved_tokens - sa.bindparam("give_tok", type_=count),
            spent_usd=windows.c.spent_usd + sa.bindparam("add_usd", type_=money),
            spent_tokens=windows.c.spent_tokens + sa.bindparam("add_tok", type_=count),
            overshoot_usd=windows.c.overshoot_usd + sa.bindparam("over", type_=money),
        ),
        figures=figures,
        insert=sa.insert(reservations),
        delete=sa.delete(reservations).where(reservations.c.id == sa.bindparam("rid")),
        resize=sa.update(reservations)
        .where(reservations.c.id == sa.bindparam("rid"))
        .values(
            amount_usd=sa.bindparam("size_usd", type_=money),
            tokens=sa.bindparam("size_tok", type_=count),
            expires_at=sa.bindparam("until", type_=reservations.c.expires_at.type),
        ),
    )


def sqlite_setup(engine: sa.Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
