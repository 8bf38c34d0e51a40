"""The rows tokenledger writes: one shape per table, shared by capture, storage and queries.

These are plain dataclasses so the hot path builds them without touching SQLAlchemy; the
storage layer turns them into rows with `as_row()`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import os
import uuid
from decimal import Decimal
from typing import Any, Literal, Protocol

__all__ = [
    "CallRecord",
    "CallStatus",
    "CostSource",
    "PriceRecord",
    "RunRecord",
    "RunStatus",
    "TokenUsage",
    "new_call",
    "new_id",
    "utcnow",
]

RunStatus = Literal["running", "ok", "error", "budget_exceeded"]
CallStatus = Literal["ok", "error", "abandoned", "refused"]
CostSource = Literal["local", "provider", "charge"]


class _IdSource:
    """Row ids: a random per-process prefix and a counter, 32 hex digits in all.

    Generated client-side so a retried write can never duplicate a row. A uuid4 per
    row costs a system call; this costs a counter increment. The prefix (80 random
    bits) is drawn again in a forked child so parent and child never collide.
    """

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = uuid.uuid4().hex[:20]
        self.counter = itertools.count(int.from_bytes(os.urandom(2), "big") << 32)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter) & 0xFFFFFFFFFFFF:012x}"


_ids = _IdSource()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.reseed)


def new_id() -> str:
    """A new client-generated row id (32 hex digits)."""
    return _ids.next()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclasses.dataclass(frozen=True, slots=True)
class TokenUsage:
    """The token breakdown of one model call, in OpenTelemetry's convention.

    ``input_tokens`` includes cached tokens (cache reads and cache writes), as
    ``gen_ai.usage.input_tokens`` does; ``output_tokens`` includes reasoning tokens.
    So the uncached, full-price input is ``input_tokens - cache_read_tokens -
    cache_write_tokens`` and the visible output is ``output_tokens - reasoning_tokens``.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def uncached_input_tokens(self) -> int:
        return max(self.input_tokens - self.cache_read_tokens - self.cache_write_tokens, 0)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_read_tokens + other.cache_read_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
        )


@dataclasses.dataclass(slots=True)
class PriceRecord:
    """One version of one model's price, as used to cost a call.

    ``id`` is a content hash of everything that determines a cost, so the same price
    is stored once and a changed price gets a new row; calls point at the version they
    were priced with, which keeps old costs reproducible.
    Amounts are USD per single token.
    """

    id: str
    model: str
    provider: str | None
    input_per_token: Decimal
    output_per_token: Decimal
    cache_read_per_token: Decimal | None
    cache_write_per_token: Decimal | None
    reasoning_per_token: Decimal | None
    # Tiered prices: a list of {"above_input_tokens": N, "input_per_token": ..., ...}
    # applied when the call's input passes the threshold (litellm's "above_200k" keys).
    tiers: list[dict[str, Any]] | None
    source: str  # "litellm <version>" or "user"
    created_at: dt.datetime = dataclasses.field(default_factory=utcnow)

    def as_row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(slots=True)
class CallRecord:
    """One model call: one provider attempt, retries and fallbacks each getting their own."""

    id: str
    run_id: str | None
    root_run_id: str | None
    operation: str  # gen_ai.operation.name: chat, embeddings, text_completion, execute_tool
    provider: str | None
    requested_model: str | None
    model: str | None  # the model that served the call, as the provider reported it
    started_at: dt.datetime
    ended_at: dt.datetime | None = None
    latency_ms: float | None = None
    streamed: bool = False
    status: CallStatus = "ok"
    error_type: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    # True when the counts were computed by tokenledger (no usage from the provider).
    usage_estimated: bool = False
    # NULL when the model has no known price: never recorded as $0.
    cost_usd: Decimal | None = None
    cost_source: CostSource | None = None
    price_id: str | None = None
    finish_reasons: list[str] | None = None
    litellm_call_id: str | None = None
    trace_id: str | None = None  # 32 hex digits, or None when no span was recording
    span_id: str | None = None  # 16 hex digits
    max_tokens: int | None = None
    tool_name: str | None = None  # execute_tool rows: the tool or resource charged

    @property
    def usage(self) -> TokenUsage:
        return TokenUsage(
            self.input_tokens,
            self.output_tokens,
            self.cache_read_tokens,
            self.cache_write_tokens,
            self.reasoning_tokens,
        )

    def set_usage(self, usage: TokenUsage) -> None:
        self.input_tokens = usage.input_tokens
        self.output_tokens = usage.output_tokens
        self.cache_read_tokens = usage.cache_read_tokens
        self.cache_write_tokens = usage.cache_write_tokens
        self.reasoning_tokens = usage.reasoning_tokens

    @property
    def priced(self) -> bool:
        return self.cost_usd is not None

    def as_row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class _RunIds(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def root_id(self) -> str: ...


def new_call(
    run: _RunIds | None,
    *,
    operation: str,
    model: str | None,
    started_at: dt.datetime | None = None,
    **fields: Any,
) -> CallRecord:
    """The record of a call starting now (or at ``started_at``) in ``run`` (None: in no
    run) that asked for ``model``; ``fields`` sets any other `CallRecord` field."""
    return CallRecord(
        id=new_id(),
        run_id=run.id if run is not None else None,
        root_run_id=run.root_id if run is not None else None,
        operation=operation,
        provider=None,
        requested_model=model,
        model=None,
        started_at=utcnow() if started_at is None else started_at,
        **fields,
    )


@dataclasses.dataclass(slots=True)
class RunRecord:
    """One execution of an agent; totals include every descendant run's calls."""

    id: str
    name: str
    parent_id: str | None
    root_id: str
    tags: dict[str, str]
    started_at: dt.datetime
    ended_at: dt.datetime | None = None
    status: RunStatus = "running"
    error_type: str | None = None
    calls: int = 0
    failed_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    # Calls in this run (or below) whose model had no price: cost_usd excludes them.
    unpriced_calls: int = 0
    trace_id: str | None = None
    span_id: str | None = None
    outcome: str | None = None
    outcome_value: Decimal | None = None
    outcome_at: dt.datetime | None = None

    def add_call(self, call: CallRecord) -> None:
        """Count a finished call (this run's own or a descendant's) in these totals.

        A call with no cost is "unpriced" when it succeeded or used tokens; a failed
        call that used nothing cost nothing and is not.
        """
        self.calls += 1
        if call.status != "ok":
            self.failed_calls += 1
        self.input_tokens += call.input_tokens
        self.output_tokens += call.output_tokens
        self.cache_read_tokens += call.cache_read_tokens
        self.cache_write_tokens += call.cache_write_tokens
        self.reasoning_tokens += call.reasoning_tokens
        if call.cost_usd is not None:
            self.cost_usd += call.cost_usd
        elif call.status == "ok" or call.input_tokens or call.output_tokens:
            self.unpriced_calls += 1

    def as_row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
