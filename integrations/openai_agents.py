"""Record the runs and model requests of the OpenAI Agents SDK (``openai-agents``).

``instrument()`` switches it on for the whole process::

    from agents import Agent, Runner
    from tokenledger.integrations import openai_agents as tl_agents

    tl_agents.instrument()
    with ledger.run("support", budget=tokenledger.Budget(usd="0.50")):
        Runner.run_sync(triage_agent, "My printer is on fire")

Each ``Runner.run`` / ``run_sync`` / ``run_streamed`` becomes a run, nested under the
enclosing tokenledger run if there is one; each agent that takes a turn in it (the first
one, and every agent handed off to) becomes a child run named after the agent; each model
request becomes one call row of the run of the agent that made it.

How each part is seen, and why there (checked against openai-agents 0.20):

* **Agent runs** — ``AgentRunner.run`` and ``AgentRunner.run_streamed`` are wrapped
  (``run_sync`` and the ``Runner`` class methods go through them). The run is the
  current tokenledger run for the whole agent loop, tools included, so a tool that calls
  litellm or an instrumented client, or ``current_run().charge(...)``, is attributed to
  it. A tracing processor alone cannot do this: with tracing disabled
  (``set_tracing_disabled``, ``RunConfig(tracing_disabled=True)``,
  ``OPENAI_AGENTS_DISABLE_TRACING``) the SDK calls no processor at all. The run is named
  after ``RunConfig.workflow_name`` when one is given, else after the starting agent.
* **Agents and handoffs** — a tracing processor (added with ``add_trace_processor``, so
  the SDK's own exporter and the user's processors keep working) opens a child run when
  an agent span starts and closes it when it ends. The SDK calls processors
  synchronously, at the very point where it makes the agent span current in its own
  context variable, so the child run is made current there and then too, and mirrors the
  SDK's scope exactly. With tracing disabled the SDK reports no spans: the calls are
  then recorded in the agent run itself, with no per-agent child runs.
* **Model requests** — the public ``get_response`` and ``stream_response`` methods of
  ``OpenAIResponsesModel`` (the websocket variant included) and
  ``OpenAIChatCompletionsModel`` are wrapped. The wrapper calls
  `tokenledger.capture.abegin_call` first: budgets are reserved there and a refusal
  raises `BudgetExceeded` with no HTTP request sent (``LedgerError`` when budgets cannot
  be checked: they fail closed). Exceptions raised in a tracing processor or in
  ``RunHooks.on_llm_start`` could not do this: the SDK swallows and logs processor
  errors, and hooks are per run, given by the caller. The call is finished from the
  SDK's own `agents.Usage` for that response (cached and reasoning tokens included),
  or from the ``response.completed`` event of a stream. Each wrapped call is one
  provider request, so the rows of a run are exactly the SDK's per-request
  ``Usage.request_usage_entries`` for it; a retry the runner makes is a new call of
  the wrapped method and gets its own row, a failed attempt an error row. A failed
  request is recorded and re-raised unchanged, with the usage of a ``response.failed``
  event when there is one. A ``downgrade`` budget's cheaper model is sent through a
  copy of the model object with its ``model`` replaced.
* **No double counting** — when `tokenledger.integrations.openai` already records the
  client a model sends with, that integration records the request (at the HTTP level,
  budget check included) and this one only supplies the runs. Models of other providers
  (``LitellmModel``, for one) are left to the capture that already sees them (litellm
  capture), attributed to the right run through the current-run context.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Final

try:
    import agents
    import openai
    from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
    from agents.models.openai_responses import OpenAIResponsesModel, OpenAIResponsesWSModel
    from agents.run import AgentRunner
    from agents.tracing import AgentSpanData, Span, Trace, TracingProcessor
except ModuleNotFoundError as exc:  # pragma: no cover - exercised by a test with sys.modules
    raise ModuleNotFoundError(
        "tokenledger.integrations.openai_agents needs the OpenAI Agents SDK: "
        "pip install 'tokenledger[openai-agents]'",
        name=exc.name,
    ) from exc

from tokenledger import semconv as sc
from tokenledger.capture import PendingCall, abegin_call, capture_ledger
from tokenledger.exceptions import BudgetExceeded, LedgerError
from tokenledger.records import TokenUsage
from tokenledger.runs import Run, RunContext, current_run

from ._sdk import (
    OPENAI_COMPATIBLE_HOSTS,
    count_tokens,
    is_wrapper,
    mark_wrapper,
    succeed_or_estimate,
)

if TYPE_CHECKING:
    from tokenledger.ledger import Ledger

__all__ = ["instrument", "uninstrument"]

logger = logging.getLogger("tokenledger")

_MAX_RUN_NAME = 200  # what `Ledger.run` accepts
# The positional parameters of `Model.get_response` / `Model.stream_response`.
_MODEL_PARAMETERS: Final = (
    "system_instructions",
    "input",
    "model_settings",
    "tools",
    "output_schema",
    "handoffs",
    "tracing",
)
_DEFAULT_WORKFLOW_NAME: Final = agents.RunConfig().workflow_name  # "Agent workflow"
_MODEL_CLASSES: Final = (OpenAIResponsesModel, OpenAIChatCompletionsModel)


# -- which ledger, which name ----------------------------------------------------------

_state_lock = threading.Lock()
_ledger: Ledger | None = None  # given to instrument(); else the run's, else the capturing one
_instrumented = False


def _ledger_for_run() -> Ledger | None:
    run = current_run()
    if run is not None:
        return run.ledger
    return _ledger if _ledger is not None else capture_ledger()


def _run_name(name: object) -> str:
    text = name.strip() if isinstance(name, str) else ""
    return text[:_MAX_RUN_NAME] or "agent"


def _agent_run_name(starting_agent: Any, kwargs: dict[str, Any]) -> str:
    workflow = getattr(kwargs.get("run_config"), "workflow_name", None)
    if isinstance(workflow, str) and workflow != _DEFAULT_WORKFLOW_NAME:
        return _run_name(workflow)
    return _run_name(getattr(starting_agent, "name", None))


def _open_run(starting_agent: Any, kwargs: dict[str, Any]) -> RunContext | None:
    """The run of one agent run, or None when no ledger is recording (never raises)."""
    try:
        ledger = _ledger_for_run()
        if ledger is None:
            return None
        return ledger.run(_agent_run_name(starting_agent, kwargs))
    except Exception:
        logger.exception("tokenledger could not start a run for an OpenAI Agents SDK run")
        return None


# -- agent runs: the runner ------------------------------------------------------------


def _wrap_run(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def run(self: Any, starting_agent: Any, input: Any, **kwargs: Any) -> Any:
        context = _open_run(starting_agent, kwargs) if _instrumented else None
        if context is None:
            return await original(self, starting_agent, input, **kwargs)
        async with context:
            return await original(self, starting_agent, input, **kwargs)

    return mark_wrapper(run, original)


def _wrap_run_streamed(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def run_streamed(self: Any, starting_agent: Any, input: Any, **kwargs: Any) -> Any:
        context = _open_run(starting_agent, kwargs) if _instrumented else None
        if context is None:
            return original(self, starting_agent, input, **kwargs)
        run = context.__enter__()
        try:
            result = original(self, starting_agent, input, **kwargs)
        except BaseException as exc:
            context.__exit__(type(exc), exc, exc.__traceback__)
            raise
        # The agent loop runs in a task made inside `original`, which copied the context
        # with this run current; the caller's context must not keep it.
        run.detach()
        task = getattr(result, "run_loop_task", None)
        if isinstance(task, asyncio.Future):
            task.add_done_callback(functools.partial(_end_streamed_run, run, result))
        else:  # pragma: no cover - every SDK version checked sets run_loop_task
            run.end(None)
        return result

    return mark_wrapper(run_streamed, original)


def _end_streamed_run(run: Run, result: Any, task: asyncio.Future[Any]) -> None:
    try:
        error: BaseException | None = None
        if task.cancelled():
            error = asyncio.CancelledError()
        else:
            error = task.exception() or getattr(result, "_stored_exception", None)
        run.end(error)
    except Exception:
        logger.exception("tokenledger could not finish the run of a streamed agent run")


# -- agents and handoffs: the tracing processor ----------------------------------------


class AgentSpanError(Exception):
    """Stands for the error of an agent span the SDK marked as failed (its exception is
    not given to processors); a failed agent's run gets ``error_type = 'AgentSpanError'``."""


class _AgentRunProcessor(TracingProcessor):
    """Opens a child run for each agent span inside a tokenledger run.

    Never raises (the SDK would log it as a processor failure) and keeps no reference
    to anything once a span ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, tuple[RunContext, Run]] = {}  # agent span id -> its run

    def on_trace_start(self, trace: Trace) -> None:
        return None

    def on_trace_end(self, trace: Trace) -> None:
        return None

    def on_span_start(self, span: Span[Any]) -> None:
        if not _instrumented or not isinstance(span.span_data, AgentSpanData):
            return
        try:
            parent = current_run()
            if parent is None:
                return  # not inside a recorded run
            context = parent.ledger.run(_run_name(span.span_data.name))
            run = context.__enter__()
            with self._lock:
                self._open[span.span_id] = (context, run)
        except Exception:
            logger.exception("tokenledger could not start the run of an agent span")

    def on_span_end(self, span: Span[Any]) -> None:
        with self._lock:
            opened = self._open.pop(span.span_id, None)
        if opened is None:
            return
        context, run = opened
        try:
            error = span.error
            failure = None
            # A budget refusal already marked the run; the span only says it failed.
            if error and run.status != "budget_exceeded":
                failure = AgentSpanError(error.get("message", ""))
            context.__exit__(type(failure) if failure else None, failure, None)
        except Exception:
            logger.exception("tokenledger could not finish the run of an agent span")

    def shutdown(self) -> None:
        return None

    def force_flush(self) -> None:
        return None


_processor: _AgentRunProcessor | None = None


# -- model requests -------------------------------------------------------------------


def _arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    named = dict(zip(_MODEL_PARAMETERS, args, strict=False))
    named.update(kwargs)
    return named


def _client_of(model: Any) -> Any:
    """The client the model sends with (the SDK may copy it per request)."""
    try:
        return model._get_client()
    except Exception:
        return getattr(model, "_client", None)


def _recorded_elsewhere(model: Any) -> bool:
    """Whether `tokenledger.integrations.openai` already records this model's requests."""
    if isinstance(model, OpenAIResponsesWSModel) or (
        "tokenledger.integrations.openai" not in sys.modules
    ):
        return False
    client = _client_of(model)
    try:
        if isinstance(model, OpenAIChatCompletionsModel):
            create = client.chat.completions.create
        else:
            create = client.responses.create
    except Exception:
        return False
    return is_wrapper(getattr(create, "__func__", create))


def _provider_of(client: Any) -> str:
    if isinstance(client, openai.AsyncAzureOpenAI):
        return "azure"
    host = getattr(getattr(client, "base_url", None), "host", None)
    return OPENAI_COMPATIBLE_HOSTS.get(host or "", "openai")


def _input_texts(arguments: dict[str, Any]) -> list[str]:
    """The request as texts, for the budget estimate (and a count when no usage comes)."""
    texts: list[str] = []
    instructions = arguments.get("system_instructions")
    if isinstance(instructions, str):
        texts.append(instructions)
    items = arguments.get("input")
    if isinstance(items, str):
        texts.append(items)
    elif isinstance(items, list):
        texts.extend(i if isinstance(i, str) else json.dumps(i, default=str) for i in items)
    return texts


async def _begin(model: Any, arguments: dict[str, Any], *, stream: bool) -> PendingCall | None:
    settings = arguments.get("model_settings")
    max_tokens = getattr(settings, "max_tokens", None)
    name = getattr(model, "model", None)
    return await abegin_call(
        operation=sc.OP_CHAT,
        model=name if isinstance(name, str) else None,
        provider=_provider_of(getattr(model, "_client", None)),
        request={"input": _input_texts(arguments)},
        max_tokens=max_tokens if isinstance(max_tokens, int) else None,
        stream=stream,
    )


def _target(model: Any, pending: PendingCall) -> Any:
    """The model object to send with: a copy naming a ``downgrade`` budget's cheaper model."""
    cheaper = pending.downgraded_to
    if not cheaper or cheaper == model.model:
        return model
    if isinstance(model, OpenAIResponsesWSModel):
        # A copy would open (and leak) a second websocket connection: refuse instead.
        pending.release()
        if pending.run is not None:
            pending.run.mark_budget_exceeded()
        raise BudgetExceeded(
            f"Budget would be exceeded by this call to {model.model} and it cannot be "
            f"downgraded to {cheaper} on a websocket model; use OpenAIResponsesModel or "
            "a budget with action='raise'. No request was sent."
        )
    clone = copy.copy(model)
    clone.model = cheaper
    return clone


def _output_text(output: Any) -> str:
    parts: list[str] = []
    for item in output or ():
        for content in getattr(item, "content", None) or ():
            text = getattr(content, "text", None)
            if isinstance(text, str):
                parts.append(text)
        arguments = getattr(item, "arguments", None)
        if isinstance(arguments, str):
            parts.append(arguments)
    return "".join(parts)


def _estimated(pending: PendingCall, arguments: dict[str, Any], output: Any) -> TokenUsage:
    model = pending.call.requested_model or ""
    prompt = count_tokens(model, text="\n".join(_input_texts(arguments)))
    text = _output_text(output)
    return TokenUsage(
        input_tokens=prompt, output_tokens=count_tokens(model, text=text) if text else 0
    )


def _finish(
    pending: PendingCall,
    arguments: dict[str, Any],
    *,
    usage: Any,
    output: Any,
    model: str | None = None,
    finish_reasons: list[str] | None = None,
) -> None:
    try:
        has_tokens = usage is not None and bool(
            getattr(usage, "input_tokens", None) or getattr(usage, "output_tokens", None)
        )
        # With no usage reported, what was sent and received is counted.
        succeed_or_estimate(
            pending,
            usage if has_tokens else None,
            lambda: _estimated(pending, arguments, output),
            model=model,
            finish_reasons=finish_reasons,
        )
    except Exception:
        logger.exception("tokenledger could not record an OpenAI Agents SDK model request")


def _fail(pending: PendingCall, error: BaseException, usage: Any = None) -> None:
    try:
        pending.fail(error, usage=usage)
    except Exception:
        logger.exception("tokenledger could not record a failed OpenAI Agents SDK request")


async def _start(model: Any, arguments: dict[str, Any], *, stream: bool) -> PendingCall | None:
    try:
        return await _begin(model, arguments, stream=stream)
    except (BudgetExceeded, LedgerError):
        raise  # refused, or budgets cannot be checked: fail closed, send nothing
    except Exception:
        logger.exception("tokenledger could not start recording an OpenAI Agents SDK request")
        return None


def _wrap_get_response(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def get_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _instrumented or _recorded_elsewhere(self):
            return await original(self, *args, **kwargs)
        arguments = _arguments(args, kwargs)
        pending = await _start(self, arguments, stream=False)
        if pending is None:
            return await original(self, *args, **kwargs)
        try:
            target = _target(self, pending)
            response = await original(target, *args, **kwargs)
        except BaseException as exc:
            if not isinstance(exc, BudgetExceeded):
                _fail(pending, exc)
            raise
        # Read now: the runner folds failed retry attempts into this usage afterwards.
        _finish(pending, arguments, usage=response.usage, output=response.output)
        return response

    return mark_wrapper(get_response, original)


class _StreamWatch:
    """What a streamed request's events say about its outcome."""

    __slots__ = ("complete", "model", "reasons", "response", "usage")

    def __init__(self) -> None:
        self.usage: Any = None
        self.model: str | None = None
        self.response: Any = None
        self.reasons: list[str] = []
        self.complete = False

    def see(self, event: Any) -> None:
        kind = getattr(event, "type", None)
        if kind not in ("response.completed", "response.incomplete", "response.failed"):
            return
        response = getattr(event, "response", None)
        self.response = response
        self.usage = getattr(response, "usage", None)
        self.model = getattr(response, "model", None) or None
        self.complete = kind == "response.completed"
        if kind == "response.completed":
            self.reasons.append("stop")
        elif kind == "response.incomplete":
            details = getattr(response, "incomplete_details", None)
            self.reasons.append(getattr(details, "reason", None) or "incomplete")


def _wrap_stream_response(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def stream_response(self: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        if not _instrumented or _recorded_elsewhere(self):
            async for event in original(self, *args, **kwargs):
                yield event
            return
        arguments = _arguments(args, kwargs)
        pending = await _start(self, arguments, stream=True)
        if pending is None:
            async for event in original(self, *args, **kwargs):
                yield event
            return
        watch = _StreamWatch()
        try:
            inner = original(_target(self, pending), *args, **kwargs)
        except BaseException as exc:
            if not isinstance(exc, BudgetExceeded):
                _fail(pending, exc)
            raise
        try:
            async for event in inner:
                watch.see(event)
                yield event
        except (GeneratorExit, asyncio.CancelledError):
            _abandon(pending, watch)
            raise
        except BaseException as exc:
            _fail(pending, exc, usage=watch.usage)
            raise
        else:
            if watch.complete:
                _finish(
                    pending,
                    arguments,
                    usage=watch.usage,
                    output=getattr(watch.response, "output", None),
                    model=watch.model,
                    finish_reasons=watch.reasons or None,
                )
            else:
                _abandon(pending, watch)
        finally:
            await inner.aclose()

    return mark_wrapper(stream_response, original)


def _abandon(pending: PendingCall, watch: _StreamWatch) -> None:
    try:
        pending.abandon(watch.usage)
    except Exception:
        logger.exception("tokenledger could not record an abandoned OpenAI Agents SDK stream")


# -- switching it on and off -----------------------------------------------------------

# (class, method name, wrapper factory)
_TARGETS: Final[tuple[tuple[type, str, Callable[..., Any]], ...]] = (
    (AgentRunner, "run", _wrap_run),
    (AgentRunner, "run_streamed", _wrap_run_streamed),
    *((cls, "get_response", _wrap_get_response) for cls in _MODEL_CLASSES),
    *((cls, "stream_response", _wrap_stream_response) for cls in _MODEL_CLASSES),
)
_patches: dict[tuple[type, str], Any] = {}  # (class, name) -> the class's own attribute


def instrument(ledger: Ledger | None = None) -> None:
    """Record every OpenAI Agents SDK run and model request from now on.

    Agent runs (``Runner.run``, ``run_sync``, ``run_streamed``) become runs, nested in
    the current run if there is one; each agent that takes a turn becomes a child run
    named after it (with SDK tracing enabled); each model request of an
    ``OpenAIResponsesModel`` or ``OpenAIChatCompletionsModel`` becomes a call row, with
    its budget checked before the request is sent. An agent run outside any tokenledger
    run is recorded into ``ledger``, else into the ledger that is capturing (the last
    `tokenledger.Ledger` made with ``capture=True``). Calling it again is harmless;
    `uninstrument` switches it off.

    .. versionadded:: 0.1.0
    """
    global _instrumented, _ledger, _processor
    with _state_lock:
        if ledger is not None:
            _ledger = ledger
        for cls, name, wrap in _TARGETS:
            if (cls, name) in _patches:
                continue
            own = cls.__dict__[name]
            _patches[(cls, name)] = own
            setattr(cls, name, wrap(own))
        if _processor is None:
            # The SDK cannot remove one processor, so it stays registered and is idle
            # while uninstrumented.
            _processor = _AgentRunProcessor()
            agents.add_trace_processor(_processor)
        _instrumented = True


def uninstrument() -> None:
    """Stop recording and restore the SDK's classes exactly as they were.

    .. versionadded:: 0.1.0
    """
    global _instrumented, _ledger
    with _state_lock:
        for (cls, name), own in _patches.items():
            setattr(cls, name, own)
        _patches.clear()
        _instrumented = False
        _ledger = None
