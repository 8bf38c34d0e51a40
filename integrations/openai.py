"""Record every call an OpenAI Python SDK client makes.

``instrument()`` patches the SDK's resource classes, so every ``OpenAI`` and
``AsyncOpenAI`` client (``AzureOpenAI`` too) is recorded; ``instrument(client)`` patches
one client only. Recorded: Chat Completions (``create``, ``parse``, the ``stream``
helper), the Responses API (``create``, ``parse``, ``stream``) and embeddings, sync and
async, streamed or not, including ``with_raw_response``.

How a call is seen, and why there:

* **Before the request** — the public ``create`` / ``parse`` methods are wrapped. Both
  stream helpers call ``self.create``, so they go through the same wrapper. The wrapper
  calls `tokenledger.capture.begin_call` first: budgets are reserved there and a refusal
  raises `BudgetExceeded` with no HTTP request sent (as does `LedgerError` when the
  reservation cannot be written: budgets fail closed). A ``downgrade`` budget's cheaper
  model replaces ``model=``.
* **After the response** — the usage block is read as the SDK parsed it (cached and
  reasoning token details included) and the call is finished with
  `PendingCall.succeed`; an SDK exception is recorded with `PendingCall.fail` and
  re-raised unchanged.
* **Streams** — the SDK's ``Stream`` keeps its type; the iterator inside it is replaced
  by one that watches the chunks and finishes the call when the stream ends, fails, is
  closed early or is dropped. Usage comes from the stream itself when it carries one
  (``stream_options={"include_usage": True}``, or the Responses API's
  ``response.completed`` event); otherwise the tokens are counted and the call is
  marked estimated. tokenledger never adds ``include_usage`` itself: the extra chunk
  it brings has no ``choices`` and would break code that reads ``chunk.choices[0]``.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import dataclasses
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
    import openai
    from openai.resources.chat.completions import AsyncCompletions, Completions
    from openai.resources.embeddings import AsyncEmbeddings, Embeddings
    from openai.resources.responses import AsyncResponses, Responses
except ModuleNotFoundError as exc:  # pragma: no cover - exercised by a test with sys.modules
    raise ModuleNotFoundError(
        "tokenledger.integrations.openai needs the OpenAI Python SDK (openai>=1.66): "
        "pip install 'tokenledger[openai]'",
        name=exc.name,
    ) from exc

from tokenledger import semconv as sc
from tokenledger.capture import PendingCall, abegin_call, begin_call
from tokenledger.exceptions import BudgetExceeded, LedgerError
from tokenledger.records import TokenUsage

__all__ = ["instrument", "uninstrument"]

logger = logging.getLogger("tokenledger")


# -- what each endpoint sends and returns ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Endpoint:
    operation: str  # gen_ai.operation.name
    api: str  # "chat", "responses" or "embeddings": how to read its request and response


_CHAT: Final = _Endpoint(sc.OP_CHAT, "chat")
_RESPONSES: Final = _Endpoint(sc.OP_CHAT, "responses")
_EMBEDDINGS: Final = _Endpoint(sc.OP_EMBEDDINGS, "embeddings")

# (resource class, method, endpoint, async). Only public methods: the SDK's stream
# helpers (``chat.completions.stream``, ``responses.stream``) call ``self.create``.
_TARGETS: Final[tuple[tuple[type, str, _Endpoint, bool], ...]] = (
    (Completions, "create", _CHAT, False),
    (Completions, "parse", _CHAT, False),
    (AsyncCompletions, "create", _CHAT, True),
    (AsyncCompletions, "parse", _CHAT, True),
    (Responses, "create", _RESPONSES, False),
    (Responses, "parse", _RESPONSES, False),
    (AsyncResponses, "create", _RESPONSES, True),
    (AsyncResponses, "parse", _RESPONSES, True),
    (Embeddings, "create", _EMBEDDINGS, False),
    (AsyncEmbeddings, "create", _EMBEDDINGS, True),
)

# Hosts of OpenAI-compatible APIs, to name the provider (and so the price entry) right.
# Anything else is taken as OpenAI; pass ``provider=`` to `instrument` to say otherwise.
_HOST_PROVIDERS: Final = {
    "api.openai.com": "openai",
    "openrouter.ai": "openrouter",
    "api.deepseek.com": "deepseek",
    "api.groq.com": "groq",
    "api.mistral.ai": "mistral",
    "api.x.ai": "xai",
    "generativelanguage.googleapis.com": "gemini",
}


def _provider_of(resource: Any) -> str:
    client = getattr(resource, "_client", None)
    if isinstance(client, (openai.AzureOpenAI, openai.AsyncAzureOpenAI)):
        return "azure"
    host = getattr(getattr(client, "base_url", None), "host", None)
    return _HOST_PROVIDERS.get(host or "", "openai")


def _given_int(value: object) -> int | None:
    """An int argument, or None for a missing one (the SDK's ``omit`` / ``NOT_GIVEN``)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _request_of(endpoint: _Endpoint, kwargs: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """The request body begin_call counts tokens in, and the output token limit."""
    if endpoint.api == "chat":
        messages = kwargs.get("messages")
        if messages is not None and not isinstance(messages, (list, tuple)):
            # An iterable (a generator, say) would be used up by counting: send a list.
            messages = kwargs["messages"] = list(messages)
        max_tokens = _given_int(kwargs.get("max_completion_tokens"))
        if max_tokens is None:
            max_tokens = _given_int(kwargs.get("max_tokens"))
        return {"messages": messages}, max_tokens
    if endpoint.api == "responses":
        text = kwargs.get("input")
        instructions = kwargs.get("instructions")
        if isinstance(instructions, str):
            parts = text if isinstance(text, list) else [text] if isinstance(text, str) else []
            text = [instructions, *parts]
        body = {"input": text} if isinstance(text, (str, list)) else {}
        return body, _given_int(kwargs.get("max_output_tokens"))
    text = kwargs.get("input")
    return ({"input": text} if isinstance(text, (str, list)) else {}), None


# -- one call ---------------------------------------------------------------------------


def _count_tokens(model: str, *, text: str | None = None, messages: Any = None) -> int:
    """Tokens in ``text`` or ``messages`` by the model's tokenizer (tiktoken through
    litellm), else roughly four characters a token."""
    try:
        import litellm

        if messages is not None:
            return int(litellm.token_counter(model=model, messages=messages))
        return int(litellm.token_counter(model=model, text=text or ""))
    except Exception:
        if text is None:
            text = json.dumps(messages, default=str)
        return math.ceil(len(text) / 4)


class _Call:
    """What is seen of one call's response; finishes its `PendingCall` exactly once.

    Never raises: a failure to record is logged and the user's call goes on.
    """

    __slots__ = (
        "complete",
        "endpoint",
        "failure",
        "finish_reasons",
        "kwargs",
        "model",
        "pending",
        "request",
        "text",
        "usage",
    )

    def __init__(self, pending: PendingCall, endpoint: _Endpoint, kwargs: dict[str, Any]) -> None:
        self.pending = pending
        self.endpoint = endpoint
        self.kwargs = kwargs
        self.request: Any = None  # the httpx request of a stream, for in-band errors
        self.usage: Any = None  # the provider's usage, once seen
        self.model: str | None = None
        self.finish_reasons: list[str] = []
        self.text: list[str] = []  # streamed output, counted when no usage comes
        self.complete = False  # the provider's last event was seen
        self.failure: dict[str, Any] | None = None  # a Responses `response.failed` error

    # -- reading ------------------------------------------------------------------------
    def see_response(self, response: Any) -> None:
        """A whole (non-streamed) response object."""
        self.usage = getattr(response, "usage", None)
        self.model = getattr(response, "model", None) or None
        self.complete = True
        if self.endpoint.api == "chat":
            for choice in getattr(response, "choices", None) or ():
                if choice.finish_reason:
                    self.finish_reasons.append(str(choice.finish_reason))
                message = getattr(choice, "message", None)
                content = getattr(message, "content", None)
                if isinstance(content, str):
                    self.text.append(content)
        elif self.endpoint.api == "responses":
            self._see_final_response(response)
            text = getattr(response, "output_text", None)
            if isinstance(text, str):
                self.text.append(text)

    def see_chunk(self, chunk: Any) -> None:
        """One streamed chunk (chat) or event (Responses)."""
        try:
            if self.endpoint.api == "chat":
                self._see_chat_chunk(chunk)
            else:
                self._see_responses_event(chunk)
        except Exception:
            logger.exception("tokenledger could not read a streamed OpenAI chunk")

    def _see_chat_chunk(self, chunk: Any) -> None:
        usage = getattr(chunk, "usage", None)
        if usage is not None:  # the last chunk, with stream_options.include_usage
            self.usage = usage
            self.complete = True
        if getattr(chunk, "model", None):
            self.model = chunk.model
        for choice in getattr(chunk, "choices", None) or ():
            if choice.finish_reason:
                self.finish_reasons.append(str(choice.finish_reason))
            delta = choice.delta
            if delta is None:
                continue
            if delta.content:
                self.text.append(delta.content)
            for tool_call in delta.tool_calls or ():
                function = tool_call.function
                if function is not None:
                    self.text.extend(p for p in (function.name, function.arguments) if p)

    def _see_responses_event(self, event: Any) -> None:
        kind = getattr(event, "type", None)
        if kind in ("response.output_text.delta", "response.function_call_arguments.delta"):
            self.text.append(event.delta)
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            response = event.response
            self.usage = response.usage
            self.model = response.model or self.model
            self.complete = True
            self._see_final_response(response)
        elif kind == "response.created":
            self.model = event.response.model or self.model

    def _see_final_response(self, response: Any) -> None:
        status = getattr(response, "status", None)
        if status == "completed":
            self.finish_reasons.append("stop")
        elif status == "incomplete":
            details = getattr(response, "incomplete_details", None)
            self.finish_reasons.append(getattr(details, "reason", None) or "incomplete")
        elif status == "failed":
            error = getattr(response, "error", None)
            self.failure = error.to_dict() if error is not None else {}

    # -- finishing ----------------------------------------------------------------------
    def _estimated_usage(self) -> TokenUsage:
        model = self.model or self.pending.call.requested_model or ""
        if self.endpoint.api == "chat":
            input_tokens = _count_tokens(model, messages=self.kwargs.get("messages") or [])
        else:
            text = _request_of(self.endpoint, self.kwargs)[0].get("input")
            if isinstance(text, list):
                text = "\n".join(t if isinstance(t, str) else json.dumps(t) for t in text)
            input_tokens = _count_tokens(model, text=text or "")
        output_tokens = _count_tokens(model, text="".join(self.text)) if self.text else 0
        return TokenUsage(input_tokens=input_tokens, output_tokens=output_tokens)

    def finish(self) -> None:
        """The response, or the whole stream, arrived."""
        try:
            if self.pending.done:
                return
            if self.failure is not None:
                self.pending.fail(self._failure_error(), usage=self.usage)
            elif self.usage is not None:
                self.pending.succeed(
                    self.usage,
                    model=self.model,
                    finish_reasons=self.finish_reasons or None,
                    provider_cost=self.usage,
                )
            else:
                self.pending.succeed(
                    self._estimated_usage(),
                    model=self.model,
                    finish_reasons=self.finish_reasons or None,
                    estimated=True,
                )
        except Exception:
            logger.exception("tokenledger could not record an OpenAI call")

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
                self.pending.abandon(self.usage or self._estimated_usage())
        except Exception:
            logger.exception("tokenledger could not record an abandoned OpenAI stream")

    def fail(self, error: BaseException) -> None:
        try:
            self.pending.fail(error, usage=self.usage)
        except Exception:
            logger.exception("tokenledger could not record a failed OpenAI call")

    def _failure_error(self) -> openai.APIError:
        # The Responses API reports a failure in-band (`response.failed`) where the SDK
        # raises nothing; record it as the APIError the SDK raises for in-band errors.
        body = self.failure or {}
        message = body.get("message") or "The response failed"
        return openai.APIError(str(message), self.request, body=body)


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
    call.request = getattr(getattr(stream, "response", None), "request", None)
    inner = stream._iterator
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


async def _observe_async(inner: AsyncIterator[Any], call: _Call) -> AsyncIterator[Any]:
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


# -- results ------------------------------------------------------------------------------


def _raw_response_types() -> tuple[type[Any], ...]:
    # `with_raw_response` / `with_streaming_response` return these wrappers instead of
    # the parsed object; they live in private SDK modules, so look them up defensively.
    import importlib

    found: list[type[Any]] = []
    for module, name in (
        ("openai._legacy_response", "LegacyAPIResponse"),
        ("openai._response", "APIResponse"),
        ("openai._response", "AsyncAPIResponse"),
    ):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            logger.debug("openai has no %s.%s", module, name)
    return tuple(found)


_RAW_RESPONSES: Final = _raw_response_types()


def _settle(result: Any, call: _Call) -> None:
    """Finish a sync call from what ``create`` returned."""
    if isinstance(result, _RAW_RESPONSES):
        # Parsed once and cached by the SDK: the caller's own parse() gets the same.
        result = cast(Any, result).parse()
    if isinstance(result, openai.Stream):
        _watch_stream(result, call, is_async=False)
    else:
        call.see_response(result)
        call.finish()


async def _asettle(result: Any, call: _Call) -> None:
    if isinstance(result, _RAW_RESPONSES):
        result = cast(Any, result).parse()
        if hasattr(result, "__await__"):  # AsyncAPIResponse.parse is a coroutine
            result = await result
    if isinstance(result, openai.AsyncStream):
        _watch_stream(result, call, is_async=True)
    else:
        call.see_response(result)
        call.finish()


# -- the wrappers -------------------------------------------------------------------------


def _pending_args(
    resource: Any, endpoint: _Endpoint, kwargs: dict[str, Any], provider: str | None
) -> dict[str, Any]:
    request, max_tokens = _request_of(endpoint, kwargs)
    model = kwargs.get("model")
    return {
        "operation": endpoint.operation,
        "model": model if isinstance(model, str) else None,
        "provider": provider or _provider_of(resource),
        "request": request,
        "max_tokens": max_tokens,
        "stream": kwargs.get("stream") is True,
    }


def _send_model(pending: PendingCall, kwargs: dict[str, Any]) -> None:
    model = pending.model_to_send
    if model and model != kwargs.get("model"):
        kwargs["model"] = model  # a downgrade budget chose a cheaper model


def _wrap(
    original: Callable[..., Any], endpoint: _Endpoint, *, is_async: bool, provider: str | None
) -> Callable[..., Any]:
    if is_async:

        @functools.wraps(original)
        async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            pending: PendingCall | None = None
            try:
                pending = await abegin_call(**_pending_args(self, endpoint, kwargs, provider))
            except (BudgetExceeded, LedgerError):
                raise  # refused, or budgets cannot be checked: fail closed, send nothing
            except Exception:
                logger.exception("tokenledger could not start recording an OpenAI call")
            if pending is None:
                return await original(self, *args, **kwargs)
            _send_model(pending, kwargs)
            call = _Call(pending, endpoint, kwargs)
            try:
                result = await original(self, *args, **kwargs)
            except BaseException as exc:
                call.fail(exc)
                raise
            try:
                await _asettle(result, call)
            except Exception:
                logger.exception("tokenledger could not record an OpenAI call")
            return result

    else:

        @functools.wraps(original)
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            pending: PendingCall | None = None
            try:
                pending = begin_call(**_pending_args(self, endpoint, kwargs, provider))
            except (BudgetExceeded, LedgerError):
                raise  # refused, or budgets cannot be checked: fail closed, send nothing
            except Exception:
                logger.exception("tokenledger could not start recording an OpenAI call")
            if pending is None:
                return original(self, *args, **kwargs)
            _send_model(pending, kwargs)
            call = _Call(pending, endpoint, kwargs)
            try:
                result = original(self, *args, **kwargs)
            except BaseException as exc:
                call.fail(exc)
                raise
            try:
                _settle(result, call)
            except Exception:
                logger.exception("tokenledger could not record an OpenAI call")
            return result

    method._tokenledger_original = original  # type: ignore[attr-defined]
    return method


def _unwrapped(function: Any) -> Any:
    return getattr(function, "_tokenledger_original", function)


# -- switching it on and off -----------------------------------------------------------

_lock = threading.Lock()
# (class, method name) -> (the original attribute, whether the class defined it itself)
_class_patches: dict[tuple[type, str], tuple[Any, bool]] = {}
_patched_resources: weakref.WeakSet[Any] = weakref.WeakSet()


def _resources_of(client: Any) -> dict[type, Any]:
    if not isinstance(client, (openai.OpenAI, openai.AsyncOpenAI)):
        raise TypeError(
            f"`client` is {client!r}; instrument() takes an openai.OpenAI or "
            "openai.AsyncOpenAI client, or nothing to instrument every client."
        )
    return {
        type(resource): resource
        for resource in (client.chat.completions, client.responses, client.embeddings)
    }


def instrument(client: Any = None, *, provider: str | None = None) -> Any:
    """Record the calls of one OpenAI client, or of every client.

    With a ``client`` (``openai.OpenAI`` or ``openai.AsyncOpenAI``, Azure's included),
    only that client is recorded, and it is returned so the call can wrap its
    construction: ``client = instrument(OpenAI())``. A copy made later with
    ``client.with_options(...)`` is a new client and is not recorded. With no argument
    the SDK's classes are patched and every client, old or new, is recorded.

    ``provider`` names the provider for pricing and the ``gen_ai.provider.name`` span
    attribute (litellm's names: ``"openai"``, ``"azure"``, ``"openrouter"``...). By
    default it is read from the client: ``"azure"`` for Azure clients, a few known
    OpenAI-compatible hosts by their ``base_url``, else ``"openai"``.

    Calls are recorded into the current run of the ledger that is capturing (see
    `tokenledger.Ledger`); budgets are checked before each request, and a refusal
    raises `BudgetExceeded` with nothing sent. Calling it again is harmless.

    .. versionadded:: 0.1.0
    """
    with _lock:
        if client is None:
            for cls, name, endpoint, is_async in _TARGETS:
                if (cls, name) in _class_patches or not hasattr(cls, name):
                    continue  # done already, or a method older SDKs lack (parse)
                original = cls.__dict__.get(name)
                own = original is not None
                if original is None:
                    original = getattr(cls, name)
                _class_patches[(cls, name)] = (original, own)
                wrapped = _wrap(original, endpoint, is_async=is_async, provider=provider)
                setattr(cls, name, wrapped)
            return None
        resources = _resources_of(client)
        for cls, name, endpoint, is_async in _TARGETS:
            resource = resources.get(cls)
            if resource is None or not hasattr(cls, name):
                continue
            # Wrap the class's own function (unwrapped if instrument() patched it), so a
            # client instrumented on its own and globally is still recorded once.
            original = _unwrapped(getattr(cls, name))
            wrapped = _wrap(original, endpoint, is_async=is_async, provider=provider)
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
            for name in ("create", "parse"):
                bound = resource.__dict__.get(name)
                if hasattr(getattr(bound, "__func__", None), "_tokenledger_original"):
                    del resource.__dict__[name]
            _patched_resources.discard(resource)
