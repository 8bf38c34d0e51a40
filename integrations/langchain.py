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

import logging
import threading
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, cast

try:
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.messages import convert_to_openai_messages
    from langchain_core.tracers.context import register_configure_hook
except ModuleNotFoundError as exc:  # pragma: no cover - exercised by a test with sys.modules
    raise ModuleNotFoundError(
        "tokenledger.integrations.langchain needs LangChain (langchain-core>=0.3): "
        "pip install 'tokenledger[langchain]'",
        name=exc.name,
    ) from exc

from tokenledger import _litellm
from tokenledger import semconv as sc
from tokenledger.capture import begin_call
from tokenledger.exceptions import BudgetExceeded, LedgerError

from ._langchain_calls import ModelCall, registry
from ._langgraph import is_control_flow, node_name, open_node_run
from ._sdk import sdk_patched

if TYPE_CHECKING:
    from uuid import UUID

    from langchain_core.messages import BaseMessage
    from langchain_core.outputs import LLMResult

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
        return sdk_patched("openai")
    if path[:3] in _ANTHROPIC_IDS:
        return sdk_patched("anthropic")
    return False


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
        if not registry.claim_call(run_id):
            return  # another tokenledger handler has it
        batch = kwargs.get("invocation_params")
        call: ModelCall | None = None
        try:
            if batch is not None and registry.was_refused(batch):
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
                for sibling in registry.refuse_batch(batch):
                    sibling.release()
            raise
        except Exception:
            logger.exception("tokenledger could not start recording a LangChain model call")
        finally:
            with registry.lock:
                if call is None:
                    registry.calls.pop(run_id, None)
                else:
                    registry.calls[run_id] = call

    def _begin(
        self,
        operation: str,
        serialized: dict[str, Any],
        prompt: Any,
        run_id: UUID,
        parent_run_id: UUID | None,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> ModelCall | None:
        metadata = metadata or {}
        if _captured_below(serialized, metadata):
            return None
        params = kwargs.get("invocation_params") or {}
        run = registry.run_for(parent_run_id)
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
        return ModelCall(
            pending,
            messages,
            run_id,
            kwargs.get("invocation_params"),
            batch_size if isinstance(batch_size, int) else 1,
        )

    def on_llm_new_token(self, token: Any, *, run_id: UUID, **kwargs: Any) -> None:
        # Only a stream reports tokens; `stream=` is not in the invocation parameters of
        # `model.stream(...)`.
        call = registry.calls.get(run_id)
        if isinstance(call, ModelCall):
            call.pending.call.streamed = True

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        call = registry.pop_call(run_id)
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
        call = registry.pop_call(run_id)
        if call is not None:
            if call.batch is not None and call.batch_size > 1:
                registry.sibling_failed(call)
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
            node = node_name(kwargs.get("name"), tags, metadata or {})
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
            with registry.lock:
                run = registry.nodes.get(run_id) or registry.run_for(parent_run_id)
                if node is not None and run_id not in registry.nodes:
                    node_run = open_node_run(node, run)
                    if node_run is not None:
                        registry.nodes[run_id] = run = node_run
                if run is not None:
                    registry.scopes[run_id] = run
        except Exception:
            logger.exception("tokenledger could not follow a LangChain run")

    def _exit(self, run_id: UUID, error: BaseException | None) -> None:
        try:
            with registry.lock:
                registry.scopes.pop(run_id, None)
                node_run = registry.nodes.pop(run_id, None)
            if node_run is not None:
                node_run.end(None if error is None or is_control_flow(error) else error)
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
