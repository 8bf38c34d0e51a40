"""Alembic environment of the tokenledger ledger.

Programmatic use (what `tokenledger._schema` does): put an open SQLAlchemy connection in
``config.attributes["connection"]``; the migration runs in that connection's transaction
and the caller commits. Otherwise the URL comes from the ``sqlalchemy.url`` option, else
`tokenledger._storage.default_url`.

Two processes may upgrade the same database at once (two workers starting on a fresh
ledger). Each takes a lock inside the migration transaction before Alembic reads the
version table, so the second waits, then finds the schema at head and does nothing:
PostgreSQL ``pg_advisory_xact_lock``; SQLite ``BEGIN IMMEDIATE`` (the database's write
lock, waited for through the busy timeout).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from tokenledger import _storage as storage
from tokenledger._schema import MIGRATION_LOCK_ID, VERSION_TABLE

config = context.config


def _take_migration_lock(connection: Connection) -> None:
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_ID})
    elif dialect == "sqlite":
        # pysqlite begins its own (deferred) transaction only before DML, so DDL would
        # otherwise run outside any transaction and two processes could both see an
        # empty database.
        dbapi_connection = connection.connection.dbapi_connection
        if dbapi_connection is not None and not dbapi_connection.in_transaction:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=storage.metadata,
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        # With BEGIN IMMEDIATE above, SQLite DDL is transactional too: all or nothing.
        transactional_ddl=True,
        compare_type=True,
    )
    with context.begin_transaction():
        _take_migration_lock(connection)
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = storage.create_engine_for(config.get_main_option("sqlalchemy.url") or None)
    try:
        with engine.begin() as connection:
            _run(connection)
    finally:
        engine.dispose()


def run_migrations_offline() -> None:
    url = storage.normalize_url(config.get_main_option("sqlalchemy.url") or storage.default_url())
    context.configure(
        url=url,
        target_metadata=storage.metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
        render_as_batch=url.get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
