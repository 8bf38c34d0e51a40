"""Shared fixtures: every storage test runs against SQLite and PostgreSQL.

``db_url`` gives each test a fresh, empty database on each engine:

- ``sqlite``: a file in the test's ``tmp_path``.
- ``postgres``: a new schema ``tl_<random>`` in the server named by
  ``TOKENLEDGER_TEST_POSTGRES_URL`` (default: the local server, database ``test``). The
  URL carries ``options=-csearch_path=tl_<random>``, so every table, Alembic's version
  table included, lands in that schema; it is dropped after the test.

When PostgreSQL cannot be reached the ``postgres`` variants are skipped, or fail when
``CI=true``: CI must never pass by skipping half the suite.
"""

from __future__ import annotations

import os

# Tests never touch the internet: litellm must use its bundled price map.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# A test that makes the writer spill must never write into the user's ~/.cache.
os.environ.setdefault("TOKENLEDGER_SPOOL_DIR", __import__("tempfile").mkdtemp(prefix="tl-spool-"))

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tokenledger import _storage as storage

DEFAULT_TEST_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _postgres_admin_url() -> str:
    return os.environ.get("TOKENLEDGER_TEST_POSTGRES_URL", DEFAULT_TEST_POSTGRES_URL)


@pytest.fixture(scope="session")
def postgres_admin_engine() -> Iterator[sa.Engine | str]:
    """An engine on the test server, or the reason it is unreachable (checked once)."""
    url = _postgres_admin_url()
    engine = sa.create_engine(
        storage.normalize_url(url), poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 5}
    )
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except Exception as exc:
        engine.dispose()
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        yield (
            f"PostgreSQL at {storage.redact_url(url)} is unreachable: {reason}; "
            "set TOKENLEDGER_TEST_POSTGRES_URL or start it"
        )
        return
    yield engine
    engine.dispose()


def _postgres_schema_url(admin: sa.Engine) -> Iterator[str]:
    schema = f"tl_{uuid.uuid4().hex[:12]}"
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = storage.normalize_url(_postgres_admin_url()).update_query_dict(
        {"options": f"-csearch_path={schema}"}
    )
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql("SET LOCAL lock_timeout = '30s'")
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    postgres_admin_engine: sa.Engine | str,
) -> Iterator[str]:
    """The URL of a fresh, empty database: a SQLite file, or a PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    yield from _postgres_schema_url(_reachable(postgres_admin_engine))


@pytest.fixture
def postgres_url(postgres_admin_engine: sa.Engine | str) -> Iterator[str]:
    """The URL of a fresh PostgreSQL schema, for tests that compare the two engines."""
    yield from _postgres_schema_url(_reachable(postgres_admin_engine))


def _reachable(postgres_admin_engine: sa.Engine | str) -> sa.Engine:
    """The admin engine; the test skips (fails under CI) when the server is unreachable."""
    if isinstance(postgres_admin_engine, str):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(postgres_admin_engine)
        pytest.skip(postgres_admin_engine)
    return postgres_admin_engine


@pytest.fixture
def make_engine(db_url: str) -> Iterator[Callable[..., sa.Engine]]:
    """Make engines for ``db_url`` (or another URL); all are disposed after the test.

    Disposal comes before ``db_url`` drops the PostgreSQL schema, so no pooled
    connection is left holding it.
    """
    engines: list[sa.Engine] = []

    def make(url: str | None = None) -> sa.Engine:
        engine = storage.create_engine_for(db_url if url is None else url)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def engine(make_engine: Callable[..., sa.Engine]) -> sa.Engine:
    """An engine on the test's fresh, empty database (no schema yet)."""
    return make_engine()


# -- ledgers and spans ------------------------------------------------------------------
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

from tokenledger import Ledger  # noqa: E402

_SPANS = InMemorySpanExporter()


@pytest.fixture(scope="session", autouse=True)
def _tracer_provider() -> None:
    """One SDK tracer provider for the session (OpenTelemetry allows setting it once)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_SPANS))
    trace.set_tracer_provider(provider)


@pytest.fixture
def span_exporter() -> Iterator[InMemorySpanExporter]:
    """The spans finished during the test."""
    _SPANS.clear()
    yield _SPANS
    _SPANS.clear()


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    """A capturing ledger on a fresh database (SQLite and PostgreSQL)."""
    with Ledger(db_url) as instance:
        yield instance


@pytest.fixture(autouse=True)
def _fresh_unpriced_warnings() -> None:
    """The unpriced-model warning is once per process; each test starts afresh."""
    from tokenledger import pricing

    pricing._warned.clear()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs PostgreSQL, so ``-m "not postgres"`` selects the rest.

    A test needs it when it takes the ``postgres_url`` fixture or runs as the
    ``postgres`` variant of ``db_url``.
    """
    for item in items:
        callspec = getattr(item, "callspec", None)
        fixtures = getattr(item, "fixturenames", ())
        on_postgres = "postgres_url" in fixtures or (
            callspec is not None and callspec.params.get("db_url") == "postgres"
        )
        if on_postgres:
            item.add_marker(pytest.mark.postgres)
