"""Prices from litellm's bundled map and from the user, as exact Decimals, and call costs.

Figures are hand-computed from the bundled map of litellm 1.106.2 (docs/internals.md
works the first two by hand): gpt-4o-mini is $0.15 / $0.60 per million input / output
tokens, cache reads $0.075; claude-sonnet-4-5 is $3 / $15, cache writes $3.75, cache reads $0.30.
"""

# Expected value first, on purpose; ruff's SIM300 wants the opposite.
from __future__ import annotations

import os

# Before litellm is imported: use the bundled price map, never the network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import importlib.metadata
import io
import logging
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
import warnings
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenledger.exceptions import ConfigurationError, PriceError
from tokenledger.pricing import (
    PriceBook,
    UnpricedModelWarning,
    default_price_book,
    warn_unpriced,
)
from tokenledger.records import PriceRecord, TokenUsage

ROOT = Path(__file__).resolve().parent.parent
MILLION = Decimal(1_000_000)

# The two calls hand-priced in docs/internals.md.
OPENAI_CALL = TokenUsage(
    input_tokens=1200, output_tokens=300, cache_read_tokens=1000, reasoning_tokens=100
)
ANTHROPIC_CALL = TokenUsage(
    input_tokens=1000, output_tokens=100, cache_read_tokens=200, cache_write_tokens=500
)


@pytest.fixture(scope="module")
def book() -> PriceBook:
    """One book on litellm's bundled map, shared so the map is parsed once."""
    return PriceBook()


def priced(book: PriceBook, model: str, provider: str | None = None) -> PriceRecord:
    price = book.lookup(model, provider)
    assert price is not None, f"{model} has no price in the bundled map"
    return price


# -- the hand-computed figures ------------------------------------------------------------------
def test_gpt_4o_mini_call_with_cache_reads_and_reasoning_costs_as_hand_computed(
    book: PriceBook,
) -> None:
    # 200 x 0.15/M + 1000 x 0.075/M + 300 x 0.60/M (reasoning has no price of its own)
    assert Decimal("0.000285") == book.cost(priced(book, "gpt-4o-mini"), OPENAI_CALL)


def test_claude_sonnet_4_5_call_with_cache_writes_and_reads_costs_as_hand_computed(
    book: PriceBook,
) -> None:
    # 300 x 3/M + 500 x 3.75/M + 200 x 0.30/M + 100 x 15/M
    assert Decimal("0.004335") == book.cost(priced(book, "claude-sonnet-4-5"), ANTHROPIC_CALL)


def test_map_floats_become_exact_decimals(book: PriceBook) -> None:
    price = priced(book, "gpt-4o-mini")
    assert (Decimal("1.5E-7"), Decimal("6E-7"), Decimal("7.5E-8"), None, None) == (
        price.input_per_token,
        price.output_per_token,
        price.cache_read_per_token,
        price.cache_write_per_token,
        price.reasoning_per_token,
    )
    assert "1.5E-7" == str(price.input_per_token)


def test_map_prices_are_labelled_with_the_installed_litellm_version(book: PriceBook) -> None:
    price = priced(book, "gpt-4o-mini")
    assert (f"litellm {importlib.metadata.version('litellm')}", "openai") == (
        price.source,
        price.provider,
    )


def test_reasoning_price_applies_to_reasoning_tokens_only(book: PriceBook) -> None:
    # dashscope/qwen-turbo: input 0.05/M, output 0.20/M, reasoning 0.50/M.
    usage = TokenUsage(input_tokens=1000, output_tokens=300, reasoning_tokens=100)
    # 1000 x 0.05/M + 200 x 0.20/M + 100 x 0.50/M
    assert Decimal("0.00014") == book.cost(priced(book, "dashscope/qwen-turbo"), usage)


def test_embedding_model_costs_its_input(book: PriceBook) -> None:
    # text-embedding-3-small: 0.02/M
    usage = TokenUsage(input_tokens=8000)
    assert Decimal("0.00016") == book.cost(priced(book, "text-embedding-3-small"), usage)


def test_cost_is_exact_whatever_the_callers_decimal_precision(book: PriceBook) -> None:
    with localcontext() as ctx:
        ctx.prec = 3
        cost = book.cost(priced(book, "claude-sonnet-4-5"), ANTHROPIC_CALL)
    assert Decimal("0.004335") == cost


@pytest.mark.parametrize(
    ("model", "provider", "usage"),
    [
        ("gpt-4o-mini", "openai", OPENAI_CALL),
        ("claude-sonnet-4-5", "anthropic", ANTHROPIC_CALL),
        ("gemini/gemini-2.5-pro", "gemini", TokenUsage(250_000, 1000, cache_read_tokens=50_000)),
        ("dashscope/qwen3-max", "dashscope", TokenUsage(40_000, 1000)),
        ("xai/grok-4.3", "xai", TokenUsage(200_000, 1000)),
    ],
)
def test_cost_agrees_with_litellms_own_calculation(
    book: PriceBook, model: str, provider: str, usage: TokenUsage
) -> None:
    import litellm
    from litellm.types.utils import Usage

    litellm_usage = Usage(
        prompt_tokens=usage.input_tokens,
        completion_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details={"cached_tokens": usage.cache_read_tokens},
        completion_tokens_details={"reasoning_tokens": usage.reasoning_tokens},
        cache_read_input_tokens=usage.cache_read_tokens,
        cache_creation_input_tokens=usage.cache_write_tokens,
    )
    prompt_cost, completion_cost = litellm.cost_per_token(
        model=model, custom_llm_provider=provider, usage_object=litellm_usage
    )
    assert float(book.cost(priced(book, model, provider), usage)) == pytest.approx(
        prompt_cost + completion_cost, rel=1e-9
    )


# -- tiers ----------------------------------------------------------------------------------------
def test_above_200k_keys_become_a_complete_tier(book: PriceBook) -> None:
    price = priced(book, "gemini/gemini-2.5-pro")
    assert [
        {
            "above_input_tokens": 200_000,
            "input_per_token": Decimal("0.0000025"),
            "output_per_token": Decimal("0.000015"),
            "cache_read_per_token": Decimal("2.5E-7"),
            "cache_write_per_token": None,
            "reasoning_per_token": None,
        }
    ] == price.tiers


def test_input_above_the_threshold_is_priced_at_the_tier(book: PriceBook) -> None:
    usage = TokenUsage(input_tokens=250_000, output_tokens=1000, cache_read_tokens=50_000)
    # 200,000 x 2.50/M + 50,000 x 0.25/M + 1000 x 15/M
    assert Decimal("0.5275") == book.cost(priced(book, "gemini/gemini-2.5-pro"), usage)


def test_input_at_the_threshold_is_priced_at_the_base(book: PriceBook) -> None:
    usage = TokenUsage(input_tokens=200_000, output_tokens=1000)
    # 200,000 x 1.25/M + 1000 x 10/M
    assert Decimal("0.26") == book.cost(priced(book, "gemini/gemini-2.5-pro"), usage)


def test_xai_tier_starts_at_its_threshold_as_litellm_bills_it(book: PriceBook) -> None:
    usage = TokenUsage(input_tokens=200_000, output_tokens=1000)
    # xai/grok-4.3 above 200k: 200,000 x 2.50/M + 1000 x 5/M
    assert Decimal("0.505") == book.cost(priced(book, "xai/grok-4.3"), usage)


def test_tiered_pricing_ranges_price_the_whole_call_at_one_range(book: PriceBook) -> None:
    price = priced(book, "dashscope/qwen3-max")
    # Ranges (0, 32k]: 1.2/M in, 6/M out; (32k, 128k]: 2.4/M, 12/M; (128k, 252k]: 3/M, 15/M.
    assert (Decimal("0.0444"), Decimal("0.0888024")) == (
        book.cost(price, TokenUsage(input_tokens=32_000, output_tokens=1000)),
        book.cost(price, TokenUsage(input_tokens=32_001, output_tokens=1000)),
    )
    assert [32_000, 128_000] == [tier["above_input_tokens"] for tier in price.tiers or ()]


def test_fireworks_cache_reads_default_to_half_the_input_price(book: PriceBook) -> None:
    price = priced(book, "fireworks_ai/accounts/fireworks/models/deepseek-coder-v2-instruct")
    assert (Decimal("0.0000012"), Decimal("6E-7")) == (
        price.input_per_token,
        price.cache_read_per_token,
    )


# -- finding a model -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "provider", "entry"),
    [
        ("gpt-4o-mini", None, "gpt-4o-mini"),
        ("openai/gpt-4o-mini", None, "gpt-4o-mini"),
        ("openai/gpt-4o-mini", "openai", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "openai", "gpt-4o-mini-2024-07-18"),
        ("anthropic/claude-sonnet-4-5", "anthropic", "claude-sonnet-4-5"),
        ("claude-sonnet-4-5-20250929", "anthropic", "claude-sonnet-4-5-20250929"),
        ("claude-sonnet-4-5", "vertex_ai", "vertex_ai/claude-sonnet-4-5"),
        ("vertex_ai/gemini-2.5-pro", "vertex_ai", "gemini-2.5-pro"),
        ("gemini-2.5-pro", "gemini", "gemini/gemini-2.5-pro"),
        ("gemini/gemini-2.5-pro", "gemini", "gemini/gemini-2.5-pro"),
        ("gpt-4o-mini", "azure", "azure/gpt-4o-mini"),
        (
            "bedrock/anthropic.claude-sonnet-4-5-20250929-v1:0",
            "bedrock",
            "anthropic.claude-sonnet-4-5-20250929-v1:0",
        ),
        ("ft:gpt-4o-mini-2024-07-18:acme::B8s2kq1", "openai", "ft:gpt-4o-mini-2024-07-18"),
    ],
)
def test_lookup_finds_the_entry_for_each_way_of_naming_a_model(
    book: PriceBook, model: str, provider: str | None, entry: str
) -> None:
    assert entry == priced(book, model, provider).model


def test_a_prefix_of_another_provider_is_not_stripped(book: PriceBook) -> None:
    """An OpenRouter model is not priced at the direct provider's price."""
    assert book.lookup("anthropic/claude-sonnet-4-5", "openrouter") is None


def test_an_unknown_model_has_no_price(book: PriceBook) -> None:
    assert book.lookup("acme-private-llm-1", "openai") is None


def test_a_repeated_lookup_is_served_from_the_cache_hits_and_misses_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    book = PriceBook()
    first = book.lookup("gpt-4o-mini", "openai")
    assert book.lookup("acme-private-llm-1") is None

    def not_again(model: str, provider: str | None) -> None:
        raise AssertionError(f"{model} was looked up again")

    monkeypatch.setattr(book, "_find", not_again)
    assert (first, None) == (
        book.lookup("gpt-4o-mini", "openai"),
        book.lookup("acme-private-llm-1"),
    )


def test_an_entry_without_token_prices_is_unpriced() -> None:
    book = PriceBook(
        source_map={"dall-e-9": {"output_cost_per_image": 0.04, "litellm_provider": "openai"}}
    )
    assert book.lookup("dall-e-9") is None


def test_an_entry_with_only_an_output_price_has_a_free_input() -> None:
    book = PriceBook(source_map={"m": {"output_cost_per_token": 2e-06}})
    price = book.lookup("m")
    assert price is not None
    assert (Decimal(0), Decimal("0.000002")) == (price.input_per_token, price.output_per_token)


def test_an_injected_map_is_labelled_custom() -> None:
    book = PriceBook(source_map={"m": {"input_cost_per_token": 1e-06}})
    price = book.lookup("m")
    assert price is not None
    assert "custom map" == price.source


def test_the_maps_documentation_entry_is_not_a_model(book: PriceBook) -> None:
    assert book.lookup("sample_spec") is None


def test_token_limits_come_from_the_map(book: PriceBook) -> None:
    assert (16_384, 128_000) == (
        book.max_output_tokens("openai/gpt-4o-mini"),
        book.max_input_tokens("gpt-4o-mini", "openai"),
    )


def test_token_limits_of_an_unknown_model_are_none(book: PriceBook) -> None:
    assert (None, None) == (book.max_output_tokens("acme-1"), book.max_input_tokens("acme-1"))


def test_legacy_max_tokens_is_an_output_limit_only() -> None:
    book = PriceBook(source_map={"old": {"max_tokens": 4096, "input_cost_per_token": 1e-06}})
    assert (4096, None) == (book.max_output_tokens("old"), book.max_input_tokens("old"))


# -- price ids -----------------------------------------------------------------------------------
def test_price_id_is_a_16_hex_digit_content_hash_stable_across_books(book: PriceBook) -> None:
    price_id = priced(book, "gpt-4o-mini").id
    assert re.fullmatch(r"[0-9a-f]{16}", price_id)
    assert price_id == priced(PriceBook(), "gpt-4o-mini").id


def test_a_changed_price_gets_a_new_id() -> None:
    entry = {"input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07}
    before = PriceBook(source_map={"m": entry}).lookup("m")
    after = PriceBook(source_map={"m": {**entry, "output_cost_per_token": 7e-07}}).lookup("m")
    assert before is not None
    assert after is not None
    assert before.id != after.id


def test_the_same_price_set_by_the_user_has_the_maps_id(book: PriceBook) -> None:
    user = PriceBook().set_price(
        "gpt-4o-mini",
        input_per_million="0.15",
        output_per_million="0.60",
        cache_read_per_million="0.075",
        provider="openai",
    )
    assert priced(book, "gpt-4o-mini").id == user.id


def test_default_path_imports_no_litellm_uses_no_network_and_gives_the_same_id(
    book: PriceBook,
) -> None:
    code = (
        "import socket, sys\n"
        "class NoNetwork(socket.socket):\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        raise OSError('the network was used')\n"
        "def refuse(*args, **kwargs):\n"
        "    raise OSError('the network was used')\n"
        "socket.socket = NoNetwork\n"
        "socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "from tokenledger.pricing import PriceBook\n"
        "price = PriceBook().lookup('openai/gpt-4o-mini', 'openai')\n"
        "assert 'litellm' not in sys.modules, 'litellm was imported'\n"
        "print(price.id)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert (0, "") == (result.returncode, result.stderr)
    assert priced(book, "gpt-4o-mini").id == result.stdout.strip()


# -- user prices ---------------------------------------------------------------------------------
def test_a_user_price_is_stored_per_token_and_labelled_user() -> None:
    price = PriceBook().set_price(
        "acme-ft-1",
        input_per_million="2",
        output_per_million=8,
        cache_read_per_million=Decimal("0.5"),
        reasoning_per_million="12.5",
        provider="openai",
    )
    assert (
        "acme-ft-1",
        "openai",
        "user",
        Decimal("0.000002"),
        Decimal("0.000008"),
        Decimal("5E-7"),
        None,
        Decimal("0.0000125"),
        None,
    ) == (
        price.model,
        price.provider,
        price.source,
        price.input_per_token,
        price.output_per_token,
        price.cache_read_per_token,
        price.cache_write_per_token,
        price.reasoning_per_token,
        price.tiers,
    )


def test_a_float_price_is_read_as_written() -> None:
    price = PriceBook().set_price("acme-ft-1", input_per_million=0.15, output_per_million=0.6)
    assert (Decimal("1.5E-7"), Decimal("6E-7")) == (price.input_per_token, price.output_per_token)


def test_a_user_price_prices_a_private_model() -> None:
    book = PriceBook()
    book.set_price("acme-ft-1", input_per_million="2", output_per_million="8")
    price = book.lookup("acme-ft-1")
    assert price is not None
    # 1000 x 2/M + 500 x 8/M
    assert Decimal("0.006") == book.cost(price, TokenUsage(input_tokens=1000, output_tokens=500))


def test_a_user_price_is_found_under_the_provider_prefix_too() -> None:
    book = PriceBook()
    price = book.set_price("acme-ft-1", input_per_million="2", output_per_million="8")
    assert (price, price) == (
        book.lookup("openai/acme-ft-1", "openai"),
        book.lookup("acme-ft-1", "openai"),
    )


def test_a_user_price_wins_over_the_map_even_after_a_cached_lookup() -> None:
    book = PriceBook()
    from_map = book.lookup("gpt-4o-mini", "openai")
    user = book.set_price("gpt-4o-mini", input_per_million="1", output_per_million="2")
    assert from_map is not None
    assert ("litellm", user) == (
        from_map.source.split()[0],
        book.lookup("gpt-4o-mini", "openai"),
    )


def test_a_user_price_turns_a_cached_miss_into_a_price() -> None:
    book = PriceBook()
    assert book.lookup("openai/acme-ft-2", "openai") is None
    price = book.set_price("acme-ft-2", input_per_million="1", output_per_million="1")
    assert price == book.lookup("openai/acme-ft-2", "openai")


def test_uncached_and_reasoning_user_prices_default_to_input_and_output() -> None:
    book = PriceBook()
    price = book.set_price("acme-ft-1", input_per_million="2", output_per_million="8")
    # Cache reads and writes at 2/M with the rest of the input; reasoning at 8/M.
    assert Decimal("0.006") == book.cost(
        price,
        TokenUsage(
            input_tokens=1000,
            output_tokens=500,
            cache_read_tokens=300,
            cache_write_tokens=200,
            reasoning_tokens=100,
        ),
    )


@pytest.mark.parametrize(
    ("argument", "value", "shown"),
    [
        ("input_per_million", "-1", "'-1'"),
        ("input_per_million", -1, "-1"),
        ("output_per_million", "abc", "'abc'"),
        ("output_per_million", "NaN", "'NaN'"),
        ("input_per_million", float("inf"), "inf"),
        ("input_per_million", True, "True"),
        ("input_per_million", None, "None"),
        ("cache_read_per_million", Decimal("-0.5"), "Decimal('-0.5')"),
        ("cache_write_per_million", [1], "[1]"),
        ("reasoning_per_million", "", "''"),
    ],
)
def test_an_invalid_price_is_rejected_naming_the_argument_and_value(
    argument: str, value: object, shown: str
) -> None:
    prices: dict[str, Any] = {"input_per_million": "1", "output_per_million": "1", argument: value}
    expected = (
        f"Price `{argument}` for model `my-ft` is {shown}; a price must be a number of USD ≥ 0."
    )
    with pytest.raises(PriceError, match=f"^{re.escape(expected)}$"):
        PriceBook().set_price("my-ft", **prices)


def test_an_absurd_price_is_rejected_as_a_likely_unit_mistake() -> None:
    with pytest.raises(
        PriceError,
        match=r"^Price `output_per_million` for model `my-ft` is '15000', more than \$10,000 per "
        r"million tokens; prices are in USD per million tokens",
    ):
        PriceBook().set_price("my-ft", input_per_million="3", output_per_million="15000")


def test_a_price_needs_a_model_name() -> None:
    with pytest.raises(PriceError, match=r"^Model name '' is invalid;"):
        PriceBook().set_price("", input_per_million="1", output_per_million="1")


# -- unpriced models -----------------------------------------------------------------------------
def test_an_unpriced_model_warns_once_per_process(caplog: pytest.LogCaptureFixture) -> None:
    model = f"acme-ft-{uuid.uuid4().hex[:8]}"
    expected = (
        f"No price is known for model `{model}`; its calls are recorded with NULL cost. Set one "
        f"with `ledger.set_price('{model}', input_per_million=..., output_per_million=...)`."
    )
    with (
        caplog.at_level(logging.WARNING, logger="tokenledger"),
        pytest.warns(UnpricedModelWarning, match=f"^{re.escape(expected)}$"),
    ):
        warn_unpriced(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_unpriced(model)
    assert ([], [expected]) == (caught, [r.getMessage() for r in caplog.records])


def test_each_unpriced_model_gets_its_own_warning() -> None:
    first, second = (f"acme-ft-{uuid.uuid4().hex[:8]}" for _ in range(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_unpriced(first)
        warn_unpriced(second)
        warn_unpriced(first)
    assert 2 == len(caught)


# -- refresh (never online in tests) -------------------------------------------------------------
def test_refresh_offline_raises_a_clear_error_and_keeps_the_prices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def offline(url: str, timeout: float) -> None:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    book = PriceBook(source_map={"m": {"input_cost_per_token": 1e-06}})
    with pytest.raises(ConnectionError, match=r"^Could not download the price map from https://"):
        book.refresh()
    assert book.lookup("m") is not None


def test_refresh_replaces_the_map_and_keeps_user_prices(monkeypatch: pytest.MonkeyPatch) -> None:
    live = b'{"new-model": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}}'
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(live))
    book = PriceBook(source_map={"old-model": {"input_cost_per_token": 1e-06}})
    mine = book.set_price("mine", input_per_million="1", output_per_million="1")
    assert book.lookup("new-model") is None
    assert 1 == book.refresh()
    new = book.lookup("new-model")
    assert new is not None
    assert (None, mine, "litellm live map") == (
        book.lookup("old-model"),
        book.lookup("mine"),
        new.source.split(",")[0],
    )


def test_refresh_rejects_a_document_that_is_not_a_price_map(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"<html>"))
    with pytest.raises(PriceError, match=r"is not JSON"):
        PriceBook().refresh("https://example.invalid/prices.json")


def test_refresh_accepts_only_http_urls() -> None:
    with pytest.raises(ConfigurationError, match=r"^Price map URL 'file:///etc/passwd' is not"):
        PriceBook().refresh("file:///etc/passwd")


def test_the_default_price_book_is_one_per_process() -> None:
    assert default_price_book() is default_price_book()


# -- properties ----------------------------------------------------------------------------------
MODELS = [
    "gpt-4o-mini",
    "claude-sonnet-4-5",
    "gemini/gemini-2.5-pro",
    "vertex_ai/claude-sonnet-4-5",
    "xai/grok-4.3",
    "dashscope/qwen3-max",
    "dashscope/qwen-turbo",
    "text-embedding-3-small",
]
parts = st.integers(min_value=0, max_value=300_000)
PARTS = ("uncached", "cache_read", "cache_write", "visible", "reasoning")


def usage_of(counts: dict[str, int]) -> TokenUsage:
    """A usage from its independent parts: input and output contain the others."""
    return TokenUsage(
        input_tokens=counts["uncached"] + counts["cache_read"] + counts["cache_write"],
        output_tokens=counts["visible"] + counts["reasoning"],
        cache_read_tokens=counts["cache_read"],
        cache_write_tokens=counts["cache_write"],
        reasoning_tokens=counts["reasoning"],
    )


@given(
    model=st.sampled_from(MODELS),
    counts=st.fixed_dictionaries(dict.fromkeys(PARTS, parts)),
    part=st.sampled_from(PARTS),
    extra=st.integers(min_value=1, max_value=300_000),
)
def test_cost_never_falls_when_any_token_count_grows(
    book: PriceBook, model: str, counts: dict[str, int], part: str, extra: int
) -> None:
    price = priced(book, model)
    before = book.cost(price, usage_of(counts))
    after = book.cost(price, usage_of({**counts, part: counts[part] + extra}))
    assert Decimal(0) <= before <= after


price_strings = (
    st.integers(min_value=0, max_value=12)
    .flatmap(
        lambda places: st.decimals(
            min_value=0, max_value=10_000, places=places, allow_nan=False, allow_infinity=False
        )
    )
    .map(str)
)


@given(text=price_strings)
def test_a_price_per_million_is_parsed_exactly(text: str) -> None:
    price = PriceBook().set_price("m", input_per_million=text, output_per_million=text)
    expected = Decimal(text) / MILLION
    assert (expected, expected) == (price.input_per_token, price.output_per_token)
