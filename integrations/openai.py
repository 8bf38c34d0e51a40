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
from collections.abc import Callable
from typing import Any, Final

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
from tokenledger.capture import PendingCall
from tokenledger.records import TokenUsage

from ._sdk import (
    OPENAI_COMPATIBLE_HOSTS,
    SDK,
    Patches,
    SDKCall,
    count_tokens,
    given_int,
    raw_types,
    wrap_create,
)

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


def _provider_of(resource: Any) -> str:
    """The provider, and so the price entry: Azure, or an OpenAI-compatible API known by
    its host. Anything else is taken as OpenAI; ``instrument(provider=...)`` says otherwise."""
    client = getattr(resource, "_client", None)
    if isinstance(client, (openai.AzureOpenAI, openai.AsyncAzureOpenAI)):
        return "azure"
    host = getattr(getattr(client, "base_url", None), "host", None)
    return OPENAI_COMPATIBLE_HOSTS.get(host or "", "openai")


def _request_of(endpoint: _Endpoint, kwargs: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """The request body begin_call counts tokens in, and the output token limit."""
    if endpoint.api == "chat":
        messages = kwargs.get("messages")
        if messages is not None and not isinstance(messages, (list, tuple)):
            # An iterable (a generator, say) would be used up by counting: send a list.
            messages = kwargs["messages"] = list(messages)
        max_tokens = given_int(kwargs.get("max_completion_tokens"))
        if max_tokens is None:
            max_tokens = given_int(kwargs.get("max_tokens"))
        return {"messages": messages}, max_tokens
    if endpoint.api == "responses":
        text = kwargs.get("input")
        instructions = kwargs.get("instructions")
        if isinstance(instructions, str):
            parts = text if isinstance(text, list) else [text] if isinstance(text, str) else []
            text = [instructions, *parts]
        body = {"input": text} if isinstance(text, (str, list)) else {}
        return body, given_int(kwargs.get("max_output_tokens"))
    text = kwargs.get("input")
    return ({"input": text} if isinstance(text, (str, list)) else {}), None


# -- one call ---------------------------------------------------------------------------


_SDK: Final = SDK(
    name="OpenAI",
    stream=openai.Stream,
    async_stream=openai.AsyncStream,
    raw_responses=raw_types(
        ("openai._legacy_response", "LegacyAPIResponse"),
        ("openai._response", "APIResponse"),
        ("openai._response", "AsyncAPIResponse"),
    ),
)


class _Call(SDKCall):
    """What is seen of one OpenAI call's response (see `SDKCall`)."""

    __slots__ = ("endpoint", "failure", "request", "usage")

    sdk = _SDK

    def __init__(self, pending: PendingCall, endpoint: _Endpoint, kwargs: dict[str, Any]) -> None:
        super().__init__(pending, kwargs)
        self.endpoint = endpoint
        self.request: Any = None  # the httpx request of a stream, for in-band errors
        self.usage: Any = None  # the provider's usage, once seen
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

    def see_stream(self, stream: Any) -> None:
        self.request = getattr(getattr(stream, "response", None), "request", None)

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
            input_tokens = count_tokens(model, messages=self.kwargs.get("messages") or [])
        else:
            text = _request_of(self.endpoint, self.kwargs)[0].get("input")
            if isinstance(text, list):
                text = "\n".join(t if isinstance(t, str) else json.dumps(t) for t in text)
            input_tokens = count_tokens(model, text=text or "")
        output_tokens = count_tokens(model, text="".join(self.text)) if self.text else 0
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

    def reported_usage(self) -> Any:
        return self.usage

    def partial_usage(self) -> Any:
        return self.usage or self._estimated_usage()

    def _failure_error(self) -> openai.APIError:
        # The Responses API reports a failure in-band (`response.failed`) where the SDK
        # raises nothing; record it as the APIError the SDK raises for in-band errors.
        body = self.failure or {}
        message = body.get("message") or "The response failed"
        return openai.APIError(str(message), self.request, body=body)


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


def _wrap(
    original: Callable[..., Any], endpoint: _Endpoint, *, is_async: bool, provider: str | None
) -> Callable[..., Any]:
    return wrap_create(
        original,
        _SDK,
        is_async=is_async,
        arguments=lambda resource, kwargs: _pending_args(resource, endpoint, kwargs, provider),
        new_call=lambda pending, kwargs: _Call(pending, endpoint, kwargs),
    )


# -- switching it on and off -----------------------------------------------------------

_patches = Patches()


def _wraps(provider: str | None) -> list[tuple[type, str, Callable[[Any], Any]]]:
    return [
        (
            cls,
            name,
            functools.partial(_wrap, endpoint=endpoint, is_async=is_async, provider=provider),
        )
        for cls, name, endpoint, is_async in _TARGETS
    ]


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
