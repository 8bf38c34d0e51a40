"""The ``tokenledger`` command: read the ledger, set its budgets, migrate it, and run the
offline demo.

Start-up time matters for a command people run in loops and scripts, so the package
imports only click at the top: SQLAlchemy, rich and the query layer are imported inside
the commands that use them, and litellm only by ``tokenledger demo``; ``tokenledger
report`` on a SQLite file does not import SQLAlchemy at all (see
`tokenledger.cli.reports`). A table printed to a pipe is written without rich,
character for character as rich would (see `tokenledger.cli._render`).

Reading commands (``runs``, ``calls``, ``report``, ``status``, ``budgets``, ``db current``
and the economics commands) and ``budgets rm`` never create or migrate a database: a
missing SQLite file is an error, not a new ledger. ``budgets set``, like ``db upgrade``,
creates a ledger where there is none. A SQLite file they cannot write (read-only
media, an immutable file) they read read-only (see `tokenledger.cli._readonly`).

``--db`` takes a SQLite file path or a URL, on the group or on a command (which wins);
``tokenledger demo`` alone defaults to its own ``tokenledger-demo.db``.

The modules: `_options` (options, opening the ledger, one-line errors), `_readonly`
(read-only SQLite) and `_render` (cells, JSON, tables) serve the command modules
`reports`, `economics`, `export`, `budgets`, `db` and `demo`; this one gathers their
commands into one group.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from tokenledger._version import __version__
from tokenledger.cli._options import LedgerGroup, db_option
from tokenledger.cli.budgets import budgets
from tokenledger.cli.db import db, path_command, status_command
from tokenledger.cli.demo import demo
from tokenledger.cli.economics import (
    breakeven_command,
    economics_command,
    forecast_command,
    reprice_command,
)
from tokenledger.cli.export import export_command
from tokenledger.cli.reports import calls_command, outcomes_command, report_command, runs_command

__all__ = ["cli", "main"]


@click.group(cls=LedgerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tokenledger")
@db_option
def cli(db_url: str | None) -> None:
    """Token accounting for LLM agent loops: see what every run and model costs.

    --db PATH|URL names the ledger, here (for every command) or after the command (which
    wins): a SQLite file or a database URL. Default: $TOKENLEDGER_DATABASE_URL, else
    tokenledger.db in the current directory. Start with `tokenledger demo`, which
    records into its own tokenledger-demo.db.
    """


for _command in (
    demo,
    path_command,
    status_command,
    runs_command,
    calls_command,
    report_command,
    outcomes_command,
    economics_command,
    export_command,
    forecast_command,
    reprice_command,
    breakeven_command,
    budgets,
    db,
):
    cli.add_command(_command)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``tokenledger`` console script."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="tokenledger")
