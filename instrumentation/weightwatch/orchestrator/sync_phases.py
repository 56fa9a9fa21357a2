"""The phases of a weight sync, derived from the order of admin calls a client we did not write sends.

prime-rl's orchestrator sends, per server, ``/pause`` then ``/update_weights`` then ``/resume`` (in a
``finally``), each phase to every server before the next. The rules:

* a pause while no sync is open starts one (its ``weights.sync`` span and the pause phase);
* the first transfer call (``/update_weights``, ``/load_lora_adapter``) starts the transfer phase; the
  sync's step is the ``step_N`` of its ``weight_dir`` (``contracts.step_of_dir``), and ``sync.start`` is
  written then, with ``t`` = when the first pause was sent and ``servers`` = the servers paused;
* the first resume starts the resume phase; the sync is done when every paused server has answered a
  resume with success;
* a pause while a sync is in its resume phase (a resume never succeeded) closes that sync as failed and
  starts the next one.

A server's phase time runs from its first call of that phase (retries included) to its first success.
A sync that carried no transfer has step -1 (unknown). A bare update with no pause is no sync: it is
recorded as a plain call.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from weightwatch import telemetry
from weightwatch.catalogue import PHASE_OF_OP, PHASES
from weightwatch.orchestrator.admin_record import record_sync_done, record_sync_start, straggler_ms

#: Step of a sync that carried no transfer (its step was never named).
UNKNOWN_STEP = -1


@dataclass
class _Phase:
    span: trace.Span
    context: otel_context.Context
    first_send: dict[str, float] = field(default_factory=dict)  # server -> perf_counter of its first call
    done_ms: dict[str, float] = field(default_factory=dict)  # server -> ms to its first success
    failed: set[str] = field(default_factory=set)
    attempts: dict[str, int] = field(default_factory=dict)


@dataclass
class Sync:
    """One sync in progress."""

    span: trace.Span
    context: otel_context.Context
    tid: str
    t0: float
    t0_wall: float
    step: int = UNKNOWN_STEP
    started: bool = False  # sync.start written
    phase: str = "pause"
    phases: dict[str, _Phase] = field(default_factory=dict)
    paused: set[str] = field(default_factory=set)
    resumed: set[str] = field(default_factory=set)
    closed: bool = False


@dataclass(frozen=True)
class CallInSync:
    """Where one call sits: its sync and phase (both None for a call outside any sync) and its parent context."""

    sync: Sync | None
    phase: str | None
    context: otel_context.Context | None
    attempt: int = 1
    step: int | None = None


class SyncPhases:
    """Follows the admin calls of one process (any number of clients) and keeps the open sync."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None):
        self._tracer_provider = tracer_provider
        self._lock = threading.Lock()
        self.current: Sync | None = None

    def _tracer(self) -> trace.Tracer:
        provider = self._tracer_provider or telemetry.get().tracer_provider
        return provider.get_tracer("weightwatch.orchestrator")

    # ------------------------------------------------------------------ calls

    def on_send(self, op: str, server: str, step: int | None) -> CallInSync:
        """A call is about to leave: place it in a sync (maybe starting or closing one)."""
        phase = PHASE_OF_OP.get(op)
        if phase is None:
            return CallInSync(None, None, None, step=step)
        to_close: Sync | None = None
        with self._lock:
            s = self.current
            if phase == "pause":
                if s is not None and s.phase == "resume":
                    to_close, s = s, None
                if s is None:
                    s = self.current = self._new_sync()
                s.paused.add(server)
            elif s is None:
                return CallInSync(None, None, None, step=step)  # a bare update (or resume) outside any sync
            if PHASES.index(phase) > PHASES.index(s.phase):
                self._enter(s, phase)
            if phase == "transfer" and step is not None and s.step == UNKNOWN_STEP:
                s.step = step
            start_sync = phase != "pause" and not s.started
            if start_sync:
                s.started = True
            p = s.phases.get(phase) or self._enter(s, phase)
            p.first_send.setdefault(server, time.perf_counter())
            p.attempts[server] = p.attempts.get(server, 0) + 1
            call = CallInSync(s, phase, p.context, p.attempts[server], step if step is not None else (s.step if phase != "pause" and s.step >= 0 else None))
        if to_close is not None:
            self._close(to_close, reason="resume_failed")
        if start_sync:
            record_sync_start(s.tid, step=s.step, servers=len(s.paused), t=s.t0_wall)
        return call

    def on_done(self, call: CallInSync, server: str, ok: bool) -> tuple[float | None, Sync | None]:
        """A call answered: (this server's phase time when this answer ends its phase, the sync if it is now done)."""
        s, phase = call.sync, call.phase
        if s is None or phase is None:
            return None, None
        with self._lock:
            p = s.phases[phase]
            if not ok:
                if server not in p.done_ms:
                    p.failed.add(server)
                return None, None
            if server in p.done_ms:
                return None, None
            p.failed.discard(server)
            ms = (time.perf_counter() - p.first_send[server]) * 1000.0
            p.done_ms[server] = ms
            finished = None
            if phase == "resume":
                s.resumed.add(server)
                if s.paused <= s.resumed and not s.closed:
                    finished = s
                    s.closed = True
                    if self.current is s:
                        self.current = None
            return ms, finished

    def finish(self, s: Sync) -> None:
        """Write sync.done and end its spans (after the last resume's own client.done)."""
        self._close(s, reason=None, already_closed=True)

    def close_open(self, reason: str = "incomplete") -> None:
        """Close the open sync as failed (uninstrument, or a process going down)."""
        with self._lock:
            s, self.current = self.current, None
        if s is not None:
            self._close(s, reason=reason)

    # ------------------------------------------------------------------ internals

    def _new_sync(self) -> Sync:
        span = self._tracer().start_span("weights.sync", context=otel_context.Context(), attributes={"rl.source": "httpx-instrumentor"})
        ctx = trace.set_span_in_context(span, otel_context.Context())
        tid = format(span.get_span_context().trace_id, "032x") if span.get_span_context().is_valid else telemetry.current_tid()
        return Sync(span=span, context=ctx, tid=tid, t0=time.perf_counter(), t0_wall=time.time())

    def _enter(self, s: Sync, phase: str) -> _Phase:
        previous = s.phases.get(s.phase)
        if previous is not None and s.phase != phase:
            self._end_phase(previous)
        span = self._tracer().start_span("weights.sync.phase", context=s.context, attributes={"rl.phase": phase})
        p = _Phase(span=span, context=trace.set_span_in_context(span, s.context))
        s.phases[phase] = p
        s.phase = phase
        return p

    @staticmethod
    def _end_phase(p: _Phase) -> None:
        if not p.span.is_recording():
            return
        if p.done_ms:
            p.span.set_attribute("rl.wall_ms", round(max(p.done_ms.values()), 3))
            p.span.set_attribute("rl.straggler_ms", round(straggler_ms(list(p.done_ms.values())), 3))
        if p.failed:
            p.span.set_attribute("rl.failed", len(p.failed))
            p.span.set_status(Status(StatusCode.ERROR, f"failed on {len(p.failed)} server(s)"))
        p.span.end()

    def _close(self, s: Sync, *, reason: str | None, already_closed: bool = False) -> None:
        with self._lock:
            if s.closed and not already_closed:
                return
            s.closed = True
            phases = {name: dict(p.done_ms) for name, p in s.phases.items()}
            failed = {name: set(p.failed) for name, p in s.phases.items()}
        if reason is None:
            if failed.get("pause") or "transfer" not in phases:
                reason = "pause_failed"
            elif failed.get("transfer") or not phases.get("transfer"):
                reason = "transfer_failed"
        ok = reason is None
        if not s.started:
            s.started = True
            record_sync_start(s.tid, step=s.step, servers=len(s.paused), t=s.t0_wall)
        for p in s.phases.values():
            self._end_phase(p)
        record_sync_done(
            s.span,
            s.tid,
            step=s.step,
            servers=len(s.paused),
            wall_ms=(time.perf_counter() - s.t0) * 1000.0,
            phase_ms={name: max(ms.values()) for name, ms in phases.items() if ms},
            straggler={name: straggler_ms(list(ms.values())) for name, ms in phases.items() if ms},
            ok=ok,
            reason=reason,
        )
        s.span.end()
