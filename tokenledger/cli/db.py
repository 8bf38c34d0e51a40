"""Where the ledger is and which schema it has: ``path``, ``status`` and the ``db``
group (``upgrade``, ``downgrade``, ``stamp``, ``current``), which runs the Alembic
migrations.

Only ``db upgrade`` creates a ledger where there is none; the others name a missing
SQLite file as an error (``path`` only notes it).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import click

from tokenledger.cli._options import (
    EMPTY,
    db_option,
    engine_for,
    existing_url,
    json_option,
    reading_engine,
    resolve_url,
)
from tokenledger.cli._render import money, print_json, say, when
from tokenledger.exceptions import SchemaVersionError

__all__ = ["db", "path_command", "status_command"]


# ------------------------------------------------------------------------ the ledger


@click.command("path")
@db_option
def path_command(db_url: str | None) -> None:
    """Print where the ledger is: the SQLite file, or the database URL (password hidden).

    Open it with other tools: sqlite3 "$(tokenledger path)".
    """
    from tokenledger._storage import redact_url

    url, file = resolve_url(db_url)
    click.echo(file if file is not None else redact_url(url))
    if file is not None and not os.path.exists(file):
        say("(The file does not exist yet: it is created on first use.)", err=True)


@click.command("status")
@db_option
@json_option
def status_command(db_url: str | None, as_json: bool) -> None:
    """Where the ledger is, its schema revision, and what it holds."""
    from tokenledger import _schema as schema
    from tokenledger._storage import redact_url
    from tokenledger.queries import counts

    url, path = existing_url(db_url)
    engine = reading_engine(url, path)
    problem = None
    try:
        revision = schema.current_revision(engine)
        head = schema.head_revision()
        held = counts(engine) if revision == head else None
        if revision is not None and revision != head:
            try:
                schema.ensure_schema(engine)  # at a revision, this only checks
            except SchemaVersionError as exc:
                problem = str(exc)  # says whether to upgrade the ledger or the package
    finally:
        engine.dispose()
    info: dict[str, Any] = {
        "url": redact_url(url),
        "path": path,
        "revision": revision,
        "head_revision": head,
        "up_to_date": revision == head,
        "problem": problem,
    }
    if held is not None:
        info.update(dataclasses.asdict(held))
    if as_json:
        print_json(info)
        return
    lines = [("Ledger", path or redact_url(url))]
    if revision == head:
        lines.append(("Schema", f"{revision} (up to date)"))
    elif revision is None:
        lines.append(
            ("Schema", f"none yet: created on first write or by `tokenledger db upgrade` ({head})")
        )
    else:
        lines.append(("Schema", f"{revision}, not usable here. {problem or ''}".strip()))
    if held is not None:
        lines += [
            ("Runs", f"{held.runs:,} ({held.root_runs:,} root runs)"),
            (
                "Calls",
                f"{held.calls:,} ({held.failed_calls:,} failed, {held.unpriced_calls:,} unpriced)",
            ),
            ("Cost", money(held.cost_usd)),
            ("Last call", when(held.last_call_at) or "none yet"),
        ]
    for label, value in lines:
        say(f"{label + ':':<11}{value}")
    if held is not None and held.runs == 0 and held.calls == 0:
        say(EMPTY)


# ------------------------------------------------------------------------ migrations


@click.group()
def db() -> None:
    """Create, upgrade, downgrade or inspect the ledger's schema (Alembic migrations)."""


def _revision_text(revision: str | None) -> str:
    return revision if revision is not None else "none (empty)"


def _migrate(db_url: str | None, action: str, revision: str) -> None:
    from tokenledger import _schema as schema
    from tokenledger._storage import redact_url

    # Only an upgrade may create the ledger it migrates.
    url, path = resolve_url(db_url) if action == "upgrade" else existing_url(db_url)
    engine = engine_for(url)
    try:
        before = schema.current_revision(engine)
        getattr(schema, action)(engine, revision)
        after = schema.current_revision(engine)
    finally:
        engine.dispose()
    where = path or redact_url(url)
    if before == after:
        say(f"The ledger {where} is already at revision {_revision_text(after)}.")
    else:
        verb = {"upgrade": "Upgraded", "downgrade": "Downgraded", "stamp": "Stamped"}[action]
        say(f"{verb} the ledger {where} from {_revision_text(before)} to {_revision_text(after)}.")


@db.command("upgrade")
@db_option
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(db_url: str | None, revision: str) -> None:
    """Migrate the ledger up (creating it if needed). Safe to run from several hosts."""
    _migrate(db_url, "upgrade", revision)


@db.command("downgrade")
@db_option
@click.option("--revision", required=True, help="Target revision; `base` drops every ledger table.")
def db_downgrade(db_url: str | None, revision: str) -> None:
    """Migrate the ledger down to an older revision."""
    _migrate(db_url, "downgrade", revision)


@db.command("stamp")
@click.argument("revision")
@db_option
def db_stamp(revision: str, db_url: str | None) -> None:
    """Record REVISION as the ledger's schema revision without migrating anything.

    For a ledger whose tables tokenledger created but whose revision record was lost.
    """
    _migrate(db_url, "stamp", revision)


@db.command("current")
@db_option
def db_current(db_url: str | None) -> None:
    """Print the ledger's schema revision and the one this tokenledger needs."""
    from tokenledger import _schema as schema

    url, path = existing_url(db_url)
    engine = reading_engine(url, path)
    try:
        revision = schema.current_revision(engine)
    finally:
        engine.dispose()
    head = schema.head_revision()
    note = "up to date" if revision == head else "run `tokenledger db upgrade`"
    say(f"current: {_revision_text(revision)}\nhead:    {head} ({note})")
