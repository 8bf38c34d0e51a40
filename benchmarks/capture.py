"""Section 1: capture overhead per model call, tokenledger next to bare litellm and peers.

Each family of variants runs in its own process (`benchmarks._capture_worker`), where
the bare-litellm baseline is interleaved with the variants, so every ratio compares two
figures measured minutes apart at most, in one process, in alternating order.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

from benchmarks._common import REPO_ROOT, Section, log, median, postgres_schema, spread

# Peer -> the module that must be importable for it to run.
PEERS = {
    "litellm_otel": ("litellm 'otel' callback", "opentelemetry.sdk"),
    "langfuse": ("Langfuse @observe + langfuse_otel callback", "langfuse"),
    "openllmetry": ("OpenLLMetry @workflow + litellm instrumentation", "traceloop.sdk"),
    "shekel": ("shekel `with budget()`", "shekel"),
}

LABELS = {
    "bare": "bare litellm (baseline)",
    "run": "tokenledger run, no OTel SDK",
    "run_budget": "tokenledger run + run budget, no SDK",
    "shared_budget_sqlite": "tokenledger run + shared budget (SQLite)",
    "shared_budget_pg": "tokenledger run + shared budget (PostgreSQL)",
    "sdk:run": "tokenledger run, OTel SDK + BatchSpanProcessor",
    "sdk:run_budget": "tokenledger run + run budget, OTel SDK",
}

TARGET_NO_SDK_US = 12.0
TARGET_SDK_RATIO = 1.03


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _worker(family: str, opts: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks._capture_worker", family]
    for key, value in opts.items():
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(  # bounded: a worker that hangs is stopped
        cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=1800, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _pairs(
    samples: dict[str, list[dict[str, float]]], variant: str, metric: str
) -> dict[str, float]:
    base = samples["bare"]
    ours = samples[variant]
    diffs = [a[metric] - b[metric] for a, b in zip(ours, base, strict=False)]
    ratios = [a[metric] / b[metric] for a, b in zip(ours, base, strict=False) if b[metric]]
    return {
        "value": median([a[metric] for a in ours]),
        "base": median([b[metric] for b in base]),
        "diff": median(diffs),
        "ratio": median(ratios),
        "noise": spread(ratios),
    }


def run(section: Section, *, quick: bool, postgres_url: str | None) -> None:
    if quick:
        opts: dict[str, Any] = {
            "runs": 1,
            "calls_per_run": 20,
            "rounds": 2,
            "pipeline_calls": 400,
        }
    else:
        opts = {"runs": 4, "calls_per_run": 50, "rounds": 25, "pipeline_calls": 10000}
    section.data["options"] = opts
    families = ["tokenledger", "tokenledger_sdk", *PEERS]
    results: dict[str, dict[str, Any]] = {}
    for family in families:
        if family in PEERS and not _installed(PEERS[family][1]):
            results[family] = {"missing": PEERS[family][1]}
            continue
        if quick and family in PEERS:
            continue  # the smoke run needs no peer
        log(f"  capture: {family} ...")
        if family == "tokenledger" and postgres_url:
            # The worker's PostgreSQL ledger lives in a throw-away bench_<random> schema,
            # never in the admin URL's default (public) schema.
            with postgres_schema(postgres_url) as schema_url:
                results[family] = _worker(family, {**opts, "postgres_url": schema_url})
        else:
            results[family] = _worker(family, opts)
    section.data["raw"] = results

    peer_ratios: dict[str, float] = {}
    sdk_ratio: float | None = None
    tl = results.get("tokenledger", {})
    if "samples" in tl:
        bare = _pairs(tl["samples"], "bare", "cpu_us")
        section.add(
            LABELS["bare"],
            bare["value"],
            "µs CPU/call",
            extra=(
                f"caller thread {median([s['thread_us'] for s in tl['samples']['bare']]):.0f} µs, "
                f"wall {median([s['wall_us'] for s in tl['samples']['bare']]):.0f} µs"
            ),
        )
        for variant in tl["samples"]:
            if variant == "bare":
                continue
            cpu = _pairs(tl["samples"], variant, "cpu_us")
            thread = _pairs(tl["samples"], variant, "thread_us")
            wall = _pairs(tl["samples"], variant, "wall_us")
            kw: dict[str, Any] = {}
            if variant == "run":
                kw = {
                    "target": f"≤ {TARGET_NO_SDK_US:.0f} µs/call over bare",
                    "met": cpu["diff"] <= TARGET_NO_SDK_US,
                }
            section.add(
                LABELS.get(variant, variant),
                cpu["diff"],
                "µs CPU/call over bare",
                ratio=cpu["ratio"],
                baseline="bare litellm, same process",
                extra=(
                    f"{cpu['value']:.0f} µs CPU; caller thread +{thread['diff']:.0f} µs; "
                    f"wall +{wall['diff']:.0f} µs ({wall['ratio']:.3f}×); "
                    f"ratio noise ±{cpu['noise'] * 100:.1f} %"
                ),
                **kw,
            )
    elif "error" in tl:
        section.note(f"tokenledger family failed: {tl['error']}")

    sdk = results.get("tokenledger_sdk", {})
    if "samples" in sdk:
        for variant in sdk["samples"]:
            if variant == "bare":
                continue
            cpu = _pairs(sdk["samples"], variant, "cpu_us")
            thread = _pairs(sdk["samples"], variant, "thread_us")
            wall = _pairs(sdk["samples"], variant, "wall_us")
            kw = {}
            if variant == "run":
                sdk_ratio = cpu["ratio"]
                kw = {"target": f"≤ {TARGET_SDK_RATIO:.2f}× bare and below every peer"}
            section.add(
                LABELS.get(f"sdk:{variant}", variant),
                cpu["diff"],
                "µs CPU/call over bare",
                ratio=cpu["ratio"],
                baseline="bare litellm, same process",
                extra=(
                    f"{cpu['value']:.0f} µs CPU; caller thread +{thread['diff']:.0f} µs; "
                    f"wall +{wall['diff']:.0f} µs ({wall['ratio']:.3f}×); "
                    f"ratio noise ±{cpu['noise'] * 100:.1f} %"
                ),
                **kw,
            )
    elif "error" in sdk:
        section.note(f"tokenledger + SDK family failed: {sdk['error']}")

    for family, (label, module) in PEERS.items():
        res = results.get(family, {})
        if "missing" in res:
            section.add(label, None, "not installed", extra=f"pip install: needs `{module}`")
            continue
        if "error" in res:
            section.add(label, None, "failed", extra=res["error"][:200])
            continue
        if "samples" not in res:
            continue
        cpu = _pairs(res["samples"], family, "cpu_us")
        thread = _pairs(res["samples"], family, "thread_us")
        wall = _pairs(res["samples"], family, "wall_us")
        peer_ratios[label] = cpu["ratio"]
        spans = res.get("spans_seen")
        section.add(
            label,
            cpu["diff"],
            "µs CPU/call over bare",
            ratio=cpu["ratio"],
            baseline="bare litellm, same process",
            extra=(
                f"{cpu['value']:.0f} µs CPU; caller thread +{thread['diff']:.0f} µs; "
                f"wall +{wall['diff']:.0f} µs ({wall['ratio']:.3f}×)"
                + (f"; {spans} spans per block" if spans is not None else "")
                + (
                    f"; litellm dropped {res['dropped_logging_tasks']} logging tasks"
                    if res.get("dropped_logging_tasks")
                    else ""
                )
            ),
        )

    if sdk_ratio is not None:
        for row in section.rows:
            if row.name == LABELS["sdk:run"]:
                below = all(sdk_ratio < v for v in peer_ratios.values())
                row.met = sdk_ratio <= TARGET_SDK_RATIO and below
                beaten = [k for k, v in peer_ratios.items() if sdk_ratio >= v]
                if beaten:
                    row.extra += "; not below: " + ", ".join(beaten)

    bare_us = None
    if "samples" in results.get("tokenledger", {}):
        bare_us = median([s["cpu_us"] for s in results["tokenledger"]["samples"]["bare"]])
    for key, label in (("tokenledger", "no SDK"), ("tokenledger_sdk", "OTel SDK")):
        res = results.get(key, {})
        pipe = res.get("pipeline")
        vs_bare: dict[str, Any] = (
            {"ratio": pipe["process_us"] / bare_us, "baseline": "one bare litellm call (CPU)"}
            if pipe and bare_us
            else {}
        )
        if pipe:
            section.add(
                f"tokenledger pipeline alone ({label}): caller thread",
                pipe["caller_us"],
                "µs/call",
                extra="start + reserve + finish hooks, no litellm; runs of 50 calls",
            )
            section.add(
                f"tokenledger pipeline alone ({label}): process",
                pipe["process_us"],
                "µs/call",
                extra="the above plus the writer thread (and span export) for its rows",
                **vs_bare,
            )
        writer = res.get("writer")
        if writer and key == "tokenledger":
            section.add(
                "writer thread CPU per call row (SQLite)",
                writer["process_us_per_row"],
                "µs/row",
                extra="BatchWriter flush of queued CallRecords",
            )
    if results.get("tokenledger", {}).get("dropped_logging_tasks"):
        section.note("litellm dropped logging tasks during the tokenledger family.")
    section.note(
        "Blocks are agent runs of "
        f"{opts['calls_per_run']} `litellm.completion(mock_response=...)` calls; each block "
        "ends by draining litellm's logging threads, the ledger writer and the span "
        "processor inside the timed region, so their CPU is charged to it. CPU is process "
        "CPU (all threads); 'caller thread' is `time.thread_time()` of the calling thread."
    )
    section.note(
        "Peers are given their most favourable offline setup: spans to an in-memory "
        "exporter through a batch processor where the peer allows it, never the network."
    )
