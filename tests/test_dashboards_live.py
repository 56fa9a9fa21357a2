"""Every dashboard panel is backed by data: a real Prometheus (Debian's binary) scrapes real weightwatch processes,
then each panel's PromQL, with the dashboard's variables substituted the way Grafana does, runs through the
Prometheus HTTP API and must return at least one finite sample. Exemplars on the latency panels must carry trace ids.

* test_every_panel_has_data_from_a_demo_run: the target. ``weightwatch demo`` (trainer, orchestrator, and the
  session's real vLLM server on CPU through --server-url) runs for 40 s; Prometheus scrapes its three /metrics
  endpoints while it runs; then every query, vLLM's included.
* test_every_weightwatch_panel_has_data_from_live_processes: a fast check without vLLM: three processes per role that
  record the catalogue's metrics through weightwatch's own telemetry (real /metrics, real loop-lag probes, real spans
  for exemplars), the weight sync of today included (the same emitters as tests/test_alerts_sync_e2e.py:
  ``record_sync`` and ``EngineFeeder`` from tests/test_stack_support.py, and vLLM's own RL weight-transfer metrics
  class on the inference process's registry); every panel except vLLM's engine metrics, which only the demo run
  can feed.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import ROOT, free_port, require_binary
from weightwatch.stack_cli import scaled_rule_files
from test_dashboards import GEN, RULES_DIR, dashboards, metric_names, panel_queries, substitute, variable_queries

SCRAPE_SECONDS = 1
#: Grafana's $__rate_interval for a 1 s scrape and a 1 s step: max(step + scrape, 4 * scrape).
RATE_INTERVAL = f"{4 * SCRAPE_SECONDS}s"
TRACE_ID = re.compile(r"[0-9a-f]{32}")


# --------------------------------------------------------------------------- a real Prometheus


class Prometheus:
    """Debian's Prometheus on a free port with a temp config, exemplar storage and the stack's alert rules."""

    def __init__(self, base: Path, targets: dict[str, list[str]], rules: Iterable[Path] = ()):
        self.binary = require_binary("prometheus")
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "scrape_timeout": f"{SCRAPE_SECONDS}s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rules],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": addrs}]} for job, addrs in targets.items()],
        }
        self.config = base / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log = base / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.base / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--enable-feature=exemplar-storage", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("prometheus not ready after 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('error', body)}")
        return body["data"]

    def targets_up(self) -> dict[str, str]:
        return {t["labels"]["job"] + " " + t["labels"]["instance"]: t["health"] for t in self.api("targets")["activeTargets"]}

    def finite_samples(self, expr: str, start: float, end: float) -> int:
        data = self.api("query_range", query=expr, start=start, end=end, step=f"{SCRAPE_SECONDS}s")
        return sum(1 for s in data["result"] for _, v in s["values"] if math.isfinite(float(v)))

    def exemplar_trace_ids(self, expr: str, start: float, end: float) -> set[str]:
        data = self.api("query_exemplars", query=expr, start=start, end=end)
        return {e["labels"].get("trace_id", "") for s in data for e in s.get("exemplars", [])}

    def label_values(self, label: str, selector: str | None, start: float, end: float) -> list[str]:
        params: dict[str, Any] = {"start": start, "end": end}
        if selector:
            params["match[]"] = selector
        return list(self.api(f"label/{label}/values", **params))


@contextmanager
def prometheus(base: Path, targets: dict[str, list[str]]) -> Iterator[Prometheus]:
    # evaluation every 1 s instead of the shipped 15 s: the groups' own intervals (1m) shrink with it
    rules = [Path(f) for f in scaled_rule_files([str(RULES_DIR / "*.yml")], base / "rules", 1 / 15)]
    prom = Prometheus(base, targets, rules)
    prom.start()
    try:
        yield prom
    finally:
        prom.stop()


def wait_scraped(prom: Prometheus, jobs: Iterable[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = prom.targets_up()
        if health and all(any(k.startswith(job + " ") and v == "up" for k, v in health.items()) for job in jobs):
            return
        time.sleep(0.5)
    raise AssertionError(f"targets not up: {prom.targets_up()}")


# --------------------------------------------------------------------------- running every panel


def grafana_regex(values: list[str]) -> str:
    """What Grafana puts in place of a multi-value variable in a Prometheus regex matcher."""
    escaped = [re.sub(r"([\\^$*+?.()|\[\]{}])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def variable_values(prom: Prometheus, dash: dict, start: float, end: float, failures: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    all_values = {v["name"]: ".*" for v in dash["templating"]["list"] if v["type"] == "query"}
    for name, label, selector in variable_queries(dash):
        values = prom.label_values(label, substitute(selector, all_values) if selector else None, start, end)
        if not values:
            failures.append(f"{dash['uid']}: variable {name} has no values ({label} of {selector})")
        out[name] = values
    return out


def check_every_query(prom: Prometheus, start: float, end: float, skip: Any = None, skip_dashboards: Iterable[str] = ()) -> dict[str, Any]:
    """Run every panel/annotation query with the variables at All and at one concrete value; collect what is empty."""
    failures: list[str] = []
    checked: list[str] = []
    skipped: list[str] = []
    exemplars: dict[str, set[str]] = {}
    for dash in dashboards().values():
        if dash["uid"] in set(skip_dashboards):
            skipped.extend(where for where, _ in panel_queries(dash))
            continue
        found = variable_values(prom, dash, start, end, failures)
        passes = {"All": {name: ".*" for name in found}}
        passes["one value"] = {name: grafana_regex(v[:1]) if v else "no-value" for name, v in found.items()}
        passes["one value"]["job"] = ".*"  # one job would empty the panels of the other jobs, as in Grafana
        for where, expr in panel_queries(dash):
            if skip is not None and skip(expr):
                skipped.append(where)
                continue
            for pass_name, values in passes.items():
                query = substitute(expr, values, RATE_INTERVAL)
                n = prom.finite_samples(query, start, end)
                if n == 0:
                    failures.append(f"{where} ({pass_name}): no data for {query}")
            checked.append(where)
        for panel in dash["panels"]:
            for i, t in enumerate(panel.get("targets", [])):
                if t.get("exemplar") and not (skip is not None and skip(t["expr"])):
                    query = substitute(t["expr"], passes["All"], RATE_INTERVAL)
                    exemplars[f"{dash['uid']}: {panel['title']} [{i}]"] = prom.exemplar_trace_ids(query, start, end)
    return {"failures": failures, "checked": checked, "skipped": skipped, "exemplars": exemplars}


def failure_share_by_server(prom: Prometheus, start: float, end: float) -> dict[str, float]:
    """Largest value per server of the weight-sync "Failed updates" panel over the run."""
    panel = next(p for p in dashboards()["weight-sync.json"]["panels"] if p["title"].startswith("Failed updates"))
    query = substitute(panel["targets"][0]["expr"], {"job": ".*", "server": ".*", "instance": ".*"}, RATE_INTERVAL)
    data = prom.api("query_range", query=query, start=start, end=end, step=f"{SCRAPE_SECONDS}s")
    out: dict[str, float] = {}
    for series in data["result"]:
        values = [float(v) for _, v in series["values"] if math.isfinite(float(v))]
        if values:
            out[series["metric"]["server"]] = max(values)
    return out


def top_straggler(prom: Prometheus, at: float) -> list[tuple[str, str, float]]:
    """The sync-phases dashboard's straggler bar list, as Grafana's instant query sees it: (phase, server, gap) ranked."""
    panel = next(p for p in dashboards()["sync-phases.json"]["panels"] if p["title"].startswith("Stragglers:"))
    query = substitute(panel["targets"][0]["expr"], {"job": ".*", "server": ".*", "instance": ".*"}, RATE_INTERVAL)
    result = prom.api("query", query=query, time=at)["result"]
    ranked = [(r["metric"]["phase"], r["metric"]["server"], float(r["value"][1])) for r in result]
    return sorted(ranked, key=lambda r: -r[2])


def uses_vllm(expr: str) -> bool:
    return any(n.startswith("vllm:") for n in metric_names(expr))


def uses_vllm_engine(expr: str) -> bool:
    """vLLM's engine metrics (only a real vLLM feeds them); its RL weight-transfer class the emitters load themselves."""
    return any(n.startswith("vllm:") and not n.startswith(GEN.VLLM_OPTIONAL_METRICS) for n in metric_names(expr))


def uses_vllm_rl(expr: str) -> bool:
    return any(n.startswith(GEN.VLLM_OPTIONAL_METRICS) for n in metric_names(expr))


def is_sync_dashboard(where: str) -> bool:
    return where.startswith("ww-sync-phases:")


# --------------------------------------------------------------------------- live weightwatch processes (no vLLM)

EMITTER = r"""
import asyncio, random, sys, time
import weightwatch
from weightwatch import telemetry
from test_stack_support import EngineFeeder, SyncScenario, record_sync

role = sys.argv[1]
tele = weightwatch.setup(service_name=f"ww-dashboards-{role}", role=role, metrics_port=0, metrics_addr="127.0.0.1")
print(tele.metrics_port, flush=True)
m, tracer = tele.metrics, tele.tracer()
SERVERS = ("http://127.0.0.1:18001", "http://127.0.0.1:18002")
# the sync of today: three servers, one straggling in the transfer and one version behind
SYNC = SyncScenario(
    phases={f"sync-{i}:8001": {"pause": 0.3 + 0.1 * i, "transfer": 0.2 + 1.2 * (i == 2), "resume": 0.1} for i in range(3)},
    behind={"sync-1:8001": 1},
)
engine = EngineFeeder(m, tracer, tele.registry) if role == "inference" else None
started = time.time()


async def main():
    lag_metric = "rl_orchestrator_event_loop_lag_seconds" if role == "orchestrator" else "rl_event_loop_lag_seconds"
    probe = telemetry.start_loop_lag_probe(lag_metric, 0.05)  # noqa: F841 - runs until the process stops
    step = 0
    while True:  # until the test stops this process
        step += 1
        if role == "orchestrator":
            for server in SERVERS:
                labels = {"op": "update_weights", "server": server}
                with tracer.start_as_current_span("weights.update.server"):
                    queue, rpc = random.uniform(0.01, 0.5), random.uniform(0.02, 0.3)
                    m.observe("rl_weight_update_pool_wait_seconds", random.uniform(0, 0.01), **labels)
                    m.observe("rl_weight_update_queue_seconds", queue, **labels)
                    m.observe("rl_weight_update_rpc_seconds", rpc, **labels)
                    m.observe("rl_weight_update_wall_seconds", queue + rpc + 0.005, **labels)
                    m.set("rl_weight_update_last_queue_seconds", queue, **labels)
                    m.set("rl_weight_update_last_success_timestamp_seconds", time.time(), **labels)
            with tracer.start_as_current_span("weights.update.server"):  # a server that never takes an update
                m.inc("rl_weight_update_failures_total", op="update_weights", server="http://127.0.0.1:18003", reason="transport")
            if step % 3 == 0:  # and one that misses every third
                with tracer.start_as_current_span("weights.update.server"):
                    m.inc("rl_weight_update_failures_total", op="update_weights", server=SERVERS[1], reason="timeout")
            with tracer.start_as_current_span("ckpt.wait"):
                m.observe("rl_checkpoint_wait_seconds", random.uniform(0.01, 1.5))
            with tracer.start_as_current_span("gen.batch"):
                m.observe("rl_generation_batch_seconds", random.uniform(0.5, 2.0))
            m.set("rl_generation_inflight_requests", random.randint(1, 64))
            m.set("rl_rollout_truncated_ratio", random.uniform(0, 0.2))
            m.set("rl_orchestrator_step", step)
            m.set("rl_checkpoint_step", max(0, step - 1))
            m.set("rl_rollout_staleness_steps", 1)
            m.set("rl_async_level", 2)
            record_sync(m, tracer, SYNC, step, started)
        elif role == "trainer":
            with tracer.start_as_current_span("ckpt.write"):
                m.observe("rl_checkpoint_write_seconds", random.uniform(0.05, 0.3))
            m.set("rl_checkpoint_bytes", 4_000_000)
            m.set("rl_trainer_step", step)
        else:
            with tracer.start_as_current_span("admin.request"):
                m.observe("rl_admin_server_seconds", random.uniform(0.02, 0.3), op="update_weights")
                with tracer.start_as_current_span("engine.rpc"):
                    m.observe("rl_admin_rpc_seconds", random.uniform(0.02, 0.3), op="update_weights")
            for lane in ("inference", "admin"):
                m.set("rl_http_inflight_requests", random.randint(0, 8), lane=lane)
            engine.tick()
        await asyncio.sleep(0.4)


asyncio.run(main())
"""


@contextmanager
def emitters() -> Iterator[dict[str, list[str]]]:
    """One process per role recording the catalogue's metrics until stopped; yields job -> [host:port]."""
    procs: list[subprocess.Popen[str]] = []
    targets: dict[str, list[str]] = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "instrumentation"), str(ROOT / "tests")]), OTEL_TRACES_EXPORTER="none")
    try:
        for role in ("orchestrator", "trainer", "inference"):
            p = subprocess.Popen([sys.executable, "-c", EMITTER, role], stdout=subprocess.PIPE, text=True, env=env)
            procs.append(p)
            assert p.stdout is not None
            port = p.stdout.readline().strip()
            assert port.isdigit(), f"{role} emitter did not print its metrics port (got {port!r})"
            targets[role] = [f"127.0.0.1:{port}"]
        yield targets
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.mark.binaries
@pytest.mark.slow
def test_every_weightwatch_panel_has_data_from_live_processes(tmp_path: Path) -> None:
    seconds = 12.0
    with emitters() as targets, prometheus(tmp_path, targets) as prom:
        start = time.time()
        wait_scraped(prom, targets)
        time.sleep(seconds)
        end = time.time()
        result = check_every_query(prom, start, end, skip=uses_vllm_engine)
        failed_share = failure_share_by_server(prom, start, end)
        straggler = top_straggler(prom, end)
    assert not result["failures"], "panels without data:\n" + "\n".join(result["failures"])
    # the failure panel's values: 0 for the healthy server, 1 for the one that always fails, in between for the other
    assert failed_share["http://127.0.0.1:18001"] == 0.0
    assert failed_share["http://127.0.0.1:18003"] == 1.0
    assert 0.0 < failed_share["http://127.0.0.1:18002"] < 1.0
    # the straggler bar list names the slow server of the transfer, first
    assert straggler[0][:2] == ("transfer", "sync-2:8001") and straggler[0][2] > 0.5, straggler
    # only vLLM's engine panels were left to the demo run, and they are few
    all_queries = [(w, e) for d in dashboards().values() for w, e in panel_queries(d)]
    assert sorted(result["skipped"]) == sorted(w for w, e in all_queries if uses_vllm_engine(e))
    assert len(result["checked"]) + len(result["skipped"]) == len(all_queries) and len(result["skipped"]) <= 6
    # every exemplar-enabled latency query finds trace ids, as Grafana needs for the link to Tempo
    missing = [w for w, ids in result["exemplars"].items() if not any(TRACE_ID.fullmatch(i) for i in ids)]
    assert not missing, f"no trace-id exemplars for {missing}"


# --------------------------------------------------------------------------- the real demo run (vLLM on CPU)


def _read_settings(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((run_dir / "demo.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if "metrics" in data else None


def _span_trace_ids(run_dir: Path) -> set[str]:
    ids = set()
    for f in run_dir.glob("*.spans.jsonl"):
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                ids.add(json.loads(line)["trace_id"])
            except (ValueError, KeyError):
                continue
    return ids


@pytest.mark.vllm
@pytest.mark.binaries
@pytest.mark.slow
def test_every_panel_has_data_from_a_demo_run(tmp_path: Path, vllm_server: Any, tiny_model: Path) -> None:
    """`weightwatch demo` against the session's vLLM server (one server per session), scraped while it runs."""
    require_binary("prometheus")
    assert vllm_server.weights_root is not None and vllm_server.admin_url is not None
    run_dir = vllm_server.weights_root / f"dashboards-demo-{os.getpid()}"  # updates must resolve inside the weights root
    duration = 40
    demo_out = tmp_path / "demo.out"
    cmd = [sys.executable, "-m", "weightwatch", "demo", "--duration", str(duration), "--run-dir", str(run_dir), "--ports", "auto",
           "--no-live", "--concurrency", "16", "--batch-size", "8", "--max-tokens", "32", "--model", str(tiny_model),
           "--server-url", vllm_server.base_url, "--admin-url", vllm_server.admin_url]
    env = dict(os.environ, WEIGHTWATCH_ADMIN_TOKEN=vllm_server.admin_token or "")  # the session server wants one
    with open(demo_out, "wb") as out:
        demo = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 300
        settings = None
        while settings is None:
            assert demo.poll() is None, f"demo exited early:\n{demo_out.read_text(errors='replace')[-3000:]}"
            assert time.monotonic() < deadline, f"demo never exposed its /metrics:\n{demo_out.read_text(errors='replace')[-3000:]}"
            time.sleep(0.5)
            settings = _read_settings(run_dir)
        targets = {job: [httpx.URL(url).netloc.decode()] for job, url in settings["metrics"].items()}
        with prometheus(tmp_path, targets) as prom:
            start = time.time()
            wait_scraped(prom, targets)
            demo.wait(timeout=duration + 240)
            end = time.time()
            # The sync dashboard needs a demo that runs today's pause -> transfer -> resume (the demo branch makes it
            # the default); vLLM's RL transfer metrics exist only after vLLM's own update_info routes ran.
            sync_fed = bool(prom.api("query", query="rl_weight_sync_seconds_count", time=end)["result"])
            rl_fed = bool(prom.api("query", query="vllm:rl_weight_update_operation_duration_seconds_count", time=end)["result"])
            result = check_every_query(
                prom, start, end, skip=None if rl_fed else uses_vllm_rl, skip_dashboards=() if sync_fed else ("ww-sync-phases",)
            )
    finally:
        if demo.poll() is None:
            demo.terminate()  # SIGTERM: the demo stops its children itself
            try:
                demo.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, 9)
                demo.wait()
    log = demo_out.read_text(errors="replace")
    assert demo.returncode == 0, log[-3000:]
    assert not result["failures"], "panels without data:\n" + "\n".join(result["failures"]) + "\n--- demo ---\n" + log[-2000:]
    all_queries = [(w, e) for d in dashboards().values() for w, e in panel_queries(d)]
    expected_skips = {w for w, e in all_queries if (not sync_fed and is_sync_dashboard(w)) or (not rl_fed and uses_vllm_rl(e))}
    assert set(result["skipped"]) == expected_skips
    assert len(result["checked"]) + len(result["skipped"]) == len(all_queries)
    if not sync_fed:
        print(f"demo run without weight syncs: {len(expected_skips)} sync-phase queries left to the live-process test")
    # exemplars on the weight-sync latency panels are trace ids of spans this run wrote (the Tempo link finds them)
    spans = _span_trace_ids(run_dir) | _span_trace_ids(vllm_server.span_path.parent)
    sync = {w: ids for w, ids in result["exemplars"].items() if w.startswith("ww-weight-sync:")}
    assert sync and all(ids & spans for ids in sync.values()), {w: sorted(ids)[:3] for w, ids in sync.items()}
