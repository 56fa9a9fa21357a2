"""The streaming fast path: OpenTelemetry's send wrapper sees only the start and the end of a stream,
and the spans, statuses and bodies stay what OpenTelemetry alone produces (real uvicorn on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
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


def _app(exclude_spans: list[str] | None, release: threading.Event, trace_generation: str = "all") -> tuple[FastAPI, InMemorySpanExporter]:
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
        return {"ok": "yes", "span_recording": str(trace.get_current_span().is_recording())}

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
    wrap_outermost(app, admin_paths={"/update_weights"}, quiet_paths={"/health"}, trace_generation=trace_generation)
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
    assert plain.json() == {"ok": "yes", "span_recording": "True"} and teapot.status_code == 418 and teapot.content == b"ab"
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
    from starlette.middleware.errors import ServerErrorMiddleware

    class Leaf:
        async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
            return None

    leaf = Leaf()
    assert otel_stream_fastpath.install(leaf) is leaf
    bare = OpenTelemetryMiddleware(leaf, exclude_spans=["send"])
    wrapped = otel_stream_fastpath.install(bare)
    assert isinstance(wrapped, otel_stream_fastpath.OtelStreamFastPath) and wrapped.otel is bare and wrapped.chunks_skip_otel
    # FastAPI instrumentation's shape: its error middleware on top of OpenTelemetry's.
    shaped = ServerErrorMiddleware(OpenTelemetryMiddleware(leaf, exclude_spans=["send"]))
    assert isinstance(otel_stream_fastpath.install(shaped), otel_stream_fastpath.OtelStreamFastPath)
    # Send spans on: untraced requests may still skip OpenTelemetry, but every chunk of a traced one goes through it.
    with_send_spans = OpenTelemetryMiddleware(leaf)
    fast = otel_stream_fastpath.install(with_send_spans)
    assert not fast.chunks_skip_otel and with_send_spans.app is leaf

    class Unknown:  # a layer we cannot vouch for above OpenTelemetry: leave the stack alone
        def __init__(self, app):  # type: ignore[no-untyped-def]
            self.app = app

    unknown = Unknown(OpenTelemetryMiddleware(leaf, exclude_spans=["send"]))
    assert otel_stream_fastpath.install(unknown) is unknown


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("policy", "traced_without_parent", "traced_with_parent"),
    [("parent", False, True), ("all", True, True), ("off", False, False)],
)
def test_generation_tracing_policy(telemetry_reset, policy, traced_without_parent, traced_with_parent):
    weightwatch.setup(role="inference", registry=CollectorRegistry(), set_global_tracer_provider=False)
    release = threading.Event()
    release.set()
    app, exporter = _app(["receive", "send"], release, trace_generation=policy)
    with _Server(app) as url:
        bare = httpx.get(f"{url}/plain", timeout=15)
        spans_bare = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
        exporter.clear()
        joined = httpx.get(f"{url}/plain", headers={"traceparent": TRACEPARENT}, timeout=15)
        spans_joined = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
        exporter.clear()
        garbage = httpx.get(f"{url}/plain", headers={"traceparent": "00-not-a-trace"}, timeout=15)
        spans_garbage = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
        exporter.clear()
        streamed = httpx.get(f"{url}/stream", timeout=15)
        teapot = httpx.get(f"{url}/missing-status", timeout=15)

    # Traced or not, the responses are the application's own.
    for resp in (bare, joined, garbage):
        assert resp.status_code == 200 and resp.json()["ok"] == "yes"
    assert streamed.content == b"first;" + b"".join(f"{i};".encode() for i in range(CHUNKS - 1))
    assert teapot.status_code == 418 and teapot.content == b"ab"
    assert bare.json()["span_recording"] == str(traced_without_parent)
    assert joined.json()["span_recording"] == str(traced_with_parent)
    assert len(spans_bare) == int(traced_without_parent)
    assert len(spans_garbage) == int(traced_without_parent)  # an unusable traceparent is no parent
    assert len(spans_joined) == int(traced_with_parent)
    if traced_with_parent:
        (span,) = spans_joined
        assert format(span.context.trace_id, "032x") == TRACEPARENT.split("-")[1]
        assert span.parent is not None and format(span.parent.span_id, "016x") == TRACEPARENT.split("-")[2]


def test_middle_chunks_skip_every_wrapper_above_the_app(telemetry_reset, monkeypatch):
    """The chunks between the first and the last reach the server's send with no wrapper of
    OpenTelemetry's or of the error middleware FastAPI's instrumentation adds in between."""
    from starlette.middleware import errors

    weightwatch.setup(role="inference", registry=CollectorRegistry(), set_global_tracer_provider=False)
    error_middleware_sends = {"n": 0}
    original = errors.ServerErrorMiddleware.__call__

    async def counting(self, scope, receive, send):  # type: ignore[no-untyped-def]
        async def counted(message):  # type: ignore[no-untyped-def]
            error_middleware_sends["n"] += 1
            await send(message)

        await original(self, scope, receive, counted)

    monkeypatch.setattr(errors.ServerErrorMiddleware, "__call__", counting)
    release = threading.Event()
    app, exporter = _app(["receive", "send"], release)
    with _Server(app) as url:
        body = _fetch_stream(url, release)
    assert body == b"first;" + b"".join(f"{i};".encode() for i in range(CHUNKS - 1))
    # Two error middlewares (FastAPI's own below OpenTelemetry, the instrumentation's above it): the inner one
    # sees every message (CHUNKS + start + final), the outer one only the start and the final message.
    assert error_middleware_sends["n"] == (CHUNKS + 2) + 2
    assert _server_spans(exporter)["/stream"].attributes["http.status_code"] == 200
