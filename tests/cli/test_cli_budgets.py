"""``tokenledger budgets``: list, set and remove budgets; exit codes and ``--json`` shape.

Exit status 0 on success, 2 for a bad value (the message names it), 1 when the ledger
cannot be used (missing file, unreachable server, schema at another revision).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import litellm
import pytest
from click.testing import CliRunner, Result

from tokenledger import Ledger
from tokenledger import _schema as schema
from tokenledger import _storage as storage
from tokenledger.budgets import window_bounds
from tokenledger.cli import cli
from tokenledger.testing import mock_response

UNREACHABLE = "postgresql+psycopg://postgres@127.0.0.1:1/x"
MESSAGES = [{"role": "user", "content": "Summarise the ticket in one line."}]
CALL = Decimal("0.0000324")  # gpt-4o-mini: 16 x $0.15/M + 50 x $0.60/M


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def as_json(result: Result) -> Any:
    assert 0 == result.exit_code, result.output
    return json.loads(result.stdout)


@pytest.fixture
def empty(db_url: str) -> str:
    """A ledger at the current schema revision with nothing in it."""
    assert 0 == invoke("db", "upgrade", "--db", db_url).exit_code
    return db_url


def spend(db_url: str, tags: dict[str, str]) -> None:
    """One gpt-4o-mini call that costs exactly what it reserves ($0.0000324)."""
    with Ledger(db_url) as ledger, ledger.run("triage", tags=tags):
        litellm.completion(
            model="gpt-4o-mini",
            messages=MESSAGES,
            max_tokens=50,
            mock_response=mock_response(prompt_tokens=16, completion_tokens=50),
        )


# -- list ----------------------------------------------------------------------------------


def test_an_empty_ledger_has_no_budgets(empty: str) -> None:
    result = invoke("budgets", "--db", empty)
    assert (
        0,
        "No budgets set. Set one with `tokenledger budgets set global --usd 5 --per day`.",
    ) == (
        result.exit_code,
        result.output.strip(),
    )
    assert [] == as_json(invoke("budgets", "--json", "--db", empty))


def test_budgets_json_lists_limits_spent_reserved_remaining_and_reset(empty: str) -> None:
    assert 0 == invoke("budgets", "set", "user:42", "--usd", "0.50", "--db", empty).exit_code
    spend(empty, {"user": "42"})
    (budget,) = as_json(invoke("budgets", "--json", "--db", empty))
    start, reset = window_bounds("day", dt.datetime.now(dt.timezone.utc))
    assert {
        "scope": "user:42",
        "per": "day",
        "action": "raise",
        "downgrade_to": [],
        "limit_usd": "0.5",
        "spent_usd": "0.0000324",
        "reserved_usd": "0",
        "remaining_usd": "0.4999676",
        "overshoot_usd": "0",
        "limit_tokens": None,
        "spent_tokens": 66,
        "reserved_tokens": 0,
        "remaining_tokens": None,
        "window_start": start.isoformat(),
        "resets_at": reset.isoformat(),
    } == budget


def test_budgets_list_is_the_same_as_budgets(empty: str) -> None:
    invoke("budgets", "set", "global", "--tokens", "1000", "--per", "total", "--db", empty)
    listed = as_json(invoke("budgets", "list", "--json", "--db", empty))
    assert as_json(invoke("budgets", "--json", "--db", empty)) == listed
    assert [("global", "total", 1000, None)] == [
        (b["scope"], b["per"], b["limit_tokens"], b["resets_at"]) for b in listed
    ]


def test_budgets_prints_a_table(empty: str) -> None:
    invoke("budgets", "set", "tenant:acme", "--usd", "2", "--per", "month", "--db", empty)
    invoke("budgets", "set", "global", "--tokens", "5000", "--per", "total", "--db", empty)
    invoke(
        "budgets", "set", "agent:triage", "--usd", "1", "--action", "downgrade",
        "--downgrade-to", "gpt-4o-mini", "--db", empty,
    )  # fmt: skip
    spend(empty, {"tenant": "acme"})
    result = invoke("budgets", "--db", empty)
    assert 0 == result.exit_code
    lines = result.output.splitlines()
    header = lines[0].split()
    assert ["Scope", "Window", "Limit", "Spent", "Reserved", "Remaining", "Resets"] == header[:7]
    tenant = next(line for line in lines if line.startswith("tenant:acme"))
    assert ["month", "$2.0000", "$0.000032", "$0.0000", "$2.0000"] == tenant.split()[1:6]
    total = next(line for line in lines if line.startswith("global"))
    assert "5,000 tok" in total
    assert "never" in total
    assert "downgrade → gpt-4o-mini" in result.output
    assert "Windows are UTC calendar windows" in result.output


def test_a_budget_with_overshoot_is_flagged_in_the_table(db_url: str) -> None:
    with Ledger(db_url, default_max_output_tokens=1) as ledger:
        ledger.set_price("acme-private-1", input_per_million="2", output_per_million="8")
        ledger.set_budget("global", usd="1")
        with ledger.run("r"):
            litellm.completion(
                model="openai/acme-private-1",
                messages=MESSAGES,
                mock_response=mock_response(prompt_tokens=16, completion_tokens=500),
            )
    result = invoke("budgets", "--db", db_url)
    assert "Overshoot (calls without max_tokens that cost more than they reserved)" in (
        result.output
    )
    assert "`global` (day) $0.0040" in result.output
    assert "0.003992" == as_json(invoke("budgets", "--json", "--db", db_url))[0]["overshoot_usd"]


# -- set -----------------------------------------------------------------------------------


def test_set_says_what_it_set(empty: str) -> None:
    result = invoke(
        "budgets", "set", "global", "--usd", "5", "--tokens", "100000", "--per", "month",
        "--action", "downgrade", "--downgrade-to", "gpt-4o-mini, gpt-3.5-turbo", "--db", empty,
    )  # fmt: skip
    assert 0 == result.exit_code, result.output
    assert (
        "Set budget `global`: $5.0000 and 100,000 tokens per month (UTC), action downgrade to "
        "gpt-4o-mini, gpt-3.5-turbo. Spent so far: $0.0000, 0 tokens."
    ) == result.output.strip()
    (budget,) = as_json(invoke("budgets", "--json", "--db", empty))
    assert ("5", 100000, "month", ["gpt-4o-mini", "gpt-3.5-turbo"]) == (
        budget["limit_usd"],
        budget["limit_tokens"],
        budget["per"],
        budget["downgrade_to"],
    )


def test_set_defaults_to_a_daily_budget_that_raises(empty: str) -> None:
    assert 0 == invoke("budgets", "set", "user:7", "--usd", "1", "--db", empty).exit_code
    (budget,) = as_json(invoke("budgets", "--json", "--db", empty))
    assert ("day", "raise") == (budget["per"], budget["action"])


def test_set_again_replaces_the_limit_and_keeps_the_spend(empty: str) -> None:
    invoke("budgets", "set", "user:42", "--usd", "1", "--db", empty)
    spend(empty, {"user": "42"})
    result = invoke("budgets", "set", "user:42", "--usd", "3", "--action", "warn", "--db", empty)
    assert "Spent so far: $0.000032, 66 tokens." in result.output
    (budget,) = as_json(invoke("budgets", "--json", "--db", empty))
    assert ("3", "warn", "0.0000324") == (
        budget["limit_usd"],
        budget["action"],
        budget["spent_usd"],
    )


def test_a_budget_set_from_the_cli_is_enforced(empty: str) -> None:
    invoke("budgets", "set", "user:42", "--usd", "0.00001", "--db", empty)
    from tokenledger import BudgetExceeded

    with pytest.raises(BudgetExceeded, match="Budget `user:42` \\(day\\)"):
        spend(empty, {"user": "42"})


def test_set_creates_a_ledger_where_there_is_none(tmp_path: Path) -> None:
    path = tmp_path / "new" / "ledger.db"
    result = invoke("budgets", "set", "global", "--usd", "5", "--db", f"sqlite:///{path}")
    assert (0, True) == (result.exit_code, path.exists())
    assert 1 == len(as_json(invoke("budgets", "--json", "--db", f"sqlite:///{path}")))


def test_db_may_be_given_to_budgets_itself(empty: str) -> None:
    assert 0 == invoke("budgets", "--db", empty, "set", "global", "--usd", "5").exit_code
    assert 1 == len(as_json(invoke("budgets", "--db", empty, "list", "--json")))
    assert 0 == invoke("budgets", "--db", empty, "rm", "global").exit_code


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["user:42", "--usd", "-5"], "Budget `user:42` has `usd=-5`; a limit must be a positive"),
        (["user:42", "--usd", "0"], "Budget `user:42` has `usd=0`; a limit must be a positive"),
        (["user:42", "--usd", "NaN"], "Budget `user:42` has `usd=NaN`"),
        (["user:42", "--usd", "five"], "Budget `user:42` has `usd='five'`"),
        (["user:42", "--tokens", "0"], "Budget `user:42` has `tokens=0`; a token limit must be"),
        (["user:42", "--tokens", "many"], "Invalid value for '--tokens': 'many' is not a valid"),
        (["user:42"], "Budget `user:42` needs a limit: give --usd AMOUNT, --tokens N, or both"),
        (["user", "--usd", "5"], "Budget scope `user` is invalid; use `global`, `agent:NAME`"),
        (["user:42", "--usd", "5", "--per", "year"], "Invalid value for '--per': 'year' is not"),
        (["user:42", "--usd", "5", "--per", "run"], "Invalid value for '--per': 'run' is not"),
        (["user:42", "--usd", "5", "--action", "stop"], "Invalid value for '--action': 'stop'"),
        (
            ["user:42", "--usd", "5", "--action", "downgrade"],
            "Budget `user:42` has `action='downgrade'` but no `downgrade_to`",
        ),
        (
            ["user:42", "--usd", "5", "--downgrade-to", "gpt-4o-mini"],
            "Budget `user:42` has `downgrade_to=['gpt-4o-mini']` but `action='raise'`",
        ),
        (
            ["user:42", "--usd", "5", "--action", "downgrade", "--downgrade-to", "a,,b"],
            "Budget `user:42` has `downgrade_to=['a', '', 'b']`; it must be a list of model",
        ),
    ],
)
def test_a_bad_value_is_a_usage_error_naming_it(
    empty: str, arguments: list[str], message: str
) -> None:
    result = invoke("budgets", "set", *arguments, "--db", empty)
    assert 2 == result.exit_code
    assert message in result.output
    assert "Traceback" not in result.output
    assert [] == as_json(invoke("budgets", "--json", "--db", empty))  # nothing stored


# -- rm ------------------------------------------------------------------------------------


def test_rm_removes_one_window_or_every_window_of_a_scope(empty: str) -> None:
    for per in ("day", "month"):
        invoke("budgets", "set", "user:42", "--usd", "5", "--per", per, "--db", empty)
    invoke("budgets", "set", "user:7", "--usd", "5", "--db", empty)
    one = invoke("budgets", "rm", "user:42", "--per", "day", "--db", empty)
    assert (0, "Removed the budget `user:42` (day).") == (one.exit_code, one.output.strip())
    invoke("budgets", "set", "user:42", "--usd", "5", "--per", "week", "--db", empty)
    every = invoke("budgets", "rm", "user:42", "--db", empty)
    assert (0, "Removed 2 budgets `user:42`.") == (every.exit_code, every.output.strip())
    assert ["user:7"] == [b["scope"] for b in as_json(invoke("budgets", "--json", "--db", empty))]


def test_rm_of_a_budget_that_does_not_exist_is_an_error(empty: str) -> None:
    result = invoke("budgets", "rm", "user:42", "--per", "hour", "--db", empty)
    assert 1 == result.exit_code
    assert "There is no budget `user:42` (hour) in this ledger" in result.output


def test_rm_of_a_bad_scope_is_a_usage_error(empty: str) -> None:
    result = invoke("budgets", "rm", "nobody", "--db", empty)
    assert 2 == result.exit_code
    assert "Invalid value for 'SCOPE': Budget scope `nobody` is invalid" in result.output


# -- the ledger cannot be used -------------------------------------------------------------


@pytest.mark.parametrize("command", [["budgets"], ["budgets", "list"], ["budgets", "rm", "global"]])
def test_a_missing_sqlite_file_is_an_error_and_is_not_created(
    tmp_path: Path, command: list[str]
) -> None:
    missing = tmp_path / "nowhere" / "ledger.db"
    result = invoke(*command, "--db", f"sqlite:///{missing}")
    assert 1 == result.exit_code
    assert f"The ledger {missing} does not exist." in result.output
    assert not missing.parent.exists()


@pytest.mark.parametrize(
    "command",
    [["budgets"], ["budgets", "set", "global", "--usd", "5"], ["budgets", "rm", "global"]],
)
def test_an_unreachable_database_is_a_one_line_error(command: list[str]) -> None:
    result = invoke(*command, "--db", UNREACHABLE)
    assert 1 == result.exit_code
    assert result.output.startswith("Error: ")
    assert "127.0.0.1:1" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "command",
    [["budgets"], ["budgets", "set", "global", "--usd", "5"], ["budgets", "rm", "global"]],
)
def test_a_ledger_from_before_budgets_is_refused_with_the_fix(
    db_url: str, command: list[str]
) -> None:
    engine = storage.create_engine_for(db_url)
    try:
        schema.upgrade(engine, "0001")  # a ledger written before budgets existed
    finally:
        engine.dispose()
    result = invoke(*command, "--db", db_url)
    assert 1 == result.exit_code
    assert "tokenledger db upgrade" in result.output


# -- help and start-up ---------------------------------------------------------------------


def test_help_lists_the_budget_commands() -> None:
    assert "  budgets " in invoke("--help").output
    result = invoke("budgets", "--help")
    assert 0 == result.exit_code
    for command in ("list", "set", "rm"):
        assert f"  {command} " in result.output
    assert "--downgrade-to MODELS" in invoke("budgets", "set", "--help").output


def test_budgets_does_not_import_litellm(empty: str) -> None:
    code = (
        "import sys\n"
        "from tokenledger.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "print('litellm' in sys.modules, 'openai' in sys.modules)\n"
    )
    for command in (["budgets", "set", "global", "--usd", "5"], ["budgets"]):
        done = subprocess.run(
            [sys.executable, "-c", code, *command, "--db", empty],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert "False False" == done.stdout.strip().splitlines()[-1], done.stderr
