"""The recorder: one home for the steps of a model call, top to bottom.

Every path that sees a model call — litellm capture, the SDK integrations, the
OpenTelemetry span processor, `Ledger.record_call` and `Run.charge` — hands it here:

1. **reserve** (`Recorder.before_call`): before the request leaves the process, its
   upper-bound cost is reserved on every budget that applies, or it is refused;
2. **price** (`tokenledger.pricing.price_call`): the call's cost, from the provider's
   reported figure or the price table;
3. **span**: the call's OpenTelemetry span and metrics;
4. **run totals**: the call is added to its run and every ancestor;
5. **settle**: the reservation is replaced by the actual cost (or the spend of a call
   recorded after the fact is added to the budgets);
6. **write**: the row is queued for the background writer.

Runs, pending calls and integrations reach the recorder through the `CallRecorder`
protocol below, never through the ledger's private attributes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from tokenledger._internal import internal_error
from tokenledger.exceptions import UnpricedModelWarning

if TYPE_CHECKING:
    from collections.abc import Callable

    from tokenledger._enforcer import BudgetEnforcer
    from tokenledger._spans import Telemetry
    from tokenledger._writer import BatchWriter
    from tokenledger.capture import PendingCall
    from tokenledger.pricing import PriceBook
    from tokenledger.records import CallRecord, PriceRecord, RunRecord, TokenUsage
    from tokenledger.runs import Run

__all__ = ["MAX_TEXT_LENGTH", "CallRecorder", "Recorder", "bound_text"]

logger = logging.getLogger("tokenledger")

# A long run with many watched streams keeps a list of them; it is pruned of finished
# ones whenever its length reaches a power of two at or above this.
_PRUNE_STREAMS_AT = 64


class CallRecorder(Protocol):
    """What runs, pending calls and integrations may ask of the recorder."""

    telemetry: Telemetry

    def may_reserve(self, run: Run | None) -> bool:
        """Whether any budget can apply to a call in ``run`` (cheap, no I/O)."""

    def before_call(self, pending: PendingCall, kwargs: dict[str, Any]) -> None:
        """Reserve the call on every budget that applies; may raise `BudgetExceeded`."""

    def release(self, pending: PendingCall) -> None:
        """The request was never sent: give back anything reserved for it."""

    def complete_call(
        self, pending: PendingCall, *, provider_cost: Any = None, usage: TokenUsage | None = None
    ) -> None:
        """Price, trace, total, settle and write a finished call."""

    def record_finished(
        self,
        run: Run | None,
        call: CallRecord,
        *,
        provider: str | None = None,
        start_ns: int | None = None,
        status: str = "ok",
        usage: TokenUsage | None = None,
        model: str | None = None,
        estimated: bool = False,
        error_type: str | None = None,
        finish_reasons: list[str] | None = None,
        provider_cost: Any = None,
        latency_ms: float | None = None,
    ) -> CallRecord:
        """Record a call that already happened; its spend is added to the budgets."""

    def watch_stream(self, pending: PendingCall) -> None:
        """Remember an open stream, so the end of its run can record it as abandoned."""

    def run_started(self, run: Run) -> None: ...

    def run_ending(self, run: Run) -> None: ...

    def put_run(self, record: RunRecord) -> None: ...


#: The longest text stored in a call's name-like columns (model, provider, operation,
#: error type, tool name, litellm call id). Longer text is cut to this many characters,
#: ending in "…": a 3,000-character model name must not make PostgreSQL refuse the row
#: (its indexes hold at most ~2.7 kB an entry), and no real name comes near it.
MAX_TEXT_LENGTH = 256
_BOUNDED_FIELDS = (
    "model",
    "requested_model",
    "provider",
    "operation",
    "error_type",
    "tool_name",
    "litellm_call_id",
)


def bound_text(call: CallRecord) -> None:
    """Cut every name-like field of ``call`` to `MAX_TEXT_LENGTH` characters."""
    for field in _BOUNDED_FIELDS:
        value = getattr(call, field)
        if value is not None and len(value) > MAX_TEXT_LENGTH:
            setattr(call, field, str(value)[: MAX_TEXT_LENGTH - 1] + "…")
    reasons = call.finish_reasons
    if reasons and (len(reasons) > 16 or any(len(r) > MAX_TEXT_LENGTH for r in reasons)):
        call.finish_reasons = [r[:MAX_TEXT_LENGTH] for r in reasons[:16]]


class Recorder:
    """Owns a ledger's call pipeline: its budgets, prices, telemetry and writer."""

    def __init__(
        self,
        *,
        writer: BatchWriter,
        telemetry: Telemetry,
        prices: Callable[[], PriceBook],
    ) -> None:
        self.writer = writer
        self.telemetry = telemetry
        self._prices = prices
        # Set by the ledger once it exists: the enforcer reads the ledger's prices and URL.
        self.budgets: BudgetEnforcer
        self._known_price_ids: set[str] = set()
        self._streams_lock = threading.Lock()
        self._open_streams: dict[str, list[PendingCall]] = {}

    # -- 1. reserve ---------------------------------------------------------------------
    def may_reserve(self, run: Run | None) -> bool:
        return self.budgets.may_apply(run)

    def before_call(self, pending: PendingCall, kwargs: dict[str, Any]) -> None:
        """Before a request leaves the process: reserve it on every budget that applies.

        Raises `BudgetExceeded` (no request is sent) or changes ``kwargs["model"]`` to a
        cheaper model when a ``downgrade`` budget says so.
        """
        self.budgets.before_call(pending, kwargs)

    def release(self, pending: PendingCall) -> None:
        self.budgets.release(pending)

    # -- 2..6. a finished call ----------------------------------------------------------
    def complete_call(
        self, pending: PendingCall, *, provider_cost: Any = None, usage: TokenUsage | None = None
    ) -> None:
        """Price, trace, total, settle and queue a finished call. ``usage``: the
        `TokenUsage` its counts were just set from, if the caller has it (saves building
        it again)."""
        from tokenledger.pricing import price_call

        call = pending.call
        bound_text(call)
        try:
            price = price_call(self._prices(), call, pending.provider, provider_cost, usage)
        except UnpricedModelWarning:
            # A warnings filter turned the warning into an error. The cost was decided
            # (left unknown) before it was raised, and it is in the log: record the call.
            pass
        except Exception as exc:
            internal_error(exc, "could not price call %s; its cost is left unknown", call.id)
        else:
            if price is not None and price.id not in self._known_price_ids:
                self.put_price(price)
        run = pending.run
        call.trace_id, call.span_id = self.telemetry.call_span(
            call, run.span if run is not None else None, pending.start_ns, time.time_ns()
        )
        self.telemetry.record_metrics(call)
        if run is not None:
            run.add_call(call)
        if pending.reservation is not None:
            self.budgets.after_call(pending)
        elif pending.account_spend:
            self.budgets.add_spend(pending)
        self.writer.put_call(call)

    def record_finished(
        self,
        run: Run | None,
        call: CallRecord,
        *,
        provider: str | None = None,
        start_ns: int | None = None,
        status: str = "ok",
        usage: TokenUsage | None = None,
        model: str | None = None,
        estimated: bool = False,
        error_type: str | None = None,
        finish_reasons: list[str] | None = None,
        provider_cost: Any = None,
        latency_ms: float | None = None,
    ) -> CallRecord:
        """Record a call that already happened (the one way for `Ledger.record_call`,
        `Run.charge` and the span processor): no reservation; its spend is added to the
        budgets that apply."""
        from tokenledger.capture import PendingCall

        pending = PendingCall(self, run, call)
        pending.provider = provider
        if start_ns is not None:
            pending.start_ns = start_ns
        pending.account_spend = True
        pending.claim()
        pending.finish(
            status=status,
            usage=usage,
            model=model,
            estimated=estimated,
            error_type=error_type,
            finish_reasons=finish_reasons,
            provider_cost=provider_cost,
            latency_ms=latency_ms,
        )
        return call

    # -- streams and runs ---------------------------------------------------------------
    def watch_stream(self, pending: PendingCall) -> None:
        run = pending.run
        if run is None:
            return
        with self._streams_lock:
            open_calls = self._open_streams.setdefault(run.id, [])
            count = len(open_calls)
            if count >= _PRUNE_STREAMS_AT and not count & (count - 1):
                # Drop the finished ones whenever the list doubles, so memory follows
                # what is open, not what was.
                open_calls[:] = [p for p in open_calls if not p.done]
            open_calls.append(pending)

    def open_streams(self, run_id: str) -> list[PendingCall]:
        """The streams of a run still being watched (finished ones may be among them)."""
        with self._streams_lock:
            return list(self._open_streams.get(run_id, ()))

    def run_started(self, run: Run) -> None:
        self.writer.put_run(run.snapshot())

    def run_ending(self, run: Run) -> None:
        from tokenledger.capture import finish_abandoned

        with self._streams_lock:
            streams = self._open_streams.pop(run.id, None)
        for pending in streams or ():
            if not pending.done:
                finish_abandoned(pending)
        if run.budget is not None:
            # Nothing more is reserved against this run's own budget once it ends.
            self.budgets.forget_run(run)

    def put_run(self, record: RunRecord) -> None:
        self.writer.put_run(record)

    def put_price(self, price: PriceRecord) -> None:
        self._known_price_ids.add(price.id)
        self.writer.put_price(price)
