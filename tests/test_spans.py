"""The OpenTelemetry span tree of a nested run, read back from an in-memory exporter."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import litellm
import pytest
from helpers import calls_of, runs_by_name
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tokenledger import Ledger
from tokenledger import semconv as sc
from tokenledger.testing import mock_response

MESSAGES = [{"role": "user", "content": "hello"}]


def by_name(exporter: InMemorySpanExporter) -> dict[str, Any]:
    return {span.name: span for span in exporter.get_finished_spans()}


def test_nested_run_produces_a_linked_span_tree(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    with ledger.run("planner", tags={"tenant": "acme"}) as root, ledger.run("researcher") as child:
        litellm.completion(
            model="gpt-4o-mini",
            messages=MESSAGES,
            max_tokens=64,
            mock_response=mock_response(
                model="gpt-4o-mini-2024-07-18",
                prompt_tokens=1200,
                cached_tokens=1000,
                completion_tokens=300,
                reasoning_tokens=100,
            ),
        )
    spans = by_name(span_exporter)
    assert {"invoke_agent planner", "invoke_agent researcher", "chat gpt-4o-mini"} == set(spans)
    root_span = spans["invoke_agent planner"]
    child_span = spans["invoke_agent researcher"]
    call_span = spans["chat gpt-4o-mini"]

    assert (SpanKind.INTERNAL, SpanKind.INTERNAL, SpanKind.CLIENT) == (
        root_span.kind,
        child_span.kind,
        call_span.kind,
    )
    assert root_span.parent is None or root_span.parent.span_id != child_span.context.span_id
    assert root_span.context.span_id == child_span.parent.span_id
    assert child_span.context.span_id == call_span.parent.span_id
    assert root_span.context.trace_id == call_span.context.trace_id

    assert {
        sc.GEN_AI_OPERATION_NAME: "invoke_agent",
        sc.GEN_AI_AGENT_NAME: "planner",
        sc.TL_RUN_ID: root.id,
        "tokenledger.tag.tenant": "acme",
        sc.TL_RUN_CALLS: 1,
    }.items() <= dict(root_span.attributes).items()
    assert child.id == child_span.attributes[sc.TL_RUN_ID]

    attrs = dict(call_span.attributes)
    assert {
        sc.GEN_AI_OPERATION_NAME: "chat",
        sc.GEN_AI_PROVIDER_NAME: "openai",
        sc.GEN_AI_REQUEST_MODEL: "gpt-4o-mini",
        sc.GEN_AI_REQUEST_MAX_TOKENS: 64,
        sc.GEN_AI_USAGE_INPUT_TOKENS: 1200,
        sc.GEN_AI_USAGE_OUTPUT_TOKENS: 300,
        sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: 1000,
        sc.GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS: 0,
        sc.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: 100,
        sc.GEN_AI_RESPONSE_FINISH_REASONS: ("stop",),
        sc.TL_COST_CURRENCY: "USD",
        sc.TL_RUN_ID: child.id,
    }.items() <= attrs.items()
    assert pytest.approx(0.000285) == attrs[sc.TL_COST_AMOUNT]
    assert "gpt-4o-mini-2024-07-18" == attrs[sc.GEN_AI_RESPONSE_MODEL]

    ledger.flush()
    (call,) = calls_of(ledger)
    assert (
        format(call_span.context.trace_id, "032x"),
        format(call_span.context.span_id, "016x"),
    ) == (
        call["trace_id"],
        call["span_id"],
    )
    stored = runs_by_name(ledger)
    assert format(root_span.context.span_id, "016x") == stored["planner"]["span_id"]


def test_a_failed_call_span_carries_error_type(
    ledger: Ledger, span_exporter: InMemorySpanExporter
) -> None:
    error = litellm.RateLimitError("slow", llm_provider="openai", model="gpt-4o-mini")
    with pytest.raises(litellm.RateLimitError), ledger.run("r"):
        litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response=error)
    spans = by_name(span_exporter)
    call_span = spans["chat gpt-4o-mini"]
    assert "RateLimitError" == call_span.attributes[sc.ERROR_TYPE]
    assert StatusCode.ERROR == call_span.status.status_code
    run_span = spans["invoke_agent r"]
    assert StatusCode.ERROR == run_span.status.status_code


@pytest.mark.slow
def test_without_an_sdk_everything_still_lands_in_sql(tmp_path: Any) -> None:
    """No SDK configured: spans are no-ops, rows carry no trace ids, nothing is lost."""
    code = (
        "import litellm, tokenledger as tl, sqlalchemy as sa\n"
        "from tokenledger._storage import metadata\n"
        f"ledger = tl.Ledger('sqlite:///{tmp_path / 'l.db'}')\n"
        "with ledger.run('no-sdk'):\n"
        "    litellm.completion(model='gpt-4o-mini', messages=[{'role':'user','content':'x'}],"
        " mock_response='y')\n"
        "ledger.flush()\n"
        "with ledger.engine.connect() as c:\n"
        "    row = c.execute(sa.select(metadata.tables['calls'])).one()._mapping\n"
        "print(row['trace_id'], row['input_tokens'])\n"
    )
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout.strip()
    assert "None 10" == out
