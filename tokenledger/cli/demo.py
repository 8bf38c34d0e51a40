"""``tokenledger demo``: record an offline multi-step agent workflow in the ledger and
report what it cost.

The only command that imports litellm (through `tokenledger.demo`), inside the command:
the demo's calls are real litellm calls answered by mock responses.
"""

from __future__ import annotations

import click

from tokenledger.cli._options import db_option, resolve_url
from tokenledger.cli._render import make_console, money
from tokenledger.cli.reports import report_table

__all__ = ["demo"]


@click.command("demo")
@db_option
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
    """
    from tokenledger.demo import run_demo
    from tokenledger.ledger import Ledger
    from tokenledger.queries import report

    url, path = resolve_url(db_url)
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
    console.print(f"Ledger: [bold]{where}[/]")
    db_flag = f" --db {ledger.url}" if db_url else ""
    console.print("Explore it:")
    for command in (
        "runs --root-only",
        "report --by agent,model",
        f"calls --run {summary.run_ids[0]}",
    ):
        console.print(f"  [cyan]tokenledger {command}{db_flag}[/]", soft_wrap=True)
