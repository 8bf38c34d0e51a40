"""An offline demo: a support-triage agent whose every model call lands in the ledger.

Each ticket is one run of the ``support-triage`` agent, and each step is a real
``litellm`` call answered by ``mock_response=`` — litellm's own offline path, so capture,
usage parsing and pricing run exactly as they do against a provider, and nothing leaves
the machine. Per ticket:

1. **plan** — ``gpt-4o`` with a long shared system prompt, served from OpenAI's prompt
   cache after the first ticket (``prompt_tokens_details.cached_tokens``);
2. **retrieve** — a ``text-embedding-3-small`` embedding of the ticket;
3. **tools** — one to three ``gpt-4o-mini`` tool steps; one of them, on one ticket, hits a
   rate limit (a real ``litellm.RateLimitError``) and the agent retries it once on
   ``claude-haiku-4-5``;
4. **policy check** — ``o3-mini`` with reasoning tokens, for billing and account tickets;
5. **research** — a ``researcher`` sub-agent (a child run) on ``claude-sonnet-4-5`` that
   writes the knowledge base to Anthropic's prompt cache once and reads it afterwards
   (``cache_creation_input_tokens`` / ``cache_read_input_tokens``);
6. **reply** — a streamed ``gpt-4o-mini`` summary, read to the end;
7. **outcome** — ``resolved`` (worth $4.00) for most tickets, ``escalated`` for the rest,
   so that ``tokenledger economics`` has successes to divide the cost by.

Runs carry ``tenant``, ``user`` and ``channel`` tags, and ``demo=true`` (`DEMO_TAGS`) so
that they can be told apart from real runs in a shared ledger. Token counts are drawn from a
seeded random generator, so a seed always gives the same ledger rows (ids and times
aside).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import random
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from tokenledger.records import utcnow

if TYPE_CHECKING:
    from tokenledger.ledger import Ledger
    from tokenledger.runs import Run

__all__ = ["AGENT_NAME", "DEMO_TAGS", "MODELS", "SUB_AGENT_NAME", "DemoSummary", "run_demo"]

AGENT_NAME = "support-triage"
SUB_AGENT_NAME = "researcher"
#: Tags on every run the demo records (its sub-runs inherit them).
DEMO_TAGS = {"demo": "true"}

#: Every model the demo calls, by role.
MODELS = {
    "planner": "gpt-4o",
    "embedding": "text-embedding-3-small",
    "tools": "gpt-4o-mini",
    "fallback": "claude-haiku-4-5",
    "policy": "o3-mini",
    "researcher": "claude-sonnet-4-5",
    "summariser": "gpt-4o-mini",
}

_TENANTS = {
    "acme": ("u-1042", "u-2210", "u-3175"),
    "globex": ("u-0007", "u-0451"),
    "initech": ("u-1999", "u-2600", "u-4815", "u-1623"),
}
_CHANNELS = ("email", "chat", "web")
_TICKETS = (
    ("billing", "I was charged twice for invoice INV-2291 this month."),
    ("billing", "Please refund the annual plan I cancelled within the trial."),
    ("account", "SSO login loops back to the sign-in page for our whole team."),
    ("account", "How do I transfer workspace ownership to a colleague?"),
    ("hardware", "The printer on floor 2 jams on every duplex job."),
    ("hardware", "Badge reader at the loading dock rejects valid badges."),
    ("shipping", "Order #58231 shows delivered but never arrived."),
    ("shipping", "Can I change the delivery address of an order in transit?"),
    ("product", "Export to CSV drops every column after the 40th."),
    ("product", "The mobile app crashes when I attach a photo to a report."),
)
_TOOLS = ("lookup_customer", "search_orders", "check_sla", "search_known_issues")

# A shared system prompt long enough for OpenAI's automatic prompt caching (which caches
# from 1,024 tokens in 128-token steps), and an Anthropic knowledge-base block.
_PLANNER_PREFIX_TOKENS = 1_536
_KNOWLEDGE_BASE_TOKENS = 2_400
# The one tool step that hits a rate limit: the fourth ticket's (or the last, if fewer).
_FAILING_TICKET = 3
# Each ticket's outcome: resolved (worth a human agent's time) or escalated.
_RESOLVED_SHARE = 0.85
_RESOLVED_VALUE_USD = "4.00"


@dataclasses.dataclass(frozen=True, slots=True)
class DemoSummary:
    """What `run_demo` recorded."""

    runs: int  # root runs of the support-triage agent
    sub_runs: int  # researcher runs below them
    calls: int
    failed_calls: int
    cost_usd: Decimal  # sum of the root runs' totals, which include their sub-runs
    started_at: dt.datetime
    run_ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class _Ticket:
    number: int
    category: str
    text: str
    tenant: str
    user: str
    channel: str


def run_demo(ledger: Ledger, *, runs: int = 20, seed: int = 7) -> DemoSummary:
    """Run ``runs`` support tickets through a multi-step agent, offline, into ``ledger``.

    Imports litellm (with its bundled price map, so no network), makes real
    ``litellm.completion`` / ``litellm.embedding`` calls answered by ``mock_response=``,
    then flushes the ledger. Takes a few seconds, most of it importing litellm.

    .. versionadded:: 0.1.0
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or not 1 <= runs <= 10_000:
        from tokenledger.exceptions import ConfigurationError

        raise ConfigurationError(f"`runs` is {runs!r}; the demo runs 1 to 10000 tickets.")
    # Before litellm is imported: use the price map bundled with litellm instead of
    # fetching one from the internet (which retries for seconds when offline).
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm
    from litellm.exceptions import RateLimitError

    rng = random.Random(seed)
    tickets = [_ticket(rng, number) for number in range(runs)]
    failing = min(_FAILING_TICKET, runs - 1)
    steps = _Steps(litellm, rng)
    # Outcomes are drawn apart, so that they leave a seed's token counts as they were.
    outcomes = random.Random(seed)

    @ledger.agent(SUB_AGENT_NAME)
    def research(ticket: _Ticket) -> str:
        notes = [steps.research(ticket, first=True)]
        if rng.random() < 0.4:  # a follow-up question, now served from the cache
            notes.append(steps.research(ticket, first=False))
        return "\n".join(notes)

    roots: list[Run] = []

    def triage(ticket: _Ticket) -> str:
        run = ledger.current_run()
        if run is not None:
            roots.append(run)
        plan = steps.plan(ticket)
        steps.retrieve(ticket)
        for index in range(rng.randint(1, 3)):
            fail = ticket.number == failing and index == 0
            try:
                steps.tool(ticket, _TOOLS[index], fail=fail)
            except RateLimitError:
                # Back off to a model on another provider, once.
                steps.tool(ticket, _TOOLS[index], model=MODELS["fallback"])
        if ticket.category in ("billing", "account") or ticket.number == 0:
            steps.policy_check(ticket)
        findings = research(ticket)
        answer = steps.reply(ticket, plan, findings)
        if run is not None:
            # Most tickets are resolved, each worth what a human agent would have cost;
            # the rest go to a human. `tokenledger economics` divides cost by these.
            if outcomes.random() < _RESOLVED_SHARE:
                run.outcome("resolved", value=_RESOLVED_VALUE_USD)
            else:
                run.outcome("escalated")
        return answer

    started_at = utcnow()
    quiet = litellm.suppress_debug_info
    litellm.suppress_debug_info = True  # no "Give Feedback / Get Help" banner on the 429
    try:
        for ticket in tickets:
            # Each ticket's run carries its own tenant and user, so the agent is
            # decorated per ticket (a decorator's tags are fixed when it is applied).
            tags = {
                "tenant": ticket.tenant,
                "user": ticket.user,
                "channel": ticket.channel,
                **DEMO_TAGS,
            }
            handle_ticket = ledger.agent(AGENT_NAME, tags=tags)(triage)
            handle_ticket(ticket)
    finally:
        litellm.suppress_debug_info = quiet
    ledger.flush()
    return DemoSummary(
        runs=len(roots),
        sub_runs=steps.researched,
        calls=sum(run.calls for run in roots),
        failed_calls=sum(run.record.failed_calls for run in roots),
        cost_usd=sum((run.cost_usd for run in roots), Decimal(0)),
        started_at=started_at,
        run_ids=tuple(run.id for run in roots),
    )


def _ticket(rng: random.Random, number: int) -> _Ticket:
    tenant = rng.choice(sorted(_TENANTS))
    category, text = _TICKETS[0] if number == 0 else rng.choice(_TICKETS)
    return _Ticket(
        number=number,
        category=category,
        text=text,
        tenant=tenant,
        user=rng.choice(_TENANTS[tenant]),
        channel=rng.choice(_CHANNELS),
    )


class _Steps:
    """The agent's model calls. Each builds a provider-shaped usage block for its mock."""

    def __init__(self, litellm: Any, rng: random.Random) -> None:
        self.litellm = litellm
        self.rng = rng
        self.planner_cache_warm = False
        self.kb_cache_warm = False
        self.researched = 0

    def _messages(self, system: str, ticket: _Ticket) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": system},
            {"role": "user", "content": f"[{ticket.tenant}/{ticket.user}] {ticket.text}"},
        ]

    def _response(
        self,
        model: str,
        content: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        usage_extra: dict[str, Any] | None = None,
    ) -> Any:
        from litellm.types.utils import Usage

        response = self.litellm.ModelResponse(
            model=model,
            choices=[
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": content},
                }
            ],
        )
        response.usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            **(usage_extra or {}),
        )
        return response

    def plan(self, ticket: _Ticket) -> str:
        model = MODELS["planner"]
        # OpenAI shape: prompt_tokens counts every input token; the cached part of the
        # shared prefix is reported in prompt_tokens_details.cached_tokens.
        prompt = _PLANNER_PREFIX_TOKENS + self.rng.randint(350, 1_400)
        cached = _PLANNER_PREFIX_TOKENS if self.planner_cache_warm else 0
        self.planner_cache_warm = True
        content = f"Plan for ticket {ticket.number}: identify customer, check history, reply."
        self.litellm.completion(
            model=model,
            messages=self._messages("You are the triage planner. <policies...>", ticket),
            max_tokens=400,
            mock_response=self._response(
                model,
                content,
                prompt_tokens=prompt,
                completion_tokens=self.rng.randint(120, 320),
                usage_extra={"prompt_tokens_details": {"cached_tokens": cached}},
            ),
        )
        return content

    def retrieve(self, ticket: _Ticket) -> None:
        # litellm's mock embedding reports 10 input tokens, about one ticket subject.
        self.litellm.embedding(
            model=MODELS["embedding"],
            input=[ticket.text],
            mock_response=[round(self.rng.uniform(-1, 1), 4) for _ in range(8)],
        )

    def tool(
        self, ticket: _Ticket, tool: str, *, fail: bool = False, model: str | None = None
    ) -> None:
        model = model or MODELS["tools"]
        mock: Any
        if fail:
            mock = self.litellm.RateLimitError(
                "Rate limit reached for gpt-4o-mini: 200000 tokens per minute.",
                llm_provider="openai",
                model=model,
            )
        else:
            mock = self._response(
                model,
                f'{{"tool": "{tool}", "ticket": {ticket.number}, "result": "ok"}}',
                prompt_tokens=self.rng.randint(600, 1_500),
                completion_tokens=self.rng.randint(40, 160),
            )
        self.litellm.completion(
            model=model,
            messages=self._messages(f"Call the tool `{tool}` and report its result.", ticket),
            max_tokens=256,
            mock_response=mock,
        )

    def policy_check(self, ticket: _Ticket) -> None:
        model = MODELS["policy"]
        completion = self.rng.randint(400, 1_100)
        # Reasoning tokens are part of completion_tokens, reported in the details.
        reasoning = int(completion * self.rng.uniform(0.6, 0.85))
        self.litellm.completion(
            model=model,
            messages=self._messages("Does the refund and account policy allow this?", ticket),
            max_completion_tokens=2_000,
            mock_response=self._response(
                model,
                "Allowed under policy 4.2: refund within 30 days of the charge.",
                prompt_tokens=self.rng.randint(700, 1_300),
                completion_tokens=completion,
                usage_extra={"completion_tokens_details": {"reasoning_tokens": reasoning}},
            ),
        )

    def research(self, ticket: _Ticket, *, first: bool) -> str:
        model = MODELS["researcher"]
        # Anthropic shape: the knowledge base is written to the prompt cache once
        # (cache_creation_input_tokens, billed at 1.25x) and read back afterwards
        # (cache_read_input_tokens, billed at 0.1x). litellm's prompt_tokens counts both.
        uncached = self.rng.randint(300, 900)
        if self.kb_cache_warm:
            extra = {"cache_read_input_tokens": _KNOWLEDGE_BASE_TOKENS}
        else:
            extra = {"cache_creation_input_tokens": _KNOWLEDGE_BASE_TOKENS}
        self.kb_cache_warm = True
        if first:
            self.researched += 1
        content = f"Known issue KB-{400 + ticket.number}: matches '{ticket.text[:32]}...'."
        self.litellm.completion(
            model=model,
            messages=self._messages("Research the ticket in the knowledge base.", ticket),
            max_tokens=800,
            mock_response=self._response(
                model,
                content,
                prompt_tokens=uncached + _KNOWLEDGE_BASE_TOKENS,
                completion_tokens=self.rng.randint(200, 650),
                usage_extra=extra,
            ),
        )
        return content

    def reply(self, ticket: _Ticket, plan: str, findings: str) -> str:
        model = MODELS["summariser"]
        text = (
            f"Hi! Thanks for reaching out about: {ticket.text} "
            "We found the cause and a fix is on its way; we will confirm within one day."
        )
        stream = self.litellm.completion(
            model=model,
            messages=[
                *self._messages("Write the reply to the customer.", ticket),
                {"role": "assistant", "content": f"{plan}\n{findings}"},
            ],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=500,
            mock_response=self._response(
                model,
                text,
                prompt_tokens=self.rng.randint(900, 2_200),
                completion_tokens=self.rng.randint(90, 260),
            ),
        )
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
