"""AdminClient.sync_weights against real HTTP servers on 127.0.0.1 (FastAPI + uvicorn), no mocks.

Pause every server, then update every server, then resume every server; resume always runs. Each test
drives real requests and checks what the servers saw, the result, the spans, the events and the metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import weightwatch
from admin_app import AdminBehaviour, AdminServer
from conftest import free_port
from weightwatch import events
from weightwatch.orchestrator import AdminClient, AdminSyncError, AdminTimeouts, LoraAdapter, SyncResult, SyncTimeouts

SHORT = SyncTimeouts(pause=AdminTimeouts(connect=2, read=10, total=10), transfer=AdminTimeouts(connect=2, read=20, total=20),
                     resume=AdminTimeouts(connect=2, read=10, total=10))


@pytest.fixture
def admin_servers():
    started: list[AdminServer] = []

    def make(n: int = 1) -> list[AdminServer]:
        out = [AdminServer(AdminBehaviour()).start() for _ in range(n)]
        started.extend(out)
        return out

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def tele(telemetry_reset, tmp_path):
    return weightwatch.setup("sync-test", role="orchestrator", span_file=tmp_path / "spans.jsonl", metrics_port=0, metrics_addr="127.0.0.1")


def spans(tele) -> list[dict]:
    tele.force_flush()
    return [json.loads(line) for line in tele.span_file.read_text().splitlines()]


def sample(tele, name: str, **labels: str) -> float | None:
    return tele.registry.get_sample_value(name, labels)


def scrape(tele, name: str, **labels: str) -> float | None:
    """One value read through the real /metrics endpoint, as Prometheus reads it."""
    text = httpx.get(f"http://127.0.0.1:{tele.metrics_port}/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def weight_events(caplog) -> list[events.Event]:
    out = []
    for rec in caplog.records:
        ev = events.parse_line(rec.getMessage())
        if isinstance(ev, events.Event) and ev.tag == "weights":
            out.append(ev)
    return out


def sync(servers: list[AdminServer], step: int, weight_dir: str = "/tmp/w/step_{}", **kw) -> SyncResult:
    return syncs(servers, [step], weight_dir, **kw)[-1]


def syncs(servers: list[AdminServer], steps: list[int], weight_dir: str = "/tmp/w/step_{}", between=None, **kw) -> list[SyncResult]:
    """Syncs one after the other on ONE client (as an orchestrator does); ``between()`` runs after the first."""

    async def go() -> list[SyncResult]:
        out = []
        async with AdminClient([s.url for s in servers], retries=kw.pop("retries", 2), backoff_base=0.01, backoff_max=0.02) as admin:
            timeouts = kw.pop("timeouts", SHORT)
            for i, step in enumerate(steps):
                if i == 1 and between is not None:
                    between()
                out.append(await admin.sync_weights(weight_dir.format(step), step, timeouts=timeouts, **kw))
        return out

    return asyncio.run(go())


def test_phases_in_order_one_trace_metrics_events(tele, admin_servers, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    servers = admin_servers(3)
    for s, d in zip(servers, (0.02, 0.03, 0.3), strict=True):
        s.behaviour.delay_s["update_weights"] = d  # the third server is the transfer's straggler
    result = sync(servers, 7)

    assert result.ok and result.step == 7 and not result.transfer_skipped and result.reason is None
    assert set(result.phases) == {"pause", "transfer", "resume"}
    assert result.versions == {s.label: 7 for s in servers}
    result.raise_for_failures()

    # each phase ended on every server before the next began on any
    for s in servers:
        assert s.behaviour.ops() == ["pause", "update_weights", "resume"]
    last_pause = max(s.behaviour.of("pause")[0].t_done for s in servers)
    first_update = min(s.behaviour.of("update_weights")[0].t_recv for s in servers)
    last_update = max(s.behaviour.of("update_weights")[0].t_done for s in servers)
    first_resume = min(s.behaviour.of("resume")[0].t_recv for s in servers)
    assert last_pause <= first_update and last_update <= first_resume
    # prime-rl's request shapes
    for s in servers:
        assert s.behaviour.of("pause")[0].query == {"mode": "keep", "clear_cache": "false"}
        assert s.behaviour.of("update_weights")[0].body == {"weight_dir": "/tmp/w/step_7"}

    # one trace: weights.sync -> three phase spans -> one call span per server; traceparent carries it
    sp = spans(tele)
    root = [x for x in sp if x["name"] == "weights.sync"]
    assert len(root) == 1 and root[0]["trace_id"] == result.trace_id
    assert root[0]["attributes"]["rl.step"] == 7 and root[0]["attributes"]["rl.servers"] == 3
    phases = [x for x in sp if x["name"] == "weights.sync.phase"]
    assert sorted(p["attributes"]["rl.phase"] for p in phases) == ["pause", "resume", "transfer"]
    assert {p["parent_span_id"] for p in phases} == {root[0]["span_id"]}
    calls = [x for x in sp if x["name"] == "weights.update.server"]
    assert len(calls) == 9 and {c["trace_id"] for c in calls} == {result.trace_id}
    for p in phases:
        mine = [c for c in calls if c["parent_span_id"] == p["span_id"]]
        assert len(mine) == 3 and {c["attributes"]["rl.server"] for c in mine} == {s.label for s in servers}
    for s in servers:
        for seen in s.behaviour.seen:
            assert seen.headers["traceparent"].split("-")[1] == result.trace_id

    # events: sync.start/sync.done around 9 calls, all with the sync's TID and the step
    evs = weight_events(caplog)
    assert {e.tid for e in evs} == {result.trace_id}
    assert [e.name for e in evs][0] == "sync.start" and [e.name for e in evs][-1] == "sync.done"
    done = evs[-1]
    assert done["step"] == 7 and done["ok"] == 1 and done["servers"] == "3"
    assert done["transfer_ms"] == pytest.approx(result.phase_ms["transfer"], abs=0.01)
    call_done = [e for e in evs if e.name == "client.done"]
    assert len(call_done) == 9 and all(e["step"] == "7" and e["ok"] == "1" and e["status"] == "200" for e in call_done)
    assert {e["op"] for e in call_done} == {"pause", "update_weights", "resume"}
    sends = [e for e in evs if e.name == "client.send"]
    assert len(sends) == 9 and all(e["step"] == "7" for e in sends)

    # metrics
    assert sample(tele, "rl_weight_sync_seconds_count") == 1
    assert sample(tele, "rl_weight_sync_seconds_sum") == pytest.approx(result.wall_ms / 1000, abs=1e-3)
    for s in servers:
        for phase in ("pause", "transfer", "resume"):
            assert sample(tele, "rl_weight_sync_phase_seconds_count", phase=phase, server=s.label) == 1
        for op in ("pause", "update_weights", "resume"):
            assert sample(tele, "rl_weight_update_wall_seconds_count", op=op, server=s.label) == 1
        assert sample(tele, "rl_weight_version", server=s.label) == 7
    transfer_times = [r.wall_ms for r in result.phases["transfer"]]
    gap = max(transfer_times) - statistics.median(transfer_times)
    assert result.straggler_ms["transfer"] == pytest.approx(gap)
    assert sample(tele, "rl_weight_sync_straggler_seconds_sum", phase="transfer") == pytest.approx(gap / 1000, abs=1e-5)
    slow = max(result.phases["transfer"], key=lambda r: r.wall_ms)
    assert slow.server == servers[2].url  # the server that slept 300 ms is named the straggler
    assert sample(tele, "rl_checkpoint_step") == 7
    assert sample(tele, "rl_admin_call_budget_seconds", op="update_weights") == 20
    assert sample(tele, "rl_admin_call_budget_seconds", op="pause") == 10
    assert scrape(tele, "rl_admin_call_inflight_age_seconds", op="update_weights", server=servers[0].label) == 0


def test_failed_pause_skips_the_transfer_everywhere_and_still_resumes(tele, admin_servers) -> None:
    a, b = admin_servers(2)
    first, result = syncs([a, b], [1, 2], between=lambda: b.behaviour.statuses.update(pause=[409]))  # a 4xx: never retried
    assert first.ok

    assert not result.ok and result.reason == "pause_failed" and result.transfer_skipped
    assert "transfer" not in result.phases
    assert a.behaviour.ops()[3:] == ["pause", "resume"] and b.behaviour.ops()[3:] == ["pause", "resume"]
    assert len(b.behaviour.of("pause")) == 2  # one per sync: the 409 was not retried
    assert result.versions == {a.label: 1, b.label: 1}  # no skew: nobody took step 2
    for s in (a, b):
        assert sample(tele, "rl_weight_version", server=s.label) == 1
    assert sample(tele, "rl_weight_update_failures_total", op="pause", server=b.label, reason="http_4xx") == 1
    assert sample(tele, "rl_weight_sync_seconds_count") == 2
    assert sample(tele, "rl_checkpoint_step") == 1  # the failed sync does not claim step 2
    with pytest.raises(AdminSyncError, match="pause on .*http_4xx.*transfer skipped"):
        result.raise_for_failures()


def test_failed_update_still_resumes_and_the_skew_shows(tele, admin_servers) -> None:
    a, b = admin_servers(2)
    # every attempt of b's second update fails (retries=2: three attempts)
    first, result = syncs([a, b], [1, 2], between=lambda: b.behaviour.statuses.update(update_weights=[500, 500, 500]))
    assert first.ok

    assert not result.ok and result.reason == "transfer_failed"
    assert [r.ok for r in result.phases["transfer"]] == [True, False]
    assert result.phases["transfer"][1].attempts == 3 and result.phases["transfer"][1].reason == "http_5xx"
    assert all(r.ok for r in result.phases["resume"])
    assert b.behaviour.ops()[-1] == "resume" and not b.behaviour.paused and not a.behaviour.paused
    assert result.versions == {a.label: 2, b.label: 1}
    assert sample(tele, "rl_weight_version", server=a.label) == 2
    assert sample(tele, "rl_weight_version", server=b.label) == 1  # unchanged: the skew is visible
    assert sample(tele, "rl_weight_update_failures_total", op="update_weights", server=b.label, reason="http_5xx") == 1


def test_5xx_is_retried_then_succeeds_and_is_one_call(tele, admin_servers, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    (a,) = admin_servers(1)
    a.behaviour.statuses["pause"] = [503]
    a.behaviour.statuses["resume"] = [502, 503]
    result = sync([a], 3)

    assert result.ok
    assert result.phases["pause"][0].attempts == 2 and result.phases["resume"][0].attempts == 3
    assert a.behaviour.ops() == ["pause", "pause", "update_weights", "resume", "resume", "resume"]
    assert sample(tele, "rl_weight_update_failures_total", op="pause", server=a.label, reason="http_5xx") is None
    assert sample(tele, "rl_weight_update_wall_seconds_count", op="resume", server=a.label) == 1
    evs = weight_events(caplog)
    assert [e["attempt"] for e in evs if e.name == "client.send" and e["op"] == "resume"] == ["1", "2", "3"]
    assert len([e for e in evs if e.name == "client.done" and e["op"] == "resume"]) == 1


def test_4xx_on_update_is_not_retried(tele, admin_servers) -> None:
    (a,) = admin_servers(1)
    a.behaviour.statuses["update_weights"] = [400]
    result = sync([a], 4)
    assert result.reason == "transfer_failed" and result.phases["transfer"][0].attempts == 1
    assert "HTTP 400" in (result.phases["transfer"][0].error or "")
    assert a.behaviour.ops() == ["pause", "update_weights", "resume"]


def test_cancelled_sync_still_resumes_every_server(tele, admin_servers, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    a, b = admin_servers(2)
    a.behaviour.hang.add("update_weights")

    async def go() -> None:
        async with AdminClient([a.url, b.url]) as admin:
            task = asyncio.create_task(admin.sync_weights("/tmp/w/step_5", 5, timeouts=SHORT))
            while not a.behaviour.of("update_weights"):
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # the resume runs to its end on the admin loop although the caller was cancelled
            deadline = time.monotonic() + 20
            while not (a.behaviour.of("resume") and b.behaviour.of("resume") and a.behaviour.of("resume")[0].t_done):
                assert time.monotonic() < deadline, "resume never reached the servers after the cancellation"
                await asyncio.sleep(0.01)
            while not [r for r in caplog.records if "sync.done" in r.getMessage()]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)

    asyncio.run(go())
    assert not a.behaviour.paused and not b.behaviour.paused
    done = [e for e in weight_events(caplog) if e.name == "sync.done"]
    assert len(done) == 1 and done[0]["ok"] == 0 and done[0]["reason"] == "cancelled"
    cancelled = [e for e in weight_events(caplog) if e.name == "client.done" and e.get("reason") == "cancelled"]
    assert a.url + "/update_weights" in {e["url"] for e in cancelled}  # (b's update may have been cut too)
    assert {e["op"] for e in cancelled} == {"update_weights"}
    # a cancelled call is neither a failure nor a success, and it is no longer in flight
    assert sample(tele, "rl_weight_update_failures_total", op="update_weights", server=a.label, reason="cancelled") is None
    assert scrape(tele, "rl_admin_call_inflight_age_seconds", op="update_weights", server=a.label) == 0


def test_closing_the_client_right_after_a_cancelled_sync_still_resumes(tele, admin_servers) -> None:
    """aclose() straight after the cancellation must not stop the admin loop under the shielded resumes."""
    a, b = admin_servers(2)
    a.behaviour.hang.add("update_weights")

    async def go() -> None:
        async with AdminClient([a.url, b.url]) as admin:
            task = asyncio.create_task(admin.sync_weights("/tmp/w/step_6", 6, timeouts=SHORT))
            while not a.behaviour.of("update_weights"):
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        # leaving the block closed the client at once: no waiting here for the resumes

    asyncio.run(go())
    assert a.behaviour.of("resume") and b.behaviour.of("resume")
    assert not a.behaviour.paused and not b.behaviour.paused


def test_inflight_age_grows_while_a_call_hangs_and_returns_to_zero(tele, admin_servers) -> None:
    a, b = admin_servers(2)
    b.behaviour.hang.add("update_weights")
    timeouts = SyncTimeouts(transfer=AdminTimeouts(connect=2, read=120, total=120))
    ages: list[float] = []

    async def go() -> SyncResult:
        async with AdminClient([a.url, b.url]) as admin:
            task = asyncio.create_task(admin.sync_weights("/tmp/w/step_6", 6, timeouts=timeouts))
            while not b.behaviour.of("update_weights"):
                await asyncio.sleep(0.01)
            for _ in range(3):
                await asyncio.sleep(0.25)
                ages.append(await asyncio.to_thread(scrape, tele, "rl_admin_call_inflight_age_seconds", op="update_weights", server=b.label))
            assert await asyncio.to_thread(scrape, tele, "rl_admin_call_budget_seconds", op="update_weights") == 120
            assert await asyncio.to_thread(scrape, tele, "rl_admin_call_budget_seconds", op="pause") == 300  # prime-rl's default
            b.behaviour.release.set()
            return await task

    result = asyncio.run(go())
    assert result.ok
    assert 0 < ages[0] < ages[1] < ages[2]  # grows with no thread updating it: computed at scrape time
    assert scrape(tele, "rl_admin_call_inflight_age_seconds", op="update_weights", server=b.label) == 0
    assert scrape(tele, "rl_admin_call_inflight_age_seconds", op="update_weights", server=a.label) == 0


def test_a_hung_call_ends_at_its_budget_and_resume_still_runs(tele, admin_servers) -> None:
    (a,) = admin_servers(1)
    a.behaviour.hang.add("update_weights")
    timeouts = SyncTimeouts(transfer=AdminTimeouts(connect=2, read=0.5, total=0.5))
    result = sync([a], 8, timeouts=timeouts)
    assert result.reason == "transfer_failed" and result.phases["transfer"][0].reason == "timeout"
    assert a.behaviour.ops() == ["pause", "update_weights", "resume"]
    assert sample(tele, "rl_weight_update_failures_total", op="update_weights", server=a.label, reason="timeout") == 1
    assert sample(tele, "rl_admin_call_budget_seconds", op="update_weights") == 0.5
    assert scrape(tele, "rl_admin_call_inflight_age_seconds", op="update_weights", server=a.label) == 0


def test_lora_transfer_uses_load_lora_adapter(tele, admin_servers) -> None:
    (a,) = admin_servers(1)
    result = sync([a], 9, weight_dir="unused", lora=LoraAdapter("step_9", "/tmp/lora/step_9"))
    assert result.ok and a.behaviour.ops() == ["pause", "load_lora_adapter", "resume"]
    assert a.behaviour.of("load_lora_adapter")[0].body == {"lora_name": "step_9", "lora_path": "/tmp/lora/step_9"}
    assert sample(tele, "rl_weight_version", server=a.label) == 9


def test_unreachable_server_fails_the_pause_and_the_others_resume(tele, admin_servers) -> None:
    (a,) = admin_servers(1)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    async def go() -> SyncResult:
        async with AdminClient([a.url, dead], retries=1, backoff_base=0.01, backoff_max=0.02) as admin:
            return await admin.sync_weights("/tmp/w/step_11", 11, timeouts=SHORT)

    result = asyncio.run(go())
    assert result.reason == "pause_failed" and result.phases["pause"][1].reason == "transport"
    assert a.behaviour.ops()[-2:] == ["pause", "resume"] and not a.behaviour.paused


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"mode": "sometimes"}, "mode must be one of"), ({"step": -1}, "step must be"), ({"step": "3"}, "step must be"),
     ({"timeouts": AdminTimeouts()}, "SyncTimeouts")],
)
def test_bad_input_is_refused_before_any_call(admin_servers, kwargs, error) -> None:
    (a,) = admin_servers(1)

    async def go() -> None:
        async with AdminClient([a.url]) as admin:
            args = {"step": 1} | kwargs
            await admin.sync_weights("/tmp/w/step_1", args.pop("step"), **args)

    with pytest.raises((ValueError, TypeError), match=error):
        asyncio.run(go())
    assert a.behaviour.seen == []
