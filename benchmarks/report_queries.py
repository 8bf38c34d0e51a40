"""Report queries over a large ledger: per-agent per-day report, cost per outcome, runs.

Builds a ledger of N calls through the real batch writer (`tokenledger._writer.BatchWriter`)
on SQLite and on PostgreSQL (a throw-away schema, dropped afterwards, as the test fixture
does), then times each query: the median and the best of ``--repeat`` runs, on a warm
cache. The workload looks like an agent fleet: 4 agents, about 10 calls per root run
(1 to 19), a sub-agent in a fifth of the runs, 200 tenants, 30 days of history, 4
models, one tool charge in a tenth of the runs, and outcomes on most runs.

    python -m benchmarks.report_queries [--calls 100000 1000000] [--engines sqlite postgres]
                                        [--repeat 5] [--postgres URL] [--explain]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from tokenledger import _schema as schema
from tokenledger import _storage as storage
from tokenledger import economics, queries
from tokenledger._writer import BatchWriter
from tokenledger.records import CallRecord, RunRecord, new_id

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
AGENTS = ("support", "research", "billing", "triage")
MODELS = (  # (name, provider, USD per input token, USD per output token)
    ("gpt-4o-mini", "openai", Decimal("0.00000015"), Decimal("0.0000006")),
    ("gpt-4o", "openai", Decimal("0.0000025"), Decimal("0.00001")),
    ("claude-sonnet-4-5", "anthropic", Decimal("0.000003"), Decimal("0.000015")),
    ("gemini-2.5-flash", "vertex_ai", Decimal("0.0000003"), Decimal("0.0000025")),
)
UTC = dt.timezone.utc


# ------------------------------------------------------------------------------ data


def _calls_of(
    rng: random.Random, run: RunRecord, root: RunRecord, count: int, start: dt.datetime
) -> Iterator[CallRecord]:
    for i in range(count):
        model, provider, per_in, per_out = MODELS[rng.randrange(len(MODELS))]
        tokens_in, tokens_out = rng.randint(200, 8000), rng.randint(20, 800)
        cached = tokens_in // 2 if rng.random() < 0.3 else 0
        cost = per_in * tokens_in + per_out * tokens_out
        failed = rng.random() < 0.03
        at = start + dt.timedelta(milliseconds=400 * i)
        yield CallRecord(
            id=new_id(), run_id=run.id, root_run_id=root.id, operation="chat",
            provider=provider, requested_model=model, model=model, started_at=at,
            ended_at=at + dt.timedelta(milliseconds=350), latency_ms=350.0,
            status="error" if failed else "ok", error_type="RateLimitError" if failed else None,
            input_tokens=0 if failed else tokens_in, output_tokens=0 if failed else tokens_out,
            cache_read_tokens=0 if failed else cached, cost_usd=Decimal(0) if failed else cost,
            cost_source="local",
        )  # fmt: skip


def build(engine: sa.Engine, calls: int, seed: int = 7) -> tuple[int, int]:
    """Write about ``calls`` calls (and their runs) through a BatchWriter; (runs, calls)."""
    rng = random.Random(seed)
    now = dt.datetime.now(UTC)
    writer = BatchWriter(engine, max_delay=0.2, max_batch=5000)
    written_calls = written_runs = 0
    try:
        while written_calls < calls:
            started = now - dt.timedelta(seconds=rng.uniform(60, 30 * 86400))
            root_id = new_id()
            roll = rng.random()
            status = "ok" if roll < 0.85 else "error" if roll < 0.95 else "budget_exceeded"
            root = RunRecord(
                id=root_id, name=AGENTS[rng.randrange(len(AGENTS))], parent_id=None,
                root_id=root_id, tags={"tenant": f"t{rng.randrange(200)}", "env": "prod"},
                started_at=started, ended_at=started + dt.timedelta(seconds=30), status=status,
            )  # fmt: skip
            outcome = rng.random()
            if status == "ok" and outcome < 0.55:
                root.outcome, root.outcome_value = "resolved", Decimal("4.00")
                root.outcome_at = started + dt.timedelta(hours=2)
            elif outcome < 0.65:
                root.outcome, root.outcome_at = "escalated", started + dt.timedelta(hours=3)
            runs = [root]
            count = rng.randint(1, 19)
            own = count
            if rng.random() < 0.2 and count > 2:
                child = RunRecord(
                    id=new_id(), name="researcher", parent_id=root_id, root_id=root_id,
                    tags=root.tags, started_at=started + dt.timedelta(seconds=1),
                    ended_at=started + dt.timedelta(seconds=20), status="ok",
                )  # fmt: skip
                runs.append(child)
                own = count // 2
                for call in _calls_of(rng, child, root, count - own, child.started_at):
                    child.add_call(call)
                    root.add_call(call)
                    writer.put_call(call)
            for call in _calls_of(rng, root, root, own, started):
                root.add_call(call)
                writer.put_call(call)
            if rng.random() < 0.1:
                charge = CallRecord(
                    id=new_id(), run_id=root_id, root_run_id=root_id, operation="execute_tool",
                    provider=None, requested_model=None, model=None, started_at=started,
                    tool_name="web_search", cost_usd=Decimal("0.005"), cost_source="charge",
                )  # fmt: skip
                root.add_call(charge)
                writer.put_call(charge)
                count += 1
            for run in runs:
                writer.put_run(run)
            written_runs += len(runs)
            written_calls += count
            if writer.pending > 50_000:  # keep memory flat: let the writer catch up
                assert writer.flush(timeout=600)
        assert writer.flush(timeout=600)
    finally:
        writer.close(timeout=600)
    if writer.rejected:
        raise RuntimeError(f"{len(writer.rejected)} rows were refused: {writer.rejected[0]}")
    with engine.begin() as connection:
        connection.exec_driver_sql("ANALYZE")  # fresh statistics, as autovacuum would give
    return written_runs, written_calls


# ---------------------------------------------------------------------------- timing


def queries_to_time(engine: sa.Engine) -> dict[str, Callable[[], Any]]:
    return {
        # The three the issue names (the 300 ms budget applies to these):
        "report by agent,day": lambda: queries.report(engine, by=["agent", "day"]),
        "cost per outcome (all agents)": lambda: queries.cost_per_outcome_by_agent(engine),
        "runs listing (newest 20)": lambda: queries.list_runs(engine),
        # For information:
        "report by agent,day --since 7d": lambda: queries.report(
            engine, by=["agent", "day"], since="7d"
        ),
        "cost per outcome (one agent)": lambda: queries.cost_per_outcome(engine, agent="support"),
        "runs listing (root, one agent)": lambda: queries.list_runs(
            engine, agent="support", root_only=True
        ),
        "report by agent,model": lambda: queries.report(engine, by=["agent", "model"]),
        "report by tag:tenant": lambda: queries.report(engine, by=["tag:tenant"]),
        "outcomes": lambda: queries.outcomes(engine),
        "forecast": lambda: economics.forecast(engine, runs_per_day=1_000_000),
        "reprice --price-drop 10x": lambda: economics.reprice(engine, price_drop="10x"),
        "breakeven": lambda: economics.break_even(engine, revenue_per_success="4"),
    }


def time_queries(engine: sa.Engine, repeat: int) -> dict[str, tuple[float, float]]:
    timings = {}
    for name, query in queries_to_time(engine).items():
        query()  # warm: caches, compiled statements, the price map
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            query()
            samples.append((time.perf_counter() - start) * 1000)
        timings[name] = (statistics.median(samples), min(samples))
    return timings


def explain(engine: sa.Engine) -> None:
    """The plan of every statement the per-agent per-day report runs."""
    from sqlalchemy import event

    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        queries.report(engine, by=["agent", "day"])
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN ANALYZE "
    with queries._reading(engine) as connection:  # as the report runs: work_mem raised
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        for statement, parameters in statements:
            print("    " + " ".join(statement.split())[:110] + " ...")
            cursor.execute(prefix + statement, parameters)
            for row in cursor.fetchall():
                print("      ", " | ".join(str(v) for v in row))


# ----------------------------------------------------------------------------- setup


def sqlite_url(directory: str, calls: int) -> Iterator[str]:
    yield f"sqlite:///{directory}/bench-{calls}.db"


def postgres_url(admin_url: str) -> Iterator[str]:
    admin = sa.create_engine(storage.normalize_url(admin_url), poolclass=sa.pool.NullPool)
    name = f"tl_bench_{uuid.uuid4().hex[:10]}"
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {name}")
    try:
        url = storage.normalize_url(admin_url).update_query_dict(
            {"options": f"-csearch_path={name}"}
        )
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {name} CASCADE")
        admin.dispose()


def bench(url: str, calls: int, repeat: int, *, show_plan: bool) -> None:
    engine = storage.create_engine_for(url)
    try:
        schema.upgrade(engine)
        start = time.perf_counter()
        runs, written = build(engine, calls)
        took = time.perf_counter() - start
        print(
            f"\n{engine.dialect.name}: {written:,} calls, {runs:,} runs written in {took:.0f} s "
            f"({written / took:,.0f} calls/s through BatchWriter)"
        )
        for name, (median, best) in time_queries(engine, repeat).items():
            flag = "  <-- over 300 ms" if median > 300 else ""
            print(f"  {name:<34} median {median:8.1f} ms   best {best:8.1f} ms{flag}")
        if show_plan:
            print("  plan of the per-agent per-day report:")
            explain(engine)
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--engines", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--postgres",
        default=os.environ.get("TOKENLEDGER_TEST_POSTGRES_URL", DEFAULT_POSTGRES),
        help="admin URL of a PostgreSQL server; a schema is created and dropped there",
    )
    parser.add_argument("--explain", action="store_true", help="print the report's query plan")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        for calls in args.calls:
            for engine_name in args.engines:
                urls = (
                    sqlite_url(directory, calls)
                    if engine_name == "sqlite"
                    else postgres_url(args.postgres)
                )
                for url in urls:
                    bench(url, calls, args.repeat, show_plan=args.explain)


if __name__ == "__main__":
    main()
