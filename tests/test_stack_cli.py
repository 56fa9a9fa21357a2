"""`weightwatch stack`: the local mode (no Docker) that runs Debian's Prometheus and Alertmanager with the
stack's own config files rendered for 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from conftest import free_port, require_binary
from test_stack_support import DEPLOY, Workload
from weightwatch.stack_cli import StackError, find_deploy_dir, render_alertmanager_config, render_prometheus_config


def test_find_deploy_dir_from_the_checkout_and_explicit(tmp_path):
    assert find_deploy_dir() == DEPLOY
    assert find_deploy_dir(DEPLOY) == DEPLOY
    with pytest.raises(StackError, match="no prometheus/prometheus.yml"):
        find_deploy_dir(tmp_path)


def test_render_prometheus_rewrites_compose_hosts_and_paths(tmp_path):
    out = render_prometheus_config(DEPLOY, tmp_path, alertmanager="127.0.0.1:19093", target_host="10.1.2.3", scrape_interval="5s")
    cfg = yaml.safe_load(out.read_text())
    targets = {sc["job_name"]: sc["static_configs"][0]["targets"] for sc in cfg["scrape_configs"]}
    assert targets == {
        "orchestrator": ["10.1.2.3:9400"],
        "trainer": ["10.1.2.3:9401"],
        "inference": ["10.1.2.3:8000"],
        "otel-collector": ["10.1.2.3:8888"],
    }
    assert cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:19093"]
    assert cfg["rule_files"] == [str(DEPLOY / "prometheus" / "rules" / "*.yml")]
    assert cfg["global"]["scrape_interval"] == "5s"
    files = [f for sc in cfg["scrape_configs"] for sd in sc.get("file_sd_configs", []) for f in sd["files"]]
    assert files and all(f.startswith(str(DEPLOY / "prometheus" / "targets")) for f in files)
    # the repository's file is untouched
    assert "demo:9400" in (DEPLOY / "prometheus" / "prometheus.yml").read_text()


def test_render_prometheus_with_explicit_targets_keeps_only_those_jobs(tmp_path):
    out = render_prometheus_config(DEPLOY, tmp_path, alertmanager="a:1", jobs={"inference": ["127.0.0.1:18000"]})
    cfg = yaml.safe_load(out.read_text())
    assert [sc["job_name"] for sc in cfg["scrape_configs"]] == ["inference"]
    sc = cfg["scrape_configs"][0]
    assert sc["static_configs"] == [{"targets": ["127.0.0.1:18000"], "labels": {"server": "127.0.0.1:8001"}}]
    assert "file_sd_configs" not in sc
    with pytest.raises(StackError, match="unknown scrape job"):
        render_prometheus_config(DEPLOY, tmp_path, alertmanager="a:1", jobs={"orchestrtor": ["x:1"]})


def test_render_alertmanager_points_container_paths_at_the_repository(tmp_path):
    hook = tmp_path / "hook"
    out = render_alertmanager_config(DEPLOY, tmp_path, webhook_url_file=hook, group_wait="1s")
    cfg = yaml.safe_load(out.read_text())
    assert cfg["templates"] == [str(DEPLOY / "alertmanager" / "templates" / "*.tmpl")]
    files = {s["api_url_file"] for r in cfg["receivers"] for s in r["slack_configs"]}
    assert files == {str(hook)}
    assert cfg["route"]["group_wait"] == "1s"
    assert all(r["group_wait"] == "1s" for r in cfg["route"]["routes"] if "group_wait" in r)
    default = yaml.safe_load(render_alertmanager_config(DEPLOY, tmp_path / "d").read_text())
    assert {s["api_url_file"] for r in default["receivers"] for s in r["slack_configs"]} == {
        str(DEPLOY / "alertmanager" / "secrets" / "slack_webhook_url")
    }


def test_cli_render_only_skips_the_collector_unless_asked(tmp_path):
    res = _cli("--render-only", "--data-dir", str(tmp_path / "a"))
    assert res.returncode == 0, res.stderr
    jobs = [sc["job_name"] for sc in yaml.safe_load((tmp_path / "a" / "prometheus.yml").read_text())["scrape_configs"]]
    assert jobs == ["orchestrator", "trainer", "inference"]
    res = _cli("--render-only", "--collector", "--data-dir", str(tmp_path / "b"))
    jobs = [sc["job_name"] for sc in yaml.safe_load((tmp_path / "b" / "prometheus.yml").read_text())["scrape_configs"]]
    assert jobs == ["orchestrator", "trainer", "inference", "otel-collector"]


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "weightwatch", "stack", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_rejects_a_malformed_target():
    res = _cli("--target", "orchestrator", "--render-only")
    assert res.returncode == 2
    assert "expected JOB=HOST:PORT" in res.stderr


def test_cli_explains_missing_binaries(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))
    res = _cli("--data-dir", str(tmp_path / "d"), env=env)
    assert res.returncode == 2
    assert "not on PATH" in res.stderr and "prometheus" in res.stderr


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _inherit_ignored_sigint() -> None:  # runs in the child before exec: what a parent can leave behind
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


@pytest.mark.binaries
@pytest.mark.parametrize("inherited", ["default", "sigint-ignored-and-blocked"])
def test_cli_runs_both_binaries_scrapes_a_real_process_and_stops_on_ctrl_c(tmp_path, inherited):
    require_binary("prometheus")
    require_binary("prometheus-alertmanager")
    workload = Workload("inference-0:8001", 0.05)
    prom_port, am_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "weightwatch", "stack", "--prometheus-port", str(prom_port), "--alertmanager-port", str(am_port),
         "--data-dir", str(tmp_path / "stack"), "--target", f"orchestrator={workload.target}", "--scrape-interval", "1s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_inherit_ignored_sigint if inherited != "default" else None,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith(f"Prometheus    http://127.0.0.1:{prom_port}"), lines
        assert lines[1].startswith(f"Alertmanager  http://127.0.0.1:{am_port}"), lines
        prom = f"http://127.0.0.1:{prom_port}"
        deadline = time.monotonic() + 30
        health = None
        while time.monotonic() < deadline:
            active = httpx.get(prom + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            health = [(t["labels"]["job"], t["health"]) for t in active]
            if health == [("orchestrator", "up")]:
                break
            time.sleep(0.5)
        assert health == [("orchestrator", "up")]
        groups = {g["name"] for g in httpx.get(prom + "/api/v1/rules", timeout=5).json()["data"]["groups"]}
        assert {"weightwatch-weight-update", "weightwatch-weight-update-quantiles", "weightwatch-targets"} <= groups
        ams = httpx.get(prom + "/api/v1/alertmanagers", timeout=5).json()["data"]["activeAlertmanagers"]
        assert [a["url"] for a in ams] == [f"http://127.0.0.1:{am_port}/api/v2/alerts"]
        assert httpx.get(f"http://127.0.0.1:{am_port}/api/v2/status", timeout=5).status_code == 200

        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0  # a hang guard: both children get SIGTERM at once, 10 s before SIGKILL
        assert "stopped Prometheus and Alertmanager" in proc.stdout.read()
        assert not _port_open(prom_port) and not _port_open(am_port), "a child survived Ctrl-C"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        workload.stop()
