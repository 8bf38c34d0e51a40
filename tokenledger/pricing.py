"""Model prices as exact Decimals, from litellm's model cost map or set by the user.

The source is the JSON map bundled with the installed litellm
(``model_prices_and_context_window_backup.json``). It is found and parsed without
importing litellm, which takes seconds, and only on the first lookup. Prices are read
from the JSON floats with ``Decimal(repr(x))``, so ``1.5e-07`` is exactly
``Decimal("1.5E-7")``, and every cost is computed in Decimal.

Each price becomes a `PriceRecord` whose ``id`` is a hash of its content: the same
price has the same id in every process, and a changed price gets a new id, so a stored
cost can always be traced to the exact price it was computed with.

What is priced: uncached input, cache reads, cache writes, output and reasoning tokens,
with litellm's above-a-threshold tiers (``input_cost_per_token_above_200k_tokens``
and the like) and its all-or-nothing ``tiered_pricing`` ranges. What is not: service
tiers (``_priority``, ``_flex``, ``_batches`` prices), 1-hour cache writes
(``cache_creation_input_token_cost_above_1hr``), off-peak hours, and per-image,
per-second or per-query prices. Two of litellm's provider rules are followed: xAI's
higher tier starts *at* its threshold, and a Fireworks model with no cache price reads
from the cache at half its input price.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final

from tokenledger._money import nonnegative_number
from tokenledger._price_map import (
    EXACT,
    MAX_PER_MILLION,
    bundled,
    candidate_names,
    make_record,
    map_int,
    record_from_entry,
    resolve,
)
from tokenledger.exceptions import (
    ConfigurationError,
    PriceError,
    UnpricedModelWarning,
    UsageError,
)
from tokenledger.records import CallRecord, PriceRecord, TokenUsage, utcnow
from tokenledger.usage import provider_cost as parse_provider_cost

__all__ = [
    "LIVE_MAP_URL",
    "PriceBook",
    "default_price_book",
    "price_call",
    "warn_unpriced",
]

logger = logging.getLogger("tokenledger")

LIVE_MAP_URL: Final = (
    "https://raw.githubusercontent.com/BerriAI/litellm/main/model_prices_and_context_window.json"
)
"""Where `PriceBook.refresh` downloads litellm's current map from (litellm's own default)."""


_MISSING: Final[Any] = object()


class PriceBook:
    """Looks up model prices and computes the cost of a call's usage.

    ``source_map`` replaces litellm's bundled map (a dict in the same format, for
    tests or a pinned map of your own); its records are labelled ``"custom map"``.
    Prices set with `set_price` win over the map. Thread-safe.

    .. versionadded:: 0.1.0
    """

    def __init__(self, *, source_map: Mapping[str, Any] | None = None) -> None:
        self._source: tuple[Mapping[str, Any], str] | None = (
            None if source_map is None else (dict(source_map), "custom map")
        )
        self._lock = threading.Lock()
        self._overrides: dict[str, PriceRecord] = {}
        # (model, provider) -> price, misses included: every lookup after the first is
        # one dict hit. Cleared when an override or a refresh changes the answers;
        # `_generation` keeps a lookup racing that change from caching a stale answer.
        self._found: dict[tuple[str, str | None], PriceRecord | None] = {}
        self._generation = 0
        self._records: dict[str, PriceRecord | None] = {}  # map key -> its price
        self._entries: dict[tuple[str, str | None], str | None] = {}  # -> map key

    # -- lookups --------------------------------------------------------------------------
    def lookup(self, model: str, provider: str | None = None) -> PriceRecord | None:
        """The price of ``model``, or None when neither the user nor the map has one.

        ``model`` is written as litellm callers write it (``"gpt-4o-mini"``,
        ``"openai/gpt-4o-mini"``, ``"bedrock/anthropic.claude-…"``) or as a provider
        returns it (``"gpt-4o-mini-2024-07-18"``); ``provider`` is litellm's provider name
        (``"openai"``, ``"anthropic"``, ``"vertex_ai"``…). Tried in order: the name as
        given, ``provider/model``, the name without its provider prefix, and for an
        OpenAI fine-tune ``ft:<base>:org::id`` its base ``ft:<base>``. Among the names
        the map has, an entry of the same provider is preferred (``gemini-2.5-pro`` is
        Vertex AI's entry, ``gemini/gemini-2.5-pro`` Google AI Studio's).

        .. versionadded:: 0.1.0
        """
        key = (model, provider)
        found = self._found.get(key, _MISSING)
        if found is not _MISSING:
            return found  # type: ignore[no-any-return]
        generation = self._generation
        price = self._find(model, provider)
        with self._lock:
            if generation == self._generation:
                self._found[key] = price
        return price

    def cost(self, price: PriceRecord, usage: TokenUsage) -> Decimal:
        """The exact cost in USD of ``usage`` at ``price``.

        Uncached input at the input price; cache reads and writes at their own prices,
        else the input price; reasoning tokens (part of the output) at the reasoning
        price, else the output price; the rest of the output at the output price. When
        the call's input tokens pass a tier's threshold, the prices of the highest tier
        passed replace the base prices.

        .. versionadded:: 0.1.0
        """
        return _cost(price, usage)

    def max_output_tokens(self, model: str, provider: str | None = None) -> int | None:
        """The most output tokens the model may produce in one call, if the map says.

        Read from ``max_output_tokens``, else litellm's legacy ``max_tokens``.

        .. versionadded:: 0.1.0
        """
        entry = self._entry(model, provider)
        if entry is None:
            return None
        limit = map_int(entry.get("max_output_tokens"))
        return limit if limit is not None else map_int(entry.get("max_tokens"))

    def max_input_tokens(self, model: str, provider: str | None = None) -> int | None:
        """The largest input (context window) the model accepts, if the map says.

        Read from ``max_input_tokens`` only: litellm's legacy ``max_tokens`` means the
        output limit for some entries and the input limit for others.

        .. versionadded:: 0.1.0
        """
        entry = self._entry(model, provider)
        return None if entry is None else map_int(entry.get("max_input_tokens"))

    # -- user prices ----------------------------------------------------------------------
    def set_price(
        self,
        model: str,
        *,
        input_per_million: Any,
        output_per_million: Any,
        cache_read_per_million: Any = None,
        cache_write_per_million: Any = None,
        reasoning_per_million: Any = None,
        provider: str | None = None,
    ) -> PriceRecord:
        """Set the price of a private or fine-tuned model, in USD per million tokens.

        Prices are str, int, Decimal or float (a float is read through ``repr``, so
        ``0.15`` is exactly ``0.15``); each must be finite, ≥ 0 and at most $10,000 per
        million tokens, else `PriceError`. Cache and reasoning prices default to the
        input and output prices. The price wins over litellm's map for ``model`` and
        every name `lookup` resolves to it (``provider/model`` included).

        .. versionadded:: 0.1.0
        """
        if not isinstance(model, str) or not model.strip():
            raise PriceError(
                f"Model name {model!r} is invalid; a price needs the model's name as litellm "
                "callers write it, e.g. 'my-org/my-model'."
            )
        record = make_record(
            model,
            provider,
            input_price=_user_price(model, "input_per_million", input_per_million),
            output_price=_user_price(model, "output_per_million", output_per_million),
            cache_read=_optional_user_price(
                model, "cache_read_per_million", cache_read_per_million
            ),
            cache_write=_optional_user_price(
                model, "cache_write_per_million", cache_write_per_million
            ),
            reasoning=_optional_user_price(model, "reasoning_per_million", reasoning_per_million),
            tiers=None,
            source="user",
        )
        with self._lock:
            self._overrides[model] = record
            # Any cached name may resolve to this model (`provider/model`, a stripped
            # prefix): clearing them all is simpler than knowing which, and rare.
            self._found = {}
            self._generation += 1
        return record

    # -- the source map -------------------------------------------------------------------
    def refresh(self, url: str = LIVE_MAP_URL, *, timeout: float = 10.0) -> int:
        """Replace this book's map with litellm's current one, downloaded from ``url``.

        Opt-in and never called implicitly: by default prices come from the map bundled
        with the installed litellm, with no network access. Prices set with `set_price`
        are kept. Returns the number of entries in the new map. Raises
        `ConnectionError` when the map cannot be downloaded (offline, timeout, HTTP
        error), and `PriceError` when the document is not a litellm price map.

        .. versionadded:: 0.1.0
        """
        if not url.startswith(("https://", "http://")):
            raise ConfigurationError(
                f"Price map URL {url!r} is not an http(s) URL; pass the address of a litellm "
                "model_prices_and_context_window.json."
            )
        import urllib.request  # only here: it imports ssl and http.client

        try:
            # The scheme is checked above, so no file: or custom-scheme URL reaches urlopen.
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
                body = response.read()
        except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors
            raise ConnectionError(
                f"Could not download the price map from {url} ({exc}); the price book keeps "
                "the prices it had. Check the network, or keep the map bundled with litellm."
            ) from exc
        try:
            source = json.loads(body)
        except ValueError as exc:
            raise PriceError(
                f"The document at {url} is not JSON ({exc}); expected litellm's "
                "model_prices_and_context_window.json."
            ) from exc
        if not isinstance(source, dict) or not any(
            isinstance(entry, dict) and "input_cost_per_token" in entry for entry in source.values()
        ):
            raise PriceError(
                f"The document at {url} has no model prices; expected litellm's "
                "model_prices_and_context_window.json."
            )
        label = f"litellm live map, fetched {utcnow():%Y-%m-%d}"
        with self._lock:
            self._source = (source, label)
            self._found = {}
            self._records = {}
            self._entries = {}
            self._generation += 1
        return len(source)

    # -- internals ------------------------------------------------------------------------
    def _map(self) -> tuple[Mapping[str, Any], str]:
        source = self._source
        if source is None:
            source = self._source = bundled.get()
        return source

    def _find(self, model: str, provider: str | None) -> PriceRecord | None:
        names = candidate_names(model, provider)
        for name in names:
            override = self._overrides.get(name)
            if override is not None:
                return override
        source, label = self._map()  # one snapshot, should a refresh run meanwhile
        key = resolve(source, names, provider)
        if key is None:
            return None
        records = self._records
        record = records.get(key, _MISSING)
        if record is _MISSING:
            record = records[key] = record_from_entry(key, source[key], label)
        return record  # type: ignore[no-any-return]

    def _entry(self, model: str, provider: str | None) -> Mapping[str, Any] | None:
        source = self._map()[0]
        cache_key = (model, provider)
        key = self._entries.get(cache_key, _MISSING)
        if key is _MISSING:
            key = self._entries[cache_key] = resolve(
                source, candidate_names(model, provider), provider
            )
        return None if key is None else source.get(key)


def _user_price(model: str, argument: str, value: object) -> Decimal:
    """A user's price per million tokens as an exact per-token Decimal."""
    price = nonnegative_number(value)
    if price is None:
        raise PriceError(
            f"Price `{argument}` for model `{model}` is {value!r}; a price must be a "
            "number of USD ≥ 0."
        )
    if price > MAX_PER_MILLION:
        raise PriceError(
            f"Price `{argument}` for model `{model}` is {value!r}, more than $10,000 per "
            "million tokens; prices are in USD per million tokens, as on pricing pages."
        )
    per_token = price.scaleb(-6, EXACT)
    return per_token if per_token else Decimal(0)


def _optional_user_price(model: str, argument: str, value: object) -> Decimal | None:
    return None if value is None else _user_price(model, argument, value)


# -- cost -----------------------------------------------------------------------------------
def _cost(price: PriceRecord, usage: TokenUsage) -> Decimal:
    input_price = price.input_per_token
    output_price = price.output_per_token
    cache_read = price.cache_read_per_token
    cache_write = price.cache_write_per_token
    reasoning = price.reasoning_per_token
    if price.tiers:
        tier = _tier_for(price.tiers, usage.input_tokens)
        if tier is not None:
            input_price = tier["input_per_token"]
            output_price = tier["output_per_token"]
            cache_read = tier.get("cache_read_per_token")
            cache_write = tier.get("cache_write_per_token")
            reasoning = tier.get("reasoning_per_token")
    if cache_read is None:
        cache_read = input_price
    if cache_write is None:
        cache_write = input_price
    if reasoning is None:
        reasoning = output_price
    reasoning_tokens = usage.reasoning_tokens
    multiply, add = EXACT.multiply, EXACT.add
    total = multiply(input_price, usage.uncached_input_tokens)
    total = add(total, multiply(output_price, max(usage.output_tokens - reasoning_tokens, 0)))
    # Most calls have no cache or reasoning tokens: skip those products.
    if usage.cache_read_tokens:
        total = add(total, multiply(cache_read, usage.cache_read_tokens))
    if usage.cache_write_tokens:
        total = add(total, multiply(cache_write, usage.cache_write_tokens))
    if reasoning_tokens:
        total = add(total, multiply(reasoning, reasoning_tokens))
    return total


def _tier_for(tiers: list[dict[str, Any]], input_tokens: int) -> dict[str, Any] | None:
    """The tier with the highest threshold that ``input_tokens`` passes, if any."""
    chosen: dict[str, Any] | None = None
    for tier in tiers:
        above = tier["above_input_tokens"]
        if input_tokens > above and (chosen is None or above > chosen["above_input_tokens"]):
            chosen = tier
    return chosen


# -- the cost of one call ------------------------------------------------------------------


def price_call(
    book: PriceBook,
    call: CallRecord,
    provider: str | None,
    provider_cost: Any = None,
    usage: TokenUsage | None = None,
) -> PriceRecord | None:
    """Decide a finished call's cost: set ``call.cost_usd``, ``cost_source`` and
    ``price_id``, and return the price used (None when none was).

    The one place a call's cost is decided. A tool charge keeps the cost it carries. A
    cost the provider itself reported wins over the price table (source ``provider``);
    otherwise the price of the served model, else of the requested one, is applied to
    the usage (source ``local``; ``usage`` saves rebuilding it from the call). A call
    whose usage could not be read is left unpriced rather than priced at zero tokens,
    and a model with no price warns once per process (`warn_unpriced`).
    """
    if call.cost_source == "charge":
        return None  # a tool charge carries its own cost
    if provider_cost is not None and _trusts_provider_cost(provider, provider_cost):
        try:
            reported = parse_provider_cost(provider_cost)
        except UsageError as exc:
            logger.warning("tokenledger left a call's cost unknown: %s", exc)
            return None
        if reported is not None:
            call.cost_usd = reported
            call.cost_source = "provider"
    price = None
    for model in (call.model, call.requested_model):
        if model:
            price = book.lookup(model, provider)
            if price is not None:
                break
    if call.usage_estimated and not (call.input_tokens or call.output_tokens):
        # The usage could not be read: pricing zero tokens would record a false $0.
        if call.cost_usd is None:
            warn_unpriced(call.model or call.requested_model or "<unknown>")
        return None
    if price is None:
        if call.cost_usd is None:
            warn_unpriced(call.model or call.requested_model or "<unknown>")
        return None
    call.price_id = price.id
    if call.cost_usd is None:
        call.cost_usd = book.cost(price, call.usage if usage is None else usage)
        call.cost_source = "local"
    return price


def _trusts_provider_cost(provider: str | None, raw: Any) -> bool:
    # Only a cost the provider itself reported: litellm also writes its own estimate to
    # `usage.cost` on some paths, which is not the provider's bill. OpenRouter reports
    # its bill there; `{"cost": x}` is what `Ledger.record_call(cost_usd=x)` passes.
    return provider == "openrouter" or (isinstance(raw, dict) and "cost" in raw and len(raw) == 1)


# -- unpriced models ------------------------------------------------------------------------
_warned_lock = threading.Lock()
_warned: set[str] = set()


def warn_unpriced(model: str) -> None:
    """Warn, once per process for each model name, that ``model`` has no price.

    Emits an `UnpricedModelWarning` and logs the same message at WARNING on the
    ``tokenledger`` logger. The once-only rule is kept here, not in the warnings
    registry, so it holds whatever warning filters the application sets.

    .. versionadded:: 0.1.0
    """
    if model in _warned:
        return
    with _warned_lock:
        if model in _warned:
            return
        _warned.add(model)
    message = (
        f"No price is known for model `{model}`; its calls are recorded with NULL cost. "
        f"Set one with `ledger.set_price({model!r}, input_per_million=..., "
        "output_per_million=...)`."
    )
    logger.warning("%s", message)
    warnings.warn(message, UnpricedModelWarning, stacklevel=2)


# -- the process-wide book ------------------------------------------------------------------
_default_lock = threading.Lock()
_default_book: list[PriceBook] = []


def default_price_book() -> PriceBook:
    """The process-wide `PriceBook` on litellm's bundled map, made on first use.

    .. versionadded:: 0.1.0
    """
    if not _default_book:
        with _default_lock:
            if not _default_book:
                _default_book.append(PriceBook())
    return _default_book[0]
