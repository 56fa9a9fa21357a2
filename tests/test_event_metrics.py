"""One event -> metric table: the live emitters and `weightwatch tail` record the same metrics from the same run.

The run is real: AdminClient syncs (ok, a failed update, a failed pause), the old bare update and reload,
the httpx instrumentor on a prime-rl-style client, a checkpoint written and waited for, a generation batch
and a rollout record, all against real servers on 127.0.0.1 and a real filesystem. Its log file is then
replayed through tail and the two registries are compared family by family.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import weightwatch
from admin_app import AdminBehaviour, AdminServer
from prime_rl_client import PrimeRLStyleAdmin
from weightwatch.analysis.tail import EventMetrics, Tailer
from weightwatch.event_metrics import EventRecorder, failure_reason
from weightwatch.events import format_event
from weightwatch.orchestrator import (
    AdminClient,
    AdminHTTPXInstrumentor,
    AdminTimeouts,
    GenerationTracker,
    SyncTimeouts,
    record_rollout,
    wait_for_checkpoint,
)
from weightwatch.telemetry import Metrics
from weightwatch.trainer import CheckpointWriter

#: Gauges whose value is a wall-clock time: compared by their label sets only.
CLOCK_GAUGES = {"rl_weight_update_last_success_timestamp_seconds"}


def families(registry: CollectorRegistry) -> dict[str, dict[tuple, float]]:
    """name -> {(sample name, labels): value} for the families that hold samples; bucket lines and _created left out."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in registry.collect():
        if fam.name.startswith("weightwatch_"):
            continue  # weightwatch's own span export counters: not events
        rows = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for s in fam.samples
            if not s.name.endswith(("_bucket", "_created"))
        }
        # a family with no observation at all (an unlabelled histogram created eagerly shows _count 0) holds no data
        if rows and any(v != 0 for v in rows.values()):
            out[fam.name] = rows
    return out


def label_sets(registry: CollectorRegistry, name: str) -> set[tuple]:
    return {tuple(sorted(s.labels.items())) for fam in registry.collect() if fam.name == name for s in fam.samples}


@pytest.fixture
def run_log(telemetry_reset, tmp_path):
    log = tmp_path / "orchestrator.log"
    tele = weightwatch.setup("table-test", role="orchestrator", log_file=log)
    return tele, log


def test_live_emitters_and_tail_record_the_same_metric_families(run_log, tmp_path: Path) -> None:
    tele, log = run_log
    a, b = AdminServer(AdminBehaviour()).start(), AdminServer(AdminBehaviour()).start()
    timeouts = SyncTimeouts(pause=AdminTimeouts(read=10, total=10), transfer=AdminTimeouts(read=10, total=10))
    try:
        writer = CheckpointWriter(tmp_path / "ckpt")

        async def go() -> None:
            async with AdminClient([a.url, b.url], backoff_base=0.01, backoff_max=0.02) as admin:
                assert (await admin.update_weights(tmp_path / "ckpt" / "step_1", step=1)).ok
                assert (await admin.reload_weights()).ok
                writer.write(2, {"w": np.zeros((4, 4), dtype=np.float32)})
                await wait_for_checkpoint(tmp_path / "ckpt", 2, timeout=10, poll_interval=0.01)
                assert (await admin.sync_weights(tmp_path / "ckpt" / "step_2", 2, timeouts=timeouts)).ok
                b.behaviour.statuses["update_weights"] = [500, 500, 500]
                assert (await admin.sync_weights(tmp_path / "ckpt" / "step_3", 3, timeouts=timeouts)).reason == "transfer_failed"
                a.behaviour.statuses["pause"] = [400]
                assert (await admin.sync_weights(tmp_path / "ckpt" / "step_4", 4, timeouts=timeouts)).reason == "pause_failed"
                a.behaviour.statuses["resume"] = [503]  # retried inside the call: not a failure
                assert (await admin.sync_weights(tmp_path / "ckpt" / "step_5", 5, timeouts=timeouts)).ok
            inst = AdminHTTPXInstrumentor()
            inst.instrument()
            try:
                foreign = PrimeRLStyleAdmin([a.url, b.url])
                b.behaviour.statuses["update_weights"] = [503]  # an attempt prime-rl retries: a failure of that call
                await foreign.update_weights(str(tmp_path / "ckpt" / "step_6"))
                await foreign.aclose()
            finally:
                inst.uninstrument()
            tracker = GenerationTracker()
            with tracker.batch(2):
                for _ in range(2):
                    with tracker.request():
                        pass
            record_rollout(6, 5, truncated=1, total=4, async_level=2)

        asyncio.run(go())
    finally:
        a.stop()
        b.stop()
    for h in tele._handlers:
        h.flush()

    live = families(tele.registry)
    replay = CollectorRegistry()
    tailer = Tailer([str(log)], replay, from_start=True)
    tailer.poll_once()
    tailer.close()
    assert tailer.events.stats.rejected == 0
    tailed = families(replay)

    # the age of calls in flight is 0 at the end on both sides, for the same (op, server) pairs
    ages = label_sets(tele.registry, "rl_admin_call_inflight_age_seconds")
    assert len(ages) == 2 * 4 and ages == label_sets(replay, "rl_admin_call_inflight_age_seconds")  # 2 servers x 4 ops
    # the run produced the families the sync is about, live ...
    for name in ("rl_weight_sync_seconds", "rl_weight_sync_phase_seconds", "rl_weight_sync_straggler_seconds", "rl_weight_version",
                 "rl_admin_call_budget_seconds", "rl_weight_update_failures",
                 "rl_checkpoint_write_seconds", "rl_checkpoint_wait_seconds", "rl_generation_batch_seconds", "rl_rollout_staleness_steps"):
        assert name in live, name
    # ... and tail has exactly the same families, label sets and counts/sums/values
    assert set(tailed) == set(live)
    for name, rows in live.items():
        assert set(tailed[name]) == set(rows), name
        if name in CLOCK_GAUGES:
            continue
        for key, value in rows.items():
            other = tailed[name][key]
            if math.isnan(value):
                assert math.isnan(other), (name, key)
            else:
                assert other == pytest.approx(value, rel=1e-9, abs=1e-9), (name, key, value, other)
    failures = live["rl_weight_update_failures"]
    assert failures[("rl_weight_update_failures_total", (("op", "update_weights"), ("reason", "http_5xx"), ("server", b.label)))] == 2
    assert failures[("rl_weight_update_failures_total", (("op", "pause"), ("reason", "http_4xx"), ("server", a.label)))] == 1
    versions = live["rl_weight_version"]
    assert versions[("rl_weight_version", (("server", a.label),))] == 6 and versions[("rl_weight_version", (("server", b.label),))] == 6


def test_a_failed_done_is_a_failure_under_tail(tmp_path: Path) -> None:
    """The seed's tail bug: status=503 ok=0 was counted as a success."""
    reg = CollectorRegistry()
    ev = EventMetrics(reg)
    url = "http://10.0.0.1:8000/update_weights"
    ev.line(format_event("weights.client.send", "t1", url=url, op="update_weights", t=1.0).encode())
    ev.line(("INFO x " + format_event("weights.client.done", "t1", wall_ms=40.0, rpc_ms=None, queue_ms=None, status=503, ok=0,
                                      url=url, op="update_weights")).encode())
    labels = {"op": "update_weights", "server": "10.0.0.1:8000"}
    assert reg.get_sample_value("rl_weight_update_failures_total", labels | {"reason": "http_5xx"}) == 1
    assert reg.get_sample_value("rl_weight_update_last_success_timestamp_seconds", labels) is None
    assert reg.get_sample_value("rl_weight_update_wall_seconds_count", labels) is None
    assert reg.get_sample_value("rl_admin_call_inflight_age_seconds", labels) == 0


def test_seed_era_lines_take_the_op_from_the_url_and_pair_by_trace_id() -> None:
    reg = CollectorRegistry()
    ev = EventMetrics(reg)
    ev.line(b"[weights][abc123] client.send url=http://10.0.0.9:8000/reload_weights t=1700000000.0")
    ev.line(b"2026-01-01 INFO [weights][abc123] client.done wall_ms=120.0 rpc_ms=80.0 queue_ms=40.0")
    assert ev.stats.rejected == 0 and ev.stats.events == 2
    labels = {"op": "reload_weights", "server": "10.0.0.9:8000"}
    assert reg.get_sample_value("rl_weight_update_wall_seconds_count", labels) == 1
    assert reg.get_sample_value("rl_weight_update_queue_seconds_sum", labels) == pytest.approx(0.04)
    assert reg.get_sample_value("rl_admin_call_inflight_age_seconds", labels) == 0


def test_a_send_without_its_done_shows_as_an_ageing_call_under_tail() -> None:
    import time

    reg = CollectorRegistry()
    ev = EventMetrics(reg)
    sent = time.time() - 42.0
    ev.line(format_event("weights.client.send", "h1", url="http://10.0.0.3:8000/pause", op="pause", t=sent, budget_s=300.0).encode())
    age = reg.get_sample_value("rl_admin_call_inflight_age_seconds", {"op": "pause", "server": "10.0.0.3:8000"})
    assert age >= 42.0
    assert reg.get_sample_value("rl_admin_call_budget_seconds", {"op": "pause"}) == 300


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"status": 503, "ok": 0}, "http_5xx"),
        ({"status": "404", "ok": "0"}, "http_4xx"),
        ({"status": 200, "ok": True}, None),
        ({}, None),  # a seed-era line: success as the seed meant it
        ({"ok": "0", "reason": "timeout"}, "timeout"),
        ({"status": "na", "ok": "0"}, "transport"),
        ({"status": 502}, "http_5xx"),  # a 5xx is a failure even without ok=
        ({"ok": 0, "reason": "cancelled"}, "cancelled"),
    ],
)
def test_failure_reason(fields, reason) -> None:
    assert failure_reason(fields) == reason


def test_cancelled_calls_are_neither_failures_nor_successes() -> None:
    reg = CollectorRegistry()
    rec = EventRecorder(Metrics(reg))
    rec.record("weights.client.send", "c1", {"url": "http://h:1/update_weights", "op": "update_weights", "t": 1.0})
    rec.record("weights.client.done", "c1", {"url": "http://h:1/update_weights", "op": "update_weights", "wall_ms": 5.0, "ok": False,
                                             "reason": "cancelled", "rpc_ms": None, "queue_ms": None})
    labels = {"op": "update_weights", "server": "h:1"}
    assert reg.get_sample_value("rl_weight_update_failures_total", labels | {"reason": "cancelled"}) is None
    assert reg.get_sample_value("rl_weight_update_wall_seconds_count", labels) is None
    assert reg.get_sample_value("rl_admin_call_inflight_age_seconds", labels) == 0
