"""Runs: nesting, roll-up, tags, errors, and every kind of decorated function.

Calls here are recorded with `Ledger.record_call`, so these tests need no litellm; the
capture of real litellm calls is tested in test_capture.py.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal

import pytest
from helpers import calls_of, runs_by_name

import tokenledger as tl
from tokenledger import ConfigurationError, Ledger


def _call(ledger: Ledger, tokens_in: int = 100, tokens_out: int = 10) -> None:
    ledger.record_call(
        "gpt-4o-mini", provider="openai", input_tokens=tokens_in, output_tokens=tokens_out
    )


def test_nested_runs_know_parent_and_root_and_roll_up(ledger: Ledger) -> None:
    with ledger.run("root") as root:
        _call(ledger)
        with ledger.run("child") as child:
            _call(ledger)
            with ledger.run("grandchild") as grandchild:
                _call(ledger)
    assert (None, root.id) == (root.parent_id, root.root_id)
    assert (root.id, root.id) == (child.parent_id, child.root_id)
    assert (child.id, root.id) == (grandchild.parent_id, grandchild.root_id)
    assert (3, 2, 1) == (root.calls, child.calls, grandchild.calls)
    assert 300 == root.input_tokens
    assert root.cost_usd == 3 * grandchild.cost_usd > 0

    ledger.flush()
    stored = runs_by_name(ledger)
    assert 3 == stored["root"]["calls"]
    assert 2 == stored["child"]["calls"]
    assert root.cost_usd == stored["root"]["cost_usd"]
    assert "ok" == stored["grandchild"]["status"]


def test_each_call_belongs_to_exactly_one_run(ledger: Ledger) -> None:
    with ledger.run("root") as root:
        _call(ledger)
        with ledger.run("child") as child:
            _call(ledger)
    ledger.flush()
    calls = calls_of(ledger)
    assert sorted([root.id, child.id]) == sorted(c["run_id"] for c in calls)
    assert {root.id} == {c["root_run_id"] for c in calls}
    assert root.cost_usd == sum(c["cost_usd"] for c in calls)


def test_tags_are_inherited_and_overridden_by_children(ledger: Ledger) -> None:
    with (
        ledger.run("root", tags={"tenant": "acme", "user": "1"}),
        ledger.run("child", tags={"user": "2", "step": 3}) as child,
    ):
        pass
    assert {"tenant": "acme", "user": "2", "step": "3"} == child.tags
    ledger.flush()
    assert {"tenant": "acme", "user": "2", "step": "3"} == runs_by_name(ledger)["child"]["tags"]


def test_a_run_that_raises_is_recorded_as_error_and_the_exception_propagates(
    ledger: Ledger,
) -> None:
    class Boom(Exception):
        pass

    error = Boom("no")
    with pytest.raises(Boom) as raised, ledger.run("failing"):
        _call(ledger)
        raise error
    assert raised.value is error
    ledger.flush()
    stored = runs_by_name(ledger)["failing"]
    assert (
        "error",
        "test_a_run_that_raises_is_recorded_as_error_and_the_exception_propagates.<locals>.Boom",
    ) == (
        stored["status"],
        stored["error_type"],
    )
    assert 1 == stored["calls"]


def test_decorated_sync_function_keeps_its_signature_and_records_a_run(ledger: Ledger) -> None:
    @ledger.agent("planner", tags={"kind": "plan"})
    def plan(goal: str, *, steps: int = 2) -> list[str]:
        """Plan a goal."""
        _call(ledger)
        run = tl.current_run()
        assert run is not None
        return [f"{goal}:{i}:{run.name}" for i in range(steps)]

    assert ["g:0:planner", "g:1:planner"] == plan("g")
    assert "plan" == plan.__name__
    assert "Plan a goal." == plan.__doc__
    assert ["goal", "steps"] == list(inspect.signature(plan).parameters)
    assert tl.current_run() is None
    ledger.flush()
    assert {"kind": "plan"} == runs_by_name(ledger)["planner"]["tags"]


async def test_decorated_async_function_records_a_run(ledger: Ledger) -> None:
    @ledger.agent("async-agent")
    async def work(n: int) -> int:
        await asyncio.sleep(0)
        _call(ledger)
        return n * 2

    assert 42 == await work(21)
    assert inspect.iscoroutinefunction(work)
    ledger.flush()
    assert 1 == runs_by_name(ledger)["async-agent"]["calls"]


def test_decorated_generator_is_current_only_while_its_body_runs(ledger: Ledger) -> None:
    @ledger.agent("streamer")
    def produce(n: int) -> Iterator[str]:
        for i in range(n):
            _call(ledger)
            run = tl.current_run()
            assert run is not None
            yield f"{run.name}-{i}"

    seen = []
    for item in produce(3):
        assert tl.current_run() is None  # the caller is never inside the generator's run
        seen.append(item)
    assert ["streamer-0", "streamer-1", "streamer-2"] == seen
    ledger.flush()
    assert 3 == runs_by_name(ledger)["streamer"]["calls"]


def test_generator_closed_early_still_ends_its_run(ledger: Ledger) -> None:
    @ledger.agent("early")
    def produce() -> Iterator[int]:
        for i in range(10):
            _call(ledger)
            yield i

    gen = produce()
    assert 0 == next(gen)
    gen.close()
    ledger.flush()
    stored = runs_by_name(ledger)["early"]
    assert ("ok", 1) == (stored["status"], stored["calls"])


async def test_decorated_async_generator_records_a_run(ledger: Ledger) -> None:
    @ledger.agent("agen")
    async def produce(n: int) -> AsyncIterator[int]:
        for i in range(n):
            await asyncio.sleep(0)
            _call(ledger)
            yield i

    assert [0, 1] == [i async for i in produce(2)]
    assert inspect.isasyncgenfunction(produce)
    ledger.flush()
    assert 2 == runs_by_name(ledger)["agen"]["calls"]


async def test_async_with_and_context_flows_into_tasks(ledger: Ledger) -> None:
    async def step() -> str | None:
        await asyncio.sleep(0)
        _call(ledger)
        run = tl.current_run()
        return run.name if run else None

    async with ledger.run("fan-out") as run:
        names = await asyncio.gather(*(step() for _ in range(5)))
    assert ["fan-out"] * 5 == names
    assert 5 == run.calls


def test_bind_context_carries_the_run_into_worker_threads(ledger: Ledger) -> None:
    results: list[str | None] = []

    def work() -> None:
        _call(ledger)
        run = tl.current_run()
        results.append(run.name if run else None)

    with ledger.run("threads") as run:
        threads = [threading.Thread(target=tl.bind_context(work)) for _ in range(4)]
        plain = threading.Thread(target=work)
        for t in [*threads, plain]:
            t.start()
        for t in [*threads, plain]:
            t.join()
    assert [None, "threads", "threads", "threads", "threads"] == sorted(
        results, key=lambda x: x or ""
    )
    assert 4 == run.calls


def test_module_level_api_uses_the_default_ledger(db_url: str) -> None:
    ledger = tl.configure(db_url)
    try:

        @tl.agent("module-agent")
        def work() -> str:
            ledger.record_call("gpt-4o-mini", input_tokens=5, output_tokens=5)
            run = tl.current_run()
            assert run is not None
            return run.name

        assert "module-agent" == work()
        with tl.run("module-run", tags={"a": "b"}) as run:
            assert run is tl.current_run()
        assert tl.default_ledger() is ledger
        assert tl.flush()
        assert {"module-agent", "module-run"} <= set(runs_by_name(ledger))
    finally:
        ledger.close()


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({"": "x"}, "Tag key '' of run `bad` is invalid"),
        ({"k": None}, "Tag `k` of run `bad` is None"),
        ({"k": "x" * 5000}, "Tag `k` of run `bad` is 5000 characters long"),
        (["k"], "`tags` of run `bad` is \\['k'\\]"),
    ],
)
def test_bad_tags_get_a_clear_error(ledger: Ledger, tags: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ledger.run("bad", tags=tags)  # type: ignore[arg-type]


def test_hostile_tag_values_are_stored_verbatim(ledger: Ledger) -> None:
    hostile = {"user": "'; DROP TABLE runs; --", "émoji": "🚀 $(rm -rf /) `x`"}
    with ledger.run("hostile", tags=hostile):
        pass
    ledger.flush()
    assert hostile == runs_by_name(ledger)["hostile"]["tags"]


def test_unpriced_calls_are_counted_not_costed(ledger: Ledger) -> None:
    with pytest.warns(UserWarning, match="acme-private-7b"), ledger.run("r") as run:
        ledger.record_call("acme-private-7b", input_tokens=50, output_tokens=5)
        _call(ledger)
    assert 2 == run.calls
    assert 1 == run.record.unpriced_calls
    assert run.cost_usd > Decimal(0)
