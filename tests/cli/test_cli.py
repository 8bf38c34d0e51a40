"""The ``tokenledger`` command: exit codes, ``--json`` shapes and error messages."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.text import Text

from tokenledger import Ledger
from tokenledger import _schema as schema
from tokenledger import _storage as storage
from tokenledger.cli import _render, cli
from tokenledger.cli.reports import REPORT_CAPTION, report_table
from tokenledger.pricing import PriceBook
from tokenledger.queries import report

UNREACHABLE = "postgresql+psycopg://postgres@127.0.0.1:1/x"
HEAD = schema.head_revision()


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def as_json(result: Result) -> Any:
    assert 0 == result.exit_code, result.output
    return json.loads(result.stdout)


class Recorded:
    """Two triage runs (one with a researcher sub-run) and a billing run."""

    def __init__(self, db_url: str) -> None:
        self.url = db_url
        book = PriceBook(source_map={})
        with Ledger(db_url, capture=False, price_book=book) as ledger:
            ledger.set_price("alpha", input_per_million="1", output_per_million="2")
            ledger.set_price("beta", input_per_million="3", output_per_million="15")
            with ledger.run("triage", tags={"tenant": "acme"}) as self.first:
                ledger.record_call("alpha", input_tokens=1000, output_tokens=100)  # 0.0012
                with ledger.run("researcher") as self.researcher:
                    ledger.record_call("beta", input_tokens=2000, output_tokens=500)  # 0.0135
            with ledger.run("triage") as self.second:
                ledger.record_call("alpha", input_tokens=500, output_tokens=50)  # 0.0006
                ledger.record_call("alpha", status="error", error_type="RateLimitError")
            with ledger.run("billing") as self.billing:
                ledger.record_call("beta", input_tokens=100, output_tokens=10)  # 0.00045

    def run(self, *args: str) -> Result:
        return invoke(*args, "--db", self.url)


@pytest.fixture
def recorded(db_url: str) -> Recorded:
    return Recorded(db_url)


@pytest.fixture
def empty(db_url: str) -> str:
    """A ledger at the current schema revision with nothing in it."""
    assert 0 == invoke("db", "upgrade", "--db", db_url).exit_code
    return db_url


# -- help and path -----------------------------------------------------------------------


def test_help_lists_every_command() -> None:
    result = invoke("--help")
    assert 0 == result.exit_code
    for command in ("demo", "path", "runs", "calls", "report", "status", "db"):
        assert f"  {command} " in result.output
    assert "--db PATH|URL" in invoke("runs", "--help").output


def test_path_prints_the_sqlite_file_or_the_url(db_url: str) -> None:
    result = invoke("path", "--db", db_url)
    assert 0 == result.exit_code
    expected = storage.database_path(db_url) or storage.redact_url(db_url)
    assert expected == result.stdout.strip()


def test_path_hides_a_password() -> None:
    result = invoke("path", "--db", "postgresql://ledger:s3cret@db.internal/ledger")
    assert "postgresql://ledger:***@db.internal/ledger" == result.stdout.strip()
    assert "s3cret" not in result.output


def test_path_defaults_to_the_environment_then_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_env = invoke("path", env={storage.DATABASE_URL_ENV: f"sqlite:///{tmp_path}/env.db"})
    assert f"{tmp_path}/env.db" == from_env.stdout.strip()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(storage.DATABASE_URL_ENV, raising=False)
    result = invoke("path")
    assert str(tmp_path / "tokenledger.db") == result.stdout.strip()
    assert not (tmp_path / "tokenledger.db").exists()


# -- db ----------------------------------------------------------------------------------


def test_db_upgrade_current_and_downgrade_print_revisions(db_url: str) -> None:
    upgraded = invoke("db", "upgrade", "--db", db_url)
    assert 0 == upgraded.exit_code
    assert f"from none (empty) to {HEAD}." in upgraded.output
    assert f"already at revision {HEAD}" in invoke("db", "upgrade", "--db", db_url).output
    current = invoke("db", "current", "--db", db_url)
    assert (0, f"current: {HEAD}\nhead:    {HEAD} (up to date)\n") == (
        current.exit_code,
        current.output,
    )
    downgraded = invoke("db", "downgrade", "--revision", "base", "--db", db_url)
    assert 0 == downgraded.exit_code
    assert f"from {HEAD} to none (empty)." in downgraded.output
    assert "current: none (empty)" in invoke("db", "current", "--db", db_url).output


def test_db_downgrade_needs_a_revision(db_url: str) -> None:
    result = invoke("db", "downgrade", "--db", db_url)
    assert 2 == result.exit_code
    assert "--revision" in result.output


def test_db_stamp_records_a_revision(empty: str) -> None:
    assert 0 == invoke("db", "stamp", "base", "--db", empty).exit_code
    result = invoke("db", "stamp", HEAD, "--db", empty)
    assert (0, True) == (result.exit_code, f"to {HEAD}." in result.output)


# -- runs, calls, report, status ---------------------------------------------------------


def test_runs_json_lists_runs_newest_first(recorded: Recorded) -> None:
    runs = as_json(recorded.run("runs", "--json"))
    assert ["billing", "triage", "researcher", "triage"] == [run["name"] for run in runs]
    first = runs[-1]
    assert (recorded.first.id, None, {"tenant": "acme"}, "ok", 2) == (
        first["id"],
        first["parent_id"],
        first["tags"],
        first["status"],
        first["calls"],
    )
    assert Decimal("0.0147") == Decimal(first["cost_usd"])
    assert isinstance(first["cost_usd"], str)  # exact, never a float
    assert first["started_at"].endswith("+00:00")


def test_runs_filters_by_agent_root_and_count(recorded: Recorded) -> None:
    triage = as_json(recorded.run("runs", "--json", "--agent", "triage"))
    assert [recorded.second.id, recorded.first.id] == [run["id"] for run in triage]
    roots = as_json(recorded.run("runs", "--json", "--root-only"))
    assert recorded.researcher.id not in [run["id"] for run in roots]
    assert 1 == len(as_json(recorded.run("runs", "--json", "-n", "1")))
    assert 4 == len(as_json(recorded.run("runs", "--json", "-n", "0", "--since", "1h")))


def test_runs_prints_a_table(recorded: Recorded) -> None:
    result = recorded.run("runs")
    assert 0 == result.exit_code
    assert recorded.first.id in result.output
    assert "researcher" in result.output
    assert "$0.0147" in result.output


def test_calls_json_lists_calls_with_their_agent(recorded: Recorded) -> None:
    calls = as_json(recorded.run("calls", "--json", "--run", recorded.first.id))
    assert [("researcher", "beta"), ("triage", "alpha")] == [
        (call["agent"], call["model"]) for call in calls
    ]
    assert {"0.0135", "0.0012"} == {str(Decimal(call["cost_usd"])) for call in calls}
    assert {"input_tokens", "cache_read_tokens", "streamed", "latency_ms"} <= set(calls[0])


def test_calls_filter_by_model_and_print_a_table(recorded: Recorded) -> None:
    betas = as_json(recorded.run("calls", "--json", "-m", "beta"))
    assert [recorded.billing.id, recorded.first.id] == [call["root_run_id"] for call in betas]
    table = recorded.run("calls")
    assert 0 == table.exit_code
    assert "RateLimitError" in table.output


def test_report_json_groups_by_agent_and_model(recorded: Recorded) -> None:
    rows = as_json(recorded.run("report", "--json", "--by", "agent,model"))
    assert [
        ({"agent": "triage", "model": "beta"}, 1, 1, "0.0135"),
        ({"agent": "triage", "model": "alpha"}, 2, 3, "0.0018"),
        ({"agent": "billing", "model": "beta"}, 1, 1, "0.00045"),
    ] == [(row["key"], row["runs"], row["calls"], row["cost_usd"]) for row in rows]
    assert {"input_tokens", "output_tokens", "cache_read_tokens", "unpriced_calls"} <= set(rows[0])


def test_report_defaults_to_root_agents_and_can_split_sub_agents(recorded: Recorded) -> None:
    by_root = as_json(recorded.run("report", "--json"))
    assert [("triage", "0.0153"), ("billing", "0.00045")] == [
        (row["key"]["agent"], row["cost_usd"]) for row in by_root
    ]
    by_run = as_json(recorded.run("report", "--json", "--sub-agents"))
    assert [("researcher", "0.0135"), ("triage", "0.0018"), ("billing", "0.00045")] == [
        (row["key"]["agent"], row["cost_usd"]) for row in by_run
    ]


def test_report_prints_a_table_with_a_total(recorded: Recorded) -> None:
    result = recorded.run("report", "--by", "model", "--since", "7d")
    assert 0 == result.exit_code
    assert "Cost by model since 7d" in result.output
    assert "Total" in result.output
    assert "$0.0018" in result.output  # alpha: 0.0012 + 0.0006
    assert "$0.0158" in result.output  # the total, 0.01575, to 4 places


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["runs", "--agent", "nobody"], "No runs match these filters."),
        (["calls", "-m", "gpt-nothing"], "No calls match these filters."),
        (["report", "--since", "2999-01-01"], "No runs match these filters."),
    ],
)
def test_filters_that_match_nothing_say_so(
    recorded: Recorded, command: list[str], message: str
) -> None:
    result = recorded.run(*command)
    assert (0, message) == (result.exit_code, result.output.strip())


def test_status_json_reports_revision_and_counts(recorded: Recorded) -> None:
    info = as_json(recorded.run("status", "--json"))
    assert (HEAD, HEAD, True, 4, 3, 5, 1, "0.01575") == (
        info["revision"],
        info["head_revision"],
        info["up_to_date"],
        info["runs"],
        info["root_runs"],
        info["calls"],
        info["failed_calls"],
        info["cost_usd"],
    )
    assert info["last_call_at"].endswith("+00:00")
    assert storage.redact_url(recorded.url) == info["url"]


def test_status_prints_a_summary(recorded: Recorded) -> None:
    result = recorded.run("status")
    assert 0 == result.exit_code
    assert f"{HEAD} (up to date)" in result.output
    assert "4 (3 root runs)" in result.output


# -- an empty ledger ---------------------------------------------------------------------

NO_RUNS = "No runs recorded yet. Try `tokenledger demo`."


@pytest.mark.parametrize("command", [["runs"], ["calls"], ["report"], ["status"]])
def test_an_empty_ledger_says_so_and_succeeds(empty: str, command: list[str]) -> None:
    result = invoke(*command, "--db", empty)
    assert (0, True) == (result.exit_code, NO_RUNS in result.output)


@pytest.mark.parametrize("command", ["runs", "calls", "report"])
def test_an_empty_ledger_is_an_empty_json_array(empty: str, command: str) -> None:
    assert [] == as_json(invoke(command, "--json", "--db", empty))


def test_a_database_without_a_ledger_yet_is_an_empty_ledger(db_url: str) -> None:
    path = storage.database_path(db_url)
    if path is not None:
        Path(path).touch()  # an empty SQLite file
    result = invoke("runs", "--db", db_url)
    assert (0, NO_RUNS) == (result.exit_code, result.output.strip())
    assert "none yet" in invoke("status", "--db", db_url).output


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [["runs"], ["calls"], ["report"], ["status"], ["db", "current"]]
)
def test_a_missing_sqlite_file_is_an_error_and_is_not_created(
    tmp_path: Path, command: list[str]
) -> None:
    missing = tmp_path / "nowhere" / "ledger.db"
    result = invoke(*command, "--db", f"sqlite:///{missing}")
    assert 1 == result.exit_code
    assert f"The ledger {missing} does not exist." in result.output
    assert not missing.parent.exists()


@pytest.mark.parametrize(
    "command", [["runs"], ["calls"], ["report"], ["status"], ["db", "current"], ["db", "upgrade"]]
)
def test_an_unreachable_database_is_a_one_line_error(command: list[str]) -> None:
    result = invoke(*command, "--db", UNREACHABLE)
    assert 1 == result.exit_code
    assert result.output.startswith("Error: ")
    assert "127.0.0.1:1" in result.output
    assert "refused" in result.output  # the driver's reason
    assert "Traceback" not in result.output


def test_a_ledger_at_an_unknown_revision_is_refused_with_the_fix(empty: str) -> None:
    engine = storage.create_engine_for(empty)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(f"UPDATE {schema.VERSION_TABLE} SET version_num = '9999'"))
    finally:
        engine.dispose()
    result = invoke("runs", "--db", empty)
    assert 1 == result.exit_code
    assert "schema revision '9999'" in result.output
    assert "pip install -U tokenledger" in result.output
    status = invoke("status", "--db", empty)
    assert (0, True) == (status.exit_code, "pip install -U tokenledger" in status.output)


def test_a_ledger_whose_revision_was_lost_is_refused(recorded: Recorded) -> None:
    assert 0 == recorded.run("db", "stamp", "base").exit_code
    result = recorded.run("runs")
    assert 1 == result.exit_code
    assert f"tokenledger db stamp {HEAD}" in result.output


@pytest.mark.parametrize("command", ["runs", "calls", "report"])
def test_a_bad_since_is_a_usage_error_naming_it(empty: str, command: str) -> None:
    result = invoke(command, "--since", "yesterday", "--db", empty)
    assert 2 == result.exit_code
    assert "Invalid value for '--since': 'yesterday' is not a time" in result.output
    assert "7d" in result.output


@pytest.mark.parametrize("by", ["colour", "agent,tenant", "agent,agent", ""])
def test_a_bad_by_is_a_usage_error_naming_it_and_the_accepted_ones(empty: str, by: str) -> None:
    result = invoke("report", "--by", by, "--db", empty)
    assert 2 == result.exit_code
    assert f"Invalid value for '--by': {by!r}" in result.output
    assert "agent, model, provider, status, day" in result.output


def test_a_negative_count_is_a_usage_error(empty: str) -> None:
    result = invoke("runs", "-n", "-3", "--db", empty)
    assert 2 == result.exit_code
    assert "-3 is negative" in result.output


def test_an_unsupported_url_is_a_usage_error() -> None:
    result = invoke("runs", "--db", "mysql://root@localhost/ledger")
    assert 2 == result.exit_code
    assert "Invalid value for '--db'" in result.output
    assert "'mysql'" in result.output


# -- demo --------------------------------------------------------------------------------


def test_demo_records_runs_and_prints_both_tables(db_url: str) -> None:
    result = invoke("demo", "--runs", "3", "--db", db_url)
    assert 0 == result.exit_code, result.output
    output = result.output
    assert "Recorded 3 support-triage runs" in output
    for text in ("By agent", "By model", "support-triage", "researcher", "claude-sonnet-4-5"):
        assert text in output
    where = storage.database_path(db_url) or storage.redact_url(db_url)
    assert f"Ledger: {where}" in output
    roots = as_json(invoke("runs", "--json", "--root-only", "--db", db_url))
    assert 3 == len(roots)


# -- start-up cost -----------------------------------------------------------------------


def run_cli_in_subprocess(args: Sequence[str]) -> dict[str, Any]:
    """Run ``tokenledger ARGS`` in a fresh interpreter; report what it imported."""
    code = (
        "import json, sys\n"
        "from tokenledger.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "else:\n"
        "    code = 0\n"
        "heavy = ('litellm', 'openai', 'anthropic', 'sqlalchemy', 'rich')\n"
        "print(json.dumps({'exit': code, 'imported': [m for m in heavy if m in sys.modules]}),"
        " file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    result: dict[str, Any] = json.loads(done.stderr.strip().splitlines()[-1])
    result["stdout"] = done.stdout
    return result


def test_help_imports_neither_litellm_nor_sqlalchemy() -> None:
    result = run_cli_in_subprocess(["--help"])
    assert (0, []) == (result["exit"], result["imported"])


def test_runs_does_not_import_litellm(recorded: Recorded) -> None:
    result = run_cli_in_subprocess(["runs", "--db", recorded.url])
    assert 0 == result["exit"]
    assert recorded.first.id in result["stdout"]
    assert not {"litellm", "openai", "anthropic"} & set(result["imported"])


def modules_imported_by(code: str, *args: str, cwd: Path) -> tuple[set[str], str]:
    """The modules a fresh interpreter holds after running ``code`` with ``args``, and
    what it printed. Run in ``cwd``, away from the checkout, whose layout differs from
    the installed package's."""
    reporter = (
        "import atexit, json, sys\n"
        "atexit.register(lambda: print(json.dumps(sorted(sys.modules)), file=sys.stderr))\n"
    )
    # Not a terminal to rich either: these make rich colour a pipe.
    env = {k: v for k, v in os.environ.items() if k not in _render.RICH_TERMINAL_ENV}
    done = subprocess.run(
        [sys.executable, "-c", reporter + code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert 0 == done.returncode, done.stderr
    return set(json.loads(done.stderr.strip().splitlines()[-1])), done.stdout


# What a reading command never needs: migrating, capturing calls, tracing, writing.
NOT_FOR_READING = (
    "alembic",
    "anthropic",
    "litellm",
    "mako",
    "openai",
    "opentelemetry",
    "tokenledger.capture",
    "tokenledger.ledger",
    "tokenledger.runs",
    "tokenledger._spans",
    "tokenledger.writer",
)


def test_report_imports_nothing_it_does_not_need(recorded: Recorded, tmp_path: Path) -> None:
    """`tokenledger report` starts fast: no Alembic, litellm, OpenTelemetry or writer."""
    imported, stdout = modules_imported_by(
        "from tokenledger.cli import main\nmain(sys.argv[1:])",
        "report",
        "--db",
        recorded.url,
        cwd=tmp_path,
    )

    assert "triage" in stdout
    assert "rich" not in imported  # a pipe gets rich's characters without rich
    # A SQLite file is read with sqlite3 alone; a server needs SQLAlchemy's drivers.
    assert ("sqlalchemy" in imported) == recorded.url.startswith("postgresql")
    assert [] == sorted(
        module
        for module in imported
        if any(module == name or module.startswith(f"{name}.") for name in NOT_FOR_READING)
    )


def test_importing_tokenledger_defers_the_ledger_until_a_name_is_used(tmp_path: Path) -> None:
    """Every public name still resolves, imported on first use (the CLI uses none)."""
    code = (
        "import tokenledger\n"
        "watched = ('tokenledger.', 'opentelemetry', 'sqlalchemy')\n"
        "before = sorted(m for m in sys.modules if m.startswith(watched))\n"
        "from tokenledger import Ledger, current_run\n"
        "assert Ledger is tokenledger.Ledger and callable(current_run)\n"
        "missing = [name for name in tokenledger.__all__ if not hasattr(tokenledger, name)]\n"
        "print(json.dumps([before, missing, set(tokenledger.__all__) <= set(dir(tokenledger))]))\n"
    )

    imported, stdout = modules_imported_by(code, cwd=tmp_path)

    before, missing, listed = json.loads(stdout)
    assert ["tokenledger._version", "tokenledger.exceptions"] == before
    assert ([], True) == (missing, listed)
    assert {"tokenledger.ledger", "tokenledger.runs"} <= imported


# -- piped tables: the same characters as rich, without rich -------------------------------

# Names as users write them, markup and emoji codes included; some need rich to print.
names = st.text(st.sampled_from(list("abz AZ09_-.:$%[]/\\=@#→↳…é漢\t")), max_size=24)
# Cells as the commands build them: escaped names and figures in our own markup.
cells = st.one_of(
    names.map(_render.escape),
    st.sampled_from(["0", "12,345", "$0.0012", "[dim]0[/]", "[red]3[/]", "[bold]Total[/]"]),
    st.sampled_from(["[yellow]unpriced[/]", "[dim](outside runs)[/]", "5 [red](1 failed)[/]"]),
    st.just(""),
)


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[_render.Column], dict[str, Any]]:
    rows = draw(st.integers(1, 4))
    columns = [
        _render.Column(
            draw(names.filter(str.strip).map(_render.escape)),
            draw(st.lists(cells, min_size=rows, max_size=rows)),
            draw(cells),
            drop=draw(st.integers(0, 3)),
            name=draw(st.booleans()),
            left=draw(st.booleans()),
            style=draw(st.sampled_from([None, "bold", "dim"])),
        )
        for _ in range(draw(st.integers(1, 6)))
    ]
    options = {
        "width": draw(st.integers(10, 200)),
        "title": draw(st.none() | names.map(_render.escape)),
        "caption": draw(st.none() | st.sampled_from([REPORT_CAPTION, "Short.\nTwo lines."])),
        "with_total": draw(st.booleans()),
    }
    return columns, options


def rich_prints(renderable: Any, width: int) -> str:
    """What `tokenledger._console` prints to a pipe, through rich."""
    out = io.StringIO()
    Console(file=out, width=width, highlight=False).print(renderable)
    return out.getvalue()


@settings(max_examples=300, deadline=None)
@given(table=tables())
def test_a_piped_table_is_printed_as_rich_prints_it(
    table: tuple[list[_render.Column], dict[str, Any]],
) -> None:
    columns, options = table
    laid_out = _render.fit_table(columns, **options)

    plain = laid_out.plain_text(options["width"])

    if plain is not None:
        assert rich_prints(laid_out, options["width"]) == plain


@settings(max_examples=300, deadline=None)
@given(markup=st.one_of(cells, st.text(st.sampled_from(list("ab :1[]/\\dim"))), names))
def test_plain_markup_is_the_text_rich_renders(markup: str) -> None:
    plain = _render.plain(markup)

    if plain is not None:
        assert Text.from_markup(markup).plain == plain


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.sampled_from(list("ab[]/\\@#=: "))))
def test_escape_is_rich_markup_escape(text: str) -> None:
    assert rich_escape(text) == _render.escape(text)


def test_a_piped_report_is_plain_text_without_rich(recorded: Recorded) -> None:
    """The plain path is taken for an ordinary report (not only by the fuzzing above)."""
    rows = report(storage.create_engine_for(recorded.url), by=("agent", "model"))
    table = report_table(rows, ("agent", "model"), title="Cost by agent, model", width=200)

    plain = table.plain_text(200)

    assert plain is not None
    assert rich_prints(table, 200) == plain
    assert plain == recorded.run("report", "--by", "agent,model").stdout
