"""The recording core of one admin call, shared by ``AdminClient`` and ``AdminHTTPXInstrumentor``.

Both write the same events (``client.send`` per attempt, ``client.done`` per call), the same metrics (through
the one event -> metric table, ``weightwatch.event_metrics``) and the same span attributes, so a call looks
the same whichever way it was made.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from weightwatch import event_metrics, telemetry
from weightwatch.event_metrics import CANCELLED
from weightwatch.orchestrator.admin_types import ServerResult
from weightwatch.orchestrator.timing import server_times

_log = logging.getLogger("weightwatch.orchestrator")

#: True while a caller that records its own admin calls (AdminClient) is sending one, so the httpx
#: instrumentor lets it through instead of recording it twice.
RECORDED_BY_CALLER: ContextVar[bool] = ContextVar("weightwatch_admin_recorded_by_caller", default=False)


def record_send(
    tid: str,
    url: str,
    op: str,
    *,
    attempt: int,
    step: int | None = None,
    budget_s: float | None = None,
    phase: str | None = None,
    pool: str | None = None,
    mode: str | None = None,
) -> None:
    """The ``client.send`` event of one attempt (its metrics: budget gauge, call in flight)."""
    extra: dict[str, Any] = {"attempt": attempt}
    for key, value in (("step", step), ("phase", phase), ("budget_s", budget_s), ("mode", mode), ("pool", pool)):
        if value is not None:
            extra[key] = value
    event_metrics.emit("weights.client.send", tid, url=url, op=op, t=time.time(), **extra)


def record_done(
    span: trace.Span,
    tid: str,
    *,
    server: str,
    label: str,
    url: str,
    op: str,
    status: int | None,
    body: Any,
    headers: Mapping[str, str],
    reason: str | None,
    error: str | None,
    wall_ms: float,
    pool_wait_ms: float | None,
    attempts: int,
    step: int | None = None,
    phase: str | None = None,
    phase_ms: float | None = None,
) -> ServerResult:
    """Close one call: a ServerResult, span attributes and the ``client.done`` event (and so its metrics)."""
    ok = reason is None and status is not None
    server_ms = rpc_ms = queue_ms = None
    if ok:
        server_ms, rpc_ms = server_times(body, headers)
        if server_ms is not None:
            queue_ms = max(0.0, wall_ms - server_ms)
    trace_id = telemetry.current_trace_id()
    result = ServerResult(
        server=server,
        op=op,
        ok=ok,
        wall_ms=wall_ms,
        queue_ms=queue_ms,
        server_ms=server_ms,
        rpc_ms=rpc_ms,
        pool_wait_ms=pool_wait_ms,
        status=status,
        reason=reason,
        error=error,
        attempts=attempts,
        trace_id=trace_id,
        body=body,
    )
    if not ok and reason != CANCELLED:
        _log.warning("weightwatch: %s on %s failed (%s): %s", op, label, reason, error)
    for key, value in (
        ("rl.wall_ms", wall_ms),
        ("rl.queue_ms", queue_ms),
        ("rl.server_ms", server_ms),
        ("rl.rpc_ms", rpc_ms),
        ("rl.pool_wait_ms", pool_wait_ms),
    ):
        if value is not None:
            span.set_attribute(key, round(value, 3))
    span.set_attribute("rl.attempts", attempts)
    span.set_attribute("rl.timing_known", server_ms is not None)
    if step is not None:
        span.set_attribute("rl.step", step)
    if phase is not None:
        span.set_attribute("rl.phase", phase)
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    if not ok:
        span.set_attribute("rl.failure_reason", reason or "transport")
        span.set_status(Status(StatusCode.ERROR, error or reason or "failed"))

    extra: dict[str, Any] = {
        "server_ms": server_ms,
        "pool_wait_ms": pool_wait_ms,
        "status": status,
        "ok": ok,
        "attempts": attempts,
        "op": op,
        "url": url,
    }
    if step is not None:
        extra["step"] = step
    if phase is not None:
        extra["phase"] = phase
        if phase_ms is not None:
            extra["phase_ms"] = phase_ms
    if not ok:
        extra["reason"] = reason or "transport"
    event_metrics.emit("weights.client.done", tid, wall_ms=wall_ms, rpc_ms=rpc_ms, queue_ms=queue_ms, **extra)
    return result


def straggler_ms(times: Sequence[float]) -> float:
    """The slowest server's time minus the median server's (0 for one server)."""
    return max(times) - statistics.median(times) if times else 0.0


def record_sync_start(tid: str, *, step: int, servers: int, t: float, mode: str | None = None) -> None:
    """The ``sync.start`` event; ``t`` is when the first pause was sent (Unix seconds)."""
    event_metrics.emit("weights.sync.start", tid, step=step, servers=servers, t=t, **({"mode": mode} if mode else {}))


def record_sync_done(
    span: trace.Span,
    tid: str,
    *,
    step: int,
    servers: int,
    wall_ms: float,
    phase_ms: Mapping[str, float],
    straggler: Mapping[str, float],
    ok: bool,
    reason: str | None,
) -> None:
    """Close one sync: the weights.sync span's attributes and the ``sync.done`` event (and so its metrics)."""
    span.set_attribute("rl.wall_ms", round(wall_ms, 3))
    span.set_attribute("rl.ok", ok)
    if step >= 0:
        span.set_attribute("rl.step", step)
    if not ok:
        span.set_attribute("rl.failure_reason", reason or "failed")
        span.set_status(Status(StatusCode.ERROR, reason or "failed"))
    extra: dict[str, Any] = {"servers": servers}
    for phase, gap in straggler.items():
        extra[f"{phase}_straggler_ms"] = gap
    if reason:
        extra["reason"] = reason
    event_metrics.emit(
        "weights.sync.done",
        tid,
        step=step,
        wall_ms=wall_ms,
        pause_ms=phase_ms.get("pause"),
        transfer_ms=phase_ms.get("transfer"),
        resume_ms=phase_ms.get("resume"),
        ok=ok,
        **extra,
    )
