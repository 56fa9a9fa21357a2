"""The demo's live terminal view, built from the same log events the analyzer reads.

It follows ``RUN/{orchestrator,trainer,inference}.log`` (so it shows exactly what a user's own job
would log) and renders per update: wall, queue, rpc; the checkpoint wait; generation in flight;
staleness and truncation. On a terminal it redraws in place with plain ANSI; otherwise (``--no-live``,
pipes, CI) it prints one line per finished step.
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

    def feed(self, role: str, ev: Event) -> None:
        self.counts[ev.key] = self.counts.get(ev.key, 0) + 1
        k = ev.key
        if k == "ckpt.wait.start":
            self.waiting_for = ev["target_step"]
        elif k == "ckpt.wait.done":
            self.waiting_for = None
            self.last_wait_ms = ev["wait_ms"]
            self.all_wait.append(ev["wait_ms"])
        elif k == "weights.client.done":
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

    def __init__(self, logs: dict[str, Path], title: str, out: TextIO | None = None, live: bool | None = None):
        self.followers = {role: LogFollower(path) for role, path in logs.items()}
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
        new = self.state.finished_steps[self._printed_steps :]
        self._printed_steps = len(self.state.finished_steps)
        for line in new:
            self.out.write(line + "\n")
        if new:
            self.out.flush()

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

        return (
            f"updates {len(s.all_wall)}  p50/p99  wall {pair(s.all_wall)}  queue {pair(s.all_queue)}  "
            f"rpc {pair(s.all_rpc)}  ckpt wait {pair(s.all_wait)}"
        )
