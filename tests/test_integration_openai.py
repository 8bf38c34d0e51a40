"""The OpenAI SDK integration, against the real SDK with its network replaced offline.

Every client here talks to an ``httpx.MockTransport`` that answers with OpenAI's wire
formats: chat completion JSON with a usage block, SSE chunks ending in ``data: [DONE]``
(with and without the ``include_usage`` chunk), Responses API JSON and events, and
embeddings JSON. Prices are litellm's bundled map: gpt-4o-mini is $0.15 / $0.60 per
million input / output tokens and $0.075 for cache reads; gpt-4o is $2.50 / $10;
text-embedding-3-small is $0.02.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import sys
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from helpers import calls_of
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tokenledger import Budget, BudgetExceeded, Ledger, LedgerError
from tokenledger.integrations import openai as tl_openai

MESSAGES = [{"role": "user", "content": "Summarise the ticket in one line."}]
SERVED = "gpt-4o-mini-2024-07-18"

# 1200 prompt tokens of which 1000 cached, 300 completion tokens of which 100 reasoning:
# 200 x $0.15/M + 1000 x $0.075/M + 300 x $0.60/M
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
RESPONSES_USAGE = {
    "input_tokens": 1200,
    "input_tokens_details": {"cached_tokens": 1000},
    "output_tokens": 300,
    "output_tokens_details": {"reasoning_tokens": 100},
    "total_tokens": 1500,
}


# -- the provider's wire formats -------------------------------------------------------


def chat_completion(usage: dict[str, Any] | None = CHAT_USAGE) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": SERVED,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Printer jam.", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": "fp_1",
    }


def sse(*events: dict[str, Any] | str, named: bool = False) -> bytes:
    """Server-sent events: ``data: {...}`` blocks (``event:`` lines for Responses)."""
    out = []
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        if named and isinstance(event, dict):
            out.append(f"event: {event['type']}\n")
        out.append(f"data: {data}\n\n")
    return "".join(out).encode()


def chat_chunks(*, include_usage: bool) -> bytes:
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


def responses_body(status: str = "completed", usage: Any = RESPONSES_USAGE) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1_700_000_000,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": 500,
        "model": SERVED,
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Printer jam.", "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "usage": usage,
    }


def responses_events(final: str = "response.completed") -> bytes:
    """The Responses API's event stream for one text message, as OpenAI sends it."""
    started = {**responses_body("in_progress", None), "output": []}
    item = {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant"}
    part = {"type": "output_text", "annotations": [], "text": ""}
    at = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    finished = responses_body()
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
        {"type": "response.output_text.delta", **at, "delta": "Printer", "logprobs": []},
        {"type": "response.output_text.delta", **at, "delta": " jam.", "logprobs": []},
        {"type": "response.output_text.done", **at, "text": "Printer jam.", "logprobs": []},
        {"type": "response.content_part.done", **at, "part": {**part, "text": "Printer jam."}},
        {"type": "response.output_item.done", "output_index": 0, "item": finished["output"][0]},
        {"type": final, "response": finished},
    ]
    return sse(*({**e, "sequence_number": n} for n, e in enumerate(events)), named=True)


EMBEDDING = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 0.3]}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}


class Server:
    """An offline OpenAI: answers every request with the next canned response."""

    def __init__(self, *answers: httpx.Response) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answers.pop(0)

    def body(self, index: int = -1) -> dict[str, Any]:
        return json.loads(self.requests[index].content)  # type: ignore[no-any-return]


def json_answer(body: dict[str, Any], status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


def sse_answer(content: bytes) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=content)


def sync_client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="sk-test",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(server)),
    )


def async_client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key="sk-test",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(server)),
    )


# -- fixtures and readers ---------------------------------------------------------------


@pytest.fixture
def instrumented() -> Iterator[None]:
    """Every OpenAI client recorded, for this test only."""
    tl_openai.instrument()
    yield
    tl_openai.uninstrument()


def only_call(ledger: Ledger) -> dict[str, Any]:
    ledger.flush()
    calls = calls_of(ledger)
    assert 1 == len(calls), calls
    return calls[0]


def call_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    spans = [
        s
        for s in exporter.get_finished_spans()
        if s.instrumentation_scope is not None
        and s.instrumentation_scope.name == "tokenledger"
        and s.attributes is not None
        and "tokenledger.call.id" in s.attributes
    ]
    assert 1 == len(spans), spans
    return spans[0]


def tokens(call: dict[str, Any]) -> tuple[int, int, int, int, int]:
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


# -- Chat Completions -------------------------------------------------------------------


@pytest.mark.usefixtures("instrumented")
def test_a_chat_completion_is_recorded_with_cached_and_reasoning_tokens(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    server = Server(json_answer(chat_completion()))
    with ledger.run("triage") as run:
        response = sync_client(server).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_completion_tokens=500
        )
    assert "Printer jam." == response.choices[0].message.content
    call = only_call(ledger)
    assert (run.id, "chat", "openai", "gpt-4o-mini", SERVED) == (
        call["run_id"],
        call["operation"],
        call["provider"],
        call["requested_model"],
        call["model"],
    )
    assert (1200, 1000, 0, 300, 100) == tokens(call)
    assert ("ok", False, False, ["stop"], 500) == (
        call["status"],
        call["streamed"],
        call["usage_estimated"],
        call["finish_reasons"],
        call["max_tokens"],
    )
    assert CACHED_COST == call["cost_usd"]
    assert CACHED_COST == run.cost_usd

    attributes = call_span(span_exporter).attributes
    assert attributes is not None
    assert {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": SERVED,
        "gen_ai.request.max_tokens": 500,
        "gen_ai.usage.input_tokens": 1200,  # includes the cached tokens
        "gen_ai.usage.cache_read.input_tokens": 1000,
        "gen_ai.usage.cache_creation.input_tokens": 0,
        "gen_ai.usage.output_tokens": 300,
        "gen_ai.usage.reasoning.output_tokens": 100,
        "tokenledger.usage.cost.amount": float(CACHED_COST),
        "tokenledger.call.streamed": False,
        "tokenledger.run.id": run.id,
    }.items() <= dict(attributes).items()


@pytest.mark.usefixtures("instrumented")
def test_a_stream_with_include_usage_is_priced_from_the_usage_chunk(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    server = Server(sse_answer(chat_chunks(include_usage=True)))
    with ledger.run("triage"):
        stream = sync_client(server).chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    assert "Printer jam." == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert CHAT_USAGE["prompt_tokens"] == chunks[-1].usage.prompt_tokens  # the caller sees it too
    call = only_call(ledger)
    assert (1200, 1000, 0, 300, 100) == tokens(call)
    assert ("ok", True, False, ["stop"]) == (
        call["status"],
        call["streamed"],
        call["usage_estimated"],
        call["finish_reasons"],
    )
    assert CACHED_COST == call["cost_usd"]
    attributes = call_span(span_exporter).attributes
    assert attributes is not None
    assert (True, 1200, 1000) == (
        attributes["tokenledger.call.streamed"],
        attributes["gen_ai.usage.input_tokens"],
        attributes["gen_ai.usage.cache_read.input_tokens"],
    )


@pytest.mark.usefixtures("instrumented")
def test_a_stream_without_usage_is_counted_and_marked_estimated(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    server = Server(sse_answer(chat_chunks(include_usage=False)))
    with ledger.run("triage"):
        for _chunk in sync_client(server).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        ):
            pass
    assert "stream_options" not in server.body()  # tokenledger never changes the request
    call = only_call(ledger)
    prompt = counted(SERVED, messages=MESSAGES)
    completion = counted(SERVED, text="Printer jam.")
    assert (prompt, 0, 0, completion, 0) == tokens(call)
    assert ("ok", True, True) == (call["status"], call["streamed"], call["usage_estimated"])
    assert gpt_4o_mini_cost(prompt, completion) == call["cost_usd"]
    attributes = call_span(span_exporter).attributes
    assert attributes is not None
    assert attributes["tokenledger.usage.estimated"] is True


@pytest.mark.usefixtures("instrumented")
def test_a_stream_closed_early_is_recorded_as_abandoned(ledger: Ledger) -> None:
    server = Server(sse_answer(chat_chunks(include_usage=True)))
    with (
        ledger.run("triage"),
        sync_client(server).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        ) as stream,
    ):
        for _chunk in stream:
            break  # the caller stops reading; leaving `with` closes the stream
    call = only_call(ledger)
    assert ("abandoned", True, True) == (call["status"], call["streamed"], call["usage_estimated"])
    # What was sent is still counted: the prompt, and nothing received yet.
    assert (counted(SERVED, messages=MESSAGES), 0) == (call["input_tokens"], call["output_tokens"])
    assert call["cost_usd"] > 0


@pytest.mark.usefixtures("instrumented")
def test_a_stream_dropped_unread_is_recorded_as_abandoned(ledger: Ledger) -> None:
    server = Server(sse_answer(chat_chunks(include_usage=True)))
    with ledger.run("triage") as run:
        stream = sync_client(server).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        next(stream)
        del stream
        gc.collect()
    call = only_call(ledger)
    assert ("abandoned", run.id) == (call["status"], call["run_id"])


@pytest.mark.usefixtures("instrumented")
def test_a_stream_read_to_its_usage_chunk_but_not_past_it_is_complete(ledger: Ledger) -> None:
    """Reading chunks with next() until the usage arrives, without the final StopIteration."""
    server = Server(sse_answer(chat_chunks(include_usage=True)))
    with ledger.run("triage"):
        stream = sync_client(server).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        while next(stream).usage is None:
            pass
        stream.close()
    call = only_call(ledger)
    assert ("ok", False, CACHED_COST) == (
        call["status"],
        call["usage_estimated"],
        call["cost_usd"],
    )


@pytest.mark.usefixtures("instrumented")
def test_the_chat_stream_helper_is_recorded_once(ledger: Ledger) -> None:
    server = Server(sse_answer(chat_chunks(include_usage=True)))
    with (
        ledger.run("triage"),
        sync_client(server).chat.completions.stream(
            model="gpt-4o-mini", messages=MESSAGES, stream_options={"include_usage": True}
        ) as stream,
    ):
        final = stream.get_final_completion()
    assert "Printer jam." == final.choices[0].message.content
    call = only_call(ledger)
    assert ("ok", True, CACHED_COST) == (call["status"], call["streamed"], call["cost_usd"])


@pytest.mark.usefixtures("instrumented")
def test_parse_with_a_response_format_is_recorded(ledger: Ledger) -> None:
    body = chat_completion()
    body["choices"][0]["message"]["content"] = '{"summary": "Printer jam."}'
    server = Server(json_answer(body))
    with ledger.run("triage"):
        parsed = sync_client(server).chat.completions.parse(
            model="gpt-4o-mini",
            messages=MESSAGES,
            response_format={"type": "json_object"},
        )
    assert '{"summary": "Printer jam."}' == parsed.choices[0].message.content
    assert CACHED_COST == only_call(ledger)["cost_usd"]


@pytest.mark.usefixtures("instrumented")
def test_a_raw_response_is_recorded_and_still_parses(ledger: Ledger) -> None:
    server = Server(json_answer(chat_completion()))
    with ledger.run("triage"):
        raw = sync_client(server).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
    assert "Printer jam." == raw.parse().choices[0].message.content
    assert CACHED_COST == only_call(ledger)["cost_usd"]


@pytest.mark.usefixtures("instrumented")
def test_messages_given_as_an_iterator_are_counted_and_still_sent(ledger: Ledger) -> None:
    server = Server(json_answer(chat_completion()))
    with ledger.run("triage", budget=Budget(usd="1")):
        sync_client(server).chat.completions.create(
            model="gpt-4o-mini", messages=iter(MESSAGES), max_tokens=10
        )
    assert MESSAGES == server.body()["messages"]
    assert "ok" == only_call(ledger)["status"]


async def test_async_chat_calls_and_streams_are_recorded(
    ledger: Ledger, instrumented: None
) -> None:
    server = Server(json_answer(chat_completion()), sse_answer(chat_chunks(include_usage=True)))
    client = async_client(server)
    async with ledger.run("triage") as run:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for _chunk in stream:
            pass
    ledger.flush()
    calls = sorted(calls_of(ledger), key=lambda c: c["streamed"])
    assert [(False, "ok"), (True, "ok")] == [(c["streamed"], c["status"]) for c in calls]
    assert [CACHED_COST, CACHED_COST] == [c["cost_usd"] for c in calls]
    assert 2 * CACHED_COST == run.cost_usd


async def test_an_async_stream_closed_early_is_recorded_as_abandoned(
    ledger: Ledger, instrumented: None
) -> None:
    server = Server(sse_answer(chat_chunks(include_usage=True)))
    async with ledger.run("triage"):
        stream = await async_client(server).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        async with stream:
            async for _chunk in stream:
                break
    call = only_call(ledger)
    assert ("abandoned", True) == (call["status"], call["usage_estimated"])


# -- the Responses API ------------------------------------------------------------------


@pytest.mark.usefixtures("instrumented")
def test_a_response_is_recorded_with_cached_and_reasoning_tokens(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    server = Server(json_answer(responses_body()))
    with ledger.run("triage"):
        response = sync_client(server).responses.create(
            model="gpt-4o-mini",
            instructions="Be brief.",
            input="Summarise the ticket in one line.",
            max_output_tokens=500,
        )
    assert "Printer jam." == response.output_text
    call = only_call(ledger)
    assert ("chat", "gpt-4o-mini", SERVED, 500) == (
        call["operation"],
        call["requested_model"],
        call["model"],
        call["max_tokens"],
    )
    assert (1200, 1000, 0, 300, 100) == tokens(call)
    assert ("ok", False, ["stop"]) == (call["status"], call["streamed"], call["finish_reasons"])
    assert CACHED_COST == call["cost_usd"]
    attributes = call_span(span_exporter).attributes
    assert attributes is not None
    assert (1200, 1000, 100) == (
        attributes["gen_ai.usage.input_tokens"],
        attributes["gen_ai.usage.cache_read.input_tokens"],
        attributes["gen_ai.usage.reasoning.output_tokens"],
    )


@pytest.mark.usefixtures("instrumented")
def test_a_response_stream_is_priced_from_its_completed_event(ledger: Ledger) -> None:
    server = Server(sse_answer(responses_events()))
    with ledger.run("triage"):
        stream = sync_client(server).responses.create(
            model="gpt-4o-mini", input="Summarise the ticket.", stream=True
        )
        kinds = [event.type for event in stream]
    assert "response.completed" == kinds[-1]
    call = only_call(ledger)
    assert (1200, 1000, 0, 300, 100) == tokens(call)
    assert ("ok", True, False, CACHED_COST) == (
        call["status"],
        call["streamed"],
        call["usage_estimated"],
        call["cost_usd"],
    )


@pytest.mark.usefixtures("instrumented")
def test_the_responses_stream_helper_is_recorded_once(ledger: Ledger) -> None:
    server = Server(sse_answer(responses_events()))
    with (
        ledger.run("triage"),
        sync_client(server).responses.stream(
            model="gpt-4o-mini", input="Summarise the ticket."
        ) as stream,
    ):
        final = stream.get_final_response()
    assert "Printer jam." == final.output_text
    assert CACHED_COST == only_call(ledger)["cost_usd"]


@pytest.mark.usefixtures("instrumented")
def test_a_failed_response_event_is_recorded_as_an_error(ledger: Ledger) -> None:
    server = Server(sse_answer(responses_events(final="response.failed")))
    with ledger.run("triage"):
        for _event in sync_client(server).responses.create(
            model="gpt-4o-mini", input="Summarise the ticket.", stream=True
        ):
            pass
    call = only_call(ledger)
    assert ("error", "APIError") == (call["status"], call["error_type"])
    assert CACHED_COST == call["cost_usd"]  # the tokens it used are still billed


async def test_an_async_response_stream_is_recorded(ledger: Ledger, instrumented: None) -> None:
    server = Server(sse_answer(responses_events()))
    async with ledger.run("triage"):
        stream = await async_client(server).responses.create(
            model="gpt-4o-mini", input="Summarise the ticket.", stream=True
        )
        async for _event in stream:
            pass
    call = only_call(ledger)
    assert ("ok", True, CACHED_COST) == (call["status"], call["streamed"], call["cost_usd"])


# -- embeddings -------------------------------------------------------------------------


@pytest.mark.usefixtures("instrumented")
def test_embeddings_are_recorded(ledger: Ledger, span_exporter: InMemorySpanExporter) -> None:
    server = Server(json_answer(EMBEDDING))
    with ledger.run("index"):
        result = sync_client(server).embeddings.create(
            model="text-embedding-3-small", input="Printer jam on floor 3."
        )
    assert 3 == len(result.data[0].embedding)
    call = only_call(ledger)
    assert ("embeddings", "text-embedding-3-small", 8, 0) == (
        call["operation"],
        call["model"],
        call["input_tokens"],
        call["output_tokens"],
    )
    # 8 x $0.02/M
    assert Decimal("0.00000016") == call["cost_usd"]
    attributes = call_span(span_exporter).attributes
    assert attributes is not None
    assert ("embeddings", 8) == (
        attributes["gen_ai.operation.name"],
        attributes["gen_ai.usage.input_tokens"],
    )


async def test_async_embeddings_are_recorded(ledger: Ledger, instrumented: None) -> None:
    server = Server(json_answer(EMBEDDING))
    async with ledger.run("index"):
        await async_client(server).embeddings.create(
            model="text-embedding-3-small", input=["Printer jam on floor 3."]
        )
    assert Decimal("0.00000016") == only_call(ledger)["cost_usd"]


# -- budgets ----------------------------------------------------------------------------


@pytest.mark.usefixtures("instrumented")
@pytest.mark.parametrize(
    "send",
    [
        pytest.param(
            lambda c: c.chat.completions.create(model="gpt-4o", messages=MESSAGES), id="chat"
        ),
        pytest.param(
            lambda c: c.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True),
            id="chat-stream",
        ),
        pytest.param(lambda c: c.responses.create(model="gpt-4o", input="Hi"), id="responses"),
        pytest.param(
            lambda c: c.embeddings.create(model="text-embedding-3-large", input="x" * 400),
            id="embeddings",
        ),
    ],
)
def test_a_budget_refusal_sends_no_request(
    ledger: Ledger, send: Callable[[openai.OpenAI], Any]
) -> None:
    server = Server(json_answer(chat_completion()))
    with (
        pytest.raises(BudgetExceeded),
        ledger.run("capped", budget=Budget(usd="0.000001")) as run,
    ):
        send(sync_client(server))
    assert [] == server.requests
    assert "budget_exceeded" == run.status
    ledger.flush()
    assert [] == calls_of(ledger)


async def test_an_async_budget_refusal_sends_no_request(ledger: Ledger, instrumented: None) -> None:
    server = Server(json_answer(chat_completion()))
    with pytest.raises(BudgetExceeded):
        async with ledger.run("capped", budget=Budget(usd="0.000001")):
            await async_client(server).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert [] == server.requests


@pytest.mark.usefixtures("instrumented")
def test_a_call_whose_budget_cannot_be_checked_is_not_sent(ledger: Ledger) -> None:
    """Budgets fail closed: no reservation, no request."""
    ledger.set_budget("global", usd="1")
    with ledger.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE reservations")
    server = Server(json_answer(chat_completion()))
    with pytest.raises(LedgerError, match="budgets fail closed"), ledger.run("triage"):
        sync_client(server).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert [] == server.requests


@pytest.mark.usefixtures("instrumented")
def test_a_downgrade_budget_sends_the_cheaper_model(ledger: Ledger) -> None:
    server = Server(json_answer(chat_completion()))
    budget = Budget(usd="0.001", action="downgrade", downgrade_to=["gpt-4o-mini"])
    with ledger.run("thrifty", budget=budget):
        sync_client(server).chat.completions.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=200
        )
    assert "gpt-4o-mini" == server.body()["model"]
    call = only_call(ledger)
    assert ("gpt-4o", SERVED, CACHED_COST) == (
        call["requested_model"],
        call["model"],
        call["cost_usd"],
    )


# -- failures ---------------------------------------------------------------------------


@pytest.mark.usefixtures("instrumented")
def test_an_http_error_is_recorded_and_raised_unchanged(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    error = {"error": {"message": "Bad model", "type": "invalid_request_error", "code": None}}
    server = Server(json_answer(error, status=400))
    with ledger.run("triage"), pytest.raises(openai.BadRequestError) as raised:
        sync_client(server).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert 400 == raised.value.status_code
    call = only_call(ledger)
    assert ("error", "BadRequestError", 0) == (
        call["status"],
        call["error_type"],
        call["input_tokens"],
    )
    attributes = call_span(span_exporter).attributes
    assert attributes is not None
    assert "BadRequestError" == attributes["error.type"]


@pytest.mark.usefixtures("instrumented")
def test_an_error_inside_a_stream_is_recorded(ledger: Ledger) -> None:
    body = sse({"error": {"message": "Overloaded", "type": "server_error"}})
    server = Server(sse_answer(body))
    with ledger.run("triage"), pytest.raises(openai.APIError, match="Overloaded"):
        for _chunk in sync_client(server).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        ):
            pass
    call = only_call(ledger)
    assert ("error", "APIError", True) == (call["status"], call["error_type"], call["streamed"])


async def test_an_async_http_error_is_recorded(ledger: Ledger, instrumented: None) -> None:
    server = Server(json_answer({"error": {"message": "Slow down"}}, status=429))
    with pytest.raises(openai.RateLimitError):
        async with ledger.run("triage"):
            await async_client(server).responses.create(model="gpt-4o-mini", input="Hi")
    call = only_call(ledger)
    assert ("error", "RateLimitError") == (call["status"], call["error_type"])


# -- switching it on and off ------------------------------------------------------------


def test_one_client_can_be_instrumented_alone(ledger: Ledger) -> None:
    server = Server(json_answer(chat_completion()), json_answer(chat_completion()))
    recorded = tl_openai.instrument(sync_client(server))
    other = sync_client(server)
    try:
        with ledger.run("triage"):
            recorded.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            other.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    finally:
        tl_openai.uninstrument(recorded)
    assert 2 == len(server.requests)
    assert CACHED_COST == only_call(ledger)["cost_usd"]


def test_instrumenting_twice_and_per_client_still_records_once(ledger: Ledger) -> None:
    server = Server(json_answer(chat_completion()))
    client = sync_client(server)
    tl_openai.instrument()
    tl_openai.instrument()
    tl_openai.instrument(client)
    try:
        with ledger.run("triage"):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    finally:
        tl_openai.uninstrument()
    only_call(ledger)


def test_uninstrument_restores_the_sdk() -> None:
    from openai.resources.chat.completions import Completions

    create = Completions.__dict__["create"]
    client = sync_client(Server())
    tl_openai.instrument()
    tl_openai.instrument(client)
    assert create is not Completions.__dict__["create"]
    tl_openai.uninstrument()
    assert create is Completions.__dict__["create"]
    assert "create" not in vars(client.chat.completions)


def test_instrument_rejects_something_that_is_not_a_client() -> None:
    with pytest.raises(TypeError, match=r"`client` is 'sk-test'; instrument\(\) takes an openai"):
        tl_openai.instrument("sk-test")


@pytest.mark.usefixtures("instrumented")
def test_the_provider_of_an_openai_compatible_host_is_named(ledger: Ledger) -> None:
    server = Server(json_answer({**chat_completion(), "model": "openai/gpt-4o-mini"}))
    client = openai.OpenAI(
        api_key="sk-test",
        base_url="https://openrouter.ai/api/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(server)),
    )
    with ledger.run("triage"):
        client.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES)
    assert "openrouter" == only_call(ledger)["provider"]


def test_calls_are_not_recorded_when_nothing_is_instrumented(ledger: Ledger) -> None:
    server = Server(json_answer(chat_completion()))
    with ledger.run("triage"):
        sync_client(server).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    ledger.flush()
    assert [] == calls_of(ledger)


def test_a_missing_sdk_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)
    monkeypatch.delitem(sys.modules, "tokenledger.integrations.openai")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'tokenledger\[openai\]'") as e:
        importlib.import_module("tokenledger.integrations.openai")
    assert "openai" == e.value.name


def test_importing_tokenledger_does_not_import_the_sdk() -> None:
    import subprocess
    import tempfile

    code = "import sys, tokenledger, tokenledger.integrations; print('openai' in sys.modules)"
    # Run away from the checkout so the installed package (with its integrations
    # subpackage, mapped from ./integrations) is the one imported.
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),
    ).stdout
    assert "False" == out.strip()


def test_an_event_loop_is_not_needed_to_record_a_dropped_async_stream(ledger: Ledger) -> None:
    """An async stream dropped unread after its loop ended is still recorded."""
    server = Server(sse_answer(chat_chunks(include_usage=True)))

    async def start() -> Any:
        return await async_client(server).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )

    tl_openai.instrument()
    try:
        with ledger.run("triage"):
            stream = asyncio.run(start())
            del stream
            gc.collect()
    finally:
        tl_openai.uninstrument()
    assert "abandoned" == only_call(ledger)["status"]
