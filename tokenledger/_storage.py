"""The ledger's tables and the engines that reach them.

SQLAlchemy Core, not the ORM: the batch writer inserts thousands of rows at a time with
``executemany`` and the query side builds aggregates, neither of which wants identity maps.

The tables mirror the dataclasses in `tokenledger.records` field for field. Their shape
on disk is owned by the Alembic revisions in ``tokenledger.migrations``; the metadata
here is what the code reads and writes with, and a test checks the two agree.

This module is where the rest of tokenledger imports these names from; each lives in
the private module of its concept:

* `tokenledger._column_types`: `Money`, `UTCDateTime`, `JSONDocument`;
* `tokenledger._tables`: `metadata` and the tables;
* `tokenledger._engine`: URLs (`normalize_url`, `redact_url`, `database_path`),
  `create_engine_for` and `insert_for`;
* `tokenledger._rows`: `DriverInsert` and `RefusedValue`, the batch writer's inserts at
  the driver level;
* `tokenledger._location`: `DATABASE_URL_ENV`, `DEFAULT_SQLITE_FILENAME`, `default_url`,
  which need no SQLAlchemy.
"""

from __future__ import annotations

from tokenledger._column_types import JSONDocument, Money, UTCDateTime
from tokenledger._engine import (
    create_engine_for,
    database_path,
    insert_for,
    normalize_url,
    redact_url,
)
from tokenledger._location import DATABASE_URL_ENV, DEFAULT_SQLITE_FILENAME, default_url
from tokenledger._rows import DriverInsert, RefusedValue
from tokenledger._tables import (
    budget_windows,
    budgets,
    calls,
    metadata,
    prices,
    reservations,
    runs,
)

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
    "insert_for",
    "metadata",
    "normalize_url",
    "prices",
    "redact_url",
    "reservations",
    "runs",
]
