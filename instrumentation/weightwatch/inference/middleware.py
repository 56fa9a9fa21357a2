"""Pure ASGI middleware: first byte of each request, in-flight requests per lane.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so streamed completions pass through chunk by chunk,
never buffered, and the per-request cost is a few dict operations. The first-byte time is the moment
the server hands the request to the application: anything later (handler start, engine call) is
measured against it, and ``server_ms`` starts here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from weightwatch import events, telemetry
from weightwatch.catalogue import LANES
from weightwatch.inference.config import TRACE_GENERATION_POLICIES
from weightwatch.inference.otel_stream_fastpath import SCOPE_UNTRACED

Scope = dict[str, Any]
ASGIApp = Callable[..., Any]

#: Keys this middleware puts into the ASGI scope for the handlers behind it.
SCOPE_RECV_WALL = "weightwatch.recv_t"  # Unix seconds at first byte
SCOPE_RECV_PERF = "weightwatch.recv_perf"  # time.perf_counter() at first byte
SCOPE_TRACE_ID = "weightwatch.traceparent_trace_id"  # 32 hex from the incoming traceparent, or None
SCOPE_LANE = "weightwatch.lane"

_INFLIGHT = "rl_http_inflight_requests"


def trace_id_from_traceparent(value: str | bytes | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header (``00-<32 hex>-<16 hex>-<2 hex>``), or None if invalid."""
    if not value:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("latin-1")
        except Exception:  # noqa: BLE001
            return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    tid = parts[1].lower()
    try:
        int(tid, 16)
        int(parts[2], 16)
    except ValueError:
        return None
    if tid == "0" * 32 or parts[2] == "0" * 16:
        return None
    return tid


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value
    return None


class FirstByteMiddleware:
    """Stamps each HTTP request when it reaches the app, counts it in flight on its lane, and emits
    ``server.recv`` (with the incoming ``traceparent``'s trace id) for traced admin requests.

    ``admin_paths`` decide the lane; ``quiet_paths`` (health checks, scrapes) are counted but emit
    nothing. ``lane`` forces every request onto one lane (the separate admin listener).
    ``trace_generation`` (one of TRACE_GENERATION_POLICIES) marks the generation requests that should skip
    OpenTelemetry; the fast path installed by ``wrap_outermost`` acts on the mark.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        admin_paths: Iterable[str] = (),
        quiet_paths: Iterable[str] = (),
        lane: str | None = None,
        trace_generation: str = "all",
    ) -> None:
        if lane is not None and lane not in LANES:
            raise ValueError(f"lane must be one of {LANES}, got {lane!r}")
        if trace_generation not in TRACE_GENERATION_POLICIES:
            raise ValueError(f"trace_generation must be one of {TRACE_GENERATION_POLICIES}, got {trace_generation!r}")
        self.trace_generation = trace_generation
        self.app = app
        self.admin_paths = frozenset(admin_paths)
        self.quiet_paths = frozenset(quiet_paths)
        self.lane = lane
        self._metrics = telemetry.get().metrics
        # Pre-create both lane children so a scrape shows 0 rather than nothing.
        for name in LANES:
            self._metrics.set(_INFLIGHT, 0, lane=name)

    async def __call__(self, scope: Scope, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        recv_t = time.time()
        recv_perf = time.perf_counter()
        path = scope.get("path", "")
        lane = self.lane or ("admin" if path in self.admin_paths else "inference")
        # Only admin requests belong to the [weights] path (their handler and server.recv read the trace
        # id); generation requests emit nothing, so they never look like weight updates with a missing
        # client half to the analyzer. Their traceparent only decides whether OpenTelemetry sees them.
        tid = None
        if lane == "admin":
            tid = trace_id_from_traceparent(_header(scope, b"traceparent"))
        elif self.trace_generation == "off" or (
            self.trace_generation == "parent" and trace_id_from_traceparent(_header(scope, b"traceparent")) is None
        ):
            # No caller's trace to join: a root span per generation request is noise in the trace store and
            # costs the front end ~100 us of CPU per request (docs/inference.md, Instrumentation cost).
            scope[SCOPE_UNTRACED] = True
        scope[SCOPE_RECV_WALL] = recv_t
        scope[SCOPE_RECV_PERF] = recv_perf
        scope[SCOPE_TRACE_ID] = tid
        scope[SCOPE_LANE] = lane
        if tid is not None and path not in self.quiet_paths:
            events.emit("weights.server.recv", tid, path=path, t=recv_t, lane=lane)
        metrics = telemetry.get().metrics
        metrics.inc(_INFLIGHT, lane=lane)
        try:
            await self.app(scope, receive, send)
        finally:
            metrics.dec(_INFLIGHT, lane=lane)


def wrap_outermost(app: Any, *, otel_fast_path: bool = True, **kwargs: Any) -> None:
    """Put FirstByteMiddleware outside every other middleware of a Starlette/FastAPI ``app``.

    ``add_middleware`` would place it inside middleware added later (vLLM adds CORS and others after
    plugins run, and OTel wraps the whole stack); wrapping ``build_middleware_stack`` makes it the
    first code that sees a request. OpenTelemetry's middleware, if any, gets the fast path
    (``otel_stream_fastpath``): streamed chunks skip its wrappers, untraced requests skip it entirely. Without
    the fast path every request is traced, whatever ``trace_generation`` says.
    """
    from weightwatch.inference import otel_stream_fastpath

    original = app.build_middleware_stack

    def build_middleware_stack() -> Any:
        stack = original()
        return FirstByteMiddleware(otel_stream_fastpath.install(stack) if otel_fast_path else stack, **kwargs)

    app.build_middleware_stack = build_middleware_stack
