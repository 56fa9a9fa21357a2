"""Thresholds and diagnosis rules of the analyzer, in one place (documented in docs/analyze.md).

Each update gets exactly one signature id: the largest part of the update that is over its
threshold names the bottleneck; other parts over their thresholds are listed as ``also``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from weightwatch import catalogue
from weightwatch.catalogue import QUEUE_THRESHOLD_SECONDS, RPC_SLOW_SECONDS

FRONT_END_QUEUE = "front_end_queue"
ENGINE_RELOAD_SLOW = "engine_reload_slow"
CHECKPOINT_IO_SLOW = "checkpoint_io_slow"
HEALTHY = "healthy"
#: Signatures of one admin call (update).
SIGNATURES = (FRONT_END_QUEUE, ENGINE_RELOAD_SLOW, CHECKPOINT_IO_SLOW, HEALTHY)

# The signatures of one weight sync (ARCHITECTURE.md, "The weight sync of today"), most severe first.
HUNG = "hung"
VERSION_SKEW = "version_skew"
STRAGGLER = "straggler"
PAUSE_SLOW = "pause_slow"
RESUME_SLOW = "resume_slow"
SYNC_SIGNATURES = (HUNG, VERSION_SKEW, STRAGGLER, PAUSE_SLOW, RESUME_SLOW)
#: Sync signatures that are failures, not slowness: the verdict names them whenever they occur.
SYNC_FAILURES = (HUNG, VERSION_SKEW)
#: Thresholds of the sync signatures: all from the catalogue (the alert rules read the same numbers).
PAUSE_SLOW_MS = catalogue.PAUSE_SLOW_SECONDS * 1000.0
RESUME_SLOW_MS = catalogue.RESUME_SLOW_SECONDS * 1000.0
STRAGGLER_RATIO = catalogue.STRAGGLER_RATIO
STRAGGLER_MIN_GAP_MS = catalogue.STRAGGLER_MIN_GAP_SECONDS * 1000.0
HUNG_BUDGET_FRACTION = catalogue.HUNG_BUDGET_FRACTION

#: Queue time above which an update queued behind generation (the alert and the exit status use it too).
QUEUE_THRESHOLD_MS = QUEUE_THRESHOLD_SECONDS * 1000.0
#: Engine reload time above which the reload itself is the bottleneck.
RPC_SLOW_MS = RPC_SLOW_SECONDS * 1000.0
#: Checkpoint wait above which the trainer's write (or the polled path) is the bottleneck.
CKPT_WAIT_SLOW_MS = 1000.0
#: A slow wait this many times its step's write time (and CKPT_WAIT_SLOW_MS over it) did not wait for the write:
#: the orchestrator polled the wrong path, or the shared filesystem was slow to show the files.
CKPT_WAIT_OVER_WRITE_RATIO = 2.0
CKPT_CAUSE_SLOW_WRITE = "slow write"
CKPT_CAUSE_NOT_THE_WRITE = "wait far longer than the write: wrong path or slow shared filesystem"
CKPT_CAUSE_UNKNOWN = "unknown: no write.done for this step (give the trainer log)"
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


def signature_expr() -> Any:
    """``diagnose(...).signature`` as a polars expression over the columns queue_ms, rpc_ms, ckpt_wait_ms.

    The same rule (the largest part over its threshold names the bottleneck), column-wise for millions of updates;
    a test holds it to ``diagnose``.
    """
    import polars as pl

    q, r, w = pl.col("queue_ms"), pl.col("rpc_ms"), pl.col("ckpt_wait_ms")
    q_over = (q > QUEUE_THRESHOLD_MS).fill_null(False)
    r_over = (r > RPC_SLOW_MS).fill_null(False)
    w_over = (w > CKPT_WAIT_SLOW_MS).fill_null(False)
    best_q = pl.when(q_over).then(q).otherwise(0.0)
    r_wins = r_over & (r > best_q)
    best = pl.when(r_wins).then(r).otherwise(best_q)
    return (pl.when(w_over & (w > best)).then(pl.lit(CHECKPOINT_IO_SLOW))
            .when(r_wins).then(pl.lit(ENGINE_RELOAD_SLOW))
            .when(q_over).then(pl.lit(FRONT_END_QUEUE))
            .otherwise(pl.lit(HEALTHY)))


def checkpoint_cause(wait_ms: float, write_ms: float | None) -> str:
    """Why a slow checkpoint wait was slow, given the trainer's write time for that step (None: not known)."""
    if write_ms is None:
        return CKPT_CAUSE_UNKNOWN
    if wait_ms >= CKPT_WAIT_OVER_WRITE_RATIO * write_ms and wait_ms - write_ms > CKPT_WAIT_SLOW_MS:
        return CKPT_CAUSE_NOT_THE_WRITE
    return CKPT_CAUSE_SLOW_WRITE
