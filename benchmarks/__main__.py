"""``python -m benchmarks``: tokenledger's performance harness.

    python -m benchmarks                       # every section; writes BENCHMARKS.md
    python -m benchmarks --quick               # smoke run (seconds); writes nothing
    python -m benchmarks --only capture,ingest # some sections
    python -m benchmarks --no-postgres         # SQLite only

Sections: capture (overhead per model call, next to peers), ingest (BatchWriter vs the
engine's raw limit), budgets (reservations under concurrency), queries (reports over
100k / 1M calls), startup (CLI cold start). The scale story is written from them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import traceback

from benchmarks._common import REPO_ROOT, Section, log, postgres_admin_url, postgres_reason

SECTIONS = {
    "capture": "1. Capture overhead per model call",
    "ingest": "2. Ledger ingest",
    "budgets": "3. Budget reservations",
    "queries": "4. Queries",
    "startup": "5. Start-up",
    "proposals": "Proposed fixes, measured before/after (monkeypatched, not shipped)",
}
DEFAULT = ("capture", "ingest", "budgets", "queries", "startup")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: seconds, tiny sizes")
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT),
        help=f"comma-separated sections: {','.join(SECTIONS)} (proposals is not run by default)",
    )
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--postgres-url", default=None, help="admin URL of a PostgreSQL server")
    parser.add_argument(
        "--output",
        default=None,
        help="Markdown report path (default: BENCHMARKS.md for a full run, none for --quick)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only, write no report")
    parser.add_argument("--json", default=None, help="also write every figure as JSON here")
    args = parser.parse_args(argv)

    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    postgres_url: str | None = None
    if not args.no_postgres:
        candidate = args.postgres_url or postgres_admin_url()
        reason = postgres_reason(candidate)
        if reason is None:
            postgres_url = candidate
        else:
            log(f"PostgreSQL skipped: {reason}")

    from benchmarks import report

    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    machine_info = report.machine()
    sections: list[Section] = []
    failed = False
    for name in chosen:
        section = Section(name, SECTIONS[name])
        log(f"[{name}] {SECTIONS[name]}")
        try:
            module = __import__(f"benchmarks.{name}", fromlist=["run"])
            module.run(section, quick=args.quick, postgres_url=postgres_url)
        except Exception:
            failed = True
            section.note("This section failed:\n```\n" + traceback.format_exc().strip() + "\n```")
            log(traceback.format_exc())
        if postgres_url is None and name != "capture":
            section.note("PostgreSQL was not measured in this run.")
        sections.append(section)
    elapsed = time.perf_counter() - t0

    print("\n".join(report.table_lines(sections)))
    version_info = report.versions(postgres_url)
    print()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine_info.items()))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in version_info.items()))

    output = args.output
    if output is None and not args.quick:
        output = os.path.join(REPO_ROOT, "BENCHMARKS.md")
    if output and not args.no_write:
        text = report.markdown(
            sections,
            argv=argv,
            started=started,
            elapsed_s=elapsed,
            postgres_url=postgres_url,
            machine_info=machine_info,
            version_info=version_info,
        )
        with open(output, "w") as f:
            f.write(text)
        log(f"wrote {output}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.summary_dict(sections), f, indent=2, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
