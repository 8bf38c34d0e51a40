"""`report` runs SQL text from one builder (``tokenledger._report_sql``) on both engines,
and ``tokenledger report`` runs the SQLite text on a SQLite file without SQLAlchemy.

The engines differ in how they bucket times, read tags and bind times, so the same
ledger, written to both, must give the same rows for every way of grouping, window and
attribution. The command's fast path must give the library's rows
and hand every case it does not handle (other URLs, other revisions, broken files) to the
general path, which explains the problem.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import os
import random
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from tokenledger import Ledger, _location, queries
from tokenledger import _schema as schema
from tokenledger import _storage as storage
from tokenledger._money import from_driver
from tokenledger._report_sql import sqlite_timestamp
from tokenledger._reporting import key_text, parse_since
from tokenledger._writer import BatchWriter
from tokenledger.cli import cli
from tokenledger.cli._render import json_default
from tokenledger.pricing import PriceBook
from tokenledger.queries import ReportRow, report
from tokenledger.records import CallRecord, RunRecord, new_id

UTC = dt.timezone.utc
D = Decimal
DAY0 = dt.datetime(2025, 3, 30, 21, 0, tzinfo=UTC)
TAG_KEYS = ("tenant", "tënant", 'we"ird\\key')


def _call(rng: random.Random, run: RunRecord | None, when: dt.datetime) -> CallRecord:
    tool = rng.random() < 0.15
    status = rng.choice(["ok"] * 6 + ["error"])
    model = None if tool else rng.choice(["alpha", "beta", "gamma", None])
    priced = tool or rng.random() < 0.85
    return CallRecord(
        id=new_id(),
        run_id=run.id if run else None,
        root_run_id=run.root_id if run else None,
        operation="execute_tool" if tool else "chat",
        provider=None if tool else rng.choice(["openai", "anthropic", None]),
        requested_model=None if tool else rng.choice(["alpha", "beta-latest"]),
        model=model,
        started_at=when,
        status=status,
        input_tokens=0 if tool else rng.randrange(0, 5000),
        output_tokens=0 if tool else rng.randrange(0, 900),
        cache_read_tokens=0 if tool else rng.randrange(0, 300),
        reasoning_tokens=0 if tool else rng.randrange(0, 200),
        cost_usd=D(rng.randrange(0, 10**6)) / 10**6 if priced else None,
        cost_source="local" if priced else None,
        tool_name=rng.choice(["web_search", "ocr"]) if tool else None,
    )


def write_mixed_ledger(url: str, seed: int = 7) -> None:
    """Root runs over four days and many hours, with sub-agents, tags (odd keys too),
    outcomes, failed and unpriced calls, tool charges, calls outside any run, and one
    root run still running (its stored totals still the zeros of when it started)."""
    rng = random.Random(seed)
    engine = storage.create_engine_for(url)
    schema.ensure_schema(engine)
    writer = BatchWriter(engine)
    try:
        for index in range(40):
            # Roots 0 and 20 start exactly on the bounds of a window in WINDOWS.
            jitter = 0 if index in (0, 20) else rng.randrange(0, 60)
            started = DAY0 + dt.timedelta(minutes=97 * index + jitter)
            running = index == 33
            tags = {key: rng.choice(["acme", "globex"]) for key in TAG_KEYS if rng.random() < 0.6}
            root = _run(rng, None, started, tags, running=running)
            runs = [root]
            if rng.random() < 0.5:
                runs.append(_run(rng, root, started + dt.timedelta(seconds=2), tags={}))
                if rng.random() < 0.5:
                    runs.append(_run(rng, runs[-1], started + dt.timedelta(seconds=3), {}))
            for run in runs:
                for offset in range(rng.randrange(2 if running else 0, 5)):
                    call = _call(rng, run, run.started_at + dt.timedelta(seconds=offset))
                    writer.put_call(call)
                    # A run's totals include its descendants' calls: add to each ancestor,
                    # except a running root, whose row still has the totals of its start.
                    for ancestor in runs[: runs.index(run) + 1]:
                        if not (running and ancestor is root):
                            ancestor.add_call(call)
            for run in runs:
                if not (running and run is root):
                    run.ended_at = run.started_at + dt.timedelta(seconds=30)
                writer.put_run(run)
        for index in range(12):
            when = DAY0 + dt.timedelta(
                hours=7 * index, minutes=rng.randrange(0, 60) if index else 0
            )
            writer.put_call(_call(rng, None, when))
        assert writer.flush()
    finally:
        writer.close()
        engine.dispose()


def _run(
    rng: random.Random,
    parent: RunRecord | None,
    started: dt.datetime,
    tags: dict[str, str],
    *,
    running: bool = False,
) -> RunRecord:
    run_id = new_id()
    return RunRecord(
        id=run_id,
        name=rng.choice(["support", "billing"]) if parent is None else "researcher",
        parent_id=parent.id if parent else None,
        root_id=parent.root_id if parent else run_id,
        tags=tags,
        started_at=started,
        status="running" if running else rng.choice(["ok", "ok", "ok", "error"]),
        outcome=None if running else rng.choice([None, "resolved", "rejected"]),
    )


GROUPINGS = [
    *([name] for name in queries.REPORT_DIMENSIONS),
    *([f"tag:{key}"] for key in TAG_KEYS),
    ["agent", "model"],
    ["model", "day"],
    ["provider", "hour"],
    ["agent", "status", "outcome"],
    ["tag:tënant", "agent", "day"],
    ["hour", 'tag:we"ird\\key', "model"],
    ["tag:absent"],
    ["tag:tenant", "tag:tënant"],
]
WINDOWS = [
    (None, None),
    (DAY0, DAY0 + dt.timedelta(minutes=97 * 20)),  # from root 0 (in) to root 20 (out)
    (DAY0 + dt.timedelta(hours=30), None),
    (DAY0 + dt.timedelta(hours=10), DAY0 + dt.timedelta(hours=40, minutes=17)),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('mixed') / 'ledger.db'}"
    write_mixed_ledger(url)
    return url


@pytest.fixture
def mixed_sqlite(built: str) -> Iterator[sa.Engine]:
    engine = storage.create_engine_for(built)
    yield engine
    engine.dispose()


def test_sqlite_and_postgresql_give_the_same_report_every_way(
    mixed_sqlite: sa.Engine, postgres_url: str
) -> None:
    write_mixed_ledger(postgres_url)
    postgres = storage.create_engine_for(postgres_url)
    compared = 0
    try:
        for by, root_only, (since, until) in itertools.product(GROUPINGS, (True, False), WINDOWS):
            options = {"by": by, "root_only": root_only, "since": since, "until": until}
            on_sqlite = report(mixed_sqlite, **options)
            assert report(postgres, **options) == on_sqlite, options
            compared += len(on_sqlite)
    finally:
        postgres.dispose()
    assert compared > 1000  # the groupings did produce rows to compare


def test_the_mixed_ledger_exercises_what_the_comparison_relies_on(
    mixed_sqlite: sa.Engine,
) -> None:
    """Sub-agents, a running root, every tag key, outside calls and tool charges."""
    with mixed_sqlite.connect() as connection:
        found = connection.exec_driver_sql(
            "SELECT (SELECT count(*) FROM runs WHERE parent_id IS NOT NULL),"
            " (SELECT count(*) FROM runs WHERE status = 'running'),"
            " (SELECT count(*) FROM calls WHERE run_id IS NULL),"
            " (SELECT count(*) FROM calls WHERE operation = 'execute_tool'),"
            " (SELECT count(*) FROM calls WHERE cost_usd IS NULL),"
            " (SELECT count(DISTINCT substr(started_at, 1, 10)) FROM runs)"
        ).one()
    sub_agents, running, outside, tools, unpriced, days = found
    assert min(sub_agents, outside, tools, unpriced) >= 2, found
    assert (1, 4) == (running, days)
    by_tag = {key: report(mixed_sqlite, by=f"tag:{key}") for key in TAG_KEYS}
    assert all({"acme", "globex", None} == {row.key[f"tag:{key}"] for row in rows}
               for key, rows in by_tag.items())  # fmt: skip
    running = report(mixed_sqlite, by="status")
    assert any(row.key["status"] == "running" and row.calls for row in running)


def test_money_reads_a_float_as_the_money_column_type_does() -> None:
    """A cost read raw (the command) and through SQLAlchemy (the library) agree."""
    column = storage.Money()
    dialect = sa.create_engine("sqlite://").dialect
    amounts = (0.1 + 0.2, 1e-13, 0.4951777, 7.0, 2.5e-12, 99999.99 + 23456.78, 8192.000001)
    rng = random.Random(3)
    amounts += tuple(rng.randrange(10**6, 10**13) / 10**6 for _ in range(2000))
    for value in amounts:
        assert column.process_result_value(value, dialect) == from_driver(value), value
    assert D("123456.770000000000") == from_driver(99999.99 + 23456.78)
    assert D("0.300000000000") == from_driver(0.1 + 0.2)
    assert D("1.500000000000") == from_driver(D("1.5")) == from_driver("1.5") == from_driver(1.5)


def test_a_large_cost_is_the_same_in_report_and_in_runs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'large.db'}"
    book = PriceBook(source_map={})
    with Ledger(url, capture=False, price_book=book) as ledger, ledger.run("buy") as run:
        run.charge("contract", usd="99999.99")
        run.charge("contract", usd="23456.78")
    reported = json.loads(invoke("report", "--db", url, "--json").stdout)
    by_tool = json.loads(invoke("report", "--db", url, "--by", "model", "--json").stdout)
    [listed] = json.loads(invoke("runs", "--db", url, "--json").stdout)
    assert "123456.77" == reported[0]["cost_usd"] == by_tool[0]["cost_usd"] == listed["cost_usd"]


def test_sqlite_timestamps_compare_as_the_stored_text() -> None:
    aware = dt.datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert "2025-01-02 01:04:05.000006" == sqlite_timestamp(aware)
    assert "0999-12-31 23:00:00.000000" == sqlite_timestamp(
        dt.datetime(1000, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    )
    assert "2025-01-31" == key_text(parse_since("2025-01-31").date())


# -- the command's fast path ---------------------------------------------------------------


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def expected_json(rows: list[ReportRow]) -> Any:
    text = json.dumps([dataclasses.asdict(row) for row in rows], default=json_default)
    return json.loads(text)


@pytest.fixture
def no_sqlalchemy_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if the command falls back to the SQLAlchemy path."""

    def general_path(*_: Any, **__: Any) -> None:
        raise AssertionError("tokenledger report took the SQLAlchemy path")

    monkeypatch.setattr(queries, "report", general_path)


@pytest.mark.usefixtures("no_sqlalchemy_report")
def test_the_command_reads_a_sqlite_file_directly_with_the_librarys_rows(
    built: str, mixed_sqlite: sa.Engine
) -> None:
    for by, sub_agents, since in itertools.product(
        (["agent"], ["agent", "model"], ["day", "tag:tënant"], ["status"], ["hour"]),
        (False, True),
        (None, "2025-03-31T09:30", "2025-03-31"),
    ):
        args = ["report", "--db", built, "--by", ",".join(by), "--json"]
        args += ["--sub-agents"] if sub_agents else []
        args += ["--since", since] if since else []
        expected = report(mixed_sqlite, by=by, since=since, root_only=not sub_agents)
        assert expected
        assert expected_json(expected) == json.loads(invoke(*args).stdout), args
    # The default URL: $TOKENLEDGER_DATABASE_URL, then ./tokenledger.db.
    from_env = invoke("report", "--json", env={_location.DATABASE_URL_ENV: built})
    assert expected_json(report(mixed_sqlite)) == json.loads(from_env.stdout)
    table = invoke("report", "--db", built, "--by", "agent", "--since", "2025-03-31")
    assert "Cost by agent since 2025-03-31" == table.stdout.splitlines()[0].strip()


@pytest.mark.usefixtures("no_sqlalchemy_report")
def test_an_empty_ledger_and_an_empty_window_say_which_they_are(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    assert 0 == invoke("db", "upgrade", "--db", url).exit_code
    assert "No runs recorded yet" in invoke("report", "--db", url).stdout
    assert [] == json.loads(invoke("report", "--db", url, "--json").stdout)
    write_mixed_ledger(url)
    assert "No runs match these filters." in invoke("report", "--db", url, "--since", "1h").stdout


def test_report_in_a_fresh_process_never_imports_sqlalchemy(built: str, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from tokenledger.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'rich')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "report", "--db", built, "--by", "agent,model"],
        cwd=tmp_path,
        env={**os.environ, "TOKENLEDGER_DATABASE_URL": ""},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    *table, imported = done.stdout.strip().splitlines()
    assert "[]" == imported, done.stderr
    assert any(line.startswith("support ") for line in table), done.stdout


def test_other_urls_and_revisions_take_the_general_path(
    built: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[str] = []
    real_report = report

    def general_path(engine: sa.Engine, **options: Any) -> list[ReportRow]:
        taken.append(str(engine.url))
        return real_report(engine, **options)

    monkeypatch.setattr(queries, "report", general_path)
    # A URL with a query is SQLAlchemy's to parse.
    with_query = invoke("report", "--db", f"{built}?timeout=5", "--json")
    assert 0 == with_query.exit_code
    assert json.loads(with_query.stdout)
    assert 1 == len(taken)
    # A ledger at an older revision: the general path explains the upgrade.
    old = tmp_path / "old.db"
    old.write_bytes(Path(storage.database_path(built) or "").read_bytes())
    with sqlite3.connect(old) as connection:
        connection.execute(f"UPDATE {_location.VERSION_TABLE} SET version_num = '0004'")
    result = CliRunner().invoke(cli, ["report", "--db", f"sqlite:///{old}"])
    assert 1 == result.exit_code
    assert "tokenledger db upgrade" in result.output
    assert 1 == len(taken)  # refused before any query


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"this is not a database at all, just text" * 200, "file is not a database"),
        (b"", "No runs recorded yet"),
    ],
)
def test_a_file_that_is_no_ledger_gets_a_sentence(
    tmp_path: Path, content: bytes, said: str
) -> None:
    path = tmp_path / "ledger.db"
    path.write_bytes(content)
    result = CliRunner().invoke(cli, ["report", "--db", f"sqlite:///{path}"])
    assert said in result.output
    assert isinstance(result.exception, (SystemExit, type(None))), result.exception
    assert content == path.read_bytes()  # reading never writes


def test_a_missing_file_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.db"
    result = CliRunner().invoke(cli, ["report", "--db", f"sqlite:///{path}"])
    assert 1 == result.exit_code
    assert f"The ledger {path} does not exist" in result.output
    assert not path.exists()


@pytest.mark.usefixtures("no_sqlalchemy_report")
def test_sqlite_failing_mid_report_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.db"
    write_mixed_ledger(f"sqlite:///{path}")
    with sqlite3.connect(path) as connection:
        connection.execute("DROP TABLE calls")
    result = CliRunner().invoke(cli, ["report", "--db", f"sqlite:///{path}", "--by", "model"])
    assert 1 == result.exit_code
    assert f"Error: The database at {path} failed: no such table: calls\n" == result.output


@pytest.mark.usefixtures("no_sqlalchemy_report")
def test_a_locked_ledger_is_reported_once_after_the_busy_timeout(
    built: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "locked.db"
    path.write_bytes(Path(storage.database_path(built) or "").read_bytes())
    monkeypatch.setattr(_location, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE runs SET name = name")
        result = CliRunner().invoke(cli, ["report", "--db", f"sqlite:///{path}"])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert 1 == result.exit_code
    assert f"Error: The database at {path} failed: database is locked\n" == result.output


@pytest.mark.usefixtures("no_sqlalchemy_report")
def test_a_path_that_is_not_utf8_is_read_directly(built: str, tmp_path: Path) -> None:
    directory = tmp_path / os.fsdecode(b"caf\xe9")
    directory.mkdir()
    path = directory / "ledger.db"
    path.write_bytes(Path(storage.database_path(built) or "").read_bytes())
    result = invoke("report", "--db", f"sqlite:///{path}", "--json")
    assert 0 == result.exit_code
    assert json.loads(result.stdout)
