"""Calls and figures the budget tests share.

Every call goes through real litellm with ``mock_response=`` (offline). Prices are
litellm's bundled map: gpt-4o-mini $0.15 / $0.60 per million input / output tokens,
gpt-4o $2.50 / $10. ``MESSAGES`` counts 16 input tokens, so a gpt-4o-mini call with
``max_tokens=50`` is estimated at 16 x 0.15/M + 50 x 0.60/M = $0.0000324; `ask()` makes
calls whose usage is exactly that, so cost equals estimate and the arithmetic is exact.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import multiprocessing
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import litellm
import pytest
from helpers import calls_of
from litellm.integrations.custom_logger import CustomLogger

from tokenledger import BudgetExceeded, BudgetStatus, Ledger
from tokenledger.testing import mock_response

MESSAGES = [{"role": "user", "content": "Summarise the ticket in one line."}]
PROMPT_TOKENS = 16  # litellm.token_counter(model="gpt-4o-mini", messages=MESSAGES)
MINI_CALL = Decimal("0.0000324")  # 16 x $0.15/M + 50 x $0.60/M
GPT4O_CALL = Decimal("0.00054")  # 16 x $2.50/M + 50 x $10/M
UTC = dt.timezone.utc

# litellm copies a logger in `litellm.callbacks` into its other callback lists on the
# next call, and sets up the callbacks it finds only once: restore every list afterwards,
# or the user callbacks of later tests stop firing.
CALLBACK_LISTS = (
    "callbacks",
    "input_callback",
    "success_callback",
    "failure_callback",
    "_async_input_callback",
    "_async_success_callback",
    "_async_failure_callback",
)


def ask(model: str = "gpt-4o-mini", *, max_tokens: int | None = 50, **kwargs: Any) -> Any:
    """A call that uses exactly what it reserves: 16 tokens in, ``max_tokens`` out."""
    kwargs.setdefault(
        "mock_response",
        mock_response(prompt_tokens=PROMPT_TOKENS, completion_tokens=max_tokens or 20),
    )
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    return litellm.completion(model=model, messages=MESSAGES, **kwargs)


async def aask(model: str = "gpt-4o-mini", *, max_tokens: int = 50, **kwargs: Any) -> Any:
    kwargs.setdefault(
        "mock_response", mock_response(prompt_tokens=PROMPT_TOKENS, completion_tokens=max_tokens)
    )
    return await litellm.acompletion(
        model=model, messages=MESSAGES, max_tokens=max_tokens, **kwargs
    )


class SentRequests(CustomLogger):
    """Counts the requests litellm actually starts (``log_pre_api_call``)."""

    def __init__(self) -> None:
        super().__init__()
        self.models: list[str] = []

    def log_pre_api_call(self, model: Any, messages: Any, kwargs: Any) -> None:
        self.models.append(model)


@contextlib.contextmanager
def requests_sent() -> Iterator[SentRequests]:
    """Watch the requests litellm starts; every callback list is restored afterwards."""
    import litellm.utils

    saved = {name: list(getattr(litellm, name)) for name in CALLBACK_LISTS}
    saved_setup = list(litellm.utils.callback_list)
    spy = SentRequests()
    litellm.callbacks.append(spy)
    try:
        yield spy
    finally:
        for name, callbacks in saved.items():
            getattr(litellm, name)[:] = callbacks
        litellm.utils.callback_list = saved_setup


@pytest.fixture(name="sent")
def sent_fixture() -> Iterator[SentRequests]:
    """The requests litellm starts during the test. A test module that asks for ``sent``
    imports this (pytest finds a fixture by the name it was given, not its own)."""
    with requests_sent() as spy:
        yield spy


def kill_once_holding(target: Any, db_url: str, holds: str) -> int | None:
    """Run ``target(db_url, holding)`` in a fresh interpreter (``spawn``, as another host
    would), wait until it sets ``holding``, then SIGKILL it: no exit handler runs, and
    nothing it holds is settled, flushed or given back. Returns its exit code."""
    context = multiprocessing.get_context("spawn")
    holding = context.Event()
    worker = context.Process(target=target, args=(db_url, holding))
    worker.start()
    try:
        assert holding.wait(timeout=60), f"the worker never {holds}"
    finally:
        worker.kill()
        worker.join(timeout=30)
    return worker.exitcode


def only_budget(ledger: Ledger) -> BudgetStatus:
    (status,) = ledger.budgets()
    return status


def recorded_cost(ledger: Ledger) -> Decimal:
    ledger.flush()
    return sum((c["cost_usd"] for c in calls_of(ledger)), Decimal(0))


def calls_until_refused(limit: int = 100) -> tuple[int, BudgetExceeded]:
    """Make calls until one is refused: how many went through, and the refusal."""
    for made in range(limit):
        try:
            ask()
        except BudgetExceeded as exc:
            return made, exc
    raise AssertionError(f"no call was refused in {limit}")
