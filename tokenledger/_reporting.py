"""Cost reports without SQLAlchemy: parsing what to report, and the rows a report gives.

``import sqlalchemy`` is two thirds of ``tokenledger report``'s start-up, so on a plain
SQLite file the command opens the ledger with `sqlite3` and runs `sqlite_report` here
directly (see ``tokenledger.cli``). `tokenledger.queries.report` runs the same SQL (built
by ``tokenledger._report_sql`` for either engine) through SQLAlchemy and turns it into
rows with `report_rows`, so the library and the command give the same rows on both
engines. The rules (each call counted once, root runs read from their totals) are
documented in `tokenledger.queries`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from tokenledger._money import from_driver
from tokenledger._report_sql import (
    REPORT_DIMENSIONS,
    REPORT_FIELDS,
    SQLITE,
    TAG_PREFIX,
    UTC,
    Dialect,
    Execute,
    report_results,
)
from tokenledger.exceptions import ConfigurationError

__all__ = [
    "REPORT_DIMENSIONS",
    "TAG_PREFIX",
    "UTC",
    "ReportRow",
    "key_text",
    "merge_report_rows",
    "parse_report_by",
    "parse_since",
    "report_rows",
    "sqlite_report",
    "window",
]

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_COST = REPORT_FIELDS.index("cost_usd")


@dataclasses.dataclass(frozen=True, slots=True)
class ReportRow:
    """One group of a cost report.

    ``key`` maps each ``by`` dimension to its value (``None``: calls outside any run, a
    call with no model or provider recorded, a run without an outcome or without the
    tag). ``runs`` counts the distinct runs the group's calls were attributed to (runs
    that made no call count too when grouping by properties of runs only); ``cost_usd``
    includes tool charges and excludes the ``unpriced_calls``, whose models had no price.
    """

    key: dict[str, str | None]
    runs: int
    calls: int
    failed_calls: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    cost_usd: Decimal
    unpriced_calls: int

    @property
    def cached_tokens(self) -> int:
        """Input tokens read from or written to a prompt cache."""
        return self.cache_read_tokens + self.cache_write_tokens


# ---------------------------------------------------------------------------- parsing


def parse_since(value: str | dt.datetime, *, now: dt.datetime | None = None) -> dt.datetime:
    """The start of a time window, as an aware UTC datetime.

    Accepts a duration back from now (``30s``, ``30m``, ``24h``, ``7d``, ``2w``), an ISO
    date (``2025-01-31``, midnight UTC) or an ISO datetime (``2025-01-31T12:00``; UTC
    unless it carries an offset), or a datetime. The same forms give the end of a window
    (``until``).

    Raises:
        ConfigurationError: the value is none of these.

    .. versionadded:: 0.1.0
    """
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    text = value.strip() if isinstance(value, str) else ""
    match = _DURATION.match(text)
    if match:
        amount, unit = int(match.group(1)), match.group(2).lower()
        delta = dt.timedelta(**{_DURATION_UNITS[unit]: amount})
        return (now or dt.datetime.now(UTC)) - delta
    if text:
        try:
            parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return parse_since(parsed)
    raise ConfigurationError(
        f"`since` is {value!r}; use a duration back from now such as 30m, 24h, 7d or 2w, "
        "or an ISO date such as 2025-01-31."
    )


def window(
    since: str | dt.datetime | None, until: str | dt.datetime | None
) -> tuple[dt.datetime | None, dt.datetime | None]:
    """``since`` and ``until`` as aware UTC datetimes, checked to be in order."""
    start = parse_since(since) if since is not None else None
    if until is None:
        return start, None
    try:
        end = parse_since(until)
    except ConfigurationError as exc:
        raise ConfigurationError(str(exc).replace("`since`", "`until`", 1)) from exc
    if start is not None and end < start:
        raise ConfigurationError(
            f"`until` ({end.isoformat()}) is before `since` ({start.isoformat()}); the "
            "window must end after it starts."
        )
    return start, end


def parse_report_by(by: str | Sequence[str]) -> tuple[str, ...]:
    """Check report dimensions; a string is split on commas (``"agent,tag:tenant"``).

    Dimension names are case-insensitive; the key of ``tag:KEY`` is kept exactly as
    written (tag keys are case-sensitive).

    Raises:
        ConfigurationError: an unknown, repeated or missing dimension.
    """
    items = by.split(",") if isinstance(by, str) else list(by)
    accepted = ", ".join(REPORT_DIMENSIONS) + f", or {TAG_PREFIX}KEY for any run tag"
    names: list[str] = []
    for item in items:
        text = str(item).strip()
        if text[: len(TAG_PREFIX)].lower() == TAG_PREFIX:
            key = text[len(TAG_PREFIX) :]
            if not key:
                raise ConfigurationError(
                    f"`by` has {text!r}, which names no tag key; write {TAG_PREFIX}KEY, "
                    f"for example {TAG_PREFIX}tenant."
                )
            names.append(TAG_PREFIX + key)
        else:
            names.append(text.lower())
    if not names or any(not name for name in names):
        raise ConfigurationError(
            f"`by` is {by!r}; give one or more of {accepted}, separated by commas."
        )
    for name in names:
        if name not in REPORT_DIMENSIONS and not name.startswith(TAG_PREFIX):
            raise ConfigurationError(
                f"`by` has {name!r}, which is not something a report can group by; "
                f"use one or more of {accepted}."
            )
    if len(set(names)) != len(names):
        raise ConfigurationError(f"`by` is {by!r}; name each dimension once.")
    return tuple(names)


def key_text(value: Any, dimension: str = "") -> str | None:
    """A report key as text: a day as ``YYYY-MM-DD``, an hour as ``YYYY-MM-DD HH:00``."""
    if value is None:
        return None
    if isinstance(value, dt.datetime) and dimension == "hour":
        return value.strftime("%Y-%m-%d %H:00")
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()[:10]
    return str(value)


def merge_report_rows(
    dimensions: Sequence[str], results: Iterable[Iterable[Sequence[Any]]]
) -> list[ReportRow]:
    """Report rows from query results whose columns are the keys, then `REPORT_FIELDS`.

    A model (or provider, or day) used both inside and outside runs comes back from both
    queries: the two rows are added up (the sets of runs are disjoint, so runs add too).
    Rows come most expensive first, then by key (None last).
    """
    width = len(dimensions)
    groups: dict[tuple[str | None, ...], list[Any]] = {}
    for result in results:
        for row in result:
            runs, calls = row[width], row[width + 1]
            if not calls and not runs:
                continue  # the outside query's single row when there are none
            key = tuple(key_text(row[i], name) for i, name in enumerate(dimensions))
            group = groups.get(key)
            if group is None:
                group = groups[key] = [0] * len(REPORT_FIELDS)
                group[_COST] = from_driver(0)
            for index, value in enumerate(row[width:]):
                group[index] += from_driver(value) if index == _COST else int(value)
    rows = [
        ReportRow(
            key=dict(zip(dimensions, key, strict=True)),
            **dict(zip(REPORT_FIELDS, group, strict=True)),
        )
        for key, group in groups.items()
    ]
    rows.sort(key=lambda row: (-row.cost_usd, [(v is None, v or "") for v in row.key.values()]))
    return rows


# ------------------------------------------------------------------------- running


def report_rows(
    execute: Execute,
    dimensions: Sequence[str],
    start: dt.datetime | None,
    end: dt.datetime | None,
    *,
    root_only: bool,
    dialect: Dialect = SQLITE,
) -> list[ReportRow]:
    """`tokenledger.queries.report` on ``dialect``'s engine, through ``execute``.

    ``dimensions`` come from `parse_report_by` and ``start`` / ``end`` from `window`.
    """
    results = report_results(execute, dialect, dimensions, start, end, root_only=root_only)
    return merge_report_rows(dimensions, results)


#: What ``tokenledger report`` runs on a SQLite file through a `sqlite3` connection:
#: `report_rows`, whose dialect is SQLite unless told otherwise.
sqlite_report = report_rows
