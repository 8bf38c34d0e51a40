"""Attribute names for spans and metrics, defined once.

The OpenTelemetry GenAI conventions are still "development" status and live in their
own repository with no tagged release, so we keep our own copy of the names we emit
instead of importing them from ``opentelemetry.semconv._incubating``. tokenledger's own
attributes live under the ``tokenledger.`` namespace.
"""

from __future__ import annotations

from typing import Final

# -- gen_ai.* (OpenTelemetry GenAI semantic conventions) ------------------------------
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_AGENT_NAME: Final = "gen_ai.agent.name"
GEN_AI_AGENT_ID: Final = "gen_ai.agent.id"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_RESPONSE_ID: Final = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: Final = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS: Final = "gen_ai.usage.cache_creation.input_tokens"
GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: Final = "gen_ai.usage.reasoning.output_tokens"
GEN_AI_TOKEN_TYPE: Final = "gen_ai.token.type"
GEN_AI_TOOL_NAME: Final = "gen_ai.tool.name"
ERROR_TYPE: Final = "error.type"

# Values of gen_ai.operation.name
OP_CHAT: Final = "chat"
OP_TEXT_COMPLETION: Final = "text_completion"
OP_EMBEDDINGS: Final = "embeddings"
OP_INVOKE_AGENT: Final = "invoke_agent"
OP_EXECUTE_TOOL: Final = "execute_tool"

# -- tokenledger.* --------------------------------------------------------------------
# Cost has the shape proposed for gen_ai.usage.cost.*, which is not yet in the spec.
TL_COST_AMOUNT: Final = "tokenledger.usage.cost.amount"
TL_COST_CURRENCY: Final = "tokenledger.usage.cost.currency"
TL_COST_SOURCE: Final = "tokenledger.usage.cost.source"
TL_PRICE_ID: Final = "tokenledger.price.id"
TL_UNPRICED: Final = "tokenledger.usage.unpriced"
TL_USAGE_ESTIMATED: Final = "tokenledger.usage.estimated"
TL_RUN_ID: Final = "tokenledger.run.id"
TL_RUN_PARENT_ID: Final = "tokenledger.run.parent_id"
TL_RUN_ROOT_ID: Final = "tokenledger.run.root_id"
TL_RUN_STATUS: Final = "tokenledger.run.status"
TL_RUN_CALLS: Final = "tokenledger.run.calls"
TL_RUN_INPUT_TOKENS: Final = "tokenledger.run.input_tokens"
TL_RUN_OUTPUT_TOKENS: Final = "tokenledger.run.output_tokens"
TL_RUN_COST_AMOUNT: Final = "tokenledger.run.cost.amount"
TL_CALL_ID: Final = "tokenledger.call.id"
TL_CALL_STREAMED: Final = "tokenledger.call.streamed"
TL_CALL_STATUS: Final = "tokenledger.call.status"
TL_TAG_PREFIX: Final = "tokenledger.tag."

# -- metrics --------------------------------------------------------------------------
METRIC_TOKEN_USAGE: Final = "gen_ai.client.token.usage"
METRIC_OPERATION_DURATION: Final = "gen_ai.client.operation.duration"
METRIC_COST: Final = "tokenledger.client.cost"

CURRENCY_USD: Final = "USD"
