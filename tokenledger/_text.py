"""Text in error messages and in the database: the two checks every argument check shares.

Kept apart from the modules that check arguments (runs, budgets) so that each can use
them without importing the other.
"""

from __future__ import annotations

__all__ = ["shown", "unstorable"]


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a megabyte-long argument must not be
    echoed whole in an error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def unstorable(text: str) -> bool:
    """True when no ledger database can store ``text``: it holds a NUL character or a
    lone surrogate (PostgreSQL refuses both)."""
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
