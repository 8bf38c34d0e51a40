"""The ledger's schema: what `upgrade head` creates, how it is checked on open, the types.

Each test gets a fresh, empty database on SQLite and on PostgreSQL (see conftest).
"""
# Assertions put the expected value first (`assert expected == actual`), the project's
# convention for tests; ruff's SIM300 wants the opposite.

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import re
import subprocess
import sys
import traceback
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tokenledger import _schema as schema
from tokenledger import _storage as storage
from tokenledger.exceptions import ConfigurationError, LedgerError, SchemaVersionError

# Every table `upgrade head` creates, with each column's generic kind and nullability,
# in order. Written out by hand: this is the contract with every ledger in the field.
EXPECTED_COLUMNS: dict[str, list[tuple[str, str, bool]]] = {
    "prices": [
        ("id", "string", False),
        ("model", "string", False),
        ("provider", "string", True),
        ("input_per_token", "numeric", False),
        ("output_per_token", "numeric", False),
        ("cache_read_per_token", "numeric", True),
        ("cache_write_per_token", "numeric", True),
        ("reasoning_per_token", "numeric", True),
        ("tiers", "json", True),
        ("source", "string", False),
        ("created_at", "datetime", False),
    ],
    "runs": [
        ("id", "string", False),
        ("name", "string", False),
        ("parent_id", "string", True),
        ("root_id", "string", False),
        ("tags", "json", False),
        ("started_at", "datetime", False),
        ("ended_at", "datetime", True),
        ("status", "string", False),
        ("error_type", "string", True),
        ("calls", "integer", False),
        ("failed_calls", "integer", False),
        ("input_tokens", "integer", False),
        ("output_tokens", "integer", False),
        ("cache_read_tokens", "integer", False),
        ("cache_write_tokens", "integer", False),
        ("reasoning_tokens", "integer", False),
        ("cost_usd", "numeric", False),
        ("unpriced_calls", "integer", False),
        ("trace_id", "string", True),
        ("span_id", "string", True),
        ("outcome", "string", True),
        ("outcome_value", "numeric", True),
        ("outcome_at", "datetime", True),
    ],
    "calls": [
        ("id", "string", False),
        ("run_id", "string", True),
        ("root_run_id", "string", True),
        ("operation", "string", False),
        ("provider", "string", True),
        ("requested_model", "string", True),
        ("model", "string", True),
        ("started_at", "datetime", False),
        ("ended_at", "datetime", True),
        ("latency_ms", "float", True),
        ("streamed", "boolean", False),
        ("status", "string", False),
        ("error_type", "string", True),
        ("input_tokens", "integer", False),
        ("output_tokens", "integer", False),
        ("cache_read_tokens", "integer", False),
        ("cache_write_tokens", "integer", False),
        ("reasoning_tokens", "integer", False),
        ("usage_estimated", "boolean", False),
        ("cost_usd", "numeric", True),
        ("cost_source", "string", True),
        ("price_id", "string", True),
        ("finish_reasons", "json", True),
        ("litellm_call_id", "string", True),
        ("trace_id", "string", True),
        ("span_id", "string", True),
        ("max_tokens", "integer", True),
        ("tool_name", "string", True),
    ],
    "budgets": [
        ("id", "string", False),
        ("scope", "string", False),
        ("per", "string", False),
        ("limit_usd", "numeric", True),
        ("limit_tokens", "integer", True),
        ("action", "string", False),
        ("downgrade_to", "json", True),
        ("created_at", "datetime", False),
        ("updated_at", "datetime", False),
    ],
    "budget_windows": [
        ("budget_id", "string", False),
        ("window_start", "datetime", False),
        ("spent_usd", "numeric", False),
        ("reserved_usd", "numeric", False),
        ("spent_tokens", "integer", False),
        ("reserved_tokens", "integer", False),
        ("overshoot_usd", "numeric", False),
    ],
    "reservations": [
        ("id", "string", False),
        ("holder", "string", False),
        ("amount_usd", "numeric", False),
        ("tokens", "integer", False),
        ("lines", "json", False),
        ("created_at", "datetime", False),
        ("expires_at", "datetime", False),
    ],
}

EXPECTED_INDEXES = {
    "prices": {},
    "runs": {
        "ix_runs_name_started_at": ["name", "started_at"],
        "ix_runs_root_id": ["root_id"],
        "ix_runs_parent_id": ["parent_id"],
        "ix_runs_started_at": ["started_at"],
        "ix_runs_outcome": ["outcome"],
        "ix_runs_running": ["parent_id", "started_at"],
        "ix_runs_root_cost": ["name", "cost_usd"],
    },
    "calls": {
        "ix_calls_run_id": ["run_id"],
        "ix_calls_root_run_id": ["root_run_id"],
        "ix_calls_started_at": ["started_at"],
        "ix_calls_model_started_at": ["model", "started_at"],
        "ix_calls_tool_charges": ["root_run_id"],
    },
    "budgets": {},
    "budget_windows": {},
    "reservations": {"ix_reservations_expires_at": ["expires_at"]},
}

# (precision, scale) of every money column: costs and per-token prices.
EXPECTED_MONEY = {
    ("prices", "input_per_token"): (30, 18),
    ("prices", "output_per_token"): (30, 18),
    ("prices", "cache_read_per_token"): (30, 18),
    ("prices", "cache_write_per_token"): (30, 18),
    ("prices", "reasoning_per_token"): (30, 18),
    ("runs", "cost_usd"): (24, 12),
    ("runs", "outcome_value"): (24, 12),
    ("calls", "cost_usd"): (24, 12),
    ("budgets", "limit_usd"): (24, 12),
    ("budget_windows", "spent_usd"): (24, 12),
    ("budget_windows", "reserved_usd"): (24, 12),
    ("budget_windows", "overshoot_usd"): (24, 12),
    ("reservations", "amount_usd"): (24, 12),
}


def generic_kind(type_: sa.types.TypeEngine[Any]) -> str:
    """The family of a reflected column type, the same on SQLite and PostgreSQL."""
    for kind, cls in (
        ("boolean", sa.Boolean),
        ("datetime", sa.DateTime),
        ("json", sa.JSON),
        ("float", sa.Float),  # before Numeric: Float is a Numeric
        ("numeric", sa.Numeric),
        ("integer", sa.Integer),
        ("string", sa.String),
    ):
        if isinstance(type_, cls):
            return kind
    raise AssertionError(f"unexpected column type {type_!r}")


def table_names(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def version_rows(engine: sa.Engine) -> list[str]:
    with engine.connect() as connection:
        return list(
            connection.execute(sa.text(f"SELECT version_num FROM {schema.VERSION_TABLE}")).scalars()
        )


# -- what `upgrade head` creates ---------------------------------------------------------


def test_upgrade_head_creates_exactly_the_ledger_tables(engine: sa.Engine) -> None:
    schema.upgrade(engine)

    assert {*EXPECTED_COLUMNS, "tokenledger_alembic_version"} == table_names(engine)
    assert [schema.head_revision()] == version_rows(engine)


@pytest.mark.parametrize("table", ["prices", "runs", "calls"])
def test_upgrade_head_creates_exactly_the_expected_columns(engine: sa.Engine, table: str) -> None:
    schema.upgrade(engine)

    columns = sa.inspect(engine).get_columns(table)

    assert EXPECTED_COLUMNS[table] == [
        (column["name"], generic_kind(column["type"]), column["nullable"]) for column in columns
    ]


def test_upgrade_head_gives_money_exact_precision_and_ids_32_characters(engine: sa.Engine) -> None:
    schema.upgrade(engine)
    inspector = sa.inspect(engine)
    types = {
        (table, column["name"]): column["type"]
        for table in EXPECTED_COLUMNS
        for column in inspector.get_columns(table)
    }

    assert EXPECTED_MONEY == {
        key: (type_.precision, type_.scale)
        for key, type_ in types.items()
        if generic_kind(type_) == "numeric"
    }
    assert {("calls", "id"): 32, ("runs", "id"): 32, ("prices", "id"): 32} == {
        key: types[key].length for key in [("calls", "id"), ("runs", "id"), ("prices", "id")]
    }
    if engine.dialect.name == "postgresql":
        assert all(type_.timezone for type_ in types.values() if generic_kind(type_) == "datetime")


def test_upgrade_head_creates_the_primary_keys_and_indexes(engine: sa.Engine) -> None:
    schema.upgrade(engine)
    inspector = sa.inspect(engine)

    for table, indexes in EXPECTED_INDEXES.items():
        key = ["budget_id", "window_start"] if table == "budget_windows" else ["id"]
        assert {"constrained_columns": key}.items() <= inspector.get_pk_constraint(table).items()
        # PostgreSQL also lists the index behind a unique constraint; that one is checked below.
        plain = [i for i in inspector.get_indexes(table) if not i.get("duplicates_constraint")]
        assert indexes == {index["name"]: index["column_names"] for index in plain}
        assert not any(index["unique"] for index in plain)
    assert [["scope", "per"]] == [
        c["column_names"] for c in inspector.get_unique_constraints("budgets")
    ]
    # A call's row may land before its run's row: no foreign key may refuse it.
    assert [] == inspector.get_foreign_keys("calls")


def test_every_table_and_column_says_why_it_exists(engine: sa.Engine) -> None:
    """In the code's metadata always; in the database where it keeps comments (PostgreSQL)."""
    for table in storage.metadata.sorted_tables:
        assert table.comment, table.name
        for column in table.columns:
            assert column.comment, f"{table.name}.{column.name}"
    if engine.dialect.name != "postgresql":
        return  # SQLite has no comments

    schema.upgrade(engine)
    inspector = sa.inspect(engine)

    for table in storage.metadata.sorted_tables:
        assert table.comment == inspector.get_table_comment(table.name)["text"]
        assert {column.name: column.comment for column in table.columns} == {
            column["name"]: column["comment"] for column in inspector.get_columns(table.name)
        }


def test_code_metadata_matches_what_upgrade_head_creates(engine: sa.Engine) -> None:
    """The tables the code writes with and the tables the migrations make never drift."""
    schema.upgrade(engine)

    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={"compare_type": True, "version_table": schema.VERSION_TABLE},
        )
        differences = compare_metadata(context, storage.metadata)

    assert [] == differences


# -- upgrade and downgrade ------------------------------------------------------------


def test_downgrade_to_base_removes_the_tables_and_the_revision(engine: sa.Engine) -> None:
    schema.upgrade(engine)

    schema.downgrade(engine, "base")

    assert {schema.VERSION_TABLE} == table_names(engine)
    assert [] == version_rows(engine)
    assert schema.current_revision(engine) is None


def describe_schema(engine: sa.Engine) -> dict[str, Any]:
    """Every ledger table's columns (name, type, nullability, comment) and indexes."""
    inspector = sa.inspect(engine)
    return {
        table: (
            [
                (column["name"], repr(column["type"]), column["nullable"], column.get("comment"))
                for column in inspector.get_columns(table)
            ],
            sorted(
                (index["name"], index["column_names"]) for index in inspector.get_indexes(table)
            ),
        )
        for table in EXPECTED_COLUMNS
    }


def test_upgrade_downgrade_upgrade_gives_the_same_schema(engine: sa.Engine) -> None:
    schema.upgrade(engine)
    first = describe_schema(engine)

    schema.downgrade(engine, "base")
    schema.upgrade(engine)

    assert schema.head_revision() == schema.current_revision(engine)
    assert first == describe_schema(engine)


def _upgrade_in_child(url: str, action: str, barrier: Any) -> None:
    """Run in a spawned process: wait for the sibling, then migrate."""
    try:
        engine = storage.create_engine_for(url)
        barrier.wait(timeout=60)
        getattr(schema, action)(engine)
        engine.dispose()
    except BaseException:
        traceback.print_exc()
        sys.exit(1)


@pytest.mark.slow
@pytest.mark.parametrize("action", ["upgrade", "ensure_schema"])
def test_two_processes_migrating_at_once_both_succeed(
    db_url: str, engine: sa.Engine, action: str
) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    processes = [
        context.Process(target=_upgrade_in_child, args=(db_url, action, barrier)) for _ in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)

    assert [0, 0] == [process.exitcode for process in processes]
    assert [schema.head_revision()] == version_rows(engine)
    for table, columns in EXPECTED_COLUMNS.items():
        assert [name for name, _, _ in columns] == [
            column["name"] for column in sa.inspect(engine).get_columns(table)
        ]


# -- ensure_schema: what happens when a ledger opens ---------------------------------


def test_ensure_schema_creates_a_new_ledger_in_an_empty_database(engine: sa.Engine) -> None:
    schema.ensure_schema(engine)

    assert schema.head_revision() == schema.current_revision(engine)
    assert {"prices", "runs", "calls"} <= table_names(engine)


def test_ensure_schema_leaves_a_ledger_at_head_alone(engine: sa.Engine) -> None:
    schema.upgrade(engine)
    with engine.begin() as connection:
        connection.execute(sa.insert(storage.runs), [run_row("r1")])

    schema.ensure_schema(engine)

    assert [schema.head_revision()] == version_rows(engine)
    with engine.connect() as connection:
        assert ["r1"] == list(connection.execute(sa.select(storage.runs.c.id)).scalars())


def test_ensure_schema_refuses_an_older_ledger_and_says_how_to_upgrade(engine: sa.Engine) -> None:
    schema.upgrade(engine, "0001")  # a ledger written before budgets existed
    url = storage.redact_url(engine.url)

    with pytest.raises(SchemaVersionError) as raised:
        schema.ensure_schema(engine)

    assert (
        f"The ledger at {url} is at schema revision 0001; this tokenledger needs "
        f"{schema.head_revision()}. Run `tokenledger db upgrade --db {url}`."
    ) == str(raised.value)
    # And that advice works:
    schema.upgrade(engine)
    schema.ensure_schema(engine)
    assert schema.head_revision() == schema.current_revision(engine)


def test_upgrading_a_filled_ledger_keeps_every_row(engine: sa.Engine) -> None:
    schema.upgrade(engine, "0001")
    with engine.begin() as connection:
        connection.execute(sa.insert(storage.runs), [run_row(f"r{i}") for i in range(25)])

    schema.upgrade(engine)

    with engine.connect() as connection:
        assert (
            25 == connection.execute(sa.select(sa.func.count()).select_from(storage.runs)).scalar()
        )


def test_each_revision_downgrades_cleanly(engine: sa.Engine) -> None:
    schema.upgrade(engine)
    schema.downgrade(engine, "0004")
    assert "ix_runs_root_cost" not in {i["name"] for i in sa.inspect(engine).get_indexes("runs")}
    schema.downgrade(engine, "0003")
    assert "ix_runs_running" not in {i["name"] for i in sa.inspect(engine).get_indexes("runs")}
    schema.downgrade(engine, "0002")
    assert "outcome" not in {c["name"] for c in sa.inspect(engine).get_columns("runs")}
    schema.downgrade(engine, "0001")
    assert "budgets" not in table_names(engine)
    assert {"prices", "runs", "calls"} <= table_names(engine)
    schema.downgrade(engine, "base")
    assert {"tokenledger_alembic_version"} >= table_names(engine)


def test_ensure_schema_refuses_a_ledger_written_by_a_newer_tokenledger(engine: sa.Engine) -> None:
    schema.upgrade(engine)
    with engine.begin() as connection:
        connection.execute(sa.text(f"UPDATE {schema.VERSION_TABLE} SET version_num = 'f00dcafe'"))

    with pytest.raises(SchemaVersionError, match="written by a newer tokenledger") as raised:
        schema.ensure_schema(engine)

    assert "'f00dcafe'" in str(raised.value)
    assert "pip install -U tokenledger" in str(raised.value)
    with pytest.raises(SchemaVersionError, match="newer tokenledger"):
        schema.upgrade(engine)  # and upgrade refuses too, rather than guess


def test_ensure_schema_refuses_ledger_tables_with_no_revision(engine: sa.Engine) -> None:
    """Tables named like ours with no revision: another app's, or a lost version row."""
    storage.metadata.create_all(engine, tables=[storage.runs])

    with pytest.raises(SchemaVersionError, match="has table\\(s\\) runs but no tokenledger"):
        schema.ensure_schema(engine)

    assert {"runs"} == table_names(engine)  # nothing created, nothing dropped


def test_a_version_table_with_two_revisions_is_refused_not_guessed(engine: sa.Engine) -> None:
    schema.upgrade(engine)
    with engine.begin() as connection:
        connection.execute(sa.text(f"INSERT INTO {schema.VERSION_TABLE} VALUES ('0002')"))

    with pytest.raises(SchemaVersionError) as raised:
        schema.current_revision(engine)

    assert (
        f"The ledger at {storage.redact_url(engine.url)} has 2 revisions "
        f"(0002, {schema.head_revision()}) in its {schema.VERSION_TABLE} table; tokenledger "
        "keeps exactly one. Delete the rows of the revisions the ledger is not at."
    ) == str(raised.value)


def test_checking_a_ledger_on_open_does_not_import_alembic(db_url: str, tmp_path: Path) -> None:
    """Every command and Ledger checks the revision on open; Alembic is for migrating."""
    engine = storage.create_engine_for(db_url)
    schema.upgrade(engine)
    engine.dispose()
    code = (
        "import json, sys\n"
        "from tokenledger import _schema as schema, _storage as storage\n"
        "engine = storage.create_engine_for(sys.argv[1])\n"
        "schema.ensure_schema(engine)\n"
        "revision = schema.current_revision(engine)\n"
        "engine.dispose()\n"
        "print(json.dumps([revision, sorted({m.split('.')[0] for m in sys.modules})]))\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", code, db_url],
        cwd=tmp_path,  # the installed package, not the source tree's layout
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    revision, imported = json.loads(done.stdout)

    assert schema.head_revision() == revision
    assert "alembic" not in imported
    assert "mako" not in imported


def unreachable_url(db_url: str, tmp_path: Path) -> str:
    if db_url.startswith("sqlite"):
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        return f"sqlite:///{blocker / 'ledger.db'}"  # its directory is a regular file
    return "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/test"  # nothing listens on 1


def test_ensure_schema_on_an_unreachable_database_names_it_and_the_reason(
    db_url: str, tmp_path: Path, make_engine: Callable[..., sa.Engine]
) -> None:
    engine = make_engine(unreachable_url(db_url, tmp_path))

    with pytest.raises(LedgerError) as raised:
        schema.ensure_schema(engine)

    message = str(raised.value)
    assert "s3cret" not in message
    if engine.dialect.name == "sqlite":
        assert f"Cannot create the ledger file {tmp_path / 'a-file' / 'ledger.db'}: " in message
    else:
        assert message.startswith(
            "Cannot open the ledger at postgresql+psycopg://postgres:***@127.0.0.1:1/test: "
        )
        assert "refused" in message


# -- the column types ---------------------------------------------------------------


def run_row(run_id: str, **values: Any) -> dict[str, Any]:
    row = {
        "id": run_id,
        "name": "agent",
        "parent_id": None,
        "root_id": run_id,
        "tags": {},
        "started_at": dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc),
        "ended_at": None,
        "status": "running",
        "error_type": None,
        "calls": 0,
        "failed_calls": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "cost_usd": Decimal(0),
        "unpriced_calls": 0,
        "trace_id": None,
        "span_id": None,
    }
    row.update(values)
    return row


def price_row(price_id: str, **values: Any) -> dict[str, Any]:
    row = {
        "id": price_id,
        "model": "gpt-4o-mini",
        "provider": "openai",
        "input_per_token": Decimal("0.00000015"),
        "output_per_token": Decimal("0.0000006"),
        "cache_read_per_token": None,
        "cache_write_per_token": None,
        "reasoning_per_token": None,
        "tiers": None,
        "source": "user",
        "created_at": dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc),
    }
    row.update(values)
    return row


def fifteen_digits(amount: Decimal) -> Decimal:
    """``amount`` to the 15 significant digits SQLite keeps."""
    return Decimal(f"{amount:.15g}")


@pytest.mark.parametrize("amount", [Decimal("0.000285"), Decimal("1234.123456789012")])
def test_money_round_trips_exactly_on_postgres_and_to_15_digits_on_sqlite(
    engine: sa.Engine, amount: Decimal
) -> None:
    schema.upgrade(engine)
    with engine.begin() as connection:
        connection.execute(sa.insert(storage.runs), [run_row("r1", cost_usd=amount)])
        stored = connection.execute(sa.select(storage.runs.c.cost_usd)).scalar_one()

    assert isinstance(stored, Decimal)
    if engine.dialect.name == "postgresql":
        assert amount == stored
    else:
        assert fifteen_digits(amount) == fifteen_digits(stored)


def test_per_token_prices_keep_18_decimal_places(engine: sa.Engine) -> None:
    schema.upgrade(engine)
    price = Decimal("0.000000150000000001")  # 12 significant digits: exact on SQLite too
    tiers = [{"above_input_tokens": 200_000, "input_per_token": Decimal("0.0000003")}]
    with engine.begin() as connection:
        connection.execute(
            sa.insert(storage.prices), [price_row("p1", input_per_token=price, tiers=tiers)]
        )
        stored = connection.execute(
            sa.select(storage.prices.c.input_per_token, storage.prices.c.tiers)
        ).one()

    assert (price, [{"above_input_tokens": 200_000, "input_per_token": "0.0000003"}]) == (
        stored.input_per_token,
        stored.tiers,
    )


@pytest.mark.parametrize("amount", [1.5, Decimal("NaN"), Decimal("Infinity")])
def test_money_refuses_floats_and_non_finite_amounts(engine: sa.Engine, amount: Any) -> None:
    schema.upgrade(engine)

    with pytest.raises(sa.exc.StatementError), engine.begin() as connection:
        connection.execute(sa.insert(storage.runs), [run_row("r1", cost_usd=amount)])


def test_datetimes_come_back_timezone_aware_in_utc(engine: sa.Engine) -> None:
    schema.upgrade(engine)
    india = dt.timezone(dt.timedelta(hours=5, minutes=30))
    started = dt.datetime(2025, 3, 4, 10, 0, 0, 123456, tzinfo=india)
    with engine.begin() as connection:
        connection.execute(sa.insert(storage.runs), [run_row("r1", started_at=started)])
        stored = connection.execute(sa.select(storage.runs.c.started_at)).scalar_one()
        in_window = connection.execute(
            sa.select(sa.func.count()).where(
                storage.runs.c.started_at >= dt.datetime(2025, 3, 4, 4, 30, tzinfo=dt.timezone.utc)
            )
        ).scalar_one()

    assert dt.datetime(2025, 3, 4, 4, 30, 0, 123456, tzinfo=dt.timezone.utc) == stored
    assert dt.timedelta(0) == stored.utcoffset()
    assert 1 == in_window


def test_naive_datetimes_are_refused(engine: sa.Engine) -> None:
    schema.upgrade(engine)

    row = run_row("r1", started_at=dt.datetime(2025, 1, 1))  # noqa: DTZ001 - the point

    with pytest.raises(sa.exc.StatementError, match="has no time zone"), engine.begin() as conn:
        conn.execute(sa.insert(storage.runs), [row])


def test_json_none_is_sql_null(engine: sa.Engine) -> None:
    schema.upgrade(engine)
    with engine.begin() as connection:
        connection.execute(sa.insert(storage.prices), [price_row("p1", tiers=None)])
        nulls = connection.execute(
            sa.select(sa.func.count()).where(storage.prices.c.tiers.is_(None))
        ).scalar_one()

    assert 1 == nulls


# -- engines and URLs -----------------------------------------------------------------


def test_a_new_sqlite_ledger_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """SQLite-only: PostgreSQL has no file."""
    path = tmp_path / "new" / "dir" / "ledger.db"
    engine = storage.create_engine_for(f"sqlite:///{path}")
    try:
        schema.ensure_schema(engine)
    finally:
        engine.dispose()

    assert 0o600 == path.stat().st_mode & 0o777
    assert 0o700 == path.parent.stat().st_mode & 0o777
    for sidecar in path.parent.glob("ledger.db-*"):  # -wal and -shm copy the file's mode
        assert 0o600 == sidecar.stat().st_mode & 0o777


def test_sqlite_connections_use_wal_and_a_busy_timeout(tmp_path: Path) -> None:
    engine = storage.create_engine_for(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        with engine.connect() as connection:
            settings = [
                connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            ]
    finally:
        engine.dispose()

    assert ["wal", 1, 30000, 1] == settings


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:pw@db:5432/ledger", "postgresql+psycopg://u:***@db:5432/ledger"),
        ("postgresql://u:pw@db/ledger", "postgresql+psycopg://u:***@db/ledger"),
        ("postgresql+psycopg://db/ledger", "postgresql+psycopg://db/ledger"),
    ],
)
def test_postgres_urls_are_rewritten_to_psycopg(given: str, expected: str) -> None:
    engine = storage.create_engine_for(given)  # connects lazily: nothing is reached

    assert expected == storage.redact_url(engine.url)


def test_a_relative_sqlite_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    assert str(tmp_path / "data" / "x.db") == storage.database_path("sqlite:///data/x.db")


def test_the_default_url_is_the_environment_variable_else_a_file_in_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(storage.DATABASE_URL_ENV, raising=False)

    assert f"sqlite:///{tmp_path / 'tokenledger.db'}" == storage.default_url()
    assert str(tmp_path / "tokenledger.db") == storage.database_path(None)

    monkeypatch.setenv(storage.DATABASE_URL_ENV, "postgresql://u:pw@db/ledger")

    assert "postgresql://u:pw@db/ledger" == storage.default_url()
    assert storage.database_path(None) is None


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://u:hunter2@db:notaport/x", "is not a valid URL"),
        ("not a url at all", "is not a valid URL"),
        ("mysql://u:hunter2@db/x", "uses driver 'mysql', which tokenledger does not support"),
        ("postgresql+asyncpg://u:hunter2@db/x", "uses driver 'postgresql+asyncpg'"),
        ("sqlite://", "is an in-memory SQLite database"),
        ("sqlite:///:memory:", "is an in-memory SQLite database"),
    ],
)
def test_bad_urls_raise_configuration_error_with_the_password_hidden(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(says)) as raised:
        storage.create_engine_for(url)

    assert "hunter2" not in str(raised.value)
    if "valid URL" in says or "driver" in says:
        assert "postgresql://user:password@host:5432/dbname" in str(raised.value)


def test_a_missing_psycopg_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # what find_spec sees when absent

    with pytest.raises(ModuleNotFoundError, match=r"pip install 'tokenledger\[postgres\]'") as e:
        storage.create_engine_for("postgresql://db/ledger")

    assert "psycopg" == e.value.name


def test_redact_url_hides_the_password_even_in_an_unparseable_url() -> None:
    assert "postgresql://u:***@db:nope/x" == storage.redact_url("postgresql://u:hunter2@db:nope/x")
    assert "sqlite:////tmp/x.db" == storage.redact_url("sqlite:////tmp/x.db")


def test_known_revisions_are_every_migration_newest_first() -> None:
    """The constant that opening a ledger checks against, without Alembic, is up to date:
    a new migration must add its revision to `schema.KNOWN_REVISIONS`."""
    from alembic.script import ScriptDirectory

    with schema._alembic_config() as config:
        scripts = ScriptDirectory.from_config(config)
        migrations = [script.revision for script in scripts.walk_revisions()]
        head = scripts.get_current_head()

    assert migrations == list(schema.KNOWN_REVISIONS)
    assert head == schema.head_revision()


def test_the_migrations_ship_inside_the_package() -> None:
    location = Path(str(schema._migrations_location()))

    assert (location / "versions" / "0001_initial.py").is_file()
    assert (location / "env.py").is_file()
    assert (location / "versions" / "0002_budgets.py").is_file()
    assert (location / "versions" / "0003_outcomes_and_tools.py").is_file()
    assert (location / "versions" / "0004_report_indexes.py").is_file()
    assert (location / "versions" / "0005_root_run_costs.py").is_file()
    assert "0005" == schema.head_revision()
    assert os.path.basename(location) == "migrations"
