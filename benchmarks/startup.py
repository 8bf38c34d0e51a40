"""Section 5: cold start of the CLI next to ``python -c pass`` and ``import litellm``.

Commands alternate round by round (A B C D, B C D A, ...); each is a fresh process, timed
wall-clock from spawn to exit, with its CPU from ``RUSAGE_CHILDREN``. The ratio is
against ``python -c pass`` from the same rounds. hyperfine is used when installed.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks._common import REPO_ROOT, Section, log, median

TARGET_MS = 300.0


def _small_ledger(path: str) -> str:
    """A ledger of 50 runs and 500 calls, written through the real writer."""
    code = f"""
import os
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
import tokenledger as tl
ledger = tl.Ledger("sqlite:///{path}", capture=False)
for i in range(50):
    with ledger.run("support" if i % 2 else "research", tags={{"user": str(i % 7)}}):
        for _ in range(10):
            ledger.record_call(
                "gpt-4o-mini", input_tokens=1200, output_tokens=300, provider="openai"
            )
ledger.close()
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=REPO_ROOT)
    return f"sqlite:///{path}"


def _cli() -> list[str]:
    """The console script of the environment running the harness: the one beside
    ``sys.executable`` (a virtualenv's bin), else the first on PATH. PATH alone may find
    a wrapper (pyenv's shims are shell scripts that cost ~100 ms before Python starts)
    or another environment's tokenledger."""
    beside = os.path.join(os.path.dirname(sys.executable), "tokenledger")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return [beside]
    exe = shutil.which("tokenledger")
    return [exe] if exe else [sys.executable, "-m", "tokenledger.cli"]


def _once(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=env, timeout=120, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-300:]!r}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall * 1000, cpu * 1000


def _hyperfine(commands: dict[str, list[str]], runs: int) -> dict[str, float] | None:
    exe = shutil.which("hyperfine")
    if exe is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [exe, "-N", "--warmup", "2", "--runs", str(runs), "--export-json", out.name]
        for name, c in commands.items():
            cmd += ["-n", name, " ".join(c)]
        proc = subprocess.run(cmd, capture_output=True, timeout=900, check=False)
        if proc.returncode != 0:
            return None
        data = json.load(open(out.name))  # noqa: SIM115
    return {r["command"]: r["median"] * 1000 for r in data["results"]}


def run(section: Section, *, quick: bool, postgres_url: str | None) -> None:
    rounds = 1 if quick else 15
    with tempfile.TemporaryDirectory(prefix="tl-startup-") as tmp:
        url = _small_ledger(os.path.join(tmp, "small.db"))
        env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", NO_COLOR="1", COLUMNS="120")
        env.pop("TOKENLEDGER_DATABASE_URL", None)
        cli = _cli()
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "python -c 'import litellm'": [sys.executable, "-c", "import litellm"],
            "tokenledger --help": [*cli, "--help"],
            "tokenledger report (small ledger)": [*cli, "report", "--db", url],
        }
        log("  startup ...")
        for name, cmd in commands.items():  # warm the page cache and .pyc files
            if not (quick and "litellm" in name):
                _once(cmd, env)
        samples: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
        names = list(commands)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                samples[name].append(_once(commands[name], env))
        hf = None if quick else _hyperfine(commands, 10)
    base = [s[0] for s in samples["python -c pass"]]
    for name in names:
        walls = [s[0] for s in samples[name]]
        cpus = [s[1] for s in samples[name]]
        ratios = [w / b for w, b in zip(walls, base, strict=False)]
        is_cli = name.startswith("tokenledger")
        section.add(
            name,
            median(walls),
            "ms wall",
            ratio=median(ratios) if name != "python -c pass" else None,
            baseline="python -c pass" if name != "python -c pass" else None,
            extra=f"{median(cpus):.0f} ms CPU"
            + (f"; hyperfine median {hf[name]:.0f} ms" if hf and name in hf else ""),
            target=f"< {TARGET_MS:.0f} ms" if is_cli else "",
            met=median(walls) < TARGET_MS if is_cli else None,
        )
    section.note(
        f"{rounds} rounds, commands in rotating order; the CLI is `{' '.join(_cli())}`. "
        + (
            "hyperfine was not installed; timings are repeated subprocess runs."
            if not shutil.which("hyperfine")
            else ""
        )
    )
