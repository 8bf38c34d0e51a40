"""Record every call an Anthropic Python SDK client makes.

``instrument()`` patches the SDK's resource classes, so every ``Anthropic`` and
``AsyncAnthropic`` client (Bedrock, Vertex and Foundry clients too) is recorded;
``instrument(client)`` patches one client only. Recorded: the Messages API
(``messages.create``, ``messages.parse``, the ``messages.stream`` helper) and its beta
twin (``beta.messages``), sync and async, streamed or not.

How a call is seen, and why there:

* **Before the request** — ``create`` and ``parse`` are wrapped and call
  `tokenledger.capture.begin_call` first: budgets are reserved there and a refusal
  raises `BudgetExceeded` with no HTTP request sent (as does `LedgerError` when the
  reservation cannot be written: budgets fail closed). ``messages.stream(...)`` sends
  nothing until its manager is entered, so the wrapper leaves the manager as the SDK
  made it and wraps the request it will send on ``with``; the budget check happens
  there. A ``downgrade`` budget's cheaper model replaces ``model=``.
* **Usage** — Anthropic's ``input_tokens`` counts only the uncached part of the prompt,
  with ``cache_creation_input_tokens`` and ``cache_read_input_tokens`` beside it.
  tokenledger records ``input_tokens`` as the whole prompt, as OpenTelemetry's
  ``gen_ai.usage.input_tokens`` requires, and prices cache writes and reads at their
  own rates (`tokenledger.usage` reads the shape).
* **Streams** — usage arrives in two events: ``message_start`` carries the input and
  cache counts, ``message_delta`` the (cumulative) output count. The SDK's ``Stream``
  keeps its type; the iterator inside it is replaced by one that reads those events
  and finishes the call when the stream ends, fails, is closed early or is dropped.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import threading
import types
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Final, cast

try:
    import anthropic
    from anthropic.resources.beta.messages import AsyncMessages as AsyncBetaMessages
    from anthropic.resources.beta.messages import Messages as BetaMessages
    from anthropic.resources.messages import AsyncMessages, Messages
except ModuleNotFoundError as exc:  # pragma: no cover - exercised by a test with sys.modules
    raise ModuleNotFoundError(
        "tokenledger.integrations.anthropic needs the Anthropic Python SDK: "
        "pip install 'tokenledger[anthropic]'",
        name=exc.name,
    ) from exc

from tokenledger import semconv as sc
from tokenledger.capture import PendingCall, abegin_call, begin_call
from tokenledger.exceptions import BudgetExceeded, LedgerError
from tokenledger.records import TokenUsage

__all__ = ["instrument", "uninstrument"]

logger = logging.getLogger("tokenledger")

# (resource class, method, async). ``parse`` never streams; ``stream`` returns a manager.
_TARGETS: Final[tuple[tuple[type, str, bool], ...]] = (
    (Messages, "create", False),
    (Messages, "parse", False),
    (Messages, "stream", False),
    (AsyncMessages, "create", True),
    (AsyncMessages, "parse", True),
    (AsyncMessages, "stream", True),
    (BetaMessages, "create", False),
    (BetaMessages, "parse", False),
    (BetaMessages, "stream", False),
    (AsyncBetaMessages, "create", True),
    (AsyncBetaMessages, "parse", True),
    (AsyncBetaMessages, "stream", True),
)

# The usage fields Anthropic reports, all of which usage.py reads as Anthropic's shape.
_USAGE_FIELDS: Final = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def _provider_of(resource: Any) -> str:
    """litellm's name of the provider behind the client, for pricing and spans."""
    name = type(getattr(resource, "_client", None)).__name__
    if "Bedrock" in name:
        return "bedrock"
    if "Vertex" in name:
        return "vertex_ai"
    if "Foundry" in name:
        return "azure_ai"
    return "anthropic"


def _given_int(value: object) -> int | None:
    """An int argument, or None for a missing one (the SDK's ``omit`` / ``NOT_GIVEN``)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _messages_of(kwargs: dict[str, Any]) -> list[Any]:
    """The prompt as chat messages, the system prompt first, for counting tokens."""
    messages = kwargs.get("messages")
    if messages is not None and not isinstance(messages, (list, tuple)):
        # An iterable (a generator, say) would be used up by counting: send a list.
        messages = kwargs["messages"] = list(messages)
    system = kwargs.get("system")
    prompt = [{"role": "system", "content": system}] if isinstance(system, (str, list)) else []
    return prompt + list(messages or ())


def _usage_counts(*reports: Any) -> dict[str, Any] | None:
    """The usage fields of Anthropic usage objects, later reports overriding earlier ones
    (``message_delta`` counts are cumulative), or None when there is no report."""
    counts: dict[str, Any] = {}
    for report in reports:
        if report is None:
            continue
        for field in _USAGE_FIELDS:
            value = getattr(report, field, None)
            if value is not None:
                counts[field] = value
    # Only the counts: usage.py takes a usage with `output_tokens_details` (Anthropic's
    # thinking breakdown) for the OpenAI Responses shape and would drop the cache
    # tokens from the input. Thinking tokens are billed inside `output_tokens` anyway.
    return counts or None


def _count_tokens(model: str, *, text: str | None = None, messages: Any = None) -> int:
    """Tokens in ``text`` or ``messages`` by litellm's counter for the model, else
    roughly four characters a token."""
    try:
        import litellm

        if messages is not None:
            return int(litellm.token_counter(model=model, messages=messages))
        return int(litellm.token_counter(model=model, text=text or ""))
    except Exception:
        if text is None:
            text = json.dumps(messages, default=str)
        return math.ceil(len(text) / 4)


# -- one call ---------------------------------------------------------------------------


class _Call:
    """What is seen of one call's response; finishes its `PendingCall` exactly once.

    Never raises: a failure to record is logged and the user's call goes on.
    """

    __slots__ = (
        "complete",
        "final_usage",
        "finish_reasons",
        "kwargs",
        "model",
        "pending",
        "start_usage",
        "text",
    )

    def __init__(self, pending: PendingCall, kwargs: dict[str, Any]) -> None:
        self.pending = pending
        self.kwargs = kwargs
        self.start_usage: Any = None  # message_start's usage: input and cache counts
        self.final_usage: Any = None  # message_delta's (cumulative) usage, or the message's
        self.model: str | None = None
        self.finish_reasons: list[str] = []
        self.text: list[str] = []  # streamed output, counted if the stream is cut short
        self.complete = False  # the final usage was seen

    # -- reading ------------------------------------------------------------------------
    def see_message(self, message: Any) -> None:
        """A whole (non-streamed) message."""
        self.final_usage = getattr(message, "usage", None)
        self.model = getattr(message, "model", None) or None
        self.complete = True
        if getattr(message, "stop_reason", None):
            self.finish_reasons.append(str(message.stop_reason))

    def see_event(self, event: Any) -> None:
        """One streamed event."""
        try:
            kind = getattr(event, "type", None)
            if kind == "message_start":
                self.start_usage = event.message.usage
                self.model = event.message.model or self.model
            elif kind == "content_block_delta":
                delta = event.delta
                piece = (
                    getattr(delta, "text", None)
                    or getattr(delta, "partial_json", None)
                    or getattr(delta, "thinking", None)
                )
                if isinstance(piece, str):
                    self.text.append(piece)
            elif kind == "message_delta":
                self.final_usage = event.usage
                self.complete = True
                if getattr(event.delta, "stop_reason", None):
                    self.finish_reasons.append(str(event.delta.stop_reason))
        except Exception:
            logger.exception("tokenledger could not read a streamed Anthropic event")

    # -- finishing ----------------------------------------------------------------------
    def _usage(self) -> dict[str, Any] | None:
        return _usage_counts(self.start_usage, self.final_usage)

    def _partial_usage(self) -> dict[str, Any] | TokenUsage:
        """The usage of a stream cut short: what the provider reported, with the output
        counted from the text received when no output count came."""
        model = self.model or self.pending.call.requested_model or ""
        output = _count_tokens(model, text="".join(self.text)) if self.text else 0
        counts = self._usage()
        if counts is None:
            prompt = _count_tokens(model, messages=_messages_of(self.kwargs))
            return TokenUsage(input_tokens=prompt, output_tokens=output)
        counts["output_tokens"] = max(output, counts.get("output_tokens") or 0)
        return counts

    def finish(self) -> None:
        """The message, or the whole stream, arrived."""
        try:
            if self.pending.done:
                return
            counts = self._usage()
            if counts is not None and self.complete:
                self.pending.succeed(
                    counts, model=self.model, finish_reasons=self.finish_reasons or None
                )
            else:  # a stream that ended without its final usage
                self.pending.succeed(
                    self._partial_usage(),
                    model=self.model,
                    finish_reasons=self.finish_reasons or None,
                    estimated=True,
                )
        except Exception:
            logger.exception("tokenledger could not record an Anthropic call")

    def abandon(self) -> None:
        """The stream was closed or dropped: if its final usage had come, that is the
        end of it; otherwise the call is recorded as abandoned, output estimated."""
        if sys.is_finalizing():
            return  # a stream collected at interpreter exit: the ledger is gone
        try:
            if self.pending.done:
                return
            if self.complete:
                self.finish()
            else:
                self.pending.abandon(self._partial_usage())
        except Exception:
            logger.exception("tokenledger could not record an abandoned Anthropic stream")

    def fail(self, error: BaseException) -> None:
        try:
            self.pending.fail(error, usage=self._usage())
        except Exception:
            logger.exception("tokenledger could not record a failed Anthropic call")


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


def _watch_stream(stream: Any, call: _Call, *, is_async: bool) -> None:
    """Watch an SDK stream in place: it keeps its type and its helpers keep working."""
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


def _observe(inner: Iterator[Any], call: _Call) -> Iterator[Any]:
    try:
        for item in inner:
            call.see_event(item)
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


async def _observe_async(inner: AsyncIterator[Any], call: _Call) -> AsyncIterator[Any]:
    import asyncio

    try:
        async for item in inner:
            call.see_event(item)
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


def _raw_response_types() -> tuple[type[Any], ...]:
    # `with_raw_response` / `with_streaming_response` return these wrappers instead of
    # the message; they live in a private SDK module, so look them up defensively.
    import importlib

    found: list[type[Any]] = []
    for module, name in (
        ("anthropic._response", "APIResponse"),
        ("anthropic._response", "AsyncAPIResponse"),
        ("anthropic._legacy_response", "LegacyAPIResponse"),  # anthropic<0.30
    ):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            logger.debug("anthropic has no %s.%s", module, name)
    return tuple(found)


_RAW_RESPONSES: Final = _raw_response_types()


def _settle(result: Any, call: _Call) -> None:
    """Finish a sync call from what ``create`` returned: a message or a stream, possibly
    in a raw-response wrapper (parsed once here; the SDK caches it for the caller)."""
    if isinstance(result, _RAW_RESPONSES):
        result = cast(Any, result).parse()
    if isinstance(result, anthropic.Stream):
        _watch_stream(result, call, is_async=False)
    else:
        call.see_message(result)
        call.finish()


async def _asettle(result: Any, call: _Call) -> None:
    if isinstance(result, _RAW_RESPONSES):
        result = cast(Any, result).parse()
        if hasattr(result, "__await__"):  # AsyncAPIResponse.parse is a coroutine
            result = await result
    if isinstance(result, anthropic.AsyncStream):
        _watch_stream(result, call, is_async=True)
    else:
        call.see_message(result)
        call.finish()


# -- the wrappers -------------------------------------------------------------------------


def _start(
    resource: Any, kwargs: dict[str, Any], provider: str | None, *, stream: bool
) -> dict[str, Any]:
    model = kwargs.get("model")
    return {
        "operation": sc.OP_CHAT,
        "model": model if isinstance(model, str) else None,
        "provider": provider or _provider_of(resource),
        "request": {"messages": _messages_of(kwargs)},
        "max_tokens": _given_int(kwargs.get("max_tokens")),
        "stream": stream or kwargs.get("stream") is True,
    }


def _begin(
    resource: Any, kwargs: dict[str, Any], provider: str | None, *, stream: bool = False
) -> PendingCall | None:
    try:
        pending = begin_call(**_start(resource, kwargs, provider, stream=stream))
    except (BudgetExceeded, LedgerError):
        raise  # refused, or budgets cannot be checked: fail closed, send nothing
    except Exception:
        logger.exception("tokenledger could not start recording an Anthropic call")
        return None
    if pending is not None:
        _send_model(pending, kwargs)
    return pending


async def _abegin(
    resource: Any, kwargs: dict[str, Any], provider: str | None, *, stream: bool = False
) -> PendingCall | None:
    try:
        pending = await abegin_call(**_start(resource, kwargs, provider, stream=stream))
    except (BudgetExceeded, LedgerError):
        raise  # refused, or budgets cannot be checked: fail closed, send nothing
    except Exception:
        logger.exception("tokenledger could not start recording an Anthropic call")
        return None
    if pending is not None:
        _send_model(pending, kwargs)
    return pending


def _send_model(pending: PendingCall, kwargs: dict[str, Any]) -> None:
    model = pending.model_to_send
    if model and model != kwargs.get("model"):
        kwargs["model"] = model  # a downgrade budget chose a cheaper model


def _wrap_create(
    original: Callable[..., Any], *, is_async: bool, provider: str | None
) -> Callable[..., Any]:
    if is_async:

        @functools.wraps(original)
        async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            pending = await _abegin(self, kwargs, provider)
            if pending is None:
                return await original(self, *args, **kwargs)
            call = _Call(pending, kwargs)
            try:
                result = await original(self, *args, **kwargs)
            except BaseException as exc:
                call.fail(exc)
                raise
            try:
                await _asettle(result, call)
            except Exception:
                logger.exception("tokenledger could not record an Anthropic call")
            return result

    else:

        @functools.wraps(original)
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            pending = _begin(self, kwargs, provider)
            if pending is None:
                return original(self, *args, **kwargs)
            call = _Call(pending, kwargs)
            try:
                result = original(self, *args, **kwargs)
            except BaseException as exc:
                call.fail(exc)
                raise
            try:
                _settle(result, call)
            except Exception:
                logger.exception("tokenledger could not record an Anthropic call")
            return result

    method._tokenledger_original = original  # type: ignore[attr-defined]
    return method


def _request_slot(manager: Any) -> str | None:
    """The private attribute where a stream manager keeps the request it sends on
    ``with`` (``_MessageStreamManager__api_request`` and its beta and async twins)."""
    return next((name for name in vars(manager) if name.endswith("__api_request")), None)


def _wrap_stream(
    original: Callable[..., Any], *, is_async: bool, provider: str | None
) -> Callable[..., Any]:
    """``messages.stream(...)``: the manager the SDK made, whose request (sent when it is
    entered) is checked against budgets and watched."""

    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        manager = original(self, *args, **kwargs)
        slot = _request_slot(manager)
        if slot is None:
            logger.warning(
                "tokenledger cannot record messages.stream() with this anthropic version "
                "(%s); use messages.create(stream=True)",
                anthropic.__version__,
            )
            return manager
        sent = getattr(manager, slot)

        def resend(model: str) -> Any:
            # The SDK builds the request inside stream(): build it again for a new model.
            return getattr(original(self, *args, **{**kwargs, "model": model}), slot)

        if is_async:

            async def arequest() -> Any:
                model = kwargs.get("model")
                try:
                    pending = await _abegin(self, kwargs, provider, stream=True)
                except BaseException:
                    sent.close()  # the SDK's request coroutine, now never to be awaited
                    raise
                request = sent
                if kwargs.get("model") != model:
                    sent.close()
                    request = resend(kwargs["model"])
                if pending is None:
                    return await request
                call = _Call(pending, kwargs)
                try:
                    stream = await request
                except BaseException as exc:
                    call.fail(exc)
                    raise
                _watch_stream(stream, call, is_async=True)
                return stream

            setattr(manager, slot, arequest())
        else:

            def request() -> Any:
                model = kwargs.get("model")
                pending = _begin(self, kwargs, provider, stream=True)
                if pending is None:
                    return sent()
                send = sent if kwargs.get("model") == model else resend(kwargs["model"])
                call = _Call(pending, kwargs)
                try:
                    stream = send()
                except BaseException as exc:
                    call.fail(exc)
                    raise
                _watch_stream(stream, call, is_async=False)
                return stream

            setattr(manager, slot, request)
        return manager

    method._tokenledger_original = original  # type: ignore[attr-defined]
    return method


def _wrap(
    original: Callable[..., Any], name: str, *, is_async: bool, provider: str | None
) -> Callable[..., Any]:
    if name == "stream":
        return _wrap_stream(original, is_async=is_async, provider=provider)
    return _wrap_create(original, is_async=is_async, provider=provider)


def _unwrapped(function: Any) -> Any:
    return getattr(function, "_tokenledger_original", function)


# -- switching it on and off -----------------------------------------------------------

_lock = threading.Lock()
# (class, method name) -> (the original attribute, whether the class defined it itself)
_class_patches: dict[tuple[type, str], tuple[Any, bool]] = {}
_patched_resources: weakref.WeakSet[Any] = weakref.WeakSet()


def _resources_of(client: Any) -> dict[type, Any]:
    messages = getattr(client, "messages", None)
    if not isinstance(messages, (Messages, AsyncMessages)):
        raise TypeError(
            f"`client` is {client!r}; instrument() takes an anthropic.Anthropic or "
            "anthropic.AsyncAnthropic client, or nothing to instrument every client."
        )
    found = [messages]
    beta = getattr(client, "beta", None)
    if beta is not None and hasattr(beta, "messages"):
        found.append(beta.messages)
    return {type(resource): resource for resource in found}


def instrument(client: Any = None, *, provider: str | None = None) -> Any:
    """Record the calls of one Anthropic client, or of every client.

    With a ``client`` (``anthropic.Anthropic``, ``AsyncAnthropic``, or their Bedrock,
    Vertex and Foundry variants) only that client is recorded, and it is returned so
    the call can wrap its construction: ``client = instrument(Anthropic())``. A copy
    made later with ``client.with_options(...)`` is a new client and is not recorded.
    With no argument the SDK's classes are patched and every client is recorded.

    ``provider`` overrides the provider name used for pricing and spans (litellm's
    names); by default it is ``"anthropic"``, or ``"bedrock"``, ``"vertex_ai"``,
    ``"azure_ai"`` by the client's class.

    Calls are recorded into the current run of the ledger that is capturing; budgets
    are checked before each request, and a refusal raises `BudgetExceeded` with
    nothing sent. Calling it again is harmless.

    .. versionadded:: 0.1.0
    """
    with _lock:
        if client is None:
            for cls, name, is_async in _TARGETS:
                if (cls, name) in _class_patches or not hasattr(cls, name):
                    continue
                original = cls.__dict__.get(name)
                own = original is not None
                if original is None:
                    original = getattr(cls, name)
                _class_patches[(cls, name)] = (original, own)
                setattr(cls, name, _wrap(original, name, is_async=is_async, provider=provider))
            return None
        resources = _resources_of(client)
        for cls, name, is_async in _TARGETS:
            resource = resources.get(cls)
            if resource is None or not hasattr(cls, name):
                continue
            # Wrap the class's own function (unwrapped if instrument() patched it), so a
            # client instrumented on its own and globally is still recorded once.
            original = _unwrapped(getattr(cls, name))
            wrapped = _wrap(original, name, is_async=is_async, provider=provider)
            setattr(resource, name, types.MethodType(wrapped, resource))
            _patched_resources.add(resource)
        return client


def uninstrument(client: Any = None) -> None:
    """Stop recording: one client's calls, or (no argument) every client's, restoring
    the SDK exactly as it was.

    .. versionadded:: 0.1.0
    """
    with _lock:
        if client is None:
            for (cls, name), (original, own) in _class_patches.items():
                if own:
                    setattr(cls, name, original)
                else:
                    delattr(cls, name)
            _class_patches.clear()
            resources: list[Any] = list(_patched_resources)
        else:
            resources = list(_resources_of(client).values())
        for resource in resources:
            for name in ("create", "parse", "stream"):
                bound = resource.__dict__.get(name)
                if hasattr(getattr(bound, "__func__", None), "_tokenledger_original"):
                    del resource.__dict__[name]
            _patched_resources.discard(resource)
