"""Read what one finished OpenTelemetry span says about a model call.

The span shapes `tokenledger.integrations.otel` recognises are described there; this
module holds the attribute names of the instrumentations that write them (OpenTelemetry
GenAI conventions, OpenLLMetry, OpenInference, Logfire) and turns one span's attributes
into a `Reading`: its operation, provider, models, usage and outcome. It knows nothing
of runs, ledgers or of matching spans to tokenledger's own calls: the processor does.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from opentelemetry.trace import SpanKind, StatusCode

from tokenledger import semconv as sc
from tokenledger.exceptions import UsageError
from tokenledger.records import TokenUsage
from tokenledger.usage import usage_from_response

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, Span

# -- attribute names read here (beyond tokenledger.semconv) ---------------------
# Written by other instrumentations; defined here once, grouped by who writes them.
_GEN_AI_SYSTEM: Final = "gen_ai.system"  # deprecated for gen_ai.provider.name; still sent
_GEN_AI_CACHE_CREATION: Final = "gen_ai.usage.cache_creation.input_tokens"  # the spec's name
_LOGFIRE_USAGE_RAW: Final = "gen_ai.usage.raw"  # Logfire: the provider's usage, as JSON
# OpenLLMetry, old and new releases
_OLL_PROMPT_TOKENS: Final = "gen_ai.usage.prompt_tokens"
_OLL_COMPLETION_TOKENS: Final = "gen_ai.usage.completion_tokens"
_OLL_CACHE_READ: Final = "gen_ai.usage.cache_read_input_tokens"
_OLL_CACHE_CREATION: Final = "gen_ai.usage.cache_creation_input_tokens"
_OLL_REASONING: Final = "gen_ai.usage.reasoning_tokens"
_OLL_LEGACY_REASONING: Final = "llm.usage.reasoning_tokens"
_OLL_REQUEST_TYPE: Final = "llm.request.type"
_OLL_STREAMING: Final = ("gen_ai.is_streaming", "llm.is_streaming")
# OpenInference
_OI_SPAN_KIND: Final = "openinference.span.kind"
_OI_MODEL: Final = "llm.model_name"
_OI_PROVIDER: Final = "llm.provider"
_OI_SYSTEM: Final = "llm.system"
_OI_PROMPT: Final = "llm.token_count.prompt"
_OI_COMPLETION: Final = "llm.token_count.completion"
_OI_CACHE_READ: Final = "llm.token_count.prompt_details.cache_read"
_OI_CACHE_WRITE: Final = "llm.token_count.prompt_details.cache_write"
_OI_REASONING: Final = "llm.token_count.completion_details.reasoning"
# Logfire
_LOGFIRE_RESPONSE_DATA: Final = "response_data"
_GEN_AI_REQUEST_STREAM: Final = "gen_ai.request.stream"

# The first name present wins: the current convention, then older or other spellings.
_INPUT_KEYS: Final = (sc.GEN_AI_USAGE_INPUT_TOKENS, _OLL_PROMPT_TOKENS, _OI_PROMPT)
_OUTPUT_KEYS: Final = (sc.GEN_AI_USAGE_OUTPUT_TOKENS, _OLL_COMPLETION_TOKENS, _OI_COMPLETION)
_CACHE_READ_KEYS: Final = (sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, _OLL_CACHE_READ, _OI_CACHE_READ)
_CACHE_WRITE_KEYS: Final = (
    _GEN_AI_CACHE_CREATION,
    _OLL_CACHE_CREATION,
    _OI_CACHE_WRITE,
)
_REASONING_KEYS: Final = (
    sc.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS,
    _OLL_REASONING,
    _OLL_LEGACY_REASONING,
    _OI_REASONING,
)
_USAGE_KEYS: Final = _INPUT_KEYS + _OUTPUT_KEYS

# gen_ai.operation.name values that are one model call. Not invoke_agent, execute_tool
# or create_agent: their spans may carry the usage totals of the calls beneath them.
_MODEL_OPERATIONS: Final = frozenset(
    {sc.OP_CHAT, sc.OP_TEXT_COMPLETION, sc.OP_EMBEDDINGS, "generate_content", "completion"}
)
_OI_MODEL_KINDS: Final = frozenset({"LLM", "EMBEDDING"})

# OpenTelemetry gen_ai.provider.name values -> litellm's provider names (for prices).
_LITELLM_PROVIDERS: Final = {
    "aws.bedrock": "bedrock",
    "aws.sagemaker": "sagemaker",
    "gcp.vertex_ai": "vertex_ai",
    "gcp.gen_ai": "gemini",
    "gcp.gemini": "gemini",
    "google": "gemini",
    "azure.ai.openai": "azure",
    "az.ai.openai": "azure",
    "azure.ai.inference": "azure_ai",
    "az.ai.inference": "azure_ai",
    "mistral_ai": "mistral",
    "mistralai": "mistral",
    "x_ai": "xai",
    "ibm.watsonx.ai": "watsonx",
}

# A span whose start attributes name none of these namespaces (an HTTP or database span)
# is no model call, unless it is nested in one; an unnamed span may become one.
_GEN_AI_PREFIXES: Final = ("gen_ai.", "llm.", "openinference.")
# Kinds a model call made by this process never has.
_NOT_CALL_KINDS: Final = frozenset({SpanKind.SERVER, SpanKind.CONSUMER, SpanKind.PRODUCER})


# -- what a span says -------------------------------------------------------------------


class BadSpan(ValueError):
    """A model call span whose counts cannot be right."""


@dataclasses.dataclass(slots=True)
class Reading:
    operation: str
    provider: str | None  # litellm's name
    request_model: str | None
    response_model: str | None
    usage: TokenUsage | None
    status: str
    error_type: str | None
    streamed: bool
    finish_reasons: list[str] | None


def _first(attrs: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = attrs.get(key)
        if value is not None:
            return value
    return None


def as_text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def looks_like_call(attrs: Mapping[str, Any]) -> bool:
    """Is this span one model call? Decided from its attributes (at start or end)."""
    operation = attrs.get(sc.GEN_AI_OPERATION_NAME)
    if operation is not None:
        return operation in _MODEL_OPERATIONS
    kind = attrs.get(_OI_SPAN_KIND)
    if kind is not None:
        return kind in _OI_MODEL_KINDS
    if sc.GEN_AI_AGENT_NAME in attrs:
        return False
    # An older instrumentation without an operation name: a model and token counts.
    has_model = any(
        k in attrs for k in (sc.GEN_AI_REQUEST_MODEL, sc.GEN_AI_RESPONSE_MODEL, _OI_MODEL)
    )
    return has_model and (_OLL_REQUEST_TYPE in attrs or any(k in attrs for k in _USAGE_KEYS))


def may_be_call(span: Span) -> bool:
    """Could this span, as it starts, turn out to be a model call? Most attributes are
    set after the start, so only what cannot be one is ruled out."""
    if span.kind in _NOT_CALL_KINDS:
        return False
    attrs = span.attributes or {}
    return not attrs or any(key.startswith(_GEN_AI_PREFIXES) for key in attrs)


def _operation_of(attrs: Mapping[str, Any]) -> str:
    operation = attrs.get(sc.GEN_AI_OPERATION_NAME)
    if operation in (sc.OP_CHAT, sc.OP_TEXT_COMPLETION, sc.OP_EMBEDDINGS):
        return str(operation)
    if operation == "completion":
        return sc.OP_TEXT_COMPLETION
    if attrs.get(_OI_SPAN_KIND) == "EMBEDDING" or attrs.get(_OLL_REQUEST_TYPE) == "embedding":
        return sc.OP_EMBEDDINGS
    if attrs.get(_OLL_REQUEST_TYPE) == "completion":
        return sc.OP_TEXT_COMPLETION
    return sc.OP_CHAT


def _provider_of(attrs: Mapping[str, Any]) -> str | None:
    name = as_text(
        _first(attrs, (sc.GEN_AI_PROVIDER_NAME, _GEN_AI_SYSTEM, _OI_PROVIDER, _OI_SYSTEM))
    )
    if name is None:
        return None
    name = name.lower()
    return _LITELLM_PROVIDERS.get(name, name)


def _logfire_usage(attrs: Mapping[str, Any]) -> Mapping[str, Any]:
    """Anthropic's own usage, as Logfire keeps it: ``gen_ai.usage.raw`` (current
    releases) or the ``usage`` in ``response_data`` (a JSON string); empty if neither."""
    raw = attrs.get(_LOGFIRE_USAGE_RAW)
    try:
        usage = json.loads(raw) if isinstance(raw, str) else None
        if not isinstance(usage, dict):
            data = attrs.get(_LOGFIRE_RESPONSE_DATA)
            usage = json.loads(data).get("usage") if isinstance(data, str) else None
    except (ValueError, AttributeError):
        usage = None
    return usage if isinstance(usage, dict) else {}


def _usage_of(attrs: Mapping[str, Any], scope: str, provider: str | None) -> TokenUsage | None:
    input_raw = _first(attrs, _INPUT_KEYS)
    output_raw = _first(attrs, _OUTPUT_KEYS)
    if input_raw is None and output_raw is None:
        return None
    cache_read = _first(attrs, _CACHE_READ_KEYS)
    cache_write = _first(attrs, _CACHE_WRITE_KEYS)
    exclusive = False
    if scope.startswith("logfire") and provider == "anthropic":
        # Older Logfire releases set gen_ai.usage.input_tokens to Anthropic's own
        # input_tokens, which leaves the cache out, and keep the cache counts only in
        # response_data; current ones report the input with the cache included, as the
        # convention says. Anthropic's own count tells which.
        usage = _logfire_usage(attrs)
        if cache_read is None and cache_write is None:
            cache_read = usage.get("cache_read_input_tokens")
            cache_write = usage.get("cache_creation_input_tokens")
        own_input = usage.get("input_tokens")
        exclusive = own_input is not None and own_input == input_raw
    try:
        read = _count(cache_read, "cache_read")
        write = _count(cache_write, "cache_write")
        base = usage_from_response(
            {
                "input_tokens": input_raw,
                "output_tokens": output_raw,
                "reasoning_tokens": _first(attrs, _REASONING_KEYS),
                "tokenledger_shape": "canonical",
            }
        )
        input_tokens = base.input_tokens
        if exclusive or read + write > input_tokens:
            # An Anthropic-style count, whose input leaves the cache out.
            input_tokens += read + write
        return usage_from_response(
            {
                "input_tokens": input_tokens,
                "output_tokens": base.output_tokens,
                "cache_read_tokens": read,
                "cache_write_tokens": write,
                "reasoning_tokens": base.reasoning_tokens,
                "tokenledger_shape": "canonical",
            }
        )
    except UsageError as exc:
        raise BadSpan(str(exc)) from exc


def _count(value: Any, what: str) -> int:
    """One validated cache count; the error names the ``what`` count."""
    if value is None:
        return 0
    try:
        fields = {"input_tokens": value, "tokenledger_shape": "canonical"}
        return usage_from_response(fields).input_tokens
    except UsageError as exc:
        raise UsageError(str(exc).replace("`input_tokens`", f"`{what}_tokens`")) from exc


def read_span(span: ReadableSpan, attrs: Mapping[str, Any], scope: str) -> Reading | None:
    """The model call a finished span describes, or None when it describes none."""
    if not looks_like_call(attrs):
        return None
    provider = _provider_of(attrs)
    usage = _usage_of(attrs, scope, provider)
    failed = span.status.status_code is StatusCode.ERROR
    if usage is None and not failed:
        return None  # no usage and no failure: nothing to account (a span cut short)
    request_model = as_text(attrs.get(sc.GEN_AI_REQUEST_MODEL))
    response_model = as_text(attrs.get(sc.GEN_AI_RESPONSE_MODEL)) or as_text(attrs.get(_OI_MODEL))
    reasons = attrs.get(sc.GEN_AI_RESPONSE_FINISH_REASONS)
    streamed = _first(attrs, (*_OLL_STREAMING, _GEN_AI_REQUEST_STREAM))
    error_type = as_text(attrs.get(sc.ERROR_TYPE)) if failed else None
    return Reading(
        operation=_operation_of(attrs),
        provider=provider,
        request_model=request_model or response_model,
        response_model=response_model,
        usage=usage,
        status="error" if failed else "ok",
        error_type=(error_type or "Error") if failed else None,
        streamed=streamed is True,
        finish_reasons=[str(r) for r in reasons] if isinstance(reasons, (list, tuple)) else None,
    )


def scope_of(span: ReadableSpan) -> str:
    scope = span.instrumentation_scope
    return scope.name if scope is not None else ""
