"""Streamed completions skip OpenTelemetry's per-message ``send`` wrapper between the first and last chunk.

OpenTelemetry's ASGI middleware wraps ``send`` and runs its wrapper for every message. With send spans
excluded (as the plugin configures it), the wrapper does nothing for a body chunk in the middle of a
stream: it reads the status from ``http.response.start``, and ends the server span on the last body
message. Yet it costs about 2 µs of API-server CPU per streamed token, which is most of weightwatch's
per-token cost (benchmarks/bench_inference_overhead.py). This module hands the middle chunks to the
``send`` that OpenTelemetry itself was given, so the start message, the final chunk and everything
outside streaming still pass through OpenTelemetry unchanged: same spans, same status, same metrics.

Installed only when it is exactly equivalent: send spans excluded and no response propagator (which
would inject headers into every message).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

_log = logging.getLogger("weightwatch.inference")

Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[..., Any]

#: Scope key carrying the ``send`` OpenTelemetry's middleware was called with, down to just below it.
SCOPE_OUTER_SEND = "weightwatch.otel_outer_send"
#: How deep to look for OpenTelemetry's middleware in a built Starlette stack (it sits one level down).
_MAX_DEPTH = 4


def _response_propagator_set() -> bool:
    try:
        from opentelemetry.instrumentation.propagators import get_global_response_propagator
    except Exception:  # noqa: BLE001
        return False
    return get_global_response_propagator() is not None


class OtelStreamFastPath:
    """Wraps one ``OpenTelemetryMiddleware`` in place: records the outer ``send`` on the way in and, below
    the middleware, routes middle-of-stream body chunks to it."""

    def __init__(self, otel_middleware: Any) -> None:
        self.otel = otel_middleware
        self.inner: ASGIApp = otel_middleware.app
        otel_middleware.app = self._below_otel

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope.get("type") == "http":
            scope[SCOPE_OUTER_SEND] = send
        await self.otel(scope, receive, send)

    async def _below_otel(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        outer: Send | None = scope.pop(SCOPE_OUTER_SEND, None)
        if outer is None or outer is send or _response_propagator_set():
            # Not HTTP, an excluded URL (OpenTelemetry passed ``send`` through untouched), or a
            # propagator that must see every message.
            await self.inner(scope, receive, send)
            return

        async def send_chunk(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and message.get("more_body", False):
                await outer(message)
            else:
                await send(message)

        await self.inner(scope, receive, send_chunk)


def install(stack: Any) -> Any:
    """Wrap OpenTelemetry's ASGI middleware inside a built middleware ``stack``; returns the stack to serve.

    Leaves the stack as it is when OpenTelemetry is not in it or records per-message send spans.
    """
    try:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    except Exception:  # noqa: BLE001
        return stack
    parent, node = None, stack
    for _ in range(_MAX_DEPTH):
        if isinstance(node, OpenTelemetryMiddleware):
            if not getattr(node, "exclude_send_span", False):
                return stack
            fast = OtelStreamFastPath(node)
            _log.debug("weightwatch: streamed chunks skip OpenTelemetry's send wrapper")
            if parent is None:
                return fast
            parent.app = fast
            return stack
        parent, node = node, getattr(node, "app", None)
        if node is None:
            break
    return stack
