"""The reporting commands: exit codes, ``--json`` shapes, exports that round-trip, errors.

The ledger is test_reports_queries' hand-computed one (its docstring has every figure).
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from test_reports_queries import HandLedger

from tokenledger import Ledger
from tokenledger import _storage as storage
from tokenledger.cli import cli
from tokenledger.economics import ESTIMATE_NOTE
from tokenledger.pricing import PriceBook
from tokenledger.queries import list_calls, list_runs

D = Decimal
UNREACHABLE = "postgresql+psycopg://postgres@127.0.0.1:1/x"
NAMES = ("outcomes", "economics", "export", "forecast", "reprice", "breakeven")
# Each command with the flags it needs to run.
RUNNABLE = [
    ["outcomes"],
    ["economics"],
    ["export"],
    ["forecast", "--runs-per-day", "100"],
    ["reprice", "--price-drop", "10x"],
    ["breakeven", "--revenue-per-success", "4"],
]


def test_the_reporting_commands_are_on_the_tokenledger_group() -> None:
    assert set(NAMES) <= set(cli.commands)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def as_json(result: Result) -> Any:
    assert 0 == result.exit_code, result.output
    return json.loads(result.stdout)


class Recorded(HandLedger):
    """The hand-computed ledger, written and closed: the CLI opens it afresh."""

    def __init__(self, db_url: str) -> None:
        self.url = db_url
        with Ledger(db_url, capture=False, price_book=PriceBook(source_map={})) as ledger:
            ledger.set_price("alpha", input_per_million="1", output_per_million="2")
            ledger.set_price("beta", input_per_million="2", output_per_million="4")
            super().__init__(ledger)

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


@pytest.fixture
def read_engine(db_url: str) -> Iterator[sa.Engine]:
    engine = storage.create_engine_for(db_url)
    yield engine
    engine.dispose()


# -- help --------------------------------------------------------------------------------


def test_help_lists_every_reporting_command() -> None:
    output = invoke("--help").output
    assert [] == [name for name in NAMES if f"  {name} " not in output]


@pytest.mark.parametrize("name", NAMES)
def test_every_reporting_command_takes_db(name: str) -> None:
    assert "--db PATH|URL" in invoke(name, "--help").output


@pytest.mark.parametrize("name", [name for name in NAMES if name != "export"])
def test_every_reporting_command_but_export_takes_json(name: str) -> None:
    assert "--json" in invoke(name, "--help").output


# -- outcomes ----------------------------------------------------------------------------


def test_outcomes_json_lists_each_agents_labels(recorded: Recorded) -> None:
    rows = as_json(recorded.run("outcomes", "--json"))
    assert [
        ("billing", "rejected", 1, None, "0.1"),
        ("support", None, 3, None, "1.7"),
        ("support", "resolved", 2, "1.25", "0.3"),
    ] == [(r["agent"], r["outcome"], r["runs"], r["value_usd"], r["cost_usd"]) for r in rows]
    assert {"agent", "outcome", "runs", "share", "runs_with_value", "value_usd", "cost_usd"} == set(
        rows[0]
    )


def test_outcomes_prints_a_table(recorded: Recorded) -> None:
    result = recorded.run("outcomes", "--agent", "support")
    assert 0 == result.exit_code
    for text in ("(no outcome)", "resolved", "$1.2500", "60.0 %"):
        assert text in result.output


# -- economics ---------------------------------------------------------------------------


def test_economics_json_has_cost_per_success_per_agent(recorded: Recorded) -> None:
    rows = as_json(recorded.run("economics", "--json"))
    assert [
        ("support", 5, 2, "0.4", "2", "1", "0.3", "1", "1", "-0.75"),
        ("billing", 1, 1, "1", "0.1", "0.1", "0.1", "0.1", "0.1", None),
    ] == [
        (
            r["agent"],
            r["runs"],
            r["successes"],
            r["success_rate"],
            r["total_cost_usd"],
            r["cost_per_success_usd"],
            r["p50_cost_per_run_usd"],
            r["p90_cost_per_run_usd"],
            r["p99_cost_per_run_usd"],
            r["margin_usd"],
        )
        for r in rows
    ]


def test_economics_success_names_the_labels_that_count(recorded: Recorded) -> None:
    rows = as_json(recorded.run("economics", "--json", "--success", "resolved"))
    assert [("support", "1", ["resolved"]), ("billing", None, ["resolved"])] == [
        (r["agent"], r["cost_per_success_usd"], r["success_labels"]) for r in rows
    ]


def test_economics_prints_the_table_and_the_success_rule(recorded: Recorded) -> None:
    result = recorded.run("economics", "--agent", "support")
    assert 0 == result.exit_code
    for text in ("Cost per successful outcome", "40.0 % (2)", "$1.0000", "-$0.7500"):
        assert text in result.output
    assert "a run that ended ok with an outcome recorded" in " ".join(result.output.split())


def test_economics_of_an_agent_with_no_runs_says_so(recorded: Recorded) -> None:
    result = recorded.run("economics", "--agent", "nobody")
    assert (0, "No runs match these filters.") == (result.exit_code, result.output.strip())


def test_an_empty_success_list_is_a_usage_error(recorded: Recorded) -> None:
    result = recorded.run("economics", "--success", " , ")
    assert 2 == result.exit_code
    assert "Invalid value for '--success'" in result.output


# -- export ------------------------------------------------------------------------------


def test_export_csv_of_calls_round_trips_exact_decimals(
    recorded: Recorded, tmp_path: Path, read_engine: sa.Engine
) -> None:
    target = tmp_path / "calls.csv"
    result = recorded.run("export", "--format", "csv", "--what", "calls", "-o", str(target))
    assert 0 == result.exit_code, result.output
    with target.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    stored = {call.id: call for call in list_calls(read_engine, limit=0)}
    assert {call_id: call.cost_usd for call_id, call in stored.items()} == {
        row["id"]: D(row["cost_usd"]) for row in rows
    }
    assert [column.name for column in storage.calls.columns] == list(rows[0])
    assert f"Wrote 9 calls to {target} (csv)." in result.output


def test_export_csv_keeps_tool_charges_and_nulls(recorded: Recorded) -> None:
    result = recorded.run("export", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    [tool] = [row for row in rows if row["operation"] == "execute_tool"]
    assert ("web_search", "0.05", "", "charge") == (
        tool["tool_name"],
        tool["cost_usd"],
        tool["model"],
        tool["cost_source"],
    )


def test_export_jsonl_of_runs_round_trips_decimals_as_strings(
    recorded: Recorded, read_engine: sa.Engine
) -> None:
    result = recorded.run("export", "--format", "jsonl", "--what", "runs")
    assert 0 == result.exit_code
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    stored = {run.id: run for run in list_runs(read_engine, limit=0)}
    assert {run_id: (run.cost_usd, run.outcome_value) for run_id, run in stored.items()} == {
        row["id"]: (D(row["cost_usd"]), D(row["outcome_value"]) if row["outcome_value"] else None)
        for row in rows
    }
    assert all(isinstance(row["cost_usd"], str) for row in rows)  # never a float
    first = next(row for row in rows if row["id"] == recorded.r1.id)
    assert ({"tenant": "acme"}, "resolved") == (first["tags"], first["outcome"])


def test_export_csv_writes_tags_as_json_text(recorded: Recorded) -> None:
    result = recorded.run("export", "--what", "runs")
    rows = {row["id"]: row for row in csv.DictReader(io.StringIO(result.stdout))}
    assert {"tenant": "acme"} == json.loads(rows[recorded.r1.id]["tags"])
    assert "" == rows[recorded.r5.id]["outcome"]


def test_export_selects_rows_by_when_they_started(recorded: Recorded) -> None:
    later = recorded.run("export", "--since", "2999-01-01")
    earlier = recorded.run("export", "--format", "jsonl", "--until", "2000-01-01")
    header = ",".join(column.name for column in storage.calls.columns)
    assert (0, header) == (later.exit_code, later.stdout.strip())
    assert (0, "") == (earlier.exit_code, earlier.stdout)


def test_export_of_an_empty_ledger_is_a_header(empty: str) -> None:
    result = invoke("export", "--what", "runs", "--db", empty)
    assert (0, ",".join(column.name for column in storage.runs.columns)) == (
        result.exit_code,
        result.stdout.strip(),
    )


def test_export_to_an_unwritable_place_is_a_one_line_error(
    recorded: Recorded, tmp_path: Path
) -> None:
    result = recorded.run("export", "-o", str(tmp_path / "missing" / "calls.csv"))
    assert 1 == result.exit_code
    assert result.output.startswith("Error: Cannot write ")
    assert not (tmp_path / "missing").exists()


# -- forecast ----------------------------------------------------------------------------


def test_forecast_json_has_daily_and_monthly_figures(recorded: Recorded) -> None:
    data = as_json(
        recorded.run("forecast", "--runs-per-day", "1000000", "--agent", "support", "--json")
    )
    assert ("400000", "300000", "1000000", "12000000", "1", "400000") == (
        data["daily_cost_usd"],
        data["daily_p50_cost_usd"],
        data["daily_p90_cost_usd"],
        data["monthly_cost_usd"],
        data["cost_per_success_usd"],
        data["successes_per_day"],
    )
    assert {"note", "success_rule", "observed_runs", "runs_per_day"} <= set(data)


def test_forecast_prints_the_bands_and_the_cost_per_success(recorded: Recorded) -> None:
    result = recorded.run("forecast", "--runs-per-day", "1_000_000", "--agent", "support")
    assert 0 == result.exit_code
    for text in (
        "Forecast for 1,000,000 runs a day of support",
        "$400,000.0000",
        "$12,000,000.0000",
        "$1.0000 per success",
        "about 400,000 successes a day",
    ):
        assert text in result.output


@pytest.mark.parametrize("value", ["0", "-5", "abc", "1.5", "1e6", ""])
def test_a_bad_runs_per_day_is_a_usage_error(recorded: Recorded, value: str) -> None:
    result = recorded.run("forecast", "--runs-per-day", value)
    assert 2 == result.exit_code
    assert f"Invalid value for '--runs-per-day': {value!r} is not a number of runs" in (
        result.output
    )


def test_forecast_without_history_is_an_error(empty: str) -> None:
    result = invoke("forecast", "--runs-per-day", "10", "--db", empty)
    assert 1 == result.exit_code
    assert "Error: The ledger has no root runs at all, so there is no history to forecast" in (
        result.output
    )


def test_forecast_for_an_unknown_agent_is_an_error(recorded: Recorded) -> None:
    result = recorded.run("forecast", "--runs-per-day", "10", "--agent", "nobody")
    assert (1, True) == (result.exit_code, "no root runs of agent 'nobody'" in result.output)


# -- reprice -----------------------------------------------------------------------------


def test_reprice_json_has_each_model_and_the_estimate_note(recorded: Recorded) -> None:
    data = as_json(recorded.run("reprice", "--price-drop", "10x", "--agent", "support", "--json"))
    assert [("alpha", "1.55", "0.155"), ("beta", "0.4", "0.04")] == [
        (m["model"], m["cost_usd"], m["estimated_cost_usd"]) for m in data["models"]
    ]
    assert ("10", "2", "0.245", "0.05", ESTIMATE_NOTE) == (
        data["price_drop"],
        data["total_cost_usd"],
        data["estimated_total_usd"],
        data["tool_cost_usd"],
        data["note"],
    )


def test_reprice_as_a_model_prints_a_table_labelled_an_estimate(recorded: Recorded) -> None:
    result = recorded.run("reprice", "--as", "gpt-4o-mini", "--agent", "support")
    assert 0 == result.exit_code
    output = " ".join(result.output.split())
    for text in (
        "Repriced at gpt-4o-mini's prices",
        "tool charges (unchanged)",
        "$2.0000 as recorded, $0.3200 estimated (-84.0 %)",
        ESTIMATE_NOTE,
    ):
        assert text in output


def test_reprice_at_an_unknown_model_is_a_usage_error(recorded: Recorded) -> None:
    result = recorded.run("reprice", "--as", "no-such-model")
    assert 2 == result.exit_code
    assert "Invalid value for '--as': No price is known for model 'no-such-model'" in " ".join(
        result.output.split()
    )


@pytest.mark.parametrize("value", ["0x", "0.5x", "ten", "-3x", "10%"])
def test_a_bad_price_drop_is_a_usage_error(recorded: Recorded, value: str) -> None:
    result = recorded.run("reprice", "--price-drop", value)
    assert 2 == result.exit_code
    assert f"Invalid value for '--price-drop': {value!r} is not a price drop" in result.output


@pytest.mark.parametrize(
    "flags", [[], ["--as", "beta", "--price-drop", "2x"]], ids=["neither", "both"]
)
def test_reprice_wants_exactly_one_of_as_and_price_drop(
    recorded: Recorded, flags: list[str]
) -> None:
    result = recorded.run("reprice", *flags)
    assert 2 == result.exit_code
    assert "Give exactly one of --as MODEL" in result.output


def test_reprice_of_an_empty_ledger_is_an_error(empty: str) -> None:
    result = invoke("reprice", "--price-drop", "2x", "--db", empty)
    assert 1 == result.exit_code
    assert "Error: No calls match these filters, so there is nothing to reprice." in (
        " ".join(result.output.split())
    )


# -- breakeven ---------------------------------------------------------------------------


def test_breakeven_json_has_the_price_level_and_the_verdict(recorded: Recorded) -> None:
    data = as_json(
        recorded.run("breakeven", "--revenue-per-success", "0.6295", "--agent", "support", "--json")
    )
    assert ("profitable_at_lower_prices", "0.62", "-0.3705", "1.95", "0.05") == (
        data["status"],
        data["break_even_price_level"],
        data["margin_per_success_usd"],
        data["model_cost_usd"],
        data["tool_cost_usd"],
    )
    assert "fall to 62 % of today's" in data["summary"]


def test_breakeven_prints_the_margin_and_the_price_level(recorded: Recorded) -> None:
    result = recorded.run("breakeven", "--revenue-per-success", "$0.6295", "--agent", "support")
    assert 0 == result.exit_code
    output = " ".join(result.output.split())
    for text in (
        "Margin: -$0.7410 (-$0.3705 per success)",
        "Break-even: model prices at 62.00 % of today's",
        "Not profitable at today's prices.",
    ):
        assert text in output


@pytest.mark.parametrize("value", ["-1", "abc", "4,00", "NaN"])
def test_a_bad_revenue_is_a_usage_error(recorded: Recorded, value: str) -> None:
    result = recorded.run("breakeven", "--revenue-per-success", value)
    assert 2 == result.exit_code
    assert f"Invalid value for '--revenue-per-success': {value!r} is not an amount" in (
        result.output
    )


def test_breakeven_without_history_is_an_error(empty: str) -> None:
    result = invoke("breakeven", "--revenue-per-success", "4", "--db", empty)
    assert 1 == result.exit_code
    assert "no history to compute a break-even from" in result.output


def test_breakeven_on_a_database_without_a_ledger_yet_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "blank.db"
    path.touch()
    result = invoke("breakeven", "--revenue-per-success", "4", "--db", f"sqlite:///{path}")
    assert 1 == result.exit_code
    assert "Error: No runs recorded yet, so there is no history to compute a break-even" in (
        result.output
    )


# -- errors shared by every command ------------------------------------------------------


@pytest.mark.parametrize("command", RUNNABLE, ids=[c[0] for c in RUNNABLE])
def test_an_unreachable_database_is_a_one_line_error(command: list[str]) -> None:
    result = invoke(*command, "--db", UNREACHABLE)
    assert 1 == result.exit_code
    assert result.output.startswith("Error: ")
    assert "127.0.0.1:1" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", RUNNABLE, ids=[c[0] for c in RUNNABLE])
def test_a_missing_sqlite_file_is_an_error_and_is_not_created(
    tmp_path: Path, command: list[str]
) -> None:
    missing = tmp_path / "nowhere" / "ledger.db"
    result = invoke(*command, "--db", f"sqlite:///{missing}")
    assert 1 == result.exit_code
    assert f"The ledger {missing} does not exist." in result.output
    assert not missing.parent.exists()


@pytest.mark.parametrize("flag", ["--since", "--until"])
@pytest.mark.parametrize("command", RUNNABLE, ids=[c[0] for c in RUNNABLE])
def test_a_bad_time_is_a_usage_error_naming_the_flag(
    empty: str, command: list[str], flag: str
) -> None:
    result = invoke(*command, flag, "yesterday", "--db", empty)
    assert 2 == result.exit_code
    assert f"Invalid value for '{flag}': 'yesterday' is not a time" in result.output


@pytest.mark.parametrize(
    "command", [c for c in RUNNABLE if c[0] in ("outcomes", "economics")], ids=["o", "e"]
)
def test_an_empty_ledger_is_an_empty_json_array(empty: str, command: list[str]) -> None:
    assert [] == as_json(invoke(*command, "--json", "--db", empty))


# -- hostile input through the command line ----------------------------------------------

HOSTILE_KEY = "'; DROP TABLE runs; --"
HOSTILE_VALUE = "$(rm -rf /)"


def test_hostile_tags_and_names_are_only_data_on_the_command_line(
    db_url: str, read_engine: sa.Engine
) -> None:
    with Ledger(db_url, capture=False, price_book=PriceBook(source_map={})) as ledger:
        ledger.set_price("alpha", input_per_million="1", output_per_million="2")
        with ledger.run(HOSTILE_KEY, tags={HOSTILE_KEY: HOSTILE_VALUE}) as run:
            ledger.record_call("alpha", input_tokens=100_000)
            run.outcome(HOSTILE_VALUE)
    by_tag = as_json(invoke("report", "--json", "--by", f"tag:{HOSTILE_KEY}", "--db", db_url))
    economics = as_json(
        invoke(
            "economics",
            "--json",
            "--agent",
            HOSTILE_KEY,
            "--success",
            HOSTILE_VALUE,
            "--db",
            db_url,
        )
    )
    exported = invoke("export", "--format", "jsonl", "--what", "runs", "--db", db_url)
    assert [({f"tag:{HOSTILE_KEY}": HOSTILE_VALUE}, "0.1")] == [
        (row["key"], row["cost_usd"]) for row in by_tag
    ]
    assert [(HOSTILE_KEY, 1, "0.1")] == [
        (row["agent"], row["successes"], row["cost_per_success_usd"]) for row in economics
    ]
    assert {HOSTILE_KEY: HOSTILE_VALUE} == json.loads(exported.stdout)["tags"]
    with read_engine.connect() as connection:
        assert {"runs", "calls"} <= set(sa.inspect(connection).get_table_names())
    assert 1 == len(list_runs(read_engine))


# -- start-up cost -----------------------------------------------------------------------


def run_in_subprocess(args: list[str]) -> dict[str, Any]:
    """``tokenledger ARGS`` in a fresh interpreter, as the console script runs it."""
    code = (
        "import json, sys\n"
        "from tokenledger.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "else:\n"
        "    code = 0\n"
        "heavy = ('litellm', 'openai', 'anthropic')\n"
        "print(json.dumps({'exit': code, 'imported': [m for m in heavy if m in sys.modules]}),"
        " file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, check=False
    )
    return json.loads(done.stderr.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "command",
    [*RUNNABLE, ["reprice", "--as", "gpt-4o-mini"]],
    ids=[*(c[0] for c in RUNNABLE), "reprice-as"],
)
def test_reporting_commands_do_not_import_litellm(recorded: Recorded, command: list[str]) -> None:
    assert {"exit": 0, "imported": []} == run_in_subprocess([*command, "--db", recorded.url])
