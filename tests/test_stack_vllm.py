"""The stack's Prometheus config and rules against the real thing: a real vLLM server with weightwatch
(the session's ``vllm_server``) and a real orchestrator process using ``weightwatch.orchestrator.AdminClient``.

Checks what the compose stack relies on but the small e2e workload cannot show: the inference job scrapes
vLLM's own /metrics with weightwatch's on it, the recording rules produce per-server quantiles, the
orchestrator's ``server`` label is host:port of the admin URL (the convention prometheus.yml and the inhibit
rules use), and exemplars from both sides carry the same trace ids.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from conftest import free_port, require_binary
from test_stack_support import DEPLOY
from weightwatch.stack_cli import start_stack

pytestmark = [pytest.mark.vllm, pytest.mark.binaries, pytest.mark.slow]

#: A real orchestrator-side process: reload the server's weights through the admin lane once a second.
ORCHESTRATOR = r"""
import asyncio, sys
import weightwatch
from weightwatch.orchestrator import AdminClient
admin, token = sys.argv[1], sys.argv[2]
tele = weightwatch.setup(service_name="stack-vllm-orchestrator", role="orchestrator", metrics_port=0, metrics_addr="127.0.0.1")
print(tele.metrics_port, flush=True)

async def main():
    async with AdminClient([admin], token=token) as client:
        while True:
            result = await client.reload_weights()
            print("ok" if result.ok else f"failed {result}", flush=True)
            await asyncio.sleep(1.0)

asyncio.run(main())
"""


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def _exemplar_trace_ids(prom: str, expr: str) -> set[str]:
    now = time.time()
    r = httpx.get(prom + "/api/v1/query_exemplars", params={"query": expr, "start": now - 600, "end": now}, timeout=10)
    r.raise_for_status()
    return {e["labels"]["trace_id"] for series in r.json()["data"] for e in series["exemplars"] if "trace_id" in e["labels"]}


def test_prometheus_with_the_repo_rules_reads_a_real_server_and_orchestrator(vllm_server, tmp_path):
    require_binary("prometheus")
    require_binary("prometheus-alertmanager")
    assert vllm_server.admin_url and vllm_server.admin_token
    orch = subprocess.Popen(
        [sys.executable, "-c", ORCHESTRATOR, vllm_server.admin_url, vllm_server.admin_token],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stack = None
    try:
        assert orch.stdout is not None
        port = orch.stdout.readline().strip()
        assert port.isdigit(), orch.stderr.read() if orch.stderr else port
        assert orch.stdout.readline().strip() == "ok"
        inference = urlsplit(vllm_server.base_url).netloc
        stack = start_stack(
            DEPLOY,
            tmp_path / "stack",
            prometheus_port=free_port(),
            alertmanager_port=free_port(),
            jobs={"orchestrator": [f"127.0.0.1:{port}"], "inference": [inference]},
            webhook_url_file=tmp_path / "no-webhook",
            scrape_interval="1s",
            evaluation_interval="1s",
        )
        prom = stack.prometheus_url
        admin_label = urlsplit(vllm_server.admin_url).netloc
        deadline = time.monotonic() + 60
        wall: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not wall:
            wall = _query(prom, 'op_server:rl_weight_update_rpc_seconds:p95_5m{op="reload_weights"} > 0')
            time.sleep(1)
        assert wall, "no per-server rpc-time quantile recorded from the real orchestrator"
        fleet = _query(prom, 'op:rl_weight_update_wall_seconds:p50_5m{op="reload_weights"} > 0')
        assert [s["metric"].get("server") for s in fleet] == [None], fleet  # all servers together: no server label

        # the orchestrator's server label is host:port of the admin URL (what prometheus.yml's `server` target label mirrors)
        assert {s["metric"]["server"] for s in wall} == {admin_label}
        assert {s["metric"]["job"] for s in wall} == {"orchestrator"}
        # the inference job scrapes vLLM's own /metrics, which carries weightwatch's server-side metrics
        up = {s["metric"]["job"]: s["value"][1] for s in _query(prom, "up")}
        assert up == {"orchestrator": "1", "inference": "1"}
        assert _query(prom, 'count({job="inference", __name__=~"vllm:.+"}) > 0'), "no vllm:* series on the inference job"
        assert _query(prom, 'rl_admin_rpc_seconds_count{job="inference", op="reload_weights"} > 0')
        deadline = time.monotonic() + 30
        rpc: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not rpc:
            rpc = _query(prom, 'op:rl_admin_rpc_seconds:p95_5m{job="inference", op="reload_weights"} > 0')
            time.sleep(1)
        assert rpc, "no server-side rpc quantile recorded"
        # a healthy idle server: the queue alert stays silent
        assert _query(prom, 'ALERTS{alertname="WeightUpdateQueueHigh"}') == []

        # exemplars from both ends of the same weight updates carry the same trace ids
        deadline = time.monotonic() + 30
        common: set[str] = set()
        client_ids: set[str] = set()
        server_ids: set[str] = set()
        while time.monotonic() < deadline and not common:
            client_ids = _exemplar_trace_ids(prom, 'rl_weight_update_wall_seconds_bucket{job="orchestrator"}')
            server_ids = _exemplar_trace_ids(prom, 'rl_admin_rpc_seconds_bucket{job="inference"}')
            common = client_ids & server_ids
            time.sleep(1)
        assert client_ids, "no exemplars from the orchestrator"
        assert server_ids, "no exemplars from vLLM's /metrics: the inference job must be scraped as OpenMetrics"
        assert common, f"client and server exemplars never share a trace id: {sorted(client_ids)[:3]} vs {sorted(server_ids)[:3]}"
    finally:
        if stack is not None:
            stack.stop()
        orch.terminate()
        try:
            orch.wait(10)
        except subprocess.TimeoutExpired:
            orch.kill()
            orch.wait(5)
