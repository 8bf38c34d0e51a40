"""What the integrations share: patching a provider's SDK, starting a call before its
request, watching the SDK's responses and streams in place, and estimating tokens.

`tokenledger.integrations.openai` and `tokenledger.integrations.anthropic` patch SDKs
made by the same generator (Stainless): the same resource classes, ``Stream`` and
``AsyncStream`` types and ``with_raw_response`` wrappers. Each describes its SDK with an
`SDK` and reads its provider's responses and events in an `SDKCall` subclass; the rest
is here, written once. The LangChain and OpenAI Agents integrations use the token
counter, `succeed_or_estimate` and the wrapper marker too (and the latter the
OpenAI-compatible hosts); LangChain asks `sdk_patched` whether an SDK integration
already records a chat model's client.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib
import json
import logging
import math
import sys
import threading
import types
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, ClassVar, Final, cast

from tokenledger.capture import PendingCall, abegin_call, begin_call
from tokenledger.exceptions import BudgetExceeded, LedgerError

logger = logging.getLogger("tokenledger")


# -- what the request says ----------------------------------------------------------------

# Hosts of OpenAI-compatible APIs, by the provider names litellm prices them under, for the
# integrations that see an OpenAI client. Any other host is taken as OpenAI.
OPENAI_COMPATIBLE_HOSTS: Final = {
    "api.openai.com": "openai",
    "openrouter.ai": "openrouter",
    "api.deepseek.com": "deepseek",
    "api.groq.com": "groq",
    "api.mistral.ai": "mistral",
    "api.x.ai": "xai",
    "generativelanguage.googleapis.com": "gemini",
}


def given_int(value: object) -> int | None:
    """An int argument, or None for a missing one (the SDK's ``omit`` / ``NOT_GIVEN``)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def count_tokens(model: str, *, text: str | None = None, messages: Any = None) -> int:
    """Tokens in ``text`` or ``messages`` by the model's tokenizer (litellm's counter:
    tiktoken for OpenAI models), else roughly four characters a token."""
    try:
        import litellm

        if messages is not None:
            return int(litellm.token_counter(model=model, messages=messages))
        return int(litellm.token_counter(model=model, text=text or ""))
    except Exception:
        if text is None:
            text = json.dumps(messages, default=str)
        return math.ceil(len(text) / 4)


def succeed_or_estimate(
    pending: PendingCall,
    usage: Any,
    estimate: Callable[[], Any],
    *,
    model: str | None,
    finish_reasons: list[str] | None,
) -> None:
    """Finish ``pending`` as a success: priced from the provider's ``usage``, or, when
    there is none (``None``), from ``estimate()`` and marked estimated. ``estimate`` is
    called only then: counting tokens costs a tokenizer pass."""
    if usage is not None:
        pending.succeed(usage, model=model, finish_reasons=finish_reasons)
    else:
        pending.succeed(estimate(), model=model, finish_reasons=finish_reasons, estimated=True)


# -- one SDK, one call ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SDK:
    """What the shared code needs to know of one provider's SDK."""

    name: str  # the provider, as log messages name it: "OpenAI"
    stream: type[Any]  # the SDK's ``Stream``
    async_stream: type[Any]  # and ``AsyncStream``
    raw_responses: tuple[type[Any], ...]  # what ``with_raw_response`` returns (`raw_types`)


def raw_types(*places: tuple[str, str]) -> tuple[type[Any], ...]:
    """The classes named by ``(module, name)`` that the installed SDK has.

    ``with_raw_response`` / ``with_streaming_response`` return these wrappers instead of
    the parsed object; they live in private SDK modules, so look them up defensively.
    """
    found: list[type[Any]] = []
    for module, name in places:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            logger.debug("%s has no %s.%s", module.partition(".")[0], module, name)
    return tuple(found)


class SDKCall(abc.ABC):
    """What is seen of one call's response; finishes its `PendingCall` exactly once.

    Never raises: a failure to record is logged and the user's call goes on. A subclass
    reads its provider's responses and stream events.
    """

    __slots__ = ("complete", "finish_reasons", "kwargs", "model", "pending", "text")

    sdk: ClassVar[SDK]

    def __init__(self, pending: PendingCall, kwargs: dict[str, Any]) -> None:
        self.pending = pending
        self.kwargs = kwargs  # the request's keyword arguments
        self.model: str | None = None
        self.finish_reasons: list[str] = []
        self.text: list[str] = []  # streamed output, counted when no usage comes
        self.complete = False  # the provider's last event was seen

    # -- reading ------------------------------------------------------------------------
    @abc.abstractmethod
    def see_response(self, response: Any) -> None:
        """A whole (non-streamed) response."""

    def see_stream(self, stream: Any) -> None:  # noqa: B027 - optional: most need nothing of it
        """The SDK stream the response will come in, before its first event."""

    @abc.abstractmethod
    def see_chunk(self, chunk: Any) -> None:
        """One streamed chunk (an event, in the Responses and Anthropic APIs' words)."""

    # -- finishing ----------------------------------------------------------------------
    @abc.abstractmethod
    def finish(self) -> None:
        """The response, or the whole stream, arrived."""

    @abc.abstractmethod
    def reported_usage(self) -> Any:
        """The usage the provider has reported so far, or None."""

    @abc.abstractmethod
    def partial_usage(self) -> Any:
        """The usage of a stream cut short, estimated where the provider said nothing."""

    def abandon(self) -> None:
        """The stream was closed or dropped: if its last event had come, that is the
        end of it; otherwise the call is recorded as abandoned, tokens estimated."""
        if sys.is_finalizing():
            return  # a stream collected at interpreter exit: the ledger is gone
        try:
            if self.pending.done:
                return
            if self.complete:
                self.finish()
            else:
                self.pending.abandon(self.partial_usage())
        except Exception:
            logger.exception("tokenledger could not record an abandoned %s stream", self.sdk.name)

    def fail(self, error: BaseException) -> None:
        try:
            self.pending.fail(error, usage=self.reported_usage())
        except Exception:
            logger.exception("tokenledger could not record a failed %s call", self.sdk.name)


# -- streams ----------------------------------------------------------------------------

_closing_classes: dict[type, type] = {}
_closing_lock = threading.Lock()


def _closing_class(cls: type, *, is_async: bool) -> type:
    """A subclass of the SDK's stream class whose ``close()`` also records an unfinished
    stream as abandoned (``with ... as stream: break`` closes it)."""
    with _closing_lock:
        sub = _closing_classes.get(cls)
        if sub is not None:
            return sub
        base_close = cls.close  # type: ignore[attr-defined]

        if is_async:

            async def close(self: Any) -> None:
                self._tokenledger_call.abandon()
                await base_close(self)

        else:

            def close(self: Any) -> None:  # type: ignore[misc]
                self._tokenledger_call.abandon()
                base_close(self)

        sub = type(cls.__name__, (cls,), {"close": close, "__module__": cls.__module__})
        sub.__qualname__ = cls.__qualname__
        _closing_classes[cls] = sub
        _closing_classes[sub] = sub
        return sub


def watch_stream(stream: Any, call: SDKCall, *, is_async: bool) -> None:
    """Watch an SDK stream in place: it keeps its type and its helpers keep working."""
    call.see_stream(stream)
    inner = stream._iterator  # anthropic>=2 makes it on first use; this makes it now
    stream._iterator = _observe_async(inner, call) if is_async else _observe(inner, call)
    # Another instrumentation (OpenInference) may hand back a proxy of the SDK's stream;
    # its class cannot be swapped, the stream it wraps can.
    target = stream
    while hasattr(type(target), "__wrapped__"):  # a wrapt ObjectProxy
        target = target.__wrapped__
    target.__class__ = _closing_class(type(target), is_async=is_async)
    target._tokenledger_call = call
    # A stream dropped unread (or part read) is recorded when it is collected. The
    # finalizer holds the call, never the stream, so it does not keep the stream alive.
    finalizer = weakref.finalize(stream, call.abandon)
    finalizer.atexit = False


def _observe(inner: Iterator[Any], call: SDKCall) -> Iterator[Any]:
    try:
        for item in inner:
            call.see_chunk(item)
            yield item
    except GeneratorExit:
        call.abandon()
        raise
    except BaseException as exc:
        call.fail(exc)
        raise
    else:
        call.finish()
    finally:
        close = getattr(inner, "close", None)
        if close is not None:
            close()


async def _observe_async(inner: AsyncIterator[Any], call: SDKCall) -> AsyncIterator[Any]:
    import asyncio

    try:
        async for item in inner:
            call.see_chunk(item)
            yield item
    except (GeneratorExit, asyncio.CancelledError):
        call.abandon()
        raise
    except BaseException as exc:
        call.fail(exc)
        raise
    else:
        call.finish()
    finally:
        aclose = getattr(inner, "aclose", None)
        if aclose is not None:
            await aclose()


# -- one call, from its request to its result ---------------------------------------------


def _send_model(pending: PendingCall, kwargs: dict[str, Any]) -> None:
    model = pending.model_to_send
    if model and model != kwargs.get("model"):
        kwargs["model"] = model  # a downgrade budget chose a cheaper model


def begin(
    sdk: SDK, arguments: Callable[[], dict[str, Any]], kwargs: dict[str, Any]
) -> PendingCall | None:
    """Start recording a call before its request is sent: `begin_call` with
    ``arguments()``, then a downgrade budget's cheaper model put in ``kwargs``.

    None when nothing records the call, or when starting failed (that is logged).
    """
    try:
        pending = begin_call(**arguments())
    except (BudgetExceeded, LedgerError):
        raise  # refused, or budgets cannot be checked: fail closed, send nothing
    except Exception:
        logger.exception("tokenledger could not start recording an %s call", sdk.name)
        return None
    if pending is not None:
        _send_model(pending, kwargs)
    return pending


async def abegin(
    sdk: SDK, arguments: Callable[[], dict[str, Any]], kwargs: dict[str, Any]
) -> PendingCall | None:
    """`begin`, for async clients."""
    try:
        pending = await abegin_call(**arguments())
    except (BudgetExceeded, LedgerError):
        raise  # refused, or budgets cannot be checked: fail closed, send nothing
    except Exception:
        logger.exception("tokenledger could not start recording an %s call", sdk.name)
        return None
    if pending is not None:
        _send_model(pending, kwargs)
    return pending


def settle(result: Any, call: SDKCall) -> None:
    """Finish a sync call from what ``create`` returned: a response or a stream, possibly
    in a raw-response wrapper (parsed once here; the SDK caches it for the caller)."""
    if isinstance(result, call.sdk.raw_responses):
        result = cast(Any, result).parse()
    if isinstance(result, call.sdk.stream):
        watch_stream(result, call, is_async=False)
    else:
        call.see_response(result)
        call.finish()


async def asettle(result: Any, call: SDKCall) -> None:
    """`settle`, for async clients."""
    if isinstance(result, call.sdk.raw_responses):
        result = cast(Any, result).parse()
        if hasattr(result, "__await__"):  # AsyncAPIResponse.parse is a coroutine
            result = await result
    if isinstance(result, call.sdk.async_stream):
        watch_stream(result, call, is_async=True)
    else:
        call.see_response(result)
        call.finish()


def wrap_create(
    original: Callable[..., Any],
    sdk: SDK,
    *,
    is_async: bool,
    arguments: Callable[[Any, dict[str, Any]], dict[str, Any]],
    new_call: Callable[[PendingCall, dict[str, Any]], SDKCall],
) -> Callable[..., Any]:
    """A resource method (``create``, ``parse``) that records its call: begun with
    ``arguments(resource, kwargs)`` before the request, then read by ``new_call(pending,
    kwargs)`` from its response or stream. An exception of the SDK is recorded and
    re-raised unchanged."""
    if is_async:

        @functools.wraps(original)
        async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            pending = await abegin(sdk, functools.partial(arguments, self, kwargs), kwargs)
            if pending is None:
                return await original(self, *args, **kwargs)
            call = new_call(pending, kwargs)
            try:
                result = await original(self, *args, **kwargs)
            except BaseException as exc:
                call.fail(exc)
                raise
            try:
                await asettle(result, call)
            except Exception:
                logger.exception("tokenledger could not record an %s call", sdk.name)
            return result

    else:

        @functools.wraps(original)
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            pending = begin(sdk, functools.partial(arguments, self, kwargs), kwargs)
            if pending is None:
                return original(self, *args, **kwargs)
            call = new_call(pending, kwargs)
            try:
                result = original(self, *args, **kwargs)
            except BaseException as exc:
                call.fail(exc)
                raise
            try:
                settle(result, call)
            except Exception:
                logger.exception("tokenledger could not record an %s call", sdk.name)
            return result

    return mark_wrapper(method, original)


# -- switching it on and off -----------------------------------------------------------


# The attribute naming the function a tokenledger wrapper replaced. Only this module
# reads or writes it: the integrations go through `mark_wrapper`, `unwrapped` and
# `is_wrapper`, so the marker is one name in one place.
_ORIGINAL: Final = "_tokenledger_original"


def mark_wrapper(wrapper: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``wrapper`` as tokenledger's wrapper of ``original``, for `unwrapped`."""
    setattr(wrapper, _ORIGINAL, original)
    return wrapper


def unwrapped(function: Any) -> Any:
    """The function tokenledger wrapped, or ``function`` itself."""
    return getattr(function, _ORIGINAL, function)


def is_wrapper(function: Any) -> bool:
    """Whether ``function`` is a tokenledger wrapper (`mark_wrapper`)."""
    return hasattr(function, _ORIGINAL)


# Every `Patches` made, so that one integration can ask whether another patched an SDK's
# classes (`sdk_patched`) without reaching into that integration's module.
_all_patches: weakref.WeakSet[Patches] = weakref.WeakSet()


def sdk_patched(package: str) -> bool:
    """Whether an integration patched classes of the SDK ``package`` (``"openai"``):
    then every client of that SDK is recorded (``instrument()`` with no argument)."""
    return any(
        cls.__module__.partition(".")[0] == package
        for patches in list(_all_patches)
        for cls, _name in list(patches.classes)
    )


class Patches:
    """The SDK methods an integration replaced, so that it can put them back exactly:
    on the resource classes (every client), or on single resources (one client).

    A `wrap` turns a method's original function into its recording wrapper.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # (class, method name) -> (the original attribute, whether the class defined it itself)
        self.classes: dict[tuple[type, str], tuple[Any, bool]] = {}
        self.resources: weakref.WeakSet[Any] = weakref.WeakSet()
        _all_patches.add(self)

    def patch(
        self,
        wraps: Iterable[tuple[type, str, Callable[[Any], Any]]],
        resources: dict[type, Any] | None = None,
    ) -> None:
        """Replace each ``(class, name, wrap)``'s method by its wrapper: on the class, or
        with ``resources`` (a client's, by class) on those resources only."""
        for cls, name, wrap in wraps:
            if not hasattr(cls, name):
                continue  # a method older SDKs lack (parse)
            if resources is None:
                if (cls, name) in self.classes:
                    continue  # done already
                original = cls.__dict__.get(name)
                own = original is not None
                if original is None:
                    original = getattr(cls, name)
                self.classes[(cls, name)] = (original, own)
                setattr(cls, name, wrap(original))
                continue
            resource = resources.get(cls)
            if resource is None:
                continue
            # Wrap the class's own function (unwrapped if the class is patched), so a
            # client instrumented on its own and globally is still recorded once.
            wrapped = wrap(unwrapped(getattr(cls, name)))
            setattr(resource, name, types.MethodType(wrapped, resource))
            self.resources.add(resource)

    def restore(self, resources: Iterable[Any] | None = None) -> None:
        """Put back what `patch` replaced: on ``resources`` only, or (None) everywhere."""
        if resources is None:
            for (cls, name), (original, own) in self.classes.items():
                if own:
                    setattr(cls, name, original)
                else:
                    delattr(cls, name)
            self.classes.clear()
            resources = list(self.resources)
        for resource in resources:
            for name, bound in list(vars(resource).items()):
                if is_wrapper(getattr(bound, "__func__", None)):
                    del resource.__dict__[name]
            self.resources.discard(resource)
