"""Capture overhead per litellm call: bare litellm vs inside a tokenledger run.

Interleaved A/B blocks; each block makes N ``mock_response`` calls and measures process
CPU time (all threads, so litellm's logging threads count) and wall time. Reports the
median per-call figures and the difference.

    python -m benchmarks.capture_overhead [--calls 2000] [--rounds 7] [--sdk]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MESSAGES = [{"role": "user", "content": "hello"}]


def _block(fn: Callable[[], None], calls: int) -> tuple[float, float]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.process_time() - cpu0) / calls * 1e6, (time.perf_counter() - wall0) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sdk", action="store_true", help="record spans with an OTel SDK")
    args = parser.parse_args()

    if args.sdk:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
        trace.set_tracer_provider(provider)

    import litellm

    import tokenledger as tl
    from tokenledger import capture

    tmp = tempfile.mkdtemp()
    ledger = tl.Ledger(f"sqlite:///{tmp}/bench.db")

    def call() -> None:
        litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="hi")

    def bare() -> None:
        call()

    def in_run() -> None:
        call()

    # warm up both paths
    capture.uninstall()
    _block(bare, 200)
    capture.install()
    with ledger.run("warm"):
        _block(in_run, 200)
    ledger.flush()

    bare_cpu, bare_wall, run_cpu, run_wall = [], [], [], []
    for _ in range(args.rounds):
        capture.uninstall()
        cpu, wall = _block(bare, args.calls)
        bare_cpu.append(cpu)
        bare_wall.append(wall)
        capture.install()
        with ledger.run("bench"):
            cpu, wall = _block(in_run, args.calls)
        ledger.flush()
        run_cpu.append(cpu)
        run_wall.append(wall)

    b_cpu, r_cpu = statistics.median(bare_cpu), statistics.median(run_cpu)
    b_wall, r_wall = statistics.median(bare_wall), statistics.median(run_wall)
    label = "with OTel SDK (BatchSpanProcessor)" if args.sdk else "no OTel SDK"
    print(f"capture overhead, {label}, {args.rounds} rounds x {args.calls} calls")
    print(f"  bare litellm     CPU {b_cpu:8.1f} us/call   wall {b_wall:8.1f} us/call")
    print(f"  in a run         CPU {r_cpu:8.1f} us/call   wall {r_wall:8.1f} us/call")
    print(
        f"  overhead         CPU {r_cpu - b_cpu:+8.1f} us ({(r_cpu / b_cpu - 1) * 100:+.1f} %)"
        f"   wall {r_wall - b_wall:+8.1f} us ({(r_wall / b_wall - 1) * 100:+.1f} %)"
    )
    ledger.close()


if __name__ == "__main__":
    main()
