"""AdminClient against real vLLM on CPU: `weightwatch serve` (admin lane + main port) and plain vLLM."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import httpx
import pytest

import weightwatch
from weightwatch import events
from weightwatch.orchestrator import AdminClient, AdminTimeouts, UpdateResult

pytestmark = pytest.mark.vllm

TIMEOUTS = AdminTimeouts(connect=5, read=120, total=180)


def make_checkpoint(model_dir: Path, root: Path, step: int) -> Path:
    """What the trainer would write: the served model's files in root/step_N, STABLE last."""
    d = root / f"orch_step_{step}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, d / f.name)
    (d / "STABLE").write_text("")
    return d


def read_events(path: Path, tid: str) -> list[events.Event]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        out = [e for e in events.parse_lines(fh) if isinstance(e, events.Event) and e.tid == tid]
    return out


@pytest.fixture
def orch(telemetry_reset, tmp_path):
    return weightwatch.setup(
        "orch-vllm-test", role="orchestrator", log_file=tmp_path / "orchestrator.log", span_file=tmp_path / "orchestrator.spans.jsonl"
    )


def test_update_through_the_admin_lane_one_trace_across_client_and_server(orch, vllm_server, tiny_model) -> None:
    assert vllm_server.admin_url and vllm_server.weights_root and vllm_server.log_path
    ckpt = make_checkpoint(tiny_model, vllm_server.weights_root, 1)

    async def go() -> UpdateResult:
        async with AdminClient([vllm_server.admin_url], timeouts=TIMEOUTS, token=vllm_server.admin_token) as admin:
            return await admin.update_weights(ckpt, step=1)

    result = asyncio.run(go())
    r = result.servers[0]
    assert result.ok, r.error
    assert r.server_ms is not None and r.rpc_ms is not None and r.queue_ms is not None and r.pool_wait_ms is not None
    assert r.wall_ms >= r.server_ms >= r.rpc_ms > 0
    assert r.body["weights_path"] == str(ckpt.resolve())

    tid = result.trace_id
    client = read_events(orch.log_file, tid)
    server = read_events(vllm_server.log_path, tid)
    assert [e.name for e in client] == ["client.send", "client.done"]
    assert [e.name for e in server] == ["server.recv", "rpc.start", "rpc.done"]
    # one clock on this machine: the timestamps follow the request through both processes
    ts = [client[0]["t"], server[0]["t"], server[1]["t"], server[2]["t"]]
    assert ts == sorted(ts)
    done = client[1]
    assert done["wall_ms"] == pytest.approx(r.wall_ms, abs=1e-2) and done["rpc_ms"] == pytest.approx(r.rpc_ms, abs=1e-2)
    assert server[2]["rpc_ms"] == pytest.approx(r.rpc_ms, abs=0.01)

    labels = {"op": "update_weights", "server": vllm_server.admin_url.split("//")[1]}
    for h in ("wall", "queue", "rpc", "pool_wait"):
        assert orch.registry.get_sample_value(f"rl_weight_update_{h}_seconds_count", labels) == 1

    # the same through a client on its own loop thread: the trace still crosses into the server
    async def own_loop() -> UpdateResult:
        async with AdminClient([vllm_server.admin_url], timeouts=TIMEOUTS, token=vllm_server.admin_token, own_loop=True) as admin:
            return await admin.reload_weights()

    again = asyncio.run(own_loop())
    assert again.ok, again.servers[0].error
    assert [e.name for e in read_events(vllm_server.log_path, again.trace_id)] == ["server.recv", "rpc.start", "rpc.done"]


def test_reload_and_shared_pool_mode_on_the_main_port(orch, vllm_server) -> None:
    async def go() -> tuple[UpdateResult, UpdateResult]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as gen:
            shared = AdminClient([vllm_server.base_url], timeouts=TIMEOUTS, token=vllm_server.admin_token, client=gen)
            first = await shared.reload_weights()
            await shared.aclose()
            assert not gen.is_closed  # the generation client belongs to the caller
            second = await shared.reload_weights()
            return first, second

    first, second = asyncio.run(go())
    for res in (first, second):
        r = res.servers[0]
        assert res.ok, r.error
        assert r.wall_ms >= r.server_ms >= r.rpc_ms > 0
        server = read_events(vllm_server.log_path, res.trace_id)
        assert [e.name for e in server] == ["server.recv", "rpc.start", "rpc.done"]


def test_refusals_are_clear_and_not_retried(orch, vllm_server, tmp_path, tiny_model) -> None:
    outside = make_checkpoint(tiny_model, tmp_path, 2)

    async def go() -> tuple[UpdateResult, UpdateResult]:
        async with AdminClient([vllm_server.admin_url], timeouts=TIMEOUTS, token=vllm_server.admin_token, retries=3) as admin:
            bad_dir = await admin.update_weights(outside)
        async with AdminClient([vllm_server.admin_url], timeouts=TIMEOUTS, token="wrong", retries=3) as admin:
            bad_token = await admin.reload_weights()
        return bad_dir, bad_token

    bad_dir, bad_token = asyncio.run(go())
    d, t = bad_dir.servers[0], bad_token.servers[0]
    assert (d.status, d.reason, d.attempts) == (400, "http_4xx", 1) and "outside the weights root" in d.error
    assert (t.status, t.reason, t.attempts) == (401, "http_4xx", 1) and "admin token" in t.error
    assert d.rpc_ms is None and d.queue_ms is None
    label = vllm_server.admin_url.split("//")[1]
    assert (
        orch.registry.get_sample_value("rl_weight_update_failures_total", {"op": "update_weights", "server": label, "reason": "http_4xx"})
        == 1
    )


def test_plain_vllm_has_no_admin_route_and_timing_stays_unknown(orch, plain_vllm_server, tiny_model, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")

    async def go() -> UpdateResult:
        async with AdminClient([plain_vllm_server.base_url], timeouts=TIMEOUTS, retries=2) as admin:
            return await admin.update_weights(tiny_model)

    res = asyncio.run(go())
    r = res.servers[0]
    assert not r.ok and r.status == 404 and r.reason == "http_4xx" and r.attempts == 1
    assert "no /update_weights route" in r.error and "plain vLLM" in r.error
    assert r.rpc_ms is None and r.queue_ms is None and r.server_ms is None
    done = read_events(orch.log_file, res.trace_id)[-1]
    assert done.name == "client.done" and done["rpc_ms"] is None and done["queue_ms"] is None and done["reason"] == "http_4xx"
