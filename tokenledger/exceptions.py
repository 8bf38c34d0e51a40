"""Every error tokenledger raises on purpose.

Accounting never raises into the user's agent loop by accident: a failure to write a
span or a row is logged and retried. The errors here are raised for bad configuration
or bad input given directly to tokenledger, and for budget enforcement.
"""

from __future__ import annotations

__all__ = [
    "BudgetExceeded",
    "BudgetWarning",
    "CaptureUnsupportedError",
    "ConfigurationError",
    "LedgerError",
    "PriceError",
    "SchemaVersionError",
    "TokenledgerError",
    "UnpricedModelWarning",
    "UsageError",
]


class TokenledgerError(Exception):
    """Base class of every error tokenledger raises on purpose."""


class ConfigurationError(TokenledgerError, ValueError):
    """Raised when an argument given to tokenledger (a URL, a tag, an option) is invalid.

    The message names the argument, the bad value, and how to fix it.
    """


class UsageError(TokenledgerError, ValueError):
    """Raised when token usage reported for a call is impossible.

    Negative, NaN, non-integer or absurd counts (more than a billion tokens in one
    call), or a usage object whose shape tokenledger does not know. The call is still
    recorded, with its usage marked as unknown, when this happens during capture; the
    error is raised only to callers of `Ledger.record_call` who passed bad numbers.
    """


class PriceError(TokenledgerError, ValueError):
    """Raised when a user-supplied price is negative, not a number, or incomplete."""


class LedgerError(TokenledgerError, RuntimeError):
    """Raised when the ledger database cannot be used: unreachable, or not migrated."""


class SchemaVersionError(LedgerError):
    """Raised when the ledger database is at a schema revision this code does not know.

    Either the database is older (run ``tokenledger db upgrade``) or newer (install the
    tokenledger version that wrote it). tokenledger refuses to write in both cases
    rather than guess.
    """


class BudgetExceeded(TokenledgerError):
    """Raised before a model call that would push a budget past its limit.

    No request was sent. The run is marked ``budget_exceeded``.
    """


class CaptureUnsupportedError(TokenledgerError, RuntimeError):
    """Raised when capture is switched on and the installed litellm lacks the
    interception points it relies on (``litellm.utils.function_setup`` and
    ``update_response_metadata``); pin litellm to the supported range.
    """


class BudgetWarning(UserWarning):
    """Emitted when a call passes a budget whose action is ``warn`` (the call proceeds)."""


class UnpricedModelWarning(UserWarning):
    """Emitted once per process for each model that has no known price.

    Its calls are still recorded, with their tokens and a NULL cost.

    .. versionadded:: 0.1.0
    """
