"""The budget enforcer: what happens before and after each captured call.

Before a call `BudgetEnforcer.before_call` finds the budgets that apply
(`tokenledger._budget_scope`), estimates the call, and reserves the estimate: first on
the in-memory budgets of its runs, then on the shared budgets in the database
(`tokenledger._reservations`). A refusal raises `BudgetExceeded` (action ``raise``),
tries the next cheaper model (``downgrade``), or is only reported (``warn``, whose
budgets are tracked and never refuse). After the call the reservation is settled at the
call's actual cost, or released when the call failed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import warnings
from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple

from tokenledger._budget_scope import (
    Amount,
    Estimate,
    WindowFigures,
    WindowKey,
    estimate_call,
    runs_with_budgets,
    shared_budgets_for,
    window_keys,
)
from tokenledger._money import usd_text
from tokenledger._reservations import BudgetStore, BudgetWindow
from tokenledger.budgets import BudgetDef, parse_shared_budget, window_bounds
from tokenledger.exceptions import BudgetExceeded, BudgetWarning, ConfigurationError, LedgerError
from tokenledger.records import new_id, utcnow

if TYPE_CHECKING:
    from tokenledger.budgets import Budget
    from tokenledger.capture import PendingCall
    from tokenledger.ledger import Ledger
    from tokenledger.records import CallRecord
    from tokenledger.runs import Run

__all__ = ["BudgetEnforcer", "Reservation"]

logger = logging.getLogger("tokenledger")


@dataclasses.dataclass
class Reservation:
    """What a call holds until it settles: shared-budget windows and in-memory runs."""

    id: str
    estimate: Estimate
    lines: list[WindowKey]  # reserved in the database, ``warn_only`` included
    run_lines: list[Run]
    warn_only: list[WindowKey]  # warn budgets: tracked, never refused

    @property
    def amount(self) -> Amount:
        return Amount(self.estimate.usd or Decimal(0), self.estimate.tokens)


NO_AMOUNT = Amount(Decimal(0), 0)


class _Limit(NamedTuple):
    """A budget as a message names it."""

    scope: str
    per: str
    usd: Decimal | None
    tokens: int | None


class _Refused(NamedTuple):
    """Why a call may not proceed with the model tried, and what the budget says to do."""

    action: str
    message: str


class _RunFigures(NamedTuple):
    """A run whose budget a call would pass, and that budget's figures."""

    run: Run
    figures: WindowFigures


class _RunBudgets:
    """What calls in flight hold on the budgets given to runs (``budget=``). A run lives
    in one process, so its budget is kept in memory, against its recorded spend."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reserved: dict[str, Amount] = {}
        # Spend charged at its estimate because no cost could be computed: the run's
        # own totals leave such calls out, so the budget counts them here.
        self._charged: dict[str, Amount] = {}

    def reserve(
        self,
        runs: list[Run],
        amount: Amount,
        held: list[Run],
        passed: list[_RunFigures],
    ) -> _RunFigures | None:
        """Reserve ``amount`` on the budgets of ``runs`` (a run and its ancestors).

        Returns the first budget that refuses and its figures, or None. A ``warn``
        budget that this call passes holds the call too and is added to ``passed``;
        the budgets above it are still checked.
        """
        with self._lock:
            for run in runs:
                budget = _cap(run)
                charged = self._charged.get(run.id, NO_AMOUNT)
                spent = run.cost_usd + charged.usd
                reserved = self._reserved.get(run.id, NO_AMOUNT)
                used_tokens = run.input_tokens + run.output_tokens + charged.tokens
                over_usd = budget.usd is not None and spent + reserved.usd + amount.usd > budget.usd
                over_tokens = budget.tokens is not None and (
                    used_tokens + reserved.tokens + amount.tokens > budget.tokens
                )
                figures = WindowFigures(spent, reserved.usd, used_tokens, reserved.tokens)
                if (over_usd or over_tokens) and budget.action != "warn":
                    return _RunFigures(run, figures)
                now_held = Amount(reserved.usd + amount.usd, reserved.tokens + amount.tokens)
                self._reserved[run.id] = now_held
                held.append(run)
                if over_usd or over_tokens:
                    figures = WindowFigures(spent, now_held.usd, used_tokens, now_held.tokens)
                    passed.append(_RunFigures(run, figures))
        return None

    def release(self, runs: list[Run], amount: Amount) -> None:
        with self._lock:
            for run in runs:
                reserved = self._reserved.get(run.id, Amount(Decimal(0), 0))
                left = Amount(reserved.usd - amount.usd, reserved.tokens - amount.tokens)
                if left.usd <= 0 and left.tokens <= 0:
                    self._reserved.pop(run.id, None)
                else:
                    self._reserved[run.id] = left

    def charge(self, runs: list[Run], amount: Amount) -> None:
        """Count ``amount`` as spent on these runs' budgets (a call with no cost)."""
        with self._lock:
            for run in runs:
                charged = self._charged.get(run.id, NO_AMOUNT)
                self._charged[run.id] = Amount(
                    charged.usd + amount.usd, charged.tokens + amount.tokens
                )

    def forget(self, run: Run) -> None:
        with self._lock:
            self._reserved.pop(run.id, None)
            self._charged.pop(run.id, None)


def _usage_unknown(call: CallRecord) -> bool:
    """The provider's usage could not be read, and nothing was counted in its place."""
    return call.usage_estimated and not (call.input_tokens or call.output_tokens)


class BudgetEnforcer:
    """Decides, before each captured call, whether it may spend; settles it after."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        lease_seconds: float = 120.0,
        default_max_output_tokens: int = 4096,
        failure_policy: str = "fail_closed",
        io_timeout: float = 1.0,
    ) -> None:
        if failure_policy not in ("fail_closed", "fail_open"):
            raise ConfigurationError(
                f"`budget_failure_policy` is {failure_policy!r}; it must be 'fail_closed' "
                "(refuse budgeted calls while the database is unreachable) or 'fail_open' "
                "(let them through and report it)."
            )
        self.failure_policy = failure_policy
        #: Calls let through unreserved under ``fail_open`` while the database was down.
        self.unreserved_calls = 0
        self.ledger = ledger
        self.store = BudgetStore(ledger.engine, lease_seconds=lease_seconds, io_timeout=io_timeout)
        self.default_max_output_tokens = default_max_output_tokens
        self._runs = _RunBudgets()

    # -- public surface used by the Ledger ---------------------------------------------
    def set_budget(
        self,
        scope: str,
        *,
        usd: Any,
        tokens: Any,
        per: str,
        action: str,
        downgrade_to: Sequence[str],
    ) -> BudgetDef:
        spec = parse_shared_budget(
            scope, usd=usd, tokens=tokens, per=per, action=action, downgrade_to=downgrade_to
        )
        return self.store.put(*spec)

    def may_apply(self, run: Run | None) -> bool:
        """Whether a budget might apply to a call in ``run``, without any I/O: False only
        when no run in the chain has a budget and the cached list of shared budgets is
        fresh and empty."""
        return bool(runs_with_budgets(run)) or not self.store.known_empty()

    def applicable(self, run: Run | None) -> tuple[list[BudgetDef], list[Run]]:
        """The shared budgets and the runs with a budget that a call in ``run`` spends
        from."""
        run_budgets = runs_with_budgets(run)
        return shared_budgets_for(self.store.definitions(), run), run_budgets

    def estimate(self, pending: PendingCall, kwargs: dict[str, Any], model: str) -> Estimate:
        return estimate_call(
            self.ledger.prices,
            pending.call,
            kwargs,
            model,
            default_max_output_tokens=self.default_max_output_tokens,
        )

    # -- before a call -----------------------------------------------------------------
    def before_call(self, pending: PendingCall, kwargs: dict[str, Any]) -> None:
        try:
            shared, run_budgets = self.applicable(pending.run)
        except LedgerError as exc:
            # The budgets were never read (the database has been down since start-up):
            # which ones apply is unknown, so the policy decides for every call.
            if self.failure_policy == "fail_closed":
                raise LedgerError(
                    f"tokenledger could not read the budgets of the ledger at "
                    f"{self.ledger.url} ({exc}); the call was not sent because budgets "
                    "fail closed."
                ) from exc
            # fail_open: the shared budgets are unknown, but run budgets need no database.
            self._count_unreserved(pending.call.requested_model or "?", exc)
            shared, run_budgets = [], runs_with_budgets(pending.run)
        if not shared and not run_budgets:
            return
        requested = pending.call.requested_model or ""
        candidates = [requested]
        for chain in [d.downgrade_to for d in shared if d.action == "downgrade"] + [
            _cap(r).downgrade_to for r in run_budgets if _cap(r).action == "downgrade"
        ]:
            candidates.extend(m for m in chain if m not in candidates)
        refusal: _Refused | None = None
        for model in candidates:
            estimate = self.estimate(pending, kwargs, model)
            refusal = self._try_reserve(pending, shared, run_budgets, estimate)
            if refusal is None:
                if model != requested:
                    self._downgrade(pending, kwargs, requested, model)
                return
            if refusal.action == "raise":
                break
        assert refusal is not None
        if pending.run is not None:
            pending.run.mark_budget_exceeded()
        raise BudgetExceeded(refusal.message)

    def _downgrade(
        self, pending: PendingCall, kwargs: dict[str, Any], requested: str, model: str
    ) -> None:
        """Send the call, reserved for the cheaper ``model``, to that model."""
        if "model" not in kwargs:
            # model given positionally: litellm reuses the positional args.
            # Give back what was just reserved for the cheaper model.
            self.release(pending)
            if pending.run is not None:
                pending.run.mark_budget_exceeded()
            raise BudgetExceeded(
                f"Budget would be exceeded by this call to {requested} and it "
                f"cannot be downgraded to {model} because its model was passed "
                "positionally; pass model= as a keyword. No request was sent."
            )
        kwargs["model"] = model
        pending.call.requested_model = requested
        # The model the request goes to: the row keeps it (and is priced at
        # it) even when the response does not name the model that served it.
        pending.call.model = model
        pending.downgraded_to = model
        logger.warning(
            "tokenledger downgraded a call from %s to %s to fit a budget", requested, model
        )

    def _try_reserve(
        self,
        pending: PendingCall,
        shared: list[BudgetDef],
        run_budgets: list[Run],
        estimate: Estimate,
    ) -> _Refused | None:
        now = utcnow()
        enforce: list[BudgetWindow] = []
        track: list[BudgetWindow] = []
        for d in shared:
            start, _reset = window_bounds(d.per, now)
            (track if d.action == "warn" else enforce).append((d, start))
        if estimate.usd is None and (
            any(d.usd is not None for d, _ in enforce)
            or any(_cap(r).usd is not None for r in run_budgets if _cap(r).action != "warn")
        ):
            return _Refused(
                "raise",
                f"No price is known for model `{estimate.model}`, so tokenledger cannot "
                "bound its cost against a USD budget; set one with "
                f"`ledger.set_price('{estimate.model}', input_per_million=..., "
                "output_per_million=...)`.",
            )
        amount = Amount(estimate.usd or Decimal(0), estimate.tokens)
        # In-memory run budgets first: cheapest to check, no I/O.
        held_runs: list[Run] = []
        passed: list[_RunFigures] = []
        refused_run = self._runs.reserve(run_budgets, amount, held_runs, passed)
        if refused_run is not None:
            self._runs.release(held_runs, amount)
            run, figures = refused_run
            budget = _cap(run)
            limit = _Limit(f"run:{run.name}", "run", budget.usd, budget.tokens)
            return _Refused(budget.action, _refusal_message(limit, figures, estimate, None))
        reservation_id = new_id()
        if enforce or track:
            try:
                refused = self.store.reserve(
                    reservation_id, enforce, track, amount.usd, amount.tokens, reclaim=True
                )
            except BudgetExceeded:
                raise
            except Exception as exc:
                if self.failure_policy == "fail_closed":
                    self._runs.release(held_runs, amount)
                    raise LedgerError(
                        f"tokenledger could not reserve budget for a call to {estimate.model} "
                        f"(database at {self.ledger.url}: {exc.__class__.__name__}); the call "
                        "was not sent because budgets fail closed."
                    ) from exc
                # fail_open: the call proceeds unreserved, and says so.
                self._count_unreserved(estimate.model, exc)
                enforce, track, refused = [], [], None
            if refused is not None:
                self._runs.release(held_runs, amount)
                d = refused.budget
                _start, reset = window_bounds(d.per, now)
                message = _refusal_message(
                    _Limit(d.scope, d.per, d.usd, d.tokens), refused.figures, estimate, reset
                )
                return _Refused(d.action, message)
        # Warn only once the call is sure to proceed.
        for run, figures in passed:
            budget = _cap(run)
            limit = _Limit(f"run:{run.name}", "run", budget.usd, budget.tokens)
            self._warn(f"Run `{run.name}` budget", limit, figures, estimate, pending)
        for d, start in track:
            try:
                figures = self.store.bounded(self.store.window_figures, d.id, start)
            except Exception as exc:
                logger.warning("tokenledger could not read budget `%s` to warn: %s", d.scope, exc)
                continue
            if figures.over(d.usd, d.tokens):
                limit = _Limit(d.scope, d.per, d.usd, d.tokens)
                self._warn(f"Budget `{d.scope}` ({d.per})", limit, figures, estimate, pending)
        pending.reservation = Reservation(
            id=reservation_id,
            estimate=estimate,
            lines=[WindowKey(d.id, s) for d, s in enforce + track],
            run_lines=held_runs,
            warn_only=[WindowKey(d.id, s) for d, s in track],
        )
        return None

    def _count_unreserved(self, model: str, exc: BaseException) -> None:
        self.unreserved_calls += 1
        logger.warning(
            "tokenledger could not reserve budget for a call to %s (database at %s: "
            "%s); the call proceeds unreserved because budget_failure_policy is "
            "fail_open (%d such calls so far)",
            model,
            self.ledger.url,
            exc.__class__.__name__,
            self.unreserved_calls,
        )

    def _warn(
        self,
        label: str,
        limit: _Limit,
        figures: WindowFigures,
        estimate: Estimate,
        pending: PendingCall,
    ) -> None:
        spent, reserved = _figures_text(limit, figures)
        message = (
            f"{label} is over its limit of {_limit_text(limit)} (spent "
            f"{spent}, reserved {reserved}, this call included); the call to "
            f"{estimate.model}, estimated at {usd_text(estimate.usd, style='exact')}, proceeds "
            "because the budget's action is `warn`."
        )
        warnings.warn(message, BudgetWarning, stacklevel=4)
        logger.warning(message)
        span = pending.run.span if pending.run is not None else None
        if span is not None and span.is_recording():
            span.add_event(
                "tokenledger.budget.exceeded",
                {"tokenledger.budget": label, "tokenledger.budget.action": "warn"},
            )

    # -- after a call ------------------------------------------------------------------
    def after_call(self, pending: PendingCall) -> None:
        reservation = self._take_reservation(pending)
        if reservation is None:
            return
        call = pending.call
        estimate = reservation.estimate
        est_usd = reservation.amount.usd
        spent = Amount(call.cost_usd or Decimal(0), call.input_tokens + call.output_tokens)
        unknown_usage = _usage_unknown(call)
        if call.cost_usd is None and (call.status == "ok" or unknown_usage):
            # No cost could be computed (the usage was missing, negative, NaN, absurd):
            # charge the estimate the call was reserved at, never zero, so bad usage
            # cannot let a budget spend freely. The run's own totals leave the call out,
            # so its run budgets are charged the same here.
            spent = Amount(est_usd, reservation.amount.tokens if unknown_usage else spent.tokens)
            self._runs.charge(
                reservation.run_lines,
                Amount(est_usd, reservation.amount.tokens if unknown_usage else 0),
            )
        if estimate.usd is not None and spent.usd > est_usd:
            logger.warning(
                "Call %s to %s cost $%s, more than the $%s reserved for it (no max_tokens?); "
                "the overshoot is recorded on its budgets.",
                call.id,
                call.model or call.requested_model,
                spent.usd,
                est_usd,
            )
        self._settle(
            reservation,
            spent,
            "tokenledger could not settle budget reservation %s; its lease will expire "
            "and be reclaimed",
        )

    def release(self, pending: PendingCall) -> None:
        reservation = self._take_reservation(pending)
        if reservation is not None:
            self._settle(
                reservation,
                Amount(Decimal(0), 0),
                "tokenledger could not release budget reservation %s",
            )

    def _take_reservation(self, pending: PendingCall) -> Reservation | None:
        """The call's reservation, taken off it (so it is settled once), with what it
        held on its runs' budgets given back."""
        reservation: Reservation | None = pending.reservation
        if reservation is None:
            return None
        pending.reservation = None
        self._runs.release(reservation.run_lines, reservation.amount)
        return reservation

    def _settle(self, reservation: Reservation, spent: Amount, failure: str) -> None:
        """Settle ``reservation`` at ``spent``; a failure is logged, never raised into
        the agent loop (the reservation's lease runs out and it is reclaimed)."""
        held = reservation.amount
        try:
            self.store.settle(
                reservation.id, reservation.lines, held.usd, held.tokens, spent.usd, spent.tokens
            )
        except Exception:
            logger.exception(failure, reservation.id)

    def add_spend(self, pending: PendingCall) -> None:
        """Add a call that was never reserved (``record_call``, ``run.charge``) to the
        shared budgets that apply, so recorded spend counts against them too."""
        call = pending.call
        usd = call.cost_usd or Decimal(0)
        tokens = call.input_tokens + call.output_tokens
        if not usd and not tokens:
            return
        try:
            shared, _runs = self.applicable(pending.run)
            if not shared:
                return
            self.store.add_spend(window_keys(shared, utcnow()), usd, tokens)
        except Exception:
            logger.exception("tokenledger could not add call %s to its budgets", call.id)

    def forget_run(self, run: Run) -> None:
        self._runs.forget(run)


# -- wording ----------------------------------------------------------------------------


def _limit_text(limit: _Limit) -> str:
    return " and ".join(
        part
        for part in (
            usd_text(limit.usd, style="exact") if limit.usd is not None else "",
            f"{limit.tokens:,} tokens" if limit.tokens is not None else "",
        )
        if part
    )


def _figures_text(limit: _Limit, figures: WindowFigures) -> tuple[str, str]:
    """Spent and reserved in the units the budget is limited in (USD, tokens, or both)."""
    texts = []
    for usd, tokens in (
        (figures.spent_usd, figures.spent_tokens),
        (figures.reserved_usd, figures.reserved_tokens),
    ):
        parts = []
        if limit.usd is not None or limit.tokens is None:
            parts.append(usd_text(usd, style="exact"))
        if limit.tokens is not None:
            parts.append(f"{tokens:,} tokens")
        texts.append(" and ".join(parts))
    return texts[0], texts[1]


def _refusal_message(
    limit: _Limit, figures: WindowFigures, estimate: Estimate, resets_at: dt.datetime | None
) -> str:
    spent, reserved = _figures_text(limit, figures)
    reset = (
        f"; the window resets at {resets_at.isoformat()}"
        if resets_at is not None
        else ("; it does not reset" if limit.per == "total" else "")
    )
    return (
        f"Budget `{limit.scope}` ({limit.per}) would be exceeded: limit {_limit_text(limit)}, "
        f"spent {spent}, reserved {reserved}, and this call to {estimate.model} is estimated at "
        f"{usd_text(estimate.usd, style='exact')} ({estimate.tokens:,} tokens){reset}. "
        "No request was sent."
    )


def _cap(run: Run) -> Budget:
    """The budget of a run that `runs_with_budgets` returned (it has one)."""
    budget = run.budget
    assert budget is not None
    return budget
