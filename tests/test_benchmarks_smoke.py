"""The benchmark harness starts and produces numbers (a smoke run, SQLite only).

The figures themselves are not asserted: this machine is shared and noisy, which is why
the harness reports ratios against baselines measured in the same run. See BENCHMARKS.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the benchmark harness

REPO = Path(__file__).resolve().parent.parent
SECTIONS = (
    "1. Capture overhead per model call",
    "2. Ledger ingest",
    "3. Budget reservations",
    "4. Queries",
    "5. Start-up",
)
# A figure as the table prints it: a number followed by its unit.
FIGURE = re.compile(r"\d[\d,]*(\.\d+)? (µs|ms|rows/s|reservations/s|calls/s|USD|×)")


def _blocks(stdout: str) -> dict[str, str]:
    blocks: dict[str, str] = {}
    for chunk in stdout.split("\n== ")[1:]:
        title, _, body = chunk.partition("\n")
        blocks[title.strip()] = body
    return blocks


def test_quick_run_prints_figures_for_every_section(tmp_path: Path) -> None:
    """`python -m benchmarks --quick` exits 0 and prints numbers for each section."""
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-postgres", "--json",
         str(tmp_path / "figures.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert 0 == proc.returncode, proc.stderr[-3000:]
    blocks = _blocks(proc.stdout)
    for title in SECTIONS:
        assert title in blocks, f"section {title!r} missing from:\n{proc.stdout}"
        assert "This section failed" not in blocks[title], blocks[title]
        assert FIGURE.search(blocks[title]), f"no figure in section {title!r}:\n{blocks[title]}"
    assert (tmp_path / "figures.json").is_file()


def test_quick_run_writes_no_report_by_default(tmp_path: Path) -> None:
    """A smoke run never overwrites BENCHMARKS.md; `--only` picks sections."""
    before = (REPO / "BENCHMARKS.md").stat().st_mtime if (REPO / "BENCHMARKS.md").exists() else None
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-postgres", "--only", "ingest"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert 0 == proc.returncode, proc.stderr[-3000:]
    assert list(_blocks(proc.stdout)) == ["2. Ledger ingest"]
    after = (REPO / "BENCHMARKS.md").stat().st_mtime if (REPO / "BENCHMARKS.md").exists() else None
    assert before == after
