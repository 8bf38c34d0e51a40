"""tokenledger: token accounting for LLM agent loops.

Every model call inside a run is captured, priced, traced and saved to a SQL ledger::

    import tokenledger as tl

    @tl.agent("researcher")
    def research(question: str) -> str:
        return litellm.completion(model="gpt-4o-mini", messages=[...]).choices[0]...

Importing this package does not import litellm or any provider SDK.
"""

from __future__ import annotations

import os as _os
import sys as _sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from tokenledger._version import __version__

if "litellm" not in _sys.modules:
    # litellm fetches its price map from the internet at import, retrying for seconds
    # when offline. tokenledger prices from the map bundled with the installed litellm,
    # so ask litellm to use that one too, unless the user has said otherwise.
    _os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from tokenledger.exceptions import (
    BudgetExceeded,
    BudgetWarning,
    CaptureUnsupportedError,
    ConfigurationError,
    LedgerError,
    PriceError,
    SchemaVersionError,
    TokenledgerError,
    UnpricedModelWarning,
    UsageError,
)

if TYPE_CHECKING:
    from tokenledger.budgets import Budget, BudgetStatus
    from tokenledger.ledger import Ledger, configure, default_ledger
    from tokenledger.records import CallRecord, RunRecord, TokenUsage
    from tokenledger.runs import Run, RunContext, bind_context, current_run

__all__ = [
    "Budget",
    "BudgetExceeded",
    "BudgetStatus",
    "BudgetWarning",
    "CallRecord",
    "CaptureUnsupportedError",
    "ConfigurationError",
    "Ledger",
    "LedgerError",
    "PriceError",
    "Run",
    "RunContext",
    "RunRecord",
    "SchemaVersionError",
    "TokenUsage",
    "TokenledgerError",
    "UnpricedModelWarning",
    "UsageError",
    "__version__",
    "agent",
    "bind_context",
    "configure",
    "current_run",
    "default_ledger",
    "flush",
    "run",
]

# Where each name not defined above lives. They are imported on first use (PEP 562):
# the ledger brings OpenTelemetry and the capture machinery with it, which the
# `tokenledger` command, importing `tokenledger.cli` and so this package, never needs.
_LAZY = {
    "Budget": "tokenledger.budgets",
    "BudgetStatus": "tokenledger.budgets",
    "CallRecord": "tokenledger.records",
    "Ledger": "tokenledger.ledger",
    "Run": "tokenledger.runs",
    "RunContext": "tokenledger.runs",
    "RunRecord": "tokenledger.records",
    "TokenUsage": "tokenledger.records",
    "bind_context": "tokenledger.runs",
    "configure": "tokenledger.ledger",
    "current_run": "tokenledger.runs",
    "default_ledger": "tokenledger.ledger",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


P = ParamSpec("P")
R = TypeVar("R")


def run(
    name: str, *, tags: Mapping[str, object] | None = None, budget: Budget | None = None
) -> RunContext:
    """Start a run on the default ledger: ``with tokenledger.run("triage") as run:``."""
    from tokenledger.ledger import default_ledger

    return default_ledger().run(name, tags=tags, budget=budget)


@overload
def agent(name: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def agent(
    name: str | None = None,
    /,
    *,
    tags: Mapping[str, object] | None = None,
    budget: Budget | None = None,
    outcome: Callable[[Any], Any] | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def agent(
    name: Any = None,
    /,
    *,
    tags: Mapping[str, object] | None = None,
    budget: Budget | None = None,
    outcome: Callable[[Any], Any] | None = None,
) -> Any:
    """Decorate an agent function; each call is a run on the default ledger.

    The default ledger is looked up when the function is called, not when it is
    decorated, so ``tokenledger.configure(...)`` may come after the decorator. Accepts
    and refuses exactly what `Ledger.agent` does.
    """
    from tokenledger.ledger import default_ledger
    from tokenledger.runs import agent_decorator

    return agent_decorator(default_ledger, name, tags=tags, budget=budget, outcome=outcome)


def flush(timeout: float | None = 10.0) -> bool:
    """Write every row the default ledger holds; True when all landed in time."""
    from tokenledger.ledger import default_ledger

    return default_ledger().flush(timeout)
