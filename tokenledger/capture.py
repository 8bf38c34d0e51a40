"""Recording a model call, for every client: the `PendingCall` and `begin_call`.

A `PendingCall` is a call between its request and its outcome. litellm capture
(`tokenledger._litellm`) makes one for each litellm call; the SDK integrations make one
with `begin_call` / `abegin_call`, the documented contract for clients no integration
covers. Either way the call is reserved on the budgets before its request is sent, then
finished once (`succeed`, `fail`, `abandon`) and handed to the ledger's recorder, which
prices, traces, totals, settles and writes it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tokenledger import semconv as sc
from tokenledger._internal import internal_error
from tokenledger.exceptions import BudgetExceeded, UsageError
from tokenledger.records import CallRecord, TokenUsage, new_call, new_id, utcnow
from tokenledger.runs import current_run
from tokenledger.usage import usage_from_response

if TYPE_CHECKING:
    from tokenledger._recorder import CallRecorder
    from tokenledger.ledger import Ledger
    from tokenledger.runs import Run

__all__ = ["PendingCall", "abegin_call", "begin_call", "capture_ledger", "set_capture_ledger"]

logger = logging.getLogger("tokenledger")

# litellm provider names -> OpenTelemetry gen_ai.provider.name well-known values.
_PROVIDER_NAMES = {
    "bedrock": "aws.bedrock",
    "bedrock_converse": "aws.bedrock",
    "sagemaker": "aws.sagemaker",
    "vertex_ai": "gcp.vertex_ai",
    "vertex_ai_beta": "gcp.vertex_ai",
    "gemini": "gcp.gemini",
    "azure": "azure.ai.openai",
    "azure_ai": "azure.ai.inference",
    "mistral": "mistral_ai",
    "xai": "x_ai",
    "watsonx": "ibm.watsonx.ai",
}


def provider_name(litellm_provider: str | None) -> str | None:
    if litellm_provider is None:
        return None
    return _PROVIDER_NAMES.get(litellm_provider, litellm_provider)


def operation_of(call_type: str) -> str:
    """The gen_ai.operation.name of a litellm call type (``acompletion`` -> ``chat``)."""
    operation = _OPERATIONS.get(call_type)
    if operation is None:
        operation = _operation_of(call_type)
        if len(_OPERATIONS) < 256:  # litellm has a few dozen call types
            _OPERATIONS[call_type] = operation
    return operation


_OPERATIONS: dict[str, str] = {}


def _operation_of(call_type: str) -> str:
    if "embedding" in call_type:
        return sc.OP_EMBEDDINGS
    if "text_completion" in call_type:
        return sc.OP_TEXT_COMPLETION
    if "completion" in call_type or "responses" in call_type or "messages" in call_type:
        return sc.OP_CHAT
    return call_type.removeprefix("a") if call_type.startswith("a") else call_type


class PendingCall:
    """A call between its request and its outcome.

    Travels inside litellm's ``model_call_details`` dict, which litellm may copy; copying
    returns the same object so the once-only guard holds.
    """

    __slots__ = (
        "__weakref__",
        "_once",
        "account_spend",
        "attempts",
        "call",
        "deferred",
        "downgraded_to",
        "failures_seen",
        "kwargs_messages",
        "max_attempts",
        "provider",
        "recorder",
        "request",
        "reservation",
        "run",
        "start_ns",
        "start_perf",
        "stream",
    )

    def __init__(self, recorder: CallRecorder, run: Run | None, call: CallRecord) -> None:
        self.recorder = recorder
        self.run = run
        self.call = call
        self.start_ns = time.time_ns()
        self.start_perf = time.perf_counter()
        self._once = threading.Lock()
        self.provider: str | None = None  # litellm's provider name, for pricing
        self.stream: Any = None
        self.kwargs_messages: Any = None
        self.reservation: Any = None  # set by budget enforcement
        self.max_attempts = 1  # 1 + the number of fallbacks sharing this logging object
        self.attempts = 0
        self.failures_seen: list[int] = []
        self.deferred = False  # an async call's reservation waits for the async hook
        self.account_spend = False  # recorded after the fact: add its spend to budgets
        self.request: dict[str, Any] = {}  # integrations: the request body given to begin_call
        self.downgraded_to: str | None = None

    def __copy__(self) -> PendingCall:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> PendingCall:
        return self

    def reserve(self, request: dict[str, Any] | None = None) -> None:
        """Reserve this call on every budget that applies, before its request is sent.

        Raises `BudgetExceeded` (send nothing) or sets `model_to_send` to a cheaper model.
        """
        self.recorder.before_call(self, self.request if request is None else request)
        # The call's latency is the provider's: it starts once the reservation is made,
        # which may have waited on the database or imported a tokenizer (seconds, once).
        self.start_ns = time.time_ns()
        self.start_perf = time.perf_counter()

    def release(self) -> None:
        """The request will not be sent: give back what was reserved for it."""
        self.recorder.release(self)

    def watch_stream(self) -> None:
        """The response is a stream still being read: should its run end first, the
        run records it as abandoned."""
        self.recorder.watch_stream(self)

    @property
    def model_to_send(self) -> str | None:
        """The model the request must use: the requested one, or the cheaper model a
        ``downgrade`` budget chose."""
        return self.downgraded_to or self.call.requested_model

    def succeed(
        self,
        usage: Any,
        *,
        model: str | None = None,
        finish_reasons: list[str] | None = None,
        estimated: bool = False,
        provider_cost: Any = None,
    ) -> None:
        """Record the call as done. ``usage`` is the provider's usage object or dict (any
        shape `tokenledger.usage.usage_from_response` reads) or a `TokenUsage`; an
        unreadable one is logged and the call recorded with unknown usage."""
        if not self.claim():
            return
        parsed: TokenUsage | None
        try:
            parsed = usage_from_response(usage)
        except UsageError as exc:
            logger.warning("tokenledger recorded a call with unknown usage: %s", exc)
            parsed, estimated = None, True
        self.finish(
            status="ok",
            usage=parsed,
            model=model,
            estimated=estimated,
            finish_reasons=finish_reasons,
            provider_cost=provider_cost,
        )

    def fail(self, exception: BaseException | None, *, usage: Any = None) -> None:
        """Record the call as failed (a partial usage, e.g. of a broken stream, may be
        given); releases its budget reservation."""
        if not self.claim():
            return
        self.finish(
            status="error",
            usage=_partial_usage(usage),
            model=None,
            error_type=type(exception).__name__ if exception is not None else "UnknownError",
        )

    def abandon(self, usage: Any = None) -> None:
        """Record a stream its caller stopped reading."""
        if not self.claim():
            return
        self.finish(status="abandoned", usage=_partial_usage(usage), model=None, estimated=True)

    def claim(self) -> bool:
        """True exactly once: the first outcome wins, duplicates are dropped."""
        return self._once.acquire(blocking=False)

    @property
    def done(self) -> bool:
        return self._once.locked()

    def on_failure(self, exception: Any, details: Mapping[str, Any] | None = None) -> None:
        """Record one failed attempt (each distinct exception once)."""
        try:
            if isinstance(exception, BudgetExceeded):
                # Refused before the request: nothing was sent, nothing to record.
                self.claim()
                self.release()
                return
            marker = id(exception)
            if marker in self.failures_seen or self.attempts >= self.max_attempts:
                return  # a handler fired twice, or litellm's summary of attempts already recorded
            self.failures_seen.append(marker)
            stream = self.stream() if self.stream is not None else None
            if stream is not None:
                stream.tokenledger_finish("error", exception)
                return
            if not self.claim():
                return
            if details is not None:
                if self.provider is None:
                    self.provider = details.get("custom_llm_provider")
                attempt_model = details.get("model")
                if self.attempts and isinstance(attempt_model, str):
                    self.call.requested_model = attempt_model
            self.finish(
                status="error",
                usage=None,
                model=None,
                error_type=type(exception).__name__ if exception is not None else "UnknownError",
            )
            if self.attempts < self.max_attempts:
                self._next_attempt()
        except Exception:
            logger.exception("tokenledger could not record a failed litellm call")

    def _next_attempt(self) -> None:
        """A fallback will reuse this logging object: give it a fresh call row."""
        old = self.call
        self.call = CallRecord(
            id=new_id(),
            run_id=old.run_id,
            root_run_id=old.root_run_id,
            operation=old.operation,
            provider=None,
            requested_model=old.requested_model,
            model=None,
            started_at=utcnow(),
            streamed=old.streamed,
            litellm_call_id=old.litellm_call_id,
            max_tokens=old.max_tokens,
        )
        self.provider = None
        self.start_ns = time.time_ns()
        self.start_perf = time.perf_counter()
        self._once = threading.Lock()

    def finish(
        self,
        *,
        status: str,
        usage: TokenUsage | None,
        model: str | None,
        estimated: bool = False,
        error_type: str | None = None,
        finish_reasons: list[str] | None = None,
        provider_cost: Any = None,
        latency_ms: float | None = None,
    ) -> None:
        call = self.call
        call.latency_ms = (
            latency_ms
            if latency_ms is not None
            else (time.perf_counter() - self.start_perf) * 1000.0
        )
        call.ended_at = utcnow()
        call.status = status  # type: ignore[assignment]
        call.error_type = error_type
        if model:
            call.model = model
        if usage is not None:
            call.set_usage(usage)
        call.usage_estimated = estimated
        call.finish_reasons = finish_reasons
        call.provider = provider_name(self.provider) or call.provider
        self.attempts += 1
        self.recorder.complete_call(self, provider_cost=provider_cost, usage=usage)


def _partial_usage(usage: Any) -> TokenUsage | None:
    """The usage a failed or abandoned call reports, when it has a readable one: a
    partial usage is a best effort, so an unreadable one counts as none."""
    if usage is None:
        return None
    try:
        return usage_from_response(usage)
    except UsageError:
        return None


# -- where captured calls go -------------------------------------------------------------

_capture_ledger: Ledger | None = None


def set_capture_ledger(ledger: Ledger | None) -> None:
    """The ledger that receives calls made outside any run."""
    global _capture_ledger
    _capture_ledger = ledger


def capture_ledger() -> Ledger | None:
    return _capture_ledger


_CURRENT: Any = object()  # begin_call's default: the run current in this context


def start_pending(
    call_type: str, args: Sequence[Any], kwargs: dict[str, Any], run: Any = _CURRENT
) -> PendingCall | None:
    if run is _CURRENT:
        run = current_run()
    if run is not None:
        ledger = run.ledger
        if not ledger.capture:
            return None
    else:
        ledger_or_none = _capture_ledger
        if ledger_or_none is None or not ledger_or_none.record_calls_outside_runs:
            return None
        ledger = ledger_or_none
    model = args[0] if args else kwargs.get("model")
    max_tokens = kwargs.get("max_tokens") or kwargs.get("max_completion_tokens")
    call = new_call(
        run,
        operation=operation_of(call_type),
        model=model if isinstance(model, str) else None,
        streamed=bool(kwargs.get("stream")),
        litellm_call_id=kwargs.get("litellm_call_id"),
        max_tokens=max_tokens if isinstance(max_tokens, int) else None,
    )
    pending = PendingCall(ledger.recorder, run, call)
    pending.kwargs_messages = kwargs.get("messages")
    return pending


# -- the shared entry point for integrations ------------------------------------------


def begin_call(
    *,
    operation: str,
    model: str | None,
    provider: str | None,
    request: dict[str, Any] | None = None,
    max_tokens: int | None = None,
    stream: bool = False,
    run: Run | None = _CURRENT,
) -> PendingCall | None:
    """Start recording a model call made by a client other than litellm.

    The one mechanism every integration uses, so their calls get the same rows, spans,
    prices and budget enforcement as captured litellm calls. Call it BEFORE the request
    is sent: it reserves the call's estimated cost on every budget that applies and
    raises `BudgetExceeded` when one refuses — then no request may be sent. Returns None
    when nothing is recording (no run, and calls outside runs are not recorded).

    ``request`` is the request body (``messages`` or ``input`` are counted for the
    estimate). A ``downgrade`` budget may pick a cheaper model: send the request with
    ``pending.model_to_send``. Finish with `PendingCall.succeed` or `PendingCall.fail`.
    In async code use `abegin_call`, which reserves without blocking the event loop.

    ``run`` attributes the call to that run (None: to no run) instead of the run
    current in this context — for callbacks that run outside the caller's context.
    .. versionadded:: 0.1.0
    """
    pending = _begin(operation, model, provider, request, max_tokens, stream, run)
    if pending is not None:
        pending.reserve()
    return pending


async def abegin_call(
    *,
    operation: str,
    model: str | None,
    provider: str | None,
    request: dict[str, Any] | None = None,
    max_tokens: int | None = None,
    stream: bool = False,
    run: Run | None = _CURRENT,
) -> PendingCall | None:
    """`begin_call` for async code: the reservation runs in a worker thread."""
    pending = _begin(operation, model, provider, request, max_tokens, stream, run)
    if pending is not None and pending.recorder.may_reserve(pending.run):
        await reserve_in_thread(pending, pending.request)
    return pending


async def reserve_in_thread(pending: PendingCall, request: dict[str, Any]) -> None:
    """Reserve in a worker thread, never blocking the event loop.

    Should the caller be cancelled meanwhile (a timeout), the thread still finishes its
    reservation; nothing will be sent, so it is given back once the thread is done.
    Otherwise it would be held until its lease ran out, and a run budget's for the rest
    of the run.
    """
    import asyncio

    future = asyncio.ensure_future(asyncio.to_thread(pending.reserve, request))
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda done: _give_back(pending, done))
        raise


def _give_back(pending: PendingCall, done: Any) -> None:
    if done.cancelled() or done.exception() is not None:
        return  # refused or failed: nothing is held
    if not pending.claim():
        return

    def release() -> None:
        try:
            pending.release()
        except Exception as exc:
            internal_error(exc, "could not give back a cancelled call's reservation")

    try:
        done.get_loop().run_in_executor(None, release)
    except RuntimeError:  # the loop is closing: release here
        release()


def _begin(
    operation: str,
    model: str | None,
    provider: str | None,
    request: dict[str, Any] | None,
    max_tokens: int | None,
    stream: bool,
    run: Run | None,
) -> PendingCall | None:
    body = dict(request or {})
    body.setdefault("model", model)
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body["stream"] = stream
    pending = start_pending(operation, (), body, run)
    if pending is None:
        return None
    pending.provider = provider
    pending.request = body
    return pending


def finish_abandoned(pending: PendingCall) -> None:
    """Record a stream its caller stopped reading (called at the end of its run)."""
    stream = pending.stream() if pending.stream is not None else None
    if stream is not None:
        stream.tokenledger_finish("abandoned")
    elif pending.claim():
        pending.finish(status="abandoned", usage=None, model=None, estimated=True)
