"""The one place that builds tracer providers, exporters, the metrics server and log sinks.

One call per process, ``weightwatch.setup(service_name=..., role=...)``. It follows the standard
``OTEL_*`` variables, is idempotent, and never raises into the host or blocks its event loop:
exports run on background threads with bounded queues, and what is dropped is counted.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from weightwatch.catalogue import METRICS, METRICS_BY_NAME, MetricSpec

_log = logging.getLogger("weightwatch.telemetry")

ROLES = ("orchestrator", "trainer", "inference")
#: Export timeout when OTEL_EXPORTER_OTLP_TIMEOUT is not set: short, so shutdown never hangs long.
DEFAULT_EXPORT_TIMEOUT_S = 5.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


# --------------------------------------------------------------------------- trace ids


def current_trace_id() -> str | None:
    """The active span's trace id as 32 hex digits, or None outside a (valid) span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x")


def current_tid() -> str:
    """The id log events carry: the OTel trace id when tracing is on, else a short random id."""
    return current_trace_id() or secrets.token_hex(6)


def _exemplar() -> dict[str, str] | None:
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


# --------------------------------------------------------------------------- span exporters


class JsonLinesSpanExporter(SpanExporter):
    """Writes one JSON object per finished span, for offline analysis (``weightwatch analyze``)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fh = open(self.path, "a", encoding="utf-8")

    @staticmethod
    def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
        ctx = span.get_span_context()
        assert ctx is not None
        parent = span.parent
        return {
            "name": span.name,
            "trace_id": format(ctx.trace_id, "032x"),
            "span_id": format(ctx.span_id, "016x"),
            "parent_span_id": format(parent.span_id, "016x") if parent else None,
            "kind": span.kind.name.lower(),
            "start_time_unix_nano": span.start_time,
            "end_time_unix_nano": span.end_time,
            "status": span.status.status_code.name.lower(),
            "attributes": dict(span.attributes or {}),
            "service.name": (span.resource.attributes.get("service.name") if span.resource else None),
            "rl.role": (span.resource.attributes.get("rl.role") if span.resource else None),
        }

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            lines = "".join(json.dumps(self.span_to_dict(s), default=str) + "\n" for s in spans)
            with self._lock:
                self._fh.write(lines)
                self._fh.flush()
            return SpanExportResult.SUCCESS
        except Exception:  # noqa: BLE001 - a full disk must not crash the host
            _log.exception("weightwatch: writing spans to %s failed", self.path)
            return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class _CountingExporter(SpanExporter):
    """Counts what an exporter accepted and refused, so a dead collector is visible, not silent."""

    def __init__(self, inner: SpanExporter, name: str, counter: Counter):
        self.inner, self.name, self.counter = inner, name, counter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:  # noqa: BLE001
            _log.debug("weightwatch: exporter %s raised", self.name, exc_info=True)
            result = SpanExportResult.FAILURE
        outcome = "success" if result == SpanExportResult.SUCCESS else "failure"
        self.counter.labels(exporter=self.name, result=outcome).inc(len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _DropCountingBatchProcessor(BatchSpanProcessor):
    """BatchSpanProcessor whose queue drops are counted in a Prometheus counter."""

    def __init__(self, exporter: SpanExporter, name: str, dropped: Counter, **kwargs: Any):
        super().__init__(exporter, **kwargs)
        self._ww_name, self._ww_dropped = name, dropped
        inner = getattr(self, "_batch_processor", None)
        self._ww_queue = getattr(inner, "_queue", None)
        self._ww_max = getattr(inner, "_max_queue_size", None)

    def on_end(self, span: ReadableSpan) -> None:
        q = self._ww_queue
        if q is not None and self._ww_max is not None and len(q) >= self._ww_max:
            self._ww_dropped.labels(exporter=self._ww_name).inc()
        super().on_end(span)


def _otlp_exporter_from_env() -> SpanExporter | None:
    """An OTLP span exporter when the standard variables ask for one, else None."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return None
    if not (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return None
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").lower()
    timeout = None
    if not (env.get("OTEL_EXPORTER_OTLP_TIMEOUT") or env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")):
        timeout = DEFAULT_EXPORT_TIMEOUT_S
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
        return OTLPSpanExporter(timeout=timeout) if timeout else OTLPSpanExporter()
    except Exception:  # noqa: BLE001 - a missing exporter package must not stop training
        _log.warning("weightwatch: cannot build the OTLP %s exporter; spans go nowhere", protocol, exc_info=True)
        return None


# --------------------------------------------------------------------------- metrics


def _build_metric(spec: MetricSpec, registry: CollectorRegistry) -> Any:
    kwargs: dict[str, Any] = {"registry": registry, "labelnames": spec.labels}
    if spec.unit and spec.name.removesuffix("_total").endswith("_" + spec.unit):
        kwargs["unit"] = spec.unit
    if spec.type == "histogram":
        return Histogram(spec.name, spec.help, buckets=spec.buckets or Histogram.DEFAULT_BUCKETS, **kwargs)
    if spec.type == "gauge":
        return Gauge(spec.name, spec.help, **kwargs)
    return Counter(spec.name, spec.help, **kwargs)


class Metrics:
    """The catalogue's metrics on one explicit registry; created on first use, exemplars attached."""

    def __init__(self, registry: CollectorRegistry, eager_roles: Sequence[str] = ()):
        self.registry = registry
        self._metrics: dict[str, Any] = {}
        self._lock = threading.Lock()
        for spec in METRICS:
            if spec.role in eager_roles or spec.role == "internal":
                self.get(spec.name)

    def get(self, name: str) -> Any:
        metric = self._metrics.get(name)
        if metric is not None:
            return metric
        spec = METRICS_BY_NAME[name]  # KeyError for names outside the catalogue: a bug, caught in tests
        with self._lock:
            metric = self._metrics.get(name)
            if metric is None:
                try:
                    metric = _build_metric(spec, self.registry)
                except ValueError:
                    # Already registered in a shared registry (vLLM's default one) by an earlier instance.
                    collector = getattr(self.registry, "_names_to_collectors", {}).get(name.removesuffix("_total"))
                    if collector is None:
                        raise
                    metric = collector
                self._metrics[name] = metric
        return metric

    def _child(self, name: str, labels: dict[str, str]) -> Any:
        metric = self.get(name)
        return metric.labels(**labels) if labels else metric

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Observe a histogram value; the active span's trace id becomes the exemplar."""
        try:
            self._child(name, labels).observe(max(0.0, float(value)), exemplar=_exemplar())
        except Exception:  # noqa: BLE001
            _log.warning("weightwatch: cannot observe %s%s", name, labels, exc_info=True)

    def set(self, name: str, value: float, **labels: str) -> None:
        try:
            self._child(name, labels).set(float(value))
        except Exception:  # noqa: BLE001
            _log.warning("weightwatch: cannot set %s%s", name, labels, exc_info=True)

    def set_function(self, name: str, fn: Any, **labels: str) -> None:
        """Make a gauge child read ``fn()`` at scrape time (a value that grows with no thread to update it)."""
        try:
            self._child(name, labels).set_function(fn)
        except Exception:  # noqa: BLE001
            _log.warning("weightwatch: cannot bind %s%s to a function", name, labels, exc_info=True)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        try:
            child = self._child(name, labels)
            if METRICS_BY_NAME[name].type == "counter":
                child.inc(amount, exemplar=_exemplar())
            else:
                child.inc(amount)
        except Exception:  # noqa: BLE001
            _log.warning("weightwatch: cannot increment %s%s", name, labels, exc_info=True)

    def dec(self, name: str, amount: float = 1.0, **labels: str) -> None:
        try:
            self._child(name, labels).dec(amount)
        except Exception:  # noqa: BLE001
            _log.warning("weightwatch: cannot decrement %s%s", name, labels, exc_info=True)


# --------------------------------------------------------------------------- the per-process object


@dataclass
class Telemetry:
    """What ``setup`` built for this process."""

    service_name: str
    role: str
    registry: CollectorRegistry
    metrics: Metrics
    tracer_provider: TracerProvider
    metrics_port: int | None = None
    metrics_addr: str = "0.0.0.0"
    span_file: Path | None = None
    log_file: Path | None = None
    exporters: list[str] = field(default_factory=list)
    _server: Any = None
    _handlers: list[logging.Handler] = field(default_factory=list)
    provisional: bool = False

    def tracer(self, name: str = "weightwatch") -> trace.Tracer:
        return self.tracer_provider.get_tracer(name)

    def force_flush(self, timeout_millis: int = 5000) -> bool:
        try:
            return self.tracer_provider.force_flush(timeout_millis)
        except Exception:  # noqa: BLE001
            return False

    def shutdown(self) -> None:
        """Flush spans (bounded), stop the metrics server, remove our log handlers."""
        try:
            self.tracer_provider.shutdown()
        except Exception:  # noqa: BLE001
            _log.debug("weightwatch: tracer shutdown failed", exc_info=True)
        if self._server is not None:
            try:
                self._server.shutdown()
                self._server.server_close()
            except Exception:  # noqa: BLE001
                pass
            self._server = None
        root = logging.getLogger("weightwatch")
        for h in self._handlers:
            root.removeHandler(h)
            h.close()
        self._handlers.clear()


_lock = threading.Lock()
_current: Telemetry | None = None


def _start_metrics_server(port: int, addr: str, registry: CollectorRegistry) -> tuple[Any, int]:
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server, int(server.server_address[1])


def setup(
    service_name: str | None = None,
    role: str = "orchestrator",
    *,
    metrics_port: int | None = None,
    metrics_addr: str = "0.0.0.0",
    span_file: str | os.PathLike[str] | None = None,
    log_file: str | os.PathLike[str] | None = None,
    log_to_stderr: bool = False,
    registry: CollectorRegistry | None = None,
    set_global_tracer_provider: bool = True,
    max_queue_size: int | None = None,
    resource_attributes: dict[str, str] | None = None,
) -> Telemetry:
    """Build this process's telemetry once; later calls return the same object.

    * traces: an OTLP exporter when ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` is set, a JSON-lines file when
      ``span_file`` (or ``WEIGHTWATCH_SPAN_FILE``) is given, nothing otherwise;
    * metrics: the catalogue's metrics on ``registry`` (a fresh explicit one by default), served on
      ``metrics_port`` (0 picks a free port; None serves nothing: the host exposes the registry itself);
    * logs: events go to the ``weightwatch.<role>`` loggers; ``log_file`` / ``log_to_stderr`` add handlers.
    """
    global _current
    with _lock:
        if _current is not None and not _current.provisional:
            if service_name and service_name != _current.service_name:
                _log.debug("weightwatch.setup called again (%s); keeping %s", service_name, _current.service_name)
            return _current
        if _current is not None and _current.provisional:
            _current.shutdown()
            _current = None
        tele = _build(
            service_name=service_name or os.environ.get("OTEL_SERVICE_NAME") or f"weightwatch-{role}",
            role=role,
            metrics_port=metrics_port,
            metrics_addr=metrics_addr,
            span_file=span_file or os.environ.get("WEIGHTWATCH_SPAN_FILE") or None,
            log_file=log_file,
            log_to_stderr=log_to_stderr,
            registry=registry,
            set_global=set_global_tracer_provider,
            max_queue_size=max_queue_size,
            resource_attributes=resource_attributes or {},
        )
        _current = tele
        return tele


def _build(
    *,
    service_name: str,
    role: str,
    metrics_port: int | None,
    metrics_addr: str,
    span_file: str | os.PathLike[str] | None,
    log_file: str | os.PathLike[str] | None,
    log_to_stderr: bool,
    registry: CollectorRegistry | None,
    set_global: bool,
    max_queue_size: int | None,
    resource_attributes: dict[str, str],
    provisional: bool = False,
) -> Telemetry:
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry, eager_roles=(role,))
    attrs = {
        "service.name": service_name,
        "service.instance.id": f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
        "rl.role": role,
    }
    attrs.update(resource_attributes)
    provider = TracerProvider(resource=Resource.create(attrs))
    exporters: list[str] = []
    exported = metrics.get("weightwatch_spans_exported_total")
    dropped = metrics.get("weightwatch_spans_dropped_total")
    otlp = _otlp_exporter_from_env()
    if otlp is not None:
        provider.add_span_processor(
            _DropCountingBatchProcessor(_CountingExporter(otlp, "otlp", exported), "otlp", dropped, max_queue_size=max_queue_size)
        )
        exporters.append("otlp")
    span_path = Path(span_file) if span_file else None
    if span_path is not None:
        file_exporter = JsonLinesSpanExporter(span_path)
        provider.add_span_processor(
            _DropCountingBatchProcessor(
                _CountingExporter(file_exporter, "file", exported), "file", dropped, max_queue_size=max_queue_size, schedule_delay_millis=500
            )
        )
        exporters.append("file")
    if set_global and not provisional:
        _set_global_tracer_provider(provider)

    handlers: list[logging.Handler] = []
    root = logging.getLogger("weightwatch")
    if log_file or log_to_stderr:
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        fmt = logging.Formatter(LOG_FORMAT)
        if log_file:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_file, encoding="utf-8")
            fh.setFormatter(fmt)
            handlers.append(fh)
        if log_to_stderr:
            sh = logging.StreamHandler()
            sh.setFormatter(fmt)
            handlers.append(sh)
        for h in handlers:
            root.addHandler(h)

    tele = Telemetry(
        service_name=service_name,
        role=role,
        registry=registry,
        metrics=metrics,
        tracer_provider=provider,
        metrics_addr=metrics_addr,
        span_file=span_path,
        log_file=Path(log_file) if log_file else None,
        exporters=exporters,
        _handlers=handlers,
        provisional=provisional,
    )
    if metrics_port is not None:
        try:
            tele._server, tele.metrics_port = _start_metrics_server(metrics_port, metrics_addr, registry)
        except OSError:
            _log.warning("weightwatch: cannot serve /metrics on %s:%s; metrics are still recorded", metrics_addr, metrics_port, exc_info=True)
    return tele


def _set_global_tracer_provider(provider: TracerProvider) -> None:
    """Install the provider globally; OTel allows this once per process, so later ones are ignored."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        _log.debug("weightwatch: a global tracer provider exists already; ours is used through get().tracer()")
        return
    trace.set_tracer_provider(provider)


def get() -> Telemetry:
    """This process's telemetry; a provisional one (no exporters, no server) until ``setup`` runs."""
    global _current
    tele = _current
    if tele is not None:
        return tele
    with _lock:
        if _current is None:
            _current = _build(
                service_name=os.environ.get("OTEL_SERVICE_NAME") or "weightwatch",
                role="unknown",
                metrics_port=None,
                metrics_addr="0.0.0.0",
                span_file=None,
                log_file=None,
                log_to_stderr=False,
                registry=None,
                set_global=False,
                max_queue_size=None,
                resource_attributes={},
                provisional=True,
            )
        return _current


def shutdown() -> None:
    """Flush and tear down (tests, or a host that wants a clean exit); the next setup builds anew."""
    global _current
    with _lock:
        tele, _current = _current, None
    if tele is not None:
        tele.shutdown()


# --------------------------------------------------------------------------- event-loop lag


async def _probe_loop_lag(metric: str, interval: float) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval)
        get().metrics.observe(metric, max(0.0, loop.time() - start - interval))


#: How often the event-loop lag probes wake, s: often enough to catch a stall, rare enough to cost nothing.
LAG_PROBE_INTERVAL_S = 0.1


def start_loop_lag_probe(metric: str = "rl_event_loop_lag_seconds", interval: float = LAG_PROBE_INTERVAL_S) -> Any:
    """Start a cheap periodic probe on the running asyncio loop; returns the task (cancel to stop).

    A sleep that wakes late measures how long callbacks hog the loop: the same delay an admin
    request on that loop suffers before its handler runs.
    """
    import asyncio

    task = asyncio.get_running_loop().create_task(_probe_loop_lag(metric, interval), name=f"weightwatch-{metric}")
    return task
