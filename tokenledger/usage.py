"""Normalise the token usage a provider reports into one `TokenUsage`.

Providers count tokens in three incompatible shapes, and litellm adds a fourth by
mixing two of them. `usage_from_response` reads all of them into OpenTelemetry's
convention, where ``input_tokens`` includes cached tokens and ``output_tokens``
includes reasoning tokens:

* **OpenAI chat** (what litellm returns for every provider), recognised by
  ``prompt_tokens`` or ``completion_tokens``: ``prompt_tokens`` already includes cache
  reads and writes, cache reads are ``prompt_tokens_details.cached_tokens``, reasoning
  is ``completion_tokens_details.reasoning_tokens``. litellm also copies Anthropic's
  ``cache_read_input_tokens`` / ``cache_creation_input_tokens`` onto the object.
  Embeddings are this shape with no completion tokens.
* **OpenAI Responses API**, recognised by ``input_tokens`` together with
  ``input_tokens_details`` or ``output_tokens_details``: ``input_tokens`` includes
  cached tokens (``input_tokens_details.cached_tokens``); reasoning is
  ``output_tokens_details.reasoning_tokens``.
* **Anthropic Messages API**, any other object with ``input_tokens`` or
  ``output_tokens``: ``input_tokens`` *excludes* the cache, so cache reads and writes
  are added to it. When no cache field is present this reading and the Responses one
  give the same answer, so the rule never has to guess between them.
* **tokenledger's own**: a `TokenUsage` is validated as it is, and a dict marked
  ``"tokenledger_shape": "canonical"`` (what `Ledger.record_call` passes) holds counts
  already in our convention: its ``input_tokens`` includes the cache.

`provider_cost` reads the cost a provider reported on the usage itself (OpenRouter's
``usage.cost``), which `usage_from_response` ignores.

Both run once per model call, so they read fields with dict lookups rather than
``getattr`` on pydantic models, whose failed attribute lookups cost microseconds each.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Final

from tokenledger._money import nonnegative_number
from tokenledger.exceptions import UsageError
from tokenledger.records import TokenUsage

__all__ = ["MAX_TOKENS_PER_CALL", "provider_cost", "usage_from_response"]

MAX_TOKENS_PER_CALL: Final = 1_000_000_000
"""More tokens than this in one call is taken as a corrupt count, not a real call."""

_COUNT_RULE: Final = f"token counts must be whole numbers from 0 to {MAX_TOKENS_PER_CALL:,}"
_INTEGER_TEXT: Final = re.compile(r"\s*[+-]?[0-9]+\s*")

Getter = Callable[[str], Any]


def usage_from_response(obj: object) -> TokenUsage:
    """Read a provider's usage report into a validated `TokenUsage`.

    ``obj`` is a litellm ``Usage``, an OpenAI or Anthropic SDK usage object, or a plain
    dict in any of the shapes in this module's docstring; a `TokenUsage` is validated
    and returned as it is. Raises `UsageError` for ``None``, for an object with no
    known token field, and for any count that is not a whole number from 0 to
    1,000,000,000, or cached tokens above the input, or reasoning above the output.

    .. versionadded:: 0.1.0
    """
    if obj is None:
        raise UsageError(
            "Usage is None; expected a litellm `Usage`, or a dict with `prompt_tokens` / "
            "`completion_tokens` or `input_tokens` / `output_tokens`."
        )
    if isinstance(obj, TokenUsage):
        return _from_token_usage(obj)
    get = _reader(obj)
    prompt = get("prompt_tokens")
    completion = get("completion_tokens")
    if prompt is not None or completion is not None:
        return _from_chat(get, prompt, completion)
    input_raw = get("input_tokens")
    output_raw = get("output_tokens")
    if input_raw is None and output_raw is None:
        raise UsageError(
            f"Usage object of type `{type(obj).__qualname__}` has no token counts; expected "
            "`prompt_tokens` / `completion_tokens` (OpenAI chat, litellm) or `input_tokens` / "
            "`output_tokens` (Anthropic, OpenAI Responses)."
        )
    if get("tokenledger_shape") == "canonical":
        return _from_canonical(get, input_raw, output_raw)
    input_details = get("input_tokens_details")
    output_details = get("output_tokens_details")
    anthropic_cache = (
        get("cache_read_input_tokens") is not None or get("cache_creation_input_tokens") is not None
    )
    # The Responses API always sends input_tokens_details; Anthropic never does, but may
    # send output_tokens_details (thinking tokens) next to its cache fields.
    if input_details is not None or (output_details is not None and not anthropic_cache):
        return _from_responses(input_raw, output_raw, input_details, output_details)
    return _from_anthropic(get, input_raw, output_raw, output_details)


def provider_cost(obj: object) -> Decimal | None:
    """The cost in USD that the provider reported on a usage object, or None if absent.

    OpenRouter reports ``usage.cost`` (a number, or ``{"total_cost": ...}`` in the
    Responses shape) and litellm copies it. litellm also writes its *own* estimate to
    ``usage.cost`` on some paths (mock streaming, for one), so whether to trust the
    figure is the caller's decision; this only parses it, exactly, via
    ``Decimal(str(x))``. Raises `UsageError` for a negative, NaN, infinite or
    non-numeric cost.

    .. versionadded:: 0.1.0
    """
    if obj is None:
        return None
    raw = _reader(obj)("cost")
    if isinstance(raw, Mapping):
        raw = raw.get("total_cost")
    if raw is None:
        return None
    cost = nonnegative_number(raw)
    if cost is None:
        raise UsageError(
            f"Usage field `cost` is {_show(raw)}; a provider-reported cost must be a "
            "number of USD ≥ 0."
        )
    return cost if cost else Decimal(0)  # folds -0 into 0


# -- shapes -------------------------------------------------------------------------------
def _from_chat(get: Getter, prompt: object, completion: object) -> TokenUsage:
    # litellm normalises every provider to this shape with `prompt_tokens` counting the
    # whole input. For Anthropic that is checked against litellm 1.106.2:
    # `AnthropicConfig.calculate_usage` (llms/anthropic/chat/transformation.py) sets
    # prompt_tokens = input_tokens + cache_creation_input_tokens + cache_read_input_tokens
    # and Bedrock Converse's `transform_usage` does the same, so the cache fields copied
    # onto the object are parts of `prompt_tokens`, never additions to it.
    # tests/test_usage.py runs the real transformation to keep this true.

    # Cache reads: Anthropic's name first (litellm sets it for Anthropic and Bedrock),
    # then OpenAI's detail, then DeepSeek's raw field.
    read_field = "cache_read_input_tokens"
    read_raw = get(read_field)
    write_field = "cache_creation_input_tokens"
    write_raw = get(write_field)
    details = get("prompt_tokens_details")
    if details is not None and (read_raw is None or write_raw is None):
        detail = _reader(details)
        if read_raw is None:
            read_field, read_raw = "prompt_tokens_details.cached_tokens", detail("cached_tokens")
        if write_raw is None:
            # litellm keeps OpenAI's and Anthropic's names of the detail in sync.
            write_field, write_raw = (
                "prompt_tokens_details.cache_write_tokens",
                detail("cache_write_tokens"),
            )
            if write_raw is None:
                write_field, write_raw = (
                    "prompt_tokens_details.cache_creation_tokens",
                    detail("cache_creation_tokens"),
                )
    if read_raw is None:
        read_field = "prompt_cache_hit_tokens"
        read_raw = get(read_field)

    reasoning_field = "completion_tokens_details.reasoning_tokens"
    reasoning_raw = None
    completion_details = get("completion_tokens_details")
    if completion_details is not None:
        reasoning_raw = _reader(completion_details)("reasoning_tokens")
    if reasoning_raw is None:
        reasoning_field = "reasoning_tokens"
        reasoning_raw = get(reasoning_field)

    return _checked(
        ("prompt_tokens", prompt),
        ("completion_tokens", completion),
        cache_read=(read_field, read_raw),
        cache_write=(write_field, write_raw),
        reasoning=(reasoning_field, reasoning_raw),
    )


def _from_responses(
    input_raw: object, output_raw: object, input_details: object, output_details: object
) -> TokenUsage:
    cached = cache_write = None
    if input_details is not None:
        detail = _reader(input_details)
        # litellm's Responses bridge adds `cache_write_tokens` for Anthropic models.
        cached, cache_write = detail("cached_tokens"), detail("cache_write_tokens")
    reasoning = None if output_details is None else _reader(output_details)("reasoning_tokens")
    return _checked(
        ("input_tokens", input_raw),
        ("output_tokens", output_raw),
        cache_read=("input_tokens_details.cached_tokens", cached),
        cache_write=("input_tokens_details.cache_write_tokens", cache_write),
        reasoning=("output_tokens_details.reasoning_tokens", reasoning),
    )


def _from_anthropic(
    get: Getter, input_raw: object, output_raw: object, output_details: object = None
) -> TokenUsage:
    # Anthropic's `input_tokens` counts only the uncached part of the prompt.
    uncached = _count("input_tokens", input_raw)
    cache_read = _count("cache_read_input_tokens", get("cache_read_input_tokens"))
    cache_write = _count("cache_creation_input_tokens", get("cache_creation_input_tokens"))
    input_tokens = uncached + cache_read + cache_write
    if input_tokens > MAX_TOKENS_PER_CALL:
        raise UsageError(
            f"Usage fields `input_tokens` + `cache_read_input_tokens` + "
            f"`cache_creation_input_tokens` add up to {input_tokens:,}; {_COUNT_RULE}."
        )
    # Anthropic bills extended thinking as output; newer responses also report it as
    # output_tokens_details.thinking_tokens, a part of output_tokens.
    output_tokens = _count("output_tokens", output_raw)
    thinking = _reader(output_details)("thinking_tokens") if output_details is not None else None
    reasoning = _count("output_tokens_details.thinking_tokens", thinking)
    if reasoning > output_tokens:
        raise UsageError(
            f"Usage field `output_tokens_details.thinking_tokens` is {reasoning:,}, more than "
            f"`output_tokens` ({output_tokens:,}); thinking tokens are part of the output."
        )
    return TokenUsage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=reasoning,
    )


def _from_canonical(get: Getter, input_raw: object, output_raw: object) -> TokenUsage:
    # Counts given to `Ledger.record_call`, already in our convention; errors name its
    # arguments. The cache counts may come under either tokenledger's or Anthropic's name.
    cache_read = get("cache_read_tokens")
    if cache_read is None:
        cache_read = get("cache_read_input_tokens")
    cache_write = get("cache_write_tokens")
    if cache_write is None:
        cache_write = get("cache_creation_input_tokens")
    return _checked(
        ("input_tokens", input_raw),
        ("output_tokens", output_raw),
        cache_read=("cache_read_tokens", cache_read),
        cache_write=("cache_write_tokens", cache_write),
        reasoning=("reasoning_tokens", get("reasoning_tokens")),
    )


def _from_token_usage(usage: TokenUsage) -> TokenUsage:
    return _checked(
        ("input_tokens", usage.input_tokens),
        ("output_tokens", usage.output_tokens),
        cache_read=("cache_read_tokens", usage.cache_read_tokens),
        cache_write=("cache_write_tokens", usage.cache_write_tokens),
        reasoning=("reasoning_tokens", usage.reasoning_tokens),
    )


# -- validation ---------------------------------------------------------------------------
_Field = tuple[str, object]  # a usage field's name (for errors) and its raw value


def _checked(
    total_input: _Field,
    total_output: _Field,
    *,
    cache_read: _Field,
    cache_write: _Field,
    reasoning: _Field,
) -> TokenUsage:
    """Count each field (in this order: the first bad one is the one reported), check
    that the parts fit inside their totals, then build the `TokenUsage`."""
    (input_field, input_raw), (output_field, output_raw) = total_input, total_output
    (read_field, read_raw), (write_field, write_raw) = cache_read, cache_write
    reasoning_field, reasoning_raw = reasoning
    input_tokens = _count(input_field, input_raw)
    output_tokens = _count(output_field, output_raw)
    read, write = _count(read_field, read_raw), _count(write_field, write_raw)
    reasoned = _count(reasoning_field, reasoning_raw)
    if read + write > input_tokens:
        if not write:
            parts = f"Usage field `{read_field}` is {read}"
        elif not read:
            parts = f"Usage field `{write_field}` is {write}"
        else:
            parts = (
                f"Usage fields `{read_field}` ({read}) and `{write_field}` "
                f"({write}) add up to {read + write}"
            )
        raise UsageError(
            f"{parts}, more than the {input_tokens} input tokens in `{input_field}`; "
            "cache reads and writes must be part of the input."
        )
    if reasoned > output_tokens:
        raise UsageError(
            f"Usage field `{reasoning_field}` is {reasoned}, more than the {output_tokens} "
            f"output tokens in `{output_field}`; reasoning tokens must be part of the output."
        )
    return TokenUsage(input_tokens, output_tokens, read, write, reasoned)


def _count(field: str, value: object) -> int:
    """One validated token count; a missing (None) count is 0."""
    if type(value) is int:  # the hot path: a plain int
        if 0 <= value <= MAX_TOKENS_PER_CALL:
            return value
        raise _bad_count(field, value)
    if value is None:
        return 0
    count: int | None = None
    if isinstance(value, bool):
        count = None  # True is an int to Python, never a token count
    elif isinstance(value, int):
        count = int(value)
    elif isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            count = int(value)
    elif isinstance(value, Decimal):
        if value.is_finite() and value == value.to_integral_value():
            count = int(value)
    elif isinstance(value, str):
        if _INTEGER_TEXT.fullmatch(value):
            count = int(value)
    elif hasattr(type(value), "__index__"):  # numpy integers and the like
        count = int(value.__index__())  # type: ignore[attr-defined]
    if count is None or not 0 <= count <= MAX_TOKENS_PER_CALL:
        raise _bad_count(field, value)
    return count


def _bad_count(field: str, value: object) -> UsageError:
    return UsageError(f"Usage field `{field}` is {_show(value)}; {_COUNT_RULE}.")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


# -- field access -------------------------------------------------------------------------
_NOT_PYDANTIC: Final = object()


def _reader(obj: object) -> Getter:
    """A fast ``name -> value or None`` reader for a dict or an object's attributes."""
    if isinstance(obj, Mapping):
        return obj.get
    # A pydantic v2 model keeps its fields in __dict__ and undeclared ones (litellm's
    # Anthropic cache fields) in __pydantic_extra__. Reading those dicts costs ~50 ns
    # where getattr on a missing field costs ~3 µs, as pydantic raises inside.
    extra = getattr(obj, "__pydantic_extra__", _NOT_PYDANTIC)
    fields = getattr(obj, "__dict__", None)
    if extra is _NOT_PYDANTIC or fields is None:
        return lambda name: getattr(obj, name, None)
    if not isinstance(fields, dict):
        return lambda name: getattr(obj, name, None)
    if not isinstance(extra, dict) or not extra:
        return fields.get

    def get(name: str) -> Any:
        value = fields.get(name)
        return extra.get(name) if value is None else value

    return get
