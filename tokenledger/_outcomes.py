"""Cost per successful outcome, and how runs ended: the rows and the success rule.

`tokenledger.queries` re-exports everything public here, and its module docstring
explains cost per outcome; ``tokenledger._outcome_sql`` reads the rows from the ledger.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from decimal import ROUND_HALF_EVEN, Decimal

from tokenledger.exceptions import ConfigurationError

__all__ = ["OutcomeEconomics", "OutcomeRow", "parse_success", "ratio", "success_rule"]

_RATIO_QUANTUM = Decimal("1e-6")


@dataclasses.dataclass(frozen=True, slots=True)
class OutcomeEconomics:
    """What one successful outcome costs, from the root runs of one agent (or of all).

    ``total_cost_usd`` is the cost of **every** root run in the window (errored, over
    budget, still running, or without an outcome included): failures are part of what
    a success costs. ``cost_per_success_usd`` is that total divided by ``successes``
    (None when there are none). ``success_labels`` is the success rule applied (None:
    the default rule); `success_rule` says it in words.

    Per-run figures are over the same runs; a run's cost, tokens and calls include its
    sub-agents'. ``pNN_cost_per_run_usd`` are nearest-rank percentiles (see
    `nearest_rank`): each is the cost of an actual run, never an interpolation.
    ``outcome_value_usd`` sums the values recorded with outcomes (None when no run has
    one) and ``margin_usd`` is that value minus ``total_cost_usd``. ``unpriced_calls``
    counts calls whose model had no price: their cost is missing from every figure.

    .. versionadded:: 0.1.0
    """

    agent: str | None
    success_labels: tuple[str, ...] | None
    runs: int
    successes: int
    failed_runs: int
    runs_without_outcome: int
    success_rate: Decimal
    total_cost_usd: Decimal
    cost_per_success_usd: Decimal | None
    mean_cost_per_run_usd: Decimal
    p50_cost_per_run_usd: Decimal
    p90_cost_per_run_usd: Decimal
    p99_cost_per_run_usd: Decimal
    mean_tokens_per_run: Decimal
    mean_calls_per_run: Decimal
    outcome_value_usd: Decimal | None
    margin_usd: Decimal | None
    unpriced_calls: int

    @property
    def success_rule(self) -> str:
        """What counted as a success, as a phrase: see `success_rule`."""
        return success_rule(self.success_labels)


@dataclasses.dataclass(frozen=True, slots=True)
class OutcomeRow:
    """How many runs of one agent ended with one outcome label, and what they were worth.

    ``outcome`` None groups the runs with no outcome recorded (yet). ``share`` is the
    fraction of the agent's runs in the window. ``value_usd`` sums the values recorded
    with the outcome (None when none was), over ``runs_with_value`` runs; ``cost_usd`` is
    what those runs cost, sub-agents included.

    .. versionadded:: 0.1.0
    """

    agent: str
    outcome: str | None
    runs: int
    share: Decimal
    runs_with_value: int
    value_usd: Decimal | None
    cost_usd: Decimal


# ---------------------------------------------------------------------------- parsing


def parse_success(success: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """The outcome labels that count as a success; a string is split on commas.

    None keeps the default rule (see `success_rule`).

    Raises:
        ConfigurationError: no label, or a label that is not a string.

    .. versionadded:: 0.1.0
    """
    if success is None:
        return None
    items = success.split(",") if isinstance(success, str) else list(success)
    labels: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigurationError(
                f"`success` has {item!r}; outcome labels are strings, e.g. 'resolved'."
            )
        if item.strip():
            labels.append(item.strip())
    if not labels:
        raise ConfigurationError(
            f"`success` is {success!r}; name the outcome labels that count as a success, "
            "e.g. resolved,accepted (or leave it out for the default rule)."
        )
    return tuple(dict.fromkeys(labels))


def success_rule(labels: Sequence[str] | None) -> str:
    """What counts as a successful run, in words.

    * ``labels`` given: a root run whose outcome is one of them, whatever its status
      (an outcome is the business result, often recorded later from elsewhere, and it
      wins over how the agent's code ended).
    * ``None`` (the default): a root run that ended ``ok`` **and** has an outcome
      recorded, whatever the label. This suits ledgers that record an outcome only when
      something was achieved; if you also record failures as outcomes ("rejected",
      "escalated"), name the success labels instead.

    .. versionadded:: 0.1.0
    """
    if labels is None:
        return "a run that ended ok with an outcome recorded (any label)"
    return "a run whose outcome is " + " or ".join(repr(label) for label in labels)


def ratio(numerator: Decimal | int, denominator: int) -> Decimal:
    """A rate or a per-run mean of counts, to six places (more than any reader needs)."""
    return (Decimal(numerator) / denominator).quantize(_RATIO_QUANTUM, ROUND_HALF_EVEN)
