"""The OpenAI Agents SDK integration, against the real SDK with its network replaced offline.

Agents run with the SDK's own ``Runner`` and models (``OpenAIResponsesModel``,
``OpenAIChatCompletionsModel``) over an ``AsyncOpenAI`` client whose transport is an
``httpx.MockTransport`` answering with OpenAI's wire formats (tests/wire.py builds
them): Responses API JSON (a message, a function call, a handoff), its SSE event stream,
and chat completion JSON. The SDK's tracing stays on, with its exporter to OpenAI's
backend removed for these tests. Prices are litellm's bundled map: gpt-4o-mini is
$0.15 / $0.60 per million input / output tokens and $0.075 for cache reads; gpt-4o is
$2.50 / $10.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import agents
import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    function_tool,
)
from agents.tracing import Span, Trace, TracingProcessor
from helpers import calls_of, rows
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from wire import (
    CACHED_COST,
    SERVED,
    Server,
    async_client,
    chat_completion,
    json_answer,
    output_message,
    responses_body,
    responses_events,
    sse_answer,
)

from tokenledger import Budget, BudgetExceeded, Ledger
from tokenledger.integrations import openai as tl_openai
from tokenledger.integrations import openai_agents as tl_agents

# 500 input tokens, 50 output tokens: 500 x $0.15/M + 50 x $0.60/M = $0.000075 + $0.000030
PLAIN_USAGE = {
    "input_tokens": 500,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 50,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 550,
}
PLAIN_COST = Decimal("0.000105")


# -- the provider's wire formats (the rest are in tests/wire.py) ---------------------------


def function_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": name,
        "arguments": json.dumps(arguments),
        "status": "completed",
    }


@function_tool
def lookup_order(order_id: str) -> str:
    """Look an order up by its id."""
    return f"Order {order_id} shipped yesterday."


def support_agent(server: Server, model: str = "gpt-4o-mini", **settings: Any) -> Agent[Any]:
    return Agent(
        name="support",
        instructions="Answer questions about orders.",
        model=OpenAIResponsesModel(model, async_client(server)),
        model_settings=ModelSettings(**settings),
        tools=[lookup_order],
    )


# -- fixtures and readers ---------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _no_trace_export() -> Iterator[None]:
    """Tracing stays on, but nothing is sent to OpenAI's trace backend."""
    provider = agents.tracing.get_trace_provider()
    exporting = list(provider._multi_processor._processors)  # type: ignore[attr-defined]
    agents.set_trace_processors([])
    yield
    agents.set_trace_processors(exporting)
    tl_agents._processor = None


@pytest.fixture
def instrumented() -> Iterator[None]:
    """Agents SDK runs and requests recorded, for this test only."""
    tl_agents.instrument()
    yield
    tl_agents.uninstrument()


def runs(ledger: Ledger) -> dict[str, dict[str, Any]]:
    ledger.flush()
    return {r["name"]: r for r in rows(ledger, "runs")}


def calls(ledger: Ledger) -> list[dict[str, Any]]:
    ledger.flush()
    return sorted(calls_of(ledger), key=lambda c: c["started_at"])


def tokens(call: dict[str, Any]) -> tuple[int, int, int, int]:
    return (
        call["input_tokens"],
        call["cache_read_tokens"],
        call["output_tokens"],
        call["reasoning_tokens"],
    )


# -- runs and calls ---------------------------------------------------------------------


@pytest.mark.usefixtures("instrumented")
async def test_a_tool_call_turn_records_one_call_per_model_request(ledger: Ledger) -> None:
    server = Server(
        json_answer(responses_body(function_call("lookup_order", {"order_id": "42"}))),
        json_answer(responses_body(output_message("It shipped yesterday."), usage=PLAIN_USAGE)),
    )
    async with ledger.run("ticket") as ticket:
        result = await Runner.run(
            support_agent(server),
            "Where is order 42?",
            run_config=RunConfig(workflow_name="order lookup"),
        )
    assert "It shipped yesterday." == result.final_output
    assert 2 == len(server.requests)

    by_name = runs(ledger)
    workflow, agent = by_name["order lookup"], by_name["support"]
    assert (ticket.id, workflow["id"]) == (workflow["parent_id"], agent["parent_id"])
    assert [ticket.id] * 3 == [r["root_id"] for r in by_name.values()]
    recorded = calls(ledger)
    assert [(agent["id"], "chat", "openai", "gpt-4o-mini", "ok")] * 2 == [
        (c["run_id"], c["operation"], c["provider"], c["requested_model"], c["status"])
        for c in recorded
    ]
    assert [(1200, 1000, 300, 100), (500, 0, 50, 0)] == [tokens(c) for c in recorded]
    assert [CACHED_COST, PLAIN_COST] == [c["cost_usd"] for c in recorded]
    # Totals roll up: $0.000285 + $0.000105
    total = Decimal("0.000390")
    assert [(2, total, "ok")] * 3 == [
        (r["calls"], r["cost_usd"], r["status"]) for r in (agent, workflow, by_name["ticket"])
    ]


@pytest.mark.usefixtures("instrumented")
def test_run_sync_outside_any_run_makes_a_root_run_named_after_the_agent(
    ledger: Ledger,
) -> None:
    server = Server(json_answer(responses_body(output_message("Shipped."))))
    result = Runner.run_sync(support_agent(server), "Where is order 42?")
    assert "Shipped." == result.final_output
    ledger.flush()
    root, child = sorted(rows(ledger, "runs"), key=lambda r: r["parent_id"] is not None)
    assert ("support", None, "support", root["id"]) == (
        root["name"],
        root["parent_id"],
        child["name"],
        child["parent_id"],
    )
    (call,) = calls(ledger)
    assert (child["id"], CACHED_COST) == (call["run_id"], call["cost_usd"])
    assert (1, CACHED_COST) == (root["calls"], root["cost_usd"])


@pytest.mark.usefixtures("instrumented")
async def test_a_streamed_run_is_recorded_from_its_completed_event(ledger: Ledger) -> None:
    server = Server(sse_answer(responses_events("Shipped yesterday.")))
    async with ledger.run("ticket") as ticket:
        streamed = Runner.run_streamed(
            support_agent(server), "Where is order 42?", run_config=RunConfig(workflow_name="w")
        )
        kinds = [event.type async for event in streamed.stream_events()]
    assert "raw_response_event" in kinds
    assert "Shipped yesterday." == streamed.final_output
    (call,) = calls(ledger)
    assert ("ok", True, False, SERVED, ["stop"]) == (
        call["status"],
        call["streamed"],
        call["usage_estimated"],
        call["model"],
        call["finish_reasons"],
    )
    assert ((1200, 1000, 300, 100), CACHED_COST) == (tokens(call), call["cost_usd"])
    by_name = runs(ledger)
    agent, workflow = by_name["support"], by_name["w"]
    assert ("ok", ticket.id, call["run_id"]) == (agent["status"], agent["root_id"], agent["id"])
    # The agent loop ran in the SDK's background task; its run ended with it.
    assert ("ok", 1, CACHED_COST) == (workflow["status"], workflow["calls"], workflow["cost_usd"])
    assert workflow["ended_at"] is not None
    assert CACHED_COST == ticket.cost_usd


@pytest.mark.usefixtures("instrumented")
async def test_a_handoff_gives_each_agent_its_own_child_run(ledger: Ledger) -> None:
    server = Server(
        json_answer(responses_body(function_call("transfer_to_billing", {}))),
        json_answer(responses_body(output_message("Refund issued."), usage=PLAIN_USAGE)),
    )
    client = async_client(server)
    billing = Agent(name="billing", model=OpenAIResponsesModel("gpt-4o-mini", client))
    triage = Agent(
        name="triage",
        instructions="Route billing questions to billing.",
        model=OpenAIResponsesModel("gpt-4o-mini", client),
        handoffs=[billing],
    )
    async with ledger.run("ticket") as ticket:
        result = await Runner.run(
            triage, "I was charged twice.", run_config=RunConfig(workflow_name="support")
        )
    assert "Refund issued." == result.final_output

    by_name = runs(ledger)
    workflow = by_name["support"]
    assert ticket.id == workflow["parent_id"]
    assert [workflow["id"]] * 2 == [by_name["triage"]["parent_id"], by_name["billing"]["parent_id"]]
    run_of_call = {c["run_id"]: c["cost_usd"] for c in calls(ledger)}
    assert {by_name["triage"]["id"]: CACHED_COST, by_name["billing"]["id"]: PLAIN_COST} == (
        run_of_call
    )
    assert CACHED_COST + PLAIN_COST == ticket.cost_usd


@pytest.mark.usefixtures("instrumented")
async def test_a_chat_completions_model_is_recorded_with_cached_and_reasoning_tokens(
    ledger: Ledger,
) -> None:
    server = Server(json_answer(chat_completion(text="Shipped.")))
    agent = Agent(
        name="support",
        model=OpenAIChatCompletionsModel("gpt-4o-mini", async_client(server)),
        model_settings=ModelSettings(max_tokens=400),
    )
    async with ledger.run("ticket"):
        result = await Runner.run(agent, "Where is order 42?")
    assert "Shipped." == result.final_output
    assert "/chat/completions" == server.requests[0].url.path.removeprefix("/v1")
    (call,) = calls(ledger)
    assert ((1200, 1000, 300, 100), CACHED_COST, 400) == (
        tokens(call),
        call["cost_usd"],
        call["max_tokens"],
    )


@pytest.mark.usefixtures("instrumented")
async def test_calls_and_runs_are_spans_nested_under_the_enclosing_run(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    server = Server(json_answer(responses_body(output_message("Shipped."))))
    async with ledger.run("ticket") as ticket:
        await Runner.run(support_agent(server, max_tokens=500), "Where is order 42?")
    (call,) = calls(ledger)
    spans = {
        s.attributes.get("tokenledger.call.id") or s.attributes.get("tokenledger.run.id"): s
        for s in span_exporter.get_finished_spans()
        if s.instrumentation_scope is not None
        and s.instrumentation_scope.name == "tokenledger"
        and s.attributes is not None
    }
    call_span = spans[call["id"]]
    agent_span = spans[call["run_id"]]
    assert call_span.parent is not None
    assert agent_span.context is not None
    assert agent_span.context.span_id == call_span.parent.span_id
    assert ticket.span is not None
    assert ticket.span.get_span_context().trace_id == call_span.context.trace_id
    assert {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.request.max_tokens": 500,
        "gen_ai.usage.input_tokens": 1200,
        "gen_ai.usage.cache_read.input_tokens": 1000,
        "gen_ai.usage.output_tokens": 300,
        "gen_ai.usage.reasoning.output_tokens": 100,
        "tokenledger.usage.cost.amount": float(CACHED_COST),
        "tokenledger.run.id": call["run_id"],
    }.items() <= dict(call_span.attributes or {}).items()


# -- budgets ----------------------------------------------------------------------------


@pytest.mark.usefixtures("instrumented")
@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
async def test_a_budget_refusal_sends_no_request(ledger: Ledger, streamed: bool) -> None:
    server = Server(json_answer(responses_body(output_message("Shipped."))))
    agent = support_agent(server, model="gpt-4o")
    with pytest.raises(BudgetExceeded):
        async with ledger.run("capped", budget=Budget(usd="0.000001")):
            if streamed:
                async for _event in Runner.run_streamed(agent, "Hi").stream_events():
                    pass
            else:
                await Runner.run(agent, "Hi")
    assert [] == server.requests
    assert [] == calls(ledger)
    assert {"budget_exceeded"} == {r["status"] for r in runs(ledger).values()}


@pytest.mark.usefixtures("instrumented")
async def test_a_downgrade_budget_sends_the_cheaper_model(ledger: Ledger) -> None:
    server = Server(json_answer(responses_body(output_message("Shipped."))))
    agent = support_agent(server, model="gpt-4o", max_tokens=200)
    model = agent.model
    budget = Budget(usd="0.001", action="downgrade", downgrade_to=["gpt-4o-mini"])
    async with ledger.run("thrifty", budget=budget):
        await Runner.run(agent, "Where is order 42?")
    assert "gpt-4o-mini" == server.body()["model"]
    assert isinstance(model, OpenAIResponsesModel)
    assert "gpt-4o" == model.model  # the agent's own model object is untouched
    (call,) = calls(ledger)
    assert ("gpt-4o", "gpt-4o-mini", CACHED_COST) == (
        call["requested_model"],
        call["model"],
        call["cost_usd"],
    )


# -- failures ---------------------------------------------------------------------------


@pytest.mark.usefixtures("instrumented")
async def test_a_failed_request_is_recorded_and_raised_unchanged(ledger: Ledger) -> None:
    error = {"error": {"message": "Bad model", "type": "invalid_request_error", "code": None}}
    server = Server(json_answer(error, status=400))
    with pytest.raises(openai.BadRequestError):
        async with ledger.run("ticket"):
            await Runner.run(support_agent(server), "Where is order 42?")
    (call,) = calls(ledger)
    assert ("error", "BadRequestError", 0) == (
        call["status"],
        call["error_type"],
        call["input_tokens"],
    )
    by_name = runs(ledger)
    assert ("error", "AgentSpanError") == (
        by_name["support"]["status"],
        by_name["support"]["error_type"],
    )
    assert ("error", "BadRequestError", 1) == (
        by_name["ticket"]["status"],
        by_name["ticket"]["error_type"],
        by_name["ticket"]["failed_calls"],
    )


# -- tracing, other processors, other integrations -------------------------------------


@pytest.mark.usefixtures("instrumented")
async def test_with_tracing_disabled_calls_are_recorded_in_the_agent_run(ledger: Ledger) -> None:
    server = Server(json_answer(responses_body(output_message("Shipped."))))
    async with ledger.run("ticket") as ticket:
        await Runner.run(
            support_agent(server),
            "Where is order 42?",
            run_config=RunConfig(tracing_disabled=True),
        )
    (agent_run,) = (r for r in runs(ledger).values() if r["parent_id"] == ticket.id)
    (call,) = calls(ledger)
    assert ("support", agent_run["id"], CACHED_COST) == (
        agent_run["name"],
        call["run_id"],
        call["cost_usd"],
    )
    assert CACHED_COST == ticket.cost_usd


class Recorder(TracingProcessor):
    """A user's own trace processor."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_trace_start(self, trace: Trace) -> None:
        self.seen.append(f"trace:{trace.name}")

    def on_trace_end(self, trace: Trace) -> None:
        pass

    def on_span_start(self, span: Span[Any]) -> None:
        pass

    def on_span_end(self, span: Span[Any]) -> None:
        self.seen.append(span.span_data.type)

    def shutdown(self) -> None:
        pass

    def force_flush(self) -> None:
        pass


@pytest.mark.usefixtures("instrumented")
async def test_the_users_own_trace_processors_keep_working(ledger: Ledger) -> None:
    registered = list(agents.tracing.get_trace_provider()._multi_processor._processors)  # type: ignore[attr-defined]
    recorder = Recorder()
    agents.add_trace_processor(recorder)
    server = Server(json_answer(responses_body(output_message("Shipped."))))
    try:
        async with ledger.run("ticket"):
            await Runner.run(support_agent(server), "Hi", run_config=RunConfig(workflow_name="w"))
    finally:
        agents.set_trace_processors(registered)
    assert "trace:w" == recorder.seen[0]
    assert {"response", "agent"} <= set(recorder.seen)
    assert 1 == len(calls(ledger))


async def test_with_the_openai_integration_too_each_request_is_recorded_once(
    ledger: Ledger, instrumented: None
) -> None:
    """The OpenAI integration records at the HTTP level; this one then only adds runs."""
    tl_openai.instrument()
    try:
        server = Server(
            json_answer(responses_body(function_call("lookup_order", {"order_id": "42"}))),
            json_answer(responses_body(output_message("Shipped."), usage=PLAIN_USAGE)),
        )
        async with ledger.run("ticket"):
            await Runner.run(support_agent(server), "Where is order 42?")
    finally:
        tl_openai.uninstrument()
    recorded = calls(ledger)
    agent = runs(ledger)["support"]
    assert [(agent["id"], CACHED_COST), (agent["id"], PLAIN_COST)] == [
        (c["run_id"], c["cost_usd"]) for c in recorded
    ]


def test_nothing_is_recorded_after_uninstrument(ledger: Ledger) -> None:
    from agents.run import AgentRunner

    run = AgentRunner.__dict__["run"]
    get_response = OpenAIResponsesModel.__dict__["get_response"]
    tl_agents.instrument()
    tl_agents.instrument()
    assert run is not AgentRunner.__dict__["run"]
    tl_agents.uninstrument()
    assert run is AgentRunner.__dict__["run"]
    assert get_response is OpenAIResponsesModel.__dict__["get_response"]
    server = Server(json_answer(responses_body(output_message("Shipped."))))
    Runner.run_sync(support_agent(server), "Hi")
    assert ([], []) == (calls(ledger), rows(ledger, "runs"))


def test_a_missing_sdk_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "agents", None)
    monkeypatch.delitem(sys.modules, "tokenledger.integrations.openai_agents")
    with pytest.raises(
        ModuleNotFoundError, match=r"pip install 'tokenledger\[openai-agents\]'"
    ) as raised:
        importlib.import_module("tokenledger.integrations.openai_agents")
    assert "agents" == raised.value.name


async def test_with_the_openai_integration_a_streamed_request_is_recorded_once(
    ledger: Ledger, instrumented: None
) -> None:
    tl_openai.instrument()
    try:
        server = Server(sse_answer(responses_events("Shipped.")))
        async with ledger.run("ticket") as ticket:
            streamed = Runner.run_streamed(support_agent(server), "Where is order 42?")
            async for _event in streamed.stream_events():
                pass
    finally:
        tl_openai.uninstrument()
    (call,) = calls(ledger)
    assert (True, CACHED_COST) == (call["streamed"], call["cost_usd"])
    assert CACHED_COST == ticket.cost_usd
