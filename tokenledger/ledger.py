"""The `Ledger`: where runs and calls are priced, traced and written.

A ledger is the testable unit: tests and multi-tenant programs make their own, and the
module-level ``tokenledger.run`` / ``agent`` / ``configure`` use a process-wide default.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from tokenledger import capture as _capture
from tokenledger._recorder import Recorder
from tokenledger._run_args import latency_ms as checked_latency
from tokenledger._run_args import reported_cost
from tokenledger._spans import Telemetry
from tokenledger._startup import check_schema, connect_in_background
from tokenledger._text import shown
from tokenledger.exceptions import (
    ConfigurationError,
    LedgerError,
)
from tokenledger.records import CallRecord, PriceRecord, new_call, utcnow
from tokenledger.runs import Run, RunContext, agent_decorator, current_run, new_run_context

if TYPE_CHECKING:
    import sqlalchemy

    from tokenledger._writer import BatchWriter
    from tokenledger.budgets import Budget, BudgetStatus
    from tokenledger.pricing import PriceBook
    from tokenledger.queries import OutcomeEconomics, ReportRow

__all__ = ["Ledger", "configure", "default_ledger"]

logger = logging.getLogger("tokenledger")

P = ParamSpec("P")
R = TypeVar("R")


class Ledger:
    """A token ledger backed by one SQL database.

    Args:
        url: SQLAlchemy URL of the ledger database. ``None`` uses
            ``TOKENLEDGER_DATABASE_URL``, else ``tokenledger.db`` in the working directory.
            A new database is created and migrated on first use; one at an older schema
            revision must be upgraded with ``tokenledger db upgrade``.
        capture: record litellm calls automatically (no change at the call site).
        record_calls_outside_runs: also record calls made outside any run (with no run).
        flush_interval: the longest a recorded row waits in memory before it is written.
        price_book: where prices come from; defaults to litellm's bundled price map.
        budget_lease_seconds: how long a crashed process's budget reservation is held
            before any process may reclaim it.
        default_max_output_tokens: the output bound of a budget estimate when a call
            has no ``max_tokens`` and the model's output limit is unknown.
        budget_failure_policy: ``fail_closed`` (default) refuses budgeted calls while
            the database is unreachable; ``fail_open`` lets them through, logged and
            counted.
        durability: ``batched`` (default; a killed process loses at most the rows of
            the last ``flush_interval``) or ``durable`` (each row reaches the database
            or a local spool file before the call returns). See docs/reliability.md.
        max_buffer_rows: rows held in memory during an outage before they spill to
            the local spool (never dropped).
        spool_dir: where the spool lives (default: next to a SQLite ledger, else
            ``~/.cache/tokenledger/spool``).
        budget_timeout: the longest a call waits for the database on a budget
            operation, in seconds; a database that has not answered by then (hung, or
            locked by another process) is treated as unreachable and
            ``budget_failure_policy`` decides. Default: 2 s on PostgreSQL; 30 s on
            SQLite (its busy timeout), where processes sharing one file queue for its
            write lock and a shorter wait would refuse calls under load.
        startup_timeout: the longest ``Ledger(...)`` waits for the database to check
            its schema. An unreachable (or hung) database does not stop the program:
            the ledger starts degraded, keeps and spools its rows, applies
            ``budget_failure_policy`` to budgeted calls, and checks the schema in the
            background until the database answers. See docs/reliability.md.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        capture: bool = True,
        record_calls_outside_runs: bool = True,
        flush_interval: float = 1.0,
        price_book: PriceBook | None = None,
        budget_lease_seconds: float = 120.0,
        default_max_output_tokens: int = 4096,
        budget_failure_policy: str = "fail_closed",
        durability: str = "batched",
        max_buffer_rows: int = 100_000,
        spool_dir: str | os.PathLike[str] | None = None,
        budget_timeout: float | None = None,
        startup_timeout: float = 5.0,
    ) -> None:
        from tokenledger import _storage as storage
        from tokenledger._enforcer import BudgetEnforcer
        from tokenledger._writer import BatchWriter

        if not isinstance(flush_interval, (int, float)) or not 0 < flush_interval <= 3600:
            raise ConfigurationError(
                f"`flush_interval` is {flush_interval!r}; it must be a number of seconds "
                "greater than 0 and at most 3600."
            )
        self.capture = capture
        self.record_calls_outside_runs = record_calls_outside_runs
        self._engine: sqlalchemy.Engine = storage.create_engine_for(url)
        if budget_timeout is None:
            budget_timeout = 2.0 if self._engine.dialect.name == "postgresql" else 30.0
        for name, value in (
            ("budget_timeout", budget_timeout),
            ("startup_timeout", startup_timeout),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 < value <= 600
            ):
                raise ConfigurationError(
                    f"`{name}` is {shown(value)}; it must be a number of seconds greater than "
                    "0 and at most 600."
                )
        #: False while the database has not answered since start-up (see `startup_timeout`).
        self.connected = check_schema(self._engine, float(startup_timeout))
        writer = BatchWriter(
            self._engine,
            max_delay=float(flush_interval),
            durability=durability,  # type: ignore[arg-type]  # validated by the writer
            max_buffer_rows=max_buffer_rows,
            spool_dir=spool_dir,
        )
        self._price_book = price_book
        self._closed = False
        #: The call pipeline: runs, pending calls and integrations record through it.
        self.recorder = Recorder(writer=writer, telemetry=Telemetry(), prices=lambda: self.prices)
        if not isinstance(budget_lease_seconds, (int, float)) or not budget_lease_seconds > 0:
            raise ConfigurationError(
                f"`budget_lease_seconds` is {budget_lease_seconds!r}; it must be a positive "
                "number of seconds (how long a crashed process's reservation is held)."
            )
        if not isinstance(default_max_output_tokens, int) or default_max_output_tokens <= 0:
            raise ConfigurationError(
                f"`default_max_output_tokens` is {default_max_output_tokens!r}; it must be a "
                "positive whole number of tokens."
            )
        self._budgets = self.recorder.budgets = BudgetEnforcer(
            self,
            lease_seconds=float(budget_lease_seconds),
            default_max_output_tokens=default_max_output_tokens,
            failure_policy=budget_failure_policy,
            io_timeout=float(budget_timeout),
        )
        if self.connected:
            # Read the budgets now, while the database is known to be up, so a later
            # outage keeps enforcing the last budgets seen.
            self._read_budgets()
        else:
            connect_in_background(
                self._engine, stopped=lambda: self._closed, connected=self._connected
            )
        if capture:
            _capture.set_capture_ledger(self)
            from tokenledger import _litellm

            _litellm.install_when_imported()

    # -- start-up ---------------------------------------------------------------------
    def _connected(self) -> None:
        self._read_budgets()
        self.connected = True

    def _read_budgets(self) -> None:
        try:
            self._budgets.store.definitions(fresh=True)
        except LedgerError as exc:
            logger.warning("tokenledger could not read its budgets yet: %s", exc)

    # -- where the data goes ------------------------------------------------------------
    @property
    def url(self) -> str:
        """The database URL, with any password hidden."""
        from tokenledger._storage import redact_url

        return redact_url(self._engine.url)

    @property
    def path(self) -> str | None:
        """The SQLite file of this ledger, or None for a server database."""
        from tokenledger._storage import database_path

        return database_path(self._engine.url)

    @property
    def _writer(self) -> BatchWriter:
        # Tests swap the writer (a durable one, a stalled one) through this.
        return self.recorder.writer

    @_writer.setter
    def _writer(self, writer: BatchWriter) -> None:
        self.recorder.writer = writer

    @property
    def engine(self) -> sqlalchemy.Engine:
        return self._engine

    @property
    def prices(self) -> PriceBook:
        if self._price_book is None:
            # One book per ledger, so prices set on one ledger never leak into another;
            # the parsed litellm map behind them is shared and loaded once per process.
            from tokenledger.pricing import PriceBook

            self._price_book = PriceBook()
        return self._price_book

    # -- marking runs -------------------------------------------------------------------
    def run(
        self,
        name: str,
        *,
        tags: Mapping[str, object] | None = None,
        budget: Budget | None = None,
    ) -> RunContext:
        """Start a run: ``with ledger.run("triage", tags={"user": "42"}) as run:``.

        Works with ``async with`` too. A run started inside another is its child and
        inherits its tags. .. versionadded:: 0.1.0
        """
        return new_run_context(self, name, tags=tags, budget=budget)

    @overload
    def agent(self, name: Callable[P, R], /) -> Callable[P, R]: ...

    @overload
    def agent(
        self,
        name: str | None = None,
        /,
        *,
        tags: Mapping[str, object] | None = None,
        budget: Budget | None = None,
        outcome: Callable[[Any], Any] | None = None,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]: ...

    def agent(
        self,
        name: Any = None,
        /,
        *,
        tags: Mapping[str, object] | None = None,
        budget: Budget | None = None,
        outcome: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Decorate an agent function so each call of it is one run.

        Sync, async, generator and async-generator functions are supported; the
        decorated function keeps its signature. ``name`` defaults to the function's
        qualified name. ``outcome`` maps the return value to an outcome label, or to a
        ``(label, value)`` pair, or to None for no outcome. .. versionadded:: 0.1.0
        """
        return agent_decorator(lambda: self, name, tags=tags, budget=budget, outcome=outcome)

    @staticmethod
    def current_run() -> Run | None:
        return current_run()

    # -- prices -------------------------------------------------------------------------
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

        .. versionadded:: 0.1.0
        """
        price = self.prices.set_price(
            model,
            input_per_million=input_per_million,
            output_per_million=output_per_million,
            cache_read_per_million=cache_read_per_million,
            cache_write_per_million=cache_write_per_million,
            reasoning_per_million=reasoning_per_million,
            provider=provider,
        )
        self.recorder.put_price(price)
        return price

    # -- budgets ------------------------------------------------------------------------
    def set_budget(
        self,
        scope: str,
        *,
        usd: Any = None,
        tokens: int | None = None,
        per: str = "day",
        action: str = "raise",
        downgrade_to: Sequence[str] = (),
    ) -> BudgetStatus:
        """Set (or replace) a shared budget, enforced before every call in every process.

        ``scope`` is ``global``, ``agent:NAME``, ``user:ID``, ``tenant:ID`` or any
        ``TAGKEY:VALUE`` matched against run tags; ``per`` is ``hour``, ``day``, ``week``,
        ``month`` (UTC calendar windows) or ``total``; ``action`` is ``raise``, ``warn``
        or ``downgrade`` (with ``downgrade_to``, cheaper models tried in order).
        .. versionadded:: 0.1.0
        """
        definition = self._budgets.set_budget(
            scope, usd=usd, tokens=tokens, per=per, action=action, downgrade_to=downgrade_to
        )
        return next(
            b for b in self.budgets() if (b.scope, b.per) == (definition.scope, definition.per)
        )

    def budgets(self) -> list[BudgetStatus]:
        """Every shared budget with its current window: limit, spent, reserved, remaining,
        and when the window resets. Expired reservations are reclaimed first."""
        return self._budgets.store.status()

    def remove_budget(self, scope: str, *, per: str | None = None) -> int:
        """Remove a budget (every window of ``scope`` unless ``per`` is given); returns
        how many were removed."""
        from tokenledger.budgets import parse_scope

        return self._budgets.store.remove(parse_scope(scope), per)

    # -- reading the ledger -------------------------------------------------------------
    def report(
        self,
        *,
        by: str | Sequence[str] = ("agent",),
        since: str | dt.datetime | None = None,
        until: str | dt.datetime | None = None,
        root_only: bool = True,
    ) -> list[ReportRow]:
        """Cost and tokens grouped by agent, model, provider, status, day, hour, outcome
        or ``tag:KEY``: ``ledger.report(by=["agent", "model"], since="7d")``.

        Flushes first, so it includes everything recorded so far. .. versionadded:: 0.1.0
        """
        from tokenledger.queries import parse_since, report

        self.flush()
        return report(
            self._engine,
            by=by,
            since=parse_since(since) if since is not None else None,
            until=parse_since(until) if until is not None else None,
            root_only=root_only,
        )

    def cost_per_outcome(
        self,
        *,
        agent: str | None = None,
        success: Sequence[str] | None = None,
        since: str | dt.datetime | None = None,
    ) -> OutcomeEconomics:
        """Cost per successful outcome of an agent: the cost of ALL its runs (failed and
        abandoned included) divided by its successes, with the success rate and the
        p50/p90/p99 cost per run. ``success`` lists the outcome labels that count as a
        success (default: any outcome on a run that ended ok). .. versionadded:: 0.1.0
        """
        from tokenledger.queries import cost_per_outcome, parse_since

        self.flush()
        return cost_per_outcome(
            self._engine,
            agent=agent,
            success=success,
            since=parse_since(since) if since is not None else None,
        )

    # -- outcomes -----------------------------------------------------------------------
    def set_outcome(self, run_id: str, label: str, value: Any = None) -> None:
        """Record a run's outcome after the fact, from any process — outcomes are often
        known hours later (the user accepted the answer, the ticket closed).

        Raises `ConfigurationError` when no run has that id. .. versionadded:: 0.1.0
        """
        import sqlalchemy as sa

        from tokenledger._run_args import parse_outcome
        from tokenledger._storage import runs

        label, amount = parse_outcome(label, value)
        self.flush()  # the run may still be in this process's buffer
        with self._engine.begin() as conn:
            updated = conn.execute(
                sa.update(runs)
                .where(runs.c.id == run_id)
                .values(outcome=label, outcome_value=amount, outcome_at=utcnow())
            ).rowcount
        if updated != 1:
            raise ConfigurationError(
                f"No run with id {run_id!r} is in the ledger at {self.url}; check the id "
                "(`tokenledger runs` lists them)."
            )

    # -- low-level recording ------------------------------------------------------------
    def record_call(
        self,
        model: str,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        provider: str | None = None,
        operation: str = "chat",
        latency_ms: float | None = None,
        status: str = "ok",
        error_type: str | None = None,
        cost_usd: Any = None,
        streamed: bool = False,
    ) -> CallRecord:
        """Record a model call tokenledger did not capture itself.

        It is priced, attributed to the current run, traced and written like a captured
        call. ``cost_usd`` records a cost the provider reported (source ``provider``).
        Bad counts raise `UsageError`. .. versionadded:: 0.1.0
        """
        from tokenledger.usage import usage_from_response

        usage = usage_from_response(
            {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cache_read_input_tokens": cache_read_tokens,
                "cache_creation_input_tokens": cache_write_tokens,
                "reasoning_tokens": reasoning_tokens,
                "tokenledger_shape": "canonical",
            }
        )
        if status not in ("ok", "error", "abandoned", "refused"):
            raise ConfigurationError(
                f"`status` is {shown(status)}; it must be one of ok, error, abandoned, refused."
            )
        if not isinstance(model, str) or not model.strip():
            raise ConfigurationError(
                f"`model` is {shown(model)}; name the model the call used, e.g. 'gpt-4o-mini'."
            )
        cost_usd = reported_cost(cost_usd)
        latency_ms = checked_latency(latency_ms)
        run = current_run()
        call = new_call(run, operation=operation, model=model, streamed=streamed)
        return self.recorder.record_finished(
            run,
            call,
            provider=provider,
            status=status,
            usage=usage,
            model=model,
            error_type=error_type,
            provider_cost={"cost": cost_usd} if cost_usd is not None else None,
            latency_ms=latency_ms,
        )

    # -- lifecycle ----------------------------------------------------------------------
    def flush(self, timeout: float | None = 10.0) -> bool:
        """Write every recorded row now; True when all landed within ``timeout``."""
        return self.recorder.writer.flush(timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Flush, stop the writer and release the database connections."""
        if self._closed:
            return
        self._closed = True
        if _capture.capture_ledger() is self:
            _capture.set_capture_ledger(None)
        self.recorder.writer.close(timeout)
        self._budgets.store.dispose()
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Ledger {self.url}>"


# -- the process-wide default ledger ---------------------------------------------------
_default_lock = threading.Lock()
_default: Ledger | None = None


def default_ledger() -> Ledger:
    """The process-wide ledger used by ``tokenledger.run`` and ``tokenledger.agent``."""
    global _default
    ledger = _default
    if ledger is not None:
        return ledger
    with _default_lock:
        if _default is None:
            _default = Ledger()
        return _default


def configure(
    url: str | None = None,
    *,
    capture: bool = True,
    record_calls_outside_runs: bool = True,
    flush_interval: float = 1.0,
    durability: str = "batched",
    otlp_endpoint: str | None = None,
    otlp_headers: Mapping[str, str] | None = None,
    service_name: str | None = None,
) -> Ledger:
    """Set up the process-wide default ledger (replacing any earlier one).

    ``otlp_endpoint`` installs an OpenTelemetry SDK that exports spans and metrics over
    OTLP/HTTP (needs ``pip install 'tokenledger[otel]'``). Without it, the standard
    variables do the same when no tracer provider is set yet: ``OTEL_EXPORTER_OTLP_ENDPOINT``
    (or ``..._TRACES_ENDPOINT``), with ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_SERVICE_NAME``
    and ``OTEL_RESOURCE_ATTRIBUTES``; ``OTEL_SDK_DISABLED=true`` switches that off.
    ``service_name`` overrides the environment's; with neither, it is ``tokenledger``.
    .. versionadded:: 0.1.0
    """
    global _default
    from tokenledger import _spans as spans

    if otlp_endpoint is not None:
        spans.setup_otlp(otlp_endpoint, service_name=service_name, headers=otlp_headers)
    elif spans.otlp_configured_by_environment() and not spans.sdk_tracer_provider_is_set():
        spans.setup_otlp(None, service_name=service_name, headers=otlp_headers)
    ledger = Ledger(
        url,
        capture=capture,
        record_calls_outside_runs=record_calls_outside_runs,
        flush_interval=flush_interval,
        durability=durability,
    )
    with _default_lock:
        old, _default = _default, ledger
    if old is not None:
        old.close()
        if capture:
            _capture.set_capture_ledger(ledger)
    return ledger
