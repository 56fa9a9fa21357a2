"""Thresholds and diagnosis rules of the analyzer, in one place (documented in docs/analyze.md).

Each update gets exactly one signature id: the largest part of the update that is over its
threshold names the bottleneck; other parts over their thresholds are listed as ``also``.
"""

from __future__ import annotations

from dataclasses import dataclass

from weightwatch.catalogue import QUEUE_THRESHOLD_SECONDS, RPC_SLOW_SECONDS

FRONT_END_QUEUE = "front_end_queue"
ENGINE_RELOAD_SLOW = "engine_reload_slow"
CHECKPOINT_IO_SLOW = "checkpoint_io_slow"
HEALTHY = "healthy"
SIGNATURES = (FRONT_END_QUEUE, ENGINE_RELOAD_SLOW, CHECKPOINT_IO_SLOW, HEALTHY)

#: Queue time above which an update queued behind generation (the alert and the exit status use it too).
QUEUE_THRESHOLD_MS = QUEUE_THRESHOLD_SECONDS * 1000.0
#: Engine reload time above which the reload itself is the bottleneck.
RPC_SLOW_MS = RPC_SLOW_SECONDS * 1000.0
#: Checkpoint wait above which the trainer's write (or the polled path) is the bottleneck.
CKPT_WAIT_SLOW_MS = 1000.0
#: The run-level verdict names a bottleneck when at least this fraction of updates show it.
VERDICT_MIN_FRACTION = 0.05
#: ... and at least this many updates (or every update of a shorter run): one outlier in a short run is noise.
VERDICT_MIN_UPDATES = 2
#: Mean truncation above this percentage is flagged (RL hygiene: truncation should be near 0).
TRUNCATION_WARN_PCT = 1.0

#: Baselines per model size class (ms), checked against the run's p95 (ARCHITECTURE.md).
BASELINES: dict[str, dict[str, float]] = {
    "2b": {"wall_ms": 1000.0, "queue_ms": 100.0, "rpc_ms": 500.0},
    "7b": {"wall_ms": 3000.0, "queue_ms": 300.0, "rpc_ms": 2000.0},
    "70b": {"queue_ms": 500.0},
}
BASELINE_PERCENTILE = "p95"

#: Fix validation (--compare): queue p99 after the fix must be under this.
COMPARE_QUEUE_P99_MAX_MS = QUEUE_THRESHOLD_MS
#: rpc p50 may move by this fraction (or COMPARE_RPC_ABS_MS, whichever is larger) and count as noise.
COMPARE_RPC_REL_TOL = 0.25
COMPARE_RPC_ABS_MS = 20.0
#: Generation throughput may drop by at most this fraction and count as noise.
COMPARE_THROUGHPUT_DROP_TOL = 0.10


@dataclass(frozen=True, slots=True)
class Diagnosis:
    signature: str
    rule: str
    also: tuple[str, ...] = ()


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}"


def diagnose(queue_ms: float | None, rpc_ms: float | None, ckpt_wait_ms: float | None) -> Diagnosis:
    """Name the bottleneck of one update from its measured parts (None = not measured)."""
    over: list[tuple[float, str, str]] = []
    if queue_ms is not None and queue_ms > QUEUE_THRESHOLD_MS:
        vs = f" vs rpc_ms {_fmt(rpc_ms)}" if rpc_ms is not None else ""
        over.append((queue_ms, FRONT_END_QUEUE, f"queue_ms {_fmt(queue_ms)} > {_fmt(QUEUE_THRESHOLD_MS)}{vs}"))
    if rpc_ms is not None and rpc_ms > RPC_SLOW_MS:
        vs = f" with queue_ms {_fmt(queue_ms)}" if queue_ms is not None else ""
        over.append((rpc_ms, ENGINE_RELOAD_SLOW, f"rpc_ms {_fmt(rpc_ms)} > {_fmt(RPC_SLOW_MS)}{vs}"))
    if ckpt_wait_ms is not None and ckpt_wait_ms > CKPT_WAIT_SLOW_MS:
        over.append((ckpt_wait_ms, CHECKPOINT_IO_SLOW, f"checkpoint wait_ms {_fmt(ckpt_wait_ms)} > {_fmt(CKPT_WAIT_SLOW_MS)}"))
    if not over:
        known = [n for n, v in (("queue_ms", queue_ms), ("rpc_ms", rpc_ms), ("ckpt wait_ms", ckpt_wait_ms)) if v is not None]
        rule = "all parts under threshold (" + (", ".join(known) or "no parts measured") + ")"
        return Diagnosis(HEALTHY, rule)
    over.sort(key=lambda o: -o[0])
    top = over[0]
    rule = top[2] if len(over) == 1 else f"{top[2]}; largest part over its threshold"
    return Diagnosis(top[1], rule, tuple(o[1] for o in over[1:]))


def signature_of(queue_ms: float | None, rpc_ms: float | None, ckpt_wait_ms: float | None) -> str:
    """``diagnose(...).signature`` without building the rule text (the analyzer's per-update hot path)."""
    best, sig = 0.0, HEALTHY
    if queue_ms is not None and queue_ms > QUEUE_THRESHOLD_MS:
        best, sig = queue_ms, FRONT_END_QUEUE
    if rpc_ms is not None and rpc_ms > RPC_SLOW_MS and rpc_ms > best:
        best, sig = rpc_ms, ENGINE_RELOAD_SLOW
    if ckpt_wait_ms is not None and ckpt_wait_ms > CKPT_WAIT_SLOW_MS and ckpt_wait_ms > best:
        sig = CHECKPOINT_IO_SLOW
    return sig
