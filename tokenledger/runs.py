"""Runs: one execution of an agent, marked by a decorator or a ``with`` block.

The current run is held in a ``ContextVar``, so it follows asyncio tasks automatically
and is restored in ``finally`` blocks. Worker threads do not inherit context variables;
wrap the function you hand to a thread with `bind_context`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from opentelemetry import context as otel_context
from opentelemetry import trace

from tokenledger._run_args import (
    MAX_NAME_LENGTH,
    check_run_budget,
    check_run_name,
    parse_outcome,
    parse_usd_amount,
    validate_tags,
)
from tokenledger._text import shown
from tokenledger.exceptions import BudgetExceeded, ConfigurationError
from tokenledger.records import CallRecord, RunRecord, new_call, new_id, utcnow

if TYPE_CHECKING:
    from tokenledger._recorder import CallRecorder
    from tokenledger.budgets import Budget
    from tokenledger.ledger import Ledger

__all__ = ["Run", "RunContext", "bind_context", "current_run"]

P = ParamSpec("P")
R = TypeVar("R")

_current_run: contextvars.ContextVar[Run | None] = contextvars.ContextVar(
    "tokenledger_current_run", default=None
)


def current_run() -> Run | None:
    """The run the calling code is inside, or None."""
    return _current_run.get()


def bind_context(fn: Callable[P, R]) -> Callable[P, R]:
    """Return ``fn`` bound to the caller's current run (and OpenTelemetry context).

    Threads do not inherit context variables, so a model call made in a worker thread
    would otherwise be recorded outside the run::

        with tokenledger.run("fan-out"):
            pool.submit(tokenledger.bind_context(summarise), doc)
    """
    ctx = contextvars.copy_context()

    @functools.wraps(fn)
    def bound(*args: P.args, **kwargs: P.kwargs) -> R:
        # A Context cannot be entered twice at once; copy it per call so the bound
        # function can run in several threads concurrently.
        return ctx.copy().run(fn, *args, **kwargs)

    return bound


class Run:
    """One execution of an agent: its identity, tags, and running totals.

    Totals (``calls``, tokens, ``cost_usd``) include the calls of every descendant run.
    Each call belongs to exactly one run, the innermost one it was made in, and is added
    once to that run and once to each ancestor.
    """

    __slots__ = (
        "_ended",
        "_lock",
        "_otel_token",
        "_recorder",
        "_span",
        "_token",
        "budget",
        "ledger",
        "parent",
        "record",
        "root",
    )

    record: RunRecord
    parent: Run | None
    root: Run

    def __init__(
        self,
        ledger: Ledger,
        name: str,
        *,
        tags: dict[str, str],
        parent: Run | None,
        budget: Budget | None = None,
    ) -> None:
        self.ledger = ledger
        self._recorder: CallRecorder = ledger.recorder
        self.parent = parent
        self.root: Run = parent.root if parent is not None else self
        run_id = new_id()
        merged = {**parent.record.tags, **tags} if parent is not None else tags
        self.record = RunRecord(
            id=run_id,
            name=name,
            parent_id=parent.id if parent is not None else None,
            root_id=self.root.id if parent is not None else run_id,
            tags=merged,
            started_at=utcnow(),
        )
        self.budget = budget
        # One lock per run tree: calls from many threads update a run and its ancestors.
        self._lock: threading.Lock = parent._lock if parent is not None else threading.Lock()
        self._span: trace.Span | None = None
        self._token: contextvars.Token[Run | None] | None = None
        self._otel_token: object | None = None
        self._ended = False

    # -- identity -----------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.record.id

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.record.tags)

    @property
    def parent_id(self) -> str | None:
        return self.record.parent_id

    @property
    def root_id(self) -> str:
        return self.record.root_id

    @property
    def status(self) -> str:
        return self.record.status

    @property
    def span(self) -> trace.Span | None:
        return self._span

    # -- totals -------------------------------------------------------------------------
    @property
    def calls(self) -> int:
        return self.record.calls

    @property
    def cost_usd(self) -> Decimal:
        return self.record.cost_usd

    @property
    def input_tokens(self) -> int:
        return self.record.input_tokens

    @property
    def output_tokens(self) -> int:
        return self.record.output_tokens

    def add_call(self, call: CallRecord) -> None:
        """Add a finished call to this run and every ancestor."""
        rewrite: list[RunRecord] = []
        with self._lock:
            run: Run | None = self
            while run is not None:
                run.record.add_call(call)
                if run._ended:
                    # A late call (a stream finished after its run) updates a run that
                    # was already written: write it again so the ledger stays right.
                    rewrite.append(run.snapshot())
                run = run.parent
        for snapshot in rewrite:
            self._recorder.put_run(snapshot)

    def snapshot(self) -> RunRecord:
        rec = self.record
        return RunRecord(**{**rec.as_row(), "tags": dict(rec.tags)})

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Open the run (its span and row) and make it current in this context.

        `RunContext` and the agent decorator call it; integrations call it (then
        `detach`) for runs a framework's callbacks open.
        """
        parent_span = self.parent._span if self.parent is not None else None
        span = self._recorder.telemetry.start_run_span(
            self.name, self.id, self.record.tags, parent_span
        )
        self._span = span
        self.record.trace_id, self.record.span_id = _ids(span)
        self._token = _current_run.set(self)
        self._otel_token = otel_context.attach(trace.set_span_in_context(span))
        self._recorder.run_started(self)

    def detach(self) -> None:
        """Leave the started run open but no longer current in this context.

        For runs whose body does not execute in the context that started them: the
        generator wrappers below, and integrations whose callbacks open runs for a
        framework's own units of work (LangGraph nodes, Agents SDK agents).
        """
        if self._token is not None:
            _current_run.reset(self._token)
            self._token = None
        if self._otel_token is not None:
            otel_context.detach(cast(Any, self._otel_token))
            self._otel_token = None

    def end(self, exc: BaseException | None = None) -> None:
        """Close the run: its status from ``exc`` (None: ok), abandoned streams recorded,
        its span ended and its final row written."""
        rec = self.record
        if isinstance(exc, BudgetExceeded):
            rec.status = "budget_exceeded"
            rec.error_type = type(exc).__name__
        elif exc is not None and not isinstance(exc, (GeneratorExit, StopIteration)):
            rec.status = "error"
            rec.error_type = type(exc).__qualname__
        elif rec.status == "running":
            rec.status = "ok"
        try:
            self._recorder.run_ending(self)
        finally:
            rec.ended_at = utcnow()
            with self._lock:
                self._ended = True
                snapshot = self.snapshot()
            if self._otel_token is not None:
                otel_context.detach(cast(Any, self._otel_token))
                self._otel_token = None
            if self._token is not None:
                # Exited in another context (an async generator closed by the loop): the
                # var was never set there, so there is nothing to restore.
                with contextlib.suppress(ValueError):
                    _current_run.reset(self._token)
                self._token = None
            if self._span is not None:
                self._recorder.telemetry.end_run_span(self._span, snapshot)
            self._recorder.put_run(snapshot)

    def mark_budget_exceeded(self) -> None:
        self.record.status = "budget_exceeded"

    # -- outcomes and other costs ------------------------------------------------------
    def outcome(self, label: str, value: object = None) -> None:
        """Record what this run achieved, and optionally what that is worth in USD.

        ``run.outcome("resolved", value="4.00")``. Cost per outcome divides the cost of
        every run of an agent by its successes. Setting it again replaces it; it can
        also be set later, from any process, with `Ledger.set_outcome`.
        .. versionadded:: 0.1.0
        """
        label, amount = parse_outcome(label, value)
        with self._lock:
            self.record.outcome = label
            self.record.outcome_value = amount
            self.record.outcome_at = utcnow()
            ended = self._ended
            snapshot = self.snapshot() if ended else None
        if snapshot is not None:
            self._recorder.put_run(snapshot)

    def charge(self, name: str, *, usd: object) -> CallRecord:
        """Record a cost that is not a model call — a search API, a paid tool, a
        GPU-second — as an ``execute_tool`` row of this run, counted in its totals.

        ``run.charge("web_search", usd="0.005")``. .. versionadded:: 0.1.0
        """
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH:
            raise ConfigurationError(
                f"Charge name {shown(name)} is invalid; name the tool or resource in at most "
                f"{MAX_NAME_LENGTH} characters, e.g. 'web_search'."
            )
        amount = parse_usd_amount(usd, what=f"Charge `{name}` has `usd`")
        if amount is None:
            raise ConfigurationError(
                f'Charge `{name}` has no `usd`; give its cost, e.g. usd="0.005".'
            )
        call = new_call(
            self,
            operation="execute_tool",
            model=None,
            tool_name=name,
            cost_usd=amount,
            cost_source="charge",
        )
        return self._recorder.record_finished(self, call)

    def __repr__(self) -> str:
        return (
            f"<Run {self.name!r} id={self.id} status={self.status} calls={self.calls} "
            f"cost_usd={self.cost_usd}>"
        )


def _ids(span: trace.Span) -> tuple[str | None, str | None]:
    from tokenledger._spans import ids_of

    return ids_of(span)


class RunContext:
    """``with ledger.run(...) as run`` / ``async with``: enters a new child run."""

    __slots__ = ("_budget", "_ledger", "_name", "_run", "_tags")

    def __init__(
        self, ledger: Ledger, name: str, tags: dict[str, str], budget: Budget | None = None
    ) -> None:
        self._ledger = ledger
        self._name = name
        self._tags = tags
        self._budget = budget
        self._run: Run | None = None

    def __enter__(self) -> Run:
        run = Run(
            self._ledger,
            self._name,
            tags=self._tags,
            parent=_current_run.get(),
            budget=self._budget,
        )
        run.start()
        self._run = run
        return run

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        run, self._run = self._run, None
        if run is not None:
            run.end(exc)

    async def __aenter__(self) -> Run:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def _apply_outcome(run: Run, outcome: Callable[[Any], Any] | None, result: Any) -> None:
    if outcome is None:
        return
    mapped = outcome(result)
    if mapped is None:
        return
    if isinstance(mapped, tuple):
        run.outcome(*mapped)
    else:
        run.outcome(mapped)


def new_run_context(
    ledger: Ledger,
    name: object,
    *,
    tags: Mapping[str, object] | None,
    budget: object,
) -> RunContext:
    """``ledger.run(...)`` and ``tokenledger.run(...)``: check the arguments, then make
    the context that starts the run."""
    check_run_name(name)
    assert isinstance(name, str)
    check_run_budget(budget, where=f"run `{name}`")
    clean = validate_tags(tags, where=f"run `{name}`")
    return RunContext(ledger, name, clean, cast("Budget | None", budget))


def agent_decorator(
    ledger_getter: Callable[[], Ledger],
    name: object,
    *,
    tags: Mapping[str, object] | None = None,
    budget: object = None,
    outcome: object = None,
) -> Any:
    """``@ledger.agent`` and ``@tokenledger.agent``, with or without arguments.

    The one builder for both, so they accept and refuse the same arguments: a bad
    name, budget, outcome or tag is a `ConfigurationError` here, at decoration time,
    never an error inside the decorated function. ``ledger_getter`` is called each time
    the function runs (the default ledger may be configured after decoration).
    """
    if callable(name):
        return _make_decorator(ledger_getter, None, {}, None, None)(name)
    if name is not None:
        check_run_name(name)
    check_run_budget(budget, where=f"agent `{name}`")
    if outcome is not None and not callable(outcome):
        raise ConfigurationError(
            f"`outcome` of agent `{name}` is {shown(outcome)}; give a function of the "
            "return value, e.g. outcome=lambda r: 'resolved' if r.ok else None."
        )
    clean = validate_tags(tags, where=f"agent `{name}`")
    return _make_decorator(
        ledger_getter,
        cast("str | None", name),
        clean,
        cast("Budget | None", budget),
        cast("Callable[[Any], Any] | None", outcome),
    )


def _make_decorator(
    ledger_getter: Callable[[], Ledger],
    name: str | None,
    tags: dict[str, str],
    budget: Budget | None,
    outcome: Callable[[Any], Any] | None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Build the ``@agent(...)`` decorator for sync, async, generator and async-generator
    functions. The wrapped function keeps its name, docstring and signature."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        run_name = name or fn.__qualname__
        if outcome is not None and (
            inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)
        ):
            raise ConfigurationError(
                f"`outcome=` on agent `{run_name}` needs a function that returns a value; "
                "a generator agent can call tokenledger.current_run().outcome(...) instead."
            )

        def new_context() -> RunContext:
            return RunContext(ledger_getter(), run_name, tags, budget)

        if inspect.isasyncgenfunction(fn):
            agen_fn: Callable[P, AsyncGenerator[Any, Any]] = fn

            @functools.wraps(fn)
            async def agen_wrapper(*args: P.args, **kwargs: P.kwargs) -> AsyncGenerator[Any, Any]:
                ctx = new_context()
                run = ctx.__enter__()
                gen = agen_fn(*args, **kwargs)
                run.detach()
                exc: BaseException | None = None
                try:
                    sent: Any = None
                    while True:
                        token = _current_run.set(run)
                        try:
                            item = await gen.asend(sent)
                        except StopAsyncIteration:
                            return
                        finally:
                            _current_run.reset(token)
                        try:
                            sent = yield item
                        except GeneratorExit:
                            await gen.aclose()
                            raise
                        except BaseException as thrown:
                            token = _current_run.set(run)
                            try:
                                item = await gen.athrow(thrown)
                            finally:
                                _current_run.reset(token)
                            sent = yield item
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    run.end(exc)

            return cast(Callable[P, R], agen_wrapper)

        if inspect.isgeneratorfunction(fn):
            gen_fn: Callable[P, Generator[Any, Any, Any]] = fn

            @functools.wraps(fn)
            def gen_wrapper(*args: P.args, **kwargs: P.kwargs) -> Generator[Any, Any, Any]:
                ctx = new_context()
                run = ctx.__enter__()
                # The run is current only while the generator body executes, never in
                # the caller between two yields.
                run.detach()
                gen = gen_fn(*args, **kwargs)
                exc: BaseException | None = None
                try:
                    token = _current_run.set(run)
                    try:
                        item = next(gen)
                    finally:
                        _current_run.reset(token)
                    while True:
                        try:
                            sent = yield item
                        except GeneratorExit:
                            gen.close()
                            raise
                        except BaseException as thrown:
                            token = _current_run.set(run)
                            try:
                                item = gen.throw(thrown)
                            finally:
                                _current_run.reset(token)
                            continue
                        token = _current_run.set(run)
                        try:
                            item = gen.send(sent)
                        finally:
                            _current_run.reset(token)
                except StopIteration as stop:
                    return stop.value
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    run.end(exc)

            return cast(Callable[P, R], gen_wrapper)

        if inspect.iscoroutinefunction(fn):
            coro_fn = cast(Callable[P, Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                with new_context() as run:
                    result = await coro_fn(*args, **kwargs)
                    _apply_outcome(run, outcome, result)
                    return result

            return cast(Callable[P, R], async_wrapper)

        @functools.wraps(fn)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with new_context() as run:
                result = fn(*args, **kwargs)
                _apply_outcome(run, outcome, result)
                return result

        return sync_wrapper

    return decorate
