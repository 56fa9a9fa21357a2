"""The demo's live terminal view, built from the same log events the analyzer reads.

It follows ``RUN/{orchestrator,trainer,inference*}.log`` (so it shows exactly what a user's own job
would log) and renders per sync: its phases (pause, transfer, resume: the slowest server's time and
which server that was), the weight version of every server, and admin calls still in flight against
their budget (a hang shows while it happens); per update (the bare update, and each call of a sync):
wall, queue, rpc; the checkpoint wait; generation in flight; staleness and truncation. On a terminal
it redraws in place with plain ANSI; otherwise (``--no-live``, pipes, CI) it prints one line per
finished sync and per finished step.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from weightwatch.catalogue import HUNG_BUDGET_FRACTION, PHASE_OF_OP, PHASES
from weightwatch.contracts import op_of_path
from weightwatch.events import Event, parse_line


class LogFollower:
    """Reads complete new lines from a file that may not exist yet (or get truncated)."""

    def __init__(self, path: Path):
        self.path = path
        self._pos = 0
        self._partial = ""

    def read(self) -> list[str]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self._pos:
            self._pos, self._partial = 0, ""
        if size == self._pos:
            return []
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            fh.seek(self._pos)
            chunk = fh.read()
            self._pos = fh.tell()
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()
        return lines


@dataclass
class UpdateRow:
    step: int | None
    ckpt_step: int | None
    wall_ms: float | None
    queue_ms: float | None
    rpc_ms: float | None
    ckpt_wait_ms: float | None


@dataclass
class SyncRow:
    """One weight sync: its phases as the orchestrator saw them, per server."""

    tid: str | None
    step: int | None
    started: float | None = None
    wall_ms: float | None = None
    ok: bool | None = None
    phase_ms: dict[str, float | None] = field(default_factory=dict)  # from sync.done (the slowest server's)
    #: phase -> server -> wall ms of that server's call (from client.done)
    calls: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # "op server"

    def slowest(self, phase: str) -> tuple[str, float] | None:
        by_server = self.calls.get(phase) or {}
        if not by_server:
            return None
        server = max(by_server, key=lambda k: by_server[k])
        return server, by_server[server]

    def line(self) -> str:
        parts = [f"sync to ckpt {_n(self.step):>3}  wall {_ms(self.wall_ms)}"]
        for phase in PHASES:
            slow = self.slowest(phase)
            ms = self.phase_ms.get(phase)
            if ms is None and slow is not None:
                ms = slow[1]
            where = f" ({slow[0]})" if slow is not None and len(self.calls.get(phase) or {}) > 1 else ""
            parts.append(f"{phase} {_ms(ms)}{where}")
        parts.append("ok" if self.ok else "FAILED " + ", ".join(self.failed) if self.ok is not None else "in flight")
        return "  ".join(parts)


@dataclass
class InFlight:
    op: str
    server: str
    since: float  # the client.send's t (epoch seconds)
    budget_s: float | None = None  # the caller's budget for the call (client.send's budget_s), when it says


def _server_of(url: object) -> str:
    text = str(url or "")
    return urlsplit(text).netloc or text


@dataclass
class LiveState:
    """Everything the view shows, updated event by event."""

    updates: deque[UpdateRow] = field(default_factory=lambda: deque(maxlen=12))
    all_queue: list[float] = field(default_factory=list)
    all_rpc: list[float] = field(default_factory=list)
    all_wall: list[float] = field(default_factory=list)
    all_wait: list[float] = field(default_factory=list)
    step: int | None = None
    ckpt_step: int | None = None
    last_wait_ms: float | None = None
    waiting_for: int | None = None
    inflight: int | None = None
    staleness: int | None = None
    trunc_pct: float | None = None
    trainer_step: int | None = None
    last_write_ms: float | None = None
    server_rpc_ms: float | None = None
    batches: int = 0
    completions: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    finished_steps: list[str] = field(default_factory=list)
    syncs: deque[SyncRow] = field(default_factory=lambda: deque(maxlen=8))
    open_syncs: dict[str, SyncRow] = field(default_factory=dict)
    finished_syncs: list[str] = field(default_factory=list)
    all_phase: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    #: the step each server took last (``None``: it has failed every update so far); servers by host:port
    versions: dict[str, int | None] = field(default_factory=dict)
    inflight_calls: dict[tuple[str | None, str, str], InFlight] = field(default_factory=dict)

    def _sync_row(self, tid: str | None) -> SyncRow | None:
        return self.open_syncs.get(tid) if tid else None

    def _call_done(self, ev: Event) -> None:
        op = str(ev.get("op") or op_of_path(str(ev.get("url") or "")))
        server = _server_of(ev.get("url"))
        self.inflight_calls.pop((ev.tid, op, server), None)
        ok = str(ev.get("ok", "1")) not in ("0", "false", "False")
        phase = PHASE_OF_OP.get(op)
        if phase == "transfer" and server:
            step = _int(ev.get("step"))
            if ok and step is not None:
                self.versions[server] = step
            else:
                self.versions.setdefault(server, None)
        row = self._sync_row(ev.tid)
        if row is not None and phase is not None:
            if ev["wall_ms"] is not None:
                row.calls.setdefault(phase, {})[server] = ev["wall_ms"]
            if not ok:
                row.failed.append(f"{op} {server}")

    def feed(self, role: str, ev: Event) -> None:
        self.counts[ev.key] = self.counts.get(ev.key, 0) + 1
        k = ev.key
        if k == "weights.sync.start":
            row = SyncRow(ev.tid, ev["step"], started=ev["t"])
            if ev.tid:
                self.open_syncs[ev.tid] = row
            self.syncs.append(row)
        elif k == "weights.sync.done":
            row = self.open_syncs.pop(ev.tid, None) if ev.tid else None
            if row is None:
                row = SyncRow(ev.tid, ev["step"])
                self.syncs.append(row)
            row.wall_ms, row.ok = ev["wall_ms"], bool(ev["ok"])
            for phase in PHASES:
                row.phase_ms[phase] = ev[f"{phase}_ms"]
                if ev[f"{phase}_ms"] is not None:
                    self.all_phase[phase].append(ev[f"{phase}_ms"])
            self.finished_syncs.append(row.line())
        elif k == "weights.client.send":
            op = str(ev.get("op") or op_of_path(str(ev["url"] or "")))
            server = _server_of(ev["url"])
            key = (ev.tid, op, server)
            if key not in self.inflight_calls:  # a retry keeps the first attempt's start: the caller has waited since
                self.inflight_calls[key] = InFlight(op, server, ev["t"] if ev["t"] is not None else time.time(), _float(ev.get("budget_s")))
        elif k == "ckpt.wait.start":
            self.waiting_for = ev["target_step"]
        elif k == "ckpt.wait.done":
            self.waiting_for = None
            self.last_wait_ms = ev["wait_ms"]
            self.all_wait.append(ev["wait_ms"])
        elif k == "weights.client.done":
            self._call_done(ev)
            op = str(ev.get("op") or op_of_path(str(ev.get("url") or "")))
            if PHASE_OF_OP.get(op, "transfer") != "transfer":
                return  # pause and resume show in the sync rows; the update table is about loading weights
            row = UpdateRow(self.step, _int(ev.get("step")), ev["wall_ms"], ev["queue_ms"], ev["rpc_ms"], self.last_wait_ms)
            self.updates.append(row)
            for value, bucket in ((ev["wall_ms"], self.all_wall), (ev["queue_ms"], self.all_queue), (ev["rpc_ms"], self.all_rpc)):
                if value is not None:
                    bucket.append(value)
        elif k == "weights.rpc.done":
            self.server_rpc_ms = ev["rpc_ms"]
        elif k in ("gen.batch.start", "gen.batch.done"):
            self.inflight = ev["inflight"]
            if k == "gen.batch.done":
                self.batches += 1
                self.completions += ev["completions"]
        elif k == "rollout":
            self.step, self.ckpt_step = ev["current_step"], ev["ckpt_step"]
            self.staleness, self.trunc_pct = ev["staleness"], ev["trunc_pct"]
            last = self.updates[-1] if self.updates else None
            self.finished_steps.append(
                f"step {ev['current_step']:>3}  ckpt {ev['ckpt_step']:>3}  "
                f"wall {_ms(last.wall_ms if last else None)}  queue {_ms(last.queue_ms if last else None)}  "
                f"rpc {_ms(last.rpc_ms if last else None)}  ckpt-wait {_ms(self.last_wait_ms)}  "
                f"in-flight {_n(self.inflight)}  staleness {_n(self.staleness)}  trunc {_pct(self.trunc_pct)}"
            )
        elif k == "ckpt.write.done":
            self.trainer_step, self.last_write_ms = ev["step"], ev["write_ms"]


def _float(v: object) -> float | None:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _int(v: object) -> int | None:
    try:
        return int(v)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _ms(v: float | None) -> str:
    return f"{v:>8.0f} ms" if v is not None else "       - ms"


def _n(v: object) -> str:
    return "-" if v is None else str(v)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def _p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


class LiveView:
    """Follows the run's logs and renders them; ``poll()`` reads, ``render()`` draws."""

    def __init__(self, logs: dict[str, Path], title: str, out: TextIO | None = None, live: bool | None = None,
                 budgets_s: dict[str, float] | None = None):
        self.followers = {role: LogFollower(path) for role, path in logs.items()}
        self.budgets_s = dict(budgets_s or {})
        self._printed_syncs = 0
        self._warned: set[tuple[str | None, str, str]] = set()
        self.state = LiveState()
        self.title = title
        self.out = out or sys.stdout
        self.live = self.out.isatty() and os.environ.get("TERM") != "dumb" if live is None else live
        self.started = time.monotonic()
        self._printed_steps = 0
        self.status = ""

    def poll(self) -> None:
        for role, follower in self.followers.items():
            for line in follower.read():
                ev = parse_line(line)
                if isinstance(ev, Event):
                    self.state.feed(role, ev)

    def render(self, final: bool = False) -> None:
        if self.live and not final:
            self.out.write("\x1b[H\x1b[J" + self.screen() + "\n")
            self.out.flush()
            return
        new = self.state.finished_syncs[self._printed_syncs :]
        self._printed_syncs = len(self.state.finished_syncs)
        new += self.state.finished_steps[self._printed_steps :]
        self._printed_steps = len(self.state.finished_steps)
        for key, line in self.hung_calls():
            if key not in self._warned:
                self._warned.add(key)
                new.append(line)
        for line in new:
            self.out.write(line + "\n")
        if new:
            self.out.flush()

    def inflight_lines(self, now: float | None = None) -> list[tuple[tuple[str | None, str, str], str, bool]]:
        """(key, text, past half its budget) of every admin call still waiting for its answer, oldest first."""
        now = time.time() if now is None else now
        out = []
        for key, call in sorted(self.state.inflight_calls.items(), key=lambda kv: kv[1].since):
            age = max(0.0, now - call.since)
            budget = call.budget_s if call.budget_s is not None else self.budgets_s.get(call.op)
            hung = budget is not None and age > budget * HUNG_BUDGET_FRACTION
            of = f" of its {budget:g} s budget" if budget is not None else ""
            text = f"in flight: {call.op} on {call.server} for {age:.0f} s{of}" + ("  <- past half: hung" if hung else "")
            out.append((key, text, hung))
        return out

    def hung_calls(self, now: float | None = None) -> list[tuple[tuple[str | None, str, str], str]]:
        return [(key, text) for key, text, hung in self.inflight_lines(now) if hung]

    def screen(self) -> str:
        s = self.state
        elapsed = time.monotonic() - self.started
        lines = [f"weightwatch demo  {self.title}  {elapsed:5.0f} s  {self.status}", ""]
        wait = f"waiting for step {s.waiting_for}" if s.waiting_for is not None else f"last wait {_ms(s.last_wait_ms).strip()}"
        lines.append(
            f"orchestrator step {_n(s.step)}   server weights: step {_n(s.ckpt_step)}   staleness {_n(s.staleness)}   "
            f"truncated {_pct(s.trunc_pct)}   in flight {_n(s.inflight)}   batches {s.batches} ({s.completions} completions)"
        )
        lines.append(f"trainer step {_n(s.trainer_step)}   last write {_ms(s.last_write_ms).strip()}   checkpoint wait: {wait}")
        if s.versions:
            versions = "   ".join(f"{server} {_n(v)}" for server, v in sorted(s.versions.items()))
            skew = "   SKEW" if len({v for v in s.versions.values()}) > 1 else ""
            lines.append(f"weight version per server: {versions}{skew}")
        for _key, text, _hung in self.inflight_lines():
            lines.append(text)
        if s.syncs:
            lines.append("")
            lines.append("syncs (each phase: the slowest server's time, and which server when there are several)")
            for row in s.syncs:
                lines.append(row.line())
        lines.append("")
        lines.append(f"{'step':>5} {'wall':>11} {'queue':>11} {'rpc':>11} {'ckpt wait':>11}")
        for r in s.updates:
            lines.append(f"{_n(r.step):>5} {_ms(r.wall_ms)} {_ms(r.queue_ms)} {_ms(r.rpc_ms)} {_ms(r.ckpt_wait_ms)}")
        lines.append("")
        lines.append(self.summary())
        return "\n".join(lines)

    def summary(self) -> str:
        s = self.state

        def pair(values: list[float]) -> str:
            p50, p99 = _p(values, 50), _p(values, 99)
            return "-" if p50 is None or p99 is None else f"{p50:.0f} / {p99:.0f} ms"

        text = (
            f"updates {len(s.all_wall)}  p50/p99  wall {pair(s.all_wall)}  queue {pair(s.all_queue)}  "
            f"rpc {pair(s.all_rpc)}  ckpt wait {pair(s.all_wait)}"
        )
        syncs = len(s.all_phase["pause"])
        if syncs:
            text += f"\nsyncs {syncs}  p50/p99  " + "  ".join(f"{p} {pair(s.all_phase[p])}" for p in PHASES)
        return text
