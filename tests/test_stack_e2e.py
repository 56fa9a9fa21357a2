"""End to end on 127.0.0.1 with the real binaries and the repository's own rules and Alertmanager config.

A real weightwatch process records weight-update queue times -> Prometheus (Debian's binary, scraping it every
second, evaluating the repo's rules every second) -> WeightUpdateQueueHigh -> Alertmanager (Debian's binary, the
repo's alertmanager.yml and templates, the webhook file pointing at a local Slack-compatible sink).

Two such pipelines run side by side from the same instant: one whose queue is 0.5 s (above the 300 ms
threshold), one whose queue is 0.05 s. By the time the first has posted to Slack, the second has had the same
time to do so, and must not have.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import free_port, require_binary
from test_stack_support import DEPLOY, SlackSink, Workload
from weightwatch.catalogue import QUEUE_THRESHOLD_SECONDS
from weightwatch.stack_cli import LocalStack, start_stack

pytestmark = [pytest.mark.binaries, pytest.mark.slow]

SLOW_SERVER = "inference-slow:8001"
FAST_SERVER = "inference-fast:8001"
HIGH_QUEUE = 0.5
LOW_QUEUE = 0.05
#: for: 1m of WeightUpdateQueueHigh + scrape/eval/group_wait of a few seconds, with room for a loaded machine.
POST_TIMEOUT_S = 180


class Pipeline:
    def __init__(self, name: str, server: str, queue: float, work: Path) -> None:
        self.sink = SlackSink()
        self.workload: Workload | None = None
        self.stack: LocalStack | None = None
        try:
            self.workload = Workload(server, queue)
            webhook = work / "slack_webhook_url"
            webhook.write_text(self.sink.url + "\n", encoding="utf-8")
            self.stack = start_stack(
                DEPLOY,
                work,
                prometheus_port=free_port(),
                alertmanager_port=free_port(),
                jobs={"orchestrator": [self.workload.target]},
                webhook_url_file=webhook,
                scrape_interval="1s",
                evaluation_interval="1s",
                group_wait="1s",
                group_interval="2s",
            )
        except BaseException:
            self.close()
            raise

    def query(self, expr: str) -> list[dict[str, Any]]:
        assert self.stack is not None
        r = httpx.get(self.stack.prometheus_url + "/api/v1/query", params={"query": expr}, timeout=10)
        r.raise_for_status()
        return r.json()["data"]["result"]

    def close(self) -> None:
        if self.stack is not None:
            self.stack.stop()
        if self.workload is not None:
            self.workload.stop()
        self.sink.close()


def _is_queue_alert(body: dict[str, Any]) -> bool:
    return "WeightUpdateQueueHigh" in str(body)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory):
    require_binary("prometheus")
    require_binary("prometheus-alertmanager")
    high = Pipeline("high", SLOW_SERVER, HIGH_QUEUE, tmp_path_factory.mktemp("stack-high"))
    try:
        low = Pipeline("low", FAST_SERVER, LOW_QUEUE, tmp_path_factory.mktemp("stack-low"))
    except BaseException:
        high.close()
        raise
    try:
        started = time.monotonic()
        post = high.sink.wait_for(_is_queue_alert, POST_TIMEOUT_S)
        yield {"high": high, "low": low, "post": post, "elapsed": time.monotonic() - started}
    finally:
        low.close()
        high.close()


def test_high_queue_fires_and_slack_payload_names_alert_and_server(pipelines):
    post = pipelines["post"]
    high: Pipeline = pipelines["high"]
    assert post is not None, f"no Slack post within {POST_TIMEOUT_S} s; Prometheus alerts: {high.query('ALERTS')}"
    body = post["body"]
    assert post["path"] == "/services/T000/B000/weightwatch"
    attachment = body["attachments"][0]
    assert attachment["title"].startswith("[FIRING:1] WeightUpdateQueueHigh")
    assert SLOW_SERVER in attachment["title"]
    text = attachment["text"]
    assert "*WeightUpdateQueueHigh* (warning)" in text
    assert f"server={SLOW_SERVER}" in text
    assert "op=update_weights" in text
    # the value the rule saw: p95 of 0.5 s observations inside the (0.3, 0.5] bucket
    value = re.search(r"value=(\d+)ms", text)
    assert value is not None, text
    assert QUEUE_THRESHOLD_SECONDS * 1000 < int(value.group(1)) <= HIGH_QUEUE * 1000
    assert "Dashboard: http://localhost:3000/d/ww-weight-sync" in text
    assert "docs/stack.md#weightupdatequeuehigh" in text
    assert attachment["color"] == "warning"
    assert FAST_SERVER not in str(body)


def test_low_queue_posts_nothing(pipelines):
    low: Pipeline = pipelines["low"]
    assert pipelines["post"] is not None, "the high pipeline never posted, so silence here proves nothing"
    # The low pipeline ran as long as the high one took to post, and its rule saw data below the threshold.
    p95 = low.query("op_server:rl_weight_update_queue_seconds:p95_5m")
    assert p95, "the low pipeline recorded no queue p95: the rule had no data to judge"
    assert p95[0]["metric"]["server"] == FAST_SERVER
    assert 0 < float(p95[0]["value"][1]) < QUEUE_THRESHOLD_SECONDS
    assert low.query('ALERTS{alertname="WeightUpdateQueueHigh"}') == []
    assert low.sink.snapshot() == []


def test_exemplars_reach_prometheus_with_trace_ids(pipelines):
    high: Pipeline = pipelines["high"]
    assert high.stack is not None
    now = time.time()
    r = httpx.get(
        high.stack.prometheus_url + "/api/v1/query_exemplars",
        params={"query": "rl_weight_update_queue_seconds_bucket", "start": now - 600, "end": now},
        timeout=10,
    )
    r.raise_for_status()
    exemplars = [e for series in r.json()["data"] for e in series["exemplars"]]
    assert exemplars, "Prometheus stored no exemplars: scraping must negotiate OpenMetrics with exemplar storage on"
    assert all(re.fullmatch(r"[0-9a-f]{32}", e["labels"]["trace_id"]) for e in exemplars)
    assert {float(e["value"]) for e in exemplars} == {HIGH_QUEUE}
