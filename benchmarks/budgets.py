"""Section 3: budget reservations, `BudgetStore.reserve` + `settle` under concurrency.

Each worker loops: reserve an estimate on its budget, then settle it with the actual cost
(at most the estimate, as a call bounded by ``max_tokens`` costs). Reported: completed
reservations per second, p50/p99 latency of ``reserve`` (what a call waits for before it
is sent), and the overspend observed when the budget runs out mid-run (must be 0).

A worker that keeps calling is busy in tokenledger's sense: after 8 calls in a second
its store reserves out of a leased chunk of headroom (one transaction per 256 calls'
worth) and settles in memory, its spend moved to the budget window by a flusher thread
every 50 ms; see `tokenledger._leases`. The overspend
run covers the other side: near the limit the store reserves call by call.

Baseline, in the same run and with the same workers: the engine's raw atomic
reservation, one ``UPDATE budget_windows SET reserved = reserved + x WHERE ... AND
spent + reserved + x <= limit`` per transaction, then the matching settle ``UPDATE``.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import random
import tempfile
import threading
import time
from decimal import Decimal
from typing import Any

from benchmarks._common import Section, log, median, percentile, postgres_schema

TARGET_PG_16 = 3000.0
ESTIMATE = Decimal("0.001")


def _budget_ids(url: str, count: int, limit_usd: str) -> list[str]:
    """Define ``count`` budgets (scopes tenant:0..) with ``limit_usd`` each."""
    import tokenledger as tl

    ledger = tl.Ledger(url, capture=False)
    try:
        for i in range(count):
            ledger.set_budget(f"tenant:{i}", usd=limit_usd, per="day")
        defs = ledger._budgets.store.definitions(fresh=True)
    finally:
        ledger.close()
    by_scope = {d.scope: d.id for d in defs}
    return [by_scope[f"tenant:{i}"] for i in range(count)]


def _store(url: str) -> Any:
    from tokenledger import _storage as storage
    from tokenledger._reservations import BudgetStore

    engine = storage.create_engine_for(url)
    return engine, BudgetStore(engine, lease_seconds=120.0)


def _loop_tokenledger(
    store: Any, budget_id: str, deadline: float, max_ops: int, rng: random.Random
) -> tuple[int, int, list[float], Decimal]:
    from tokenledger.budgets import window_bounds
    from tokenledger.records import new_id

    definition = next(d for d in store.definitions(fresh=True) if d.id == budget_id)
    start, _ = window_bounds("day", dt.datetime.now(dt.timezone.utc))
    lines = [(definition, start)]
    ok = refused = 0
    latencies: list[float] = []
    spent = Decimal(0)
    while time.perf_counter() < deadline and ok + refused < max_ops:
        rid = new_id()
        t0 = time.perf_counter()
        refusal = store.reserve(rid, lines, [], ESTIMATE, 100)
        latencies.append(time.perf_counter() - t0)
        if refusal is not None:
            refused += 1
            if refused > 50:
                break  # the budget is spent
            continue
        actual = (ESTIMATE * Decimal(rng.randint(50, 100)) / 100).quantize(Decimal("0.000001"))
        store.settle(rid, [(budget_id, start)], ESTIMATE, 100, actual, 80)
        spent += actual
        ok += 1
    return ok, refused, latencies, spent


def _loop_raw(
    engine: Any, budget_id: str, deadline: float, max_ops: int
) -> tuple[int, int, list[float], Decimal]:
    import sqlalchemy as sa

    from tokenledger import _storage as storage
    from tokenledger.budgets import window_bounds

    w = storage.budget_windows
    start, _ = window_bounds("day", dt.datetime.now(dt.timezone.utc))
    reserve = (
        sa.update(w)
        .where(
            w.c.budget_id == sa.bindparam("bid"),
            w.c.window_start == sa.bindparam("ws"),
            w.c.spent_usd + w.c.reserved_usd + sa.bindparam("x", type_=w.c.reserved_usd.type)
            <= sa.bindparam("lim", type_=w.c.reserved_usd.type),
        )
        .values(reserved_usd=w.c.reserved_usd + sa.bindparam("x", type_=w.c.reserved_usd.type))
    )
    settle = (
        sa.update(w)
        .where(w.c.budget_id == sa.bindparam("bid"), w.c.window_start == sa.bindparam("ws"))
        .values(
            reserved_usd=w.c.reserved_usd - sa.bindparam("x", type_=w.c.reserved_usd.type),
            spent_usd=w.c.spent_usd + sa.bindparam("x", type_=w.c.reserved_usd.type),
        )
    )
    params = {"bid": budget_id, "ws": start, "x": ESTIMATE, "lim": Decimal("1000000000")}
    ok = 0
    latencies: list[float] = []
    while time.perf_counter() < deadline and ok < max_ops:
        t0 = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(reserve, params)
        latencies.append(time.perf_counter() - t0)
        with engine.begin() as conn:
            conn.execute(settle, params)
        ok += 1
    return ok, 0, latencies, Decimal(0)


def _thread_worker(
    kind: str, url: str, budget_id: str, deadline: float, max_ops: int, out: list[Any], seed: int
) -> None:
    _engine, store = _SHARED[url]
    try:
        if kind == "tokenledger":
            out.append(_loop_tokenledger(store, budget_id, deadline, max_ops, random.Random(seed)))
        else:
            out.append(_loop_raw(store.engine, budget_id, deadline, max_ops))
    except Exception as exc:  # reported, never a hang
        out.append(exc)


_SHARED: dict[str, Any] = {}


def _process_main(args: tuple[str, str, str, float, int, int]) -> Any:
    kind, url, budget_id, duration, max_ops, seed = args
    engine, store = _store(url)
    try:
        # Warm the connection pool and caches before the clock starts.
        store.definitions(fresh=True)
        if kind == "tokenledger":
            _loop_tokenledger(store, budget_id, time.perf_counter() + 5, 20, random.Random(seed))
        else:
            _loop_raw(store.engine, budget_id, time.perf_counter() + 5, 20)
        deadline = time.perf_counter() + duration
        if kind == "tokenledger":
            ok, refused, lat, spent = _loop_tokenledger(
                store, budget_id, deadline, max_ops, random.Random(seed)
            )
        else:
            ok, refused, lat, spent = _loop_raw(store.engine, budget_id, deadline, max_ops)
        return ok, refused, lat, str(spent)
    finally:
        store.dispose()
        engine.dispose()


def _run_config(
    kind: str,
    url: str,
    budget_ids: list[str],
    workers: int,
    mode: str,
    duration: float,
    max_ops: int,
) -> dict[str, Any]:
    results: list[Any] = []
    start = time.perf_counter()
    if mode == "threads":
        if url not in _SHARED:
            _SHARED[url] = _store(url)
        # Warm the pool, the compiled-statement cache and the budget windows first.
        warm: list[Any] = []
        _thread_worker(kind, url, budget_ids[0], time.perf_counter() + 5, 20, warm, 0)
        deadline = time.perf_counter() + duration
        threads = [
            threading.Thread(
                target=_thread_worker,
                args=(kind, url, budget_ids[i % len(budget_ids)], deadline, max_ops, results, i),
            )
            for i in range(workers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(duration + 120)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            jobs = [
                (kind, url, budget_ids[i % len(budget_ids)], duration, max_ops, i)
                for i in range(workers)
            ]
            start = time.perf_counter()
            results = pool.map(_process_main, jobs)
    elapsed = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        return {"error": f"{type(errors[0]).__name__}: {errors[0]}"}
    ok = sum(r[0] for r in results)
    refused = sum(r[1] for r in results)
    lat = sorted(x for r in results for x in r[2])
    spent = sum(Decimal(str(r[3])) for r in results)
    return {
        "rate": ok / min(elapsed, duration) if elapsed else 0.0,
        "ok": ok,
        "refused": refused,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "spent": spent,
    }


def _overspend(url: str, workers: int, budget_id: str, limit: Decimal) -> dict[str, Any]:
    """Run the budget dry with ``workers`` threads; overspend = spent beyond the limit."""
    from tokenledger.budgets import window_bounds

    res = _run_config("tokenledger", url, [budget_id], workers, "threads", 60.0, 10**9)
    if "error" in res:
        return res
    _engine, store = _SHARED[url]
    start, _ = window_bounds("day", dt.datetime.now(dt.timezone.utc))
    spent, reserved, _t, _r = store.window_figures(budget_id, start)
    return {
        "spent": spent,
        "reserved": reserved,
        "overspend": max(Decimal(0), spent + reserved - limit),
        "reservations": res["ok"],
        "refused": res["refused"],
    }


def _measure(engine_name: str, url: str, section: Section, quick: bool) -> None:
    levels = [1, 4] if quick else [1, 4, 16, 64]
    duration = 0.3 if quick else 2.0
    max_ops = 200 if quick else 10**7
    shared = _budget_ids(url, 1, "1000000000")[0:1]
    disjoint_all = (
        _budget_ids(url, 64, "1000000000") if not quick else _budget_ids(url, 4, "1000000000")
    )
    configs: list[tuple[str, int, str]] = []
    for sharing in ("one budget", "disjoint budgets"):
        for n in levels:
            configs.append((sharing, n, "threads"))
        if not quick:
            configs.append((sharing, 16, "processes"))
    for sharing, n, mode in configs:
        ids = shared if sharing == "one budget" else disjoint_all[:n]
        figures = {}
        # Interleave: raw, tokenledger, raw, tokenledger (two rounds; medians of two).
        rounds = 1 if quick else 2
        samples: dict[str, list[dict[str, Any]]] = {"raw": [], "tokenledger": []}
        for r in range(rounds):
            order = ["raw", "tokenledger"] if r % 2 == 0 else ["tokenledger", "raw"]
            for kind in order:
                samples[kind].append(_run_config(kind, url, ids, n, mode, duration, max_ops))
        errors = [s["error"] for k in samples for s in samples[k] if "error" in s]
        label = f"{engine_name}: {n} {mode}, {sharing}"
        if errors:
            section.add(label, None, "failed", extra=errors[0][:200])
            continue
        for kind, runs in samples.items():
            figures[kind] = {
                key: median([s[key] for s in runs]) for key in ("rate", "p50_ms", "p99_ms")
            }
        kw: dict[str, Any] = {}
        if engine_name == "PostgreSQL" and n == 16 and mode == "threads":
            kw = {
                "target": f"≥ {TARGET_PG_16:,.0f}/s",
                "met": figures["tokenledger"]["rate"] >= TARGET_PG_16,
            }
        if engine_name == "PostgreSQL" and n == 16 and mode == "processes":
            kw = {
                "target": f"≥ {TARGET_PG_16:,.0f}/s",
                "met": figures["tokenledger"]["rate"] >= TARGET_PG_16,
            }
        section.add(
            label,
            figures["tokenledger"]["rate"],
            "reservations/s",
            ratio=figures["tokenledger"]["rate"] / figures["raw"]["rate"]
            if figures["raw"]["rate"]
            else None,
            baseline="raw atomic UPDATE reserve + settle",
            extra=(
                f"reserve p50 {figures['tokenledger']['p50_ms']:.2f} ms, p99 "
                f"{figures['tokenledger']['p99_ms']:.2f} ms; raw {figures['raw']['rate']:,.0f}/s "
                f"(p50 {figures['raw']['p50_ms']:.2f} ms)"
            ),
            **kw,
        )
    # Overspend: a budget of $0.50 run dry by 16 threads (8 in the smoke run).
    limit = Decimal("0.05") if quick else Decimal("0.50")
    import tokenledger as tl

    ledger = tl.Ledger(url, capture=False)
    try:
        ledger.set_budget("tenant:overspend", usd=str(limit), per="day")
        budget_id = next(
            d.id
            for d in ledger._budgets.store.definitions(fresh=True)
            if d.scope == "tenant:overspend"
        )
    finally:
        ledger.close()
    workers = 8 if quick else 16
    result = _overspend(url, workers, budget_id, limit)
    if "error" in result:
        section.add(f"{engine_name}: overspend", None, "failed", extra=result["error"][:200])
    else:
        section.add(
            f"{engine_name}: overspend, ${limit} budget run dry by {workers} threads",
            float(result["overspend"]),
            "USD",
            extra=(
                f"spent ${result['spent']}, still reserved ${result['reserved']}; "
                f"{result['reservations']} reservations, {result['refused']} refused"
            ),
            target="0",
            met=result["overspend"] == 0,
        )


def run(section: Section, *, quick: bool, postgres_url: str | None) -> None:
    from tokenledger import _schema as schema
    from tokenledger import _storage as storage

    with tempfile.TemporaryDirectory(prefix="tl-budgets-") as tmp:
        url = f"sqlite:///{tmp}/budgets.db"
        engine = storage.create_engine_for(url)
        schema.ensure_schema(engine)
        engine.dispose()
        log("  budgets: sqlite ...")
        try:
            _measure("SQLite", url, section, quick)
        finally:
            for engine, store in _SHARED.values():
                store.dispose()
                engine.dispose()
            _SHARED.clear()
    if postgres_url:
        with postgres_schema(postgres_url) as url:
            engine = storage.create_engine_for(url)
            schema.ensure_schema(engine)
            engine.dispose()
            log("  budgets: postgresql ...")
            try:
                _measure("PostgreSQL", url, section, quick)
            finally:
                for engine, store in _SHARED.values():
                    store.dispose()
                    engine.dispose()
                _SHARED.clear()
    section.note(
        "A reservation is `BudgetStore.reserve` then `settle` (the actual cost 50–100 % of "
        "the $0.001 estimate, as max_tokens guarantees); threads share one BudgetStore, "
        "processes (spawned) have one each. Latency is of `reserve` alone. A busy store "
        "reserves out of leased chunks and settles in memory (flushed every 50 ms); the raw "
        "baseline is one UPDATE per reserve and per settle."
    )
    section.note(f"pid {os.getpid()}; durations are bounded (2 s per configuration).")
