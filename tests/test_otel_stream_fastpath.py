"""The streaming fast path: OpenTelemetry's send wrapper sees only the start and the end of a stream,
and the spans, statuses and bodies stay what OpenTelemetry alone produces (real uvicorn on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from starlette.responses import StreamingResponse

import weightwatch
from test_inference_unit import _Server
from weightwatch.inference import otel_stream_fastpath
from weightwatch.inference.middleware import wrap_outermost

CHUNKS = 40


@pytest.fixture
def otel_send_calls(monkeypatch, telemetry_reset):
    """Counts the messages that pass through OpenTelemetry's own send wrapper, per request path."""
    weightwatch.setup(role="inference", registry=CollectorRegistry(), set_global_tracer_provider=False)
    calls: dict[str, int] = {}
    original = OpenTelemetryMiddleware._get_otel_send

    def counting(self, server_span, server_span_name, scope, send, duration_attrs):  # type: ignore[no-untyped-def]
        otel_send = original(self, server_span, server_span_name, scope, send, duration_attrs)
        path = scope["path"]

        async def counted(message):  # type: ignore[no-untyped-def]
            calls[path] = calls.get(path, 0) + 1
            await otel_send(message)

        return counted

    monkeypatch.setattr(OpenTelemetryMiddleware, "_get_otel_send", counting)
    return calls


def _app(exclude_spans: list[str] | None, release: threading.Event) -> tuple[FastAPI, InMemorySpanExporter]:
    app = FastAPI()

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body():  # type: ignore[no-untyped-def]
            yield b"first;"
            released = await asyncio.to_thread(release.wait, 10)  # a buffering path never lets the client see "first;"
            for i in range(CHUNKS - 1):
                yield f"{i};".encode() if released else b"timeout;"

        return StreamingResponse(body(), media_type="text/event-stream")

    @app.get("/plain")
    async def plain() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/missing-status")
    async def teapot() -> StreamingResponse:
        async def body():  # type: ignore[no-untyped-def]
            yield b"a"
            yield b"b"

        return StreamingResponse(body(), status_code=418)

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, exclude_spans=exclude_spans)
    wrap_outermost(app, admin_paths={"/update_weights"}, quiet_paths={"/health"})
    return app, exporter


def _server_spans(exporter: InMemorySpanExporter) -> dict[str, object]:
    return {s.attributes.get("http.route") or s.name: s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"}


def _fetch_stream(url: str, release: threading.Event) -> bytes:
    with httpx.Client(timeout=15) as client, client.stream("GET", f"{url}/stream") as resp:
        chunks = resp.iter_raw()
        assert next(chunks) == b"first;"
        release.set()
        return b"first;" + b"".join(chunks)


def test_middle_chunks_skip_otel_and_spans_are_unchanged(otel_send_calls):
    release = threading.Event()
    app, exporter = _app(["receive", "send"], release)
    with _Server(app) as url:
        body = _fetch_stream(url, release)
        plain = httpx.get(f"{url}/plain", timeout=15)
        teapot = httpx.get(f"{url}/missing-status", timeout=15)

    assert body == b"first;" + b"".join(f"{i};".encode() for i in range(CHUNKS - 1))
    assert plain.json() == {"ok": "yes"} and teapot.status_code == 418 and teapot.content == b"ab"
    # start + final (empty) body message only; the CHUNKS middle chunks bypass the wrapper
    assert otel_send_calls["/stream"] == 2
    assert otel_send_calls["/plain"] == 2  # a plain response is start + one final body: nothing skipped
    spans = _server_spans(exporter)
    assert spans["/stream"].attributes["http.status_code"] == 200
    assert spans["/missing-status"].attributes["http.status_code"] == 418
    assert spans["/plain"].attributes["http.status_code"] == 200
    # The stream's span ends with the stream, after the last chunk: not at the first byte.
    assert spans["/stream"].end_time is not None and spans["/stream"].end_time > spans["/stream"].start_time
    assert not any(s.name.endswith("http send") for s in exporter.get_finished_spans())


def test_with_send_spans_every_message_still_goes_through_otel(otel_send_calls):
    release = threading.Event()
    app, exporter = _app(None, release)
    with _Server(app) as url:
        _fetch_stream(url, release)
    assert otel_send_calls["/stream"] == CHUNKS + 2
    assert sum(1 for s in exporter.get_finished_spans() if s.name.endswith("http send")) == CHUNKS + 2


def test_a_response_propagator_keeps_every_message_on_otel(otel_send_calls):
    from opentelemetry.instrumentation.propagators import TraceResponsePropagator, set_global_response_propagator

    release = threading.Event()
    app, _ = _app(["receive", "send"], release)
    set_global_response_propagator(TraceResponsePropagator())
    try:
        with _Server(app) as url:
            _fetch_stream(url, release)
    finally:
        set_global_response_propagator(None)  # type: ignore[arg-type]
    assert otel_send_calls["/stream"] == CHUNKS + 2


def test_install_leaves_stacks_without_otel_alone():
    class Leaf:
        async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
            return None

    leaf = Leaf()
    assert otel_stream_fastpath.install(leaf) is leaf
    bare = OpenTelemetryMiddleware(leaf, exclude_spans=["send"])
    wrapped = otel_stream_fastpath.install(bare)
    assert isinstance(wrapped, otel_stream_fastpath.OtelStreamFastPath) and wrapped.otel is bare
    with_send_spans = OpenTelemetryMiddleware(leaf)
    assert otel_stream_fastpath.install(with_send_spans) is with_send_spans
