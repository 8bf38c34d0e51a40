"""Helpers for testing code that uses tokenledger — yours and ours.

``temporary_ledger()`` gives an isolated SQLite ledger; ``mock_response()`` builds a
litellm ``mock_response`` payload with exactly the usage you want, cached and reasoning
tokens included, so a test goes through the real litellm code path offline::

    with temporary_ledger() as ledger, ledger.run("t"):
        litellm.completion(model="gpt-4o-mini", messages=msgs,
                           mock_response=mock_response(prompt_tokens=1200, cached_tokens=1000))

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenledger.ledger import Ledger

__all__ = ["mock_response", "temporary_ledger"]

# pydantic builds litellm's response models lazily, on their first instantiation, and
# that build is not thread-safe: threads constructing the first `Message` at once can
# fail with "type object 'Message' has no attribute '__pydantic_core_schema__'" (seen in
# CI with 4 threads). Responses are therefore built under a lock.
_build_lock = threading.Lock()


@contextlib.contextmanager
def temporary_ledger(*, capture: bool = True, **options: Any) -> Iterator[Ledger]:
    """A ledger on a fresh SQLite file that is flushed, closed and deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="tokenledger-") as tmp:
        ledger = Ledger(f"sqlite:///{Path(tmp) / 'ledger.db'}", capture=capture, **options)
        try:
            yield ledger
        finally:
            ledger.close()


def mock_response(
    content: str = "OK.",
    *,
    model: str | None = None,
    prompt_tokens: int = 10,
    completion_tokens: int = 20,
    cached_tokens: int = 0,
    cache_creation_tokens: int = 0,
    reasoning_tokens: int = 0,
    finish_reason: str = "stop",
) -> Any:
    """A ``litellm.ModelResponse`` for ``mock_response=`` carrying this exact usage.

    ``prompt_tokens`` counts every input token, cached ones included (OpenAI's
    convention); ``cached_tokens`` are cache reads and ``cache_creation_tokens`` cache
    writes, both part of ``prompt_tokens``. Imports litellm.
    """
    import litellm
    from litellm.types.utils import CompletionTokensDetailsWrapper, Usage

    extra: dict[str, Any] = {}
    if cached_tokens:
        extra["cache_read_input_tokens"] = cached_tokens
    if cache_creation_tokens:
        extra["cache_creation_input_tokens"] = cache_creation_tokens
    with _build_lock:
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            completion_tokens_details=CompletionTokensDetailsWrapper(
                reasoning_tokens=reasoning_tokens
            )
            if reasoning_tokens
            else None,
            **extra,
        )
        response = litellm.ModelResponse(
            model=model,
            choices=[
                {
                    "index": 0,
                    "finish_reason": finish_reason,
                    "message": {"role": "assistant", "content": content},
                }
            ],
        )
    response.usage = usage
    return response
