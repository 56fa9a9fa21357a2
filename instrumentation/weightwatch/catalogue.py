"""Every metric, span and log event weightwatch emits, in one place.

Dashboards, alert rules, the analyzer and the tests read names from here (or are
checked against it), so a name lives in exactly one place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

MetricType = Literal["histogram", "gauge", "counter"]
Role = Literal["orchestrator", "trainer", "inference", "internal"]

# Latency buckets in seconds: 1 ms to 10 min. Dense below 1 s where healthy updates live,
# coarse above where stalls live.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75,
    1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)

#: The queue time above which an update counts as queued behind generation (alert + analyzer).
QUEUE_THRESHOLD_SECONDS = 0.3
#: The engine reload time above which the reload itself is the bottleneck.
RPC_SLOW_SECONDS = 2.0

#: The weight-sync signatures (ARCHITECTURE.md, "The weight sync of today"): alerts and analyzer read these.
PAUSE_SLOW_SECONDS = 1.0
RESUME_SLOW_SECONDS = 1.0
#: A server is a straggler when its phase takes at least this many times the median server's ...
STRAGGLER_RATIO = 2.0
#: ... and at least this much longer than the median.
STRAGGLER_MIN_GAP_SECONDS = 0.5
#: An admin call in flight past this fraction of its caller's budget counts as hung.
HUNG_BUDGET_FRACTION = 0.5

#: Admin operations (label ``op``). The first two are the seed's bare update; the sync adds the rest.
OPS = ("update_weights", "reload_weights", "pause", "resume", "load_lora_adapter", "is_paused", "liveness")
#: The phases of one weight sync, in order (label ``phase``).
PHASES = ("pause", "transfer", "resume")
#: Which admin op makes up which phase (``transfer`` is either shape of loading weights).
PHASE_OF_OP = {"pause": "pause", "update_weights": "transfer", "reload_weights": "transfer", "load_lora_adapter": "transfer", "resume": "resume"}
LANES = ("inference", "admin")
#: Buckets for counts of requests (held at a pause).
COUNT_BUCKETS: tuple[float, ...] = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    type: MetricType
    unit: str
    help: str
    role: Role
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None

    @property
    def documentation(self) -> str:
        return self.help


def _h(name: str, help: str, role: Role, labels: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name, "histogram", "seconds", help, role, labels, LATENCY_BUCKETS)


def _g(name: str, unit: str, help: str, role: Role, labels: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name, "gauge", unit, help, role, labels)


_OP_SERVER = ("op", "server")
_PHASE_SERVER = ("phase", "server")

METRICS: tuple[MetricSpec, ...] = (
    # orchestrator
    _h("rl_weight_update_wall_seconds", "Weight update wall time seen by the orchestrator, per server.", "orchestrator", _OP_SERVER),
    _h("rl_weight_update_queue_seconds", "Wall time minus the server's own handling time: pool wait, connect, accept backlog, event-loop lag.", "orchestrator", _OP_SERVER),
    _h("rl_weight_update_rpc_seconds", "Engine reload time (collective_rpc) reported by the server.", "orchestrator", _OP_SERVER),
    _h("rl_weight_update_pool_wait_seconds", "Time waiting for a connection from the HTTP client's pool.", "orchestrator", _OP_SERVER),
    _g("rl_weight_update_last_queue_seconds", "seconds", "Queue time of the most recent weight update, per server.", "orchestrator", _OP_SERVER),
    MetricSpec("rl_weight_update_failures_total", "counter", "", "Failed weight updates by reason (timeout, transport, http_4xx, http_5xx).", "orchestrator", ("op", "server", "reason")),
    _g("rl_weight_update_last_success_timestamp_seconds", "seconds", "Unix time of the last successful weight update, per server.", "orchestrator", _OP_SERVER),
    _h("rl_checkpoint_wait_seconds", "Time the orchestrator waited for a checkpoint's STABLE marker.", "orchestrator"),
    _h("rl_generation_batch_seconds", "Duration of one generation batch.", "orchestrator"),
    _g("rl_generation_inflight_requests", "requests", "Generation requests in flight from the orchestrator.", "orchestrator"),
    _g("rl_rollout_truncated_ratio", "ratio", "Fraction of the last step's completions cut at max_tokens.", "orchestrator"),
    _g("rl_rollout_staleness_steps", "steps", "Current step minus the step of the weights that generated the rollouts.", "orchestrator"),
    _g("rl_orchestrator_step", "steps", "The orchestrator's current step.", "orchestrator"),
    _g("rl_checkpoint_step", "steps", "Step of the checkpoint the inference servers last loaded.", "orchestrator"),
    _g("rl_async_level", "steps", "Configured maximum staleness (async_level).", "orchestrator"),
    # orchestrator: the weight sync of today (pause -> transfer -> resume on every server)
    _h("rl_weight_sync_seconds", "One whole weight sync: first pause sent to last resume answered.", "orchestrator"),
    _h("rl_weight_sync_phase_seconds", "One phase (pause, transfer, resume) of a weight sync on one server, wall time seen by the orchestrator.", "orchestrator", _PHASE_SERVER),
    _h("rl_weight_sync_straggler_seconds", "Per sync and phase: the slowest server's time minus the median server's.", "orchestrator", ("phase",)),
    _g("rl_weight_version", "steps", "The weight version (step) each server serves after the last sync it took part in.", "orchestrator", ("server",)),
    _g("rl_admin_call_inflight_age_seconds", "seconds", "Age of the oldest admin call to a server still waiting for its answer (0 when none).", "orchestrator", _OP_SERVER),
    _g("rl_admin_call_budget_seconds", "seconds", "The caller's time budget for one admin call of this op (its total timeout).", "orchestrator", ("op",)),
    _h("rl_orchestrator_event_loop_lag_seconds", "Lag of the orchestrator's own asyncio loop (a saturated loop delays admin calls too).", "orchestrator"),
    # trainer
    _h("rl_checkpoint_write_seconds", "Time to write one checkpoint, fsync, rename and mark STABLE.", "trainer"),
    _g("rl_checkpoint_bytes", "bytes", "Size of the last checkpoint written.", "trainer"),
    _g("rl_trainer_step", "steps", "The trainer's current step.", "trainer"),
    # inference
    _h("rl_admin_server_seconds", "Admin request time inside the server: first byte received to response sent.", "inference", ("op",)),
    _h("rl_admin_rpc_seconds", "Engine call time (collective_rpc reload) inside the server.", "inference", ("op",)),
    _g("rl_http_inflight_requests", "requests", "HTTP requests being handled, per lane.", "inference", ("lane",)),
    _h("rl_event_loop_lag_seconds", "Lag of the inference server's asyncio loop, from a periodic probe.", "inference"),
    _g("rl_engine_paused", "", "1 while the engine's generation is paused (between /pause and /resume), else 0.", "inference"),
    _h("rl_engine_paused_seconds", "How long generation stood paused: pause answered to resume answered.", "inference"),
    MetricSpec("rl_engine_pause_inflight_requests", "histogram", "requests", "Generation requests held (in flight) when a pause took effect.", "inference", (), COUNT_BUCKETS),
    # weightwatch's own health
    MetricSpec("weightwatch_spans_exported_total", "counter", "", "Spans handed to exporters, by exporter and result (success, failure).", "internal", ("exporter", "result")),
    MetricSpec("weightwatch_spans_dropped_total", "counter", "", "Spans dropped because an export queue was full.", "internal", ("exporter",)),
)

METRICS_BY_NAME: dict[str, MetricSpec] = {m.name: m for m in METRICS}


@dataclass(frozen=True)
class SpanSpec:
    name: str
    kind: str
    role: Role
    help: str
    attributes: tuple[str, ...] = ()


SPANS: tuple[SpanSpec, ...] = (
    SpanSpec("weights.update", "client", "orchestrator", "One weight update across all servers; one child per server.", ("rl.op", "rl.step", "rl.servers")),
    SpanSpec("weights.update.server", "client", "orchestrator", "One admin call to one server (child of weights.update or of a sync phase).", ("rl.op", "rl.server", "rl.wall_ms", "rl.queue_ms", "rl.rpc_ms", "rl.pool_wait_ms")),
    SpanSpec("weights.sync", "internal", "orchestrator", "One weight sync (pause -> transfer -> resume) across all servers; one trace per sync.", ("rl.step", "rl.servers", "rl.mode", "rl.wall_ms")),
    SpanSpec("weights.sync.phase", "internal", "orchestrator", "One phase of a sync (child of weights.sync); one weights.update.server child per server.", ("rl.phase", "rl.op", "rl.wall_ms", "rl.straggler_ms")),
    SpanSpec("admin.request", "server", "inference", "The admin endpoint on the server (parent: the client's traceparent).", ("rl.op", "rl.server_ms")),
    SpanSpec("engine.rpc", "internal", "inference", "The engine call (collective_rpc reload_weights).", ("rl.op", "rl.rpc_ms")),
    SpanSpec("engine.rpc.restore", "internal", "inference", "After a failed load: reloading the last good weights so the engine keeps serving.", ("rl.weights_path", "rl.failed_weights_path")),
    SpanSpec("ckpt.write", "internal", "trainer", "Writing one checkpoint atomically.", ("rl.step", "rl.bytes")),
    SpanSpec("ckpt.wait", "internal", "orchestrator", "Waiting for a checkpoint's STABLE marker.", ("rl.step", "rl.wait_ms")),
    SpanSpec("gen.batch", "internal", "orchestrator", "One generation batch.", ("rl.completions", "rl.inflight")),
)

SPAN_NAMES = tuple(s.name for s in SPANS)


@dataclass(frozen=True)
class EventSpec:
    """One log event of the text grammar; `fields` are required, in their canonical order."""

    tag: str
    name: str
    fields: tuple[tuple[str, str], ...]  # (key, type) with type in {"str", "int", "float"}
    role: Role
    help: str = ""
    has_tid: bool = False

    @property
    def key(self) -> str:
        return f"{self.tag}.{self.name}" if self.name else self.tag


EVENTS: tuple[EventSpec, ...] = (
    EventSpec("weights", "client.send", (("url", "str"), ("op", "str"), ("t", "float")), "orchestrator", "Admin request leaves the client.", True),
    EventSpec("weights", "server.recv", (("path", "str"), ("t", "float")), "inference", "First byte of the admin request reached the server.", True),
    EventSpec("weights", "rpc.start", (("op", "str"), ("t", "float")), "inference", "Engine call starts.", True),
    EventSpec("weights", "rpc.done", (("op", "str"), ("t", "float"), ("rpc_ms", "float")), "inference", "Engine call done.", True),
    EventSpec("weights", "client.done", (("wall_ms", "float"), ("rpc_ms", "float"), ("queue_ms", "float")), "orchestrator", "Client got the answer.", True),
    EventSpec("weights", "sync.start", (("step", "int"), ("servers", "int"), ("t", "float")), "orchestrator", "A weight sync (pause -> transfer -> resume) starts.", True),
    EventSpec(
        "weights",
        "sync.done",
        (("step", "int"), ("wall_ms", "float"), ("pause_ms", "float"), ("transfer_ms", "float"), ("resume_ms", "float"), ("ok", "int")),
        "orchestrator",
        "A weight sync ended (phase times are the slowest server's).",
        True,
    ),
    EventSpec("ckpt", "write.done", (("step", "int"), ("write_ms", "float")), "trainer", "Checkpoint written and marked STABLE."),
    EventSpec("ckpt", "wait.start", (("target_step", "int"),), "orchestrator", "Orchestrator starts waiting for a checkpoint."),
    EventSpec("ckpt", "wait.done", (("target_step", "int"), ("wait_ms", "float")), "orchestrator", "Checkpoint found."),
    EventSpec("gen", "batch.start", (("inflight", "int"), ("target_batch", "int")), "orchestrator", "Generation batch starts."),
    EventSpec("gen", "batch.done", (("completions", "int"), ("dur_ms", "float"), ("inflight", "int")), "orchestrator", "Generation batch done."),
    EventSpec("rollout", "", (("trunc_pct", "float"), ("current_step", "int"), ("ckpt_step", "int"), ("staleness", "int")), "orchestrator", "Rollout hygiene for one step."),
)

EVENTS_BY_KEY: dict[str, EventSpec] = {e.key: e for e in EVENTS}


def as_dict() -> dict:
    """The catalogue as plain data, the schema of `weightwatch catalogue --format json`."""
    return {
        "metrics": [
            {
                "name": m.name,
                "type": m.type,
                "unit": m.unit,
                "labels": list(m.labels),
                "help": m.help,
                "role": m.role,
                "buckets": list(m.buckets) if m.buckets else None,
            }
            for m in METRICS
        ],
        "spans": [asdict(s) | {"attributes": list(s.attributes)} for s in SPANS],
        "events": [
            {"key": e.key, "tag": e.tag, "name": e.name, "fields": [k for k, _ in e.fields], "role": e.role, "has_tid": e.has_tid, "help": e.help}
            for e in EVENTS
        ],
    }


def to_json() -> str:
    return json.dumps(as_dict(), indent=2)


def to_table() -> str:
    """A human-readable table for `weightwatch catalogue`."""
    rows = [("METRIC", "TYPE", "UNIT", "LABELS", "HELP")]
    rows += [(m.name, m.type, m.unit or "-", ",".join(m.labels) or "-", m.help) for m in METRICS]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows]
    lines.append("")
    lines.append("SPAN".ljust(24) + "  ROLE".ljust(15) + "  HELP")
    lines += [f"{s.name:<24}  {s.role:<12}  {s.help}" for s in SPANS]
    lines.append("")
    lines.append("EVENT".ljust(28) + "  FIELDS")
    for e in EVENTS:
        head = f"[{e.tag}][TID] {e.name}" if e.has_tid else f"[{e.tag}] {e.name}".rstrip()
        lines.append(f"{head:<28}  " + " ".join(f"{k}=" for k, _ in e.fields))
    return "\n".join(lines)
