"""OpenTelemetry set up the way the SDK's own conventions say, in a fresh process each.

A global tracer provider can be set once per process, and this test session already
set one, so each case runs a short program in a subprocess. The collector is a real
HTTP server on loopback that keeps what the OTLP exporter posts.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a fresh Python process per case


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.received.append((self.path, body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Collector)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'l.db'}"


def _run(code: str, env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tempfile.gettempdir(),  # the installed package, not the source tree's layout
        env={**clean, **env, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        check=False,
    )
    assert 0 == result.returncode, result.stderr
    return result.stdout.strip()


_ONE_RUN = (
    "import tokenledger as tl\n"
    "from opentelemetry import trace\n"
    "ledger = tl.configure({url!r})\n"
    "with tl.run('triage'):\n"
    "    ledger.record_call('gpt-4o-mini', input_tokens=10, output_tokens=5)\n"
    "ledger.close()\n"
    "trace.get_tracer_provider().force_flush()\n"
)


def test_otel_variables_alone_export_spans_named_for_the_service(
    collector: http.server.HTTPServer, tmp_path: Path
) -> None:
    port = collector.server_address[1]
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_SERVICE_NAME": "support-bot",
    }
    _run(_ONE_RUN.format(url=_url(tmp_path)), env)
    traces = [body for path, body in collector.received if path == "/v1/traces"]  # type: ignore[attr-defined]
    assert traces, "nothing was exported to /v1/traces"
    body = b"".join(traces)
    assert b"support-bot" in body
    assert b"tokenledger" in body  # the instrumentation scope of our spans
    assert b"triage" in body


def test_configure_names_the_service_tokenledger_only_when_the_environment_names_none(
    collector: http.server.HTTPServer, tmp_path: Path
) -> None:
    port = collector.server_address[1]
    code = (
        "import tokenledger as tl\n"
        "from opentelemetry import trace\n"
        f"tl.configure({_url(tmp_path)!r}, "
        f"otlp_endpoint='http://127.0.0.1:{port}')\n"
        "print(trace.get_tracer_provider().resource.attributes['service.name'])\n"
    )
    assert "tokenledger" == _run(code, {})
    assert "billing" == _run(code, {"OTEL_SERVICE_NAME": "billing"})
    assert "ops" == _run(code, {"OTEL_RESOURCE_ATTRIBUTES": "service.name=ops,team=x"})


def test_sdk_disabled_means_configure_sets_up_nothing(tmp_path: Path) -> None:
    code = (
        "import tokenledger as tl\n"
        "from opentelemetry import trace\n"
        f"tl.configure({_url(tmp_path)!r})\n"
        "print(type(trace.get_tracer_provider()).__name__)\n"
    )
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"}
    assert "ProxyTracerProvider" == _run(code, env)


def test_the_span_processor_installs_an_sdk_provider_when_none_is_set(tmp_path: Path) -> None:
    code = (
        "import tokenledger as tl\n"
        "from opentelemetry import trace\n"
        "from tokenledger.integrations import otel\n"
        f"ledger = tl.Ledger({_url(tmp_path)!r})\n"
        "processor = otel.instrument(ledger=ledger)\n"
        "provider = trace.get_tracer_provider()\n"
        "print(type(provider).__name__, provider.resource.attributes['service.name'])\n"
        "processor.shutdown(); ledger.close()\n"
    )
    assert "TracerProvider shop" == _run(code, {"OTEL_SERVICE_NAME": "shop"})
