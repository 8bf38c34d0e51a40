"""What every section shares: timing, medians, the result rows, PostgreSQL schemas.

Every figure is reported next to a baseline measured in the same run, and A and B are
interleaved (A B B A ...) so that the drift of a shared, noisy machine cancels out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

# No network, ever: litellm must use its bundled price map, and peers export nowhere.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Row:
    """One line of the results table.

    ``value`` is the figure in ``unit``; ``ratio`` is it divided by the ``baseline`` row's
    figure measured in the same run (None for a baseline itself); ``target`` says what
    the issue asks of this figure and ``met`` whether it is met (None: no target).
    """

    section: str
    name: str
    value: float | None
    unit: str
    ratio: float | None = None
    baseline: str | None = None
    extra: str = ""
    target: str = ""
    met: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Section:
    name: str
    title: str
    rows: list[Row] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    def add(self, name: str, value: float | None, unit: str, **kw: Any) -> Row:
        row = Row(self.name, name, value, unit, **kw)
        self.rows.append(row)
        return row

    def note(self, text: str) -> None:
        self.notes.append(text)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio_median(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of the per-round ratios a[i] / b[i] (pairs from the same round)."""
    pairs = [x / y for x, y in zip(a, b, strict=False) if y]
    return median(pairs)


def spread(values: Sequence[float]) -> float:
    """Half the interquartile range relative to the median (a robust noise figure)."""
    if len(values) < 4:
        return float("nan")
    q = statistics.quantiles(values, n=4)
    m = median(values)
    return (q[2] - q[0]) / 2 / m if m else float("nan")


def percentile(sorted_values: Sequence[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def interleaved(
    variants: dict[str, Callable[[], dict[str, float]]], rounds: int
) -> dict[str, list[dict[str, float]]]:
    """Run each variant once per round, rotating the order every round (A B C, B C A,
    C A B ...) so no variant always runs first or last; returns every measurement."""
    names = list(variants)
    out: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        if r % 2:
            order.reverse()
        for name in order:
            out[name].append(variants[name]())
    return out


class Timer:
    """Process CPU (every thread), caller-thread CPU and wall time of a block."""

    def __enter__(self) -> Timer:
        self.cpu0 = time.process_time()
        self.thread0 = time.thread_time()
        self.wall0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self.cpu0
        self.thread = time.thread_time() - self.thread0
        self.wall = time.perf_counter() - self.wall0


def fmt(value: float | None, unit: str = "") -> str:
    if value is None or value != value:  # None or NaN
        return "—"
    if unit in ("x", "ratio"):
        return f"{value:.3f}×"
    if unit == "%":
        return f"{value:.1f} %"
    a = abs(value)
    if a >= 10_000:
        text = f"{value:,.0f}"
    elif a >= 100:
        text = f"{value:.0f}"
    elif a >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- PostgreSQL ---------------------------------------------------------------------------


def postgres_admin_url() -> str:
    return os.environ.get("TOKENLEDGER_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)


def postgres_reason(url: str) -> str | None:
    """None when the server answers, else why not (one line)."""
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(
            url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 3}
        )
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        finally:
            engine.dispose()
    except Exception as exc:
        return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return None


@contextlib.contextmanager
def postgres_schema(admin_url: str) -> Iterator[str]:
    """A fresh schema ``bench_<random>`` (never ``public``); yields a URL whose
    search_path is that schema, and drops it afterwards."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = make_url(admin_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql("SET LOCAL lock_timeout = '30s'")
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def psycopg_conninfo(sa_url: str) -> tuple[str, str | None]:
    """A libpq conninfo for a SQLAlchemy URL, and its search_path option if any."""
    from sqlalchemy.engine import make_url

    url = make_url(sa_url)
    parts = []
    if url.host:
        parts.append(f"host={url.host}")
    if url.port:
        parts.append(f"port={url.port}")
    if url.username:
        parts.append(f"user={url.username}")
    if url.password:
        parts.append(f"password={url.password}")
    if url.database:
        parts.append(f"dbname={url.database}")
    options = url.query.get("options")
    if isinstance(options, tuple):
        options = options[0]
    return " ".join(parts), options
