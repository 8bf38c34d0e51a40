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
import logging
from collections.abc import Callable
from typing import Any, Final

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
from tokenledger.capture import PendingCall
from tokenledger.records import TokenUsage

from ._sdk import (
    SDK,
    Patches,
    SDKCall,
    abegin,
    begin,
    count_tokens,
    given_int,
    mark_wrapper,
    raw_types,
    succeed_or_estimate,
    watch_stream,
    wrap_create,
)

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


# -- one call ---------------------------------------------------------------------------


_SDK: Final = SDK(
    name="Anthropic",
    stream=anthropic.Stream,
    async_stream=anthropic.AsyncStream,
    raw_responses=raw_types(
        ("anthropic._response", "APIResponse"),
        ("anthropic._response", "AsyncAPIResponse"),
        ("anthropic._legacy_response", "LegacyAPIResponse"),  # anthropic<0.30
    ),
)


class _Call(SDKCall):
    """What is seen of one Anthropic call's response (see `SDKCall`)."""

    __slots__ = ("final_usage", "start_usage")

    sdk = _SDK

    def __init__(self, pending: PendingCall, kwargs: dict[str, Any]) -> None:
        super().__init__(pending, kwargs)
        self.start_usage: Any = None  # message_start's usage: input and cache counts
        self.final_usage: Any = None  # message_delta's (cumulative) usage, or the message's

    # -- reading ------------------------------------------------------------------------
    def see_response(self, message: Any) -> None:
        """A whole (non-streamed) message."""
        self.final_usage = getattr(message, "usage", None)
        self.model = getattr(message, "model", None) or None
        self.complete = True
        if getattr(message, "stop_reason", None):
            self.finish_reasons.append(str(message.stop_reason))

    def see_chunk(self, event: Any) -> None:
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
    def reported_usage(self) -> dict[str, Any] | None:
        return _usage_counts(self.start_usage, self.final_usage)

    def partial_usage(self) -> dict[str, Any] | TokenUsage:
        """The usage of a stream cut short: what the provider reported, with the output
        counted from the text received when no output count came."""
        model = self.model or self.pending.call.requested_model or ""
        output = count_tokens(model, text="".join(self.text)) if self.text else 0
        counts = self.reported_usage()
        if counts is None:
            prompt = count_tokens(model, messages=_messages_of(self.kwargs))
            return TokenUsage(input_tokens=prompt, output_tokens=output)
        counts["output_tokens"] = max(output, counts.get("output_tokens") or 0)
        return counts

    def finish(self) -> None:
        """The message, or the whole stream, arrived."""
        try:
            if self.pending.done:
                return
            counts = self.reported_usage()
            # A stream that ended without its final usage is estimated.
            succeed_or_estimate(
                self.pending,
                counts if self.complete else None,
                self.partial_usage,
                model=self.model,
                finish_reasons=self.finish_reasons or None,
            )
        except Exception:
            logger.exception("tokenledger could not record an Anthropic call")


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
        "max_tokens": given_int(kwargs.get("max_tokens")),
        "stream": stream or kwargs.get("stream") is True,
    }


def _wrap_create(
    original: Callable[..., Any], *, is_async: bool, provider: str | None
) -> Callable[..., Any]:
    return wrap_create(
        original,
        _SDK,
        is_async=is_async,
        arguments=lambda resource, kwargs: _start(resource, kwargs, provider, stream=False),
        new_call=_Call,
    )


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
        start = functools.partial(_start, self, kwargs, provider, stream=True)

        def resend(model: str) -> Any:
            # The SDK builds the request inside stream(): build it again for a new model.
            return getattr(original(self, *args, **{**kwargs, "model": model}), slot)

        if is_async:

            async def arequest() -> Any:
                model = kwargs.get("model")
                try:
                    pending = await abegin(_SDK, start, kwargs)
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
                watch_stream(stream, call, is_async=True)
                return stream

            setattr(manager, slot, arequest())
        else:

            def request() -> Any:
                model = kwargs.get("model")
                pending = begin(_SDK, start, kwargs)
                if pending is None:
                    return sent()
                send = sent if kwargs.get("model") == model else resend(kwargs["model"])
                call = _Call(pending, kwargs)
                try:
                    stream = send()
                except BaseException as exc:
                    call.fail(exc)
                    raise
                watch_stream(stream, call, is_async=False)
                return stream

            setattr(manager, slot, request)
        return manager

    return mark_wrapper(method, original)


def _wrap(
    original: Callable[..., Any], name: str, *, is_async: bool, provider: str | None
) -> Callable[..., Any]:
    if name == "stream":
        return _wrap_stream(original, is_async=is_async, provider=provider)
    return _wrap_create(original, is_async=is_async, provider=provider)


# -- switching it on and off -----------------------------------------------------------

_patches = Patches()


def _wraps(provider: str | None) -> list[tuple[type, str, Callable[[Any], Any]]]:
    return [
        (cls, name, functools.partial(_wrap, name=name, is_async=is_async, provider=provider))
        for cls, name, is_async in _TARGETS
    ]


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
    with _patches.lock:
        _patches.patch(_wraps(provider), None if client is None else _resources_of(client))
    return client


def uninstrument(client: Any = None) -> None:
    """Stop recording: one client's calls, or (no argument) every client's, restoring
    the SDK exactly as it was.

    .. versionadded:: 0.1.0
    """
    with _patches.lock:
        _patches.restore(None if client is None else _resources_of(client).values())
