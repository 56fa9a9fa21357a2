"""Where the numbers of one admin call come from: the server's answer and httpcore's trace events.

* ``server_ms``/``rpc_ms``: the JSON answer (``{"server_ms": .., "rpc_ms": ..}``) or, when the body
  lacks them, the ``Server-Timing`` header (``server;dur=12.5, rpc;dur=9.8``). A server without
  weightwatch sends neither; then they are ``None``, never guessed.
* ``pool_wait_ms``: httpx passes a ``trace`` callback down to httpcore, which reports
  ``connection.connect_tcp.started`` (a new connection) or ``http11.send_request_headers.started``
  (a pooled one) once the request owns a connection. The time from handing the request to the
  client until the first of those is the wait for a pool slot (plus microseconds of client code).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from typing import Any

from weightwatch.contracts import TIMING_RPC, TIMING_SERVER

#: Server-Timing metric names read as the server's own handling time, in order of preference.
SERVER_METRIC_NAMES = (TIMING_SERVER, "total", "app", "admin")
#: Server-Timing metric names read as the engine call time.
RPC_METRIC_NAMES = (TIMING_RPC, "engine", "engine.rpc", "engine_rpc")

_ENTRY = re.compile(r"\s*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)\s*((?:;[^,]*)?)")
_DUR = re.compile(r";\s*dur\s*=\s*\"?([0-9.eE+\-]+)\"?")

#: httpcore trace events that mean "this request now owns a connection".
_CONNECTION_ACQUIRED = ("connection.connect_tcp.started", "http11.send_request_headers.started", "http2.send_request_headers.started")


def parse_server_timing(header: str | None) -> dict[str, float]:
    """``Server-Timing`` header -> {metric name (lower case): dur in ms}. Entries without a valid dur are skipped."""
    out: dict[str, float] = {}
    if not header:
        return out
    for part in header.split(","):
        m = _ENTRY.match(part)
        if not m:
            continue
        name, params = m.group(1).lower(), m.group(2)
        d = _DUR.search(params)
        if not d:
            continue
        try:
            value = float(d.group(1))
        except ValueError:
            continue
        if math.isfinite(value) and value >= 0:
            out.setdefault(name, value)
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def server_times(body: Any, headers: Mapping[str, str]) -> tuple[float | None, float | None]:
    """(server_ms, rpc_ms) from a JSON body and the headers; each None when the server did not say."""
    server_ms = rpc_ms = None
    if isinstance(body, Mapping):
        server_ms = _number(body.get("server_ms"))
        rpc_ms = _number(body.get("rpc_ms"))
    if server_ms is None or rpc_ms is None:
        timing = parse_server_timing(headers.get("server-timing"))
        if server_ms is None:
            server_ms = next((timing[n] for n in SERVER_METRIC_NAMES if n in timing), None)
        if rpc_ms is None:
            rpc_ms = next((timing[n] for n in RPC_METRIC_NAMES if n in timing), None)
    return server_ms, rpc_ms


class PoolWaitProbe:
    """The ``trace`` request extension for one attempt: records when the request got a connection."""

    __slots__ = ("start", "acquired", "connected_new")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.acquired: float | None = None
        self.connected_new = False

    async def __call__(self, event_name: str, info: dict[str, Any]) -> None:
        self.on_event(event_name)

    def on_event(self, event_name: str) -> None:
        """The synchronous half (httpx.Client calls its ``trace`` callback without awaiting)."""
        if self.acquired is None and event_name in _CONNECTION_ACQUIRED:
            self.acquired = time.perf_counter()
            self.connected_new = event_name.startswith("connection.")

    def chained_async(self, user: Any) -> Any:
        """A ``trace`` callback for an async client that feeds this probe and then the caller's own callback."""
        if user is None:
            return self

        async def trace(event_name: str, info: dict[str, Any]) -> None:
            self.on_event(event_name)
            await user(event_name, info)

        return trace

    def chained_sync(self, user: Any) -> Any:
        """The same for a sync client."""

        def trace(event_name: str, info: dict[str, Any]) -> None:
            self.on_event(event_name)
            if user is not None:
                user(event_name, info)

        return trace

    def pool_wait_ms(self, now: float | None = None) -> float | None:
        """Ms spent before owning a connection; while still waiting (a pool timeout), up to ``now``."""
        if self.acquired is not None:
            return (self.acquired - self.start) * 1000.0
        if now is not None:
            return (now - self.start) * 1000.0
        return None
