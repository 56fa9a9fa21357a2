"""The Alertmanager side of the stack, checked with Debian's real amtool and prometheus-alertmanager.

amtool check-config (with the templates), a routing test for every alert's severity, and inhibition on a
running Alertmanager: TargetDown silences the alerts it causes and nothing else.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import yaml

from conftest import free_port, require_binary
from test_stack_support import DEPLOY
from weightwatch.stack_cli import render_alertmanager_config

pytestmark = pytest.mark.binaries

AM_FILE = DEPLOY / "alertmanager" / "alertmanager.yml"


def _amtool(*args: str) -> subprocess.CompletedProcess[str]:
    amtool = require_binary("amtool")
    return subprocess.run([amtool, *args], capture_output=True, text=True, timeout=60)


def test_amtool_check_config_accepts_the_repo_file():
    res = _amtool("check-config", str(AM_FILE))
    assert res.returncode == 0, res.stdout + res.stderr


def test_amtool_check_config_parses_the_templates(tmp_path):
    cfg = render_alertmanager_config(DEPLOY, tmp_path, webhook_url_file=tmp_path / "hook")
    res = _amtool("check-config", str(cfg))
    assert res.returncode == 0, res.stdout + res.stderr
    assert " - 1 templates\n  SUCCESS" in res.stdout
    # and the check can fail: a broken template is refused
    broken = tmp_path / "tpl"
    broken.mkdir()
    (broken / "bad.tmpl").write_text('{{ define "x" }}{{ .Status ')
    doc = yaml.safe_load(cfg.read_text())
    doc["templates"] = [str(broken / "*.tmpl")]
    cfg.write_text(yaml.safe_dump(doc))
    assert _amtool("check-config", str(cfg)).returncode != 0


def test_slack_webhook_comes_from_a_file_never_inline():
    doc = yaml.safe_load(AM_FILE.read_text())
    slack = [s for r in doc["receivers"] for s in r.get("slack_configs", [])]
    assert slack, "no Slack receiver"
    for s in slack:
        assert "api_url" not in s and s["api_url_file"].startswith("/etc/alertmanager/secrets/")
        assert s["send_resolved"] is True
    assert "hooks.slack.com" not in AM_FILE.read_text()
    gitignore = (DEPLOY.parent / ".gitignore").read_text()
    assert "deploy/alertmanager/secrets/*" in gitignore


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        ({"alertname": "WeightUpdateQueueHigh", "severity": "warning", "server": "s:8001", "op": "update_weights"}, "slack"),
        ({"alertname": "WeightUpdateFailing", "severity": "critical", "server": "s:8001", "op": "update_weights"}, "slack-critical"),
        ({"alertname": "TargetDown", "severity": "critical", "job": "inference"}, "slack-critical"),
        ({"alertname": "TruncationHigh", "severity": "warning", "job": "orchestrator"}, "slack"),
    ],
)
def test_routing(labels, receiver):
    args = [f"{k}={v}" for k, v in labels.items()]
    res = _amtool("config", "routes", "test", f"--config.file={AM_FILE}", f"--verify.receivers={receiver}", *args)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == receiver


def test_every_alert_rule_routes_to_a_slack_receiver():
    rules = [r for p in (DEPLOY / "prometheus" / "rules").glob("*.yml") for g in yaml.safe_load(p.read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        if "alert" not in rule:
            continue
        expected = "slack-critical" if rule["labels"]["severity"] == "critical" else "slack"
        res = _amtool("config", "routes", "test", f"--config.file={AM_FILE}", f"alertname={rule['alert']}", f"severity={rule['labels']['severity']}")
        assert res.stdout.strip() == expected, rule["alert"]


@pytest.fixture
def alertmanager(tmp_path):
    binary = require_binary("prometheus-alertmanager")
    cfg = render_alertmanager_config(DEPLOY, tmp_path, webhook_url_file=tmp_path / "no-webhook")
    port = free_port()
    log = open(tmp_path / "am.log", "wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={cfg}", f"--storage.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "am.log").read_text()
            try:
                if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "alertmanager not ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_target_down_inhibits_the_alerts_it_causes(alertmanager):
    now = datetime.now(UTC)
    window = {"startsAt": now.isoformat(), "endsAt": (now + timedelta(minutes=10)).isoformat()}
    s0, s1 = "inference-0:8001", "inference-1:8001"
    orch = {"job": "orchestrator", "instance": "orch:9400"}
    alerts = {
        "inference-down": {"alertname": "TargetDown", "severity": "critical", "job": "inference", "instance": "inference-0:8000", "server": s0},
        "failing-s0": {"alertname": "WeightUpdateFailing", "severity": "critical", "op": "update_weights", "server": s0, **orch},
        "queue-s0": {"alertname": "WeightUpdateQueueHigh", "severity": "warning", "op": "update_weights", "server": s0, **orch},
        "failing-s1": {"alertname": "WeightUpdateFailing", "severity": "critical", "op": "update_weights", "server": s1, **orch},
        "trainer-down": {"alertname": "TargetDown", "severity": "critical", "job": "trainer", "instance": "trainer:9401"},
        "ckpt-wait": {"alertname": "CheckpointWaitSlow", "severity": "warning", **orch},
        "orch-b-down": {"alertname": "TargetDown", "severity": "critical", "job": "orchestrator", "instance": "orch-b:9400"},
        "trunc-orch-b": {"alertname": "TruncationHigh", "severity": "warning", "job": "orchestrator", "instance": "orch-b:9400"},
        "trunc-orch": {"alertname": "TruncationHigh", "severity": "warning", **orch},
    }
    r = httpx.post(alertmanager + "/api/v2/alerts", json=[{"labels": labels, **window} for labels in alerts.values()], timeout=10)
    assert r.status_code == 200, r.text
    expected = {
        "inference-down": "active",
        "failing-s0": "suppressed",
        "queue-s0": "suppressed",
        "failing-s1": "active",
        "trainer-down": "active",
        "ckpt-wait": "suppressed",
        "orch-b-down": "active",
        "trunc-orch-b": "suppressed",
        "trunc-orch": "active",
    }
    key_of = {tuple(sorted(v.items())): k for k, v in alerts.items()}
    states: dict[str, str] = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        got = httpx.get(alertmanager + "/api/v2/alerts", timeout=10).json()
        states = {key_of[tuple(sorted(a["labels"].items()))]: a["status"]["state"] for a in got}
        if states == expected:
            break
        time.sleep(0.5)
    assert states == expected


def _render(tmp_path, alerts: list[dict], template: str) -> str:
    """amtool template render with the repository's Slack templates on the given alerts (Alertmanager's data shape)."""
    data = {
        "receiver": "slack",
        "status": "firing",
        "alerts": [{"status": "firing", "startsAt": "2026-01-01T00:00:00Z", "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "",
                    "fingerprint": str(i), **a} for i, a in enumerate(alerts)],
        "groupLabels": {"alertname": alerts[0]["labels"]["alertname"]},
        "commonLabels": {"alertname": alerts[0]["labels"]["alertname"], "severity": alerts[0]["labels"]["severity"]},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
    }
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    res = _amtool("template", "render", f"--template.glob={DEPLOY / 'alertmanager' / 'templates' / '*.tmpl'}",
                  f"--template.data={path}", f"--template.text={{{{ template \"{template}\" . }}}}")
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _sync_alert(i: int) -> dict:
    return {
        "labels": {"alertname": "WeightSyncPauseSlow", "severity": "warning", "phase": "pause", "server": f"inference-{i}:8001", "job": "orchestrator"},
        "annotations": {"summary": f"Pausing inference-{i}:8001 takes 1.5s", "description": "Likely cause: ...", "value": "1.5s",
                        "runbook_url": "docs/stack.md#weightsyncpauseslow", "dashboard": f"/d/ww-sync-phases?var-server=inference-{i}:8001"},
    }


def test_slack_line_names_the_phase_and_a_message_lists_at_most_ten_alerts(tmp_path):
    one = _render(tmp_path, [_sync_alert(0)], "ww.slack.text")
    assert "*WeightSyncPauseSlow* (warning) phase=pause server=inference-0:8001 op=- value=1.5s" in one
    assert "Runbook: docs/stack.md#weightsyncpauseslow" in one and "and 1 firing in all" not in one
    many = _render(tmp_path, [_sync_alert(i) for i in range(1024)], "ww.slack.text")
    assert many.count("*WeightSyncPauseSlow*") == 10
    assert "… and 1024 firing in all" in many
    # alerts without a phase keep the seed's line
    queue = {"labels": {"alertname": "WeightUpdateQueueHigh", "severity": "warning", "server": "s:8001", "op": "update_weights"},
             "annotations": {"summary": "s", "description": "d", "value": "490ms", "runbook_url": "docs/stack.md#weightupdatequeuehigh", "dashboard": "/d/ww-weight-sync"}}
    assert "*WeightUpdateQueueHigh* (warning) server=s:8001 op=update_weights value=490ms" in _render(tmp_path, [queue], "ww.slack.text")


def test_a_dead_inference_server_pages_once_not_for_each_sync_alert(alertmanager):
    now = datetime.now(UTC)
    window = {"startsAt": now.isoformat(), "endsAt": (now + timedelta(minutes=10)).isoformat()}
    s0, s1 = "inference-0:8001", "inference-1:8001"
    orch = {"job": "orchestrator", "instance": "orch:9400"}
    alerts = {
        "down": {"alertname": "TargetDown", "severity": "critical", "job": "inference", "instance": "inference-0:8000", "server": s0},
        "hung-s0": {"alertname": "AdminCallHung", "severity": "critical", "op": "update_weights", "phase": "transfer", "server": s0, **orch},
        "straggler-s0": {"alertname": "WeightSyncStraggler", "severity": "warning", "phase": "transfer", "server": s0, **orch},
        "skew-s0": {"alertname": "WeightVersionSkew", "severity": "warning", "phase": "transfer", "server": s0, **orch},
        "hung-s1": {"alertname": "AdminCallHung", "severity": "critical", "op": "pause", "phase": "pause", "server": s1, **orch},
        "pause-s0": {"alertname": "WeightSyncPauseSlow", "severity": "warning", "phase": "pause", "server": s0, **orch},
    }
    r = httpx.post(alertmanager + "/api/v2/alerts", json=[{"labels": labels, **window} for labels in alerts.values()], timeout=10)
    assert r.status_code == 200, r.text
    # a slow pause measured before the server died is still news; the others follow from the outage
    expected = {"down": "active", "hung-s0": "suppressed", "straggler-s0": "suppressed", "skew-s0": "suppressed",
                "hung-s1": "active", "pause-s0": "active"}
    key_of = {tuple(sorted(v.items())): k for k, v in alerts.items()}
    states: dict[str, str] = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        got = httpx.get(alertmanager + "/api/v2/alerts", timeout=10).json()
        states = {key_of[tuple(sorted(a["labels"].items()))]: a["status"]["state"] for a in got}
        if states == expected:
            break
        time.sleep(0.5)
    assert states == expected
