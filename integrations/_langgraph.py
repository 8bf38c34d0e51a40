"""LangGraph nodes and the nesting of runs, as the LangChain handler sees them.

`tokenledger.integrations.langchain` opens a child run for each graph node when asked
(``graph_nodes=True``) and must tell which of two runs is the deeper one: the run
current in a callback, or the run of the enclosing LangChain run. Both are here, with
how a LangGraph node is recognised and which of its exceptions are control flow.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from tokenledger import capture
from tokenledger.runs import Run


def innermost(current: Run | None, scoped: Run | None) -> Run | None:
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


def open_node_run(name: str, parent: Run | None) -> Run | None:
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


def node_name(name: object, tags: Sequence[str] | None, metadata: Mapping[str, Any]) -> str | None:
    """The node's name when this chain is a LangGraph node itself (not a runnable
    inside one, which inherits the node's metadata)."""
    node = metadata.get("langgraph_node")
    if not isinstance(node, str) or node != name or node.startswith("__"):
        return None
    if not any(tag.startswith("graph:step:") for tag in tags or ()):
        return None
    return node


def is_control_flow(error: BaseException) -> bool:
    """LangGraph's interrupts and ``Command`` hand-offs travel as exceptions."""
    errors = sys.modules.get("langgraph.errors")
    bubble = getattr(errors, "GraphBubbleUp", None)
    return isinstance(bubble, type) and isinstance(error, bubble)
