"""Proposed fixes for the hot spots the harness found, measured before/after.

NOT tokenledger's code: each proposal is applied here, in the benchmark process, by
monkeypatching one instance (or, for the CLI, by running a patched copy of the package
from a temporary directory). Before and after alternate round by round, as everywhere
else in the harness. Run with ``python -m benchmarks --only proposals``; the results say
exactly what to change in tokenledger/ and what it buys.

P1  writer: rows as tuples and one precompiled driver-level INSERT per batch
    (`BatchWriter._take` / `_execute`), instead of a dict per row and SQLAlchemy's
    per-row bind processing.
P2  budgets: `BudgetStore.reserve` / `settle` with statements built once (bind
    parameters), instead of building the UPDATE expressions on every call.
P3  budgets: the input-token estimate from a cheap upper bound (bytes of the request)
    instead of running litellm's tokenizer before every budgeted call.
P4  CLI: `tokenledger report` reads the schema revision with one SELECT and a constant
    list of known revisions, importing Alembic only to migrate.
"""

from __future__ import annotations

import datetime as dt
import json
import operator
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import types
from decimal import Decimal
from typing import Any

from benchmarks._common import REPO_ROOT, Section, Timer, interleaved, log, median, postgres_schema

# -- P1: the writer -----------------------------------------------------------------------

_UTC = dt.timezone.utc


def _call_columns() -> list[str]:
    from tokenledger import storage

    return [c.name for c in storage.calls.columns]


def enable_fast_writer(writer: Any, *, copy: bool = False) -> None:
    """P1 on one BatchWriter: calls travel as tuples (one ``attrgetter`` call per row) and
    are inserted with one precompiled ``INSERT ... ON CONFLICT (id) DO NOTHING`` through
    ``exec_driver_sql``; values are checked and converted inline exactly as the column
    types do (aware datetimes to UTC, finite Decimal amounts, JSON lists)."""
    from tokenledger.records import CallRecord, PriceRecord, RunRecord
    from tokenledger.writer import _PRICE_FIELDS, _Batch, _dedupe_runs, _FlushMarker

    columns = _call_columns()
    getter = operator.attrgetter(*columns)
    dialect = writer._engine.dialect.name
    i_started, i_ended = columns.index("started_at"), columns.index("ended_at")
    i_cost, i_reasons = columns.index("cost_usd"), columns.index("finish_reasons")
    mark = "?" if dialect == "sqlite" else "%s"
    sql = (
        f"INSERT INTO calls ({', '.join(columns)}) VALUES ({', '.join([mark] * len(columns))}) "
        "ON CONFLICT (id) DO NOTHING"
    )
    sqlite = dialect == "sqlite"

    def when(value: Any) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"Datetime {value.isoformat()} has no time zone.")
        value = value.astimezone(_UTC)
        return f"{value:%Y-%m-%d %H:%M:%S.%f}" if sqlite else value

    def convert(row: tuple[Any, ...]) -> tuple[Any, ...]:
        values = list(row)
        values[i_started] = when(values[i_started])
        values[i_ended] = when(values[i_ended])
        cost = values[i_cost]
        if cost is not None:
            if not isinstance(cost, Decimal) or not cost.is_finite():
                raise TypeError(f"A money amount must be a finite Decimal, not {cost!r}.")
            if sqlite:
                values[i_cost] = float(cost)
        reasons = values[i_reasons]
        if reasons is not None:
            values[i_reasons] = json.dumps(reasons)
        return tuple(values)

    def _take(self: Any) -> Any:
        batch = self._pending or _Batch()
        self._pending = None
        queue = self._queue
        size = len(batch)
        calls_append = batch.calls.append
        while size < self.max_batch:
            try:
                item = queue.popleft()
            except IndexError:
                break
            if type(item) is CallRecord:
                calls_append(getter(item))
            elif isinstance(item, RunRecord):
                batch.runs.append(item.as_row())
            elif isinstance(item, PriceRecord):
                batch.prices.append({name: getattr(item, name) for name in _PRICE_FIELDS})
            elif isinstance(item, _FlushMarker):
                batch.markers.append(item)
                continue
            else:
                continue
            size += 1
        if size == 0 and not batch.markers:
            return None
        return batch

    copy_sql = f"COPY calls ({', '.join(columns)}) FROM STDIN"

    def _execute(self: Any, prices: list[Any], runs: list[Any], calls: list[Any]) -> None:
        if copy and calls:
            # P1b (PostgreSQL): COPY the calls. COPY has no ON CONFLICT, so a batch
            # retried after an ambiguous failure (some ids already stored) falls back
            # to the INSERT ... ON CONFLICT DO NOTHING path below: rows are never doubled.
            import psycopg

            try:
                with self._engine.begin() as connection:
                    if prices:
                        connection.execute(self._insert_prices, prices)
                    if runs:
                        connection.execute(self._upsert_runs, _dedupe_runs(runs))
                    dbapi = connection.connection.dbapi_connection
                    with dbapi.cursor() as cur, cur.copy(copy_sql) as cp:
                        for row in calls:
                            cp.write_row(convert(row))
                return
            except psycopg.errors.UniqueViolation:
                pass
        with self._engine.begin() as connection:
            if prices:
                connection.execute(self._insert_prices, prices)
            if runs:
                connection.execute(self._upsert_runs, _dedupe_runs(runs))
            if calls:
                connection.exec_driver_sql(sql, [convert(row) for row in calls])

    writer._take = types.MethodType(_take, writer)
    writer._execute = types.MethodType(_execute, writer)


def disable_fast_writer(writer: Any) -> None:
    for name in ("_take", "_execute"):
        writer.__dict__.pop(name, None)


def _writer_us_per_row(writer: Any, n: int) -> float:
    from benchmarks.ingest import make_calls

    records = make_calls(n)
    with Timer() as t:
        for record in records:
            writer._queue.append(record)
        assert writer.flush(300)
    return t.cpu / n * 1e6


def _writer_rate(writer: Any, n: int) -> float:
    from benchmarks.ingest import make_calls

    records = make_calls(n)
    start = time.perf_counter()
    for record in records:
        writer.put_call(record)
    assert writer.flush(300)
    return n / (time.perf_counter() - start)


def _p1(section: Section, quick: bool, postgres_url: str | None) -> None:
    from benchmarks.ingest import _raw_copy_rate, _raw_executemany_rate
    from tokenledger import schema, storage
    from tokenledger.writer import BatchWriter

    n = 2000 if quick else 20000
    rounds = 2 if quick else 7
    targets = []
    tmp = tempfile.mkdtemp(prefix="tl-p1-")
    targets.append(("SQLite", f"sqlite:///{tmp}/p1.db"))
    pg_ctx = postgres_schema(postgres_url) if postgres_url else None
    if pg_ctx is not None:
        targets.append(("PostgreSQL", pg_ctx.__enter__()))
    try:
        for name, url in targets:
            engine = storage.create_engine_for(url)
            schema.ensure_schema(engine)
            writer = BatchWriter(engine, max_delay=60.0)
            pg = engine.dialect.name == "postgresql"
            modes = {"before": None, "P1": False, **({"P1b": True} if pg else {})}

            def cpu(mode: bool | None, w: Any = writer) -> dict[str, float]:
                disable_fast_writer(w)
                if mode is not None:
                    enable_fast_writer(w, copy=mode)
                return {"us": _writer_us_per_row(w, n)}

            def rate(mode: bool | None, w: Any = writer) -> dict[str, float]:
                disable_fast_writer(w)
                if mode is not None:
                    enable_fast_writer(w, copy=mode)
                return {"rows_s": _writer_rate(w, n)}

            cpu_variants = {k: (lambda m=m: cpu(m)) for k, m in modes.items()}
            for fn in cpu_variants.values():
                fn()
            cpu_samples = interleaved(cpu_variants, rounds)
            rate_variants: dict[str, Any] = {
                f"writer {k}": (lambda m=m: rate(m)) for k, m in modes.items()
            }
            best_raw = "raw COPY" if pg else "raw executemany"
            if pg:
                rate_variants[best_raw] = lambda u=url: _raw_copy_rate(u, n)
            else:
                rate_variants[best_raw] = lambda e=engine: _raw_executemany_rate(e, n, "sqlite")
            for fn in rate_variants.values():
                fn()
            rate_samples = interleaved(rate_variants, max(1, rounds // 2))
            disable_fast_writer(writer)
            raw_rates = [x["rows_s"] for x in rate_samples[best_raw]]
            before_us = median([x["us"] for x in cpu_samples["before"]])
            labels = {
                "before": "as shipped: as_row() dicts + SQLAlchemy executemany",
                "P1": "tuples + one precompiled driver-level INSERT (proposal)",
                "P1b": "P1 with COPY for the calls, INSERT fallback on a duplicate (proposal)",
            }
            for mode in modes:
                us = median([x["us"] for x in cpu_samples[mode]])
                rates = [x["rows_s"] for x in rate_samples[f"writer {mode}"]]
                ratio = median([a / b for a, b in zip(rates, raw_rates, strict=False)])
                section.add(
                    f"{mode} writer, {name}: {labels[mode]}",
                    us,
                    "µs CPU/row",
                    ratio=None if mode == "before" else us / before_us,
                    baseline=None if mode == "before" else "before, same run",
                    extra=(
                        f"ingest {median(rates):,.0f} rows/s = {ratio:.2f}× {best_raw} "
                        f"({median(raw_rates):,.0f} rows/s, same run)"
                    ),
                    target="ingest ≥ 50% of the raw limit",
                    met=ratio >= 0.5,
                )
            writer.close(60)
            engine.dispose()
    finally:
        if pg_ctx is not None:
            pg_ctx.__exit__(None, None, None)
        shutil.rmtree(tmp, ignore_errors=True)


# -- P2: the budget store -----------------------------------------------------------------


def enable_fast_store(store: Any, *, async_commit: bool = False) -> None:
    """P2 on one BudgetStore: every statement is built once with bind parameters.

    ``async_commit`` (P2b, PostgreSQL): ``SET LOCAL synchronous_commit = off`` in the
    reservation transactions, so a commit does not wait for the WAL flush. The cost: a
    server crash can lose the last ~0.6 s (3 x wal_writer_delay) of reservations and
    settlements; lost settlements under-count spend by at most the calls of that window.
    """
    import sqlalchemy as sa

    from tokenledger.budgets import MAX_TOKENS, MAX_USD
    from tokenledger.records import utcnow

    st = store._storage
    w, b, res = st.budget_windows, st.budgets, st.reservations
    money = w.c.reserved_usd.type
    big = Decimal(MAX_USD) * 1000
    usd = sa.bindparam("usd", type_=money)
    tok = sa.bindparam("tok", type_=sa.BigInteger)
    key = (w.c.budget_id == sa.bindparam("bid")) & (w.c.window_start == sa.bindparam("ws"))
    limit_usd = (
        sa.select(sa.func.coalesce(b.c.limit_usd, big))
        .where(b.c.id == sa.bindparam("bid"))
        .scalar_subquery()
    )
    limit_tok = (
        sa.select(sa.func.coalesce(b.c.limit_tokens, MAX_TOKENS * 10))
        .where(b.c.id == sa.bindparam("bid"))
        .scalar_subquery()
    )
    reserve_stmt = (
        sa.update(w)
        .where(
            key,
            w.c.spent_usd + w.c.reserved_usd + usd <= limit_usd,
            w.c.spent_tokens + w.c.reserved_tokens + tok <= limit_tok,
        )
        .values(reserved_usd=w.c.reserved_usd + usd, reserved_tokens=w.c.reserved_tokens + tok)
    )
    track_stmt = (
        sa.update(w)
        .where(key)
        .values(reserved_usd=w.c.reserved_usd + usd, reserved_tokens=w.c.reserved_tokens + tok)
    )
    insert_res = sa.insert(res)
    delete_res = sa.delete(res).where(res.c.id == sa.bindparam("rid"))
    settle_stmt = (
        sa.update(w)
        .where(key)
        .values(
            reserved_usd=w.c.reserved_usd - sa.bindparam("give_usd", type_=money),
            reserved_tokens=w.c.reserved_tokens - sa.bindparam("give_tok", type_=sa.BigInteger),
            spent_usd=w.c.spent_usd + sa.bindparam("spent_usd", type_=money),
            spent_tokens=w.c.spent_tokens + sa.bindparam("spent_tok", type_=sa.BigInteger),
            overshoot_usd=w.c.overshoot_usd + sa.bindparam("over", type_=money),
        )
    )

    def reserve(
        self: Any, reservation_id: str, enforce: Any, track: Any, amount: Decimal, tokens: int
    ) -> Any:
        ordered = sorted(enforce, key=lambda item: (item[0].id, item[1]))
        tracked = sorted(track, key=lambda item: (item[0].id, item[1]))
        keys = [(d.id, s) for d, s in ordered + tracked]
        with self.engine.begin() as conn:
            if async_commit:
                conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            self._ensure_windows(conn, keys)
            for definition, start in ordered:
                result = conn.execute(
                    reserve_stmt, {"bid": definition.id, "ws": start, "usd": amount, "tok": tokens}
                )
                if result.rowcount != 1:
                    conn.rollback()
                    return definition, start
            for definition, start in tracked:
                conn.execute(
                    track_stmt, {"bid": definition.id, "ws": start, "usd": amount, "tok": tokens}
                )
            if keys:
                now = utcnow()
                conn.execute(
                    insert_res,
                    {
                        "id": reservation_id,
                        "holder": self.holder,
                        "amount_usd": amount,
                        "tokens": tokens,
                        "lines": [[d, s.isoformat()] for d, s in keys],
                        "created_at": now,
                        "expires_at": now + dt.timedelta(seconds=self.lease_seconds),
                    },
                )
        self._windows_seen.update(keys)
        return None

    def settle(
        self: Any,
        reservation_id: str,
        lines: Any,
        reserved_usd: Decimal,
        reserved_tokens: int,
        spent_usd: Decimal,
        spent_tokens: int,
    ) -> None:
        if not lines:
            return
        overshoot = max(spent_usd - reserved_usd, Decimal(0))
        with self.engine.begin() as conn:
            if async_commit:
                conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            deleted = conn.execute(delete_res, {"rid": reservation_id}).rowcount
            params = {
                "give_usd": reserved_usd if deleted else Decimal(0),
                "give_tok": reserved_tokens if deleted else 0,
                "spent_usd": spent_usd,
                "spent_tok": spent_tokens,
                "over": overshoot,
            }
            for budget_id, start in sorted(lines):
                conn.execute(settle_stmt, {**params, "bid": budget_id, "ws": start})

    store.reserve = types.MethodType(reserve, store)
    store.settle = types.MethodType(settle, store)


def disable_fast_store(store: Any) -> None:
    for name in ("reserve", "settle"):
        store.__dict__.pop(name, None)


def _p2(section: Section, quick: bool, postgres_url: str | None) -> None:
    from benchmarks.budgets import _budget_ids, _loop_tokenledger, _store
    from tokenledger import schema, storage

    duration = 0.3 if quick else 1.5
    rounds = 1 if quick else 5
    tmp = tempfile.mkdtemp(prefix="tl-p2-")
    targets = [("SQLite", f"sqlite:///{tmp}/p2.db")]
    pg_ctx = postgres_schema(postgres_url) if postgres_url else None
    if pg_ctx is not None:
        targets.append(("PostgreSQL", pg_ctx.__enter__()))
    try:
        for name, url in targets:
            engine = storage.create_engine_for(url)
            schema.ensure_schema(engine)
            engine.dispose()
            bid = _budget_ids(url, 1, "1000000000")[0]
            engine, store = _store(url)

            def one(fast: bool, s: Any = store, b: str = bid) -> dict[str, float]:
                (enable_fast_store if fast else disable_fast_store)(s)
                cpu0 = time.process_time()
                ok, _r, lat, _sp = _loop_tokenledger(
                    s, b, time.perf_counter() + duration, 10**7, random.Random(1)
                )
                cpu = time.process_time() - cpu0
                return {
                    "rate": ok / duration,
                    "p50": median(lat) * 1000,
                    "cpu_us": cpu / max(ok, 1) * 1e6,
                }

            one(False)
            one(True)
            samples = interleaved(
                {"before": lambda: one(False), "after": lambda: one(True)}, rounds
            )
            for label in ("before", "after"):
                rate = median([x["rate"] for x in samples[label]])
                cpu = median([x["cpu_us"] for x in samples[label]])
                p50 = median([x["p50"] for x in samples[label]])
                row = section.add(
                    f"P2 budget store, {name}, 1 thread: {label}"
                    + (" (proposal)" if label == "after" else ""),
                    rate,
                    "reservations/s",
                    extra=f"{cpu:.0f} µs CPU per reserve+settle; reserve p50 {p50:.2f} ms",
                )
                if label == "after":
                    before_rate = median([x["rate"] for x in samples["before"]])
                    row.ratio = rate / before_rate if before_rate else None
                    row.baseline = "before, same run"
            store.dispose()
            engine.dispose()
            if name == "PostgreSQL":
                _p2_concurrent(section, url, quick)
    finally:
        if pg_ctx is not None:
            pg_ctx.__exit__(None, None, None)
        shutil.rmtree(tmp, ignore_errors=True)


def _p2_concurrent(section: Section, url: str, quick: bool) -> None:
    """The issue's target configuration: 16 threads on PostgreSQL, one budget and
    disjoint budgets; as shipped, with P2, and with P2 + asynchronous commit (P2b)."""
    from benchmarks import budgets as b

    workers = 4 if quick else 16
    duration = 0.3 if quick else 2.0
    shared = b._budget_ids(url, 1, "1000000000")
    disjoint = b._budget_ids(url, workers, "1000000000")
    b._SHARED[url] = b._store(url)
    store = b._SHARED[url][1]
    modes = {"as shipped": None, "P2": False, "P2b": True}
    try:
        for sharing, ids in (("one budget", shared), ("disjoint budgets", disjoint)):

            def one(mode: bool | None, ids: list[str] = ids) -> dict[str, Any]:
                disable_fast_store(store)
                if mode is not None:
                    enable_fast_store(store, async_commit=mode)
                return b._run_config("tokenledger", url, ids, workers, "threads", duration, 10**9)

            variants = {k: (lambda m=m: one(m)) for k, m in modes.items()}
            variants["raw"] = lambda ids=ids: b._run_config(
                "raw", url, ids, workers, "threads", duration, 10**9
            )
            samples = interleaved(variants, 1 if quick else 3)
            raw = median([x["rate"] for x in samples["raw"]])
            for mode in modes:
                rate = median([x["rate"] for x in samples[mode]])
                p50 = median([x["p50_ms"] for x in samples[mode]])
                section.add(
                    f"{mode} budget store, PostgreSQL, {workers} threads, {sharing}",
                    rate,
                    "reservations/s",
                    ratio=rate / raw if raw else None,
                    baseline="raw atomic UPDATE reserve + settle, same run",
                    extra=f"reserve p50 {p50:.2f} ms; raw {raw:,.0f}/s",
                    target="≥ 3,000/s",
                    met=rate >= 3000,
                )
    finally:
        disable_fast_store(store)
        store.dispose()
        b._SHARED.pop(url)[0].dispose()


# -- P3: the token estimate -----------------------------------------------------------------


def cheap_count(model: str, kwargs: dict[str, Any]) -> int:
    """P3: an upper bound on input tokens without a tokenizer: no tokenizer yields more
    tokens than the request has bytes (the bound tokenledger already falls back to)."""
    messages = kwargs.get("messages")
    return len(repr(messages or kwargs.get("input") or kwargs.get("prompt") or "").encode())


def _p3(section: Section, quick: bool) -> None:
    from benchmarks._capture_worker import MESSAGES, MODEL
    from tokenledger import enforcement

    kwargs = {"model": MODEL, "messages": MESSAGES * 3, "max_tokens": 64}
    n = 300 if quick else 5000
    original = enforcement._count_input_tokens
    original(MODEL, kwargs)

    def timed(fn: Any) -> dict[str, float]:
        with Timer() as t:
            for _ in range(n):
                fn(MODEL, kwargs)
        return {"us": t.cpu / n * 1e6}

    samples = interleaved(
        {"before": lambda: timed(original), "after": lambda: timed(cheap_count)},
        3 if quick else 9,
    )
    b = median([s["us"] for s in samples["before"]])
    a = median([s["us"] for s in samples["after"]])
    exact, bound = original(MODEL, kwargs), cheap_count(MODEL, kwargs)
    section.add(
        "P3 input-token estimate per budgeted call: before", b, "µs", extra="litellm.token_counter"
    )
    section.add(
        "P3 input-token estimate per budgeted call: after (proposal)",
        a,
        "µs",
        ratio=a / b if b else None,
        baseline="before, same run",
        extra=f"bound {bound} tokens vs exact {exact} for a 3-message prompt (over-reserves)",
    )


# -- P4: CLI start-up -------------------------------------------------------------------------


def _known_revisions() -> tuple[str, ...]:
    """The migrations' revisions, newest first, as the patch would hard-code them (a
    test would keep that constant equal to Alembic's list)."""
    from tokenledger import schema

    with schema._alembic_config() as config:
        return tuple(schema._known_revisions(config))


def package_copy(directory: str, *, patch: bool, lazy_init: bool = False) -> str:
    """A copy of tokenledger (with P4 applied to schema.py when ``patch``, and P5 to
    ``__init__.py`` when ``lazy_init``); returns the sys.path entry. Every variant runs
    from a copy, so they differ only by the patches."""
    name = "original" if not patch else ("p4p5" if lazy_init else "p4")
    root = os.path.join(directory, name)
    shutil.copytree(os.path.join(REPO_ROOT, "tokenledger"), os.path.join(root, "tokenledger"))
    shutil.copytree(os.path.join(REPO_ROOT, "migrations"), os.path.join(root, "migrations"))
    if not patch:
        return root
    path = os.path.join(root, "tokenledger", "schema.py")
    with open(path) as f:
        text = f.read()

    def sub(old: str, new: str) -> None:
        nonlocal text
        # A patch that no longer applies must fail loudly, not measure the unpatched code.
        assert old in text, f"P4 no longer applies to schema.py: {old[:60]!r}"
        text = text.replace(old, new, 1)

    for module, names in (
        ("alembic", "command"),
        ("alembic.config", "Config"),
        ("alembic.runtime.migration", "MigrationContext"),
        ("alembic.script", "ScriptDirectory"),
    ):
        sub(f"from {module} import {names}\n", "")
    sub("if TYPE_CHECKING:\n", "if TYPE_CHECKING:\n    from alembic.config import Config\n")
    version_read = (
        "    context = MigrationContext.configure(connection, "
        'opts={"version_table": VERSION_TABLE})\n'
        "    return context.get_current_revision()\n"
    )
    sub(
        version_read,
        "    if not sa.inspect(connection).has_table(VERSION_TABLE):\n"
        "        return None\n"
        '    query = f"SELECT version_num FROM {VERSION_TABLE}"\n'
        "    rows = connection.exec_driver_sql(query).all()\n"
        "    return rows[0][0] if len(rows) == 1 else None\n",
    )
    sub(
        "    with _alembic_config() as config:\n"
        "        known = _known_revisions(config)  # newest first\n",
        f"    known = list({_known_revisions()!r})  # newest first; a test keeps it equal\n",
    )
    sub(
        "-> Iterator[Config]:\n",
        "-> Iterator[Config]:\n    from alembic.config import Config\n\n",
    )
    sub(
        "def _known_revisions(config: Config) -> list[str]:\n",
        "def _known_revisions(config: Config) -> list[str]:\n"
        "    from alembic.script import ScriptDirectory\n\n",
    )
    sub(
        "    with _alembic_config() as config:\n        head = ScriptDirectory",
        "    from alembic.script import ScriptDirectory\n\n"
        "    with _alembic_config() as config:\n        head = ScriptDirectory",
    )
    sub(
        "def _migrate(engine: sa.Engine, action: str, revision: str) -> None:\n",
        "def _migrate(engine: sa.Engine, action: str, revision: str) -> None:\n"
        "    from alembic import command\n\n",
    )
    with open(path, "w") as f:
        f.write(text)
    if lazy_init:
        _patch_lazy_init(os.path.join(root, "tokenledger", "__init__.py"))
    return root


P5_LAZY = {
    "tokenledger.ledger": ("Ledger", "configure", "default_ledger"),
    "tokenledger.runs": ("Run", "RunContext", "bind_context", "current_run"),
}


def _patch_lazy_init(path: str) -> None:
    """P5: ``tokenledger/__init__.py`` imports the ledger and runs modules (and with them
    capture, spans and OpenTelemetry) on first use of one of their names (PEP 562), so
    the CLI's ``import tokenledger.cli`` no longer pays for them."""
    with open(path) as f:
        text = f.read()
    for module, names in P5_LAZY.items():
        line = f"from {module} import {', '.join(names)}\n"
        assert line in text, f"P5 no longer applies to __init__.py: {line!r}"
        text = text.replace(line, "", 1)
    lazy = {name: module for module, names in P5_LAZY.items() for name in names}
    text += (
        "\n\n_LAZY = " + repr(lazy) + "\n\n\n"
        "def __getattr__(name: str) -> Any:\n"
        "    module = _LAZY.get(name)\n"
        "    if module is None:\n"
        "        raise AttributeError(f\"module 'tokenledger' has no attribute {name!r}\")\n"
        "    import importlib\n\n"
        "    value = getattr(importlib.import_module(module), name)\n"
        "    globals()[name] = value\n"
        "    return value\n"
    )
    # The module's own functions look these names up as globals: import them there.
    text = text.replace(
        "    return default_ledger().run(",
        "    from tokenledger.ledger import default_ledger\n\n    return default_ledger().run(",
    )
    text = text.replace(
        "    from tokenledger.ledger import _check_name, _check_run_budget\n",
        "    from tokenledger.ledger import _check_name, _check_run_budget, default_ledger\n",
    )
    text = text.replace(
        "    return default_ledger().flush(timeout)",
        "    from tokenledger.ledger import default_ledger\n\n"
        "    return default_ledger().flush(timeout)",
    )
    with open(path, "w") as f:
        f.write(text)


def _p4(section: Section, quick: bool) -> None:
    from benchmarks.startup import _once, _small_ledger

    rounds = 2 if quick else 15
    with tempfile.TemporaryDirectory(prefix="tl-p4-") as tmp:
        url = _small_ledger(os.path.join(tmp, "small.db"))
        roots = {
            "before": package_copy(tmp, patch=False),
            "after": package_copy(tmp, patch=True),
            "after_p5": package_copy(tmp, patch=True, lazy_init=True),
        }
        # The editable install's import hook would win over sys.path: drop it first.
        prelude = (
            "import sys; sys.meta_path[:] = [f for f in sys.meta_path "
            "if 'editable' not in getattr(f, '__module__', '')]; sys.path.insert(0, {root!r}); "
        )
        env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", COLUMNS="120")

        def cli(label: str) -> list[str]:
            code = prelude.format(root=roots[label]) + (
                "from tokenledger.cli import main; sys.exit(main())"
            )
            return [sys.executable, "-c", code, "report", "--db", url]

        for label, root in roots.items():
            where = prelude.format(root=root) + "import tokenledger; print(tokenledger.__file__)"
            check = subprocess.run(
                [sys.executable, "-c", where], env=env, capture_output=True, text=True, check=True
            )
            assert check.stdout.startswith(root), check.stdout
            _once(cli(label), env)
        samples: dict[str, list[tuple[float, float]]] = {k: [] for k in roots}
        names = list(roots)
        for r in range(rounds):
            for label in names[r % 3 :] + names[: r % 3]:
                samples[label].append(_once(cli(label), env))
        # The same patch also speeds up Ledger() construction (ensure_schema on open).
        ledger_code = (
            "import time, tokenledger as tl; t=time.perf_counter(); "
            f"l=tl.Ledger({url!r}, capture=False); print((time.perf_counter()-t)*1000)"
        )
        opens: dict[str, list[float]] = {"before": [], "after": []}
        for r in range(max(2, rounds // 3)):
            for label in ("before", "after") if r % 2 == 0 else ("after", "before"):
                out = subprocess.run(
                    [sys.executable, "-c", prelude.format(root=roots[label]) + ledger_code],
                    env=env,
                    capture_output=True, text=True, check=True, timeout=120,
                )  # fmt: skip
                opens[label].append(float(out.stdout.strip().splitlines()[-1]))
    b_wall = median([s[0] for s in samples["before"]])
    a_wall = median([s[0] for s in samples["after"]])
    b_cpu = median([s[1] for s in samples["before"]])
    a_cpu = median([s[1] for s in samples["after"]])
    section.add(
        "P4 `tokenledger report` cold start: before", b_wall, "ms wall", extra=f"{b_cpu:.0f} ms CPU"
    )
    section.add(
        "P4 `tokenledger report` cold start: after (proposal)",
        a_wall,
        "ms wall",
        ratio=a_wall / b_wall,
        baseline="before, same run",
        extra=f"{a_cpu:.0f} ms CPU",
    )
    c_wall = median([s[0] for s in samples["after_p5"]])
    c_cpu = median([s[1] for s in samples["after_p5"]])
    section.add(
        "P4+P5 `tokenledger report` cold start: after (proposal)",
        c_wall,
        "ms wall",
        ratio=c_wall / b_wall,
        baseline="before, same run",
        extra=f"{c_cpu:.0f} ms CPU; P5: lazy `tokenledger/__init__.py`",
    )
    b_open, a_open = median(opens["before"]), median(opens["after"])
    section.add(
        "P4 Ledger() open of an existing ledger: after (proposal)",
        a_open,
        "ms",
        ratio=a_open / b_open if b_open else None,
        baseline="before, same run",
        extra=f"before {b_open:.0f} ms (ensure_schema without Alembic on the fast path)",
    )


def run(section: Section, *, quick: bool, postgres_url: str | None) -> None:
    log("  proposals: P1 writer ...")
    _p1(section, quick, postgres_url)
    log("  proposals: P2 budget store ...")
    _p2(section, quick, postgres_url)
    log("  proposals: P3 estimate ...")
    _p3(section, quick)
    log("  proposals: P4 CLI ...")
    _p4(section, quick)
    section.note(
        "Measured by monkeypatching (P1–P3) or on a patched copy of the package (P4) in "
        "the benchmark process: proposals, not shipped code. See the module docstring."
    )
