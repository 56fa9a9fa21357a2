"""telemetry.setup: exemplars on /metrics, idempotence, and no blocking when the collector is down."""

from __future__ import annotations

import json
import re
import threading

import httpx
import pytest
from prometheus_client import CollectorRegistry

import weightwatch
from conftest import free_port
from weightwatch import telemetry
from weightwatch.catalogue import METRICS

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def test_metrics_endpoint_serves_exemplar_with_active_trace_id(telemetry_reset, tmp_path) -> None:
    tele = weightwatch.setup("test-orch", role="orchestrator", metrics_port=0, metrics_addr="127.0.0.1", span_file=tmp_path / "spans.jsonl")
    assert tele.metrics_port
    with tele.tracer().start_as_current_span("weights.update") as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
        assert weightwatch.current_trace_id() == trace_id
        tele.metrics.observe("rl_weight_update_queue_seconds", 0.42, op="update_weights", server="s1")
    # outside any span: no exemplar, still counted
    tele.metrics.observe("rl_weight_update_queue_seconds", 0.01, op="update_weights", server="s1")

    resp = httpx.get(f"http://127.0.0.1:{tele.metrics_port}/metrics", headers={"Accept": OPENMETRICS})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/openmetrics-text")
    bucket_lines = [l for l in resp.text.splitlines() if l.startswith("rl_weight_update_queue_seconds_bucket") and "#" in l]
    assert bucket_lines, resp.text
    assert any(f'trace_id="{trace_id}"' in l and " 0.42 " in l for l in bucket_lines)
    assert 'rl_weight_update_queue_seconds_count{op="update_weights",server="s1"} 2' in resp.text

    # plain Prometheus text format for scrapers that do not ask for OpenMetrics
    plain = httpx.get(f"http://127.0.0.1:{tele.metrics_port}/metrics")
    assert plain.headers["content-type"].startswith("text/plain")
    assert "trace_id" not in plain.text

    tele.force_flush()
    spans = [json.loads(l) for l in (tmp_path / "spans.jsonl").read_text().splitlines()]
    assert [s["name"] for s in spans] == ["weights.update"]
    assert spans[0]["trace_id"] == trace_id and spans[0]["rl.role"] == "orchestrator"


def test_setup_is_idempotent_and_role_metrics_exist(telemetry_reset) -> None:
    registry = CollectorRegistry()
    first = weightwatch.setup("a", role="trainer", registry=registry)
    second = weightwatch.setup("b", role="orchestrator")
    assert first is second and weightwatch.get() is first
    names = {m.name for m in registry.collect()}
    for spec in METRICS:
        if spec.role == "trainer" and not spec.labels:
            assert spec.name.removesuffix("_total") in names


def test_get_before_setup_is_provisional_and_replaced(telemetry_reset) -> None:
    provisional = weightwatch.get()
    assert provisional.provisional and provisional.exporters == []
    real = weightwatch.setup("x", role="inference")
    assert real is not provisional and not real.provisional


def test_no_exporter_without_configuration(telemetry_reset, monkeypatch) -> None:
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "WEIGHTWATCH_SPAN_FILE"):
        monkeypatch.delenv(var, raising=False)
    assert weightwatch.setup("x").exporters == []


def test_unknown_metric_name_is_a_programming_error(telemetry_reset) -> None:
    tele = weightwatch.setup("x")
    with pytest.raises(KeyError):
        tele.metrics.get("rl_not_in_catalogue")


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_unreachable_collector_neither_raises_nor_blocks(telemetry_reset, monkeypatch, protocol) -> None:
    dead = free_port()  # nothing listens here
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    tele = weightwatch.setup("test-dead-collector", role="orchestrator", max_queue_size=512)
    assert tele.exporters == ["otlp"]
    tracer = tele.tracer()

    done = threading.Event()

    def record() -> None:
        for i in range(10_000):
            with tracer.start_as_current_span("gen.batch") as span:
                span.set_attribute("rl.completions", i)
                tele.metrics.observe("rl_generation_batch_seconds", 0.001 * (i % 50))
        done.set()

    worker = threading.Thread(target=record, daemon=True)
    worker.start()
    # Generous bound: this guards against a hang (a blocked exporter), not against slowness.
    worker.join(timeout=120)
    assert done.is_set(), "recording spans blocked on an unreachable collector"

    tele.force_flush(timeout_millis=3000)
    exported = {
        (s.labels["exporter"], s.labels["result"]): s.value
        for m in tele.registry.collect()
        if m.name == "weightwatch_spans_exported"
        for s in m.samples
        if s.name.endswith("_total")
    }
    dropped = sum(
        s.value for m in tele.registry.collect() if m.name == "weightwatch_spans_dropped" for s in m.samples if s.name.endswith("_total")
    )
    assert exported.get(("otlp", "success"), 0) == 0
    # what did not reach the collector is accounted for: dropped from the queue or failed on export
    assert dropped + exported.get(("otlp", "failure"), 0) > 0
    assert dropped > 0  # 10,000 spans through a 512-slot queue towards a dead endpoint


def test_exemplar_labels_fit_openmetrics_limit() -> None:
    # OpenMetrics caps exemplar label sets at 128 UTF-8 characters.
    ex = {"trace_id": "f" * 32, "span_id": "f" * 16}
    assert len("".join(k + v for k, v in ex.items())) <= 128
    assert re.fullmatch(r"[0-9a-f]{32}", telemetry.current_tid()) is None  # no span: short random id
