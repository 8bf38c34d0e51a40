"""The OpenTelemetry GenAI span processor, fed by real instrumentations.

OpenLLMetry (``opentelemetry-instrumentation-openai``) and OpenInference
(``openinference-instrumentation-openai``) instrument the real OpenAI SDK, whose network
is an ``httpx.MockTransport`` answering with OpenAI's wire formats (tests/wire.py builds
them). Spans go through the session's real SDK tracer provider — the global one, which
tokenledger's own spans use too — where a forwarding processor hands them to the test's
`GenAISpanProcessor`.

Logfire is not installed here: its spans are built with the real OpenTelemetry tracer,
under its instrumentation scope names and with the attribute names its source sets
(``logfire/_internal/integrations/llm_providers/{openai,anthropic}.py``).

Prices (litellm's bundled map): gpt-4o-mini $0.15 / $0.60 per million input / output
tokens and $0.075 for cache reads; claude-sonnet-4-5 $3 / $15, cache writes $3.75 and
cache reads $0.30.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
import wire
from helpers import calls_of
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode
from wire import (
    CACHED_COST,
    MESSAGES,
    SERVED,
    async_client,
    chat_chunks,
    chat_completion,
    json_answer,
    sse_answer,
    sync_client,
    tokens,
)

from tokenledger import Ledger
from tokenledger.exceptions import UnpricedModelWarning
from tokenledger.integrations import openai as tl_openai
from tokenledger.integrations import otel
from tokenledger.integrations.otel import GenAISpanProcessor, instrument

# -- OpenAI, offline --------------------------------------------------------------------


# Handlers that answer every request alike (a `Server` answers a set number).
def answer(_: httpx.Request) -> httpx.Response:
    return json_answer(chat_completion())


def stream_answer(_: httpx.Request) -> httpx.Response:
    return sse_answer(chat_chunks(include_usage=True))


def chat(client: openai.OpenAI) -> Any:
    return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]


def stream_chat(client: openai.OpenAI) -> str:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


# -- span plumbing ----------------------------------------------------------------------


class _Forward(SpanProcessor):  # type: ignore[misc]
    """Added once to the session's global provider (OpenTelemetry allows one and has
    no way to remove a processor): hands spans to the current test's processor."""

    target: GenAISpanProcessor | None = None

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if self.target is not None:
            self.target.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if self.target is not None:
            self.target.on_end(span)


_FORWARD = _Forward()


def global_provider() -> TracerProvider:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)  # set by tests/conftest.py
    return provider


@pytest.fixture(scope="module", autouse=True)
def _forwarding() -> None:
    if not getattr(global_provider(), "_tokenledger_test_forward", False):
        global_provider().add_span_processor(_FORWARD)
        global_provider()._tokenledger_test_forward = True  # type: ignore[attr-defined]


@pytest.fixture
def processor(ledger: Ledger) -> Iterator[GenAISpanProcessor]:
    """The processor under test, recording into ``ledger`` (its runs' ledger)."""
    made = GenAISpanProcessor()
    _FORWARD.target = made
    yield made
    _FORWARD.target = None
    made.shutdown()


def openllmetry() -> Callable[[], None]:
    """Instrument the OpenAI SDK with OpenLLMetry; returns the undo."""
    from opentelemetry.instrumentation.openai import OpenAIInstrumentor

    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=global_provider())
    return instrumentor.uninstrument


def openinference() -> Callable[[], None]:
    from openinference.instrumentation.openai import OpenAIInstrumentor

    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=global_provider())
    return instrumentor.uninstrument


def tokenledger_openai() -> Callable[[], None]:
    tl_openai.instrument()
    return tl_openai.uninstrument


def sdk_state() -> dict[type, dict[str, Any]]:
    """Every attribute of every class the imported OpenAI SDK defines."""
    state: dict[type, dict[str, Any]] = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "openai" or name.startswith("openai.")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, type) and value.__module__.startswith("openai"):
                state[value] = dict(vars(value))
    return state


def restore(state: dict[type, dict[str, Any]]) -> None:
    for cls, saved in state.items():
        for name in [n for n in vars(cls) if n not in saved]:
            delattr(cls, name)
        for name, value in saved.items():
            if vars(cls).get(name) is not value:
                setattr(cls, name, value)


@pytest.fixture
def patch() -> Iterator[Callable[..., None]]:
    """Apply patches in the order given (the last one wraps outermost); undo them in
    reverse. The instrumentors patch the SDK for every test module, and OpenLLMetry
    0.62.4's ``uninstrument()`` leaves its wrappers in place (it passes
    ``"Completions.create"`` to ``unwrap``, which looks the dotted name up as one
    attribute and finds nothing), so every SDK class is then put back exactly as it
    was, compared by identity."""
    from openai.resources.chat.completions import Completions

    before = sdk_state()
    with ExitStack() as stack:

        def apply(*steps: Callable[[], Callable[[], None]]) -> None:
            for step in steps:
                stack.callback(step())

        yield apply
    restore(before)
    assert before[Completions]["create"] is vars(Completions)["create"]
    assert {c: dict(vars(c)) for c in before} == before


def only_call(ledger: Ledger, processor: GenAISpanProcessor) -> dict[str, Any]:
    """The one call recorded, once ``processor`` has handed on the spans it holds."""
    processor.force_flush()
    return wire.only_call(ledger)


# -- OpenLLMetry and OpenInference record calls -----------------------------------------


def test_an_openllmetry_chat_call_is_recorded_priced_and_attributed_to_its_run(
    ledger: Ledger, processor: GenAISpanProcessor, patch: Callable[..., None]
) -> None:
    patch(openllmetry)
    with ledger.run("triage") as run:
        chat(sync_client(answer))
        processor.force_flush()
        assert 1 == run.calls
    call = only_call(ledger, processor)
    assert (1200, 1000, 0, 300, 100) == tokens(call)
    assert CACHED_COST == call["cost_usd"]
    assert run.id == call["run_id"]
    assert ("openai", "gpt-4o-mini", SERVED) == (
        call["provider"],
        call["requested_model"],
        call["model"],
    )
    assert "ok" == call["status"]


def test_an_openinference_chat_call_is_recorded_priced_and_attributed_to_its_run(
    ledger: Ledger, processor: GenAISpanProcessor, patch: Callable[..., None]
) -> None:
    patch(openinference)
    with ledger.run("triage") as run:
        chat(sync_client(answer))
    call = only_call(ledger, processor)
    assert (1200, 1000, 0, 300, 100) == tokens(call)
    assert CACHED_COST == call["cost_usd"]
    assert run.id == call["run_id"]
    assert ("openai", SERVED) == (call["provider"], call["model"])


def test_an_openllmetry_stream_is_recorded_when_it_ends(
    ledger: Ledger, processor: GenAISpanProcessor, patch: Callable[..., None]
) -> None:
    patch(openllmetry)
    with ledger.run("triage") as run:
        assert "Printer jam." == stream_chat(sync_client(stream_answer))
    call = only_call(ledger, processor)
    # OpenLLMetry 0.62 leaves reasoning tokens off stream spans; they are part of the
    # output, so the cost is the same.
    assert (1200, 1000, 0, 300, 0) == tokens(call)
    assert CACHED_COST == call["cost_usd"]
    assert run.id == call["run_id"]


async def test_async_calls_are_attributed_to_the_run_of_their_task(
    ledger: Ledger, processor: GenAISpanProcessor, patch: Callable[..., None]
) -> None:
    """Two tasks in two runs at once: each call lands in the run its task is in."""
    patch(openllmetry)
    client = async_client(answer)

    async def agent(name: str) -> str:
        async with ledger.run(name) as run:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
            return run.id

    first, second = await asyncio.gather(agent("first"), agent("second"))
    processor.force_flush()
    ledger.flush()
    assert sorted([first, second]) == sorted(c["run_id"] for c in calls_of(ledger))


def test_a_call_outside_any_run_is_recorded_with_no_run(
    ledger: Ledger, processor: GenAISpanProcessor, patch: Callable[..., None]
) -> None:
    patch(openinference)
    chat(sync_client(answer))
    assert None is only_call(ledger, processor)["run_id"]


# -- never twice ------------------------------------------------------------------------


@pytest.mark.parametrize("call", [chat, stream_chat], ids=["response", "stream"])
@pytest.mark.parametrize(
    "order",
    [(tokenledger_openai, openllmetry), (openllmetry, tokenledger_openai)],
    ids=["openllmetry-outside-tokenledger", "openllmetry-inside-tokenledger"],
)
def test_a_call_tokenledger_captured_is_not_counted_again(
    ledger: Ledger,
    processor: GenAISpanProcessor,
    patch: Callable[..., None],
    order: tuple[Callable[[], Callable[[], None]], ...],
    call: Callable[[openai.OpenAI], Any],
) -> None:
    """Patched last wraps outermost: both nestings of OpenLLMetry's span and
    tokenledger's own capture of the same SDK call give one row."""
    patch(*order)
    handler = stream_answer if call is stream_chat else answer
    with ledger.run("triage") as run:
        call(sync_client(handler))
    row = only_call(ledger, processor)
    assert (CACHED_COST, run.id) == (row["cost_usd"], row["run_id"])


@pytest.mark.parametrize(
    "order",
    [(tokenledger_openai, openllmetry), (openllmetry, tokenledger_openai)],
    ids=["openllmetry-outside-tokenledger", "openllmetry-inside-tokenledger"],
)
def test_a_call_tokenledger_captured_outside_runs_is_not_counted_again(
    ledger: Ledger,
    processor: GenAISpanProcessor,
    patch: Callable[..., None],
    order: tuple[Callable[[], Callable[[], None]], ...],
) -> None:
    """With no run, tokenledger's span of the call starts a trace of its own: the
    foreign span is still recognised as the same call (same time, same model)."""
    patch(*order)
    chat(sync_client(answer))
    row = only_call(ledger, processor)
    assert (CACHED_COST, None) == (row["cost_usd"], row["run_id"])


def test_openinference_inside_tokenledger_capture_is_not_counted_again(
    ledger: Ledger, processor: GenAISpanProcessor, patch: Callable[..., None]
) -> None:
    """OpenInference patches ``OpenAI.request``, always inside tokenledger's wrapper."""
    patch(openinference, tokenledger_openai)
    with ledger.run("triage") as run:
        chat(sync_client(answer))
    row = only_call(ledger, processor)
    assert (CACHED_COST, run.id) == (row["cost_usd"], row["run_id"])


def test_an_openinference_stream_inside_tokenledger_capture_is_recorded_once(
    ledger: Ledger, processor: GenAISpanProcessor, patch: Callable[..., None]
) -> None:
    """tokenledger records the stream when its chunks end, inside OpenInference's
    stream proxy, whose span ends after: the two spans overlap without nesting."""
    patch(openinference, tokenledger_openai)
    with ledger.run("triage"):
        stream_chat(sync_client(stream_answer))
    processor.force_flush()
    ledger.flush()
    rows = calls_of(ledger)
    assert [CACHED_COST] == [r["cost_usd"] for r in rows], rows


def test_two_instrumentations_of_one_call_record_it_once(
    ledger: Ledger, processor: GenAISpanProcessor, patch: Callable[..., None]
) -> None:
    """OpenLLMetry's span around the SDK method, OpenInference's around its request."""
    patch(openinference, openllmetry)
    with ledger.run("triage"):
        chat(sync_client(answer))
    assert CACHED_COST == only_call(ledger, processor)["cost_usd"]


def test_a_litellm_call_is_recorded_once(
    ledger: Ledger, processor: GenAISpanProcessor, patch: Callable[..., None]
) -> None:
    """OpenLLMetry does not instrument litellm; a ``mock_response`` call never reaches
    the OpenAI SDK: litellm capture's row is the only one."""
    import litellm

    patch(openllmetry, openinference)
    with ledger.run("triage") as run:
        litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="Printer jam.")
    row = only_call(ledger, processor)
    assert (10, 20, run.id) == (row["input_tokens"], row["output_tokens"], row["run_id"])


def test_a_litellm_call_through_an_instrumented_openai_sdk_is_recorded_once(
    ledger: Ledger, processor: GenAISpanProcessor, patch: Callable[..., None]
) -> None:
    """litellm capture encloses OpenLLMetry's span of the SDK call litellm makes."""
    import litellm

    patch(openllmetry)
    with ledger.run("triage") as run:
        litellm.completion(model="gpt-4o-mini", messages=MESSAGES, client=sync_client(answer))
    row = only_call(ledger, processor)
    assert (CACHED_COST, run.id) == (row["cost_usd"], row["run_id"])


# -- Logfire's spans, and the semantic conventions --------------------------------------


def logfire_span(scope: str, attributes: dict[str, Any], status: Status | None = None) -> None:
    """A span as Logfire's LLM integrations make it: attributes set at start (its
    ``span_data``) and after the response (model, usage)."""
    tracer = global_provider().get_tracer(scope)
    start = {k: v for k, v in attributes.items() if "usage" not in k and k != "response_data"}
    with tracer.start_as_current_span("Chat Completion", attributes=start) as span:
        span.set_attributes(attributes)
        if status is not None:
            span.set_status(status)


def test_a_logfire_openai_span_is_recorded(ledger: Ledger, processor: GenAISpanProcessor) -> None:
    with ledger.run("triage") as run:
        logfire_span(
            "logfire.openai",
            {
                "gen_ai.system": "openai",
                "gen_ai.provider.name": "openai",
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": "gpt-4o-mini",
                "gen_ai.response.model": SERVED,
                "gen_ai.usage.input_tokens": 1200,
                "gen_ai.usage.output_tokens": 300,
            },
        )
    call = only_call(ledger, processor)
    assert (1200, 0, 0, 300, 0) == tokens(call)
    # 1200 x $0.15/M + 300 x $0.60/M = $0.00018 + $0.00018
    assert Decimal("0.00036") == call["cost_usd"]
    assert run.id == call["run_id"]


def test_a_logfire_anthropic_span_counts_the_cache_anthropic_leaves_out_of_input(
    ledger: Ledger, processor: GenAISpanProcessor
) -> None:
    """Logfire reports Anthropic's ``input_tokens`` (cache excluded) and keeps the cache
    counts in ``response_data``: 300 input + 500 cache write + 200 cache read + 100
    output = 300 x $3/M + 500 x $3.75/M + 200 x $0.30/M + 100 x $15/M = $0.004335."""
    usage = {
        "input_tokens": 300,
        "cache_creation_input_tokens": 500,
        "cache_read_input_tokens": 200,
        "output_tokens": 100,
    }
    with ledger.run("triage"):
        logfire_span(
            "logfire.anthropic",
            {
                "gen_ai.system": "anthropic",
                "gen_ai.provider.name": "anthropic",
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": "claude-sonnet-4-5",
                "gen_ai.response.model": "claude-sonnet-4-5-20250929",
                "gen_ai.usage.input_tokens": 300,
                "gen_ai.usage.output_tokens": 100,
                "response_data": json.dumps({"message": {}, "usage": usage}),
            },
        )
    call = only_call(ledger, processor)
    assert (1000, 200, 500, 100, 0) == tokens(call)
    assert Decimal("0.004335") == call["cost_usd"]


def test_a_current_logfire_anthropic_span_already_counts_the_cache_in_input(
    ledger: Ledger, processor: GenAISpanProcessor
) -> None:
    """Current Logfire reports the input with the cache included, the cache counts as
    the convention's attributes and Anthropic's own usage in ``gen_ai.usage.raw``:
    200 input + 1000 cache read = 1200, not counted twice."""
    usage = {"input_tokens": 200, "cache_read_input_tokens": 1000, "output_tokens": 10}
    with ledger.run("triage"):
        logfire_span(
            "logfire.anthropic",
            {
                "gen_ai.system": "anthropic",
                "gen_ai.provider.name": "anthropic",
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": "claude-sonnet-4-5",
                "gen_ai.response.model": "claude-sonnet-4-5-20250929",
                "gen_ai.usage.input_tokens": 1200,
                "gen_ai.usage.cache_read.input_tokens": 1000,
                "gen_ai.usage.output_tokens": 10,
                "gen_ai.usage.raw": json.dumps(usage),
            },
        )
    call = only_call(ledger, processor)
    assert (1200, 1000, 0, 10, 0) == tokens(call)
    # 200 x $3/M + 1000 x $0.30/M + 10 x $15/M = $0.0006 + $0.0003 + $0.00015
    assert Decimal("0.00105") == call["cost_usd"]


def test_semconv_cache_attributes_are_part_of_the_input(
    ledger: Ledger, processor: GenAISpanProcessor
) -> None:
    with ledger.run("triage"):
        logfire_span(
            "some.instrumentation",
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "anthropic",
                "gen_ai.request.model": "claude-sonnet-4-5",
                "gen_ai.usage.input_tokens": 1000,
                "gen_ai.usage.cache_read.input_tokens": 200,
                "gen_ai.usage.cache_creation.input_tokens": 500,
                "gen_ai.usage.output_tokens": 100,
            },
        )
    call = only_call(ledger, processor)
    assert (1000, 200, 500, 100, 0) == tokens(call)
    assert Decimal("0.004335") == call["cost_usd"]


def test_a_failed_call_span_is_recorded_as_an_error(
    ledger: Ledger, processor: GenAISpanProcessor
) -> None:
    with ledger.run("triage"):
        logfire_span(
            "logfire.openai",
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": "gpt-4o-mini",
                "error.type": "RateLimitError",
            },
            Status(StatusCode.ERROR, "429"),
        )
    call = only_call(ledger, processor)
    assert ("error", "RateLimitError") == (call["status"], call["error_type"])


@pytest.mark.parametrize(
    "attributes",
    [
        {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "triage"},
        {"gen_ai.operation.name": "execute_tool"},
        {"openinference.span.kind": "CHAIN", "llm.model_name": "gpt-4o-mini"},
        {"gen_ai.agent.name": "triage", "gen_ai.request.model": "gpt-4o-mini"},
    ],
    ids=["agent", "tool", "openinference-chain", "agent-without-operation"],
)
def test_spans_that_are_not_one_model_call_are_ignored(
    ledger: Ledger, processor: GenAISpanProcessor, attributes: dict[str, Any]
) -> None:
    """Agent and chain spans may carry the usage totals of the calls under them."""
    usage = {"gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 300}
    with ledger.run("triage"):
        logfire_span("some.framework", {**attributes, **usage})
    processor.force_flush()
    ledger.flush()
    assert [] == calls_of(ledger)


def test_spans_that_cannot_be_model_calls_are_not_followed(
    ledger: Ledger,
    processor: GenAISpanProcessor,
    patch: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Server spans and spans of other instrumentations (HTTP, databases) never fill
    what the processor follows, even when they never end."""
    monkeypatch.setattr(otel, "_MAX_OPEN", 10)
    tracer = global_provider().get_tracer("some.web.framework")
    leaked = [tracer.start_span("GET /tickets", kind=SpanKind.SERVER) for _ in range(10)]
    leaked += [
        tracer.start_span("SELECT", kind=SpanKind.CLIENT, attributes={"db.system": "postgresql"})
        for _ in range(10)
    ]
    patch(openllmetry)
    with ledger.run("triage") as run:
        chat(sync_client(answer))
    assert run.id == only_call(ledger, processor)["run_id"]
    assert "never ended" not in caplog.text
    for span in leaked:
        span.end()


def test_when_too_many_spans_never_end_the_oldest_is_forgotten(
    ledger: Ledger,
    processor: GenAISpanProcessor,
    patch: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Spans that may be calls and never end make room for new ones, with one warning:
    calls are still recorded."""
    monkeypatch.setattr(otel, "_MAX_OPEN", 10)
    tracer = global_provider().get_tracer("some.instrumentation")
    leaked = [tracer.start_span("long-lived") for _ in range(20)]
    patch(openllmetry)
    with ledger.run("triage") as run:
        chat(sync_client(answer))
        chat(sync_client(answer))
    ledger.flush()
    processor.force_flush()
    ledger.flush()
    assert [run.id, run.id] == [c["run_id"] for c in calls_of(ledger)]
    assert 1 == caplog.text.count("never ended")
    for span in leaked:
        span.end()


@pytest.mark.parametrize("bad", [-5, 2_000_000_000, "lots", 1.5])
def test_a_span_with_impossible_counts_is_logged_once_and_dropped(
    ledger: Ledger,
    processor: GenAISpanProcessor,
    caplog: pytest.LogCaptureFixture,
    bad: Any,
) -> None:
    attributes = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": bad,
        "gen_ai.usage.output_tokens": 3,
    }
    with caplog.at_level(logging.DEBUG, logger="tokenledger"), ledger.run("triage"):
        logfire_span("some.instrumentation", attributes)  # never raises into the caller
        logfire_span("some.instrumentation", attributes)
    processor.force_flush()
    ledger.flush()
    assert [] == calls_of(ledger)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert 1 == len(warnings)
    assert "input_tokens" in warnings[0].getMessage()


def test_a_model_with_no_price_is_recorded_with_no_cost(
    ledger: Ledger, processor: GenAISpanProcessor
) -> None:
    with pytest.warns(UnpricedModelWarning), ledger.run("triage"):
        logfire_span(
            "some.instrumentation",
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": "acme-private-7b",
                "gen_ai.usage.input_tokens": 10,
                "gen_ai.usage.output_tokens": 20,
            },
        )
        processor.force_flush()
    call = only_call(ledger, processor)
    assert (None, 10, 20) == (call["cost_usd"], call["input_tokens"], call["output_tokens"])


# -- budgets, timing, setup -------------------------------------------------------------


def test_a_recorded_call_counts_toward_budget_spend(
    ledger: Ledger, processor: GenAISpanProcessor, patch: Callable[..., None]
) -> None:
    """Seen only after it was sent, so never refused, but its cost is spent."""
    ledger.set_budget("global", usd="1.00", per="day")
    patch(openllmetry)
    with ledger.run("triage"):
        chat(sync_client(answer))
    processor.force_flush()
    ledger.flush()
    assert [CACHED_COST] == [b.spent_usd for b in ledger.budgets()]


def test_a_held_call_is_recorded_when_its_grace_runs_out(
    ledger: Ledger, patch: Callable[..., None]
) -> None:
    """While tokenledger capture is active a foreign call waits for tokenledger's own
    record of it; none comes for an uncaptured call, so it is recorded after the grace."""
    quick = GenAISpanProcessor(grace_seconds=0.05)
    _FORWARD.target = quick
    try:
        patch(openllmetry)
        with ledger.run("triage") as run:
            chat(sync_client(answer))
            deadline = time.monotonic() + 5
            while run.calls == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert 1 == run.calls
    finally:
        _FORWARD.target = None
        quick.shutdown()


def test_instrument_adds_a_processor_to_an_sdk_provider(ledger: Ledger) -> None:
    provider = TracerProvider()
    added = instrument(provider, ledger=ledger, grace_seconds=0)
    tracer = provider.get_tracer("x")
    with ledger.run("triage"), tracer.start_as_current_span("chat gpt-4o-mini") as span:
        span.set_attributes(
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": "gpt-4o-mini",
                "gen_ai.usage.input_tokens": 1200,
                "gen_ai.usage.output_tokens": 300,
            }
        )
    assert Decimal("0.00036") == only_call(ledger, added)["cost_usd"]
    provider.shutdown()


def test_instrument_refuses_a_provider_that_is_not_the_sdk() -> None:
    with pytest.raises(TypeError, match="TracerProvider"):
        instrument(trace.NoOpTracerProvider())  # type: ignore[arg-type]


def test_a_missing_sdk_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    monkeypatch.delitem(sys.modules, "tokenledger.integrations.otel")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'tokenledger\[otel\]'") as e:
        importlib.import_module("tokenledger.integrations.otel")
    assert "opentelemetry.sdk.trace" == e.value.name
