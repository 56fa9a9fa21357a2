"""Faults 2 and 3, a sync across two real servers when one of them dies or hangs.

Two ``weightwatch serve`` processes share one weights root; the orchestrator is this process
(``AdminClient.sync_weights``, weightwatch.setup with a /metrics port) and a real Prometheus scrapes it
every second with the repository's rules, Alertmanager posting to a local Slack sink.

* 2: the EngineCore process of server A gets SIGKILL while A handles /update_weights (A holds the call
  for 4 s before the engine call, ``WEIGHTWATCH_INJECT_DELAY_MS``). The sync fails naming the cause, the
  failure is counted, B is resumed, WeightUpdateFailing reaches Slack; after A is restarted the next
  sync succeeds and both servers report the new version.
* 3: server B's API server gets SIGSTOP during its pause (B holds pauses 3 s). The in-flight age grows,
  AdminCallHung fires before the pause budget runs out, the call ends at its budget with a timeout error,
  and A is not left paused.

Needs the pause/resume routes of branch ``inference``: without them (``/is_paused`` 404) the tests skip
saying so.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import weightwatch
from conftest import free_port, require_binary
from faults.support import api_server_pid, engine_core_pids, make_checkpoint, metric_values, restart, start_server_on
from test_stack_support import DEPLOY, SlackSink
from vllm_fixtures import wait_ready
from weightwatch.orchestrator import AdminClient, AdminTimeouts
from weightwatch.orchestrator.admin_types import SyncTimeouts
from weightwatch.stack_cli import start_stack

pytestmark = [pytest.mark.faults, pytest.mark.vllm, pytest.mark.binaries, pytest.mark.slow]

ALERT_TIMEOUT_S = 180
#: A restarted vLLM server on a CPU shared with other jobs: seen taking over 300 s.
RESTART_TIMEOUT_S = 900
PAUSE_BUDGET_S = 60.0


class Rig:
    def __init__(self, a: Any, b: Any, tele: Any, stack: Any, sink: SlackSink, root: Path, model: Path) -> None:
        self.a, self.b, self.tele, self.stack, self.sink, self.root, self.model = a, b, tele, stack, sink, root, model

    def label(self, server: Any) -> str:
        return server.admin_url.removeprefix("http://")

    def orch_metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.tele.metrics_port}/metrics", timeout=10).text
        return metric_values(text, name, **labels)

    def firing(self, alert: str) -> list[dict[str, Any]]:
        r = httpx.get(self.stack.prometheus_url + "/api/v1/query", params={"query": f'ALERTS{{alertname="{alert}",alertstate="firing"}}'}, timeout=10)
        return r.json()["data"]["result"]

    def is_paused(self, server: Any) -> bool:
        r = httpx.get(server.admin_url + "/is_paused", headers=server.admin_headers(), timeout=30)
        r.raise_for_status()
        return bool(r.json()["is_paused"])

    def sync_in_thread(self, step: int, timeouts: SyncTimeouts) -> tuple[threading.Thread, dict[str, Any]]:
        out: dict[str, Any] = {}
        ckpt = make_checkpoint(self.model, self.root, step)

        def run() -> None:
            async def go() -> Any:
                async with AdminClient([self.a.admin_url, self.b.admin_url], token=self.a.admin_token, retries=1) as admin:
                    return await admin.sync_weights(ckpt, step, timeouts=timeouts)

            t0 = time.monotonic()
            try:
                out["result"] = asyncio.run(go())
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                out["error"] = exc
            out["seconds"] = time.monotonic() - t0

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t, out


@pytest.fixture(scope="module")
def rig(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_binary("prometheus")
    require_binary("prometheus-alertmanager")
    work = tmp_path_factory.mktemp("sync_faults")
    root = work / "weights"
    a = start_server_on(tiny_model, work / "a", root, extra_env={"WEIGHTWATCH_INJECT_DELAY_MS": "update_weights=4000"})
    b = start_server_on(tiny_model, work / "b", root, extra_env={"WEIGHTWATCH_INJECT_DELAY_MS": "pause=3000"})
    sink = SlackSink()
    stack = None
    weightwatch.shutdown()
    try:
        wait_ready(a)
        wait_ready(b)
        if httpx.get(a.admin_url + "/is_paused", headers=a.admin_headers(), timeout=30).status_code == 404:
            pytest.skip("the server has no /pause, /resume, /is_paused yet (branch inference not merged)")
        tele = weightwatch.setup("faults-sync-orchestrator", role="orchestrator", metrics_port=0, metrics_addr="127.0.0.1", log_file=work / "orch.log")
        webhook = work / "slack_webhook_url"
        webhook.write_text(sink.url + "\n")
        # Prometheus scrapes the orchestrator only: an inference target going down would (rightly) inhibit
        # WeightUpdateFailing for its server, and the test wants to see the failure alert itself.
        stack = start_stack(
            DEPLOY, work / "stack", prometheus_port=free_port(), alertmanager_port=free_port(),
            jobs={"orchestrator": [f"127.0.0.1:{tele.metrics_port}"]}, webhook_url_file=webhook,
            scrape_interval="1s", evaluation_interval="1s", group_wait="1s", group_interval="2s",
        )  # fmt: skip
        yield Rig(a, b, tele, stack, sink, root, tiny_model)
    finally:
        for s in (a, b):
            pid = api_server_pid(s)
            if pid:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            s.stop()
        if stack is not None:
            stack.stop()
        sink.close()
        weightwatch.shutdown()


def _wait(predicate, timeout: float, interval: float = 0.2) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def test_engine_killed_mid_sync(rig: Rig, reliability) -> None:
    row = reliability
    row.fault = "Engine killed mid-sync"
    row.injected = "SIGKILL to server A's EngineCore process while A holds /update_weights (2 servers, real sync)"
    a_label, b_label = rig.label(rig.a), rig.label(rig.b)
    failures_before = rig.orch_metric("rl_weight_update_failures_total", server=a_label)
    timeouts = SyncTimeouts(pause=AdminTimeouts(total=60), transfer=AdminTimeouts(total=90), resume=AdminTimeouts(total=60))
    thread, out = rig.sync_in_thread(1, timeouts)
    assert _wait(lambda: rig.orch_metric("rl_admin_call_inflight_age_seconds", op="update_weights", server=a_label) > 0.5, 60), "A never got /update_weights"
    engines = engine_core_pids(rig.a)
    assert engines, "no EngineCore under server A"
    for pid in engines:
        os.kill(pid, signal.SIGKILL)
    thread.join(240)
    assert not thread.is_alive(), "the sync did not end"
    assert "error" not in out, out.get("error")
    result = out["result"]
    assert not result.ok and result.reason == "transfer_failed", result.to_dict()
    failed = [r for r in result.phases["transfer"] if not r.ok]
    assert [r.server for r in failed] == [a_label] or [r.server for r in failed] == [rig.a.admin_url], result.to_dict()
    cause = f"{failed[0].status} {failed[0].reason} {failed[0].error}"
    assert failed[0].error and any(w in cause.lower() for w in ("engine", "dead", "connect", "closed", "refused")), cause
    # A's API server exits once its engine is dead: start it again now (startup takes minutes on a busy
    # CPU) and check the alert path meanwhile.
    restart(rig.a)
    resumed = {r.server: r.ok for r in result.phases["resume"]}
    assert resumed.get(b_label, resumed.get(rig.b.admin_url)) is True, resumed
    assert rig.is_paused(rig.b) is False
    assert rig.orch_metric("rl_weight_update_failures_total", server=a_label) > failures_before
    row.hold(f"sync failed ({result.reason}) naming A's cause: {cause[:160]!r}; counted in rl_weight_update_failures_total")
    row.hold(f"resume still sent to B (ok), B not paused; sync ended in {out['seconds']:.0f} s")
    post = rig.sink.wait_for(lambda body: "WeightUpdateFailing" in str(body) and a_label in str(body), ALERT_TIMEOUT_S)
    assert post is not None, f"no WeightUpdateFailing post; firing: {rig.firing('WeightUpdateFailing')}"
    row.hold(f"WeightUpdateFailing for {a_label} reached the Slack sink via Prometheus + Alertmanager")

    wait_ready(rig.a, RESTART_TIMEOUT_S)
    thread, out = rig.sync_in_thread(2, timeouts)
    thread.join(240)
    assert "error" not in out, out.get("error")
    result = out["result"]
    assert result.ok, result.to_dict()
    assert set(result.versions.values()) == {2}, result.versions
    assert rig.orch_metric("rl_weight_version", server=a_label) == 2 and rig.orch_metric("rl_weight_version", server=b_label) == 2
    row.times = 1
    row.hold("after A restarted, the next sync succeeded; rl_weight_version = 2 on both servers")


def test_server_hung_during_pause(rig: Rig, reliability) -> None:
    row = reliability
    row.fault = "Server hung during a pause"
    row.injected = f"SIGSTOP to server B's API server while it holds /pause (pause budget {PAUSE_BUDGET_S:.0f} s)"
    b_label = rig.label(rig.b)
    timeouts = SyncTimeouts(pause=AdminTimeouts(total=PAUSE_BUDGET_S), transfer=AdminTimeouts(total=90), resume=AdminTimeouts(total=10))
    thread, out = rig.sync_in_thread(3, timeouts)
    assert _wait(lambda: rig.orch_metric("rl_admin_call_inflight_age_seconds", op="pause", server=b_label) > 0.2, 60), "B never got /pause"
    api = api_server_pid(rig.b)
    assert api is not None
    os.kill(api, signal.SIGSTOP)
    started = time.monotonic()
    try:
        ages = []
        fired_after = None
        while thread.is_alive() and time.monotonic() - started < PAUSE_BUDGET_S + 60:
            ages.append(rig.orch_metric("rl_admin_call_inflight_age_seconds", op="pause", server=b_label))
            if fired_after is None and rig.firing("AdminCallHung"):
                fired_after = time.monotonic() - started
            time.sleep(1.0)
        thread.join(30)
        assert not thread.is_alive(), "the sync outlived its budget"
        result = out["result"]
        assert not result.ok and result.reason == "pause_failed", result.to_dict()
        b_pause = next(r for r in result.phases["pause"] if r.server in (b_label, rig.b.admin_url))
        assert not b_pause.ok and "timeout" in f"{b_pause.reason} {b_pause.error}".lower(), b_pause
        assert PAUSE_BUDGET_S - 5 <= out["seconds"] <= PAUSE_BUDGET_S + timeouts.resume.total + 20, out["seconds"]
        grew = [x for x in ages if x > 0]
        assert len(grew) >= 10 and grew[-1] > grew[0] + 10, ages
        assert fired_after is not None and fired_after < PAUSE_BUDGET_S, fired_after
        assert rig.is_paused(rig.a) is False
        row.times = 1
        row.hold(f"in-flight age of B's pause grew {grew[0]:.0f} -> {grew[-1]:.0f} s; AdminCallHung firing {fired_after:.0f} s in, before the {PAUSE_BUDGET_S:.0f} s budget")
        row.hold(f"the call ended at its budget ({out['seconds']:.0f} s) with {b_pause.reason}: {str(b_pause.error)[:120]!r}; A not left paused")
    finally:
        os.kill(api, signal.SIGCONT)
    # B now runs the pause it held when it was stopped (late: the caller gave up on it). A resume after it
    # must leave B serving; EngineLeftPaused is the alert for a server nobody resumes.
    late_pause = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(4.0)  # past B's injected 3 s pause delay
        late_pause = late_pause or rig.is_paused(rig.b)
        httpx.post(rig.b.admin_url + "/resume", headers=rig.b.admin_headers(), timeout=60)
        time.sleep(1.0)
        if not rig.is_paused(rig.b):
            break
    assert rig.is_paused(rig.b) is False
    row.hold("after SIGCONT B answered and was resumed" + (" (it had run the late pause first: the caller had given up on it)" if late_pause else ""))
