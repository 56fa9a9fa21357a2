"""Fault 7, the alert path interrupted: Alertmanager is down when an alert starts firing.

Real Prometheus and Alertmanager (Debian's binaries) with the repository's prometheus.yml, rules,
alertmanager.yml and templates; a real weightwatch process whose update queue is above the threshold, so
WeightUpdateQueueHigh goes pending then firing; the Slack receiver points at a local sink. Alertmanager gets
SIGKILL before the alert fires and comes back (same port, same config) after Prometheus failed to deliver.
The Slack post must then arrive, and only once, even after Prometheus re-sends the alert.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, require_binary
from test_stack_support import DEPLOY, SlackSink, Workload
from weightwatch.stack_cli import start_stack

pytestmark = [pytest.mark.faults, pytest.mark.binaries, pytest.mark.slow]

ALERT = "WeightUpdateQueueHigh"
SERVER = "inference-0:8001"
#: for: 1m + scrape/eval of 1 s, with room for a loaded machine.
FIRING_TIMEOUT_S = 150
#: Prometheus re-sends firing alerts every minute (--rules.alert.resend-delay default): one resend, then some.
RESEND_TIMEOUT_S = 90


def _prom_counter(prom_url: str, name: str) -> float:
    text = httpx.get(prom_url + "/metrics", timeout=5).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def _firing(prom_url: str) -> list[dict[str, Any]]:
    r = httpx.get(prom_url + "/api/v1/query", params={"query": f'ALERTS{{alertname="{ALERT}",alertstate="firing"}}'}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def _firing_posts(sink: SlackSink) -> list[dict[str, Any]]:
    return [p for p in sink.snapshot() if any(a.get("title", "").startswith("[FIRING") and ALERT in a.get("title", "") for a in p["body"].get("attachments", []))]


def _wait(predicate, timeout: float, interval: float = 0.5) -> bool:  # type: ignore[no-untyped-def]
    """Poll until ``predicate()``; a refused connection (a process still starting) counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except httpx.TransportError:
            pass
        time.sleep(interval)
    return False


def test_alertmanager_down_while_alert_starts_firing(tmp_path: Path, reliability) -> None:
    row = reliability
    row.fault = "Alertmanager down while an alert starts firing"
    row.injected = "SIGKILL to prometheus-alertmanager before WeightUpdateQueueHigh fires; restarted on the same port after Prometheus failed to deliver"
    require_binary("prometheus")
    require_binary("prometheus-alertmanager")
    sink = SlackSink()
    workload = Workload(SERVER, 0.5)
    webhook = tmp_path / "slack_webhook_url"
    webhook.write_text(sink.url + "\n", encoding="utf-8")
    stack = None
    try:
        stack = start_stack(
            DEPLOY, tmp_path / "stack", prometheus_port=free_port(), alertmanager_port=free_port(),
            jobs={"orchestrator": [workload.target]}, webhook_url_file=webhook,
            scrape_interval="1s", evaluation_interval="1s", group_wait="1s", group_interval="2s",
        )  # fmt: skip
        am = stack.processes[0]
        am_args = list(am.args)  # type: ignore[arg-type]
        am.send_signal(signal.SIGKILL)
        am.wait(10)
        assert not _firing(stack.prometheus_url), "the alert fired before Alertmanager was down"

        assert _wait(lambda: bool(_firing(stack.prometheus_url)), FIRING_TIMEOUT_S), "the alert never fired"
        fired_at = time.monotonic()
        # Prometheus tried to deliver and could not (connection refused): counted, not silently lost.
        assert _wait(lambda: _prom_counter(stack.prometheus_url, "prometheus_notifications_errors_total") > 0, 30)
        errors = _prom_counter(stack.prometheus_url, "prometheus_notifications_errors_total")
        dropped = _prom_counter(stack.prometheus_url, "prometheus_notifications_dropped_total")
        assert sink.snapshot() == []

        with open(tmp_path / "stack" / "alertmanager.log", "ab") as log:
            stack.processes[0] = subprocess.Popen(am_args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        assert _wait(lambda: httpx.get(stack.alertmanager_url + "/-/ready", timeout=1).status_code == 200 if stack.processes[0].poll() is None else False, 30)
        down_s = time.monotonic() - fired_at
        assert _wait(lambda: bool(_firing_posts(sink)), RESEND_TIMEOUT_S), "no Slack post after Alertmanager came back"
        delivered_s = time.monotonic() - fired_at
        sent_at_post = _prom_counter(stack.prometheus_url, "prometheus_notifications_sent_total")
        # Prometheus keeps re-sending the firing alert; Alertmanager must not post it again.
        assert _wait(lambda: _prom_counter(stack.prometheus_url, "prometheus_notifications_sent_total") > sent_at_post, RESEND_TIMEOUT_S), (
            "Prometheus did not re-send the alert: 'exactly once' would prove nothing"
        )
        time.sleep(5)  # group_wait/group_interval of a duplicate would have passed
        resent = _prom_counter(stack.prometheus_url, "prometheus_notifications_sent_total") - sent_at_post
        posts = _firing_posts(sink)
        assert len(posts) == 1, [p["body"]["attachments"][0]["title"] for p in posts]
        title = posts[0]["body"]["attachments"][0]["title"]
        assert SERVER in title
        row.times = 1
        row.hold(f"Prometheus counted {errors:g} failed deliveries ({dropped:g} dropped) while Alertmanager was down (~{down_s:.0f} s of firing)")
        row.hold(f"Slack post arrived {delivered_s:.0f} s after firing began, once: 1 post after {1 + resent:g}+ deliveries from Prometheus")
        row.hold(f"post names the alert and the server: {title!r}")
    finally:
        if stack is not None:
            stack.stop()
        workload.stop()
        sink.close()
