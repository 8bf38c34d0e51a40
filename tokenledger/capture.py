"""Automatic capture of litellm calls.

How a call is seen, and why there (checked against litellm 1.106; see NOTES.md):

* **Before the request** — litellm's ``client`` wrapper, behind every public entry point
  (``completion``, ``acompletion``, ``embedding``, ...), calls
  ``litellm.utils.function_setup`` looked up at call time, before any request is built.
  We wrap it. This sees the full kwargs in the caller's thread and context, which is
  where the current run is known, and an exception raised here (``BudgetExceeded``)
  reaches the caller with no request sent. Callbacks cannot do this: litellm swallows
  their exceptions. It also catches names bound by ``from litellm import completion``
  before capture was switched on, which patching ``litellm.completion`` would miss.
* **After a response** — the wrapper then calls ``litellm.utils.update_response_metadata``
  (also looked up at call time) with the result, synchronously in the caller's thread.
  We wrap it too: a non-streamed call is recorded there, before ``completion`` returns,
  so a run's totals are complete when its ``with`` block ends and no context is lost to
  litellm's logging threads.
* **Streams** — a stream result is a ``CustomStreamWrapper``; we switch its class to a
  subclass that records the call when the stream is exhausted, fails, or is abandoned
  (``break`` then garbage collection, or the end of its run) — litellm fires no callback
  at all for an abandoned stream.
* **Failures** — litellm's failure handlers run for every failed attempt; a failure
  callback (registered alongside, not instead of, the user's callbacks) records them.

The pending call rides on litellm's per-attempt logging object, so retries and fallbacks
each get their own row, and a handler that fires twice for one attempt (it has happened
in several litellm releases) is recorded once.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from tokenledger import semconv as sc
from tokenledger._internal import internal_error
from tokenledger.exceptions import (
    BudgetExceeded,
    CaptureUnsupportedError,
    LedgerError,
    UsageError,
)
from tokenledger.records import CallRecord, TokenUsage, new_call, new_id, utcnow
from tokenledger.runs import current_run
from tokenledger.usage import usage_from_response

if TYPE_CHECKING:
    from tokenledger._recorder import CallRecorder
    from tokenledger.ledger import Ledger
    from tokenledger.runs import Run

__all__ = ["PendingCall", "abegin_call", "begin_call", "install", "installed", "uninstall"]

logger = logging.getLogger("tokenledger")

PENDING_KEY = "tokenledger_pending"

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
        parsed = None
        if usage is not None:
            try:
                parsed = usage_from_response(usage)
            except UsageError:
                parsed = None
        self.finish(
            status="error",
            usage=parsed,
            model=None,
            error_type=type(exception).__name__ if exception is not None else "UnknownError",
        )

    def abandon(self, usage: Any = None) -> None:
        """Record a stream its caller stopped reading."""
        if not self.claim():
            return
        parsed = None
        if usage is not None:
            try:
                parsed = usage_from_response(usage)
            except UsageError:
                parsed = None
        self.finish(status="abandoned", usage=parsed, model=None, estimated=True)

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
                _stream_finished(stream, "error", exception)
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


# -- the hooks --------------------------------------------------------------------------

_state_lock = threading.Lock()
_capture_ledger: Ledger | None = None
_originals: dict[str, Any] = {}
_tracked_classes: dict[type, type] = {}


def set_capture_ledger(ledger: Ledger | None) -> None:
    """The ledger that receives calls made outside any run."""
    global _capture_ledger
    _capture_ledger = ledger


def capture_ledger() -> Ledger | None:
    return _capture_ledger


_CURRENT: Any = object()  # begin_call's default: the run current in this context


def _start_pending(
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
        await _reserve_in_thread(pending, pending.request)
    return pending


async def _reserve_in_thread(pending: PendingCall, request: dict[str, Any]) -> None:
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
    pending = _start_pending(operation, (), body, run)
    if pending is None:
        return None
    pending.provider = provider
    pending.request = body
    return pending


def _function_setup(
    original_function: str, rules_obj: Any, start_time: Any, *args: Any, **kwargs: Any
) -> Any:
    original = _originals["function_setup"]
    pending: PendingCall | None = None
    try:
        pending = _start_pending(original_function, args, kwargs)
        if pending is not None:
            if kwargs.get("is_async_call", True) and _originals.get("async_hook") is not None:
                # In an event loop: reserve in a worker thread from the async hook below,
                # never blocking the loop here. Skipped outright when no budget can apply.
                pending.deferred = pending.recorder.may_reserve(pending.run)
            else:
                # May raise BudgetExceeded (no request is sent) or change the model.
                pending.reserve(kwargs)
    except (BudgetExceeded, LedgerError):
        # A refusal, or budgets failing closed: no request may be sent.
        raise
    except Exception:
        # Anything else is tokenledger's own failure: the call proceeds and is still
        # recorded if its record could be started.
        logger.exception("tokenledger could not check budgets for a litellm call; it proceeds")
    try:
        logging_obj, new_kwargs = original(
            original_function, rules_obj, start_time, *args, **kwargs
        )
    except BaseException:
        if pending is not None:
            pending.release()
        raise
    if pending is not None:
        try:
            details = logging_obj.model_call_details
            details[PENDING_KEY] = pending
            pending.provider = details.get("custom_llm_provider")
            fallbacks = kwargs.get("fallbacks")
            pending.max_attempts = 1 + (len(fallbacks) if isinstance(fallbacks, list) else 0)
            _watch_failures(logging_obj, pending)
        except Exception:
            logger.exception("tokenledger could not attach to a litellm call")
    return logging_obj, new_kwargs


def _watch_failures(logging_obj: Any, pending: PendingCall) -> None:
    """Record failed attempts by wrapping this one logging object's failure handler.

    litellm calls ``logging_obj.failure_handler`` synchronously, in the caller's thread,
    for every failed attempt of sync and async calls and for streams that break. We
    wrap it on the instance rather than registering a litellm callback: once any
    callback is registered, litellm stops picking up function callbacks the user
    appends to ``litellm.success_callback`` later (checked on 1.106), and we must not
    disturb the user's callbacks.
    """
    original = logging_obj.failure_handler

    def failure_handler(exception: Any, *args: Any, **kwargs: Any) -> Any:
        pending.on_failure(exception, logging_obj.model_call_details)
        return original(exception, *args, **kwargs)

    logging_obj.failure_handler = failure_handler


async def _async_pre_call_deployment_hook(kwargs: dict[str, Any], call_type: Any) -> Any:
    """The async calls' reservation point: awaited by litellm after ``function_setup``
    and before the request; an exception here reaches the caller with nothing sent."""
    logging_obj = kwargs.get("litellm_logging_obj")
    details = getattr(logging_obj, "model_call_details", None)
    pending: PendingCall | None = details.get(PENDING_KEY) if details is not None else None
    if pending is not None and pending.deferred:
        pending.deferred = False
        await _reserve_in_thread(pending, kwargs)
    return await _originals["async_hook"](kwargs, call_type)


def _update_response_metadata(
    *,
    result: Any,
    logging_obj: Any,
    model: Any,
    kwargs: Any,
    start_time: Any,
    end_time: Any,
    **extra: Any,
) -> None:
    _originals["update_response_metadata"](
        result=result,
        logging_obj=logging_obj,
        model=model,
        kwargs=kwargs,
        start_time=start_time,
        end_time=end_time,
        **extra,
    )
    try:
        pending: PendingCall | None = logging_obj.model_call_details.get(PENDING_KEY)
        if pending is None or pending.done:
            return
        cls = type(result)
        tracked = _tracked_classes.get(cls)
        if tracked is not None or cls in _stream_bases():
            if tracked is None:
                tracked = _tracked_class(cls)
            result.__class__ = tracked
            result._tokenledger_pending = pending
            pending.stream = weakref.ref(result)
            pending.watch_stream()
            return
        _finish_response(pending, result, logging_obj)
    except Exception:
        logger.exception("tokenledger could not record a litellm call")


def _finish_response(pending: PendingCall, result: Any, logging_obj: Any) -> None:
    if not pending.claim():
        return
    if pending.attempts:
        attempt_model = logging_obj.model_call_details.get("model")
        if isinstance(attempt_model, str):
            pending.call.requested_model = attempt_model
    raw_usage = _model_attr(result, "usage")
    usage: TokenUsage | None
    estimated = False
    try:
        usage = usage_from_response(raw_usage)
    except UsageError as exc:
        logger.warning("tokenledger recorded a call with unknown usage: %s", exc)
        usage, estimated = None, True
    if pending.provider is None:  # function_setup has usually set it already
        hidden = _model_attr(result, "_hidden_params") or {}
        pending.provider = hidden.get("custom_llm_provider") or (
            logging_obj.model_call_details.get("custom_llm_provider")
        )
    finish_reasons = None
    choices = getattr(result, "choices", None)
    if choices:
        finish_reasons = [
            str(c.finish_reason) for c in choices if getattr(c, "finish_reason", None)
        ]
    pending.finish(
        status="ok",
        usage=usage,
        model=getattr(result, "model", None),
        estimated=estimated,
        finish_reasons=finish_reasons or None,
        provider_cost=raw_usage,
    )


def _model_attr(obj: Any, name: str) -> Any:
    """``getattr(obj, name, None)`` for a litellm response, without pydantic's
    ``__getattr__`` fallback, which costs over a microsecond per read of a field kept
    outside the declared ones (``usage``) or of a private attribute (``_hidden_params``).
    The instance ``__dict__`` comes first, as in attribute lookup: a value set with
    ``object.__setattr__`` lives there. (`tokenledger.usage` reads usage objects the
    same way.)"""
    for store in (
        getattr(obj, "__dict__", None),
        getattr(obj, "__pydantic_extra__", None),
        getattr(obj, "__pydantic_private__", None),
    ):
        if type(store) is dict and name in store:
            return store[name]
    return getattr(obj, name, None)


_stream_classes: tuple[type, ...] | None = None


def _stream_bases() -> tuple[type, ...]:
    # Looked up once: an import statement on every call costs a few microseconds.
    global _stream_classes
    if _stream_classes is None:
        from litellm.litellm_core_utils.streaming_handler import CustomStreamWrapper

        _stream_classes = (CustomStreamWrapper,)
    return _stream_classes


def _stream_usage(stream: Any) -> tuple[TokenUsage | None, bool]:
    """Usage of a stream from its chunks: the provider's, else counted (estimated)."""
    chunks = list(getattr(stream, "chunks", None) or ())
    # The usage the provider sent on a chunk the caller received (OpenAI's final chunk
    # with stream_options.include_usage, for one).
    raw = getattr(stream, "_tokenledger_usage", None)
    if raw is not None:
        try:
            return usage_from_response(raw), False
        except UsageError as exc:
            logger.warning("tokenledger ignored a stream's usage: %s", exc)
    try:
        import litellm

        messages = getattr(stream, "messages", None)
        built = litellm.stream_chunk_builder(chunks=chunks, messages=messages) if chunks else None
        built_usage = getattr(built, "usage", None)
        if built_usage is not None:
            return usage_from_response(built_usage), True
        if messages:
            prompt = litellm.token_counter(model=stream.model or "", messages=messages)
            return TokenUsage(input_tokens=int(prompt)), True
    except Exception:
        logger.exception("tokenledger could not count the tokens of a stream")
    return None, True


def _stream_finished(stream: Any, status: str, error: BaseException | None = None) -> None:
    pending: PendingCall | None = getattr(stream, "_tokenledger_pending", None)
    if pending is None or not pending.claim():
        return
    try:
        usage, estimated = _stream_usage(stream)
        if pending.provider is None:
            pending.provider = getattr(stream, "custom_llm_provider", None)
        reason = getattr(stream, "received_finish_reason", None)
        pending.finish(
            status=status,
            usage=usage,
            model=getattr(stream, "model", None),
            estimated=estimated,
            error_type=type(error).__name__ if error is not None else None,
            finish_reasons=[reason] if reason else None,
        )
    except Exception:
        logger.exception("tokenledger could not record a stream")


def finish_abandoned(pending: PendingCall) -> None:
    """Record a stream its caller stopped reading (called at the end of its run)."""
    stream = pending.stream() if pending.stream is not None else None
    if stream is not None:
        _stream_finished(stream, "abandoned")
    elif pending.claim():
        pending.finish(status="abandoned", usage=None, model=None, estimated=True)


def _tracked_class(base: type) -> type:
    with _state_lock:
        existing = _tracked_classes.get(base)
        if existing is not None:
            return existing

        base_next: Callable[[Any], Any] = base.__next__  # type: ignore[attr-defined]
        base_anext: Callable[[Any], Any] = base.__anext__  # type: ignore[attr-defined]
        base_del: Callable[[Any], None] | None = getattr(base, "__del__", None)

        def __next__(self: Any) -> Any:
            try:
                chunk = base_next(self)
            except StopIteration:
                _stream_finished(self, "ok")
                raise
            except Exception as exc:
                _stream_finished(self, "error", exc)
                raise
            if getattr(chunk, "usage", None) is not None:
                self._tokenledger_usage = chunk.usage
            return chunk

        async def __anext__(self: Any) -> Any:
            try:
                chunk = await base_anext(self)
            except StopAsyncIteration:
                _stream_finished(self, "ok")
                raise
            except Exception as exc:
                _stream_finished(self, "error", exc)
                raise
            if getattr(chunk, "usage", None) is not None:
                self._tokenledger_usage = chunk.usage
            return chunk

        def __del__(self: Any) -> None:
            _stream_finished(self, "abandoned")
            if base_del is not None:
                base_del(self)

        tracked = type(
            base.__name__,
            (base,),
            {
                "__next__": __next__,
                "__anext__": __anext__,
                "__del__": __del__,
                "__module__": base.__module__,
                "__qualname__": base.__qualname__,
            },
        )
        _tracked_classes[base] = tracked
        _tracked_classes[tracked] = tracked
        return tracked


# -- switching capture on and off -------------------------------------------------------


def install() -> None:
    """Switch capture on in the imported litellm (idempotent)."""
    with _state_lock:
        if _originals:
            return
        import litellm
        import litellm.utils as litellm_utils

        missing = [
            name
            for name in ("function_setup", "update_response_metadata")
            if not callable(getattr(litellm_utils, name, None))
        ]
        if missing:
            raise CaptureUnsupportedError(
                f"litellm {getattr(litellm, 'version', '?')} has no "
                f"litellm.utils.{', '.join(missing)}; tokenledger cannot capture its calls. "
                "Install a litellm version in the range tokenledger's pyproject pins."
            )
        names = vars(litellm_utils)  # patched by name: these are litellm internals
        _originals["function_setup"] = names["function_setup"]
        _originals["update_response_metadata"] = names["update_response_metadata"]
        names["function_setup"] = _function_setup
        names["update_response_metadata"] = _update_response_metadata
        hook = names.get("async_pre_call_deployment_hook")
        if callable(hook):
            _originals["async_hook"] = hook
            names["async_pre_call_deployment_hook"] = _async_pre_call_deployment_hook


def uninstall() -> None:
    """Switch capture off and restore litellm exactly as it was."""
    with _state_lock:
        if not _originals:
            return
        import litellm.utils as litellm_utils

        names = vars(litellm_utils)
        names["function_setup"] = _originals.pop("function_setup")
        names["update_response_metadata"] = _originals.pop("update_response_metadata")
        hook = _originals.pop("async_hook", None)
        if hook is not None:
            names["async_pre_call_deployment_hook"] = hook


def installed() -> bool:
    return bool(_originals)


class _LitellmImportHook(importlib.abc.MetaPathFinder):
    """Installs capture right after ``import litellm`` — tokenledger never imports it
    itself, so the CLI and ``import tokenledger`` stay fast."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "litellm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("litellm")
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original_exec(module)
            try:
                install()
            except Exception:
                logger.exception("tokenledger could not switch on litellm capture")

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_hook: _LitellmImportHook | None = None


def install_when_imported() -> None:
    """Install now if litellm is imported, else right after it is."""
    global _hook
    if "litellm" in sys.modules:
        install()
        return
    with _state_lock:
        if _hook is None or _hook not in sys.meta_path:
            _hook = _LitellmImportHook()
            sys.meta_path.insert(0, _hook)
