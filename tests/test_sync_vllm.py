"""The sync of today on real vLLM (CPU): AdminClient.sync_weights and the instrumentor on a foreign client.

Both on the admin lane and on the main port of the shared session server (``vllm_server``), with
generation streams running from their own client. A failed update (a weight_dir the server refuses)
still resumes. A hung update (a second server whose /update_weights sleeps first,
``vllm_server_slow_update``) shows in ``rl_admin_call_inflight_age_seconds`` while it waits.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

import weightwatch
from prime_rl_client import PrimeRLStyleAdmin
from vllm_fixtures import SLOW_UPDATE_DELAY_MS
from weightwatch import events
from weightwatch.orchestrator import AdminClient, AdminHTTPXInstrumentor, AdminTimeouts, SyncResult, SyncTimeouts

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

LANES = pytest.mark.parametrize("lane", [True, False], ids=["admin-lane", "main-port"])
TIMEOUTS = SyncTimeouts(pause=AdminTimeouts(connect=10, read=120, total=120), transfer=AdminTimeouts(connect=10, read=180, total=180),
                        resume=AdminTimeouts(connect=10, read=120, total=120))


def checkpoint(server, step: int) -> Path:
    """What a trainer writes: the served model's files in weights_root/syncs/step_N (prime-rl's layout)."""
    d = server.weights_root / "syncs" / f"step_{step}"
    d.mkdir(parents=True, exist_ok=True)
    for f in Path(server.model_dir).iterdir():
        if f.is_file() and not (d / f.name).exists():
            (d / f.name).write_bytes(f.read_bytes())
    return d


class Streams:
    """A few streamed completions on their own client and threads while the sync runs."""

    def __init__(self, server, n: int = 3, max_tokens: int = 64):
        self.server, self.max_tokens = server, max_tokens
        self.done = [False] * n
        self.errors: list[str] = []
        self._client = httpx.Client(timeout=httpx.Timeout(180.0))
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]
        self.first = threading.Semaphore(0)

    def _run(self, i: int) -> None:
        body = {"model": self.server.model_name, "prompt": "Once upon a time", "max_tokens": self.max_tokens,
                "ignore_eos": True, "stream": True}
        got_first = False
        try:
            with self._client.stream("POST", f"{self.server.base_url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    self.errors.append(f"{i}: status {r.status_code}")
                for line in r.iter_lines():
                    if line.startswith("data: {") and not got_first:
                        got_first = True
                        self.first.release()
                    if line == "data: [DONE]":
                        self.done[i] = True
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(f"{i}: {type(exc).__name__}: {exc}")
        finally:
            if not got_first:
                self.first.release()

    def __enter__(self) -> Streams:
        for t in self._threads:
            t.start()
        for _ in self._threads:
            self.first.acquire(timeout=120)
        return self

    def __exit__(self, *exc: object) -> None:
        for t in self._threads:
            t.join(180)
        self._client.close()


@pytest.fixture
def orch(telemetry_reset, tmp_path):
    return weightwatch.setup("sync-vllm-test", role="orchestrator", log_file=tmp_path / "orchestrator.log",
                             span_file=tmp_path / "orchestrator.spans.jsonl")


@pytest.fixture
def resumed(vllm_server):
    """Whatever a test does, the shared server is resumed and serves its own weights afterwards."""
    yield vllm_server
    headers = vllm_server.admin_headers()
    httpx.post(f"{vllm_server.base_url}/resume", headers=headers, timeout=120)
    httpx.post(f"{vllm_server.base_url}/reload_weights", headers=headers, timeout=120)


def weight_events(path: Path) -> list[events.Event]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return [e for e in events.parse_lines(fh) if isinstance(e, events.Event) and e.tag == "weights"]


def server_events_of(server, tid: str, timeout: float = 15.0) -> list[events.Event]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [x for x in server.log_path.read_text().splitlines() if tid in x]
        evs = [e for e in (events.parse_line(x) for x in lines) if isinstance(e, events.Event)]
        if len([e for e in evs if e.name == "rpc.done"]) >= 3 or time.monotonic() > deadline:
            return evs
        time.sleep(0.25)


def is_paused(server, base: str) -> bool:
    return httpx.get(f"{base}/is_paused", headers=server.admin_headers(), timeout=60).json()["is_paused"]


@LANES
def test_sync_weights_on_real_vllm_with_streams(orch, resumed, lane) -> None:
    server = resumed
    base = server.admin_url if lane else server.base_url
    ckpt = checkpoint(server, 21)

    async def go() -> SyncResult:
        async with AdminClient([base], token=server.admin_token) as admin:
            await admin.warm_up()
            return await admin.sync_weights(ckpt, 21, timeouts=TIMEOUTS)

    with Streams(server) as streams:
        result = asyncio.run(go())
    assert not streams.errors and all(streams.done), streams.errors
    assert result.ok, result.to_dict()
    label = base.removeprefix("http://")
    assert result.versions == {label: 21}
    for phase in ("pause", "transfer", "resume"):
        (r,) = result.phases[phase]
        assert r.status == 200 and r.server_ms is not None and r.queue_ms is not None and r.rpc_ms is not None, (phase, r)
    assert result.phases["pause"][0].body["paused"] is True
    assert result.phases["resume"][0].body["paused_ms"] > 0
    assert not is_paused(server, base)

    # the server saw the sync's trace id on each call: one trace from orchestrator to engine
    seen = [(e.key, e.fields.get("op") or e.fields.get("path")) for e in server_events_of(server, result.trace_id)]
    assert ("weights.server.recv", "/pause") in seen and ("weights.rpc.done", "update_weights") in seen
    assert ("weights.rpc.done", "resume") in seen

    reg = orch.registry
    assert reg.get_sample_value("rl_weight_version", {"server": label}) == 21
    for phase in ("pause", "transfer", "resume"):
        assert reg.get_sample_value("rl_weight_sync_phase_seconds_count", {"phase": phase, "server": label}) == 1
    assert reg.get_sample_value("rl_weight_sync_seconds_count") == 1
    done = [e for e in weight_events(orch.log_file) if e.name == "sync.done"]
    assert len(done) == 1 and done[0]["ok"] == 1 and done[0]["step"] == 21


@LANES
def test_instrumented_foreign_client_on_real_vllm_with_streams(orch, resumed, lane) -> None:
    server = resumed
    base = server.admin_url if lane else server.base_url
    ckpt = checkpoint(server, 22)
    inst = AdminHTTPXInstrumentor()
    inst.instrument()

    async def go() -> None:
        admin = PrimeRLStyleAdmin([base], headers=server.admin_headers())
        try:
            await admin.update_weights(str(ckpt))
        finally:
            await admin.aclose()

    try:
        with Streams(server) as streams:
            asyncio.run(go())
    finally:
        inst.uninstrument()
    assert not streams.errors and all(streams.done), streams.errors
    label = base.removeprefix("http://")
    evs = weight_events(orch.log_file)
    starts = [e for e in evs if e.name == "sync.start"]
    dones = [e for e in evs if e.name == "sync.done"]
    assert len(starts) == 1 and starts[0]["step"] == 22 and starts[0]["servers"] == 1
    assert len(dones) == 1 and dones[0]["ok"] == 1, dones
    tid = dones[0].tid
    calls = [e for e in evs if e.name == "client.done"]
    assert [e["op"] for e in calls] == ["pause", "update_weights", "resume"] and {e.tid for e in calls} == {tid}
    assert all(e["server_ms"] != "na" and e["rpc_ms"] is not None for e in calls)  # read from the real answers
    seen = [(e.key, e.fields.get("op")) for e in server_events_of(server, tid)]
    assert ("weights.rpc.done", "update_weights") in seen  # the injected traceparent reached the engine
    reg = orch.registry
    assert reg.get_sample_value("rl_weight_version", {"server": label}) == 22
    assert reg.get_sample_value("rl_weight_update_wall_seconds_count", {"op": "pause", "server": label}) == 1
    orch.force_flush()
    sp = [json.loads(x) for x in orch.span_file.read_text().splitlines()]
    assert {s["name"] for s in sp if s["trace_id"] == tid} >= {"weights.sync", "weights.sync.phase", "weights.update.server"}
    assert not is_paused(server, base)


@LANES
def test_failed_update_on_real_vllm_still_resumes(orch, resumed, lane) -> None:
    server = resumed
    base = server.admin_url if lane else server.base_url
    empty = server.weights_root / "syncs" / "step_23"  # no safetensors in it: the server answers 400
    empty.mkdir(parents=True, exist_ok=True)

    async def go() -> SyncResult:
        async with AdminClient([base], token=server.admin_token) as admin:
            return await admin.sync_weights(empty, 23, timeouts=TIMEOUTS)

    with Streams(server, n=2) as streams:
        result = asyncio.run(go())
    assert not streams.errors and all(streams.done), streams.errors
    assert result.reason == "transfer_failed" and not result.ok
    (t,) = result.phases["transfer"]
    assert t.status == 400 and t.attempts == 1 and "safetensors" in (t.error or "")
    assert result.phases["resume"][0].ok and not is_paused(server, base)
    label = base.removeprefix("http://")
    assert orch.registry.get_sample_value("rl_weight_update_failures_total",
                                          {"op": "update_weights", "server": label, "reason": "http_4xx"}) == 1
    r = httpx.post(f"{server.base_url}/v1/completions", json={"model": server.model_name, "prompt": "Hi", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200  # generation goes on


def test_hung_update_shows_in_the_inflight_age_and_ends(orch, vllm_server_slow_update) -> None:
    server = vllm_server_slow_update
    ckpt = checkpoint(server, 24)
    label = server.admin_url.removeprefix("http://")
    ages: list[float] = []
    timeouts = SyncTimeouts(transfer=AdminTimeouts(connect=10, read=120, total=120))

    async def go() -> SyncResult:
        async with AdminClient([server.admin_url], token=server.admin_token) as admin:
            task = asyncio.create_task(admin.sync_weights(ckpt, 24, timeouts=timeouts))
            deadline = time.monotonic() + 120
            while not (ages and ages[-1] > 0):  # wait until the update is on the wire
                assert time.monotonic() < deadline and not task.done()
                ages.append(orch.registry.get_sample_value("rl_admin_call_inflight_age_seconds",
                                                           {"op": "update_weights", "server": label}) or 0.0)
                await asyncio.sleep(0.05)
            for _ in range(3):
                await asyncio.sleep(0.5)
                ages.append(orch.registry.get_sample_value("rl_admin_call_inflight_age_seconds", {"op": "update_weights", "server": label}))
            assert orch.registry.get_sample_value("rl_admin_call_budget_seconds", {"op": "update_weights"}) == 120
            return await task

    result = asyncio.run(go())
    assert result.ok, result.to_dict()
    grown = ages[-3:]
    assert grown[0] < grown[1] < grown[2], ages  # it grows while the server sleeps, no thread updates it
    assert result.phases["transfer"][0].wall_ms >= SLOW_UPDATE_DELAY_MS
    assert orch.registry.get_sample_value("rl_admin_call_inflight_age_seconds", {"op": "update_weights", "server": label}) == 0
    assert not is_paused(server, server.admin_url)
