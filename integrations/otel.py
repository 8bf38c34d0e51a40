"""Record the model calls that other OpenTelemetry GenAI instrumentations trace.

`GenAISpanProcessor` is an OpenTelemetry SDK span processor. Added to the tracer
provider that OpenLLMetry, OpenInference or Logfire write to, it turns each span of a
model call into a ledger call row: priced by tokenledger, attributed to the tokenledger
run that was current when the span started, counted in budgets' spend. Calls that
tokenledger captured itself (litellm capture, `tokenledger.integrations.openai`, ...)
are not counted a second time.

Span shapes recognised (each checked against the instrumentation's own code):

* **OpenTelemetry GenAI conventions** (and Logfire, which follows them):
  ``gen_ai.operation.name``, ``gen_ai.provider.name`` or ``gen_ai.system``,
  ``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.usage.input_tokens``
  (cached tokens included), ``gen_ai.usage.output_tokens``,
  ``gen_ai.usage.cache_read.input_tokens``, ``gen_ai.usage.cache_creation.input_tokens``,
  ``gen_ai.usage.reasoning.output_tokens``.
* **OpenLLMetry** (``opentelemetry-instrumentation-openai`` 0.62): the names above, plus
  ``gen_ai.usage.reasoning_tokens``; its older releases' ``gen_ai.usage.prompt_tokens`` /
  ``completion_tokens`` and ``gen_ai.usage.cache_read_input_tokens`` /
  ``cache_creation_input_tokens`` are read too.
* **OpenInference**: spans with ``openinference.span.kind`` ``LLM`` or ``EMBEDDING``,
  ``llm.model_name``, ``llm.provider`` / ``llm.system``, ``llm.token_count.prompt``
  (cached tokens included), ``llm.token_count.completion``,
  ``llm.token_count.prompt_details.cache_read`` / ``cache_write`` and
  ``llm.token_count.completion_details.reasoning``.

Input tokens follow the OpenTelemetry convention (cache reads and writes included).
Older Logfire releases' Anthropic spans report Anthropic's own ``input_tokens``, which
*excludes* the cache, and keep the cache counts in ``response_data``; the cache is added
when the reported input equals Anthropic's own count (from ``gen_ai.usage.raw`` or
``response_data``). Current releases include the cache, as the convention does. Any span
whose cache counts exceed its input count is read the Anthropic way too.

Only model calls are recorded: agent, tool and chain spans (which may carry usage
totals of the calls under them) are ignored, and when two instrumentations trace the
same call (OpenLLMetry around the SDK method, OpenInference around its HTTP request)
the nested span is the same call, recorded once.

**Not counting a call twice.** tokenledger's own spans (instrumentation scope
``tokenledger``) are never recorded. A foreign span of a call tokenledger also captured
is recognised by tokenledger's call span, which this processor sees when it is added to
the provider tokenledger writes to (the global one): the two are the same call when
they belong to the same run (or are both outside runs), their time spans overlap and
their models agree (among several candidates, the closest in time). Outside runs the
trace cannot tell them apart: tokenledger's span of a call made outside any run starts
a trace of its own.
tokenledger emits a call's span when the call finishes, so when tokenledger's capture
encloses the foreign span (litellm calling the OpenAI SDK, say) the foreign span ends
first: while a tokenledger capture path is active (litellm capture installed, or a
tokenledger integration imported) foreign calls are held for ``grace_seconds`` to wait
for it, then recorded. `force_flush` records the held calls at once.

**Budgets.** A span processor sees a call only after it was sent, so it cannot refuse
one: these calls count toward budgets' spend (the next call a budget checks sees them)
but a budget never stops them. Use tokenledger's own capture where a limit must hold.

Never raises into the traced program: a span with unreadable counts is logged (once per
instrumentation) and dropped; a model with no price is recorded with no cost.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import sys
import threading
import time
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any, Final

try:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
except ModuleNotFoundError as exc:  # pragma: no cover - exercised by a test with sys.modules
    raise ModuleNotFoundError(
        "tokenledger.integrations.otel needs the OpenTelemetry SDK: "
        "pip install 'tokenledger[otel]'",
        name=exc.name,
    ) from exc

from opentelemetry.context import Context

from tokenledger import _litellm
from tokenledger import _spans as spans
from tokenledger import capture as _capture
from tokenledger import semconv as sc
from tokenledger.records import new_call
from tokenledger.runs import current_run

from ._genai_spans import (
    BadSpan,
    Reading,
    as_text,
    looks_like_call,
    may_be_call,
    read_span,
    scope_of,
)

if TYPE_CHECKING:
    from tokenledger.ledger import Ledger
    from tokenledger.runs import Run

__all__ = ["GenAISpanProcessor", "instrument"]

logger = logging.getLogger("tokenledger")

_TOLERANCE_NS: Final = 1_000_000  # clocks read a moment apart: 1 ms of slack in nesting
# Spans followed from start to end. Past this the oldest is forgotten: spans started and
# never ended (a leak in some instrumentation) must not stop calls being recorded.
_MAX_OPEN: Final = 100_000
# The key of calls made outside any run. Not their trace: tokenledger's own span of such
# a call has no parent, so it starts a trace of its own, never the foreign span's.
_OUTSIDE_RUNS: Final = ("outside runs",)


# -- following spans -------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Open:
    """A span seen starting: who it belongs to, and whether it is part of a call."""

    run: Run | None
    ledger: Ledger | None
    key: Hashable  # run id, or _OUTSIDE_RUNS: where its tokenledger twin lives
    is_call: bool  # looked like a model call when it started
    outer: _Open | None  # the enclosing span of the same model call, if any
    fallback: Reading | None = None  # what a nested span of the same call read


@dataclasses.dataclass(slots=True)
class _Interval:
    key: Hashable
    start_ns: int
    end_ns: int
    models: frozenset[str]
    deadline: float  # time.monotonic() after which it is no longer waited for


@dataclasses.dataclass(slots=True)
class _Held:
    """A foreign call waiting for its tokenledger twin, or for its grace to run out."""

    interval: _Interval
    entry: _Open
    reading: Reading
    start_ns: int
    end_ns: int


def _model_key(model: str) -> str:
    return model.rsplit("/", 1)[-1].lower()


def _models(*names: str | None) -> frozenset[str]:
    return frozenset(_model_key(n) for n in names if n)


def _models_agree(a: frozenset[str], b: frozenset[str]) -> bool:
    # Either side may lack a model; a requested alias and a served snapshot
    # (gpt-4o-mini vs gpt-4o-mini-2024-07-18) agree.
    return not a or not b or any(x == y or x.startswith(y) or y.startswith(x) for x in a for y in b)


def _overlap(a: _Interval, b: _Interval) -> bool:
    # Not nesting: tokenledger's span runs from before the request to when it recorded
    # the call, which for a stream another proxy wraps is before that proxy's span ends.
    return a.start_ns <= b.end_ns + _TOLERANCE_NS and b.start_ns <= a.end_ns + _TOLERANCE_NS


def _same_call(a: _Interval, b: _Interval) -> bool:
    return a.key == b.key and _overlap(a, b) and _models_agree(a.models, b.models)


def _closest(interval: _Interval, candidates: list[Any], of: Any) -> int | None:
    """The index of the candidate most likely the same call, or None."""
    best: int | None = None
    best_gap = 0
    for index, candidate in enumerate(candidates):
        other = of(candidate)
        if _same_call(interval, other):
            gap = abs(interval.start_ns - other.start_ns) + abs(interval.end_ns - other.end_ns)
            if best is None or gap < best_gap:
                best, best_gap = index, gap
    return best


def _capture_may_run() -> bool:
    """Could tokenledger itself be capturing calls in this process right now?"""
    if _litellm.installed():
        return True
    return any(name in sys.modules for name in _CAPTURING_INTEGRATIONS)


# The integrations that record calls themselves (through begin_call): looked up by name,
# not by scanning sys.modules on every span that ends.
_CAPTURING_INTEGRATIONS: Final = tuple(
    f"tokenledger.integrations.{name}"
    for name in ("openai", "anthropic", "langchain", "openai_agents")
)


# -- the processor ----------------------------------------------------------------------


class GenAISpanProcessor(SpanProcessor):
    """Turns the model call spans of other instrumentations into ledger calls.

    ``provider.add_span_processor(GenAISpanProcessor())``, on the provider the
    instrumentations write to; make it the global provider (the one tokenledger's own
    spans go to) so calls tokenledger also captured are recognised and skipped.

    Args:
        ledger: where calls go. ``None``: the ledger of the run current when the span
            started, else the capturing ledger (the last one made with
            ``capture=True``) for calls outside any run.
        grace_seconds: how long a foreign call waits for tokenledger's own record of
            the same call while a tokenledger capture path is active.

    .. versionadded:: 0.1.0
    """

    def __init__(self, ledger: Ledger | None = None, *, grace_seconds: float = 2.0) -> None:
        if not isinstance(grace_seconds, (int, float)) or not 0 <= grace_seconds <= 60:
            raise ValueError(
                f"`grace_seconds` is {grace_seconds!r}; it must be a number of seconds "
                "from 0 to 60."
            )
        self._ledger = ledger
        self._grace = float(grace_seconds)
        self._lock = threading.Condition()
        self._open: dict[int, _Open] = {}
        self._held: list[_Held] = []
        self._captured: list[_Interval] = []  # tokenledger's own calls, not yet matched
        self._local = threading.local()  # .recording: this thread is writing our call
        self._warned: set[str] = set()
        self._timer: threading.Thread | None = None
        self._stopped = False

    # -- SpanProcessor ------------------------------------------------------------------
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        try:
            if self._stopped or scope_of(span) == "tokenledger":
                return
            span_id = span.context.span_id
            parent = span.parent
            outer: _Open | None = None
            with self._lock:
                if parent is not None and not parent.is_remote:
                    above = self._open.get(parent.span_id)
                    if above is not None:
                        outer = above.outer or (above if above.is_call else None)
                # Spans inside a call are followed whatever they are: a call nested in
                # one of them is the same call.
                if outer is None and not may_be_call(span):
                    return
                if len(self._open) >= _MAX_OPEN:
                    del self._open[next(iter(self._open))]  # the oldest: dicts keep order
                    self._warn_full()
                self._open[span_id] = self._entry(span, outer)
        except Exception:
            logger.exception("tokenledger could not follow a span as it started")

    def _warn_full(self) -> None:
        if "<open spans>" in self._warned:
            return
        self._warned.add("<open spans>")
        logger.warning(
            "tokenledger is following %d spans that started and never ended; it forgets "
            "the oldest from now on, and a call among them will not be recorded. An "
            "instrumentation may be leaking spans.",
            _MAX_OPEN,
        )

    def _entry(self, span: Span, outer: _Open | None) -> _Open:
        # Runs in the context that creates the span: the current run is known here.
        run = current_run()
        ledger = self._ledger
        if ledger is None:
            ledger = run.ledger if run is not None else _capture.capture_ledger()
        elif run is not None and run.ledger is not ledger:
            run = None  # a run of another ledger: its id means nothing in this one
        if ledger is not None and run is None and not ledger.record_calls_outside_runs:
            ledger = None
        key: Hashable = run.id if run is not None else _OUTSIDE_RUNS
        return _Open(run, ledger, key, looks_like_call(span.attributes or {}), outer)

    def on_end(self, span: ReadableSpan) -> None:
        try:
            self._on_end(span)
        except Exception:
            logger.exception("tokenledger could not record a span's model call")

    def _on_end(self, span: ReadableSpan) -> None:
        if self._stopped:
            return
        attrs: Mapping[str, Any] = span.attributes or {}
        scope = scope_of(span)
        context = span.context
        if context is None:
            return
        if scope == "tokenledger":
            if sc.TL_CALL_ID in attrs and not getattr(self._local, "recording", False):
                self._saw_captured(span, attrs)
            return
        with self._lock:
            entry = self._open.pop(context.span_id, None)
        if entry is None:
            return  # started before this processor was added, or not tracked
        try:
            reading = read_span(span, attrs, scope)
        except BadSpan as exc:
            self._warn_once(scope, span.name, exc)
            return
        if entry.outer is not None:
            # A nested span of a call another span already describes (OpenInference's
            # HTTP request inside OpenLLMetry's SDK call): the outer one is recorded.
            if reading is not None and entry.outer.fallback is None:
                entry.outer.fallback = reading
            return
        if reading is None:
            reading = entry.fallback
        if reading is None or entry.ledger is None:
            return
        start_ns, end_ns = span.start_time or 0, span.end_time or time.time_ns()
        interval = _Interval(
            entry.key,
            start_ns,
            end_ns,
            _models(reading.request_model, reading.response_model),
            time.monotonic() + self._grace,
        )
        with self._lock:
            self._expire_captured()
            index = _closest(interval, self._captured, lambda c: c)
            if index is not None:
                del self._captured[index]
                return  # tokenledger recorded this call itself
            if self._grace > 0 and _capture_may_run():
                self._held.append(_Held(interval, entry, reading, start_ns, end_ns))
                self._start_timer()
                self._lock.notify_all()
                return
        self._record(entry, reading, start_ns, end_ns)

    def _saw_captured(self, span: ReadableSpan, attrs: Mapping[str, Any]) -> None:
        """tokenledger's own span of a call it captured: that call is accounted."""
        run_id = attrs.get(sc.TL_RUN_ID)
        key: Hashable = run_id if isinstance(run_id, str) else _OUTSIDE_RUNS
        interval = _Interval(
            key,
            span.start_time or 0,
            span.end_time or time.time_ns(),
            _models(
                as_text(attrs.get(sc.GEN_AI_REQUEST_MODEL)),
                as_text(attrs.get(sc.GEN_AI_RESPONSE_MODEL)),
            ),
            time.monotonic() + max(self._grace, 1.0),
        )
        with self._lock:
            index = _closest(interval, self._held, lambda h: h.interval)
            if index is not None:
                del self._held[index]
                return  # the foreign span waiting for it is the same call
            self._expire_captured()
            self._captured.append(interval)

    def _expire_captured(self) -> None:
        now = time.monotonic()
        if self._captured and self._captured[0].deadline < now:
            self._captured = [c for c in self._captured if c.deadline >= now]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Record every held call now, without waiting out its grace."""
        with self._lock:
            held, self._held = self._held, []
        for item in held:
            self._record(item.entry, item.reading, item.start_ns, item.end_ns)
        return True

    def shutdown(self) -> None:
        """Record the held calls and stop: later spans are ignored."""
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
            timer = self._timer
        if timer is not None and timer is not threading.current_thread():
            timer.join(timeout=5)
        self.force_flush()
        with self._lock:
            self._open.clear()
            self._captured.clear()

    # -- held calls ---------------------------------------------------------------------
    def _start_timer(self) -> None:
        if self._timer is None or not self._timer.is_alive():
            self._timer = threading.Thread(
                target=self._release_due, name="tokenledger-otel", daemon=True
            )
            self._timer.start()

    def _release_due(self) -> None:
        """Record held calls whose grace ran out, until the processor stops."""
        while True:
            with self._lock:
                while not self._stopped:
                    if not self._held:
                        self._lock.wait()
                        continue
                    wait = min(h.interval.deadline for h in self._held) - time.monotonic()
                    if wait <= 0:
                        break
                    self._lock.wait(wait)
                if self._stopped:
                    return
                now = time.monotonic()
                due = [h for h in self._held if h.interval.deadline <= now]
                self._held = [h for h in self._held if h.interval.deadline > now]
            for item in due:
                self._record(item.entry, item.reading, item.start_ns, item.end_ns)

    # -- writing ------------------------------------------------------------------------
    def _record(self, entry: _Open, reading: Reading, start_ns: int, end_ns: int) -> None:
        """Write one call through the same path as `Ledger.record_call`, into the run
        that was current when its span started."""
        ledger = entry.ledger
        if ledger is None:
            return
        run = entry.run
        call = new_call(
            run,
            operation=reading.operation,
            model=reading.request_model,
            started_at=dt.datetime.fromtimestamp(start_ns / 1e9, dt.timezone.utc),
            streamed=reading.streamed,
        )
        self._local.recording = True  # the span tokenledger emits for it is ours
        try:
            ledger.recorder.record_finished(
                run,
                call,
                provider=reading.provider,
                start_ns=start_ns,
                status=reading.status,
                usage=reading.usage,
                model=reading.response_model,
                estimated=reading.usage is None,
                error_type=reading.error_type,
                finish_reasons=reading.finish_reasons,
                latency_ms=max(end_ns - start_ns, 0) / 1e6,
            )
        except Exception:
            logger.exception("tokenledger could not record a call traced by %s", reading.provider)
        finally:
            self._local.recording = False

    def _warn_once(self, scope: str, name: str, exc: Exception) -> None:
        if scope in self._warned:
            logger.debug("tokenledger dropped span %r: %s", name, exc)
            return
        self._warned.add(scope)
        logger.warning(
            "tokenledger dropped span %r from %r: %s (further spans like it are dropped silently)",
            name,
            scope or "<no scope>",
            exc,
        )


def instrument(
    tracer_provider: TracerProvider | None = None,
    *,
    ledger: Ledger | None = None,
    grace_seconds: float = 2.0,
) -> GenAISpanProcessor:
    """Add a `GenAISpanProcessor` to ``tracer_provider`` (default: the global one) and
    return it; ``processor.shutdown()`` stops it.

    With no tracer provider given and none set globally yet, an SDK ``TracerProvider``
    is made from the environment (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``)
    and set globally, so instrumentations installed after this call trace into it.

    .. versionadded:: 0.1.0
    """
    if tracer_provider is None and not spans.sdk_tracer_provider_is_set():
        trace.set_tracer_provider(TracerProvider(resource=spans.otel_resource()))
        logger.info("tokenledger set a global OpenTelemetry TracerProvider for its span processor")
    provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        raise TypeError(
            f"`tracer_provider` is {provider!r}; give an opentelemetry.sdk.trace."
            "TracerProvider, or set one globally with trace.set_tracer_provider() first."
        )
    processor = GenAISpanProcessor(ledger, grace_seconds=grace_seconds)
    provider.add_span_processor(processor)
    return processor
