"""The OpenAI SDK integration, against the real SDK with its network replaced offline.

Every client here talks to an ``httpx.MockTransport`` that answers with OpenAI's wire
formats (tests/wire.py builds them): chat completion JSON with a usage block, SSE chunks
ending in ``data: [DONE]`` (with and without the ``include_usage`` chunk), Responses API
JSON and events, and embeddings JSON. Prices are litellm's bundled map: gpt-4o-mini is
$0.15 / $0.60 per million input / output tokens and $0.075 for cache reads; gpt-4o is
$2.50 / $10; text-embedding-3-small is $0.02.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import sys
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from helpers import calls_of
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from wire import (
    CACHED_COST,
    CHAT_USAGE,
    MESSAGES,
    SERVED,
    Server,
    async_client,
    call_span,
    chat_chunks,
    chat_completion,
    counted,
    gpt_4o_mini_cost,
    json_answer,
    only_call,
    output_message,
    responses_body,
    responses_events,
    sse,
    sse_answer,
    sync_client,
    tokens,
)

from tokenledger import Budget, BudgetExceeded, Ledger, LedgerError, UnpricedModelWarning
from tokenledger.integrations import openai as tl_openai

# The embeddings API's wire format; the others are in tests/wire.py.
EMBEDDING = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 0.3]}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def instrumented() -> Iterator[None]:
    """Every OpenAI client recorded, for this test only."""
    tl_openai.instrument()
    yield
    tl_openai.uninstrument()


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
    body = responses_body(output_message("Printer jam."), max_output_tokens=500)
    server = Server(json_answer(body))
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
    server = Server(sse_answer(responses_events("Printer", " jam.")))
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
    server = Server(sse_answer(responses_events("Printer", " jam.")))
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
    server = Server(sse_answer(responses_events("Printer", " jam.", final="response.failed")))
    with ledger.run("triage"):
        for _event in sync_client(server).responses.create(
            model="gpt-4o-mini", input="Summarise the ticket.", stream=True
        ):
            pass
    call = only_call(ledger)
    assert ("error", "APIError") == (call["status"], call["error_type"])
    assert CACHED_COST == call["cost_usd"]  # the tokens it used are still billed


async def test_an_async_response_stream_is_recorded(ledger: Ledger, instrumented: None) -> None:
    server = Server(sse_answer(responses_events("Printer", " jam.")))
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
    # OpenRouter's name for the model has no price in the bundled map.
    with ledger.run("triage"), pytest.warns(UnpricedModelWarning):
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
