"""OpenAI's wire formats and an offline server, shared by the integration tests.

What OpenAI sends, to the byte where the SDKs care: chat completion JSON with a usage
block, SSE chunks ending in ``data: [DONE]`` (with and without the ``include_usage``
chunk), and the Responses API's JSON and named event stream. A `Server` answers an
``httpx.MockTransport`` with canned responses and keeps the requests it was sent. The
readers at the end take back the one call a test made.

Prices are litellm's bundled map: gpt-4o-mini is $0.15 / $0.60 per million input /
output tokens and $0.075 for cache reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import openai
from helpers import calls_of
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tokenledger import Ledger

PROMPT = "Summarise the ticket in one line."
MESSAGES = [{"role": "user", "content": PROMPT}]
SERVED = "gpt-4o-mini-2024-07-18"

# 1200 prompt tokens of which 1000 cached, 300 completion tokens of which 100 reasoning:
# 200 x $0.15/M + 1000 x $0.075/M + 300 x $0.60/M = $0.00003 + $0.000075 + $0.00018
CACHED_COST = Decimal("0.000285")
CHAT_USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1000, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 100,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
RESPONSES_USAGE = {  # the same counts, as the Responses API reports them
    "input_tokens": 1200,
    "input_tokens_details": {"cached_tokens": 1000},
    "output_tokens": 300,
    "output_tokens_details": {"reasoning_tokens": 100},
    "total_tokens": 1500,
}


# -- Chat Completions -------------------------------------------------------------------


def chat_completion(
    usage: dict[str, Any] | None = CHAT_USAGE, model: str = SERVED, text: str = "Printer jam."
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": "fp_1",
    }


def text_completion(*texts: str, usage: dict[str, Any]) -> dict[str, Any]:
    """The legacy Completions API's answer: one choice per prompt sent, one usage for
    them all."""
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1_700_000_000,
        "model": "gpt-3.5-turbo-instruct",
        "choices": [
            {"text": text, "index": index, "logprobs": None, "finish_reason": "stop"}
            for index, text in enumerate(texts)
        ],
        "usage": usage,
    }


def sse(*events: dict[str, Any] | str, named: bool = False) -> bytes:
    """Server-sent events: ``data: {...}`` blocks, with ``event:`` lines when ``named``
    (the Responses API and Anthropic name theirs after the event's type)."""
    out = []
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        if named and isinstance(event, dict):
            out.append(f"event: {event['type']}\n")
        out.append(f"data: {data}\n\n")
    return "".join(out).encode()


def chat_chunks(*, include_usage: bool) -> bytes:
    """A streamed chat completion, with the usage chunk last when ``include_usage``."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": SERVED,
            "system_fingerprint": "fp_1",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = None  # OpenAI sends null on every chunk but the last
        return body

    chunks: list[dict[str, Any] | str] = [
        chunk({"role": "assistant", "content": "", "refusal": None}),
        chunk({"content": "Printer"}),
        chunk({"content": " jam."}),
        chunk({}, "stop"),
    ]
    if include_usage:
        chunks.append({**chunk({}), "choices": [], "usage": CHAT_USAGE})
    return sse(*chunks, "[DONE]")


# -- the Responses API ------------------------------------------------------------------


def output_message(text: str) -> dict[str, Any]:
    """A response's output item: an assistant message."""
    return {
        "type": "message",
        "id": "msg_1",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def responses_body(
    *output: dict[str, Any],
    status: str = "completed",
    usage: dict[str, Any] | None = RESPONSES_USAGE,
    max_output_tokens: int | None = None,
) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1_700_000_000,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": max_output_tokens,
        "model": SERVED,
        "output": list(output),
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "usage": usage,
    }


def responses_events(*deltas: str, final: str = "response.completed") -> bytes:
    """The Responses API's event stream for one text message sent in ``deltas``, as
    OpenAI sends it; ``final="response.failed"`` ends it in a failure."""
    text = "".join(deltas)
    started = responses_body(status="in_progress", usage=None)
    item = {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant"}
    part = {"type": "output_text", "annotations": [], "text": ""}
    at = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    finished = responses_body(output_message(text))
    if final == "response.failed":
        finished = {
            **finished,
            "status": "failed",
            "error": {"code": "server_error", "message": "The model crashed."},
        }
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {"type": "response.output_item.added", "output_index": 0, "item": {**item, "content": []}},
        {"type": "response.content_part.added", **at, "part": part},
        *(
            {"type": "response.output_text.delta", **at, "delta": delta, "logprobs": []}
            for delta in deltas
        ),
        {"type": "response.output_text.done", **at, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **at, "part": {**part, "text": text}},
        {"type": "response.output_item.done", "output_index": 0, "item": finished["output"][0]},
        {"type": final, "response": finished},
    ]
    return sse(*({**e, "sequence_number": n} for n, e in enumerate(events)), named=True)


# -- an offline OpenAI ------------------------------------------------------------------


class Server:
    """An offline API: answers every request with the next canned response.

    Requests and responses are httpx's, or httpx2's for anthropic>=2 (a fork with the
    same interface).
    """

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.requests: list[Any] = []

    def __call__(self, request: Any) -> Any:
        self.requests.append(request)
        return self.answers.pop(0)

    def body(self, index: int = -1) -> dict[str, Any]:
        return json.loads(self.requests[index].content)  # type: ignore[no-any-return]


def json_answer(body: dict[str, Any], status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


def sse_answer(content: bytes) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=content)


Handler = Callable[[httpx.Request], httpx.Response]


def sync_client(handler: Handler) -> openai.OpenAI:
    """An OpenAI client whose requests ``handler`` (a `Server`, say) answers."""
    return openai.OpenAI(
        api_key="sk-test",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )


def async_client(handler: Handler) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key="sk-test",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )


# -- reading back the call --------------------------------------------------------------


def only_call(ledger: Ledger) -> dict[str, Any]:
    ledger.flush()
    calls = calls_of(ledger)
    assert 1 == len(calls), calls
    return calls[0]


def call_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    """tokenledger's spans of calls (an SDK may emit spans of its own too)."""
    return [
        s
        for s in exporter.get_finished_spans()
        if s.instrumentation_scope is not None
        and s.instrumentation_scope.name == "tokenledger"
        and s.attributes is not None
        and "tokenledger.call.id" in s.attributes
    ]


def call_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    spans = call_spans(exporter)
    assert 1 == len(spans), spans
    return spans[0]


def tokens(call: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """Input, cache read, cache write, output and reasoning tokens."""
    return (
        call["input_tokens"],
        call["cache_read_tokens"],
        call["cache_write_tokens"],
        call["output_tokens"],
        call["reasoning_tokens"],
    )


def counted(model: str, *, messages: Any = None, text: str | None = None) -> int:
    """What tiktoken (through litellm) counts: the figure an estimate must use."""
    import litellm

    if messages is not None:
        return int(litellm.token_counter(model=model, messages=messages))
    return int(litellm.token_counter(model=model, text=text))


def gpt_4o_mini_cost(input_tokens: int, output_tokens: int) -> Decimal:
    return (input_tokens * Decimal("0.15") + output_tokens * Decimal("0.60")) / Decimal(1_000_000)
