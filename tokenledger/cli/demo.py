"""``tokenledger demo``: record an offline multi-step agent workflow in the ledger and
report what it cost.

The only command that imports litellm (through `tokenledger._demo`), inside the command:
the demo's calls are real litellm calls answered by mock responses.

The demo records into its own ledger, ``tokenledger-demo.db`` in the current directory,
not the one ``$TOKENLEDGER_DATABASE_URL`` names: its runs carry tenants, users and
costs that must not land in a real ledger (or spend its budgets) by accident. ``--db``
(here or before the command) chooses another ledger, and every demo run is tagged
``demo=true``.
"""

from __future__ import annotations

import functools
import shlex

import click

from tokenledger.cli._options import db_option, db_url_of, resolve_url
from tokenledger.cli._render import escape, make_console, money
from tokenledger.cli.reports import report_table

__all__ = ["DEMO_FILENAME", "demo"]

#: The demo's own ledger, in the current directory, used unless --db names another.
DEMO_FILENAME = "tokenledger-demo.db"


@click.command("demo")
@functools.partial(
    db_option,
    help="The ledger to record into: a SQLite file path or a database URL. Default: "
    "./tokenledger-demo.db, never $TOKENLEDGER_DATABASE_URL.",
)
@click.option(
    "--runs",
    "runs",
    type=click.IntRange(1, 10_000),
    default=20,
    show_default=True,
    help="How many support tickets to run through the demo agent.",
)
@click.option("--seed", type=int, default=7, show_default=True, help="Random seed.")
def demo(db_url: str | None, runs: int, seed: int) -> None:
    """Record an offline multi-step agent workflow and report what it cost.

    A support-triage agent (planner, retrieval, tool steps with one rate-limited retry,
    a policy check with reasoning, a researcher sub-agent and a streamed reply) makes
    real litellm calls answered by mock responses: nothing leaves this machine.

    Records into ./tokenledger-demo.db, never into $TOKENLEDGER_DATABASE_URL, unless
    --db names a ledger; its runs are tagged demo=true.
    """
    from tokenledger._demo import run_demo
    from tokenledger.ledger import Ledger
    from tokenledger.queries import report

    # The explicit --db, or the demo's own file: `db_flag` names it in the commands the
    # demo suggests, relative to the working directory the user is in.
    db_flag = DEMO_FILENAME if db_url is None else None
    url, path = resolve_url(db_url if db_url is not None else db_url_of(DEMO_FILENAME))
    console = make_console()
    with console.status(f"Running {runs} support tickets through litellm (offline)…"):
        ledger = Ledger(url)
        try:
            summary = run_demo(ledger, runs=runs, seed=seed)
            by_agent = report(
                ledger.engine, by=("agent",), since=summary.started_at, root_only=False
            )
            by_model = report(ledger.engine, by=("model",), since=summary.started_at)
        finally:
            ledger.close()
    console.print(
        f"Recorded [bold]{summary.runs}[/] support-triage runs and "
        f"[bold]{summary.sub_runs}[/] researcher sub-runs, offline."
    )
    retried = f", {summary.failed_calls} failed and retried" if summary.failed_calls else ""
    console.print(
        f"[bold]{summary.calls}[/] model calls{retried}: "
        f"[bold green]{money(summary.cost_usd)}[/] in all, "
        f"[bold green]{money(summary.cost_usd / summary.runs)}[/] per run."
    )
    console.print()
    console.print(
        report_table(
            by_agent,
            ("agent",),
            title="By agent (each call counted once, in the agent that made it)",
            columns=("runs", "calls", "in", "cached", "out", "cost", "per_run"),
            width=console.width,
        )
    )
    console.print()
    console.print(
        report_table(
            by_model,
            ("model",),
            title="By model",
            columns=("calls", "in", "cached", "out", "reasoning", "cost"),
            width=console.width,
        )
    )
    console.print()
    where = path or ledger.url
    note = " (the demo's own ledger; --db chooses another)" if db_url is None else ""
    console.print(f"Ledger: [bold]{escape(where)}[/]{note}")
    if db_flag is None:
        db_flag = shlex.quote(path) if path is not None else shlex.quote(ledger.url)
    console.print("Explore it:")
    for command in (
        "runs --root-only",
        "report --by agent,model",
        f"calls --run {summary.run_ids[0]}",
    ):
        line = f"tokenledger {command} --db {db_flag}"
        console.print(f"  [cyan]{escape(line)}[/]", soft_wrap=True)
