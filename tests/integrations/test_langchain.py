"""The LangChain / LangGraph integration, against the real libraries with the network
replaced offline.

Every model here is langchain-openai's ``ChatOpenAI`` talking to an
``httpx.MockTransport`` that answers with OpenAI's wire formats (tests/wire.py builds
them): chat completion JSON with a usage block, and SSE chunks ending in
``data: [DONE]`` (with the ``include_usage`` chunk that ``stream_usage=True`` asks for,
and without it). Graphs are real LangGraph ``StateGraph``s. Prices are litellm's bundled
map: gpt-4o-mini is $0.15 / $0.60 per million input / output tokens and $0.075 for cache
reads; claude-sonnet-4-5 is $3 / $15, cache writes $3.75, cache reads $0.30.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any, TypedDict

import httpx
import openai
import pytest
from helpers import calls_of, runs_by_name
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langchain_openai import ChatOpenAI, OpenAI
from langgraph.graph import END, START, StateGraph
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from wire import (
    CACHED_COST,
    MESSAGES,
    PROMPT,
    SERVED,
    Server,
    call_span,
    call_spans,
    chat_chunks,
    chat_completion,
    counted,
    gpt_4o_mini_cost,
    json_answer,
    only_call,
    sse_answer,
    text_completion,
    tokens,
)

from tokenledger import Budget, BudgetExceeded, Ledger
from tokenledger.integrations import langchain as tl_langchain
from tokenledger.integrations import openai as tl_openai

# -- the provider, offline ------------------------------------------------------------


def chat_model(
    server: Callable[[httpx.Request], Any], model: str = "gpt-4o-mini", **options: Any
) -> ChatOpenAI:
    """langchain-openai's chat model on the offline server (sync and async clients)."""
    return ChatOpenAI(
        model=model,
        api_key="sk-test",  # type: ignore[arg-type]
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(server)),
        http_async_client=httpx.AsyncClient(transport=httpx.MockTransport(server)),
        **options,
    )


def text_model(server: Server) -> OpenAI:
    """langchain-openai's text completion model (the legacy Completions API), offline."""
    return OpenAI(
        model="gpt-3.5-turbo-instruct",
        api_key="sk-test",  # type: ignore[arg-type]
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(server)),
    )


# -- fixtures and readers ---------------------------------------------------------------


@pytest.fixture
def instrumented() -> Iterator[tl_langchain.TokenledgerCallbackHandler]:
    """Every LangChain model call recorded, for this test only."""
    handler = tl_langchain.instrument()
    yield handler
    tl_langchain.uninstrument()


@pytest.fixture
def graph_nodes() -> Iterator[None]:
    """As `instrumented`, with a child run for each LangGraph node."""
    tl_langchain.instrument(graph_nodes=True)
    yield
    tl_langchain.uninstrument()


@pytest.fixture
def openai_instrumented() -> Iterator[None]:
    """The OpenAI SDK integration on as well, for this test only."""
    tl_openai.instrument()
    yield
    tl_openai.uninstrument()


def call_attributes(exporter: InMemorySpanExporter) -> dict[str, Any]:
    return dict(call_span(exporter).attributes or {})


# -- one call ---------------------------------------------------------------------------


@pytest.mark.usefixtures("instrumented")
def test_a_chat_model_call_is_recorded_with_cached_and_reasoning_tokens(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    server = Server(json_answer(chat_completion()))
    with ledger.run("triage") as run:
        message = chat_model(server, max_tokens=500).invoke(PROMPT)
    assert "Printer jam." == message.content
    call = only_call(ledger)
    assert (run.id, "chat", "openai", "gpt-4o-mini", SERVED) == (
        call["run_id"],
        call["operation"],
        call["provider"],
        call["requested_model"],
        call["model"],
    )
    # OpenTelemetry's convention: the input includes its cached part.
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
    assert {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": SERVED,
        "gen_ai.request.max_tokens": 500,
        "gen_ai.usage.input_tokens": 1200,
        "gen_ai.usage.cache_read.input_tokens": 1000,
        "gen_ai.usage.output_tokens": 300,
        "gen_ai.usage.reasoning.output_tokens": 100,
        "tokenledger.usage.cost.amount": float(CACHED_COST),
        "tokenledger.call.streamed": False,
        "tokenledger.run.id": run.id,
    }.items() <= call_attributes(span_exporter).items()


@pytest.mark.usefixtures("instrumented")
def test_cache_writes_are_read_from_usage_metadata_and_priced_at_their_rate(
    ledger: Ledger,
) -> None:
    """A Claude model behind an OpenAI-compatible server reports a cache write, which
    langchain-openai puts in ``input_token_details.cache_creation``."""
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 100,
        "total_tokens": 1100,
        "prompt_tokens_details": {"cached_tokens": 200, "cache_write_tokens": 500},
    }
    server = Server(json_answer(chat_completion(usage, model="claude-sonnet-4-5")))
    with ledger.run("triage"):
        chat_model(server, model="claude-sonnet-4-5").invoke(PROMPT)
    call = only_call(ledger)
    assert (1000, 200, 500, 100, 0) == tokens(call)
    # 300 x $3/M + 500 x $3.75/M + 200 x $0.30/M + 100 x $15/M
    # = $0.0009 + $0.001875 + $0.00006 + $0.0015
    assert Decimal("0.004335") == call["cost_usd"]


async def test_an_async_call_is_recorded_in_the_enclosing_run(
    ledger: Ledger,
    instrumented: tl_langchain.TokenledgerCallbackHandler,
    span_exporter: InMemorySpanExporter,
) -> None:
    """LangChain runs a synchronous handler in a worker thread for async models; the
    call still lands in the run the caller is in, and its span under the run's span."""
    server = Server(json_answer(chat_completion()))
    async with ledger.run("triage") as run:
        message = await chat_model(server).ainvoke(PROMPT)
    assert "Printer jam." == message.content
    call = only_call(ledger)
    assert (run.id, "ok", CACHED_COST) == (call["run_id"], call["status"], call["cost_usd"])
    assert CACHED_COST == run.cost_usd
    (span,) = call_spans(span_exporter)
    assert run.span is not None
    assert span.parent is not None
    assert run.span.get_span_context().span_id == span.parent.span_id


@pytest.mark.usefixtures("instrumented")
def test_a_call_outside_any_run_is_recorded_with_no_run(ledger: Ledger) -> None:
    chat_model(Server(json_answer(chat_completion()))).invoke(PROMPT)
    call = only_call(ledger)
    assert (None, CACHED_COST) == (call["run_id"], call["cost_usd"])


@pytest.mark.usefixtures("instrumented", "openai_instrumented")
def test_a_text_completion_model_is_recorded_from_its_token_usage(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    """langchain-openai's `OpenAI` LLM calls the legacy Completions API, which the OpenAI
    integration does not record: the handler does, even with that integration on."""
    usage = {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}
    server = Server(json_answer(text_completion("Printer jam.", usage=usage)))
    llm = text_model(server)
    with ledger.run("triage") as run:
        assert "Printer jam." == llm.invoke(PROMPT)
    call = only_call(ledger)
    assert (run.id, "text_completion", "gpt-3.5-turbo-instruct", 1000, 200) == (
        call["run_id"],
        call["operation"],
        call["model"],
        call["input_tokens"],
        call["output_tokens"],
    )
    # 1000 x $1.50/M + 200 x $2/M = $0.0015 + $0.0004
    assert Decimal("0.0019") == call["cost_usd"]
    assert "text_completion" == call_attributes(span_exporter)["gen_ai.operation.name"]


@pytest.mark.usefixtures("instrumented")
def test_a_text_completion_batch_is_counted_once_on_its_first_prompt(ledger: Ledger) -> None:
    """``generate`` with three prompts sends one request; LangChain reports three calls,
    the batch's usage on the first and an empty usage on the others
    (`LLMResult.flatten`). The others are recorded at zero tokens, not estimated."""
    usage = {"prompt_tokens": 300, "completion_tokens": 30, "total_tokens": 330}
    server = Server(json_answer(text_completion("one", "two", "three", usage=usage)))
    with ledger.run("triage") as run:
        text_model(server).generate(["Ticket one?", "Ticket two?", "Ticket three?"])
    assert 1 == len(server.requests)
    ledger.flush()
    rows = sorted(
        (call["input_tokens"], call["output_tokens"], call["usage_estimated"])
        for call in calls_of(ledger)
    )
    assert [(0, 0, False), (0, 0, False), (300, 30, False)] == rows
    # 300 x $1.50/M + 30 x $2/M, once
    assert Decimal("0.00051") == run.cost_usd


# -- streams ----------------------------------------------------------------------------


@pytest.mark.usefixtures("instrumented")
def test_a_stream_with_stream_usage_is_priced_from_its_usage_chunk(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    server = Server(sse_answer(chat_chunks(include_usage=True)))
    with ledger.run("triage"):
        text = "".join(
            str(chunk.content) for chunk in chat_model(server, stream_usage=True).stream(PROMPT)
        )
    assert "Printer jam." == text
    assert {"include_usage": True} == server.body()["stream_options"]
    call = only_call(ledger)
    assert (1200, 1000, 0, 300, 100) == tokens(call)
    assert ("ok", True, False, CACHED_COST) == (
        call["status"],
        call["streamed"],
        call["usage_estimated"],
        call["cost_usd"],
    )
    attributes = call_attributes(span_exporter)
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
        for _chunk in chat_model(server).stream(PROMPT):
            pass
    assert "stream_options" not in server.body()  # tokenledger never changes the request
    call = only_call(ledger)
    prompt = counted(SERVED, messages=MESSAGES)
    completion = counted(SERVED, text="Printer jam.")
    assert (prompt, 0, 0, completion, 0) == tokens(call)
    assert ("ok", True, True) == (call["status"], call["streamed"], call["usage_estimated"])
    assert gpt_4o_mini_cost(prompt, completion) == call["cost_usd"]
    assert call_attributes(span_exporter)["tokenledger.usage.estimated"] is True


async def test_an_async_stream_with_stream_usage_is_recorded(
    ledger: Ledger, instrumented: tl_langchain.TokenledgerCallbackHandler
) -> None:
    server = Server(sse_answer(chat_chunks(include_usage=True)))
    async with ledger.run("triage") as run:
        async for _chunk in chat_model(server, stream_usage=True).astream(PROMPT):
            pass
    call = only_call(ledger)
    assert (run.id, "ok", True, False, CACHED_COST) == (
        call["run_id"],
        call["status"],
        call["streamed"],
        call["usage_estimated"],
        call["cost_usd"],
    )


async def test_an_async_stream_without_usage_is_counted_and_marked_estimated(
    ledger: Ledger, instrumented: tl_langchain.TokenledgerCallbackHandler
) -> None:
    server = Server(sse_answer(chat_chunks(include_usage=False)))
    async with ledger.run("triage") as run:
        async for _chunk in chat_model(server).astream(PROMPT):
            pass
    call = only_call(ledger)
    prompt = counted(SERVED, messages=MESSAGES)
    completion = counted(SERVED, text="Printer jam.")
    assert (prompt, completion) == (call["input_tokens"], call["output_tokens"])
    assert (run.id, "ok", True, True) == (
        call["run_id"],
        call["status"],
        call["streamed"],
        call["usage_estimated"],
    )
    assert gpt_4o_mini_cost(prompt, completion) == call["cost_usd"]


@pytest.mark.usefixtures("instrumented")
def test_a_stream_the_caller_stops_reading_is_recorded_as_abandoned(ledger: Ledger) -> None:
    server = Server(sse_answer(chat_chunks(include_usage=True)))
    with ledger.run("triage"):
        stream = chat_model(server, stream_usage=True).stream(PROMPT)
        next(stream)
        stream.close()  # what `break` does to a generator, at once instead of at collection
    call = only_call(ledger)
    assert ("abandoned", True, True) == (call["status"], call["streamed"], call["usage_estimated"])
    # What was sent is still counted: the prompt, and the empty first chunk received.
    assert (counted("gpt-4o-mini", messages=MESSAGES), 0) == (
        call["input_tokens"],
        call["output_tokens"],
    )
    assert gpt_4o_mini_cost(call["input_tokens"], 0) == call["cost_usd"]


# -- failures ---------------------------------------------------------------------------


@pytest.mark.usefixtures("instrumented")
def test_an_http_error_is_recorded_and_raised_unchanged(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    error = {"error": {"message": "Bad model", "type": "invalid_request_error", "code": None}}
    server = Server(json_answer(error, status=400))
    with ledger.run("triage") as run, pytest.raises(openai.BadRequestError) as raised:
        chat_model(server).invoke(PROMPT)
    assert 400 == raised.value.status_code
    # langchain-openai raises its own subclass of the SDK's error; it is the one recorded.
    assert "OpenAIInvalidRequestError" == type(raised.value).__name__
    call = only_call(ledger)
    assert ("error", "OpenAIInvalidRequestError", 0, 0) == (
        call["status"],
        call["error_type"],
        call["input_tokens"],
        call["cost_usd"],
    )
    assert (1, 0) == (run.calls, run.cost_usd)
    assert "OpenAIInvalidRequestError" == call_attributes(span_exporter)["error.type"]


async def test_an_async_http_error_is_recorded(
    ledger: Ledger, instrumented: tl_langchain.TokenledgerCallbackHandler
) -> None:
    server = Server(json_answer({"error": {"message": "Slow down"}}, status=429))
    with pytest.raises(openai.RateLimitError):
        async with ledger.run("triage"):
            await chat_model(server).ainvoke(PROMPT)
    call = only_call(ledger)
    assert ("error", "OpenAIRateLimitError") == (call["status"], call["error_type"])


async def test_a_call_cancelled_in_flight_is_recorded_as_abandoned_when_its_run_ends(
    ledger: Ledger, instrumented: tl_langchain.TokenledgerCallbackHandler
) -> None:
    """``asyncio.wait_for`` timing out cancels the request and LangChain reports no end
    for it. The run's end records it, the prompt counted (estimated), and gives its
    budget reservation back."""
    # The reservation (~14 prompt tokens and max_tokens=1000 at gpt-4o-mini's prices,
    # ~$0.0006) fits $0.001 once: held forever, it would refuse the next call.
    ledger.set_budget("agent:triage", usd="0.001", per="day")
    sent = asyncio.Event()

    async def never_answers(request: httpx.Request) -> httpx.Response:
        sent.set()
        await asyncio.sleep(3600)
        raise AssertionError("cancelled before")

    model = chat_model(never_answers, max_tokens=1000)
    async with ledger.run("triage"):
        request = asyncio.ensure_future(model.ainvoke(PROMPT))
        await asyncio.wait_for(sent.wait(), 30)  # in flight: reserved, and sent
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(request, 0.1)
    call = only_call(ledger)
    prompt = counted("gpt-4o-mini", messages=MESSAGES)
    assert ("abandoned", True, prompt, 0) == (
        call["status"],
        call["usage_estimated"],
        call["input_tokens"],
        call["output_tokens"],
    )
    assert gpt_4o_mini_cost(prompt, 0) == call["cost_usd"]
    server = Server(json_answer(chat_completion()))
    async with ledger.run("triage"):
        await chat_model(server, max_tokens=1000).ainvoke(PROMPT)
    assert 1 == len(server.requests)


@pytest.mark.usefixtures("instrumented")
def test_a_batch_that_fails_midway_records_what_was_sent(ledger: Ledger) -> None:
    """A synchronous ``generate`` stops at the first prompt that fails and drops the
    results before it: the first prompt, sent and paid, is recorded as abandoned when
    the run ends (its prompt counted: its usage is lost); the third, never sent, is not
    recorded and its reservation is given back."""
    error = {"error": {"message": "The server had an error.", "type": "server_error"}}
    server = Server(json_answer(chat_completion()), json_answer(error, status=500))
    batch = [[HumanMessage(PROMPT)], [HumanMessage(PROMPT)], [HumanMessage(PROMPT)]]
    with pytest.raises(openai.InternalServerError), ledger.run("triage"):
        chat_model(server).generate(batch)
    assert 2 == len(server.requests)
    ledger.flush()
    rows = sorted(
        (call["status"], call["input_tokens"], call["usage_estimated"]) for call in calls_of(ledger)
    )
    prompt = counted("gpt-4o-mini", messages=MESSAGES)
    assert [("abandoned", prompt, True), ("error", 0, False)] == rows


# -- budgets ----------------------------------------------------------------------------


@pytest.mark.usefixtures("instrumented")
@pytest.mark.parametrize("streamed", [False, True], ids=["invoke", "stream"])
def test_a_budget_refusal_sends_no_request(ledger: Ledger, streamed: bool) -> None:
    server = Server(json_answer(chat_completion()))
    model = chat_model(server, model="gpt-4o")
    with (
        pytest.raises(BudgetExceeded),
        ledger.run("capped", budget=Budget(usd="0.000001")) as run,
    ):
        if streamed:
            list(model.stream(PROMPT))
        else:
            model.invoke(PROMPT)
    assert [] == server.requests
    assert "budget_exceeded" == run.status
    ledger.flush()
    assert [] == calls_of(ledger)


async def test_an_async_budget_refusal_sends_no_request(
    ledger: Ledger, instrumented: tl_langchain.TokenledgerCallbackHandler
) -> None:
    server = Server(json_answer(chat_completion()))
    with pytest.raises(BudgetExceeded):
        async with ledger.run("capped", budget=Budget(usd="0.000001")):
            await chat_model(server, model="gpt-4o").ainvoke(PROMPT)
    assert [] == server.requests
    ledger.flush()
    assert [] == calls_of(ledger)


@pytest.mark.usefixtures("instrumented")
def test_a_batch_refused_at_its_second_prompt_gives_back_the_first_ones_reservation(
    ledger: Ledger,
) -> None:
    """Each prompt of ``generate([m1, m2])`` reserves before anything is sent; when m2
    is refused, nothing of the batch is sent, recorded or held."""
    # One reservation (~$0.0006: max_tokens=1000) fits $0.001; two do not.
    ledger.set_budget("agent:triage", usd="0.001", per="day")
    server = Server(json_answer(chat_completion()))
    model = chat_model(server, max_tokens=1000)
    with pytest.raises(BudgetExceeded), ledger.run("triage"):
        model.generate([[HumanMessage(PROMPT)], [HumanMessage(PROMPT)]])
    assert [] == server.requests
    ledger.flush()
    assert [] == calls_of(ledger)
    with ledger.run("triage"):
        model.invoke(PROMPT)
    assert 1 == len(server.requests)


@pytest.mark.usefixtures("instrumented")
def test_a_shared_budget_is_enforced_before_the_request(ledger: Ledger) -> None:
    """A shared budget, spent by a first call, refuses the next one before it is sent."""
    # The first call reserves its estimate (~14 prompt tokens and max_tokens=10 at
    # gpt-4o-mini's prices, $0.0000084) and then spends $0.000285 (the server ignores
    # max_tokens): $0.000285 + $0.0000084 no longer fits in $0.00029.
    ledger.set_budget("agent:triage", usd="0.00029", per="day")
    server = Server(json_answer(chat_completion()), json_answer(chat_completion()))
    model = chat_model(server, max_tokens=10)
    with ledger.run("triage"):
        model.invoke(PROMPT)
    with pytest.raises(BudgetExceeded), ledger.run("triage"):
        model.invoke(PROMPT)
    assert 1 == len(server.requests)
    assert CACHED_COST == only_call(ledger)["cost_usd"]


@pytest.mark.usefixtures("instrumented")
def test_a_downgrade_budget_refuses_the_call_as_a_callback_cannot_change_the_model(
    ledger: Ledger,
) -> None:
    server = Server(json_answer(chat_completion()))
    budget = Budget(usd="0.001", action="downgrade", downgrade_to=["gpt-4o-mini"])
    with (
        pytest.raises(BudgetExceeded, match="cannot change the model"),
        ledger.run("thrifty", budget=budget) as run,
    ):
        chat_model(server, model="gpt-4o", max_tokens=200).invoke(PROMPT)
    assert [] == server.requests
    assert "budget_exceeded" == run.status


# -- attaching the handler ----------------------------------------------------------------


def test_a_handler_given_in_callbacks_records_its_calls(ledger: Ledger) -> None:
    server = Server(json_answer(chat_completion()), json_answer(chat_completion()))
    model = chat_model(server)
    handler = tl_langchain.TokenledgerCallbackHandler()
    with ledger.run("triage") as run:
        model.invoke(PROMPT, config={"callbacks": [handler]})
        model.invoke(PROMPT)  # no handler, nothing instrumented: not recorded
    assert 2 == len(server.requests)
    assert run.id == only_call(ledger)["run_id"]


@pytest.mark.usefixtures("instrumented")
def test_a_handler_in_callbacks_and_instrument_together_record_once(ledger: Ledger) -> None:
    server = Server(json_answer(chat_completion()))
    with ledger.run("triage") as run:
        chat_model(server).invoke(
            PROMPT, config={"callbacks": [tl_langchain.TokenledgerCallbackHandler()]}
        )
    assert CACHED_COST == only_call(ledger)["cost_usd"]
    assert 1 == run.calls


def test_uninstrument_stops_recording(ledger: Ledger) -> None:
    server = Server(json_answer(chat_completion()), json_answer(chat_completion()))
    model = chat_model(server)
    assert tl_langchain.instrument() is tl_langchain.instrument()  # one handler
    try:
        with ledger.run("triage"):
            model.invoke(PROMPT)
    finally:
        tl_langchain.uninstrument()
    with ledger.run("triage"):
        model.invoke(PROMPT)
    assert 2 == len(server.requests)
    only_call(ledger)


@pytest.mark.usefixtures("instrumented")
def test_a_call_made_in_a_thread_without_the_callers_context_keeps_its_run(
    ledger: Ledger,
) -> None:
    """A chain hands its config to a plain thread, which does not inherit context
    variables: the call is attributed through the chain's LangChain run id."""
    server = Server(json_answer(chat_completion()))
    model = chat_model(server)
    seen: list[object] = []

    def in_a_thread(question: str, config: RunnableConfig) -> str:
        def work() -> None:
            import tokenledger

            seen.append(tokenledger.current_run())
            model.invoke(question, config=config)

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        return "done"

    with ledger.run("triage") as run:
        RunnableLambda(in_a_thread).invoke(PROMPT)
    assert [None] == seen  # the thread really did not see the run
    assert run.id == only_call(ledger)["run_id"]


# -- LangGraph --------------------------------------------------------------------------


class Ticket(TypedDict):
    question: str
    answer: str


def triage_graph(model: ChatOpenAI) -> Any:
    """classify -> answer, each node one model call."""

    def classify(state: Ticket) -> dict[str, str]:
        return {"answer": str(model.invoke(state["question"]).content)}

    async def answer(state: Ticket) -> dict[str, str]:
        return {"answer": str((await model.ainvoke(state["question"])).content)}

    def answer_sync(state: Ticket) -> dict[str, str]:
        return {"answer": str(model.invoke(state["question"]).content)}

    graph = StateGraph(Ticket)
    graph.add_node("classify", classify)
    graph.add_node("answer", RunnableLambda(answer_sync, afunc=answer))
    graph.add_edge(START, "classify")
    graph.add_edge("classify", "answer")
    graph.add_edge("answer", END)
    return graph.compile()


@pytest.mark.usefixtures("graph_nodes")
def test_each_graph_node_gets_a_child_run_holding_its_calls(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    server = Server(json_answer(chat_completion()), json_answer(chat_completion()))
    with ledger.run("support") as run:
        triage_graph(chat_model(server)).invoke({"question": PROMPT, "answer": ""})
    ledger.flush()
    runs = runs_by_name(ledger)
    assert {"support", "classify", "answer"} == set(runs)
    for node in ("classify", "answer"):
        assert (run.id, run.id, "ok", 1, CACHED_COST) == (
            runs[node]["parent_id"],
            runs[node]["root_id"],
            runs[node]["status"],
            runs[node]["calls"],
            runs[node]["cost_usd"],
        )
    calls = calls_of(ledger)
    assert {runs["classify"]["id"], runs["answer"]["id"]} == {c["run_id"] for c in calls}
    assert {run.id} == {c["root_run_id"] for c in calls}
    assert (2, 2 * CACHED_COST) == (run.calls, run.cost_usd)  # rolled up to the root
    # Each call's span sits under its node run's span ("invoke_agent <node>").
    nodes = ("invoke_agent classify", "invoke_agent answer")
    node_spans = {s.context.span_id for s in span_exporter.get_finished_spans() if s.name in nodes}
    assert 2 == len(node_spans)
    assert node_spans == {s.parent.span_id for s in call_spans(span_exporter) if s.parent}


async def test_graph_node_runs_in_an_async_graph(ledger: Ledger, graph_nodes: None) -> None:
    server = Server(json_answer(chat_completion()), json_answer(chat_completion()))
    async with ledger.run("support") as run:
        await triage_graph(chat_model(server)).ainvoke({"question": PROMPT, "answer": ""})
    ledger.flush()
    runs = runs_by_name(ledger)
    assert {"support", "classify", "answer"} == set(runs)
    assert {run.id} == {runs["classify"]["parent_id"], runs["answer"]["parent_id"]}
    calls = calls_of(ledger)
    assert {runs["classify"]["id"], runs["answer"]["id"]} == {c["run_id"] for c in calls}
    assert 2 * CACHED_COST == run.cost_usd


@pytest.mark.usefixtures("graph_nodes")
def test_a_sub_graph_node_nests_the_runs_of_its_own_nodes(ledger: Ledger) -> None:
    server = Server(json_answer(chat_completion()), json_answer(chat_completion()))
    inner = triage_graph(chat_model(server))
    outer = StateGraph(Ticket)
    outer.add_node("escalate", inner)
    outer.add_edge(START, "escalate")
    outer.add_edge("escalate", END)
    with ledger.run("support") as run:
        outer.compile().invoke({"question": PROMPT, "answer": ""})
    ledger.flush()
    runs = runs_by_name(ledger)
    assert {"support", "escalate", "classify", "answer"} == set(runs)
    assert run.id == runs["escalate"]["parent_id"]
    assert runs["escalate"]["id"] == runs["classify"]["parent_id"] == runs["answer"]["parent_id"]
    assert (2, 2 * CACHED_COST) == (runs["escalate"]["calls"], runs["escalate"]["cost_usd"])


@pytest.mark.usefixtures("instrumented")
def test_without_graph_nodes_a_graphs_calls_go_to_the_enclosing_run(ledger: Ledger) -> None:
    server = Server(json_answer(chat_completion()), json_answer(chat_completion()))
    with ledger.run("support") as run:
        triage_graph(chat_model(server)).invoke({"question": PROMPT, "answer": ""})
    ledger.flush()
    assert ["support"] == list(runs_by_name(ledger))
    assert [run.id, run.id] == [c["run_id"] for c in calls_of(ledger)]


@pytest.mark.usefixtures("graph_nodes")
def test_a_budget_refusal_inside_a_node_fails_the_node_and_sends_nothing(ledger: Ledger) -> None:
    server = Server(json_answer(chat_completion()))
    with (
        pytest.raises(BudgetExceeded),
        ledger.run("support", budget=Budget(usd="0.000001")),
    ):
        triage_graph(chat_model(server, model="gpt-4o")).invoke({"question": PROMPT, "answer": ""})
    assert [] == server.requests
    ledger.flush()
    runs = runs_by_name(ledger)
    assert ("budget_exceeded", "budget_exceeded") == (
        runs["support"]["status"],
        runs["classify"]["status"],
    )


# -- recorded once ------------------------------------------------------------------------


@pytest.mark.usefixtures("instrumented", "openai_instrumented")
def test_a_call_the_openai_integration_records_is_not_recorded_again(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    server = Server(json_answer(chat_completion()), sse_answer(chat_chunks(include_usage=True)))
    model = chat_model(server, stream_usage=True)
    with ledger.run("triage") as run:
        model.invoke(PROMPT)
        list(model.stream(PROMPT))
    ledger.flush()
    calls = calls_of(ledger)
    assert [(False, CACHED_COST), (True, CACHED_COST)] == sorted(
        (c["streamed"], c["cost_usd"]) for c in calls
    )
    assert (2, 2 * CACHED_COST) == (run.calls, run.cost_usd)
    assert 2 == len(call_spans(span_exporter))


async def test_an_async_call_the_openai_integration_records_is_not_recorded_again(
    ledger: Ledger,
    instrumented: tl_langchain.TokenledgerCallbackHandler,
    openai_instrumented: None,
) -> None:
    server = Server(json_answer(chat_completion()))
    async with ledger.run("triage") as run:
        await chat_model(server).ainvoke(PROMPT)
    assert (run.id, CACHED_COST) == (only_call(ledger)["run_id"], only_call(ledger)["cost_usd"])


@pytest.mark.usefixtures("instrumented", "openai_instrumented")
def test_under_the_openai_integration_a_downgrade_budget_is_applied(ledger: Ledger) -> None:
    """The integration that records the call also sends it, so it can change the model."""
    server = Server(json_answer(chat_completion()))
    budget = Budget(usd="0.001", action="downgrade", downgrade_to=["gpt-4o-mini"])
    with ledger.run("thrifty", budget=budget):
        chat_model(server, model="gpt-4o", max_tokens=200).invoke(PROMPT)
    assert "gpt-4o-mini" == server.body()["model"]
    call = only_call(ledger)
    assert ("gpt-4o", SERVED, CACHED_COST) == (
        call["requested_model"],
        call["model"],
        call["cost_usd"],
    )


# -- installing -------------------------------------------------------------------------


def test_a_missing_langchain_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if never installed: the package blocked, its loaded submodules forgotten.
    for name in [m for m in sys.modules if m.startswith("langchain_core.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "langchain_core", None)
    monkeypatch.delitem(sys.modules, "tokenledger.integrations.langchain")
    with pytest.raises(
        ModuleNotFoundError, match=r"pip install 'tokenledger\[langchain\]'"
    ) as raised:
        importlib.import_module("tokenledger.integrations.langchain")
    assert "langchain_core" == (raised.value.name or "").split(".")[0]


def test_importing_tokenledger_does_not_import_langchain() -> None:
    import subprocess
    import tempfile

    code = (
        "import sys, tokenledger, tokenledger.integrations; "
        "print(any(m.startswith(('langchain', 'langgraph')) for m in sys.modules))"
    )
    # Away from the checkout, so the installed package (integrations mapped in) is used.
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),
    ).stdout
    assert "False" == out.strip()
