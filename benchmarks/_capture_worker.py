"""One process of the capture benchmark: one family of variants, interleaved A/B.

    python -m benchmarks._capture_worker FAMILY [--runs N] [--calls-per-run 50] ...

Each family runs in its own process so peers never see each other (several set a global
tracer provider or patch litellm). Inside the process every variant, the bare baseline
included, runs once per round in a rotating order. A block is ``--runs`` agent runs of
``--calls-per-run`` ``litellm.completion(mock_response=...)`` calls; it ends by draining
litellm's logging thread pool, the ledger's writer and any span processor, inside the
timed region, so background work is charged to the block that caused it. The last line
printed is a JSON document for the parent process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

# Before litellm is imported: the bundled price map, no network, and a logging backlog
# large enough that litellm never silently drops a slow peer's callbacks (its executor
# drops tasks past the cap, which would make a slow peer look cheap).
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("LOGGING_EXECUTOR_MAX_PENDING_TASKS", "1000000")
os.environ.setdefault("LITELLM_TELEMETRY", "False")
# Peers: never the internet. Anything that insists on an endpoint gets a closed port.
CLOSED_PORT = "http://127.0.0.1:9"
os.environ.setdefault("TRACELOOP_TELEMETRY", "false")
os.environ.setdefault("TRACELOOP_BASE_URL", CLOSED_PORT)
os.environ.setdefault("LANGFUSE_HOST", CLOSED_PORT)
os.environ.setdefault("LANGFUSE_BASE_URL", CLOSED_PORT)
os.environ.setdefault("LANGFUSE_OTEL_HOST", CLOSED_PORT)
os.environ.setdefault("LANGFUSE_PUBLIC_KEY", "pk-lf-bench")
os.environ.setdefault("LANGFUSE_SECRET_KEY", "sk-lf-bench")
os.environ.setdefault("OTEL_SDK_DISABLED", "false")
os.environ.setdefault("OTEL_EXPORTER_OTLP_ENDPOINT", CLOSED_PORT)

warnings.simplefilter("ignore")

MESSAGES = [{"role": "user", "content": "Summarise the ticket in one line."}]
MODEL = "gpt-4o-mini"
MAX_TOKENS = 64

FAMILIES = (
    "tokenledger",
    "tokenledger_sdk",
    "litellm_otel",
    "langfuse",
    "openllmetry",
    "shekel",
)


class Missing(Exception):
    """A peer is not installed: reported as such, never a crash."""


def _litellm() -> Any:
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    return litellm


def _drain_litellm(timeout: float = 30.0) -> None:
    """Wait until litellm's logging thread pool has finished every task queued."""
    from litellm.litellm_core_utils.thread_pool_executor import executor

    deadline = time.monotonic() + timeout
    slots = executor._pending_slots  # a Semaphore: its value is the number of free slots
    while slots._value < executor._max_pending_tasks and time.monotonic() < deadline:
        time.sleep(0.0002)


def _set_callbacks(litellm: Any, callbacks: list[Any]) -> None:
    """Make ``callbacks`` litellm's only callbacks. litellm copies ``litellm.callbacks``
    into its success/failure lists on the next call, so every list is reset, else a
    callback switched off would keep running in the baseline blocks."""
    litellm.logging_callback_manager._reset_all_callbacks()
    litellm._async_input_callback = []
    litellm.callbacks = list(callbacks)


def _dropped() -> int:
    from litellm.litellm_core_utils.thread_pool_executor import executor

    return int(executor._dropped_since_last_log)


def _sdk_provider() -> tuple[Any, Any]:
    """An OpenTelemetry SDK with a BatchSpanProcessor into memory (set globally)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider, exporter


def _call(litellm: Any) -> None:
    litellm.completion(model=MODEL, messages=MESSAGES, mock_response="Done.", max_tokens=MAX_TOKENS)


# -- the families --------------------------------------------------------------------------


def family_tokenledger(sdk: bool, args: argparse.Namespace) -> dict[str, Any]:
    provider = exporter = None
    if sdk:
        provider, exporter = _sdk_provider()
    litellm = _litellm()
    import tokenledger as tl
    from tokenledger import _litellm as hooks

    tmp = tempfile.mkdtemp(prefix="tl-bench-")
    ledger = tl.Ledger(f"sqlite:///{tmp}/capture.db")
    hooks.install()
    calls_per_run = args.calls_per_run

    def finish() -> None:
        _drain_litellm()
        ledger.flush(60)
        if provider is not None:
            provider.force_flush()

    def bare_run() -> None:
        for _ in range(calls_per_run):
            _call(litellm)

    def tl_run() -> None:
        with ledger.run("bench-agent", tags={"user": "42"}):
            for _ in range(calls_per_run):
                _call(litellm)

    run_budget = tl.Budget(usd="1000000")

    def tl_budget_run() -> None:
        with ledger.run("bench-agent", tags={"user": "42"}, budget=run_budget):
            for _ in range(calls_per_run):
                _call(litellm)

    variants: dict[str, tuple[Callable[[], None], bool]] = {
        "bare": (bare_run, False),
        "run": (tl_run, True),
        "run_budget": (tl_budget_run, True),
    }
    if not sdk:
        shared_ledger = tl.Ledger(f"sqlite:///{tmp}/shared.db")
        shared_ledger.set_budget("agent:bench-shared", usd="1000000", per="day")

        def tl_shared_run() -> None:
            with shared_ledger.run("bench-shared"):
                for _ in range(calls_per_run):
                    _call(litellm)

        variants["shared_budget_sqlite"] = (tl_shared_run, True)
        if args.postgres_url:
            pg_ledger = tl.Ledger(args.postgres_url)
            pg_ledger.set_budget("agent:bench-pg", usd="1000000", per="day")

            def tl_pg_run() -> None:
                with pg_ledger.run("bench-pg"):
                    for _ in range(calls_per_run):
                        _call(litellm)

            variants["shared_budget_pg"] = (tl_pg_run, True)

    def make_block(fn: Callable[[], None], captured: bool) -> Callable[[], dict[str, float]]:
        def block() -> dict[str, float]:
            if captured:
                hooks.install()
            else:
                hooks.uninstall()
            if exporter is not None:
                exporter.clear()
            return _timed_block(fn, args.runs, calls_per_run, finish)

        return block

    result = _run_rounds({k: make_block(*v) for k, v in variants.items()}, args)
    hooks.install()
    result["pipeline"] = _pipeline(ledger, litellm, args, provider)
    result["writer"] = _writer_rows(ledger, args)
    hooks.uninstall()
    return result


def family_litellm_otel(args: argparse.Namespace) -> dict[str, Any]:
    provider, exporter = _sdk_provider()
    litellm = _litellm()
    from litellm.integrations.opentelemetry import OpenTelemetry

    otel = OpenTelemetry(tracer_provider=provider)

    def finish() -> None:
        _drain_litellm()
        provider.force_flush()

    def run() -> None:
        for _ in range(args.calls_per_run):
            _call(litellm)

    def block(on: bool) -> Callable[[], dict[str, float]]:
        def go() -> dict[str, float]:
            _set_callbacks(litellm, [otel] if on else [])
            exporter.clear()
            return _timed_block(run, args.runs, args.calls_per_run, finish)

        return go

    out = _run_rounds({"bare": block(False), "litellm_otel": block(True)}, args)
    out["spans_seen"] = _spans_seen(exporter, block(True))
    return out


def family_langfuse(args: argparse.Namespace) -> dict[str, Any]:
    litellm = _litellm()
    try:
        from langfuse import Langfuse, observe
    except ImportError as exc:
        raise Missing("langfuse") from exc
    from litellm.integrations.langfuse.langfuse_otel import LangfuseOtelLogger
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    client = Langfuse(
        public_key="pk-lf-bench",
        secret_key="sk-lf-bench",
        base_url=CLOSED_PORT,
        tracer_provider=provider,
        span_exporter=exporter,
    )
    # Langfuse's litellm integration ("langfuse_otel"), given the same tracer provider
    # as the client so its spans also go to memory, never over the network.
    callback = LangfuseOtelLogger(tracer_provider=provider)

    def finish() -> None:
        _drain_litellm()
        client.flush()

    def plain() -> None:
        for _ in range(args.calls_per_run):
            _call(litellm)

    @observe(name="bench-agent")
    def observed() -> None:
        for _ in range(args.calls_per_run):
            _call(litellm)

    def block(on: bool) -> Callable[[], dict[str, float]]:
        def go() -> dict[str, float]:
            _set_callbacks(litellm, [callback] if on else [])
            exporter.clear()
            return _timed_block(observed if on else plain, args.runs, args.calls_per_run, finish)

        return go

    out = _run_rounds({"bare": block(False), "langfuse": block(True)}, args)
    out["spans_seen"] = _spans_seen(exporter, block(True))
    return out


def family_openllmetry(args: argparse.Namespace) -> dict[str, Any]:
    litellm = _litellm()
    try:
        from traceloop.sdk import Traceloop
        from traceloop.sdk.decorators import workflow
        from traceloop.sdk.instruments import Instruments
    except ImportError as exc:
        raise Missing("traceloop-sdk") from exc
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    Traceloop.init(
        app_name="bench",
        api_endpoint=CLOSED_PORT,
        exporter=exporter,
        disable_batch=False,
        telemetry_enabled=False,
        instruments={Instruments.LITELLM},
        should_enrich_metrics=False,
    )
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    instrumentor = _litellm_instrumentor()

    def finish() -> None:
        _drain_litellm()
        provider.force_flush()  # type: ignore[attr-defined]

    def plain() -> None:
        for _ in range(args.calls_per_run):
            _call(litellm)

    @workflow(name="bench-agent")
    def traced() -> None:
        for _ in range(args.calls_per_run):
            _call(litellm)

    def block(on: bool) -> Callable[[], dict[str, float]]:
        def go() -> dict[str, float]:
            if instrumentor is not None:
                if on and not instrumentor.is_instrumented_by_opentelemetry:
                    instrumentor.instrument()
                elif not on and instrumentor.is_instrumented_by_opentelemetry:
                    instrumentor.uninstrument()
            exporter.clear()
            return _timed_block(traced if on else plain, args.runs, args.calls_per_run, finish)

        return go

    out = _run_rounds({"bare": block(False), "openllmetry": block(True)}, args)
    out["spans_seen"] = _spans_seen(exporter, block(True))
    return out


def _litellm_instrumentor() -> Any:
    try:
        from opentelemetry.instrumentation.litellm import LiteLLMInstrumentor
    except ImportError:
        return None
    return LiteLLMInstrumentor()


def family_shekel(args: argparse.Namespace) -> dict[str, Any]:
    litellm = _litellm()
    try:
        from shekel import budget
    except ImportError as exc:
        raise Missing("shekel") from exc

    def finish() -> None:
        _drain_litellm()

    def plain() -> None:
        for _ in range(args.calls_per_run):
            _call(litellm)

    def budgeted() -> None:
        with budget(max_usd=1_000_000.0):
            for _ in range(args.calls_per_run):
                _call(litellm)

    def block(on: bool) -> Callable[[], dict[str, float]]:
        def go() -> dict[str, float]:
            return _timed_block(budgeted if on else plain, args.runs, args.calls_per_run, finish)

        return go

    return _run_rounds({"bare": block(False), "shekel": block(True)}, args)


def _spans_seen(exporter: Any, block: Callable[[], Any]) -> int:
    """How many spans one more block exported (a check that the peer really traced)."""
    exporter.clear()
    block()
    return len(exporter.get_finished_spans())


# -- measuring -----------------------------------------------------------------------------


def _timed_block(
    run: Callable[[], None], runs: int, calls_per_run: int, finish: Callable[[], None]
) -> dict[str, float]:
    from benchmarks._common import Timer

    with Timer() as t:
        for _ in range(runs):
            run()
        finish()
    n = runs * calls_per_run
    return {"cpu_us": t.cpu / n * 1e6, "thread_us": t.thread / n * 1e6, "wall_us": t.wall / n * 1e6}


def _run_rounds(
    variants: dict[str, Callable[[], dict[str, float]]], args: argparse.Namespace
) -> dict[str, Any]:
    from benchmarks._common import interleaved

    # Warm every path (imports, caches, first-call compilation) before measuring.
    for block in variants.values():
        block()
    dropped_before = _dropped()
    samples = interleaved(variants, args.rounds)
    return {"samples": samples, "dropped_logging_tasks": _dropped() - dropped_before}


def _pipeline(
    ledger: Any, litellm: Any, args: argparse.Namespace, provider: Any
) -> dict[str, float]:
    """tokenledger's own work per call without litellm: the three hooks a captured call
    goes through (start, reserve, finish), in runs of ``calls_per_run`` calls, then the
    writer's flush. Returns caller-thread µs per call and process µs per call."""
    from benchmarks._common import Timer, median
    from tokenledger import _litellm as hooks
    from tokenledger import capture

    response = litellm.completion(model=MODEL, messages=MESSAGES, mock_response="Done.")
    _drain_litellm()

    class _LoggingObject:
        model_call_details = {"custom_llm_provider": "openai"}  # noqa: RUF012

    logging_obj = _LoggingObject()
    kwargs = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "litellm_call_id": "bench",
    }
    runs = max(1, args.pipeline_calls // args.calls_per_run)

    def once() -> dict[str, float]:
        with Timer() as t:
            for _ in range(runs):
                with ledger.run("bench-pipeline", tags={"user": "42"}):
                    for _ in range(args.calls_per_run):
                        pending = capture.start_pending("completion", (), kwargs)
                        pending.reserve(kwargs)
                        hooks._finish_response(pending, response, logging_obj)
            caller = time.thread_time() - t.thread0
            ledger.flush(60)
            if provider is not None:
                provider.force_flush()
        n = runs * args.calls_per_run
        return {"caller_us": caller / n * 1e6, "process_us": t.cpu / n * 1e6}

    once()
    samples = [once() for _ in range(max(3, args.rounds))]
    return {
        "caller_us": median([s["caller_us"] for s in samples]),
        "process_us": median([s["process_us"] for s in samples]),
        "samples": samples,  # type: ignore[dict-item]
    }


def _writer_rows(ledger: Any, args: argparse.Namespace) -> dict[str, float]:
    """The writer thread's CPU per call row: rows put on the queue, then one timed flush
    (the caller only waits, so process CPU is the writer's)."""
    import datetime as dt
    from decimal import Decimal

    from benchmarks._common import Timer, median
    from tokenledger.records import CallRecord, new_id

    writer = ledger._writer
    now = dt.datetime.now(dt.timezone.utc)
    samples = []
    for _ in range(max(3, args.rounds)):
        records = [
            CallRecord(
                id=new_id(),
                run_id=None,
                root_run_id=None,
                operation="chat",
                provider="openai",
                requested_model=MODEL,
                model="gpt-4o-mini-2024-07-18",
                started_at=now,
                ended_at=now,
                latency_ms=1.5,
                input_tokens=12,
                output_tokens=3,
                cost_usd=Decimal("0.0000036"),
                cost_source="local",
                price_id="p" * 32,
                finish_reasons=["stop"],
                litellm_call_id="x",
                max_tokens=MAX_TOKENS,
            )
            for _ in range(args.pipeline_calls)
        ]
        with Timer() as t:
            for record in records:
                writer._queue.append(record)  # no wake-up: the flush below does the work
            writer.flush(120)
        samples.append(t.cpu / len(records) * 1e6)
    return {"process_us_per_row": median(samples)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("--runs", type=int, default=20, help="agent runs per block")
    parser.add_argument("--calls-per-run", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pipeline-calls", type=int, default=20000)
    parser.add_argument("--postgres-url", default=None)
    args = parser.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        if args.family == "tokenledger":
            result = family_tokenledger(False, args)
        elif args.family == "tokenledger_sdk":
            result = family_tokenledger(True, args)
        elif args.family == "litellm_otel":
            result = family_litellm_otel(args)
        elif args.family == "langfuse":
            result = family_langfuse(args)
        elif args.family == "openllmetry":
            result = family_openllmetry(args)
        else:
            result = family_shekel(args)
    except Missing as missing:
        result = {"missing": str(missing)}
    print(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # peers' exit hooks may try to export to the closed port: skip them


if __name__ == "__main__":
    main()
