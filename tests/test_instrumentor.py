"""AdminHTTPXInstrumentor on httpx clients weightwatch did not write, against real servers on 127.0.0.1.

The client under test is prime_rl_client.PrimeRLStyleAdmin: plain httpx, driven exactly as prime-rl drives
its own (pause keep -> update weight_dir -> resume in a finally, 5xx retried, 4xx raised).
"""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

import weightwatch
from admin_app import AdminBehaviour, AdminServer
from prime_rl_client import PrimeRLStyleAdmin
from weightwatch import events
from weightwatch.orchestrator import AdminClient, AdminHTTPXInstrumentor, SyncTimeouts
from weightwatch.orchestrator.httpx_instrumentor import admin_op

ORIGINAL_ASYNC_SEND = httpx.AsyncClient.send
ORIGINAL_SYNC_SEND = httpx.Client.send


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
    return weightwatch.setup("instr-test", role="orchestrator", span_file=tmp_path / "spans.jsonl")


@pytest.fixture
def instrumented(tele):
    inst = AdminHTTPXInstrumentor()
    inst.instrument()
    yield inst
    inst.uninstrument()
    assert httpx.AsyncClient.send is ORIGINAL_ASYNC_SEND and httpx.Client.send is ORIGINAL_SYNC_SEND


def spans(tele) -> list[dict]:
    tele.force_flush()
    return [json.loads(line) for line in tele.span_file.read_text().splitlines()] if tele.span_file.exists() else []


def sample(tele, name: str, **labels: str) -> float | None:
    return tele.registry.get_sample_value(name, labels)


def weight_events(caplog) -> list[events.Event]:
    out = []
    for rec in caplog.records:
        ev = events.parse_line(rec.getMessage())
        if isinstance(ev, events.Event) and ev.tag == "weights":
            out.append(ev)
    return out


def drive(servers: list[AdminServer], weight_dir: str, *, generate: bool = False, **kw) -> BaseException | None:
    """One prime-rl-style sync (and a generation stream); returns what it raised, if anything."""

    async def go() -> BaseException | None:
        admin = PrimeRLStyleAdmin([s.url for s in servers], **kw)
        try:
            if generate:
                assert b"[DONE]" in b"".join(await admin.generate("hello"))
            await admin.update_weights(weight_dir)
            if generate:
                await admin.generate("again")
            return None
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            return exc
        finally:
            await admin.aclose()

    return asyncio.run(go())


def test_admin_paths_are_recognised_by_suffix_only() -> None:
    assert admin_op("/pause") == "pause" and admin_op("/v1/admin/update_weights") == "update_weights"
    assert admin_op("/resume") == "resume" and admin_op("/load_lora_adapter") == "load_lora_adapter"
    assert admin_op("/v1/completions") is None and admin_op("/v1/chat/completions") is None and admin_op("/pause/x") is None


def test_prime_rl_sequence_is_one_traced_measured_sync(tele, instrumented, admin_servers, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    a, b = admin_servers(2)
    b.behaviour.statuses["update_weights"] = [503]  # prime-rl retries it
    b.behaviour.delay_s["resume"] = 0.2
    assert drive([a, b], "/ckpt/weights/step_12", generate=True) is None

    for s in (a, b):
        assert [x for x in s.behaviour.ops() if x != "completions"][:1] == ["pause"]
    assert b.behaviour.ops() == ["pause", "update_weights", "update_weights", "resume"]

    evs = weight_events(caplog)
    starts = [e for e in evs if e.name == "sync.start"]
    dones = [e for e in evs if e.name == "sync.done"]
    assert len(starts) == 1 and len(dones) == 1
    tid = starts[0].tid
    assert starts[0]["step"] == 12 and starts[0]["servers"] == 2  # the step from weight_dir's step_N
    assert dones[0]["ok"] == 1 and dones[0]["step"] == 12 and dones[0].tid == tid
    assert dones[0]["resume_ms"] >= 200  # b's resume slept 200 ms: the phase is the slowest server's
    calls = [e for e in evs if e.name in ("client.send", "client.done")]
    assert {e.tid for e in calls} == {tid}  # every call of the sync carries its trace id
    assert len([e for e in calls if e.name == "client.done"]) == 7  # 2 pauses, 3 update attempts, 2 resumes
    update_dones = [e for e in calls if e.name == "client.done" and e["op"] == "update_weights"]
    assert sorted(e["status"] for e in update_dones) == ["200", "200", "503"]
    assert all(e["step"] == "12" for e in update_dones)
    assert all(e.name != "client.send" or "completions" not in e["url"] for e in calls)

    # spans: weights.sync -> 3 phases -> the calls; the servers got the sync's traceparent
    sp = spans(tele)
    root = [x for x in sp if x["name"] == "weights.sync"]
    assert len(root) == 1 and root[0]["trace_id"] == tid and root[0]["attributes"]["rl.step"] == 12
    phases = {p["attributes"]["rl.phase"]: p for p in sp if p["name"] == "weights.sync.phase"}
    assert set(phases) == {"pause", "transfer", "resume"} and {p["parent_span_id"] for p in phases.values()} == {root[0]["span_id"]}
    server_spans = [x for x in sp if x["name"] == "weights.update.server"]
    assert len(server_spans) == 7 and {x["trace_id"] for x in server_spans} == {tid}
    assert {x["parent_span_id"] for x in server_spans if x["attributes"]["rl.op"] == "update_weights"} == {phases["transfer"]["span_id"]}
    for s in (a, b):
        for seen in s.behaviour.seen:
            assert seen.headers["traceparent"].split("-")[1] == tid

    # metrics: the same families AdminClient writes
    for s in (a, b):
        for op in ("pause", "update_weights", "resume"):
            assert sample(tele, "rl_weight_update_wall_seconds_count", op=op, server=s.label) == 1
            assert sample(tele, "rl_weight_update_pool_wait_seconds_count", op=op, server=s.label) >= 1
        for phase in ("pause", "transfer", "resume"):
            assert sample(tele, "rl_weight_sync_phase_seconds_count", phase=phase, server=s.label) == 1
        assert sample(tele, "rl_weight_version", server=s.label) == 12
    assert sample(tele, "rl_weight_update_failures_total", op="update_weights", server=b.label, reason="http_5xx") == 1
    assert sample(tele, "rl_weight_sync_seconds_count") == 1
    assert sample(tele, "rl_weight_sync_straggler_seconds_count", phase="resume") == 1
    assert sample(tele, "rl_admin_call_budget_seconds", op="update_weights") == 720  # the caller's own timeout
    assert sample(tele, "rl_admin_call_budget_seconds", op="pause") == 300
    # the phase time of b's transfer covers its retry: first attempt sent -> success
    b_transfer = sample(tele, "rl_weight_sync_phase_seconds_sum", phase="transfer", server=b.label)
    b_update_ok = [e for e in update_dones if e["status"] == "200" and e["url"].startswith(b.url)][0]
    assert b_transfer * 1000 > b_update_ok["wall_ms"]


def test_generation_requests_pass_through_untouched(tele, instrumented, admin_servers, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    (a,) = admin_servers(1)

    async def go() -> None:
        admin = PrimeRLStyleAdmin([a.url])
        try:
            for i in range(5):
                assert b"[DONE]" in b"".join(await admin.generate(f"p{i}"))
        finally:
            await admin.aclose()

    asyncio.run(go())
    assert weight_events(caplog) == [] and spans(tele) == []
    assert sample(tele, "rl_weight_update_wall_seconds_count", op="update_weights", server=a.label) is None


def test_failed_pause_still_resumes_and_the_sync_fails(tele, instrumented, admin_servers, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    a, b = admin_servers(2)
    b.behaviour.statuses["pause"] = [400]
    raised = drive([a, b], "/ckpt/weights/step_3")
    assert isinstance(raised, httpx.HTTPStatusError) and raised.response.status_code == 400
    assert a.behaviour.ops() == ["pause", "resume"] and b.behaviour.ops() == ["pause", "resume"]
    done = [e for e in weight_events(caplog) if e.name == "sync.done"]
    assert len(done) == 1 and done[0]["ok"] == 0 and done[0]["reason"] == "pause_failed" and done[0]["transfer_ms"] is None
    assert sample(tele, "rl_weight_update_failures_total", op="pause", server=b.label, reason="http_4xx") == 1
    assert sample(tele, "rl_weight_version", server=a.label) is None  # nobody took new weights


def test_inflight_age_of_a_hanging_foreign_call(tele, instrumented, admin_servers) -> None:
    (a,) = admin_servers(1)
    a.behaviour.hang.add("update_weights")
    ages: list[float] = []

    async def go() -> None:
        admin = PrimeRLStyleAdmin([a.url], budgets_s={"update_weights": 60})
        task = asyncio.create_task(admin.update_weights("/ckpt/step_4"))
        while not a.behaviour.of("update_weights"):
            await asyncio.sleep(0.01)
        for _ in range(3):
            await asyncio.sleep(0.2)
            ages.append(sample(tele, "rl_admin_call_inflight_age_seconds", op="update_weights", server=a.label))
        assert sample(tele, "rl_admin_call_budget_seconds", op="update_weights") == 60
        a.behaviour.release.set()
        await task
        await admin.aclose()

    asyncio.run(go())
    assert 0 < ages[0] < ages[1] < ages[2]
    assert sample(tele, "rl_admin_call_inflight_age_seconds", op="update_weights", server=a.label) == 0


def test_uninstrument_really_removes_it(tele, admin_servers, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    (a,) = admin_servers(1)
    inst = AdminHTTPXInstrumentor()
    inst.instrument()
    assert httpx.AsyncClient.send is not ORIGINAL_ASYNC_SEND
    inst.uninstrument()
    assert httpx.AsyncClient.send is ORIGINAL_ASYNC_SEND and httpx.Client.send is ORIGINAL_SYNC_SEND
    assert drive([a], "/ckpt/step_5") is None
    assert weight_events(caplog) == [] and spans(tele) == []
    assert all("traceparent" not in s.headers for s in a.behaviour.seen)
    assert sample(tele, "rl_weight_update_wall_seconds_count", op="pause", server=a.label) is None


def test_one_client_only_and_its_own_trace_callback_still_runs(tele, admin_servers, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    a, b = admin_servers(2)
    inst = AdminHTTPXInstrumentor()
    seen_trace: list[str] = []

    async def user_trace(name: str, info: dict) -> None:
        seen_trace.append(name)

    async def go() -> None:
        async with httpx.AsyncClient() as mine, httpx.AsyncClient() as other:
            inst.instrument_client(mine)
            inst.instrument_client(mine)  # twice is harmless
            r = await mine.post(a.url + "/update_weights", json={"weight_dir": "/w/step_2"}, extensions={"trace": user_trace})
            assert r.status_code == 200
            await other.post(b.url + "/update_weights", json={"weight_dir": "/w/step_2"})
            inst.uninstrument_client(mine)
            await mine.post(a.url + "/update_weights", json={"weight_dir": "/w/step_3"})

    asyncio.run(go())
    assert any(n.startswith("http11.send_request_headers") for n in seen_trace)  # chained, not replaced
    done = [e for e in weight_events(caplog) if e.name == "client.done"]
    assert len(done) == 1 and done[0]["url"] == a.url + "/update_weights" and done[0]["step"] == "2"
    assert done[0]["pool_wait_ms"] != "na"  # measured through httpcore's trace extension
    assert "traceparent" in a.behaviour.seen[0].headers and "traceparent" not in b.behaviour.seen[0].headers
    assert sample(tele, "rl_weight_version", server=a.label) == 2  # a bare update (no pause) still sets the version
    assert not [e for e in weight_events(caplog) if e.name.startswith("sync.")]  # ... but is no sync


def test_sync_httpx_client_and_no_double_recording(tele, instrumented, admin_servers, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    (a,) = admin_servers(1)
    with httpx.Client(base_url=a.url) as c:
        instrumented.instrument_client(c)  # global and per-client at once: recorded once
        assert c.post("/pause", params={"mode": "keep"}).status_code == 200
        assert c.post("/update_weights", json={"weight_dir": "/w/step_8"}).status_code == 200
        assert c.post("/resume").status_code == 200
    evs = weight_events(caplog)
    assert [e.name for e in evs if e.name.startswith("sync.")] == ["sync.start", "sync.done"]
    assert len([e for e in evs if e.name == "client.done"]) == 3
    assert sample(tele, "rl_weight_update_wall_seconds_count", op="pause", server=a.label) == 1


def test_admin_client_is_not_recorded_twice_under_the_instrumentor(tele, instrumented, admin_servers, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    (a,) = admin_servers(1)

    async def go():
        async with AdminClient([a.url]) as admin:
            return await admin.sync_weights("/w/step_1", 1, timeouts=SyncTimeouts())

    assert asyncio.run(go()).ok
    evs = weight_events(caplog)
    assert len([e for e in evs if e.name == "client.done"]) == 3 and len([e for e in evs if e.name == "sync.done"]) == 1
    assert sample(tele, "rl_weight_update_wall_seconds_count", op="pause", server=a.label) == 1
