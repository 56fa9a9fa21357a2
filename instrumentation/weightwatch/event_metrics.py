"""One table from log event to metrics, used by every emitter and by ``weightwatch tail``.

What a line means for the metrics is decided here once. Emitters call :func:`emit`: it writes the line
(``events.emit``) and records the metrics from the same normalised fields. ``weightwatch tail`` parses
lines and hands each event to :meth:`EventRecorder.record`. So a ``client.done ... status=503 ok=0`` is a
failure both live and under tail, by construction, not by keeping two copies in step.

State kept per registry (one recorder per ``Metrics``):

* admin calls in flight (a ``client.send`` whose ``client.done`` has not come): the age of the oldest one
  per (op, server) is computed when Prometheus scrapes, so ``rl_admin_call_inflight_age_seconds`` grows
  while a call hangs with no timer thread, and is 0 once it ends;
* the pairing of a seed-era ``client.done`` (no ``url``/``op``) with its ``client.send`` by trace id.

No import of the OpenTelemetry SDK here: tail and the analyzer load this module too.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol
from urllib.parse import urlsplit

from weightwatch import events
from weightwatch.catalogue import PHASES
from weightwatch.contracts import op_of_path

_log = logging.getLogger("weightwatch.event_metrics")

#: Ops after whose success a server serves the sync's step (``rl_weight_version``).
VERSION_OPS = frozenset({"update_weights", "load_lora_adapter"})
#: A call that ended because its caller was cancelled: not a server failure, not a success.
CANCELLED = "cancelled"
#: Calls remembered while waiting for their client.done (bounded: lost lines must not grow memory).
MAX_PENDING = 10_000


class MetricSink(Protocol):
    """What the table writes to: ``weightwatch.telemetry.Metrics``."""

    def observe(self, name: str, value: float, **labels: str) -> None: ...
    def set(self, name: str, value: float, **labels: str) -> None: ...
    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None: ...
    def set_function(self, name: str, fn: Callable[[], float], **labels: str) -> None: ...


# --------------------------------------------------------------------------- field coercion
# Emitters hand typed values; tail hands the strings of extra fields. Both go through these.


def as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def as_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        f = as_float(value)
        return int(f) if f is not None and f.is_integer() else None


def as_flag(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("1", "true", "yes", "ok"):
            return True
        if v in ("0", "false", "no"):
            return False
    return None


def server_label(url: str) -> str:
    """The ``server`` label: host:port of a URL, or the text itself when it is not a URL."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    return parts.netloc or url


def failure_reason(fields: Mapping[str, Any]) -> str | None:
    """Why a client.done is a failure (timeout, transport, http_4xx, http_5xx, cancelled), or None for a success.

    ``ok=0``, a status of 400 or more, or a ``reason`` each make it a failure; a seed-era line with none of
    them is a success, as the seed meant it.
    """
    ok = as_flag(fields.get("ok"))
    status = as_int(fields.get("status"))
    reason = fields.get("reason")
    reason = reason if isinstance(reason, str) and reason not in ("", events.UNKNOWN) else None
    if ok is not False and reason is None and (status is None or status < 400):
        return None
    if reason:
        return reason
    if status is not None and status >= 500:
        return "http_5xx"
    if status is not None and status >= 400:
        return "http_4xx"
    return "transport"


# --------------------------------------------------------------------------- calls in flight


class InflightCalls:
    """Start times (Unix seconds) of the admin calls still waiting, per (op, server); read at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[tuple[str, str], dict[int, float]] = {}
        self._next = 0

    def start(self, op: str, server: str, started: float | None = None) -> tuple[str, str, int]:
        with self._lock:
            self._next += 1
            self._calls.setdefault((op, server), {})[self._next] = time.time() if started is None else started
            return (op, server, self._next)

    def end(self, token: tuple[str, str, int]) -> None:
        with self._lock:
            calls = self._calls.get(token[:2])
            if calls is not None:
                calls.pop(token[2], None)

    def age(self, op: str, server: str) -> float:
        """Seconds since the oldest call of (op, server) still waiting was sent; 0 when none is."""
        with self._lock:
            calls = self._calls.get((op, server))
            oldest = min(calls.values()) if calls else None
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

    def count(self) -> int:
        with self._lock:
            return sum(len(c) for c in self._calls.values())


@dataclass
class _Pending:
    server: str
    op: str
    token: tuple[str, str, int]


# --------------------------------------------------------------------------- the table


class EventRecorder:
    """Turns events into the catalogue's metrics on one sink; one recorder per registry."""

    def __init__(self, metrics: MetricSink):
        self.metrics = metrics
        self.inflight = InflightCalls()
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, list[_Pending]] = OrderedDict()
        self._age_bound: set[tuple[str, str]] = set()
        self._handlers: dict[str, Callable[[str | None, Mapping[str, Any]], None]] = {
            "weights.client.send": self._client_send,
            "weights.client.done": self._client_done,
            "weights.sync.done": self._sync_done,
            "weights.rpc.done": self._rpc_done,
            "ckpt.write.done": self._write_done,
            "ckpt.wait.done": self._wait_done,
            "gen.batch.start": self._batch_start,
            "gen.batch.done": self._batch_done,
            "rollout": self._rollout,
        }

    def record(self, key: str, tid: str | None, fields: Mapping[str, Any]) -> None:
        handler = self._handlers.get(key)
        if handler is not None:
            handler(tid, fields)

    # ------------------------------------------------------------------ admin calls

    def _client_send(self, tid: str | None, f: Mapping[str, Any]) -> None:
        url = str(f.get("url") or "")
        op = f.get("op") or op_of_path(url)
        server = server_label(url)
        budget = as_float(f.get("budget_s"))
        if budget is not None:
            self.metrics.set("rl_admin_call_budget_seconds", budget, op=op)
        attempt = as_int(f.get("attempt")) or 1
        key = tid or ""
        with self._lock:
            sends = self._pending.get(key)
            if attempt > 1 and sends and any(p.server == server and p.op == op for p in sends):
                return  # a retry inside one call: the call is in flight since its first attempt
            started = as_float(f.get("t"))
            token = self.inflight.start(op, server, started)
            self._pending.setdefault(key, []).append(_Pending(server, op, token))
            self._pending.move_to_end(key)
            bind = (op, server) not in self._age_bound
            self._age_bound.add((op, server))
            while len(self._pending) > MAX_PENDING:
                _, dropped = self._pending.popitem(last=False)
                for p in dropped:
                    self.inflight.end(p.token)
        if bind:
            self.metrics.set_function("rl_admin_call_inflight_age_seconds", partial(self.inflight.age, op, server), op=op, server=server)

    def _pair(self, tid: str | None, server: str | None, op: str | None) -> tuple[str, str]:
        """The (server, op) of a client.done: its own fields, completed from the matching client.send."""
        key = tid or ""
        with self._lock:
            sends = self._pending.get(key)
            if sends:
                pick = next((p for p in sends if (server is None or p.server == server) and (op is None or p.op == op)), None)
                if pick is None and server is None:
                    pick = sends[0]
                if pick is not None:
                    sends.remove(pick)
                    if not sends:
                        self._pending.pop(key, None)
                    self.inflight.end(pick.token)
                    return server or pick.server, op or pick.op
        return server or "unknown", op or "update_weights"

    def _client_done(self, tid: str | None, f: Mapping[str, Any]) -> None:
        m = self.metrics
        url = f.get("url") or f.get("server")
        op_field = f.get("op")
        server, op = self._pair(tid, server_label(str(url)) if url else None, op_field if isinstance(op_field, str) else None)
        labels = {"op": op, "server": server}
        pool = as_float(f.get("pool_wait_ms"))
        if pool is not None:
            m.observe("rl_weight_update_pool_wait_seconds", pool / 1000.0, **labels)
        reason = failure_reason(f)
        if reason == CANCELLED:
            return
        if reason is not None:
            m.inc("rl_weight_update_failures_total", 1.0, op=op, server=server, reason=reason)
            return
        wall, queue, rpc = as_float(f.get("wall_ms")), as_float(f.get("queue_ms")), as_float(f.get("rpc_ms"))
        if wall is not None:
            m.observe("rl_weight_update_wall_seconds", wall / 1000.0, **labels)
        if queue is not None:
            m.observe("rl_weight_update_queue_seconds", queue / 1000.0, **labels)
        if rpc is not None:
            m.observe("rl_weight_update_rpc_seconds", rpc / 1000.0, **labels)
        # NaN when unknown: a stale number from an earlier update would be a lie.
        m.set("rl_weight_update_last_queue_seconds", queue / 1000.0 if queue is not None else math.nan, **labels)
        m.set("rl_weight_update_last_success_timestamp_seconds", time.time(), **labels)
        phase, phase_ms = f.get("phase"), as_float(f.get("phase_ms"))
        if phase in PHASES and phase_ms is not None:
            m.observe("rl_weight_sync_phase_seconds", phase_ms / 1000.0, phase=phase, server=server)
        step = as_int(f.get("step"))
        if op in VERSION_OPS and step is not None and step >= 0:
            m.set("rl_weight_version", step, server=server)

    def _sync_done(self, tid: str | None, f: Mapping[str, Any]) -> None:
        wall = as_float(f.get("wall_ms"))
        if wall is not None:
            self.metrics.observe("rl_weight_sync_seconds", wall / 1000.0)
        for phase in PHASES:
            gap = as_float(f.get(f"{phase}_straggler_ms"))
            if gap is not None:
                self.metrics.observe("rl_weight_sync_straggler_seconds", gap / 1000.0, phase=phase)
        step = as_int(f.get("step"))
        if as_flag(f.get("ok")) and step is not None and step >= 0:
            self.metrics.set("rl_checkpoint_step", step)

    def _rpc_done(self, tid: str | None, f: Mapping[str, Any]) -> None:
        rpc = as_float(f.get("rpc_ms"))
        if rpc is not None:
            self.metrics.observe("rl_admin_rpc_seconds", rpc / 1000.0, op=str(f.get("op")))

    # ------------------------------------------------------------------ checkpoints, generation, rollouts

    def _write_done(self, tid: str | None, f: Mapping[str, Any]) -> None:
        write = as_float(f.get("write_ms"))
        if write is not None:
            self.metrics.observe("rl_checkpoint_write_seconds", write / 1000.0)
        nbytes = as_int(f.get("bytes"))
        if nbytes is not None:
            self.metrics.set("rl_checkpoint_bytes", nbytes)
        step = as_int(f.get("step"))
        if step is not None:
            self.metrics.set("rl_trainer_step", step)

    def _wait_done(self, tid: str | None, f: Mapping[str, Any]) -> None:
        wait = as_float(f.get("wait_ms"))
        if wait is not None:
            self.metrics.observe("rl_checkpoint_wait_seconds", wait / 1000.0)

    def _batch_start(self, tid: str | None, f: Mapping[str, Any]) -> None:
        inflight = as_int(f.get("inflight"))
        if inflight is not None:
            self.metrics.set("rl_generation_inflight_requests", inflight)

    def _batch_done(self, tid: str | None, f: Mapping[str, Any]) -> None:
        dur = as_float(f.get("dur_ms"))
        if dur is not None:
            self.metrics.observe("rl_generation_batch_seconds", dur / 1000.0)
        self._batch_start(tid, f)

    def _rollout(self, tid: str | None, f: Mapping[str, Any]) -> None:
        m = self.metrics
        trunc = as_float(f.get("trunc_pct"))
        if trunc is not None:
            m.set("rl_rollout_truncated_ratio", trunc / 100.0)
        for name, key in (("rl_rollout_staleness_steps", "staleness"), ("rl_orchestrator_step", "current_step"),
                          ("rl_checkpoint_step", "ckpt_step"), ("rl_async_level", "async_level")):
            v = as_int(f.get(key))
            if v is not None:
                m.set(name, v)


# --------------------------------------------------------------------------- live emitters

_recorders: weakref.WeakKeyDictionary[Any, EventRecorder] = weakref.WeakKeyDictionary()
_recorders_lock = threading.Lock()


def recorder_for(metrics: MetricSink) -> EventRecorder:
    """The recorder of one sink (the process's ``telemetry.get().metrics``, or tail's)."""
    rec = _recorders.get(metrics)
    if rec is None:
        with _recorders_lock:
            rec = _recorders.get(metrics)
            if rec is None:
                rec = _recorders[metrics] = EventRecorder(metrics)
    return rec


def emit(key: str, tid: str | None = None, *, logger: logging.Logger | None = None, **fields: Any) -> str | None:
    """Write one event line and record its metrics on this process's registry. Never raises.

    The metrics are recorded from the values the line carries (rounded as the grammar rounds them), so
    tail replaying the line records the same.
    """
    line = events.emit(key, tid, logger=logger, **fields)
    try:
        from weightwatch import telemetry

        recorder_for(telemetry.get().metrics).record(key, tid, {k: events.normalize(k, v) for k, v in fields.items()})
    except Exception:  # noqa: BLE001 - telemetry must not break the host
        _log.warning("weightwatch: cannot record the metrics of %s", key, exc_info=True)
    return line

