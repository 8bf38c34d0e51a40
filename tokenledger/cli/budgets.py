"""``tokenledger budgets``: list, set and remove the budgets every process that shares
the ledger enforces before each call.

``budgets`` and ``budgets rm`` only read an existing ledger; ``budgets set``, like ``db
upgrade``, creates one where there is none. ``--db`` and ``--json`` may be given to the
group or to the subcommand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tokenledger._money import usd_text
from tokenledger.cli._options import (
    db_option,
    engine_for,
    json_option,
    open_for_reading,
    resolve_url,
)
from tokenledger.cli._render import (
    Column,
    Table,
    escape,
    fit_table,
    money,
    print_json,
    say,
    show_table,
    when,
)
from tokenledger.exceptions import ConfigurationError

if TYPE_CHECKING:
    import sqlalchemy as sa

    from tokenledger._reservations import BudgetStore
    from tokenledger.budgets import BudgetStatus

__all__ = ["budgets"]

R = TypeVar("R")

_NO_BUDGETS = "No budgets set. Set one with `tokenledger budgets set global --usd 5 --per day`."
_WINDOW_CHOICES = click.Choice(["hour", "day", "week", "month", "total"])
_ACTION_CHOICES = click.Choice(["raise", "warn", "downgrade"])


def _budget_store(engine: sa.Engine) -> BudgetStore:
    from tokenledger._reservations import BudgetStore

    # The lease applies to reservations, which these commands never take.
    return BudgetStore(engine, lease_seconds=120.0)


def _with_budgets(engine: sa.Engine, use: Callable[[BudgetStore], R]) -> R:
    store = _budget_store(engine)
    try:
        return use(store)
    finally:
        store.dispose()
        engine.dispose()


def _group_db(ctx: click.Context, db_url: str | None) -> str | None:
    """``--db`` given to the subcommand, else to ``budgets`` itself."""
    if db_url is not None or ctx.parent is None:
        return db_url
    parent: str | None = ctx.parent.params.get("db_url")
    return parent


def _budget_json(status: BudgetStatus) -> dict[str, Any]:
    return {
        "scope": status.scope,
        "per": status.per,
        "action": status.action,
        "downgrade_to": list(status.downgrade_to),
        "limit_usd": status.limit_usd,
        "spent_usd": status.spent_usd,
        "reserved_usd": status.reserved_usd,
        "remaining_usd": status.remaining_usd,
        "overshoot_usd": status.overshoot_usd,
        "limit_tokens": status.limit_tokens,
        "spent_tokens": status.spent_tokens,
        "reserved_tokens": status.reserved_tokens,
        "remaining_tokens": status.remaining_tokens,
        "window_start": status.window_start,
        "resets_at": status.resets_at,
    }


def _budget_figure(status: BudgetStatus, usd: Decimal | None, tokens: int | None) -> str:
    """A figure in the units the budget limits: dollars, tokens, or both."""
    parts = []
    if status.limit_usd is not None:
        parts.append(money(usd if usd is not None else Decimal(0)))
    if status.limit_tokens is not None:
        parts.append(f"{tokens or 0:,} tok")
    return " + ".join(parts)


def _budgets_table(statuses: Sequence[BudgetStatus], *, width: int) -> Table:
    def remaining(status: BudgetStatus) -> str:
        text = _budget_figure(status, status.remaining_usd, status.remaining_tokens)
        exhausted = status.remaining_usd == 0 or status.remaining_tokens == 0
        return f"[red]{text}[/]" if exhausted else text

    def action(status: BudgetStatus) -> str:
        if status.action != "downgrade":
            return status.action
        return f"downgrade [dim]→[/] {escape(', '.join(status.downgrade_to))}"

    overshoots = [
        f"`{s.scope}` ({s.per}) {money(s.overshoot_usd)}" for s in statuses if s.overshoot_usd
    ]
    caption = "Windows are UTC calendar windows; reset times are local."
    if overshoots:
        caption += (
            "\nOvershoot (calls without max_tokens that cost more than they reserved): "
            + "; ".join(overshoots)
        )
    return fit_table(
        [
            Column("Scope", [escape(s.scope) for s in statuses], name=True),
            Column("Window", [s.per for s in statuses], left=True),
            Column("Limit", [_budget_figure(s, s.limit_usd, s.limit_tokens) for s in statuses]),
            Column("Spent", [_budget_figure(s, s.spent_usd, s.spent_tokens) for s in statuses]),
            Column(
                "Reserved",
                [_budget_figure(s, s.reserved_usd, s.reserved_tokens) for s in statuses],
                drop=2,
            ),
            Column("Remaining", [remaining(s) for s in statuses], style="bold"),
            Column("Resets", [when(s.resets_at) or "never" for s in statuses], left=True, drop=3),
            Column("Action", [action(s) for s in statuses], left=True, drop=1),
        ],
        width=width,
        caption=caption,
    )


def _list_budgets(db_url: str | None, as_json: bool) -> None:
    engine = open_for_reading(db_url)
    statuses = [] if engine is None else _with_budgets(engine, lambda store: store.status())
    if as_json:
        print_json([_budget_json(s) for s in statuses])
    elif statuses:
        show_table(lambda width: _budgets_table(statuses, width=width))
    else:
        say(_NO_BUDGETS)


@click.group("budgets", invoke_without_command=True)
@db_option
@json_option
@click.pass_context
def budgets(ctx: click.Context, db_url: str | None, as_json: bool) -> None:
    """List budgets (the default), set one, or remove one.

    A budget caps what calls may spend, checked before each call in every process that
    shares the ledger. The list shows each budget's limit and what its current window
    has spent, reserved (calls in flight) and has left, and when the window resets.
    """
    if ctx.invoked_subcommand is None:
        _list_budgets(db_url, as_json)


@budgets.command("list")
@db_option
@json_option
@click.pass_context
def budgets_list(ctx: click.Context, db_url: str | None, as_json: bool) -> None:
    """List budgets: limit, spent, reserved, remaining, and when each window resets."""
    parent_json = bool(ctx.parent.params.get("as_json")) if ctx.parent is not None else False
    _list_budgets(_group_db(ctx, db_url), as_json or parent_json)


@budgets.command("set")
@click.argument("scope")
@click.option("--usd", metavar="AMOUNT", help="Limit in US dollars, e.g. 5 or 0.50.")
@click.option("--tokens", type=int, metavar="N", help="Limit in tokens (input + output).")
@click.option(
    "--per",
    type=_WINDOW_CHOICES,
    default="day",
    show_default=True,
    help="The window: a UTC calendar hour, day, week or month, or total (never resets).",
)
@click.option(
    "--action",
    type=_ACTION_CHOICES,
    default="raise",
    show_default=True,
    help="When a call would pass the limit: raise BudgetExceeded (nothing is sent), warn "
    "and let it through, or downgrade to a cheaper model.",
)
@click.option(
    "--downgrade-to",
    "downgrade_to",
    metavar="MODELS",
    help="Cheaper models to fall back to, in order, comma-separated (with --action downgrade).",
)
@db_option
@click.pass_context
def budgets_set(
    ctx: click.Context,
    scope: str,
    usd: str | None,
    tokens: int | None,
    per: str,
    action: str,
    downgrade_to: str | None,
    db_url: str | None,
) -> None:
    """Set (or replace) the budget of SCOPE for one window.

    SCOPE is global, agent:NAME, user:ID, tenant:ID, or any TAGKEY:VALUE of run tags.
    Replacing a budget keeps what its current window has spent. Creates the ledger if
    there is none yet. Example: tokenledger budgets set user:42 --usd 5 --per day
    """
    from tokenledger import _schema as schema
    from tokenledger.budgets import parse_shared_budget

    chain = [m.strip() for m in downgrade_to.split(",")] if downgrade_to is not None else []
    if usd is None and tokens is None:
        raise click.UsageError(
            f"Budget `{scope}` needs a limit: give --usd AMOUNT, --tokens N, or both "
            f"(e.g. tokenledger budgets set {scope} --usd 5)."
        )
    try:
        spec = parse_shared_budget(
            scope, usd=usd, tokens=tokens, per=per, action=action, downgrade_to=chain
        )
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from exc
    url, _path = resolve_url(_group_db(ctx, db_url))
    engine = engine_for(url)
    try:
        schema.ensure_schema(engine)  # a new ledger is created; one at another revision refused
    except BaseException:
        engine.dispose()
        raise

    def put(store: BudgetStore) -> BudgetStatus:
        store.put(*spec)
        return next(s for s in store.status() if (s.scope, s.per) == spec[:2])

    status = _with_budgets(engine, put)
    limit = " and ".join(
        part
        for part in (
            usd_text(status.limit_usd) if status.limit_usd is not None else "",
            f"{status.limit_tokens:,} tokens" if status.limit_tokens is not None else "",
        )
        if part
    )
    window = "in total" if status.per == "total" else f"per {status.per} (UTC)"
    fallback = f" to {', '.join(status.downgrade_to)}" if status.downgrade_to else ""
    say(
        f"Set budget `{status.scope}`: {limit} {window}, action {status.action}{fallback}. "
        f"Spent so far: {usd_text(status.spent_usd)}, {status.spent_tokens:,} tokens."
    )


@budgets.command("rm")
@click.argument("scope")
@click.option(
    "--per",
    type=_WINDOW_CHOICES,
    default=None,
    help="Remove only this window's budget (default: every budget of SCOPE).",
)
@db_option
@click.pass_context
def budgets_rm(ctx: click.Context, scope: str, per: str | None, db_url: str | None) -> None:
    """Remove the budget of SCOPE (every window, or only --per's)."""
    from tokenledger.budgets import parse_scope

    try:
        scope = parse_scope(scope)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="'SCOPE'") from exc
    engine = open_for_reading(_group_db(ctx, db_url))
    removed = 0 if engine is None else _with_budgets(engine, lambda s: s.remove(scope, per))
    which = f"`{scope}` ({per})" if per else f"`{scope}`"
    if not removed:
        raise click.ClickException(
            f"There is no budget {which} in this ledger; `tokenledger budgets` lists them."
        )
    say(f"Removed the budget {which}." if removed == 1 else f"Removed {removed} budgets {which}.")
