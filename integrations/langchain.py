"""Record every model call a LangChain or LangGraph program makes.

``instrument()`` attaches a `TokenledgerCallbackHandler` to every LangChain callback
manager made from then on, in every thread, so every chat model and LLM is recorded
with no change at the call sites; passing ``callbacks=[TokenledgerCallbackHandler()]``
records one model, chain or graph invocation instead. Both may be used at once: each
call is still recorded once.

How a call is seen, and why there:

* **Before the request** — ``on_chat_model_start`` (``on_llm_start`` for text
  completion models) calls `tokenledger.capture.begin_call`: budgets are reserved
  there. The handler sets ``raise_error = True``, so LangChain lets a `BudgetExceeded`
  (or a `LedgerError`: budgets fail closed) out of the callback, and it reaches the
  caller before the model sends anything. Every other failure of the handler is logged
  and swallowed: accounting never breaks the user's chain.
* **A downgrade cannot be applied.** A callback sees a copy of the request parameters,
  so it cannot change the model a chat model sends. When a ``downgrade`` budget would
  need the cheaper model, the call is refused with `BudgetExceeded` instead. Instrument
  the model's own client (``tokenledger.integrations.openai.instrument()``, or litellm
  capture for ``ChatLiteLLM``) to have downgrades applied: see "Recorded once" below.
* **After the response** — ``on_llm_end`` reads ``AIMessage.usage_metadata``, LangChain's
  provider-neutral usage: ``input_tokens`` already includes the cache
  (``input_token_details.cache_read`` / ``cache_creation``), as OpenTelemetry's
  ``gen_ai.usage.input_tokens`` does, and ``output_token_details.reasoning`` is part of
  ``output_tokens``. A model that reports no ``usage_metadata`` falls back to the
  provider's ``llm_output["token_usage"]``; with neither (a ``ChatOpenAI`` stream
  without ``stream_usage=True``) the prompt and the text received are counted with the
  model's tokenizer and the call is marked estimated. ``on_llm_error`` records an
  error; a stream its caller stopped reading (LangChain reports ``GeneratorExit``) is
  recorded as abandoned.
* **Which run** — LangChain may call a handler in a worker thread (async chains call
  synchronous handlers through an executor), where the caller's context is not the
  current one. So the run is resolved when the call *starts*: the innermost of the run
  current in the callback and the run of the enclosing LangChain run (chains, tools,
  graph nodes are remembered by their LangChain run id when they start), and it
  travels with the call to its end, whichever thread that arrives in.
* **Graph nodes** — with ``graph_nodes=True`` each LangGraph node (a sub-graph used as
  a node too) opens a child run named after the node, under the enclosing run; the
  node's model calls are recorded in it and its cost rolls up as usual. A node run is
  found through LangChain's run ids, never made current in the node's context (an
  async callback cannot), so a model call the node makes *outside* LangChain (a direct
  ``litellm.completion``) is recorded in the enclosing run.
* **Recorded once** — when tokenledger already captures the chat model's own client,
  that capture records the call and this handler stands aside: it sees the exact
  request, can apply a downgrade, and reads the provider's own usage. That is the case
  for LiteLLM chat models (``ChatLiteLLM``, ``ChatLiteLLMRouter``) while litellm
  capture is on, for langchain-openai models while
  ``tokenledger.integrations.openai.instrument()`` (with no argument) is on, and for
  langchain-anthropic models while ``tokenledger.integrations.anthropic.instrument()``
  is on. A client instrumented on its own (``instrument(client)``) cannot be seen from
  a callback: do not combine that with this handler.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import threading
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, cast

try:
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.messages import convert_to_openai_messages
    from langchain_core.outputs import ChatGenerationChunk, LLMResult
    from langchain_core.tracers.context import register_configure_hook
except ModuleNotFoundError as exc:  # pragma: no cover - exercised by a test with sys.modules
    raise ModuleNotFoundError(
        "tokenledger.integrations.langchain needs LangChain (langchain-core>=0.3): "
        "pip install 'tokenledger[langchain]'",
        name=exc.name,
    ) from exc


from tokenledger import _litellm, capture
from tokenledger import semconv as sc
from tokenledger.capture import PendingCall, begin_call
from tokenledger.exceptions import BudgetExceeded, LedgerError
from tokenledger.records import TokenUsage
from tokenledger.runs import Run, current_run

from ._sdk import count_tokens

if TYPE_CHECKING:
    from uuid import UUID

    from langchain_core.messages import BaseMessage

__all__ = ["TokenledgerCallbackHandler", "instrument", "uninstrument"]

logger = logging.getLogger("tokenledger")

# LangChain's `ls_provider` names -> litellm's provider names (pricing, gen_ai.provider.name).
_PROVIDERS: Final = {
    "google_genai": "gemini",
    "google_vertexai": "vertex_ai",
    "amazon_bedrock": "bedrock",
    "mistralai": "mistral",
    "fireworks": "fireworks_ai",
    "together": "together_ai",
    "huggingface": "huggingface",
}

# LangChain ids (``lc_id()``, the ``id`` of the serialized model) of the langchain-openai
# and langchain-anthropic chat models, whose SDK client the matching integration records.
# Not langchain-openai's text completion `OpenAI` LLM: the OpenAI integration does not
# record the legacy Completions API it calls, so this handler does.
_OPENAI_IDS: Final = (
    ("langchain", "chat_models", "openai"),
    ("langchain", "chat_models", "azure_openai"),
)
_ANTHROPIC_IDS: Final = (("langchain", "chat_models", "anthropic"),)


# -- what one call is ---------------------------------------------------------------------


def _usage_of(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """LangChain's ``usage_metadata`` in tokenledger's canonical shape (both count the
    cache inside ``input_tokens`` and reasoning inside ``output_tokens``)."""
    inputs = metadata.get("input_token_details") or {}
    outputs = metadata.get("output_token_details") or {}
    return {
        "tokenledger_shape": "canonical",
        "input_tokens": metadata.get("input_tokens"),
        "output_tokens": metadata.get("output_tokens"),
        "cache_read_tokens": inputs.get("cache_read"),
        "cache_write_tokens": inputs.get("cache_creation"),
        "reasoning_tokens": outputs.get("reasoning"),
    }


class _Call:
    """One model call between ``on_*_start`` and its end; finishes its `PendingCall`
    exactly once. Never raises: a failure to record is logged.

    A batch (``generate([m1, m2])``, a text completion model given several prompts)
    starts one LangChain run per prompt, all before the first request is sent; they
    share the ``invocation_params`` dict, which is how siblings are recognised.
    """

    __slots__ = (
        "__weakref__",
        "batch",
        "batch_size",
        "messages",
        "order",
        "pending",
        "run_id",
        "sent",
    )

    def __init__(
        self,
        pending: PendingCall,
        messages: list[dict[str, Any]],
        run_id: UUID,
        batch: object,
        batch_size: int,
    ) -> None:
        self.pending = pending
        self.messages = messages  # the prompt in OpenAI's shape, counted for estimates
        self.run_id = run_id  # LangChain's, the key in the registry
        self.batch = batch  # the invocation parameters its batch shares, or None
        self.batch_size = batch_size
        self.order = next(_start_order)  # a batch's prompts are sent in the order they start
        # False once a sibling sent before it failed: a synchronous batch stops there,
        # so this prompt was never sent if its end never arrives.
        self.sent = True

    def _generation(self, response: LLMResult | None) -> Any:
        """The generation of this call: LangChain gives one prompt per run id."""
        if response is None:
            return None
        for generations in response.generations:
            for generation in generations:
                return generation
        return None

    def _reported_usage(self, response: LLMResult | None) -> Any:
        """The usage the model reported, or None."""
        generation = self._generation(response)
        message = getattr(generation, "message", None)
        metadata = getattr(message, "usage_metadata", None)
        if metadata:
            return _usage_of(metadata)
        output = (response.llm_output if response is not None else None) or {}
        if self.batch_size > 1 and output.get("token_usage") == {}:
            # A text completion batch is one request: `LLMResult.flatten()` gives its
            # usage to the first prompt and an empty one to the others. Counting them
            # would count the request twice: they cost nothing more.
            return TokenUsage()
        raw = output.get("token_usage") or output.get("usage")
        return raw or None

    def _estimated_usage(self, response: LLMResult | None, model: str | None) -> TokenUsage:
        model = model or self.pending.call.requested_model or ""
        generation = self._generation(response)
        text = getattr(generation, "text", None) or ""
        return TokenUsage(
            input_tokens=count_tokens(model, messages=self.messages),
            output_tokens=count_tokens(model, text=text) if text else 0,
        )

    def _served(self, response: LLMResult) -> tuple[str | None, list[str] | None]:
        generation = self._generation(response)
        message = getattr(generation, "message", None)
        metadata = getattr(message, "response_metadata", None) or {}
        info = getattr(generation, "generation_info", None) or {}
        output = response.llm_output or {}
        model = metadata.get("model_name") or metadata.get("model") or output.get("model_name")
        reason = (
            metadata.get("finish_reason")
            or metadata.get("stop_reason")
            or info.get("finish_reason")
        )
        return (model if isinstance(model, str) else None), ([str(reason)] if reason else None)

    def succeed(self, response: LLMResult) -> None:
        try:
            if isinstance(self._generation(response), ChatGenerationChunk):
                self.pending.call.streamed = True
            model, finish_reasons = self._served(response)
            usage = self._reported_usage(response)
            if usage is not None:
                self.pending.succeed(usage, model=model, finish_reasons=finish_reasons)
            else:
                self.pending.succeed(
                    self._estimated_usage(response, model),
                    model=model,
                    finish_reasons=finish_reasons,
                    estimated=True,
                )
        except Exception:
            logger.exception("tokenledger could not record a LangChain model call")

    def fail(self, error: BaseException, response: LLMResult | None) -> None:
        try:
            if isinstance(error, BudgetExceeded):
                self.pending.on_failure(error)  # refused below us: nothing was sent
                return
            if isinstance(error, (GeneratorExit, asyncio.CancelledError)):
                # The caller stopped reading a stream. With its final usage in hand it
                # was complete; otherwise what was sent and received is estimated.
                self.pending.call.streamed = True
                usage = self._reported_usage(response)
                if usage is not None and response is not None:
                    self.succeed(response)
                else:
                    self.pending.abandon(self._estimated_usage(response, None))
                return
            self.pending.fail(error, usage=self._reported_usage(response))
        except Exception:
            logger.exception("tokenledger could not record a failed LangChain model call")

    def release(self) -> None:
        """Nothing was sent: give back what was reserved for it, record nothing."""
        try:
            if self.pending.claim():
                self.pending.release()
        except Exception:
            logger.exception("tokenledger could not release a LangChain model call")

    def end_with_run(self) -> None:
        """The call's run is ending and LangChain never reported the call's end.

        ``asyncio.wait_for(model.ainvoke(...))`` timing out cancels the call with no
        callback, and a synchronous ``generate([m1, m2])`` whose second prompt fails
        drops the first one's result. What was sent is recorded as abandoned, its prompt
        counted (estimated); what was not is released. Either way its reservation is
        given back.
        """
        _registry.forget(self)
        if self.sent:
            try:
                self.pending.abandon(self._estimated_usage(None, None))
            except Exception:
                logger.exception("tokenledger could not record an abandoned LangChain call")
        else:
            self.release()

    def watch(self) -> None:
        """Have the call's run finish it when the run ends, if nothing else did.

        The recorder finishes, when a run ends, the open streams its calls registered
        with `PendingCall.watch_stream`, through `capture.finish_abandoned`, which calls
        ``pending.stream()`` for the stream to close: here that function records the
        call itself and returns no stream (the `PendingCall` is then claimed, and
        nothing else is recorded). It holds the call weakly: a call that ended is not
        kept alive until its run ends.
        """
        ref = weakref.ref(self)

        def at_run_end() -> None:
            call = ref()
            if call is not None:
                call.end_with_run()

        self.pending.stream = at_run_end
        self.pending.watch_stream()
        # The run holds the `PendingCall` until it ends; the request body was only
        # needed for the reservation, taken by now.
        self.pending.request = {}


# -- what is open, shared by every handler ------------------------------------------------


class _Registry:
    """What every handler knows, by LangChain run id.

    Shared by all handlers, so a handler given in ``callbacks=`` next to the one
    `instrument` attached records each call (and opens each node run) once: the
    first to see a start claims it.
    """

    _CLAIMED: Final = object()  # a call being started by another handler

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.scopes: dict[UUID, Run] = {}  # chains, tools, retrievers -> their run
        self.nodes: dict[UUID, Run] = {}  # graph node runs this module opened
        self.calls: dict[UUID, object] = {}  # model calls -> _Call (or _CLAIMED)
        # The shared invocation parameters of batches refused at the start of one of
        # their prompts. An async batch starts its prompts concurrently, so a sibling
        # may start after the refusal; nothing of the batch is sent. A few suffice:
        # siblings start together.
        self.refused: deque[object] = deque(maxlen=32)

    def run_for(self, parent_run_id: UUID | None) -> Run | None:
        """The run a LangChain run starting under ``parent_run_id`` belongs to."""
        scoped = self.scopes.get(parent_run_id) if parent_run_id is not None else None
        return _innermost(current_run(), scoped)

    def claim_call(self, run_id: UUID) -> bool:
        with self.lock:
            if run_id in self.calls:
                return False
            self.calls[run_id] = self._CLAIMED
            return True

    def pop_call(self, run_id: UUID) -> _Call | None:
        with self.lock:
            call = self.calls.pop(run_id, None)
        return call if isinstance(call, _Call) else None

    def forget(self, call: _Call) -> None:
        with self.lock:
            if self.calls.get(call.run_id) is call:
                del self.calls[call.run_id]

    def was_refused(self, batch: object) -> bool:
        with self.lock:
            return any(refused is batch for refused in self.refused)

    def refuse_batch(self, batch: object) -> list[_Call]:
        """A prompt of ``batch`` was refused: no prompt of it is sent. Its open
        siblings, taken out of the registry, to release."""
        with self.lock:
            self.refused.append(batch)
            siblings = [c for c in self.calls.values() if isinstance(c, _Call) and c.batch is batch]
            for call in siblings:
                del self.calls[call.run_id]
        return siblings

    def sibling_failed(self, failed: _Call) -> None:
        """A synchronous batch stops at its first failure: the siblings that started
        after it were never sent, unless their own end arrives (an async batch sends
        them all)."""
        with self.lock:
            for call in self.calls.values():
                if (
                    isinstance(call, _Call)
                    and call.batch is failed.batch
                    and call.order > failed.order
                ):
                    call.sent = False


_registry = _Registry()
_start_order = itertools.count()


def _innermost(current: Run | None, scoped: Run | None) -> Run | None:
    """The deeper of two runs when one encloses the other, else the current one."""
    if current is None or scoped is None or current is scoped:
        return current or scoped
    run: Run | None = current.parent
    while run is not None:
        if run is scoped:
            return current
        run = run.parent
    run = scoped.parent
    while run is not None:
        if run is current:
            return scoped
        run = run.parent
    return current


def _open_node_run(name: str, parent: Run | None) -> Run | None:
    """A child run for a graph node, started but not made current.

    ``Run.start`` makes the run current in this context; a callback's context is not
    the node's (an async callback runs in a copy), so that is undone here, as the agent
    decorator does for generators, and the run is found through LangChain's run ids.
    """
    ledger = parent.ledger if parent is not None else capture.capture_ledger()
    if ledger is None or not ledger.capture:
        return None
    run = Run(ledger, name, tags={}, parent=parent)
    run.start()
    run.detach()
    return run


def _node_name(name: object, tags: Sequence[str] | None, metadata: Mapping[str, Any]) -> str | None:
    """The node's name when this chain is a LangGraph node itself (not a runnable
    inside one, which inherits the node's metadata)."""
    node = metadata.get("langgraph_node")
    if not isinstance(node, str) or node != name or node.startswith("__"):
        return None
    if not any(tag.startswith("graph:step:") for tag in tags or ()):
        return None
    return node


def _is_control_flow(error: BaseException) -> bool:
    """LangGraph's interrupts and ``Command`` hand-offs travel as exceptions."""
    errors = sys.modules.get("langgraph.errors")
    bubble = getattr(errors, "GraphBubbleUp", None)
    return isinstance(bubble, type) and isinstance(error, bubble)


# -- who records a call ----------------------------------------------------------------


def _captured_below(serialized: Mapping[str, Any], metadata: Mapping[str, Any]) -> bool:
    """True when tokenledger already captures the model's own client, which then
    records the call (see the module docstring)."""
    ident = serialized.get("id")
    path = tuple(ident) if isinstance(ident, list) else ()
    cls = str(path[-1]) if path else str(serialized.get("name") or "")
    if "LiteLLM" in cls or metadata.get("ls_provider") == "litellm":
        return _litellm.installed()
    if path[:3] in _OPENAI_IDS:
        return _integration_active("tokenledger.integrations.openai")
    if path[:3] in _ANTHROPIC_IDS:
        return _integration_active("tokenledger.integrations.anthropic")
    return False


def _integration_active(module_name: str) -> bool:
    # Patched classes mean every client of that SDK is recorded (instrument() with no
    # argument); a module never imported is not instrumented.
    patches = getattr(sys.modules.get(module_name), "_patches", None)
    return bool(getattr(patches, "classes", None))


def _provider_of(metadata: Mapping[str, Any]) -> str | None:
    provider = metadata.get("ls_provider")
    if not isinstance(provider, str):
        return None
    return _PROVIDERS.get(provider, provider)


def _model_of(metadata: Mapping[str, Any], params: Mapping[str, Any]) -> str | None:
    for model in (
        metadata.get("ls_model_name"),
        params.get("model"),
        params.get("model_name"),
        params.get("model_id"),
    ):
        if isinstance(model, str) and model:
            return model
    return None


def _max_tokens_of(metadata: Mapping[str, Any], params: Mapping[str, Any]) -> int | None:
    for value in (
        metadata.get("ls_max_tokens"),
        params.get("max_completion_tokens"),
        params.get("max_tokens"),
    ):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


# -- the handler ---------------------------------------------------------------------------


class TokenledgerCallbackHandler(BaseCallbackHandler):
    """A LangChain callback handler that records every model call in the ledger.

    ``callbacks=[TokenledgerCallbackHandler()]`` on a model, a chain or a graph
    invocation (``config={"callbacks": [...]}``) records the model calls inside it, in
    sync and async code; `instrument` attaches one everywhere. Budgets are checked
    before each request and a refusal raises `BudgetExceeded` with nothing sent.

    ``graph_nodes=True`` opens a child run for each LangGraph node, named after it.

    .. versionadded:: 0.1.0
    """

    raise_error = True  # lets BudgetExceeded out of on_chat_model_start; nothing else
    run_inline = False  # async chains run it in a worker thread: reservations never block the loop

    def __init__(self, *, graph_nodes: bool = False) -> None:
        self.graph_nodes = graph_nodes

    # Events that carry nothing to record: skip LangChain's dispatch (and, in async
    # code, its hop to a worker thread) for them.
    @property
    def ignore_agent(self) -> bool:
        return True

    @property
    def ignore_retry(self) -> bool:
        return True

    @property
    def ignore_custom_event(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"TokenledgerCallbackHandler(graph_nodes={self.graph_nodes})"

    # -- model calls ---------------------------------------------------------------------
    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        def prompt() -> list[dict[str, Any]]:
            flat = [message for batch in messages for message in batch]
            converted: list[dict[str, Any]] = convert_to_openai_messages(flat)
            return converted

        self._start(sc.OP_CHAT, serialized, prompt, run_id, parent_run_id, metadata, kwargs)

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        def prompt() -> list[dict[str, Any]]:
            return [{"role": "user", "content": text} for text in prompts]

        operation = sc.OP_TEXT_COMPLETION
        self._start(operation, serialized, prompt, run_id, parent_run_id, metadata, kwargs)

    def _start(
        self,
        operation: str,
        serialized: dict[str, Any] | None,
        prompt: Any,
        run_id: UUID,
        parent_run_id: UUID | None,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> None:
        if not _registry.claim_call(run_id):
            return  # another tokenledger handler has it
        batch = kwargs.get("invocation_params")
        call: _Call | None = None
        try:
            if batch is not None and _registry.was_refused(batch):
                return  # a sibling prompt was refused: none of the batch is sent
            call = self._begin(
                operation, serialized or {}, prompt, run_id, parent_run_id, metadata, kwargs
            )
            if call is not None:
                call.watch()
        except (BudgetExceeded, LedgerError):
            # Refused, or budgets cannot be checked: fail closed, send nothing, and give
            # back what the batch's other prompts reserved.
            if batch is not None:
                for sibling in _registry.refuse_batch(batch):
                    sibling.release()
            raise
        except Exception:
            logger.exception("tokenledger could not start recording a LangChain model call")
        finally:
            with _registry.lock:
                if call is None:
                    _registry.calls.pop(run_id, None)
                else:
                    _registry.calls[run_id] = call

    def _begin(
        self,
        operation: str,
        serialized: dict[str, Any],
        prompt: Any,
        run_id: UUID,
        parent_run_id: UUID | None,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> _Call | None:
        metadata = metadata or {}
        if _captured_below(serialized, metadata):
            return None
        params = kwargs.get("invocation_params") or {}
        run = _registry.run_for(parent_run_id)
        messages = prompt()
        model = _model_of(metadata, params)
        pending = begin_call(
            operation=operation,
            model=model,
            provider=_provider_of(metadata),
            request={"messages": messages},
            max_tokens=_max_tokens_of(metadata, params),
            stream=params.get("stream") is True,
            run=run,
        )
        if pending is None:
            return None
        if pending.downgraded_to is not None:
            # A callback cannot change the model LangChain sends: refuse rather than
            # let the call pass the budget that asked for the cheaper model.
            error = BudgetExceeded(
                f"Budget would be exceeded by this call to {model} and a downgrade budget "
                f"chose {pending.downgraded_to}, but a LangChain callback cannot change the "
                "model a chat model sends. No request was sent. Instrument the model's "
                "client (tokenledger.integrations.openai.instrument(), or litellm "
                "capture) to have downgrades applied."
            )
            pending.on_failure(error)
            if pending.run is not None:
                pending.run.mark_budget_exceeded()
            raise error
        batch_size = kwargs.get("batch_size")
        return _Call(
            pending,
            messages,
            run_id,
            kwargs.get("invocation_params"),
            batch_size if isinstance(batch_size, int) else 1,
        )

    def on_llm_new_token(self, token: Any, *, run_id: UUID, **kwargs: Any) -> None:
        # Only a stream reports tokens; `stream=` is not in the invocation parameters of
        # `model.stream(...)`.
        call = _registry.calls.get(run_id)
        if isinstance(call, _Call):
            call.pending.call.streamed = True

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        call = _registry.pop_call(run_id)
        if call is not None:
            call.succeed(response)

    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        response: LLMResult | None = None,
        **kwargs: Any,
    ) -> None:
        call = _registry.pop_call(run_id)
        if call is not None:
            if call.batch is not None and call.batch_size > 1:
                _registry.sibling_failed(call)
            call.fail(error, response)

    # -- what encloses them ----------------------------------------------------------------
    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            node = _node_name(kwargs.get("name"), tags, metadata or {})
            self._enter(run_id, parent_run_id, node if self.graph_nodes else None)
        except Exception:
            logger.exception("tokenledger could not follow a LangChain chain")

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._exit(run_id, error)

    # Tools and retrievers enclose the calls they make as chains do, but are never graph
    # nodes. Only the run ids of these events matter: what LangChain passes first, by
    # position (the input, the output), is not read.
    def _scope_start(
        self, *args: Any, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._enter(run_id, parent_run_id, None)

    def _scope_end(self, *args: Any, run_id: UUID, **kwargs: Any) -> None:
        self._exit(run_id, None)

    on_tool_start = on_retriever_start = _scope_start
    on_chain_end = on_tool_end = on_retriever_end = _scope_end
    on_tool_error = on_retriever_error = on_chain_error

    def _enter(self, run_id: UUID, parent_run_id: UUID | None, node: str | None) -> None:
        """Remember which run a LangChain run belongs to; open a node's run."""
        try:
            # Under the lock, so two handlers seeing the same start open one node run.
            with _registry.lock:
                run = _registry.nodes.get(run_id) or _registry.run_for(parent_run_id)
                if node is not None and run_id not in _registry.nodes:
                    node_run = _open_node_run(node, run)
                    if node_run is not None:
                        _registry.nodes[run_id] = run = node_run
                if run is not None:
                    _registry.scopes[run_id] = run
        except Exception:
            logger.exception("tokenledger could not follow a LangChain run")

    def _exit(self, run_id: UUID, error: BaseException | None) -> None:
        try:
            with _registry.lock:
                _registry.scopes.pop(run_id, None)
                node_run = _registry.nodes.pop(run_id, None)
            if node_run is not None:
                node_run.end(None if error is None or _is_control_flow(error) else error)
        except Exception:
            logger.exception("tokenledger could not finish a LangGraph node run")


# -- switching it on and off -----------------------------------------------------------

_lock = threading.Lock()
_installed: TokenledgerCallbackHandler | None = None
_hook_registered = False


class _InstalledHandler:
    """What LangChain's configure hook reads: the handler `instrument` installed.

    LangChain's hooks read a ``ContextVar``, and a context variable set in one thread
    is unset in threads started later; `instrument` must reach every thread, as the
    SDK integrations' class patches do. LangChain only ever calls ``get()`` on it.
    """

    def get(self) -> TokenledgerCallbackHandler | None:
        return _installed


def instrument(*, graph_nodes: bool = False) -> TokenledgerCallbackHandler:
    """Record every LangChain and LangGraph model call, in every thread, from now on.

    Attaches a `TokenledgerCallbackHandler` (inherited by every child run) to every
    callback manager LangChain configures, the way LangSmith tracing is attached, and
    returns it. ``graph_nodes=True`` opens a child run for each LangGraph node, named
    after it. Calling it again keeps one handler and takes the new ``graph_nodes``.

    .. versionadded:: 0.1.0
    """
    global _installed, _hook_registered
    with _lock:
        if _installed is None:
            _installed = TokenledgerCallbackHandler(graph_nodes=graph_nodes)
        else:
            _installed.graph_nodes = graph_nodes
        if not _hook_registered:
            hook = cast("ContextVar[TokenledgerCallbackHandler | None]", _InstalledHandler())
            register_configure_hook(hook, True)  # inheritable: child runs get it too
            _hook_registered = True
        return _installed


def uninstrument() -> None:
    """Stop attaching the handler `instrument` installed. Handlers passed in
    ``callbacks=`` keep recording.

    .. versionadded:: 0.1.0
    """
    global _installed
    with _lock:
        _installed = None
