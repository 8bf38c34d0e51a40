"""The token, duration and cost metrics, read back from an SDK MeterProvider.

A MeterProvider can be set once per process, so each case runs in a fresh interpreter
(cwd = a temp dir, so the installed package is imported) and prints what it read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = """
import json, os, sys
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
import litellm
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
import tokenledger
from tokenledger.testing import mock_response

ledger = tokenledger.Ledger(sys.argv[1])
if sys.argv[2] == "before":
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))


def call():
    with ledger.run("metrics-agent"):
        litellm.completion(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            mock_response=mock_response(prompt_tokens=1000, completion_tokens=200),
        )


call()  # before any SDK in the "late" case: recorded nowhere, and no error
if sys.argv[2] == "late":
    # Set after the ledger (and its instruments) were made: the next calls must count.
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
call()
ledger.close()
out = {}
for rm in reader.get_metrics_data().resource_metrics:
    for sm in rm.scope_metrics:
        for m in sm.metrics:
            for p in m.data.data_points:
                key = m.name + "|" + ",".join(
                    f"{k}={v}" for k, v in sorted(p.attributes.items())
                )
                out[key] = {"sum": getattr(p, "sum", None), "count": getattr(p, "count", None),
                            "value": getattr(p, "value", None), "scope": sm.scope.name}
print(json.dumps(out))
"""


def _read_metrics(tmp_path: Path, when: str) -> dict[str, dict[str, float]]:
    script = tmp_path / "metrics_case.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.run(
        [sys.executable, str(script), f"sqlite:///{tmp_path}/m.db", when],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )
    assert 0 == proc.returncode, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


BASE = "gen_ai.operation.name=chat,gen_ai.provider.name=openai,gen_ai.request.model=gpt-4o-mini"


def _check(points: dict[str, dict[str, float]], calls: int) -> None:
    usage_in = points[f"gen_ai.client.token.usage|{BASE},gen_ai.token.type=input"]
    usage_out = points[f"gen_ai.client.token.usage|{BASE},gen_ai.token.type=output"]
    assert (calls, 1000 * calls) == (usage_in["count"], usage_in["sum"])
    assert (calls, 200 * calls) == (usage_out["count"], usage_out["sum"])
    assert calls == points[f"gen_ai.client.operation.duration|{BASE}"]["count"]
    # gpt-4o-mini: $0.15 / 1M input, $0.60 / 1M output ->
    # 1000 * 0.15e-6 + 200 * 0.60e-6 = 0.00015 + 0.00012 = 0.00027 USD per call.
    cost = points[f"tokenledger.client.cost|{BASE}"]
    assert abs(cost["value"] - 0.00027 * calls) < 1e-12
    assert {"tokenledger"} == {p["scope"] for p in points.values()}


@pytest.mark.slow
def test_metrics_reach_a_meter_provider_set_before_the_ledger(tmp_path: Path) -> None:
    _check(_read_metrics(tmp_path, "before"), calls=2)


@pytest.mark.slow
def test_metrics_reach_a_meter_provider_set_after_the_ledger(tmp_path: Path) -> None:
    # The first call happened with no SDK: skipped cheaply. The second one counts.
    _check(_read_metrics(tmp_path, "late"), calls=1)
