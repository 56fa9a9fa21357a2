"""The demo's sync fault switches end to end: real vLLM (CPU), the analyzer, Prometheus, Alertmanager, a Slack sink.

For each switch a real ``weightwatch demo`` run (its own servers, the faults injected by the servers themselves)
must (1) get the signature from ``weightwatch analyze``, (2) make the right alert reach a local Slack sink through
Debian's Prometheus and Alertmanager, run with the repository's own prometheus.yml, rule files, alertmanager.yml
and templates (only scrape/evaluation intervals, group waits, targets and the webhook file differ), and (3) feed
every dashboard panel's query with data (tests/test_dashboards_live.py's check, on the same Prometheus).

Three runs keep the time bounded (about 9-10 minutes on 2 idle cores), the switches grouped where their signatures
do not touch each other:
* ``--hung-update`` on one server: the update takes 54 s of its 60 s budget. ``hung`` and AdminCallHung (critical)
  while the call is in flight, before the budget runs out, and the call then ends.
* ``--slow-pause 1500 --straggler 3000`` on two servers: every pause takes 1.5 s on both servers (``pause_slow``,
  WeightSyncPauseSlow on each, no pause straggler since both are slow), the last server loads 3 s slower
  (``straggler`` in the transfer phase, WeightSyncStraggler on that server only).
* ``--version-skew`` on two servers: the last server's loads fail (``version_skew``, WeightVersionSkew on it).
  Not in the straggler run: a failed call records no phase time, so with two servers the straggler would have
  no other server to be measured against.
The straggler and skew runs then run every dashboard panel's query on the same Prometheus.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import free_port, require_binary
from test_dashboards import dashboards, panel_queries
from test_dashboards_live import Prometheus, check_every_query, uses_vllm_rl
from test_stack_support import DEPLOY, SlackSink
from weightwatch.events import Event, parse_line
from weightwatch.stack_cli import LocalStack, start_stack

pytestmark = [pytest.mark.vllm, pytest.mark.binaries, pytest.mark.slow]

#: The generation load of every fault run: small, so two servers, the trainer and the orchestrator share 2 cores.
LOAD = ("--concurrency", "16", "--pool-size", "4", "--batch-size", "8", "--max-tokens", "32")
#: vLLM start-up of the run's own servers (two at once on 2 cores: 80 s idle, minutes when the machine is shared).
STARTUP_S = 600.0


@dataclass
class FaultRun:
    """One demo run with its own servers, watched by a real Prometheus + Alertmanager + Slack sink."""

    name: str
    run_dir: Path
    output: Path
    settings: dict[str, Any] = field(default_factory=dict)
    returncode: int | None = None
    posts: list[dict[str, Any]] = field(default_factory=list)
    #: alert name -> when the sink first had its firing post (epoch seconds, polled every 0.5 s)
    posted_at: dict[str, float] = field(default_factory=dict)
    dashboards: dict[str, Any] = field(default_factory=dict)
    #: the largest in-flight age / budget of any admin call Prometheus saw (the dashboard's hung panel)
    hung_ratio: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def events(self, role: str = "orchestrator") -> list[Event]:
        path = self.run_dir / f"{role}.log"
        if not path.exists():
            return []
        return [ev for line in path.read_text(errors="replace").splitlines() if isinstance(ev := parse_line(line), Event)]

    def firing(self, alert: str) -> list[dict[str, Any]]:
        """Slack attachments of firing posts of ``alert``."""
        out = []
        for post in self.posts:
            for att in post["body"].get("attachments", []):
                if att.get("title", "").startswith("[FIRING") and f"] {alert}" in att["title"]:
                    out.append(att)
        return out


class _Running(Prometheus):
    """tests/test_dashboards_live.py's Prometheus API helpers on the stack's already running Prometheus."""

    def __init__(self, url: str) -> None:  # noqa: D107 - nothing to start: start_stack did
        self.url = url


def _label_servers(stack: LocalStack, settings: dict[str, Any]) -> None:
    """Give each inference target its own `server` label (the orchestrator's name for it), then reload Prometheus.

    prometheus.yml labels its one demo target server="127.0.0.1:8001"; a run with free ports and several servers
    names each by the host:port of its admin lane, as the orchestrator's metrics do.
    """
    path = stack.work_dir / "prometheus.yml"
    config = yaml.safe_load(path.read_text())
    labels = settings["server_labels"]
    for sc in config["scrape_configs"]:
        if sc["job_name"] == "inference":
            sc["static_configs"] = [{"targets": [t], "labels": {"server": labels[t]}} for t in settings["targets"]["inference"]]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    httpx.post(stack.prometheus_url + "/-/reload", timeout=30).raise_for_status()


def _settings(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((run_dir / "demo.json").read_text())
    except (OSError, ValueError):
        return None
    return data if "targets" in data else None


def _fault_run(base: Path, tiny_model: Path, name: str, args: tuple[str, ...], duration: float, alerts: tuple[str, ...],
               dashboards_check: bool = True) -> FaultRun:
    require_binary("prometheus")
    require_binary("prometheus-alertmanager")
    run = FaultRun(name, base / "run", base / "demo.out")
    cmd = [sys.executable, "-m", "weightwatch", "demo", "--no-live", "--ports", "auto", "--run-dir", str(run.run_dir),
           "--model", str(tiny_model), "--duration", str(duration), *LOAD, *args]
    sink = SlackSink()
    stack: LocalStack | None = None
    t0 = time.monotonic()
    with open(run.output, "wb") as out:
        demo = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_S
        while (settings := _settings(run.run_dir)) is None:
            assert demo.poll() is None, f"{name}: the demo exited early ({demo.returncode}):\n{run.text()[-4000:]}"
            assert time.monotonic() < deadline, f"{name}: the demo's servers did not come up in {STARTUP_S:.0f} s:\n{run.text()[-4000:]}"
            time.sleep(0.5)
        run.settings = settings
        running = time.monotonic()
        run.seconds["startup"] = running - t0
        webhook = base / "slack_webhook_url"
        webhook.write_text(sink.url + "\n")
        stack = start_stack(DEPLOY, base / "stack", prometheus_port=free_port(), alertmanager_port=free_port(),
                            jobs=settings["targets"], webhook_url_file=webhook, scrape_interval="1s", evaluation_interval="1s",
                            group_wait="1s", group_interval="2s")
        _label_servers(stack, settings)
        # Every expected alert posts while the demo runs (for: 1m at most, plus scrape, evaluation and group wait).
        wanted = set(alerts)
        while wanted and demo.poll() is None:
            run.posts = sink.snapshot()
            for alert in list(wanted):
                if run.firing(alert):
                    run.posted_at[alert] = time.time()
                    wanted.discard(alert)
            time.sleep(0.5)
        run.returncode = demo.wait(timeout=300)
        run.seconds["run"] = time.monotonic() - running
        run.posts = sink.snapshot()
        end = time.time()
        prom = _Running(stack.prometheus_url)
        if dashboards_check:
            run.dashboards = check_every_query(prom, end - run.seconds["run"], end, skip=uses_vllm_rl)
        run.hung_ratio = max((float(v) for s in prom.api("query_range", query=HUNG_RATIO, start=end - run.seconds["run"], end=end,
                                                          step="1s")["result"] for _, v in s["values"]), default=0.0)
        run.seconds["total"] = time.monotonic() - t0
        # the CI budget of these runs, for whoever reads the log (-s) or the run directory
        timings = {"seconds": run.seconds, "posted_after_prometheus_start_s": {
            a: round(t - (end - run.seconds["run"]), 1) for a, t in run.posted_at.items()}}
        (base / "timings.json").write_text(json.dumps(timings, indent=2))
        print(f"\n{name}: {json.dumps(timings)}")
        return run
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGTERM)  # the demo stops its own children
            try:
                demo.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.wait()
        if stack is not None:
            stack.stop()
        sink.close()


def _assert_every_panel_has_data(run: FaultRun) -> None:
    result = run.dashboards
    assert result["checked"], "no panel queries ran"
    assert not result["failures"], "panels without data:\n" + "\n".join(result["failures"])
    # only the panels on vLLM's own RL transfer metrics were left out: they exist only where vLLM's update_info
    # routes ran (the demo loads weights from a directory, prime-rl's filesystem shape) and show a no-data text
    skipped = [e for d in dashboards().values() for w, e in panel_queries(d) if w in result["skipped"]]
    assert all(uses_vllm_rl(e) for e in skipped) and len(skipped) <= 4, result["skipped"]


HUNG_ALERTS = ("AdminCallHung",)
STRAGGLER_ALERTS = ("WeightSyncPauseSlow", "WeightSyncStraggler")
SKEW_ALERTS = ("WeightVersionSkew",)


@pytest.fixture(scope="module")
def hung_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> FaultRun:
    # 70 s: the first sync's update (54 s) ends inside the run, the second one starts.
    # (one 54 s transfer is too few for the dashboards' 5-minute rates: the other runs check every panel)
    return _fault_run(tmp_path_factory.mktemp("demo_hung"), tiny_model, "hung", ("--hung-update",), 70, HUNG_ALERTS,
                      dashboards_check=False)


# 95 s: the rules hold for 1 minute once 5-minute means exist (two syncs), then scrape, evaluation and group wait.
SYNC_ALERT_RUN_S = 95


@pytest.fixture(scope="module")
def straggler_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> FaultRun:
    args = ("--slow-pause", "1500", "--straggler", "3000")
    return _fault_run(tmp_path_factory.mktemp("demo_straggler"), tiny_model, "straggler", args, SYNC_ALERT_RUN_S, STRAGGLER_ALERTS)


@pytest.fixture(scope="module")
def skew_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> FaultRun:
    return _fault_run(tmp_path_factory.mktemp("demo_skew"), tiny_model, "skew", ("--version-skew",), SYNC_ALERT_RUN_S, SKEW_ALERTS)


def _signatures(run_dir: Path) -> tuple[str, set[str]]:
    """The analyzer's verdict for the run, and every signature it names (the verdict and each sync signature found)."""
    from weightwatch.analysis import analyze_paths

    report = analyze_paths([run_dir])
    by_signature = report.to_dict()["syncs"]["by_signature"]
    return report.verdict.signature, {report.verdict.signature, *(sig for sig, count in by_signature.items() if count)}


#: What the dashboard's in-flight panel and AdminCallHung read: the age of the oldest waiting call over its budget.
HUNG_RATIO = "max(op_server:rl_admin_call_inflight_age_seconds:budget_ratio)"


def _assert_clean_exit(run: FaultRun) -> None:
    assert run.returncode == 0, run.text()[-4000:]
    assert "verdict:" in run.text()


# --------------------------------------------------------------------------- --hung-update


def test_hung_update_is_named_by_the_analyzer(hung_run: FaultRun):
    # The first sync's update answers after 54 s; the second is still in flight when the demo stops (past its
    # --stop-grace the orchestrator leaves it unfinished, as a stopped orchestrator would): a hung sync.
    _assert_clean_exit(hung_run)
    verdict, found = _signatures(hung_run.run_dir)
    assert verdict == "hung", f"{verdict} {found}\n{hung_run.text()[-3000:]}"
    assert "verdict: hung" in hung_run.text()


def test_hung_update_alert_reaches_slack_while_the_call_is_in_flight(hung_run: FaultRun):
    posts = hung_run.firing("AdminCallHung")
    assert posts, f"no AdminCallHung post; Slack got {[a.get('title') for p in hung_run.posts for a in p['body'].get('attachments', [])]}"
    text = posts[0]["text"]
    server = hung_run.settings["server_labels"][hung_run.settings["targets"]["inference"][0]]
    assert "*AdminCallHung* (critical)" in text and "phase=transfer" in text and f"server={server}" in text and "op=update_weights" in text
    assert "docs/stack.md#admincallhung" in text
    # the call then ended, inside its budget, after the post: the alert came while it was in flight
    events = hung_run.events()
    send = next(e for e in events if e.key == "weights.client.send" and e.get("op") == "update_weights")
    done = [e for e in events if e.key == "weights.client.done" and e.get("op") == "update_weights" and e.tid == send.tid]
    assert done, "the hung update never ended inside the run"
    assert done[0].get("ok") == "1" and 0.5 * 60_000 < done[0]["wall_ms"] < 60_000, done[0].fields
    answered_at = send["t"] + done[0]["wall_ms"] / 1000
    assert hung_run.posted_at["AdminCallHung"] < answered_at, (hung_run.posted_at, answered_at)


def test_hung_update_shows_in_the_live_view(hung_run: FaultRun):
    assert "in flight: update_weights on" in hung_run.text() and "past half: hung" in hung_run.text()


def test_hung_update_shows_on_the_dashboards_in_flight_age_panel(hung_run: FaultRun):
    # the panel "In-flight admin call age against its budget" reads this ratio; past 0.5 is its red line
    assert 0.5 < hung_run.hung_ratio < 1.0, hung_run.hung_ratio


# --------------------------------------------------------------------------- --slow-pause --straggler


def _servers(run: FaultRun) -> list[str]:
    """The runs' servers by the orchestrator's `server` label, in start order."""
    return [run.settings["server_labels"][t] for t in run.settings["targets"]["inference"]]


def _posted(run: FaultRun, alerts: tuple[str, ...]) -> None:
    missing = [a for a in alerts if not run.firing(a)]
    titles = [a.get("title") for p in run.posts for a in p["body"].get("attachments", [])]
    assert not missing, f"{run.name}: not posted: {missing}; Slack got {titles}\n{run.text()[-2000:]}"


def test_straggler_run_signatures(straggler_run: FaultRun):
    _assert_clean_exit(straggler_run)
    verdict, found = _signatures(straggler_run.run_dir)
    # both in every sync: the verdict is one of them, and the analyzer names the other too
    assert verdict in ("pause_slow", "straggler") and {"pause_slow", "straggler"} <= found, f"{verdict} {found}\n{straggler_run.text()[-3000:]}"


def test_straggler_run_alerts_reach_slack_naming_server_and_phase(straggler_run: FaultRun):
    _posted(straggler_run, STRAGGLER_ALERTS)
    s0, s1 = _servers(straggler_run)
    pause = "\n".join(a["text"] for a in straggler_run.firing("WeightSyncPauseSlow"))
    assert "phase=pause" in pause and f"server={s0}" in pause and f"server={s1}" in pause, pause
    assert "docs/stack.md#weightsyncpauseslow" in pause
    straggler = "\n".join(a["text"] for a in straggler_run.firing("WeightSyncStraggler"))
    assert "phase=transfer" in straggler and f"server={s1}" in straggler and f"server={s0}" not in straggler, straggler
    assert "phase=pause" not in straggler  # both pauses are slow: neither straggles


def test_straggler_run_live_view_names_the_slowest_server(straggler_run: FaultRun):
    s1 = _servers(straggler_run)[1]
    text = straggler_run.text()
    assert re.search(rf"transfer +\d+ ms \({re.escape(s1)}\)", text), text[-2000:]


def test_straggler_run_feeds_every_dashboard_panel(straggler_run: FaultRun):
    _assert_every_panel_has_data(straggler_run)


# --------------------------------------------------------------------------- --version-skew


def test_skew_run_signature(skew_run: FaultRun):
    _assert_clean_exit(skew_run)
    verdict, found = _signatures(skew_run.run_dir)
    assert verdict == "version_skew", f"{verdict} {found}\n{skew_run.text()[-3000:]}"
    assert "verdict: version_skew" in skew_run.text()


def test_skew_run_alert_reaches_slack_naming_the_server_behind(skew_run: FaultRun):
    _posted(skew_run, SKEW_ALERTS)
    s0, s1 = _servers(skew_run)
    skew = "\n".join(a["text"] for a in skew_run.firing("WeightVersionSkew"))
    assert f"server={s1}" in skew and f"server={s0}" not in skew and "docs/stack.md#weightversionskew" in skew, skew


def test_skew_run_live_view_shows_the_failed_loads_and_versions(skew_run: FaultRun):
    s1 = _servers(skew_run)[1]
    assert f"FAILED update_weights {s1}" in skew_run.text()


def test_skew_run_feeds_every_dashboard_panel(skew_run: FaultRun):
    _assert_every_panel_has_data(skew_run)
