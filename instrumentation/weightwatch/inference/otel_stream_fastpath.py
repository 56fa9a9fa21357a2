"""OpenTelemetry on the generation path at the cost it has to have, and not more.

Two shortcuts around OpenTelemetry's FastAPI instrumentation, both installed only where they are exactly
equivalent to what OpenTelemetry alone does:

* **Streamed chunks skip the per-message wrappers.** FastAPI's instrumentation builds
  ``ServerErrorMiddleware -> OpenTelemetryMiddleware -> ServerErrorMiddleware -> app``; the outer two wrap
  ``send`` and run for every message. With send spans excluded (as the plugin configures it) neither does
  anything for a body chunk in the middle of a stream: OpenTelemetry reads the status from
  ``http.response.start`` and ends the span on the last body message; the outer error middleware only notes
  that the response started. Yet together they cost about 1 µs of API-server CPU per streamed token
  (benchmarks/bench_inference_overhead.py). Middle chunks go straight to the server's ``send``; the start
  message, the final chunk and every non-streamed response still pass through OpenTelemetry unchanged:
  same spans, same status, same metrics.
* **Requests the middleware marks untraced skip OpenTelemetry altogether** (``SCOPE_UNTRACED``; the
  first-byte middleware sets it by the generation-tracing policy, see ``config.TRACE_GENERATION_POLICIES``).
  They run the stack OpenTelemetry wrapped, i.e. exactly vLLM's own, with no span, no per-request
  attribute collection and nothing to export.

Both need the layers above OpenTelemetry to be the error middleware FastAPI's instrumentation adds (or none)
and, for the first, send spans excluded and no response propagator (which would inject headers into every
message); otherwise the stack is left as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

_log = logging.getLogger("weightwatch.inference")

Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[..., Any]

#: Scope key carrying the server's own ``send`` (given to the top of the stack) down to just below OpenTelemetry.
SCOPE_OUTER_SEND = "weightwatch.otel_outer_send"
#: Scope flag: serve this request without OpenTelemetry (set by the first-byte middleware).
SCOPE_UNTRACED = "weightwatch.untraced"
#: How deep to look for OpenTelemetry's middleware in a built Starlette stack (it sits one level down).
_MAX_DEPTH = 4


def _response_propagator_set() -> bool:
    try:
        from opentelemetry.instrumentation.propagators import get_global_response_propagator
    except Exception:  # noqa: BLE001
        return False
    return get_global_response_propagator() is not None


class OtelStreamFastPath:
    """Sits on top of a built stack whose OpenTelemetry middleware it found; routes around it as above."""

    def __init__(self, stack: ASGIApp, otel_middleware: Any) -> None:
        self.stack = stack
        self.otel = otel_middleware
        #: What OpenTelemetry wraps: FastAPI's own stack (error middleware, user middleware, router).
        self.inner: ASGIApp = otel_middleware.app
        self.chunks_skip_otel = bool(getattr(otel_middleware, "exclude_send_span", False))
        if self.chunks_skip_otel:
            otel_middleware.app = self._below_otel

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope.get("type") == "http":
            if scope.get(SCOPE_UNTRACED):
                await self.inner(scope, receive, send)
                return
            if self.chunks_skip_otel:
                scope[SCOPE_OUTER_SEND] = send
        await self.stack(scope, receive, send)

    def _below_otel(self, scope: dict[str, Any], receive: Any, send: Send) -> Awaitable[None]:
        outer: Send | None = scope.pop(SCOPE_OUTER_SEND, None)
        if outer is None or _response_propagator_set():
            # Not HTTP, or a propagator that must see every message.
            return self.inner(scope, receive, send)

        # A plain function handing back the callee's awaitable: no coroutine frame of its own per chunk.
        def send_chunk(message: dict[str, Any]) -> Awaitable[None]:
            if message["type"] == "http.response.body" and message.get("more_body", False):
                return outer(message)
            return send(message)

        return self.inner(scope, receive, send_chunk)


def _only_error_middleware_above(path: list[Any]) -> bool:
    """True when every layer above OpenTelemetry is Starlette's ServerErrorMiddleware, which passes body
    chunks through untouched (it only notes that the response started) and only catches what OpenTelemetry
    itself might raise."""
    try:
        from starlette.middleware.errors import ServerErrorMiddleware
    except Exception:  # noqa: BLE001
        return False
    return all(type(node) is ServerErrorMiddleware for node in path)


def install(stack: Any) -> Any:
    """Put the fast path on top of a built middleware ``stack``; returns the stack to serve.

    Leaves the stack as it is when OpenTelemetry is not in it or sits below layers other than FastAPI
    instrumentation's error middleware.
    """
    try:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    except Exception:  # noqa: BLE001
        return stack
    above: list[Any] = []
    node = stack
    for _ in range(_MAX_DEPTH):
        if isinstance(node, OpenTelemetryMiddleware):
            if not _only_error_middleware_above(above):
                _log.debug("weightwatch: unexpected layers above OpenTelemetry's middleware; no fast path")
                return stack
            _log.debug("weightwatch: streamed chunks and untraced requests skip OpenTelemetry's wrappers")
            return OtelStreamFastPath(stack, node)
        above.append(node)
        node = getattr(node, "app", None)
        if node is None:
            break
    return stack
