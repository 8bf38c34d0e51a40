"""One LangChain model call from its start callback to its end, and what every handler
knows of the LangChain runs that are open.

`tokenledger.integrations.langchain` begins a call in ``on_chat_model_start`` /
``on_llm_start`` and hands it to a `ModelCall`, which reads the usage LangChain reports
(or estimates it) and finishes the call's `PendingCall` exactly once. The `registry`
is shared by every handler, so a call (or a node run) two handlers see is recorded once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import weakref
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from langchain_core.outputs import ChatGenerationChunk, LLMResult

from tokenledger.capture import PendingCall
from tokenledger.exceptions import BudgetExceeded
from tokenledger.records import TokenUsage
from tokenledger.runs import Run, current_run

from ._langgraph import innermost
from ._sdk import count_tokens, succeed_or_estimate

if TYPE_CHECKING:
    from uuid import UUID

logger = logging.getLogger("tokenledger")


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


class ModelCall:
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
            succeed_or_estimate(
                self.pending,
                self._reported_usage(response),
                lambda: self._estimated_usage(response, model),
                model=model,
                finish_reasons=finish_reasons,
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
        registry.forget(self)
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


class Registry:
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
        self.calls: dict[UUID, object] = {}  # model calls -> ModelCall (or _CLAIMED)
        # The shared invocation parameters of batches refused at the start of one of
        # their prompts. An async batch starts its prompts concurrently, so a sibling
        # may start after the refusal; nothing of the batch is sent. A few suffice:
        # siblings start together.
        self.refused: deque[object] = deque(maxlen=32)

    def run_for(self, parent_run_id: UUID | None) -> Run | None:
        """The run a LangChain run starting under ``parent_run_id`` belongs to."""
        scoped = self.scopes.get(parent_run_id) if parent_run_id is not None else None
        return innermost(current_run(), scoped)

    def claim_call(self, run_id: UUID) -> bool:
        with self.lock:
            if run_id in self.calls:
                return False
            self.calls[run_id] = self._CLAIMED
            return True

    def pop_call(self, run_id: UUID) -> ModelCall | None:
        with self.lock:
            call = self.calls.pop(run_id, None)
        return call if isinstance(call, ModelCall) else None

    def forget(self, call: ModelCall) -> None:
        with self.lock:
            if self.calls.get(call.run_id) is call:
                del self.calls[call.run_id]

    def was_refused(self, batch: object) -> bool:
        with self.lock:
            return any(refused is batch for refused in self.refused)

    def refuse_batch(self, batch: object) -> list[ModelCall]:
        """A prompt of ``batch`` was refused: no prompt of it is sent. Its open
        siblings, taken out of the registry, to release."""
        with self.lock:
            self.refused.append(batch)
            siblings = [
                c for c in self.calls.values() if isinstance(c, ModelCall) and c.batch is batch
            ]
            for call in siblings:
                del self.calls[call.run_id]
        return siblings

    def sibling_failed(self, failed: ModelCall) -> None:
        """A synchronous batch stops at its first failure: the siblings that started
        after it were never sent, unless their own end arrives (an async batch sends
        them all)."""
        with self.lock:
            for call in self.calls.values():
                if (
                    isinstance(call, ModelCall)
                    and call.batch is failed.batch
                    and call.order > failed.order
                ):
                    call.sent = False


registry = Registry()
_start_order = itertools.count()
