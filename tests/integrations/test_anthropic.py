"""The Anthropic SDK integration, against the real SDK with its network replaced offline.

Every client here talks to a ``MockTransport`` that answers with Anthropic's wire
formats: Messages JSON, and SSE events (``message_start`` carrying the input and cache
usage, ``content_block_delta``, ``message_delta`` carrying the output usage,
``message_stop``). Prices are litellm's bundled map: claude-sonnet-4-5 is $3 / $15 per
million input / output tokens, $3.75 for cache writes and $0.30 for cache reads;
claude-haiku-4-5 is $1 / $5.
"""

from __future__ import annotations

import gc
import importlib
import sys
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import anthropic
import pytest
from helpers import calls_of
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from wire import MESSAGES, Server, call_span, only_call, sse

from tokenledger import Budget, BudgetExceeded, Ledger, LedgerError
from tokenledger.integrations import anthropic as tl_anthropic

# anthropic>=2 sends its requests with httpx2, a fork of httpx; older releases use httpx.
try:
    import httpx2 as http
except ModuleNotFoundError:  # pragma: no cover - depends on the installed SDK
    import httpx as http  # type: ignore[no-redef]

# The SDK warns that claude-sonnet-4-5 nears its end of life; its price is the one the
# hand-computed figures use, so it stays.
pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")

SYSTEM = "You triage support tickets."
SERVED = "claude-sonnet-4-5-20250929"

# 300 uncached input + 500 cache write + 200 cache read + 100 output:
# 300 x $3/M + 500 x $3.75/M + 200 x $0.30/M + 100 x $15/M
# = 0.0009 + 0.001875 + 0.00006 + 0.0015
CACHED_COST = Decimal("0.004335")
START_USAGE = {
    "input_tokens": 300,
    "cache_creation_input_tokens": 500,
    "cache_read_input_tokens": 200,
    "cache_creation": {"ephemeral_5m_input_tokens": 500, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 1,
    "service_tier": "standard",
}
USAGE = {**START_USAGE, "output_tokens": 100}


# -- the provider's wire formats -------------------------------------------------------


def message(usage: dict[str, Any] = USAGE, model: str = SERVED) -> dict[str, Any]:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "Printer jam."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }


def text_delta(text: str) -> dict[str, Any]:
    return {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": text},
    }


def message_events(*, error: bool = False, model: str = SERVED) -> bytes:
    start = {**message(START_USAGE, model), "content": [], "stop_reason": None}
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        text_delta("Printer"),
    ]
    if error:
        events.append(
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        )
        return sse(*events, named=True)
    events += [
        text_delta(" jam."),
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 100},
        },
        {"type": "message_stop"},
    ]
    return sse(*events, named=True)


def json_answer(body: dict[str, Any], status: int = 200) -> Any:
    return http.Response(status, json=body)


def sse_answer(content: bytes) -> Any:
    return http.Response(200, headers={"content-type": "text/event-stream"}, content=content)


def sync_client(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="sk-ant-test",
        max_retries=0,
        http_client=http.Client(transport=http.MockTransport(server)),
    )


def async_client(server: Server) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key="sk-ant-test",
        max_retries=0,
        http_client=http.AsyncClient(transport=http.MockTransport(server)),
    )


# -- fixtures and readers ---------------------------------------------------------------


@pytest.fixture
def instrumented() -> Iterator[None]:
    """Every Anthropic client recorded, for this test only."""
    tl_anthropic.instrument()
    yield
    tl_anthropic.uninstrument()


def tokens(call: dict[str, Any]) -> tuple[int, int, int, int]:
    return (
        call["input_tokens"],
        call["cache_write_tokens"],
        call["cache_read_tokens"],
        call["output_tokens"],
    )


def create(client: Any, **extra: Any) -> Any:
    """``messages.create`` with the test's prompt; ``extra`` adds or replaces arguments."""
    arguments = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": SYSTEM,
        "messages": MESSAGES,
        **extra,
    }
    return client.messages.create(**arguments)


# -- messages ---------------------------------------------------------------------------


@pytest.mark.usefixtures("instrumented")
def test_a_message_is_recorded_with_cache_writes_and_reads_at_their_own_rates(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    server = Server(json_answer(message()))
    with ledger.run("triage") as run:
        response = create(sync_client(server))
    assert "Printer jam." == response.content[0].text
    call = only_call(ledger)
    assert (run.id, "chat", "anthropic", "claude-sonnet-4-5", SERVED) == (
        call["run_id"],
        call["operation"],
        call["provider"],
        call["requested_model"],
        call["model"],
    )
    # Anthropic's input_tokens (300) excludes the cache; the ledger's includes it.
    assert (1000, 500, 200, 100) == tokens(call)
    assert ("ok", False, False, ["end_turn"], 1024) == (
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
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-sonnet-4-5",
        "gen_ai.response.model": SERVED,
        "gen_ai.request.max_tokens": 1024,
        "gen_ai.usage.input_tokens": 1000,  # includes cache writes and reads
        "gen_ai.usage.cache_creation.input_tokens": 500,
        "gen_ai.usage.cache_read.input_tokens": 200,
        "gen_ai.usage.output_tokens": 100,
        "tokenledger.usage.cost.amount": float(CACHED_COST),
        "tokenledger.run.id": run.id,
    }.items() <= dict(attributes).items()


@pytest.mark.usefixtures("instrumented")
def test_a_message_with_a_thinking_breakdown_keeps_its_cache_tokens(ledger: Ledger) -> None:
    """Extended thinking adds ``output_tokens_details``; the cache must still count."""
    usage = {**USAGE, "output_tokens_details": {"thinking_tokens": 40}}
    server = Server(json_answer(message(usage)))
    with ledger.run("triage"):
        create(sync_client(server))
    call = only_call(ledger)
    assert (1000, 500, 200, 100) == tokens(call)
    assert CACHED_COST == call["cost_usd"]


@pytest.mark.usefixtures("instrumented")
def test_a_stream_is_priced_from_message_start_and_message_delta(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    server = Server(sse_answer(message_events()))
    with ledger.run("triage"):
        events = list(create(sync_client(server), stream=True))
    assert "message_stop" == events[-1].type
    call = only_call(ledger)
    assert (1000, 500, 200, 100) == tokens(call)
    assert ("ok", True, False, ["end_turn"]) == (
        call["status"],
        call["streamed"],
        call["usage_estimated"],
        call["finish_reasons"],
    )
    assert CACHED_COST == call["cost_usd"]
    attributes = call_span(span_exporter).attributes
    assert attributes is not None
    assert (True, 1000, 500, 200) == (
        attributes["tokenledger.call.streamed"],
        attributes["gen_ai.usage.input_tokens"],
        attributes["gen_ai.usage.cache_creation.input_tokens"],
        attributes["gen_ai.usage.cache_read.input_tokens"],
    )


@pytest.mark.usefixtures("instrumented")
def test_the_stream_helper_is_recorded_once(ledger: Ledger) -> None:
    server = Server(sse_answer(message_events()))
    client = sync_client(server)
    with ledger.run("triage"):
        manager = client.messages.stream(
            model="claude-sonnet-4-5", max_tokens=1024, messages=MESSAGES
        )
        assert [] == server.requests  # nothing is sent before `with`
        with manager as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
    assert ("Printer jam.", 100) == (text, final.usage.output_tokens)
    call = only_call(ledger)
    assert ("ok", True, CACHED_COST) == (call["status"], call["streamed"], call["cost_usd"])


@pytest.mark.usefixtures("instrumented")
def test_a_stream_closed_early_is_recorded_as_abandoned_with_its_input(ledger: Ledger) -> None:
    server = Server(sse_answer(message_events()))
    with (
        ledger.run("triage"),
        sync_client(server).messages.stream(
            model="claude-sonnet-4-5", max_tokens=1024, messages=MESSAGES
        ) as stream,
    ):
        for event in stream:
            if event.type == "content_block_delta":
                break
    call = only_call(ledger)
    assert ("abandoned", True, True) == (call["status"], call["streamed"], call["usage_estimated"])
    # message_start's counts are the provider's; the output is counted from "Printer".
    assert (1000, 500, 200) == tokens(call)[:3]
    assert 1 <= call["output_tokens"] <= 2


@pytest.mark.usefixtures("instrumented")
def test_a_stream_dropped_unread_is_recorded_as_abandoned(ledger: Ledger) -> None:
    server = Server(sse_answer(message_events()))
    with ledger.run("triage") as run:
        stream = create(sync_client(server), stream=True)
        del stream
        gc.collect()
    call = only_call(ledger)
    assert ("abandoned", run.id) == (call["status"], call["run_id"])
    assert call["input_tokens"] > 0  # counted from the prompt: no event was read


@pytest.mark.usefixtures("instrumented")
def test_parse_is_recorded(ledger: Ledger) -> None:
    server = Server(json_answer(message()))
    with ledger.run("triage"):
        sync_client(server).messages.parse(
            model="claude-sonnet-4-5", max_tokens=1024, messages=MESSAGES
        )
    assert CACHED_COST == only_call(ledger)["cost_usd"]


@pytest.mark.usefixtures("instrumented")
def test_a_raw_response_is_recorded_and_still_parses(ledger: Ledger) -> None:
    server = Server(json_answer(message()))
    with ledger.run("triage"):
        raw = sync_client(server).messages.with_raw_response.create(
            model="claude-sonnet-4-5", max_tokens=1024, messages=MESSAGES
        )
    assert "Printer jam." == raw.parse().content[0].text
    assert CACHED_COST == only_call(ledger)["cost_usd"]


@pytest.mark.usefixtures("instrumented")
def test_the_beta_messages_api_is_recorded(ledger: Ledger) -> None:
    server = Server(json_answer(message()))
    with ledger.run("triage"):
        sync_client(server).beta.messages.create(
            model="claude-sonnet-4-5", max_tokens=1024, messages=MESSAGES
        )
    assert CACHED_COST == only_call(ledger)["cost_usd"]


async def test_async_messages_and_streams_are_recorded(ledger: Ledger, instrumented: None) -> None:
    server = Server(
        json_answer(message()), sse_answer(message_events()), sse_answer(message_events())
    )
    client = async_client(server)
    async with ledger.run("triage") as run:
        await create(client)
        async for _event in await create(client, stream=True):
            pass
        async with client.messages.stream(
            model="claude-sonnet-4-5", max_tokens=1024, messages=MESSAGES
        ) as stream:
            await stream.get_final_message()
    ledger.flush()
    calls = calls_of(ledger)
    assert [(False, "ok"), (True, "ok"), (True, "ok")] == sorted(
        (c["streamed"], c["status"]) for c in calls
    )
    assert [CACHED_COST] * 3 == [c["cost_usd"] for c in calls]
    assert 3 * CACHED_COST == run.cost_usd


async def test_an_async_stream_closed_early_is_recorded_as_abandoned(
    ledger: Ledger, instrumented: None
) -> None:
    server = Server(sse_answer(message_events()))
    async with (
        ledger.run("triage"),
        async_client(server).messages.stream(
            model="claude-sonnet-4-5", max_tokens=1024, messages=MESSAGES
        ) as stream,
    ):
        async for _event in stream:
            break
    call = only_call(ledger)
    assert ("abandoned", True) == (call["status"], call["usage_estimated"])


# -- budgets ----------------------------------------------------------------------------


def _enter_stream_helper(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=1024, messages=MESSAGES):
        pass


@pytest.mark.usefixtures("instrumented")
@pytest.mark.parametrize(
    "send",
    [
        pytest.param(create, id="create"),
        pytest.param(lambda c: create(c, stream=True), id="create-stream"),
        pytest.param(_enter_stream_helper, id="stream-helper"),
    ],
)
def test_a_budget_refusal_sends_no_request(
    ledger: Ledger, send: Callable[[anthropic.Anthropic], Any]
) -> None:
    server = Server(json_answer(message()))
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
    server = Server(json_answer(message()))
    client = async_client(server)
    with pytest.raises(BudgetExceeded):
        async with ledger.run("capped", budget=Budget(usd="0.000001")):
            await create(client)
    with pytest.raises(BudgetExceeded):
        async with (
            ledger.run("capped", budget=Budget(usd="0.000001")),
            client.messages.stream(model="claude-sonnet-4-5", max_tokens=1024, messages=MESSAGES),
        ):
            pass
    assert [] == server.requests


async def test_a_call_whose_budget_cannot_be_checked_is_not_sent(
    ledger: Ledger, instrumented: None
) -> None:
    """Budgets fail closed: no reservation, no request."""
    ledger.set_budget("global", usd="1")
    with ledger.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE reservations")
    server = Server(json_answer(message()))
    with pytest.raises(LedgerError, match="budgets fail closed"):
        async with ledger.run("triage"):
            await create(async_client(server))
    assert [] == server.requests


# A sonnet call capped at 4096 output tokens may cost $0.06, past $0.03; haiku's fits.
DOWNGRADE = Budget(usd="0.03", action="downgrade", downgrade_to=["claude-haiku-4-5"])


@pytest.mark.usefixtures("instrumented")
def test_a_downgrade_budget_sends_the_cheaper_model(ledger: Ledger) -> None:
    server = Server(json_answer(message(model="claude-haiku-4-5-20251001")))
    with ledger.run("thrifty", budget=DOWNGRADE):
        create(sync_client(server), max_tokens=4096)
    assert "claude-haiku-4-5" == server.body()["model"]
    call = only_call(ledger)
    # 300 x $1/M + 500 x $1.25/M + 200 x $0.10/M + 100 x $5/M
    assert ("claude-sonnet-4-5", "claude-haiku-4-5-20251001", Decimal("0.001445")) == (
        call["requested_model"],
        call["model"],
        call["cost_usd"],
    )


@pytest.mark.usefixtures("instrumented")
def test_a_downgrade_budget_applies_to_the_stream_helper(ledger: Ledger) -> None:
    server = Server(sse_answer(message_events(model="claude-haiku-4-5-20251001")))
    with (
        ledger.run("thrifty", budget=DOWNGRADE),
        sync_client(server).messages.stream(
            model="claude-sonnet-4-5", max_tokens=4096, messages=MESSAGES
        ) as stream,
    ):
        stream.until_done()
    assert "claude-haiku-4-5" == server.body()["model"]
    assert Decimal("0.001445") == only_call(ledger)["cost_usd"]


async def test_a_downgrade_budget_applies_to_the_async_stream_helper(
    ledger: Ledger, instrumented: None
) -> None:
    server = Server(sse_answer(message_events(model="claude-haiku-4-5-20251001")))
    async with (
        ledger.run("thrifty", budget=DOWNGRADE),
        async_client(server).messages.stream(
            model="claude-sonnet-4-5", max_tokens=4096, messages=MESSAGES
        ) as stream,
    ):
        await stream.until_done()
    assert "claude-haiku-4-5" == server.body()["model"]
    assert Decimal("0.001445") == only_call(ledger)["cost_usd"]


# -- failures ---------------------------------------------------------------------------


@pytest.mark.usefixtures("instrumented")
def test_an_http_error_is_recorded_and_raised_unchanged(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": "Bad"}}
    server = Server(json_answer(error, status=400))
    with ledger.run("triage"), pytest.raises(anthropic.BadRequestError) as raised:
        create(sync_client(server))
    assert 400 == raised.value.status_code
    call = only_call(ledger)
    assert ("error", "BadRequestError") == (call["status"], call["error_type"])
    attributes = call_span(span_exporter).attributes
    assert attributes is not None
    assert "BadRequestError" == attributes["error.type"]


@pytest.mark.usefixtures("instrumented")
def test_an_error_event_inside_a_stream_is_recorded_with_the_input_used(ledger: Ledger) -> None:
    server = Server(sse_answer(message_events(error=True)))
    with ledger.run("triage"), pytest.raises(anthropic.APIStatusError) as raised:
        for _event in create(sync_client(server), stream=True):
            pass
    call = only_call(ledger)
    assert ("error", type(raised.value).__name__, True) == (
        call["status"],
        call["error_type"],
        call["streamed"],
    )
    assert (1000, 500, 200) == tokens(call)[:3]


async def test_an_async_http_error_is_recorded(ledger: Ledger, instrumented: None) -> None:
    error = {"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down"}}
    server = Server(json_answer(error, status=429))
    with pytest.raises(anthropic.RateLimitError):
        async with ledger.run("triage"):
            await create(async_client(server))
    call = only_call(ledger)
    assert ("error", "RateLimitError") == (call["status"], call["error_type"])


# -- switching it on and off ------------------------------------------------------------


def test_one_client_can_be_instrumented_alone(ledger: Ledger) -> None:
    server = Server(json_answer(message()), json_answer(message()))
    recorded = tl_anthropic.instrument(sync_client(server))
    other = sync_client(server)
    try:
        with ledger.run("triage"):
            create(recorded)
            create(other)
    finally:
        tl_anthropic.uninstrument(recorded)
    assert 2 == len(server.requests)
    assert CACHED_COST == only_call(ledger)["cost_usd"]


def test_instrumenting_twice_and_per_client_still_records_once(ledger: Ledger) -> None:
    server = Server(json_answer(message()))
    client = sync_client(server)
    tl_anthropic.instrument()
    tl_anthropic.instrument()
    tl_anthropic.instrument(client)
    try:
        with ledger.run("triage"):
            create(client)
    finally:
        tl_anthropic.uninstrument()
    only_call(ledger)


def test_uninstrument_restores_the_sdk() -> None:
    from anthropic.resources.messages import Messages

    originals = {name: Messages.__dict__[name] for name in ("create", "parse", "stream")}
    client = sync_client(Server())
    tl_anthropic.instrument()
    tl_anthropic.instrument(client)
    assert originals["stream"] is not Messages.__dict__["stream"]
    tl_anthropic.uninstrument()
    assert originals == {name: Messages.__dict__[name] for name in originals}
    assert not {"create", "parse", "stream"} & set(vars(client.messages))


def test_instrument_rejects_something_that_is_not_a_client() -> None:
    with pytest.raises(TypeError, match=r"`client` is 'sk-ant'; instrument\(\) takes an anthropic"):
        tl_anthropic.instrument("sk-ant")


def test_a_missing_sdk_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "anthropic", None)
    monkeypatch.delitem(sys.modules, "tokenledger.integrations.anthropic")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'tokenledger\[anthropic\]'") as e:
        importlib.import_module("tokenledger.integrations.anthropic")
    assert "anthropic" == e.value.name
