"""Reading provider usage into `TokenUsage`: every shape, and every way a count can be bad.

The litellm objects are built by litellm itself (its `Usage`, its Anthropic and Bedrock
transformations, a real ``completion(mock_response=...)``), so a litellm upgrade that
changes what it reports fails here first.
"""

# Expected value first, on purpose; ruff's SIM300 wants the opposite.
from __future__ import annotations

import os

# Before litellm is imported: use the bundled price map, never the network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import math
import re
from decimal import Decimal
from typing import Any

import litellm
import pytest
from hypothesis import given
from hypothesis import strategies as st
from litellm.llms.anthropic.chat.transformation import AnthropicConfig
from litellm.llms.bedrock.chat.converse_transformation import AmazonConverseConfig
from litellm.types.llms.openai import ResponseAPIUsage
from litellm.types.utils import (
    CompletionTokensDetailsWrapper,
    PromptTokensDetailsWrapper,
    Usage,
)
from openai.types.completion_usage import CompletionUsage
from openai.types.responses import ResponseUsage

from tokenledger.exceptions import UsageError
from tokenledger.records import TokenUsage
from tokenledger.usage import MAX_TOKENS_PER_CALL, provider_cost, usage_from_response

# litellm 1.106.2 with pydantic 2.13 warns about its own TypedDicts on its first completion.
pytestmark = pytest.mark.filterwarnings("ignore:Item .* `ReadOnly` qualifier:UserWarning")

MESSAGES = [{"role": "user", "content": "Summarise the ticket in one line."}]

# The two calls hand-priced in docs/internals.md, in our convention.
OPENAI_CALL = TokenUsage(
    input_tokens=1200, output_tokens=300, cache_read_tokens=1000, reasoning_tokens=100
)
ANTHROPIC_CALL = TokenUsage(
    input_tokens=1000, output_tokens=100, cache_read_tokens=200, cache_write_tokens=500
)


# -- OpenAI chat shape (what litellm returns) ----------------------------------------------
def test_litellm_usage_with_cached_and_reasoning_details() -> None:
    usage = Usage(
        prompt_tokens=1200,
        completion_tokens=300,
        total_tokens=1500,
        prompt_tokens_details=PromptTokensDetailsWrapper(cached_tokens=1000),
        completion_tokens_details=CompletionTokensDetailsWrapper(reasoning_tokens=100),
    )
    assert OPENAI_CALL == usage_from_response(usage)


def test_litellm_usage_without_details_has_no_cache_or_reasoning() -> None:
    usage = Usage(prompt_tokens=10, completion_tokens=20, total_tokens=30)
    assert TokenUsage(input_tokens=10, output_tokens=20) == usage_from_response(usage)


def test_openai_sdk_completion_usage() -> None:
    usage = CompletionUsage(
        prompt_tokens=1200,
        completion_tokens=300,
        total_tokens=1500,
        prompt_tokens_details={"cached_tokens": 1000},
        completion_tokens_details={"reasoning_tokens": 100},
    )
    assert OPENAI_CALL == usage_from_response(usage)


def test_openai_chat_dict() -> None:
    usage = {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 1000, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 100},
    }
    assert OPENAI_CALL == usage_from_response(usage)


def test_litellm_anthropic_transformation_counts_cache_inside_prompt_tokens() -> None:
    """litellm's own Anthropic code sets prompt_tokens = input + cache read + cache write."""
    native = {
        "input_tokens": 300,
        "cache_creation_input_tokens": 500,
        "cache_read_input_tokens": 200,
        "output_tokens": 100,
    }
    usage = AnthropicConfig().calculate_usage(usage_object=native, reasoning_content=None)
    assert 1000 == usage.prompt_tokens
    assert ANTHROPIC_CALL == usage_from_response(usage)


def test_litellm_bedrock_converse_transformation_counts_cache_inside_prompt_tokens() -> None:
    converse = {
        "inputTokens": 300,
        "outputTokens": 100,
        "totalTokens": 1100,
        "cacheReadInputTokens": 200,
        "cacheWriteInputTokens": 500,
    }
    usage = AmazonConverseConfig().transform_usage(converse)
    assert 1000 == usage.prompt_tokens
    assert ANTHROPIC_CALL == usage_from_response(usage)


def test_litellm_usage_built_with_anthropic_cache_fields() -> None:
    usage = Usage(
        prompt_tokens=1000,
        completion_tokens=100,
        cache_creation_input_tokens=500,
        cache_read_input_tokens=200,
    )
    assert ANTHROPIC_CALL == usage_from_response(usage)


def test_openai_cache_write_detail_is_a_cache_write() -> None:
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 100,
        "prompt_tokens_details": {"cached_tokens": 200, "cache_write_tokens": 500},
    }
    assert ANTHROPIC_CALL == usage_from_response(usage)


def test_deepseek_raw_cache_hit_tokens_are_cache_reads() -> None:
    usage = {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "prompt_cache_hit_tokens": 1000,
        "prompt_cache_miss_tokens": 200,
    }
    assert TokenUsage(1200, 300, cache_read_tokens=1000) == usage_from_response(usage)


def test_usage_of_a_real_mocked_litellm_completion() -> None:
    mocked = litellm.ModelResponse(
        model="gpt-4o-mini",
        choices=[
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}
        ],
    )
    mocked.usage = Usage(  # type: ignore[attr-defined]
        prompt_tokens=1200,
        completion_tokens=300,
        total_tokens=1500,
        prompt_tokens_details=PromptTokensDetailsWrapper(cached_tokens=1000),
        completion_tokens_details=CompletionTokensDetailsWrapper(reasoning_tokens=100),
    )
    response = litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response=mocked)
    assert OPENAI_CALL == usage_from_response(response.usage)


def test_usage_of_a_mocked_litellm_completion_with_a_text_response() -> None:
    """A string mock_response gets litellm's fixed usage: 10 in, 20 out."""
    response = litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
    assert TokenUsage(input_tokens=10, output_tokens=20) == usage_from_response(response.usage)


# -- Anthropic Messages API ------------------------------------------------------------------
def test_anthropic_native_usage_adds_cache_to_input() -> None:
    usage = {
        "input_tokens": 300,
        "cache_creation_input_tokens": 500,
        "cache_read_input_tokens": 200,
        "output_tokens": 100,
        "service_tier": "standard",
    }
    assert ANTHROPIC_CALL == usage_from_response(usage)


def test_anthropic_native_usage_with_null_cache_fields() -> None:
    usage = {
        "input_tokens": 300,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": None,
        "output_tokens": 100,
    }
    assert TokenUsage(input_tokens=300, output_tokens=100) == usage_from_response(usage)


def test_anthropic_native_usage_whose_total_is_absurd_is_rejected() -> None:
    usage = {
        "input_tokens": 600_000_000,
        "cache_read_input_tokens": 600_000_000,
        "output_tokens": 1,
    }
    with pytest.raises(UsageError, match=r"add up to 1,200,000,000"):
        usage_from_response(usage)


# -- OpenAI Responses API ---------------------------------------------------------------------
def test_openai_sdk_responses_usage() -> None:
    usage = ResponseUsage(
        input_tokens=1200,
        input_tokens_details={"cached_tokens": 1000, "cache_write_tokens": 0},
        output_tokens=300,
        output_tokens_details={"reasoning_tokens": 100},
        total_tokens=1500,
    )
    assert OPENAI_CALL == usage_from_response(usage)


def test_litellm_responses_usage() -> None:
    usage = ResponseAPIUsage(
        input_tokens=1200,
        input_tokens_details={"cached_tokens": 1000},
        output_tokens=300,
        output_tokens_details={"reasoning_tokens": 100},
        total_tokens=1500,
    )
    assert OPENAI_CALL == usage_from_response(usage)


def test_responses_dict_input_already_includes_cached_tokens() -> None:
    usage = {
        "input_tokens": 1200,
        "input_tokens_details": {"cached_tokens": 1000},
        "output_tokens": 300,
        "output_tokens_details": {"reasoning_tokens": 100},
    }
    assert OPENAI_CALL == usage_from_response(usage)


def test_litellm_responses_bridge_keeps_anthropic_cache_writes() -> None:
    from litellm.responses.litellm_completion_transformation.transformation import (
        LiteLLMCompletionResponsesConfig,
    )

    chat = AnthropicConfig().calculate_usage(
        usage_object={
            "input_tokens": 300,
            "cache_creation_input_tokens": 500,
            "cache_read_input_tokens": 200,
            "output_tokens": 100,
        },
        reasoning_content=None,
    )
    usage = LiteLLMCompletionResponsesConfig.transform_chat_completion_usage_to_responses_usage(
        chat
    )
    assert ANTHROPIC_CALL == usage_from_response(usage)


# -- embeddings ------------------------------------------------------------------------------
def test_litellm_embedding_usage_has_only_input() -> None:
    usage = Usage(prompt_tokens=8, total_tokens=8)
    assert TokenUsage(input_tokens=8) == usage_from_response(usage)


def test_embedding_dict_without_completion_tokens() -> None:
    assert TokenUsage(input_tokens=8) == usage_from_response(
        {"prompt_tokens": 8, "total_tokens": 8}
    )


# -- tokenledger's own shapes ----------------------------------------------------------------
def test_a_token_usage_is_returned_as_it_is() -> None:
    assert OPENAI_CALL == usage_from_response(OPENAI_CALL)


def test_a_token_usage_with_impossible_parts_is_rejected() -> None:
    with pytest.raises(UsageError, match=r"`reasoning_tokens` is 5, more than the 1 output"):
        usage_from_response(TokenUsage(output_tokens=1, reasoning_tokens=5))


def test_record_call_counts_are_read_with_cache_inside_input() -> None:
    """`Ledger.record_call` passes counts already in our convention, marked canonical."""
    usage = {
        "input_tokens": 1000,
        "output_tokens": 100,
        "cache_read_input_tokens": 200,
        "cache_creation_input_tokens": 500,
        "reasoning_tokens": 0,
        "tokenledger_shape": "canonical",
    }
    assert ANTHROPIC_CALL == usage_from_response(usage)


def test_bad_record_call_counts_are_named_as_its_arguments() -> None:
    usage = {
        "input_tokens": 100,
        "cache_read_input_tokens": 150,
        "tokenledger_shape": "canonical",
    }
    with pytest.raises(UsageError, match=r"^Usage field `cache_read_tokens` is 150, more than"):
        usage_from_response(usage)


# -- bad usage -------------------------------------------------------------------------------
def test_a_negative_count_names_the_field_the_value_and_the_rule() -> None:
    expected = (
        "Usage field `prompt_tokens` is -5; token counts must be whole numbers from 0 "
        "to 1,000,000,000."
    )
    with pytest.raises(UsageError, match=f"^{re.escape(expected)}$"):
        usage_from_response({"prompt_tokens": -5, "completion_tokens": 1})


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (math.nan, "nan"),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        (10.5, "10.5"),
        (True, "True"),
        ("ten", "'ten'"),
        ("10.0", "'10.0'"),
        (MAX_TOKENS_PER_CALL + 1, "1000000001"),
        ([10], "[10]"),
    ],
)
def test_a_count_that_is_not_a_whole_number_in_range_is_rejected(value: object, shown: str) -> None:
    with pytest.raises(
        UsageError, match=rf"^Usage field `completion_tokens` is {re.escape(shown)};"
    ):
        usage_from_response({"prompt_tokens": 1, "completion_tokens": value})


@pytest.mark.parametrize("value", [10.0, "10", " 10 ", Decimal("10"), Decimal("10.00")])
def test_a_count_that_is_integral_but_not_an_int_is_accepted(value: object) -> None:
    assert 10 == usage_from_response({"prompt_tokens": value}).input_tokens


def test_a_bad_nested_count_names_its_path() -> None:
    usage = {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": -1}}
    with pytest.raises(UsageError, match=r"`prompt_tokens_details\.cached_tokens` is -1;"):
        usage_from_response(usage)


def test_cache_reads_above_the_input_are_rejected() -> None:
    usage = {"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 150}}
    with pytest.raises(
        UsageError,
        match=r"`prompt_tokens_details\.cached_tokens` is 150, more than the 100 input tokens "
        r"in `prompt_tokens`; cache reads and writes must be part of the input\.",
    ):
        usage_from_response(usage)


def test_cache_reads_and_writes_together_above_the_input_are_rejected() -> None:
    usage = Usage(
        prompt_tokens=1000,
        completion_tokens=1,
        cache_read_input_tokens=600,
        cache_creation_input_tokens=600,
    )
    with pytest.raises(UsageError, match=r"add up to 1200, more than the 1000 input tokens"):
        usage_from_response(usage)


def test_reasoning_above_the_output_is_rejected() -> None:
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 50,
        "completion_tokens_details": {"reasoning_tokens": 80},
    }
    with pytest.raises(
        UsageError,
        match=r"`completion_tokens_details\.reasoning_tokens` is 80, more than the 50 output "
        r"tokens in `completion_tokens`; reasoning tokens must be part of the output\.",
    ):
        usage_from_response(usage)


def test_an_object_with_no_token_field_is_rejected_by_type_name() -> None:
    class Telemetry:
        latency_ms = 12

    with pytest.raises(
        UsageError, match=r"^Usage object of type `.*Telemetry` has no token counts"
    ):
        usage_from_response(Telemetry())


def test_an_empty_dict_is_rejected() -> None:
    with pytest.raises(UsageError, match=r"type `dict` has no token counts"):
        usage_from_response({})


def test_none_is_rejected_so_the_caller_picks_the_fallback() -> None:
    with pytest.raises(UsageError, match=r"^Usage is None;"):
        usage_from_response(None)


# -- provider-reported cost ----------------------------------------------------------------------
def test_openrouter_cost_is_read_exactly() -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 20, "cost": 0.0001234}
    assert Decimal("0.0001234") == provider_cost(usage)


def test_cost_on_a_litellm_usage_is_read() -> None:
    assert Decimal("0.00012") == provider_cost(Usage(prompt_tokens=1, cost=0.00012))


def test_cost_as_a_responses_total_cost_is_read() -> None:
    assert Decimal("0.5") == provider_cost({"input_tokens": 1, "cost": {"total_cost": 0.5}})


def test_cost_given_as_a_decimal_or_string_is_kept_exact() -> None:
    assert (Decimal("0.000285"), Decimal("1E-9")) == (
        provider_cost({"cost": Decimal("0.000285")}),
        provider_cost({"cost": "1e-9"}),
    )


def test_no_cost_is_none() -> None:
    assert (None, None, None) == (
        provider_cost(Usage(prompt_tokens=1, completion_tokens=2)),
        provider_cost({"prompt_tokens": 1}),
        provider_cost(None),
    )


@pytest.mark.parametrize("value", [-0.01, math.nan, math.inf, "free", True])
def test_an_impossible_cost_is_rejected(value: object) -> None:
    with pytest.raises(UsageError, match=r"^Usage field `cost` is .*; a provider-reported cost"):
        provider_cost({"cost": value})


# -- properties ----------------------------------------------------------------------------------
counts = st.integers(min_value=0, max_value=MAX_TOKENS_PER_CALL // 4)


@st.composite
def valid_usages(draw: st.DrawFn) -> tuple[TokenUsage, Any]:
    """A consistent usage in our convention, and the same usage in one provider shape."""
    uncached, cache_read, cache_write = draw(counts), draw(counts), draw(counts)
    visible, reasoning = draw(counts), draw(counts)
    expected = TokenUsage(
        input_tokens=uncached + cache_read + cache_write,
        output_tokens=visible + reasoning,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=reasoning,
    )
    shape = draw(st.sampled_from(["chat", "litellm", "anthropic", "responses"]))
    if shape == "chat":
        raw: Any = {
            "prompt_tokens": expected.input_tokens,
            "completion_tokens": expected.output_tokens,
            "prompt_tokens_details": {
                "cached_tokens": cache_read,
                "cache_write_tokens": cache_write,
            },
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }
    elif shape == "litellm":
        raw = Usage(
            prompt_tokens=expected.input_tokens,
            completion_tokens=expected.output_tokens,
            cache_read_input_tokens=cache_read,
            cache_creation_input_tokens=cache_write,
            completion_tokens_details=CompletionTokensDetailsWrapper(reasoning_tokens=reasoning),
        )
    elif shape == "anthropic":
        # Anthropic reports no reasoning count: thinking is plain output.
        expected = TokenUsage(
            expected.input_tokens, expected.output_tokens, cache_read, cache_write, 0
        )
        raw = {
            "input_tokens": uncached,
            "cache_read_input_tokens": cache_read,
            "cache_creation_input_tokens": cache_write,
            "output_tokens": expected.output_tokens,
        }
    else:
        raw = {
            "input_tokens": expected.input_tokens,
            "input_tokens_details": {
                "cached_tokens": cache_read,
                "cache_write_tokens": cache_write,
            },
            "output_tokens": expected.output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning},
        }
    return expected, raw


@given(valid_usages())
def test_any_valid_usage_parses_to_its_counts(case: tuple[TokenUsage, Any]) -> None:
    expected, raw = case
    assert expected == usage_from_response(raw)


bad_counts = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=MAX_TOKENS_PER_CALL + 1),
    st.just(math.nan),
    st.sampled_from([math.inf, -math.inf]),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()),
    st.floats(min_value=MAX_TOKENS_PER_CALL + 1, allow_infinity=False),
    st.booleans(),
    st.text().filter(lambda text: not is_count_text(text)),
)


def is_count_text(text: str) -> bool:
    """Whether a string holds a whole number in range, which is accepted as a count."""
    return bool(re.fullmatch(r"\s*[+-]?[0-9]+\s*", text)) and 0 <= int(text) <= MAX_TOKENS_PER_CALL


@given(
    field=st.sampled_from(["prompt_tokens", "completion_tokens", "cached_tokens", "reasoning"]),
    value=bad_counts,
)
def test_any_invalid_count_raises_usage_error_and_nothing_else(field: str, value: object) -> None:
    usage: dict[str, Any] = {
        "prompt_tokens": 100,
        "completion_tokens": 100,
        "prompt_tokens_details": {"cached_tokens": 10},
        "completion_tokens_details": {"reasoning_tokens": 10},
    }
    if field == "cached_tokens":
        usage["prompt_tokens_details"] = {"cached_tokens": value}
    elif field == "reasoning":
        usage["completion_tokens_details"] = {"reasoning_tokens": value}
    else:
        usage[field] = value
    with pytest.raises(UsageError):
        usage_from_response(usage)


def test_anthropic_usage_with_thinking_details_keeps_its_cache_and_reasoning() -> None:
    """Anthropic may send output_tokens_details next to its cache fields: that is not the
    OpenAI Responses shape, and the cache must still count as input."""
    usage = usage_from_response(
        {
            "input_tokens": 300,
            "cache_creation_input_tokens": 500,
            "cache_read_input_tokens": 200,
            "output_tokens": 100,
            "output_tokens_details": {"thinking_tokens": 40},
        }
    )
    assert TokenUsage(1000, 100, 200, 500, 40) == usage
