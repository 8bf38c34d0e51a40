"""Section 2: ledger ingest, calls per second through `BatchWriter`, next to the engine's
raw limit for the same rows into the same table, measured in the same run.

Raw limits: the driver's executemany through SQLAlchemy (``exec_driver_sql``, values
already converted, one transaction per batch) on both engines, and psycopg ``COPY`` on
PostgreSQL. The ratio is the writer's rate over the best raw rate.

The writer is measured as shipped: calls taken from its queue as tuples, converted as
the column types convert them, and written with one precompiled ``INSERT ... ON
CONFLICT (id) DO NOTHING`` (SQLite) or ``COPY`` in a savepoint (PostgreSQL). On
PostgreSQL a second row measures the path of batches that may hold calls already stored
(retried, or replayed from the spool): INSERT ... ON CONFLICT, no COPY.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from benchmarks._common import Section, interleaved, log, median, postgres_schema, psycopg_conninfo

TARGET_RATIO = 0.5
BATCH = 1000  # rows per raw transaction


def make_calls(n: int) -> list[Any]:
    from tokenledger.records import CallRecord, new_id

    now = dt.datetime.now(dt.timezone.utc)
    run_id = new_id()
    return [
        CallRecord(
            id=new_id(),
            run_id=run_id,
            root_run_id=run_id,
            operation="chat",
            provider="openai",
            requested_model="gpt-4o-mini",
            model="gpt-4o-mini-2024-07-18",
            started_at=now,
            ended_at=now,
            latency_ms=412.5,
            input_tokens=1200,
            output_tokens=300,
            cache_read_tokens=1000,
            reasoning_tokens=100,
            cost_usd=Decimal("0.000285"),
            cost_source="local",
            price_id="0" * 32,
            finish_reasons=["stop"],
            litellm_call_id="c" * 36,
            trace_id=None,
            span_id=None,
            max_tokens=512,
        )
        for _ in range(n)
    ]


def _columns() -> list[str]:
    from tokenledger import _storage as storage

    return [c.name for c in storage.calls.columns]


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None).isoformat(" ")
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def _pg_value(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def _tuples(
    records: list[Any], columns: list[str], convert: Callable[[Any], Any]
) -> list[tuple[Any, ...]]:
    return [tuple(convert(getattr(r, c)) for c in columns) for r in records]


def _writer_rate(engine: Any, n: int, *, copy: bool = True) -> dict[str, float]:
    """Rows/s from the first put to the flush that commits the last row (the caller
    puts rows as fast as it can; the writer batches them as it would in production).

    ``copy=False`` (PostgreSQL): every batch takes the INSERT ... ON CONFLICT path that
    retried and replayed batches take."""
    from tokenledger._writer import BatchWriter

    records = make_calls(n)
    writer = BatchWriter(engine, max_delay=1.0)
    if not copy:
        writer._copy_calls_ok = False
    start = time.perf_counter()
    cpu0 = time.process_time()
    for record in records:
        writer.put_call(record)
    assert writer.flush(600)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    writer.close(60)
    return {"rows_s": n / wall, "cpu_us_row": cpu / n * 1e6}


def _raw_executemany_rate(engine: Any, n: int, dialect: str) -> dict[str, float]:
    columns = _columns()
    records = make_calls(n)
    # Converted before the clock starts: the raw figure is the engine's limit alone.
    rows = _tuples(records, columns, _sqlite_value if dialect == "sqlite" else _pg_value)
    cpu0 = time.process_time()
    start = time.perf_counter()
    mark = "?" if dialect == "sqlite" else "%s"
    sql = (
        f"INSERT INTO calls ({', '.join(columns)}) VALUES ({', '.join([mark] * len(columns))})"
        " ON CONFLICT (id) DO NOTHING"
    )
    for i in range(0, n, BATCH):
        with engine.begin() as conn:
            conn.exec_driver_sql(sql, rows[i : i + BATCH])
    wall = time.perf_counter() - start
    return {"rows_s": n / wall, "cpu_us_row": (time.process_time() - cpu0) / n * 1e6}


def _raw_copy_rate(url: str, n: int) -> dict[str, float]:
    import psycopg

    conninfo, options = psycopg_conninfo(url)
    columns = _columns()
    records = make_calls(n)
    rows = _tuples(records, columns, _pg_value)
    with psycopg.connect(conninfo, options=options or "") as conn:
        cpu0 = time.process_time()
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            with (
                conn.cursor() as cur,
                cur.copy(f"COPY calls ({', '.join(columns)}) FROM STDIN") as cp,
            ):
                for row in rows[i : i + BATCH]:
                    cp.write_row(row)
            conn.commit()
        wall = time.perf_counter() - start
    return {"rows_s": n / wall, "cpu_us_row": (time.process_time() - cpu0) / n * 1e6}


def _measure(engine_name: str, url: str, n: int, rounds: int, section: Section) -> None:
    from tokenledger import _schema as schema
    from tokenledger import _storage as storage

    engine = storage.create_engine_for(url)
    try:
        schema.ensure_schema(engine)
        dialect = engine.dialect.name
        variants: dict[str, Callable[[], dict[str, float]]] = {
            "writer": lambda: _writer_rate(engine, n),
            "executemany": lambda: _raw_executemany_rate(engine, n, dialect),
        }
        if dialect == "postgresql":
            variants["copy"] = lambda: _raw_copy_rate(url, n)
            variants["writer_insert"] = lambda: _writer_rate(engine, n, copy=False)
        for fn in variants.values():  # warm
            fn()
        samples = interleaved(variants, rounds)
    finally:
        engine.dispose()
    rates = {k: [s["rows_s"] for s in v] for k, v in samples.items()}
    writers = ("writer", "writer_insert")
    best_raw = max((k for k in rates if k not in writers), key=lambda k: median(rates[k]))
    ratios = [w / r for w, r in zip(rates["writer"], rates[best_raw], strict=False)]
    label = {"executemany": "SQLAlchemy exec_driver_sql executemany", "copy": "psycopg COPY"}
    for key in variants:
        if key in writers:
            continue
        section.add(
            f"{engine_name}: raw {label[key]} ({BATCH}-row transactions)",
            median(rates[key]),
            "rows/s",
            extra=f"{median([s['cpu_us_row'] for s in samples[key]]):.1f} µs CPU/row",
        )
    section.add(
        f"{engine_name}: BatchWriter",
        median(rates["writer"]),
        "rows/s",
        ratio=median(ratios),
        baseline=f"raw {label[best_raw]}",
        extra=f"{median([s['cpu_us_row'] for s in samples['writer']]):.1f} µs CPU/row, put + write",
        target=f"≥ {TARGET_RATIO:.0%} of the raw limit",
        met=median(ratios) >= TARGET_RATIO,
    )
    if "writer_insert" in rates:
        section.add(
            f"{engine_name}: BatchWriter, retried or replayed batches (INSERT ... ON CONFLICT)",
            median(rates["writer_insert"]),
            "rows/s",
            ratio=median(
                [w / r for w, r in zip(rates["writer_insert"], rates[best_raw], strict=False)]
            ),
            baseline=f"raw {label[best_raw]}",
            extra=(
                f"{median([s['cpu_us_row'] for s in samples['writer_insert']]):.1f} µs CPU/row,"
                " put + write"
            ),
        )


def run(section: Section, *, quick: bool, postgres_url: str | None) -> None:
    n = 2000 if quick else 50_000
    rounds = 1 if quick else 5
    section.data["rows_per_round"] = n
    with tempfile.TemporaryDirectory(prefix="tl-ingest-") as tmp:
        log("  ingest: sqlite ...")
        _measure("SQLite", f"sqlite:///{tmp}/ingest.db", n, rounds, section)
    if postgres_url:
        log("  ingest: postgresql ...")
        with postgres_schema(postgres_url) as url:
            _measure("PostgreSQL", url, n, rounds, section)
    section.note(
        f"Each round writes {n:,} fresh call rows (ids never repeat) per variant into the "
        "same `calls` table, indexes included; variants alternate, and the ratio is the "
        "median of per-round ratios. Writer rate: first put to the flush that commits "
        "the last row."
    )
