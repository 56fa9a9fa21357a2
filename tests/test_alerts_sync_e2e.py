"""The weight-sync alerts end to end on 127.0.0.1: weightwatch's own emitters -> real Prometheus -> real Alertmanager
-> a local Slack sink, with the very rule files, alertmanager.yml and Slack template the compose stack mounts.

Three exporter processes (tests/test_stack_support.py run as a script: ``weightwatch.setup`` with its explicit
registry served over HTTP, recording through ``telemetry.Metrics`` the series the sync writes) produce every bad
series at once beside healthy ones:

* orchestrator, three servers: sync-0 pauses 1.5 s (WeightSyncPauseSlow), sync-1 resumes in 1.3 s
  (WeightSyncResumeSlow) and has a resume call that never answers against a 90 s budget (AdminCallHung),
  sync-2 transfers in 2.5 s against 0.2/0.3 s (WeightSyncStraggler) and stays one version behind
  (WeightVersionSkew). Every other (phase, server) pair is healthy: pause 0.9 s, resume 0.2/0.7 s, and no pair
  is 2x its median and 0.5 s over it except the straggler.
* inference, two engines: one pauses and resumes every 0.5 s until Prometheus has scraped it unpaused, then pauses
  for good (EngineLeftPaused), one keeps pausing and resuming every 0.5 s.

One Prometheus run (the rendered prometheus.yml with 1 s scrape and evaluation intervals, the same rule files)
and one Alertmanager (group wait 1 s). The test then asserts exactly the expected (alert, server) pairs fire, that
each Slack post names the phase, the server, the value and the runbook entry, that AdminCallHung reached Slack
before the call's budget ran out, and that EngineLeftPaused did not fire before the engine had been paused for
the rule's one-minute window.
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest

from conftest import free_port, require_binary
from test_stack_support import DEPLOY, SlackSink, SyncExporter
from weightwatch import catalogue
from weightwatch.stack_cli import LocalStack, start_stack

pytestmark = [pytest.mark.binaries, pytest.mark.slow]

HUNG_BUDGET_S = 90.0
ORCHESTRATOR = {
    "phases": {
        "sync-0:8001": {"pause": 1.5, "transfer": 0.2, "resume": 0.2},
        "sync-1:8001": {"pause": 0.9, "transfer": 0.3, "resume": 1.3},
        "sync-2:8001": {"pause": 0.9, "transfer": 2.5, "resume": 0.7},
    },
    "behind": {"sync-2:8001": 1},
    "hung": {"sync-1:8001": "resume"},
    "budgets": {"pause": 300.0, "update_weights": 720.0, "resume": HUNG_BUDGET_S},
}
#: alert -> (phase, server) that must fire; nothing else of these alerts may.
EXPECTED = {
    "WeightSyncPauseSlow": ("pause", "sync-0:8001"),
    "WeightSyncResumeSlow": ("resume", "sync-1:8001"),
    "WeightSyncStraggler": ("transfer", "sync-2:8001"),
    "AdminCallHung": ("resume", "sync-1:8001"),
    "WeightVersionSkew": ("transfer", "sync-2:8001"),
    "EngineLeftPaused": ("pause", None),  # the server is the stuck engine's scrape target
}
#: EngineLeftPaused: 1 min of paused scrapes + for: 30s; the rest at most a minute + startup. Room for a loaded machine.
POST_TIMEOUT_S = 240


def _alert_names(body: dict[str, Any]) -> set[str]:
    return set(re.findall(r"\*(\w+)\* \(", " ".join(a.get("text", "") for a in body.get("attachments", []))))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    require_binary("prometheus")
    require_binary("prometheus-alertmanager")
    work = tmp_path_factory.mktemp("sync-alerts")
    sink = SlackSink()
    exporters: list[SyncExporter] = []
    stack: LocalStack | None = None
    try:
        orch = SyncExporter("orchestrator", ORCHESTRATOR)
        exporters.append(orch)
        stuck = SyncExporter("inference", {})
        exporters.append(stuck)
        healthy = SyncExporter("inference", {})
        exporters.append(healthy)
        webhook = work / "slack_webhook_url"
        webhook.write_text(sink.url + "\n", encoding="utf-8")
        stack = start_stack(
            DEPLOY,
            work,
            prometheus_port=free_port(),
            alertmanager_port=free_port(),
            jobs={"orchestrator": [orch.target], "inference": [stuck.target, healthy.target]},
            webhook_url_file=webhook,
            scrape_interval="1s",
            evaluation_interval="1s",
            group_wait="1s",
            group_interval="2s",
        )
        _wait_until(stack, f'rl_engine_paused{{instance="{stuck.target}"}} == 0', 60)  # seen running first
        stuck.stick()
        paused_since = float(stuck.read_event()["paused_since"])
        arrived: dict[str, float] = {}
        deadline = time.monotonic() + POST_TIMEOUT_S
        while time.monotonic() < deadline and set(arrived) != set(EXPECTED):
            for post in sink.snapshot():
                for name in _alert_names(post["body"]) & set(EXPECTED):
                    arrived.setdefault(name, time.time())
            time.sleep(0.5)
        alerts = _query(stack, "ALERTS")
        # what happened, for a failure message: alert states over the run and scrape health
        history = httpx.get(stack.prometheus_url + "/api/v1/query_range",
                            params={"query": "ALERTS", "start": time.time() - 600, "end": time.time(), "step": "1s"}, timeout=30).json()
        flips = {f"{s['metric']['alertname']} {s['metric'].get('server') or s['metric'].get('instance')} {s['metric']['alertstate']}":
                 len(s["values"]) for s in history["data"]["result"]}
        targets = httpx.get(stack.prometheus_url + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        missed = _query(stack, "count_over_time((up == 0)[10m:1s]) or vector(0)")
        yield {
            "posts": sink.snapshot(),
            "arrived": arrived,
            "alerts": [a["metric"] for a in alerts],
            "diagnosis": {"alert samples": flips, "last errors": [t["lastError"] for t in targets], "failed scrapes": missed},
            "orch": orch,
            "stuck": stuck,
            "healthy": healthy,
            "paused_since": paused_since,
        }
    finally:
        if stack is not None:
            stack.stop()
        for e in exporters:
            e.stop()
        sink.close()


def _query(stack: LocalStack, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(stack.prometheus_url + "/api/v1/query", params={"query": expr}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def _wait_until(stack: LocalStack, expr: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _query(stack, expr):
        assert time.monotonic() < deadline, f"{expr}: no result after {timeout} s"
        time.sleep(0.5)


def _posts_of(run: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [p["body"] for p in run["posts"] if name in _alert_names(p["body"])]


def test_every_sync_alert_reaches_slack(run):
    missing = set(EXPECTED) - set(run["arrived"])
    assert not missing, f"no Slack post for {sorted(missing)} within {POST_TIMEOUT_S} s; Prometheus ALERTS: {run['alerts']}"


def test_exactly_the_bad_servers_fire(run):
    # any state: a healthy server must not even be pending
    firing = {(a["alertname"], a.get("server"), a.get("instance")) for a in run["alerts"] if a["alertname"] in EXPECTED}
    want = {(name, server, run["orch"].target) for name, (_, server) in EXPECTED.items() if server is not None}
    want.add(("EngineLeftPaused", "127.0.0.1:8001", run["stuck"].target))  # the inference job's `server` target label
    assert firing == want, run["diagnosis"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_slack_post_names_phase_server_value_and_runbook(run, name):
    posts = _posts_of(run, name)
    assert posts, f"no post for {name}"
    attachment = posts[0]["attachments"][0]
    phase, server = EXPECTED[name]
    text = attachment["text"]
    line = next(li for li in text.splitlines() if li.startswith(f"*{name}*"))
    assert f" phase={phase} " in line, line
    if server is not None:
        assert f" server={server} " in line, line
        assert server in attachment["title"]
    else:
        assert run["stuck"].target in text and run["healthy"].target not in str(posts)
    value = re.search(r" value=(.+)$", line)
    assert value and value.group(1).strip() not in ("", "<no value>"), line
    assert f"Runbook: docs/stack.md#{name.lower()}" in text
    assert "Dashboard: http://localhost:3000/d/ww-sync-phases?var-" in text
    # no healthy server in this alert's posts
    healthy = set(ORCHESTRATOR["phases"]) - {server}
    assert not any(f"server={h}" in str(posts) for h in healthy), name


def test_posted_values_are_the_bad_values(run):
    def value(name: str) -> str:
        line = next(li for li in _posts_of(run, name)[0]["attachments"][0]["text"].splitlines() if li.startswith(f"*{name}*"))
        return line.split(" value=", 1)[1]

    assert value("WeightSyncPauseSlow") == "1.5s"
    assert value("WeightSyncResumeSlow") == "1.3s"
    assert value("WeightSyncStraggler") == "2.2s over the median"  # 2.5 s against the median 0.3 s
    assert value("WeightVersionSkew") == "1 step(s) behind"
    share = re.fullmatch(r"([\d.]+)% of the budget", value("AdminCallHung"))
    assert share and catalogue.HUNG_BUDGET_FRACTION * 100 < float(share.group(1)) < 100
    # the description's templated queries ran in the real Prometheus: age and budget in words
    text = _posts_of(run, "AdminCallHung")[0]["attachments"][0]["text"]
    assert re.search(r"in flight for (\d+m )?[\d.]+s of its 1m 30s budget", " ".join(text.split())), text


def test_hung_call_alert_arrives_before_its_budget_runs_out(run):
    hung_for = run["arrived"]["AdminCallHung"] - run["orch"].started
    assert catalogue.HUNG_BUDGET_FRACTION * HUNG_BUDGET_S < hung_for < HUNG_BUDGET_S, hung_for


def test_engine_left_paused_waits_for_its_window(run):
    paused_for = run["arrived"]["EngineLeftPaused"] - run["paused_since"]
    assert paused_for >= 60, f"posted {paused_for:.1f} s after the pause: the 1 m window of min_over_time did not hold"
