"""OpenTelemetry spans and metrics for runs and calls, through ``opentelemetry-api`` only.

With no SDK configured every tracer and meter here is a no-op and costs next to nothing;
the ledger never depends on spans being sampled or exported. Errors inside telemetry are
logged, never raised into the agent.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from tokenledger import semconv as sc
from tokenledger._version import __version__

if TYPE_CHECKING:
    from tokenledger.records import CallRecord, RunRecord

__all__ = [
    "Telemetry",
    "ids_of",
    "otel_resource",
    "otlp_configured_by_environment",
    "sdk_tracer_provider_is_set",
    "setup_otlp",
]

logger = logging.getLogger("tokenledger")

_INVALID_TRACE_ID = 0
_SDK_INSTRUMENT: Any = object()  # an instrument that is not an unset API proxy


def ids_of(span: trace.Span) -> tuple[str | None, str | None]:
    """The hex trace id and span id of a span, or (None, None) for a non-recording one."""
    ctx = span.get_span_context()
    if ctx.trace_id == _INVALID_TRACE_ID:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


class Telemetry:
    """Creates the run and call spans and records the token and cost metrics.

    Tracers and meters are looked up through the global providers each time a Telemetry
    is made, so an SDK configured after import is picked up by the next ledger.
    """

    def __init__(self) -> None:
        self.tracer = trace.get_tracer("tokenledger", __version__)
        meter = metrics.get_meter("tokenledger", __version__)
        self._token_usage = meter.create_histogram(
            sc.METRIC_TOKEN_USAGE, unit="{token}", description="Tokens used per model call."
        )
        self._duration = meter.create_histogram(
            sc.METRIC_OPERATION_DURATION, unit="s", description="Duration of model calls."
        )
        self._cost = meter.create_counter(
            sc.METRIC_COST, unit="USD", description="Cost of model calls, in US dollars."
        )
        self._metric_attrs: dict[tuple[str, str | None, str | None], tuple[Any, Any, Any]] = {}

    # -- runs ---------------------------------------------------------------------------
    def start_run_span(
        self, name: str, run_id: str, tags: Mapping[str, str], parent: trace.Span | None
    ) -> trace.Span:
        context = trace.set_span_in_context(parent) if parent is not None else None
        span = self.tracer.start_span(
            f"{sc.OP_INVOKE_AGENT} {name}", context=context, kind=SpanKind.INTERNAL
        )
        if span.is_recording():
            attributes: dict[str, Any] = {
                sc.GEN_AI_OPERATION_NAME: sc.OP_INVOKE_AGENT,
                sc.GEN_AI_AGENT_NAME: name,
                sc.GEN_AI_AGENT_ID: run_id,
                sc.TL_RUN_ID: run_id,
            }
            for key, value in tags.items():
                attributes[sc.TL_TAG_PREFIX + key] = value
            span.set_attributes(attributes)
        return span

    def end_run_span(self, span: trace.Span, record: RunRecord) -> None:
        try:
            if span.is_recording():
                span.set_attributes(
                    {
                        sc.TL_RUN_STATUS: record.status,
                        sc.TL_RUN_CALLS: record.calls,
                        sc.TL_RUN_INPUT_TOKENS: record.input_tokens,
                        sc.TL_RUN_OUTPUT_TOKENS: record.output_tokens,
                        sc.TL_RUN_COST_AMOUNT: float(record.cost_usd),
                        sc.TL_COST_CURRENCY: sc.CURRENCY_USD,
                    }
                )
                if record.parent_id is not None:
                    span.set_attribute(sc.TL_RUN_PARENT_ID, record.parent_id)
                span.set_attribute(sc.TL_RUN_ROOT_ID, record.root_id)
                if record.status != "ok":
                    span.set_attribute(sc.ERROR_TYPE, record.error_type or record.status)
                    span.set_status(Status(StatusCode.ERROR, record.error_type or record.status))
            span.end()
        except Exception:  # telemetry must never break the agent
            logger.exception("tokenledger could not end the span of run %s", record.id)

    # -- calls --------------------------------------------------------------------------
    def call_span(
        self, call: CallRecord, parent: trace.Span | None, start_ns: int, end_ns: int
    ) -> tuple[str | None, str | None]:
        """Emit the CLIENT span of a finished call; return its (trace id, span id)."""
        if parent is not None and not parent.is_recording():
            # The run's span was not recorded (no SDK, or sampled out): a child would
            # not be either, so skip building one — the hot path's cheapest case.
            return None, None
        try:
            context = trace.set_span_in_context(parent) if parent is not None else None
            span = self.tracer.start_span(
                f"{call.operation} {call.tool_name or call.requested_model}",
                context=context,
                kind=SpanKind.CLIENT,
                start_time=start_ns,
            )
            if span.is_recording():
                span.set_attributes(_call_attributes(call))
                if call.status != "ok":
                    span.set_status(Status(StatusCode.ERROR, call.error_type or call.status))
            span.end(end_time=end_ns)
            return ids_of(span)
        except Exception:
            logger.exception("tokenledger could not emit the span of call %s", call.id)
            return None, None

    def record_metrics(self, call: CallRecord) -> None:
        # With no MeterProvider set, the API hands out proxy instruments that do nothing
        # until one is set, when they get a real instrument behind them. Until then the
        # attributes are not even built (a few µs per call). Should a future API drop
        # the attribute, the sentinel makes this record every time: slower, still right.
        if getattr(self._cost, "_real_instrument", _SDK_INSTRUMENT) is None:
            return
        try:
            key = (call.operation, call.provider, call.requested_model)
            attrs = self._metric_attrs.get(key)
            if attrs is None:
                base = {
                    sc.GEN_AI_OPERATION_NAME: call.operation,
                    sc.GEN_AI_PROVIDER_NAME: call.provider or "unknown",
                    sc.GEN_AI_REQUEST_MODEL: call.requested_model or "unknown",
                }
                attrs = (
                    base,
                    {**base, sc.GEN_AI_TOKEN_TYPE: "input"},
                    {**base, sc.GEN_AI_TOKEN_TYPE: "output"},
                )
                if len(self._metric_attrs) < 10_000:  # bounded: model names come from users
                    self._metric_attrs[key] = attrs
            base, input_attrs, output_attrs = attrs
            if call.input_tokens:
                self._token_usage.record(call.input_tokens, input_attrs)
            if call.output_tokens:
                self._token_usage.record(call.output_tokens, output_attrs)
            if call.latency_ms is not None:
                self._duration.record(call.latency_ms / 1000.0, base)
            if call.cost_usd is not None:
                self._cost.add(float(call.cost_usd), base)
        except Exception:
            logger.exception("tokenledger could not record the metrics of call %s", call.id)


def _call_attributes(call: CallRecord) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        sc.GEN_AI_OPERATION_NAME: call.operation,
        sc.GEN_AI_USAGE_INPUT_TOKENS: call.input_tokens,
        sc.GEN_AI_USAGE_OUTPUT_TOKENS: call.output_tokens,
        sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: call.cache_read_tokens,
        sc.GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS: call.cache_write_tokens,
        sc.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: call.reasoning_tokens,
        sc.TL_CALL_ID: call.id,
        sc.TL_CALL_STREAMED: call.streamed,
        sc.TL_CALL_STATUS: call.status,
        sc.TL_COST_CURRENCY: sc.CURRENCY_USD,
    }
    if call.provider:
        attributes[sc.GEN_AI_PROVIDER_NAME] = call.provider
    if call.requested_model:
        attributes[sc.GEN_AI_REQUEST_MODEL] = call.requested_model
    if call.model:
        attributes[sc.GEN_AI_RESPONSE_MODEL] = call.model
    if call.tool_name:
        attributes[sc.GEN_AI_TOOL_NAME] = call.tool_name
    if call.max_tokens is not None:
        attributes[sc.GEN_AI_REQUEST_MAX_TOKENS] = call.max_tokens
    if call.finish_reasons:
        attributes[sc.GEN_AI_RESPONSE_FINISH_REASONS] = list(call.finish_reasons)
    if call.error_type:
        attributes[sc.ERROR_TYPE] = call.error_type
    if call.cost_usd is not None:
        attributes[sc.TL_COST_AMOUNT] = float(call.cost_usd)
        attributes[sc.TL_COST_SOURCE] = call.cost_source or "local"
    else:
        attributes[sc.TL_UNPRICED] = True
    if call.price_id:
        attributes[sc.TL_PRICE_ID] = call.price_id
    if call.usage_estimated:
        attributes[sc.TL_USAGE_ESTIMATED] = True
    if call.run_id:
        attributes[sc.TL_RUN_ID] = call.run_id
    return attributes


def setup_otlp(
    endpoint: str | None = None,
    *,
    service_name: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Install a global OpenTelemetry SDK that exports spans and metrics over OTLP/HTTP.

    The one place tokenledger touches the SDK; called by ``configure(otlp_endpoint=...)``
    and by ``configure()`` when only the standard ``OTEL_EXPORTER_OTLP_*`` variables name
    a collector. Follows the SDK's environment conventions: with no ``endpoint`` the
    exporters read ``OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]ENDPOINT`` and ``..._HEADERS``
    themselves, and the resource comes from ``OTEL_SERVICE_NAME`` and
    ``OTEL_RESOURCE_ATTRIBUTES`` (see `otel_resource`). Uses a ``BatchSpanProcessor`` so
    exporting never blocks the agent.
    """
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "Exporting to OTLP needs the OpenTelemetry SDK and exporter: "
            "pip install 'tokenledger[otel]'",
            name=exc.name,
        ) from exc
    span_args: dict[str, Any] = {}
    metric_args: dict[str, Any] = {}
    if endpoint is not None:
        base = endpoint.rstrip("/")
        span_args["endpoint"] = f"{base}/v1/traces"
        metric_args["endpoint"] = f"{base}/v1/metrics"
    if headers is not None:
        span_args["headers"] = metric_args["headers"] = dict(headers)
    resource = otel_resource(service_name)
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(**span_args)))
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(**metric_args))
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))


def otel_resource(service_name: str | None = None) -> Any:
    """The SDK `Resource` for tokenledger's own setup.

    ``service_name`` wins when given; otherwise ``OTEL_SERVICE_NAME`` or a
    ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``; ``tokenledger`` only when the
    environment names no service at all.
    """
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create()
    if service_name is not None:
        return resource.merge(Resource({SERVICE_NAME: service_name}))
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        return resource.merge(Resource({SERVICE_NAME: "tokenledger"}))
    return resource


def otlp_configured_by_environment() -> bool:
    """True when the standard OpenTelemetry variables ask for OTLP export and the SDK is
    not disabled: ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT`` is set,
    ``OTEL_SDK_DISABLED`` is not true and ``OTEL_TRACES_EXPORTER`` is not ``none``."""
    import os

    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(
        os.environ.get(name, "").strip()
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def sdk_tracer_provider_is_set() -> bool:
    """True when a global tracer provider other than the API's default proxy is set."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
