"""litellm's model cost map: finding a model's entry and reading it into a `PriceRecord`.

The map is the JSON file bundled with the installed litellm, found and parsed without
importing litellm (which takes seconds), once per process. Entries are resolved from
the names a call may go by (``provider/model``, the bare model name ...), and each entry
becomes a `PriceRecord` whose id is a hash of its content. `tokenledger.pricing` builds
on this: the `PriceBook`, user prices and the cost of a call.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import re
import threading
from collections.abc import Mapping
from decimal import Context, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final

from tokenledger.records import PriceRecord

logger = logging.getLogger("tokenledger")

# Costs are computed in this context, not the thread's current one: a caller who lowered
# `decimal.getcontext().prec` must not get rounded costs. 60 digits holds any product
# of a count (10 digits) and a price, exactly.
EXACT: Final = Context(prec=60)

_BUNDLED_FILE: Final = "model_prices_and_context_window_backup.json"
MAX_PER_MILLION: Final = Decimal(10_000)
_NOT_AN_ENTRY: Final = frozenset({"sample_spec"})  # the map's documentation entry


# litellm's threshold keys: `<price>_above_<N>k_tokens` (or `_above_<N>_tokens`).
# Keys with a suffix (`_priority`, `_batches`, ...) belong to service tiers, and
# `cache_creation_input_token_cost_above_1hr...` to 1-hour cache writes: both skipped.
_TIER_KEY: Final = re.compile(
    r"(input_cost_per_token|output_cost_per_token|cache_read_input_token_cost"
    r"|cache_creation_input_token_cost)_above_([0-9]+)(k?)_tokens"
)
_TIER_FIELD: Final = {
    "input_cost_per_token": "input_per_token",
    "output_cost_per_token": "output_per_token",
    "cache_read_input_token_cost": "cache_read_per_token",
    "cache_creation_input_token_cost": "cache_write_per_token",
}
_FIREWORKS_CACHE_READ_RATIO: Final = Decimal("0.5")
# litellm bills these providers' higher tier once the input *reaches* the threshold.
_INCLUSIVE_THRESHOLD_PROVIDERS: Final = frozenset({"xai"})


def resolve(source: Mapping[str, Any], names: list[str], provider: str | None) -> str | None:
    """The map key for the first candidate name, preferring the caller's provider."""
    hits = [
        name
        for name in names
        if name not in _NOT_AN_ENTRY and isinstance(source.get(name), Mapping)
    ]
    if not hits:
        return None
    if provider:
        for name in hits:
            if _same_provider(source[name].get("litellm_provider"), provider):
                return name
    return hits[0]


def candidate_names(model: str, provider: str | None) -> list[str]:
    names = [model]
    if provider and not model.startswith(f"{provider}/"):
        names.append(f"{provider}/{model}")
    head, slash, rest = model.partition("/")
    if slash and rest and (provider is None or head == provider):
        names.append(rest)
    for name in list(names):
        # An OpenAI fine-tune, ft:gpt-4o-mini-2024-07-18:org:suffix:id, is priced as
        # litellm's ft:gpt-4o-mini-2024-07-18 entry.
        if name.startswith("ft:") and name.count(":") > 1:
            names.append(name[: name.index(":", 3)])
    return list(dict.fromkeys(names))


def _same_provider(entry_provider: object, provider: str) -> bool:
    # litellm's map splits some providers by family: vertex_ai-language-models,
    # vertex_ai-anthropic_models, bedrock_converse.
    return isinstance(entry_provider, str) and (
        entry_provider == provider or entry_provider.startswith((f"{provider}-", f"{provider}_"))
    )


# -- building price records -----------------------------------------------------------------
def record_from_entry(model: str, entry: Mapping[str, Any], source: str) -> PriceRecord | None:
    """A map entry as a `PriceRecord`, or None when it has no per-token price."""
    provider = entry.get("litellm_provider")
    provider = provider if isinstance(provider, str) else None
    input_price = map_price(entry.get("input_cost_per_token"))
    output_price = map_price(entry.get("output_cost_per_token"))
    cache_read = map_price(entry.get("cache_read_input_token_cost"))
    cache_write = map_price(entry.get("cache_creation_input_token_cost"))
    reasoning = map_price(entry.get("output_cost_per_reasoning_token"))

    if cache_read is None and input_price is not None and provider == "fireworks_ai":
        # litellm bills Fireworks cache reads at half the input price when the map has
        # no cache price (litellm/llms/fireworks_ai/cache_pricing.py).
        cache_read = EXACT.multiply(input_price, _FIREWORKS_CACHE_READ_RATIO)
    ranges = _range_tiers(entry, output_price)
    if ranges:
        # litellm prices a `tiered_pricing` model from its ranges alone (the Qwen and
        # Doubao families have no flat price): the first range is the base price.
        base, *tiers = ranges
    else:
        if input_price is None and output_price is None:
            return None
        base = {
            "input_per_token": input_price or Decimal(0),
            "output_per_token": output_price or Decimal(0),
            "cache_read_per_token": cache_read,
            "cache_write_per_token": cache_write,
            "reasoning_per_token": reasoning,
        }
        tiers = _threshold_tiers(entry, provider, base)
    return make_record(
        model,
        provider,
        input_price=base["input_per_token"],
        output_price=base["output_per_token"],
        cache_read=base["cache_read_per_token"],
        cache_write=base["cache_write_per_token"],
        reasoning=base["reasoning_per_token"],
        tiers=tiers or None,
        source=source,
    )


def _threshold_tiers(
    entry: Mapping[str, Any], provider: str | None, base: dict[str, Any]
) -> list[dict[str, Any]]:
    """Tiers from `<price>_above_<N>k_tokens` keys, each one complete, above the flat
    prices in ``base`` (keyed as a tier is).

    As in litellm, a tier that does not name a price keeps the one below it; a cache
    price still None means the tier's input price, and reasoning keeps its own price.
    """
    by_threshold: dict[int, dict[str, Decimal]] = {}
    for key, value in entry.items():
        match = _TIER_KEY.fullmatch(key)
        price = map_price(value) if match else None
        if match is None or price is None:
            continue
        threshold = int(match[2]) * (1000 if match[3] else 1)
        by_threshold.setdefault(threshold, {})[_TIER_FIELD[match[1]]] = price
    # Above N means more than N tokens, except where litellm bills from N itself.
    offset = 1 if provider in _INCLUSIVE_THRESHOLD_PROVIDERS else 0
    current = base
    tiers = []
    for threshold in sorted(by_threshold):
        current = {**current, **by_threshold[threshold]}
        tiers.append({"above_input_tokens": threshold - offset, **current})
    return tiers


def _range_tiers(entry: Mapping[str, Any], model_output: Decimal | None) -> list[dict[str, Any]]:
    """Tiers from litellm's ``tiered_pricing`` ranges, lowest first.

    One range prices the whole call (litellm: ``start < input tokens <= end``, and the
    last range beyond its end), so a range becomes a tier above its start. Prices a
    range does not name fall back as in litellm: output to the model's output price,
    cache prices to the range's input price, reasoning to the range's output price.
    """
    ranges = entry.get("tiered_pricing")
    if not isinstance(ranges, list):
        return []
    tiers: list[dict[str, Any]] = []
    for item in ranges:
        if not isinstance(item, Mapping):
            continue
        bounds = item.get("range")
        input_price = map_price(item.get("input_cost_per_token"))
        if not isinstance(bounds, (list, tuple)) or len(bounds) != 2 or input_price is None:
            continue
        start = map_int(bounds[0])
        if start is None:
            continue
        output_price = map_price(item.get("output_cost_per_token"))
        tiers.append(
            {
                "above_input_tokens": start,
                "input_per_token": input_price,
                "output_per_token": output_price
                if output_price is not None
                else model_output or Decimal(0),
                "cache_read_per_token": map_price(item.get("cache_read_input_token_cost")),
                "cache_write_per_token": map_price(item.get("cache_creation_input_token_cost")),
                "reasoning_per_token": map_price(item.get("output_cost_per_reasoning_token")),
            }
        )
    tiers.sort(key=lambda tier: tier["above_input_tokens"])
    return tiers


def make_record(
    model: str,
    provider: str | None,
    *,
    input_price: Decimal,
    output_price: Decimal,
    cache_read: Decimal | None,
    cache_write: Decimal | None,
    reasoning: Decimal | None,
    tiers: list[dict[str, Any]] | None,
    source: str,
) -> PriceRecord:
    return PriceRecord(
        id=price_id(
            model, provider, (input_price, output_price, cache_read, cache_write, reasoning), tiers
        ),
        model=model,
        provider=provider,
        input_per_token=input_price,
        output_per_token=output_price,
        cache_read_per_token=cache_read,
        cache_write_per_token=cache_write,
        reasoning_per_token=reasoning,
        tiers=tiers,
        source=source,
    )


def price_id(
    model: str,
    provider: str | None,
    prices: tuple[Decimal | None, ...],
    tiers: list[dict[str, Any]] | None,
) -> str:
    """First 16 hex digits of a SHA-256 over everything that determines a cost.

    Prices enter as normalised plain strings, so 1.5E-7 and 0.000000150 hash alike.
    The source is left out: the same price from litellm and from the user is one price.
    """
    content = {
        "model": model,
        "provider": provider,
        "prices": [_canonical(p) for p in prices],
        "tiers": [
            {k: _canonical(v) if isinstance(v, Decimal) else v for k, v in sorted(tier.items())}
            for tier in tiers or ()
        ],
    }
    payload = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _canonical(price: Decimal | None) -> str | None:
    return None if price is None else format(price.normalize(EXACT), "f")


def map_price(value: object) -> Decimal | None:
    """A per-token price from the map, or None when absent or not a price."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, float):
            price = Decimal(repr(value))  # the shortest repr: 1.5e-07 -> Decimal('1.5E-7')
        elif isinstance(value, (int, str)):
            price = Decimal(value)  # litellm tolerates string costs written by hand
        else:
            return None
    except InvalidOperation:
        return None
    if not price.is_finite() or price < 0:
        logger.debug("tokenledger ignored an invalid price %r in the price map", value)
        return None
    return price if price else Decimal(0)


def map_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and math.isfinite(value) and value >= 0 and value.is_integer():
        return int(value)
    return None


# -- the bundled map --------------------------------------------------------------------------
class _BundledMap:
    """litellm's bundled map, parsed once per process on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: tuple[Mapping[str, Any], str] | None = None

    def get(self) -> tuple[Mapping[str, Any], str]:
        value = self._value
        if value is None:
            with self._lock:
                value = self._value
                if value is None:
                    value = self._value = _load_bundled_map()
        return value


def _load_bundled_map() -> tuple[Mapping[str, Any], str]:
    # find_spec locates the package without running litellm/__init__.py (~3 s).
    spec = importlib.util.find_spec("litellm")
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    if not locations:
        logger.warning("tokenledger found no litellm installation; every model is unpriced")
        return {}, "litellm (not installed)"
    path = Path(locations[0]) / _BUNDLED_FILE
    try:
        source = json.loads(path.read_bytes())
    except (OSError, ValueError):
        logger.warning("tokenledger could not read litellm's price map %s", path, exc_info=True)
        return {}, "litellm (no price map)"
    try:
        version = importlib.metadata.version("litellm")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return (source if isinstance(source, dict) else {}), f"litellm {version}"


bundled = _BundledMap()
