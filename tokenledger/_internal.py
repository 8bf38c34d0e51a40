"""Internal errors: tokenledger's own bugs never break the user's program.

Accounting runs inside the user's agent loop. When tokenledger itself fails (a bug,
not bad input and not a database outage, which have their own handling), the failure
is logged with its traceback and the user's code goes on. Under pytest the same
failure is raised instead, so a bug in tokenledger fails tokenledger's own tests rather
than hiding in a log line. ``TOKENLEDGER_RAISE_INTERNAL_ERRORS=1`` (or ``0``) forces
either behaviour; fault-injection tests set ``0`` to check that the user's code goes on.
"""

from __future__ import annotations

import logging
import os

__all__ = ["internal_error", "raises_internal_errors"]

logger = logging.getLogger("tokenledger")


def raises_internal_errors() -> bool:
    """True when internal errors are raised rather than logged (see the module doc)."""
    forced = os.environ.get("TOKENLEDGER_RAISE_INTERNAL_ERRORS")
    if forced is not None:
        return forced.strip().lower() in ("1", "true", "yes")
    return "PYTEST_CURRENT_TEST" in os.environ


def internal_error(exc: BaseException, message: str, *args: object) -> None:
    """Report ``exc``, caught inside tokenledger: log it as ``tokenledger <message>``
    with its traceback and return, or raise it under pytest.

    Call it from an ``except Exception as exc:`` block.
    """
    if raises_internal_errors():
        raise exc
    logger.error("tokenledger " + message, *args, exc_info=exc)
