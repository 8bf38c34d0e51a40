"""Capture of real litellm calls (``mock_response=``, offline), priced and attributed.

Prices are litellm's bundled map; the hand-computed figures are in docs/internals.md:
gpt-4o-mini is $0.15 / $0.60 per million input / output tokens, cache reads $0.075;
claude-sonnet-4-5 is $3 / $15, cache writes $3.75, cache reads $0.30.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from decimal import Decimal
from typing import Any

import litellm
import pytest
from helpers import calls_of, runs_by_name
from litellm.integrations.custom_logger import CustomLogger

import tokenledger as tl
from tokenledger import BudgetExceeded, Ledger, _litellm
from tokenledger.testing import mock_response

MESSAGES = [{"role": "user", "content": "Summarise the ticket in one line."}]


def only_call(ledger: Ledger) -> dict[str, Any]:
    ledger.flush()
    calls = calls_of(ledger)
    assert 1 == len(calls), calls
    return calls[0]


def test_capture_hooks_exist_in_the_installed_litellm(ledger: Ledger) -> None:
    """Fails loudly if a litellm upgrade moves the internal interception points."""
    import litellm.utils

    assert _litellm.installed()
    assert litellm.utils.function_setup is _litellm._function_setup
    assert litellm.utils.update_response_metadata is _litellm._update_response_metadata


def test_completion_in_a_run_is_recorded_and_priced(ledger: Ledger) -> None:
    with ledger.run("triage") as run:
        response = litellm.completion(
            model="gpt-4o-mini", messages=MESSAGES, mock_response="Printer jam.", max_tokens=50
        )
    assert "Printer jam." == response.choices[0].message.content
    call = only_call(ledger)
    assert (run.id, run.id) == (call["run_id"], call["root_run_id"])
    assert ("chat", "openai", "gpt-4o-mini") == (
        call["operation"],
        call["provider"],
        call["requested_model"],
    )
    assert (10, 20, "ok", False) == (
        call["input_tokens"],
        call["output_tokens"],
        call["status"],
        call["streamed"],
    )
    # 10 x $0.15/M + 20 x $0.60/M
    assert Decimal("0.0000135") == call["cost_usd"]
    assert ("local", 50) == (call["cost_source"], call["max_tokens"])
    assert call["price_id"]
    assert ["stop"] == call["finish_reasons"]
    assert call["litellm_call_id"]
    assert call["latency_ms"] >= 0
    assert Decimal("0.0000135") == run.cost_usd


def test_cached_and_reasoning_tokens_are_priced_at_their_own_rates(ledger: Ledger) -> None:
    with ledger.run("r"):
        litellm.completion(
            model="gpt-4o-mini",
            messages=MESSAGES,
            mock_response=mock_response(
                prompt_tokens=1200, cached_tokens=1000, completion_tokens=300, reasoning_tokens=100
            ),
        )
    call = only_call(ledger)
    assert (1200, 1000, 300, 100) == (
        call["input_tokens"],
        call["cache_read_tokens"],
        call["output_tokens"],
        call["reasoning_tokens"],
    )
    # 200 x 0.15/M + 1000 x 0.075/M + 300 x 0.60/M
    assert Decimal("0.000285") == call["cost_usd"]


def test_anthropic_cache_writes_and_reads_are_priced(ledger: Ledger) -> None:
    with ledger.run("r"):
        litellm.completion(
            model="claude-sonnet-4-5",
            messages=MESSAGES,
            mock_response=mock_response(
                prompt_tokens=1000,
                cache_creation_tokens=500,
                cached_tokens=200,
                completion_tokens=100,
            ),
        )
    call = only_call(ledger)
    assert ("anthropic", 1000, 500, 200) == (
        call["provider"],
        call["input_tokens"],
        call["cache_write_tokens"],
        call["cache_read_tokens"],
    )
    # 300 x 3/M + 500 x 3.75/M + 200 x 0.30/M + 100 x 15/M
    assert Decimal("0.004335") == call["cost_usd"]


async def test_acompletion_is_recorded(ledger: Ledger) -> None:
    async with ledger.run("async") as run:
        await litellm.acompletion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
    call = only_call(ledger)
    assert (run.id, 10, 20) == (call["run_id"], call["input_tokens"], call["output_tokens"])


def test_streamed_call_without_provider_usage_is_counted_and_marked_estimated(
    ledger: Ledger,
) -> None:
    with ledger.run("stream") as run:
        stream = litellm.completion(
            model="gpt-4o-mini",
            messages=MESSAGES,
            mock_response="The printer on floor two is jammed again.",
            stream=True,
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert "The printer on floor two is jammed again." == text
    call = only_call(ledger)
    assert (run.id, True, True, "ok") == (
        call["run_id"],  # recorded in the caller's context, not litellm's logging thread
        call["streamed"],
        call["usage_estimated"],
        call["status"],
    )
    assert call["input_tokens"] > 0
    assert call["output_tokens"] > 0
    assert call["cost_usd"] > 0


def test_streamed_call_with_usage_on_the_final_chunk_is_exact(ledger: Ledger) -> None:
    with ledger.run("stream"):
        stream = litellm.completion(
            model="gpt-4o-mini",
            messages=MESSAGES,
            mock_response="Jammed.",
            stream=True,
            stream_options={"include_usage": True},
        )
        last = None
        for chunk in stream:
            last = chunk
    call = only_call(ledger)
    assert last is not None
    assert (False, last.usage.prompt_tokens, last.usage.completion_tokens) == (
        call["usage_estimated"],
        call["input_tokens"],
        call["output_tokens"],
    )


async def test_async_stream_is_recorded(ledger: Ledger) -> None:
    async with ledger.run("astream") as run:
        stream = await litellm.acompletion(
            model="gpt-4o-mini", messages=MESSAGES, mock_response="one two three", stream=True
        )
        parts = [chunk.choices[0].delta.content or "" async for chunk in stream]
    assert "one two three" == "".join(parts)
    call = only_call(ledger)
    assert (run.id, True, "ok") == (call["run_id"], call["streamed"], call["status"])
    assert call["output_tokens"] > 0


def test_a_stream_abandoned_with_break_is_still_recorded(ledger: Ledger) -> None:
    with ledger.run("abandon") as run:
        stream = litellm.completion(
            model="gpt-4o-mini",
            messages=MESSAGES,
            mock_response="a long answer that the caller stops reading after one chunk",
            stream=True,
        )
        for _chunk in stream:
            break
    call = only_call(ledger)
    assert (run.id, "abandoned", True) == (call["run_id"], call["status"], call["usage_estimated"])
    assert call["input_tokens"] > 0
    assert 1 == run.calls


def test_embedding_and_aembedding_are_recorded(ledger: Ledger) -> None:
    with ledger.run("embed"):
        litellm.embedding(model="text-embedding-3-small", input=["hi"], mock_response=[0.1, 0.2])
        asyncio.run(
            litellm.aembedding(
                model="text-embedding-3-small", input=["hi"], mock_response=[0.1, 0.2]
            )
        )
    ledger.flush()
    calls = calls_of(ledger)
    assert ["embeddings", "embeddings"] == [c["operation"] for c in calls]
    assert [10, 10] == [c["input_tokens"] for c in calls]
    # 10 x $0.02/M
    assert [Decimal("0.0000002")] * 2 == [c["cost_usd"] for c in calls]


def test_failed_call_is_recorded_and_its_exception_propagates(ledger: Ledger) -> None:
    error = litellm.RateLimitError("slow down", llm_provider="openai", model="gpt-4o-mini")
    with pytest.raises(litellm.RateLimitError), ledger.run("fails") as run:
        litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response=error)
    call = only_call(ledger)
    assert ("error", "RateLimitError", run.id) == (
        call["status"],
        call["error_type"],
        call["run_id"],
    )
    assert (0, 0) == (call["input_tokens"], call["output_tokens"])
    ledger.flush()
    stored = runs_by_name(ledger)["fails"]
    assert ("error", "RateLimitError", 1, 1) == (
        stored["status"],
        stored["error_type"],
        stored["calls"],
        stored["failed_calls"],
    )


def test_each_fallback_attempt_is_one_row(ledger: Ledger) -> None:
    error = litellm.RateLimitError("down", llm_provider="openai", model="gpt-4o-mini")
    with pytest.raises(Exception, match="fallback"), ledger.run("fallbacks"):
        litellm.completion(
            model="gpt-4o-mini", messages=MESSAGES, mock_response=error, fallbacks=["gpt-4o"]
        )
    ledger.flush()
    calls = calls_of(ledger)
    assert ["gpt-4o", "gpt-4o-mini"] == sorted(c["requested_model"] for c in calls)
    assert {"error"} == {c["status"] for c in calls}


def test_a_failure_reported_twice_is_recorded_once(ledger: Ledger) -> None:
    """litellm has fired failure handlers twice for one call in several releases."""
    pendings: list[Any] = []
    original = _litellm._watch_failures

    def spy(logging_obj: Any, pending: Any) -> None:
        pendings.append(pending)
        original(logging_obj, pending)

    error = litellm.APIError(500, "boom", llm_provider="openai", model="gpt-4o-mini")
    _litellm._watch_failures = spy
    try:
        with pytest.raises(litellm.APIError), ledger.run("dup"):
            litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response=error)
    finally:
        _litellm._watch_failures = original
    (pending,) = pendings
    pending.on_failure(error)  # the duplicate
    assert "error" == only_call(ledger)["status"]


def test_calls_outside_runs_are_recorded_without_a_run(ledger: Ledger) -> None:
    litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="free")
    call = only_call(ledger)
    assert (None, None, 10) == (call["run_id"], call["root_run_id"], call["input_tokens"])


def test_calls_outside_runs_can_be_left_out(db_url: str) -> None:
    with Ledger(db_url, record_calls_outside_runs=False) as ledger:
        litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="free")
        with ledger.run("inside"):
            litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="paid")
        ledger.flush()
        assert 1 == len(calls_of(ledger))


def test_user_callbacks_keep_working(ledger: Ledger) -> None:
    successes: list[str] = []

    def on_success(kwargs: Any, response: Any, start: Any, end: Any) -> None:
        successes.append(kwargs.get("model"))

    litellm.success_callback.append(on_success)
    try:
        with ledger.run("r"):
            litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="x")
        for _ in range(100):
            if successes:
                break
            threading.Event().wait(0.05)
    finally:
        litellm.success_callback.remove(on_success)
    assert "gpt-4o-mini" in successes
    assert "ok" == only_call(ledger)["status"]


def test_an_unpriced_model_gets_null_cost_and_keeps_its_tokens(ledger: Ledger) -> None:
    with pytest.warns(UserWarning, match="acme-finetune-v9"), ledger.run("r") as run:
        litellm.completion(
            model="openai/acme-finetune-v9",
            messages=MESSAGES,
            mock_response=mock_response(model="acme-finetune-v9", prompt_tokens=77),
        )
    call = only_call(ledger)
    assert (None, None, 77) == (call["cost_usd"], call["price_id"], call["input_tokens"])
    assert (1, Decimal(0)) == (run.record.unpriced_calls, run.cost_usd)


def test_a_user_price_prices_a_private_model(ledger: Ledger) -> None:
    ledger.set_price("acme-private-1", input_per_million="2", output_per_million="8")
    with ledger.run("r"):
        litellm.completion(
            model="openai/acme-private-1",
            messages=MESSAGES,
            mock_response=mock_response(
                model="acme-private-1", prompt_tokens=1000, completion_tokens=500
            ),
        )
    # 1000 x 2/M + 500 x 8/M
    assert Decimal("0.006") == only_call(ledger)["cost_usd"]


def test_an_exception_before_the_request_sends_nothing(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interception point the budgets use: raising there means no request at all."""
    attempts: list[str] = []

    class Spy(CustomLogger):
        def log_pre_api_call(self, model: Any, messages: Any, kwargs: Any) -> None:
            attempts.append(model)

    def refuse(pending: Any, kwargs: Any) -> None:
        if pending.run is not None:
            raise BudgetExceeded("refused for the test")

    monkeypatch.setattr(ledger.recorder, "before_call", refuse)
    spy = Spy()
    litellm.callbacks.append(spy)
    try:
        with pytest.raises(BudgetExceeded), ledger.run("refused") as run:
            litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="x")
        litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="outside")
    finally:
        litellm.callbacks.remove(spy)
    assert ["gpt-4o-mini"] == attempts  # only the call made outside the run went out
    assert "budget_exceeded" == run.status


@pytest.mark.slow
def test_a_thousand_calls_across_fifty_runs_land_exactly_once(ledger: Ledger) -> None:
    run_ids = []
    for r in range(50):
        with ledger.run("bulk", tags={"batch": str(r)}) as run:
            run_ids.append(run.id)
            for _ in range(20):
                litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="x")
    assert ledger.flush()
    calls = calls_of(ledger)
    assert 1000 == len(calls) == len({c["id"] for c in calls})
    assert sorted(run_ids * 20) == sorted(c["run_id"] for c in calls)
    runs = [r for r in runs_by_name_all(ledger) if r["name"] == "bulk"]
    assert 50 == len(runs)
    assert {20} == {r["calls"] for r in runs}
    assert Decimal("0.0135") == sum(c["cost_usd"] for c in calls)


def runs_by_name_all(ledger: Ledger) -> list[dict[str, Any]]:
    from helpers import rows

    return rows(ledger, "runs")


def test_importing_tokenledger_does_not_import_litellm() -> None:
    code = "import sys, tokenledger; print('litellm' in sys.modules, 'openai' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    ).stdout.strip()
    assert "False False" == out


@pytest.mark.slow
def test_capture_switches_on_when_litellm_is_imported_after_the_ledger(tmp_path: Any) -> None:
    code = (
        "import tokenledger as tl\n"
        f"ledger = tl.Ledger('sqlite:///{tmp_path / 'l.db'}')\n"
        "import litellm\n"
        "from tokenledger import _litellm\n"
        "with ledger.run('late'):\n"
        "    litellm.completion(model='gpt-4o-mini', messages=[{'role':'user','content':'x'}],"
        " mock_response='y')\n"
        "print(_litellm.installed(), ledger.flush())\n"
    )
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout.strip()
    assert out.endswith("True True")


def test_module_level_configure_captures_calls(db_url: str) -> None:
    ledger = tl.configure(db_url)
    try:

        @tl.agent("configured")
        def ask() -> str:
            return str(
                litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="z")
                .choices[0]
                .message.content
            )

        assert "z" == ask()
        call = only_call(ledger)
        assert runs_by_name(ledger)["configured"]["id"] == call["run_id"]
    finally:
        ledger.close()


def test_a_cost_reported_by_the_provider_is_stored_with_its_source(ledger: Ledger) -> None:
    """OpenRouter bills per call and says so in `usage.cost`; that figure wins."""
    reply = mock_response(model="openai/gpt-4o-mini", prompt_tokens=100, completion_tokens=50)
    reply.usage.cost = 0.00042
    with ledger.run("openrouter"):
        litellm.completion(
            model="openrouter/openai/gpt-4o-mini", messages=MESSAGES, mock_response=reply
        )
    call = only_call(ledger)
    assert ("openrouter", Decimal("0.00042"), "provider", 100) == (
        call["provider"],
        call["cost_usd"],
        call["cost_source"],
        call["input_tokens"],
    )


def test_litellm_is_told_to_use_its_bundled_price_map() -> None:
    code = (
        "import os; os.environ.pop('LITELLM_LOCAL_MODEL_COST_MAP', None)\n"
        "import tokenledger\n"
        "print(os.environ.get('LITELLM_LOCAL_MODEL_COST_MAP'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert "True" == out


def test_configure_with_an_otlp_endpoint_sets_up_the_sdk_or_says_what_to_install(
    tmp_path: Any,
) -> None:
    code = (
        "import tokenledger as tl\n"
        "from opentelemetry import trace\n"
        "try:\n"
        f"    tl.configure('sqlite:///{tmp_path / 'l.db'}', otlp_endpoint='http://127.0.0.1:1')\n"
        "except ModuleNotFoundError as exc:\n"
        "    print('missing', exc)\n"
        "else:\n"
        "    print('sdk', type(trace.get_tracer_provider()).__module__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out in (
        "sdk opentelemetry.sdk.trace",
        "missing Exporting to OTLP needs the OpenTelemetry SDK and exporter: "
        "pip install 'tokenledger[otel]'",
    ), out
