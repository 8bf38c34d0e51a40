"""Proposed fixes for the hot spots the harness found, measured before/after.

NOT tokenledger's code: each proposal is applied here, in the benchmark process, by
calling a replacement next to the shipped function. Before and after alternate round by
round, as everywhere else in the harness. Run with ``python -m benchmarks --only
proposals``; the results say exactly what to change in tokenledger/ and what it buys.

P3  budgets: the input-token estimate from a cheap upper bound (bytes of the request)
    instead of running litellm's tokenizer before every budgeted call.

Landed, so no longer here: P1/P1b (the writer's calls as tuples through one precompiled
``INSERT ... ON CONFLICT DO NOTHING``, COPY on PostgreSQL: section 2 measures them), P2
(budget statements built once, one round trip per reservation, and per-process chunk
leases: section 3), P4/P5 (the schema revision read without Alembic and a lazy
``tokenledger`` package: section 5).
"""

from __future__ import annotations

from typing import Any

from benchmarks._common import Section, Timer, interleaved, log, median


def cheap_count(model: str, kwargs: dict[str, Any]) -> int:
    """P3: an upper bound on input tokens without a tokenizer: no tokenizer yields more
    tokens than the request has bytes (the bound tokenledger already falls back to)."""
    messages = kwargs.get("messages")
    return len(repr(messages or kwargs.get("input") or kwargs.get("prompt") or "").encode())


def _p3(section: Section, quick: bool) -> None:
    from benchmarks._capture_worker import MESSAGES, MODEL
    from tokenledger import _budget_scope

    kwargs = {"model": MODEL, "messages": MESSAGES * 3, "max_tokens": 64}
    n = 300 if quick else 5000
    original = _budget_scope.count_input_tokens
    original(MODEL, kwargs)

    def timed(fn: Any) -> dict[str, float]:
        with Timer() as t:
            for _ in range(n):
                fn(MODEL, kwargs)
        return {"us": t.cpu / n * 1e6}

    samples = interleaved(
        {"before": lambda: timed(original), "after": lambda: timed(cheap_count)},
        3 if quick else 9,
    )
    b = median([s["us"] for s in samples["before"]])
    a = median([s["us"] for s in samples["after"]])
    exact, bound = original(MODEL, kwargs), cheap_count(MODEL, kwargs)
    section.add(
        "P3 input-token estimate per budgeted call: before", b, "µs", extra="litellm.token_counter"
    )
    section.add(
        "P3 input-token estimate per budgeted call: after (proposal)",
        a,
        "µs",
        ratio=a / b if b else None,
        baseline="before, same run",
        extra=f"bound {bound} tokens vs exact {exact} for a 3-message prompt (over-reserves)",
    )


def run(section: Section, *, quick: bool, postgres_url: str | None) -> None:
    log("  proposals: P3 estimate ...")
    _p3(section, quick)
    section.note(
        "Measured by calling the replacement next to the shipped function in the benchmark "
        "process: a proposal, not shipped code. P1, P1b, P2, P4 and P5 have landed: "
        "sections 2, 3 and 5 measure them. See the module docstring."
    )
