"""What a newcomer meets first: the demo's own ledger, ``--db`` with a file path (before
or after the command), the README's commands as written, and ledgers on read-only
media."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from tokenledger import Ledger
from tokenledger import _storage as storage
from tokenledger._demo import DEMO_TAGS
from tokenledger.cli import cli
from tokenledger.cli.demo import DEMO_FILENAME
from tokenledger.pricing import PriceBook

README = Path(__file__).resolve().parents[2] / "README.md"


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def record(url: str) -> None:
    """A triage run with a researcher sub-run and a call each, in tenant acme."""
    with Ledger(url, capture=False, price_book=PriceBook(source_map={})) as ledger:
        ledger.set_price("alpha", input_per_million="1", output_per_million="2")
        with ledger.run("triage", tags={"tenant": "acme"}):
            ledger.record_call("alpha", input_tokens=1000, output_tokens=100)
            with ledger.run("researcher"):
                ledger.record_call("alpha", input_tokens=2000, output_tokens=500)


def snapshot(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the SQLite file, read without tokenledger."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [
            name
            for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        return {
            name: sorted(map(tuple, connection.execute(f'SELECT * FROM "{name}"')), key=repr)
            for name in names
        }
    finally:
        connection.close()


# -- 1. the demo writes its own ledger ----------------------------------------------------


@pytest.mark.slow
def test_demo_leaves_the_configured_ledger_and_its_budgets_alone(tmp_path: Path) -> None:
    """`tokenledger demo` with $TOKENLEDGER_DATABASE_URL naming a real ledger that has a
    `tenant:acme` budget (the demo's tenants include acme): that ledger is untouched."""
    real = tmp_path / "real.db"
    record(f"sqlite:///{real}")
    with Ledger(f"sqlite:///{real}", capture=False) as ledger:
        ledger.set_budget("tenant:acme", usd="100", per="month")
        ledger.set_budget("global", usd="100", per="day")
    before = snapshot(real)
    assert before["budgets"]
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, storage.DATABASE_URL_ENV: f"sqlite:///{real}"}

    done = subprocess.run(
        [sys.executable, "-m", "tokenledger.cli", "demo", "--runs", "3"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert 0 == done.returncode, done.stderr
    assert before == snapshot(real)
    demo_file = work / DEMO_FILENAME
    assert f"Ledger: {demo_file}" in done.stdout
    assert f"--db {DEMO_FILENAME}" in done.stdout  # the commands it suggests work here
    runs = snapshot(demo_file)["runs"]
    assert 6 == len(runs)  # 3 tickets, each with a researcher sub-run


def test_every_demo_run_is_tagged_as_the_demo(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(storage.DATABASE_URL_ENV, raising=False)
    assert 0 == invoke("demo", "--runs", "2").exit_code
    listed = json.loads(invoke("runs", "--json", "--db", DEMO_FILENAME).stdout)
    assert 4 == len(listed)
    assert all(DEMO_TAGS.items() <= run["tags"].items() for run in listed)
    assert not (tmp_path / "tokenledger.db").exists()


def test_demo_help_names_its_own_default_ledger() -> None:
    text = " ".join(invoke("demo", "--help").output.split())
    assert "Default: ./tokenledger-demo.db, never $TOKENLEDGER_DATABASE_URL" in text


def test_demo_writes_where_db_says_before_or_after_the_command(tmp_path: Path) -> None:
    after, before = tmp_path / "after.db", tmp_path / "before.db"
    assert 0 == invoke("demo", "--runs", "1", "--db", str(after)).exit_code
    assert 0 == invoke("--db", str(before), "demo", "--runs", "1").exit_code
    assert 2 == len(snapshot(after)["runs"]) == len(snapshot(before)["runs"])


def test_demo_records_outcomes_for_economics(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    assert 0 == invoke("demo", "--db", url).exit_code
    [row] = json.loads(invoke("economics", "--success", "resolved", "--json", "--db", url).stdout)
    assert 0 < row["successes"] < row["runs"] == 20


# -- 2. --db takes a file path, before or after the command ------------------------------

READING = [
    ["runs"],
    ["calls"],
    ["report"],
    ["outcomes"],
    ["economics"],
    ["export"],
    ["forecast", "--runs-per-day", "10"],
    ["reprice", "--as", "alpha"],
    ["breakeven", "--revenue-per-success", "1"],
    ["status"],
    ["budgets"],
    ["db", "current"],
    ["path"],
]


@pytest.fixture
def ledger_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.db"
    record(f"sqlite:///{path}")
    return path


@pytest.mark.parametrize("command", READING, ids=" ".join)
def test_db_takes_a_relative_path(
    ledger_file: Path, command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ledger_file.parent)
    result = invoke(*command, "--db", ledger_file.name)
    assert 0 == result.exit_code, result.output
    assert "not a valid URL" not in result.output


@pytest.mark.parametrize("command", READING, ids=" ".join)
def test_db_before_the_command_names_the_ledger(ledger_file: Path, command: list[str]) -> None:
    result = invoke("--db", str(ledger_file), *command, env={storage.DATABASE_URL_ENV: None})
    assert 0 == result.exit_code, result.output
    assert "does not exist" not in result.output


def test_db_after_the_command_wins(ledger_file: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    assert (
        str(ledger_file)
        == invoke("--db", str(missing), "path", "--db", str(ledger_file)).stdout.strip()
    )
    result = invoke("--db", str(missing), "runs", "--json", "--db", str(ledger_file))
    assert 2 == len(json.loads(result.stdout))
    assert not missing.exists()


def test_db_expands_the_home_directory(ledger_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(ledger_file.parent))
    result = invoke("report", "--json", "--db", f"~/{ledger_file.name}")
    assert 0 == result.exit_code, result.output
    assert str(ledger_file) == invoke("path", "--db", f"~/{ledger_file.name}").stdout.strip()


@pytest.mark.parametrize("name", ["plain.db", "with space.db", "odd?name#%20.db", "ünï.db"])
def test_what_path_prints_round_trips_into_db(tmp_path: Path, name: str) -> None:
    """`tokenledger path` output names the same ledger when given back to --db,
    whatever characters the file's name holds, for reading and writing commands."""
    directory = tmp_path / "ledgers dir"
    directory.mkdir()
    created = invoke("db", "upgrade", "--db", str(directory / name))
    assert 0 == created.exit_code, created.output
    assert [name] == os.listdir(directory)
    printed = invoke("path", "--db", str(directory / name)).stdout.strip()
    assert str(directory / name) == printed
    assert 0 == invoke("budgets", "set", "user:42", "--usd", "5", "--db", printed).exit_code
    budgets = json.loads(invoke("budgets", "--json", "--db", printed).stdout)
    assert ["user:42"] == [budget["scope"] for budget in budgets]
    assert [name] == [
        entry for entry in os.listdir(directory) if not entry.endswith(("-wal", "-shm"))
    ]


def test_db_takes_a_sqlite_file_uri_and_finds_its_file(ledger_file: Path) -> None:
    uri = f"sqlite:///file:{ledger_file}?mode=ro&uri=true"
    assert str(ledger_file) == invoke("path", "--db", uri).stdout.strip()
    result = invoke("runs", "--json", "--db", uri)
    assert 0 == result.exit_code, result.output
    assert 2 == len(json.loads(result.stdout))


def leaf_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from leaf_commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


def test_every_command_takes_db() -> None:
    """The README's promise: --db works on every command."""
    commands = list(leaf_commands(cli))
    assert len(commands) > 15
    for path in commands:
        command: click.Command = cli
        for name in path:
            assert isinstance(command, click.Group)
            command = command.commands[name]
        assert any("--db" in param.opts for param in command.params), path


# -- 3. the README's commands, as written ------------------------------------------------


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def shell_blocks(section: str) -> list[list[str]]:
    return [block.strip().splitlines() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_readme_setup_is_two_commands_the_first_running_the_demo() -> None:
    blocks = shell_blocks(readme_section("Set up"))
    assert [1, 1] == [len(block) for block in blocks]
    assert blocks[0][0].endswith("&& tokenledger demo")
    assert blocks[1][0].endswith("&& pytest")
    assert f"`./{DEMO_FILENAME}`" in readme_section("Set up")


def readme_cli_commands() -> list[list[str]]:
    [block] = shell_blocks(readme_section("CLI"))
    commands = [shlex.split(line, comments=True) for line in block]
    assert all(words[0] == "tokenledger" for words in commands), block
    return [words[1:] for words in commands]


def test_readme_cli_commands_run_as_written_after_the_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every `tokenledger ...` line of the README's CLI block, in order, in a fresh
    directory with no $TOKENLEDGER_DATABASE_URL: each succeeds, and after the demo each
    that reads a ledger reads the demo's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(storage.DATABASE_URL_ENV, raising=False)
    commands = readme_cli_commands()
    assert ["demo"] == commands[0]
    for words in commands:
        result = invoke(*words)
        assert 0 == result.exit_code, (words, result.output)
        if words[0] in ("runs", "calls", "report", "outcomes", "economics", "status"):
            assert "No runs" not in result.output, words
    assert (tmp_path / "calls.csv").stat().st_size > 0


def commands_without_option(text: str, option: str) -> list[tuple[str, str]]:
    """(command, line) for each command a line of ``text`` that mentions ``option``
    names, and which does not take it."""
    missing = []
    for line in text.splitlines():
        if option not in line:
            continue
        for name in re.findall(r"(?<![-.\w])([a-z]+)(?![-.\w])", line):
            command = cli.commands.get(name)
            if command is not None and not any(option in p.opts for p in command.params):
                missing.append((name, line))
    return missing


def test_readme_names_root_only_only_with_commands_that_take_it() -> None:
    """Every command named on a README line that mentions --root-only takes it (the
    README once said `runs --root-only  # ...; calls, report, outcomes likewise`)."""
    assert [] == commands_without_option(README.read_text(encoding="utf-8"), "--root-only")
    old_line = "tokenledger runs --root-only   # newest runs; calls, report, outcomes likewise"
    assert ["calls", "report", "outcomes"] == [
        name for name, _ in commands_without_option(old_line, "--root-only")
    ]


# -- 4. a ledger on read-only media ------------------------------------------------------


@contextlib.contextmanager
def read_only_mount(source: Path, target: Path) -> Iterator[Path]:
    """``source`` mounted read-only at ``target``: the kernel refuses writes there even
    to root, whom permission bits would not stop."""
    target.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-o", "bind,ro", str(source), str(target)],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("no `mount` command here, so no read-only media to test with")
    if done.returncode != 0:
        pytest.skip(f"cannot make a read-only mount here: {done.stderr.strip()}")
    try:
        probe = target / f"probe-{uuid.uuid4().hex}"
        with pytest.raises(OSError, match=r"[Rr]ead-only"):
            probe.touch()
        yield target
    finally:
        if subprocess.run(["umount", str(target)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture
def read_only_ledger(tmp_path: Path) -> Iterator[Path]:
    """A ledger (closed, WAL checkpointed: no -wal or -shm file) on a read-only mount."""
    source = tmp_path / "media"
    source.mkdir()
    record(f"sqlite:///{source / 'ledger.db'}")
    assert ["ledger.db"] == os.listdir(source)
    with read_only_mount(source, tmp_path / "ro") as mounted:
        yield mounted / "ledger.db"


@pytest.mark.parametrize("command", READING, ids=" ".join)
def test_reading_commands_read_a_ledger_on_read_only_media(
    read_only_ledger: Path, command: list[str]
) -> None:
    # A URL, as before --db took paths: this is about the media, not the spelling.
    result = invoke(*command, "--db", f"sqlite:///{read_only_ledger}")
    assert 0 == result.exit_code, result.output
    assert os.listdir(read_only_ledger.parent) == ["ledger.db"]


def test_listings_on_read_only_media_show_what_is_recorded(read_only_ledger: Path) -> None:
    url = f"sqlite:///{read_only_ledger}"
    runs = json.loads(invoke("runs", "--json", "--db", url).stdout)
    assert {"triage", "researcher"} == {run["name"] for run in runs}
    report = json.loads(invoke("report", "--json", "--db", url).stdout)
    assert ["triage"] == [row["key"]["agent"] for row in report]
    status = json.loads(invoke("status", "--json", "--db", url).stdout)
    assert (2, 2) == (status["runs"], status["calls"])


def test_report_reads_read_only_media_without_sqlalchemy(
    read_only_ledger: Path, tmp_path: Path
) -> None:
    """The fast path of `report` (sqlite3 alone) reads read-only media too."""
    code = (
        "import json, sys\n"
        "from tokenledger.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "finally:\n"
        "    print(json.dumps('sqlalchemy' in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "report", "--json", "--db", f"sqlite:///{read_only_ledger}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 == done.returncode, done.stderr
    assert ["triage"] == [row["key"]["agent"] for row in json.loads(done.stdout)]
    assert json.loads(done.stderr.strip().splitlines()[-1]) is False


def test_writing_to_read_only_media_is_a_one_line_error(read_only_ledger: Path) -> None:
    url = f"sqlite:///{read_only_ledger}"
    result = invoke("budgets", "set", "user:42", "--usd", "5", "--db", url)
    assert 1 == result.exit_code
    assert "Traceback" not in result.output
    assert result.output.startswith("Error: ")


@pytest.fixture
def immutable_ledger(ledger_file: Path) -> Iterator[Path]:
    """A ledger file marked immutable (chattr +i) in a writable directory: not even
    root may write it."""
    try:
        done = subprocess.run(
            ["chattr", "+i", str(ledger_file)], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        pytest.skip("no `chattr` command here, so no immutable file to test with")
    if done.returncode != 0:
        pytest.skip(f"cannot mark a file immutable here: {done.stderr.strip()}")
    try:
        yield ledger_file
    finally:
        subprocess.run(["chattr", "-i", str(ledger_file)], check=False)


@pytest.mark.parametrize("command", [["report"], ["runs"], ["status"], ["budgets"]], ids=" ".join)
def test_reading_commands_read_an_immutable_ledger_file(
    immutable_ledger: Path, command: list[str]
) -> None:
    result = invoke(*command, "--db", str(immutable_ledger))
    assert 0 == result.exit_code, result.output


def test_report_on_a_file_path_before_the_command_needs_no_sqlalchemy(
    ledger_file: Path, tmp_path: Path
) -> None:
    """The start-up fast path holds for --db given as a path, before the command."""
    code = (
        "import json, sys\n"
        "from tokenledger.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "finally:\n"
        "    print(json.dumps('sqlalchemy' in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "--db", ledger_file.name, "report", "--json"],
        cwd=ledger_file.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 == done.returncode, done.stderr
    assert ["triage"] == [row["key"]["agent"] for row in json.loads(done.stdout)]
    assert json.loads(done.stderr.strip().splitlines()[-1]) is False
