"""The litellm hooks: how tokenledger sees every litellm call, and why there.

(Checked against litellm 1.106-1.109; `docs/internals.md` records the facts.)

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
* **Failures** — litellm calls the per-attempt logging object's ``failure_handler`` for
  every failed attempt; we wrap it on that one object.

The `PendingCall` rides on litellm's per-attempt logging object, so retries and
fallbacks each get their own row, and a handler that fires twice for one attempt (it has
happened in several litellm releases) is recorded once.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from tokenledger.capture import PendingCall, reserve_in_thread, start_pending
from tokenledger.exceptions import (
    BudgetExceeded,
    CaptureUnsupportedError,
    LedgerError,
    UsageError,
)
from tokenledger.records import TokenUsage
from tokenledger.usage import usage_from_response

__all__ = ["install", "install_when_imported", "installed", "uninstall"]

logger = logging.getLogger("tokenledger")

PENDING_KEY = "tokenledger_pending"

_state_lock = threading.Lock()
_originals: dict[str, Any] = {}
_tracked_classes: dict[type, type] = {}


def _function_setup(
    original_function: str, rules_obj: Any, start_time: Any, *args: Any, **kwargs: Any
) -> Any:
    original = _originals["function_setup"]
    pending: PendingCall | None = None
    try:
        pending = start_pending(original_function, args, kwargs)
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
        await reserve_in_thread(pending, kwargs)
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

        def tokenledger_finish(self: Any, status: str, error: BaseException | None = None) -> None:
            """Record the stream's call now (a failure, or the end of its run)."""
            _stream_finished(self, status, error)

        tracked = type(
            base.__name__,
            (base,),
            {
                "__next__": __next__,
                "__anext__": __anext__,
                "__del__": __del__,
                "tokenledger_finish": tokenledger_finish,
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
