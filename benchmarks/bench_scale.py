"""Benchmark: what weightwatch's metrics cost Prometheus with N inference servers (N = 8, 64, 256, 1,024).

    python -m benchmarks.bench_scale [--sizes 8,64,256,1024] [--reps 20] [--warmup 75]
    python -m benchmarks.bench_scale --sizes 8,64          # quick

For each N, one exporter process (``python -m benchmarks.bench_scale serve``) holds N simulated inference
servers and one orchestrator, each a ``weightwatch.telemetry.Metrics`` on its own ``CollectorRegistry``
(the project's emitters, not hand-written text), fed by the same ``observe``/``set``/``inc`` calls the admin
handlers and the AdminClient make, with every op, every phase and N server labels; a sync round runs every
15 s (the scrape interval). It serves every registry on its own path of one HTTP server in OpenMetrics (what Prometheus negotiates),
rendered once per round. Debian's Prometheus scrapes them through file_sd targets (one target per server, every 15 s as
in deploy/prometheus/prometheus.yml) with the project's rules (deploy/prometheus/rules/*.yml, each group at its own
interval) loaded. After the warm-up it measures: active series, samples/s, Prometheus RSS, rule group evaluation
time against the group's interval, scrape size and duration, and the latency (p50/p99 over --reps runs,
/api/v1/query_range) of every dashboard panel query as the dashboard opens (template variables at All, or at their
first value where a variable has no All) and of the variable queries; in the same run, each per-server panel with
every server picked, and the fleet views both raw and from the shipped recording rules.

Writes benchmarks/results/scale.md, scale.json and scale.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
DASHBOARDS = ROOT / "dashboards"
SCRAPE_INTERVAL_S = 15
SYNC_INTERVAL_S = 15.0
ADMIN_PORT = 8001
#: Longer than Grafana's default data-proxy timeout (30 s): a query past it is an error in the table.
QUERY_TIMEOUT_S = 30
#: The exporter outlives any run (the driver stops it); a fixed lifetime once ended a slow N=1,024 run mid-way.
EXPORTER_LIFETIME_S = 4 * 3600


# --------------------------------------------------------------------------- the simulated fleet (exporter process)


class Fleet:
    """N inference servers and one orchestrator, each on its own registry, driven like the real roles."""

    def __init__(self, n: int, seed: int = 1):
        from prometheus_client import CollectorRegistry

        from weightwatch import catalogue
        from weightwatch.telemetry import Metrics

        self.cat = catalogue
        self.rng = random.Random(seed)
        self.n = n
        self.servers = [f"inference-{i}:{ADMIN_PORT}" for i in range(n)]
        self.orchestrator = Metrics(CollectorRegistry(), eager_roles=("orchestrator",))
        self.inference = [Metrics(CollectorRegistry(), eager_roles=("inference",)) for _ in range(n)]
        self.step = 0
        self.lock = threading.Lock()
        for op in catalogue.OPS:
            self.orchestrator.set("rl_admin_call_budget_seconds", 720.0 if op == "update_weights" else 300.0, op=op)

    def _lat(self, median_s: float) -> float:
        return self.rng.lognormvariate(math.log(median_s), 0.6)

    def sync_round(self) -> None:
        """One sync on every server (pause -> transfer -> resume) plus the other admin ops, as each side records it."""
        cat, orch, rng = self.cat, self.orchestrator, self.rng
        self.step += 1
        now = time.time()
        phase_times: dict[str, list[float]] = {p: [] for p in cat.PHASES}
        for server, inf in zip(self.servers, self.inference, strict=True):
            # inference side: what weightwatch.inference.admin records for each admin request
            inf.set("rl_engine_paused", 1)
            for op in cat.OPS:
                rpc = self._lat({"pause": 0.8, "update_weights": 0.4, "reload_weights": 0.4, "resume": 0.02}.get(op, 0.005))
                if op != "is_paused":
                    inf.observe("rl_admin_rpc_seconds", rpc, op=op)
                inf.observe("rl_admin_server_seconds", rpc + self._lat(0.002), op=op)
            inf.observe("rl_engine_paused_seconds", self._lat(1.3))
            inf.observe("rl_engine_pause_inflight_requests", rng.randint(0, 300))
            inf.set("rl_engine_paused", 0)
            inf.set("rl_http_inflight_requests", rng.randint(50, 256), lane="inference")
            inf.set("rl_http_inflight_requests", 0, lane="admin")
            for _ in range(3):
                inf.observe("rl_event_loop_lag_seconds", self._lat(0.003))
            # orchestrator side: what the AdminClient records per call and per sync phase
            for op in cat.OPS:
                rpc = self._lat(0.4)
                queue = self._lat(0.03)
                orch.observe("rl_weight_update_pool_wait_seconds", self._lat(0.001), op=op, server=server)
                orch.observe("rl_weight_update_wall_seconds", rpc + queue + 0.002, op=op, server=server)
                orch.observe("rl_weight_update_queue_seconds", queue, op=op, server=server)
                orch.observe("rl_weight_update_rpc_seconds", rpc, op=op, server=server)
                orch.set("rl_weight_update_last_queue_seconds", queue, op=op, server=server)
                orch.set("rl_weight_update_last_success_timestamp_seconds", now, op=op, server=server)
                orch.set("rl_admin_call_inflight_age_seconds", 0.0, op=op, server=server)
            if rng.random() < 0.02:
                orch.inc("rl_weight_update_failures_total", 1.0, op="update_weights", server=server, reason=rng.choice(("timeout", "transport", "http_5xx")))
            for phase, median in (("pause", 5.2), ("transfer", 2.8), ("resume", 0.05)):
                t = self._lat(median)
                phase_times[phase].append(t)
                orch.observe("rl_weight_sync_phase_seconds", t, phase=phase, server=server)
            orch.set("rl_weight_version", self.step, server=server)
        for phase, times in phase_times.items():
            orch.observe("rl_weight_sync_straggler_seconds", max(times) - statistics.median(times), phase=phase)
        orch.observe("rl_weight_sync_seconds", sum(max(t) for t in phase_times.values()))
        orch.observe("rl_checkpoint_wait_seconds", self._lat(0.2))
        orch.observe("rl_generation_batch_seconds", self._lat(20.0))
        orch.observe("rl_orchestrator_event_loop_lag_seconds", self._lat(0.002))
        orch.set("rl_generation_inflight_requests", rng.randint(100, 4000))
        orch.set("rl_rollout_truncated_ratio", rng.random() * 0.05)
        orch.set("rl_rollout_staleness_steps", 1)
        orch.set("rl_orchestrator_step", self.step)
        orch.set("rl_checkpoint_step", self.step - 1)
        orch.set("rl_async_level", 2)


class Exposition:
    """Each registry's OpenMetrics text, rendered once per sync round by the project's registries (prometheus_client).

    One Python process serves all N targets: rendering per scrape would make the exporter, not Prometheus, the
    bottleneck at N >= 256 (it was: scrapes timed out). A real server renders only its own registry.
    """

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.bodies: dict[str, bytes] = {}
        self.stats = {"render_s": 0.0, "bytes": 0, "rounds": 0, "sync_s": 0.0}

    def registries(self) -> dict[str, Any]:
        regs = {"/metrics/orchestrator": self.fleet.orchestrator.registry}
        regs.update({f"/metrics/inference/{i}": m.registry for i, m in enumerate(self.fleet.inference)})
        return regs

    def refresh(self) -> None:
        from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

        t0 = time.monotonic()
        self.fleet.sync_round()
        t1 = time.monotonic()
        bodies = {path: openmetrics(reg) for path, reg in self.registries().items()}
        self.bodies = bodies
        self.stats = {"sync_s": t1 - t0, "render_s": time.monotonic() - t1, "bytes": sum(map(len, bodies.values())), "rounds": self.stats["rounds"] + 1}


def _handler(expo: Exposition) -> type[BaseHTTPRequestHandler]:
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == "/stats":
                body, content_type = json.dumps(expo.stats).encode(), "application/json"
            elif path in expo.bodies:
                accept = self.headers.get("Accept", "")
                if "application/openmetrics-text" in accept:
                    body, content_type = expo.bodies[path], OPENMETRICS
                else:
                    encoder, content_type = choose_encoder(accept)
                    body = encoder(expo.registries()[path])
            else:
                self.send_error(404)
                return
            try:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the scraper gave up (timeout); it counts that itself

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def serve(n: int, port: int, duration: float) -> None:
    """The exporter process: build the fleet, run a sync round and re-render every SYNC_INTERVAL_S, serve until killed."""
    expo = Exposition(Fleet(n))
    expo.refresh()
    httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(expo))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print(json.dumps({"ready": True, "port": port}), flush=True)
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        expo.refresh()
        time.sleep(max(0.0, SYNC_INTERVAL_S - (time.monotonic() - t0)))
    httpd.shutdown()


# --------------------------------------------------------------------------- Prometheus side


def _get(url: str, timeout: float = 120.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (127.0.0.1 only)
        return json.loads(resp.read())


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    return _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))["data"]["result"]


def _scalar(base: str, expr: str) -> float:
    res = _query(base, expr)
    return float(res[0]["value"][1]) if res else float("nan")


def _self_metrics(base: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as resp:  # noqa: S310
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _rss_bytes(pid: int) -> tuple[int, int]:
    rss = hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    return rss, hwm


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _write_targets(path: Path, n: int, port: int) -> None:
    groups = [{"targets": [f"127.0.0.1:{port}"], "labels": {"job": "orchestrator", "instance": "orchestrator-0:9400", "__metrics_path__": "/metrics/orchestrator"}}]
    for i in range(n):
        groups.append(
            {
                "targets": [f"127.0.0.1:{port}"],
                "labels": {"job": "inference", "instance": f"inference-{i}:8000", "server": f"inference-{i}:{ADMIN_PORT}", "__metrics_path__": f"/metrics/inference/{i}"},
            }
        )
    path.write_text(json.dumps(groups))


def _prometheus_config(tmp: Path) -> Path:
    rules = [str(p) for p in sorted(RULES_DIR.glob("*.yml"))]
    cfg = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": "14s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
        "rule_files": rules,
        "scrape_configs": [{"job_name": "fleet", "file_sd_configs": [{"files": [str(tmp / "targets.json")]}]}],
    }
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --------------------------------------------------------------------------- the queries


def dashboard_queries() -> list[dict[str, Any]]:
    """Every panel target of dashboards/*.json, with the variables that open at their first value (no All)."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dash = json.loads(path.read_text())
        picked = sorted(v["name"] for v in dash.get("templating", {}).get("list", []) if v.get("type") == "query" and v.get("includeAll") is False)
        for panel in _panels(dash.get("panels", [])):
            targets = [t for t in panel.get("targets", []) if t.get("expr")]
            for k, t in enumerate(targets):
                ref = t.get("legendFormat") or t.get("refId") or "A"
                out.append({"dashboard": path.stem, "panel": panel.get("title", "?"), "ref": f"[{ref}]" if len(targets) > 1 else "",
                            "expr": t["expr"], "index": str(k), "first_value_vars": [v for v in picked if f"${v}" in t["expr"]]})
    return out


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))
    return out


def variable_queries() -> list[dict[str, str]]:
    """The template variables' label_values(...) queries (Grafana runs them on every dashboard load)."""
    seen: dict[str, dict[str, str]] = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        for v in json.loads(path.read_text()).get("templating", {}).get("list", []):
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            if v.get("type") == "query" and isinstance(q, str) and q.startswith("label_values("):
                seen.setdefault(q, {"dashboard": path.stem, "panel": f"variable ${v['name']}", "ref": "-", "expr": q})
    return list(seen.values())


def substitute(expr: str, rate_interval: str, values: dict[str, str] | None = None) -> str:
    """Grafana's substitution: `.*` (All) for every variable not given in ``values``."""
    values = values or {}
    out = expr.replace("$__rate_interval", rate_interval)
    for var in ("job", "instance", "server"):
        out = out.replace(f"${var}", values.get(var, ".*"))
    return out


def recorded_names() -> set[str]:
    names = set()
    for path in RULES_DIR.glob("*.yml"):
        for g in yaml.safe_load(path.read_text())["groups"]:
            names.update(r["record"] for r in g["rules"] if "record" in r)
    return names


def group_intervals() -> dict[str, float]:
    """Seconds between evaluations of each rule group (its own `interval`, else the global one)."""
    from weightwatch.stack_cli import _seconds

    out = {}
    for path in RULES_DIR.glob("*.yml"):
        for g in yaml.safe_load(path.read_text())["groups"]:
            out[g["name"]] = _seconds(str(g["interval"])) if "interval" in g else float(SCRAPE_INTERVAL_S)
    return out


#: Fleet views: (name, the raw query over all servers, the same from the shipped recording rules).
FLEET_PAIRS = (
    ("fleet queue p95 per op", 'histogram_quantile(0.95, sum by (le, op) (rate(rl_weight_update_queue_seconds_bucket{job=~".*"}[1m])))', 'max by (op) (op:rl_weight_update_queue_seconds:p95_5m{job=~".*"})'),
    ("fleet phase p95", 'histogram_quantile(0.95, sum by (le, phase) (rate(rl_weight_sync_phase_seconds_bucket{job=~".*"}[1m])))', 'max by (phase) (phase:rl_weight_sync_phase_seconds:p95_5m{job=~".*"})'),
    ("10 slowest servers (queue p95)", 'topk(10, histogram_quantile(0.95, sum by (le, server, op) (rate(rl_weight_update_queue_seconds_bucket{job=~".*"}[1m]))))', 'topk(10, max by (server, op) (op_server:rl_weight_update_queue_seconds:p95_5m{job=~".*"}))'),
)


#: Per N, after this many seconds of queries every remaining query runs once (the run stays bounded at N=1024).
QUERY_PHASE_CAP_S = 360.0
_phase_deadline = [math.inf]


def _time_query(base: str, expr: str, start: float, end: float, step: int, reps: int, budget_s: float) -> dict[str, Any]:
    if time.monotonic() > _phase_deadline[0]:
        reps = 1
    params = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": str(step)})
    times: list[float] = []
    series = 0
    error = None
    t_end = time.monotonic() + budget_s
    for _ in range(reps):
        t0 = time.perf_counter()
        try:
            res = _get(f"{base}/api/v1/query_range?{params}")
        except Exception as exc:  # noqa: BLE001 (a failing query is a result, not a crash)
            error = str(exc)[:200]
            break
        times.append(time.perf_counter() - t0)
        series = len(res["data"]["result"])
        if time.monotonic() > t_end and (len(times) >= 3 or time.monotonic() > _phase_deadline[0]):
            break  # a slow query: its repetitions stop at the budget (at least 3), so one N stays a few minutes
    return {"reps": len(times), "p50_ms": _pct(times, 50) * 1000, "p99_ms": _pct(times, 99) * 1000, "series": series, "error": error}


def _time_label_values(base: str, expr: str, start: float, end: float, reps: int) -> dict[str, Any]:
    m = re.fullmatch(r"label_values\((?:(.+), )?(\w+)\)", expr)
    assert m, expr
    match, label = m.groups()
    params = {"start": f"{start:.3f}", "end": f"{end:.3f}"}
    if match:
        params["match[]"] = substitute(match, "1m")
    url = f"{base}/api/v1/label/{label}/values?" + urllib.parse.urlencode(params)
    times = []
    n = 0
    for _ in range(reps):
        t0 = time.perf_counter()
        n = len(_get(url)["data"])
        times.append(time.perf_counter() - t0)
    return {"reps": reps, "p50_ms": _pct(times, 50) * 1000, "p99_ms": _pct(times, 99) * 1000, "series": n, "error": None}


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


# --------------------------------------------------------------------------- one N


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.servers import free_port, stop_process_group

    prom_bin = shutil.which("prometheus")
    if not prom_bin:
        raise SystemExit("Debian's prometheus is not on PATH (apt-get install prometheus)")
    tmp = Path(tempfile.mkdtemp(prefix=f"ww-scale-{n}-"))
    exp_port, prom_port = free_port(), free_port()
    base = f"http://127.0.0.1:{prom_port}"
    load0 = os.getloadavg()
    t_start = time.monotonic()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_scale", "serve", "--servers", str(n), "--port", str(exp_port), "--duration", str(EXPORTER_LIFETIME_S)],
        cwd=ROOT, stdout=subprocess.PIPE, start_new_session=True,
    )
    prom = None
    try:
        assert exporter.stdout is not None
        exporter.stdout.readline()  # {"ready": true}
        _write_targets(tmp / "targets.json", n, exp_port)
        cfg = _prometheus_config(tmp)
        prom = subprocess.Popen(
            [prom_bin, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
             "--enable-feature=exemplar-storage,extra-scrape-metrics", f"--query.timeout={args.query_timeout:.0f}s", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "w"), start_new_session=True,  # noqa: SIM115
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=2).read()  # noqa: S310
                break
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise SystemExit(f"prometheus did not start: {(tmp / 'prometheus.log').read_text()[-2000:]}") from None
                time.sleep(0.5)
        cpu0_prom, cpu0_exp = _cpu_seconds(prom.pid), _cpu_seconds(exporter.pid)
        t_prom = time.monotonic()
        # warm-up: every target scraped several times, rules evaluated on real rates
        time.sleep(args.warmup)
        rss_samples = []
        rule_samples: dict[str, list[float]] = {}
        for _ in range(3):
            rss_samples.append(_rss_bytes(prom.pid)[0])
            for labels, value in _self_metrics(base).get("prometheus_rule_group_last_duration_seconds", []):
                rule_samples.setdefault(labels["rule_group"].rsplit(";", 1)[-1], []).append(value)
            time.sleep(SCRAPE_INTERVAL_S / 3)
        up = _scalar(base, "count(up == 1)")
        head_series = _self_value(base, "prometheus_tsdb_head_series")
        scraped = _scalar(base, "sum(scrape_samples_scraped)")
        body = _scalar(base, "sum(scrape_body_size_bytes)")
        orch_scrape_s = _scalar(base, 'max(scrape_duration_seconds{job="orchestrator"})')
        inf_scrape_s = _scalar(base, 'quantile(0.99, scrape_duration_seconds{job="inference"})')
        orch_series = _scalar(base, 'sum(scrape_samples_scraped{job="orchestrator"})')
        inf_series = _scalar(base, 'sum(scrape_samples_scraped{job="inference"})')

        end = time.time()
        start = end - 300
        step = SCRAPE_INTERVAL_S
        rate_interval = f"{max(4 * SCRAPE_INTERVAL_S, step + SCRAPE_INTERVAL_S)}s"  # Grafana's $__rate_interval
        queries = []
        budget = args.query_budget
        # a variable without All opens at its first value, as Grafana sorts them (alphabetical)
        first = {var: sorted(_get(f"{base}/api/v1/label/{var}/values")["data"])[0] for var in ("server", "instance")}
        _phase_deadline[0] = time.monotonic() + args.query_phase_cap
        for q in dashboard_queries():
            opened = {v: first[v] for v in q["first_value_vars"]}
            r = _time_query(base, substitute(q["expr"], rate_interval, opened), start, end, step, args.reps, budget)
            row = {**q, "kind": "panel", "opened_with": opened, **r}
            if opened:  # the same panel with every server picked: what the variable's limit saves
                row["every_server"] = _time_query(base, substitute(q["expr"], rate_interval), start, end, step, args.reps, budget)
            queries.append(row)
        for q in variable_queries():
            queries.append({**q, "kind": "variable", **_time_label_values(base, q["expr"], start, end, args.reps)})
        fleet = []
        for name, raw, rec in FLEET_PAIRS:
            fleet.append({"name": name, "raw_expr": raw, "recorded_expr": rec,
                          "raw": _time_query(base, raw, start, end, step, args.reps, budget),
                          "recorded": _time_query(base, rec, start, end, step, args.reps, budget)})
        try:
            exporter_stats = _get(f"http://127.0.0.1:{exp_port}/stats", timeout=30)
        except OSError as exc:  # the measurements above stay valid without the exporter's own numbers
            exporter_stats = {"error": str(exc)[:200]}
        missed = {labels["rule_group"].rsplit(";", 1)[-1]: v for labels, v in _self_metrics(base).get("prometheus_rule_group_iterations_missed_total", [])}
        rss, hwm = _rss_bytes(prom.pid)
        wall = time.monotonic() - t_prom
        cpu_prom, cpu_exp = _cpu_seconds(prom.pid) - cpu0_prom, _cpu_seconds(exporter.pid) - cpu0_exp
        result = {
            "n": n,
            "targets_up": up,
            "head_series": head_series,
            "series_orchestrator": orch_series,
            "series_inference_total": inf_series,
            "samples_per_scrape_round": scraped,
            "samples_per_s": scraped / SCRAPE_INTERVAL_S,
            "scrape_bytes_per_round": body,
            "scrape_bytes_per_s": body / SCRAPE_INTERVAL_S,
            "orchestrator_scrape_s": orch_scrape_s,
            "inference_scrape_p99_s": inf_scrape_s,
            "rss_bytes": statistics.median(rss_samples),
            "rss_end_bytes": rss,
            "rss_peak_bytes": hwm,
            "rule_group_s": {g: max(v) for g, v in rule_samples.items()},
            "rule_group_interval_s": group_intervals(),
            "rule_eval_total_s": sum(statistics.median(v) for v in rule_samples.values()),
            # seconds of evaluation per second of time: above 1 for a group means it cannot keep its interval
            "rule_load": {g: max(v) / group_intervals().get(g, SCRAPE_INTERVAL_S) for g, v in rule_samples.items()},
            "rule_iterations_missed": missed,
            "exporter": exporter_stats,
            "query_settings": {"reps": args.reps, "budget_s": args.query_budget, "timeout_s": args.query_timeout, "phase_cap_s": args.query_phase_cap},
            "queries": queries,
            "fleet": fleet,
            "cpu": {"prometheus_cpu_s": cpu_prom, "exporter_cpu_s": cpu_exp, "wall_s": wall, "loadavg_before": load0, "loadavg_after": os.getloadavg(),
                    "total_s": time.monotonic() - t_start},
        }
        return result
    finally:
        if prom is not None:
            stop_process_group(prom, grace=10)
        stop_process_group(exporter, grace=5)
        shutil.rmtree(tmp, ignore_errors=True)


def _self_value(base: str, name: str) -> float:
    vals = _self_metrics(base).get(name, [])
    return float(vals[0][1]) if vals else float("nan")


# --------------------------------------------------------------------------- report


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:,.1f} {unit}" if unit != "B" else f"{b:,.0f} B"
        b /= 1024
    return str(b)


def _slope(xs: list[float], ys: list[float]) -> float:
    """Exponent k of y ~ N^k between the smallest and largest N (1 = linear)."""
    if len(xs) < 2 or ys[0] <= 0 or ys[-1] <= 0:
        return float("nan")
    return math.log(ys[-1] / ys[0]) / math.log(xs[-1] / xs[0])


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    ns = [r["n"] for r in results]
    lines = [
        "# Scale: weightwatch's metrics with N inference servers",
        "",
        f"`python -m benchmarks.bench_scale --sizes {','.join(map(str, ns))} --reps {args.reps} --warmup {args.warmup}` "
        f"({platform.node()}, {os.cpu_count()} CPUs shared with other jobs; Prometheus {_prom_version()}; scrape interval {SCRAPE_INTERVAL_S} s, rule groups at their own interval; "
        f"a sync round on every server every {SYNC_INTERVAL_S:.0f} s; every op of the catalogue on every server).",
        "",
        "## Cost per N",
        "",
        "| N | series | series/server | samples/s | scrape bytes/s | Prometheus RSS | rule eval (all groups) | orchestrator scrape | targets up | exporter render/round |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['n']} | {r['head_series']:,.0f} | {r['head_series'] / r['n']:,.0f} | {r['samples_per_s']:,.0f} | {_fmt_bytes(r['scrape_bytes_per_s'])}/s | "
            f"{_fmt_bytes(r['rss_bytes'])} | {r['rule_eval_total_s'] * 1000:,.1f} ms | {r['orchestrator_scrape_s'] * 1000:,.0f} ms | {r['targets_up']:.0f}/{r['n'] + 1} | {r.get('exporter', {}).get('render_s', float('nan')):.1f} s |"
        )
    if len(results) >= 2:
        xs = [float(r["n"]) for r in results]
        lines += [
            "",
            f"Growth exponent k in cost ~ N^k between N={ns[0]} and N={ns[-1]} (1 = linear): "
            f"series {_slope(xs, [r['head_series'] for r in results]):.2f}, "
            f"RSS {_slope(xs, [r['rss_bytes'] for r in results]):.2f}, "
            f"rule evaluation {_slope(xs, [r['rule_eval_total_s'] for r in results]):.2f}, "
            f"scrape bytes {_slope(xs, [r['scrape_bytes_per_s'] for r in results]):.2f}.",
        ]
    intervals = group_intervals()
    lines += ["", "## Rule groups (last evaluation, max of 3 readings; its interval; iterations missed)", "",
              "| group | interval | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|---:|" + "---:|" * len(ns)]
    groups = sorted({g for r in results for g in r["rule_group_s"]})
    for g in groups:
        lines.append(f"| {g} | {intervals.get(g, float('nan')):.0f} s | " + " | ".join(
            f"{r['rule_group_s'].get(g, float('nan')) * 1000:,.1f} ms ({r.get('rule_iterations_missed', {}).get(g, 0):.0f} missed)" for r in results) + " |")
    if all("rule_load" in r for r in results):
        lines.append("| **all groups: evaluation seconds per second** (above 1 a core cannot keep up) | | " + " | ".join(
            f"**{sum(r['rule_load'].values()):.2f}** (slowest group {max(r['rule_load'].values()):.2f} of its interval)" for r in results) + " |")
    lines += [
        "",
        f"## Dashboard queries as the dashboards open (query_range over the last 5 min, step {SCRAPE_INTERVAL_S} s; variables at All, "
        f"or at their first value where the variable has no All; p50 / p99 ms over up to {args.reps} runs)",
        "",
        "| dashboard | panel | " + " | ".join(f"N={n}" for n in ns) + " |",
        "|---|---|" + "---:|" * len(ns),
    ]
    # Sizes measured at different times may have different dashboards: rows are matched by panel, not position
    # (the newest size's dashboards give the rows; a panel a size did not have shows as "not measured").
    for q in results[-1]["queries"]:
        if q.get("kind", "panel") != "panel":
            continue
        cells = [_ms(_same_query(r, q), p99=True) for r in results]
        lines.append(f"| {q['dashboard']} | {q['panel']} {q['ref']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Per-server panels: as the dashboard opens (first server) vs every server picked (p50 ms, same run)",
        "",
        "| dashboard | panel | " + " | ".join(f"N={n} opened / every server" for n in ns) + " |",
        "|---|---|" + "---:|" * len(ns),
    ]
    for q in results[-1]["queries"]:
        if "every_server" not in q:
            continue
        same = [_same_query(r, q) for r in results]
        cells = [f"{_ms(m)} / {_ms(m.get('every_server', {}))}" if m else "not measured" for m in same]
        lines.append(f"| {q['dashboard']} | {q['panel']} {q['ref']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Fleet views: the raw query vs the shipped recording rules (p50 / p99 ms, same run)",
        "",
        "| view | " + " | ".join(f"N={n} raw" for n in ns) + " | " + " | ".join(f"N={n} recorded" for n in ns) + " |",
        "|---|" + "---:|" * (2 * len(ns)),
    ]
    for f in results[-1]["fleet"]:
        same = [next((x for x in r["fleet"] if x["name"] == f["name"]), {}) for r in results]
        raw = [_ms(x.get("raw", {}), p99=True) for x in same]
        rec = [_ms(x.get("recorded", {}), p99=True) for x in same]
        lines.append(f"| {f['name']} | " + " | ".join(raw) + " | " + " | ".join(rec) + " |")
    lines += ["", "## How the CPU was shared", "", "| N | Prometheus CPU-s | exporter CPU-s | wall s | Prometheus share of one core | load avg before → after (1 min) | query timeout / cap |",
              "|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        c = r["cpu"]
        qs = r.get("query_settings", {"timeout_s": 30, "phase_cap_s": 360})
        lines.append(f"| {r['n']} | {c['prometheus_cpu_s']:.1f} | {c['exporter_cpu_s']:.1f} | {c['wall_s']:.0f} | {c['prometheus_cpu_s'] / c['wall_s']:.0%} | "
                     f"{c['loadavg_before'][0]:.2f} → {c['loadavg_after'][0]:.2f} | {qs['timeout_s']:.0f} s / {qs['phase_cap_s']:.0f} s |")
    lines += ["", "![cost per N](scale.png)", ""]
    return "\n".join(lines)


def _same_query(result: dict[str, Any], q: dict[str, Any]) -> dict[str, Any]:
    """The row of ``result`` for the same dashboard, panel, legend and expression as ``q`` ({} when it had none)."""
    for row in result["queries"]:
        if (row.get("dashboard"), row.get("panel"), row.get("ref"), row.get("expr")) == (q.get("dashboard"), q.get("panel"), q.get("ref"), q.get("expr")):
            return row
    return {}


def _ms(row: dict[str, Any], p99: bool = False) -> str:
    """p50 (and p99) in ms; a query that never answered shows why (Prometheus answers 503 past --query.timeout)."""
    if not row:
        return "not measured"  # that size's dashboards had no such panel, or the variant did not run
    if not row.get("reps"):
        return "timeout" if "503" in (row.get("error") or "") else "error"
    text = f"{row['p50_ms']:,.1f}" + (f" / {row['p99_ms']:,.1f}" if p99 else "")
    return text + (f" (n={row['reps']})" if row["reps"] < 5 else "")


def _prom_version() -> str:
    try:
        out = subprocess.run(["prometheus", "--version"], capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).split("\n")[0].split("version ")[1].split(" ")[0]
    except Exception:  # noqa: BLE001
        return "?"


def _p50_or_timeout(result: dict[str, Any], row: dict[str, Any]) -> float:
    """A query that timed out is drawn at the timeout (a lower bound), not left out."""
    if row.get("reps"):
        return row["p50_ms"]
    return result.get("query_settings", {}).get("timeout_s", 30) * 1000


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ax = axes[0]
    ax.loglog(ns, [r["head_series"] for r in results], "o-", label="active series")
    ax.loglog(ns, [r["rss_bytes"] / 1024 for r in results], "s-", label="Prometheus RSS (KiB)")
    ax.loglog(ns, [r["scrape_bytes_per_s"] for r in results], "^-", label="scrape bytes/s")
    ref = results[0]["head_series"] / ns[0]
    ax.loglog(ns, [ref * n for n in ns], "k:", label="linear in N")
    ax.set_xlabel("inference servers N")
    ax.set_title("storage and scrape cost")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.loglog(ns, [r["rule_eval_total_s"] * 1000 for r in results], "o-", label="all rule groups")
    for g in sorted({g for r in results for g in r["rule_group_s"]}):
        ax.loglog(ns, [r["rule_group_s"].get(g, float("nan")) * 1000 for r in results], ".--", label=g, alpha=0.7)
    ax.set_xlabel("inference servers N")
    ax.set_ylabel("ms per evaluation")
    ax.set_title("rule evaluation")
    ax.legend(fontsize=7)
    ax = axes[2]
    newest = results[-1]
    nan = float("nan")

    def p50(r: dict[str, Any], q: dict[str, Any], variant: str | None = None) -> float:
        row = _same_query(r, q)  # matched by panel: sizes measured at different times may have other dashboards
        if variant is not None:
            row = row.get(variant, {})
        return _p50_or_timeout(r, row) if row else nan

    panels = [q for q in newest["queries"] if q.get("kind") == "panel"]
    for q in sorted(panels, key=lambda q: -_p50_or_timeout(newest, q))[:1]:
        ax.loglog(ns, [p50(r, q) for r in results], "o-", label=f"slowest panel: {q['panel'][:30]} (as opened)")
    picked = [q for q in panels if "every_server" in q]
    if picked:
        q = max(picked, key=lambda q: _p50_or_timeout(newest, q["every_server"]))
        ax.loglog(ns, [p50(r, q, "every_server") for r in results], "s-", label=f"{q['panel'][:24]}, every server picked (timeout at the limit)")
        ax.loglog(ns, [r.get("query_settings", {}).get("timeout_s", 30) * 1000 for r in results], "r:", label="Prometheus query timeout")
        ax.loglog(ns, [p50(r, q) for r in results], "d--", label="same, as the dashboard opens (one server)")
    ax.loglog(ns, [statistics.median(_p50_or_timeout(r, q) for q in r["queries"] if q["kind"] == "panel") for r in results], "k.-", label="median panel")
    ax.set_xlabel("inference servers N")
    ax.set_ylabel("query_range p50, ms")
    ax.set_title("dashboard query latency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        sp = argparse.ArgumentParser(prog="bench_scale serve")
        sp.add_argument("--servers", type=int, required=True)
        sp.add_argument("--port", type=int, required=True)
        sp.add_argument("--duration", type=float, default=900)
        a = sp.parse_args(argv[1:])
        serve(a.servers, a.port, a.duration)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="8,64,256,1024", help="comma-separated N (quick: 8,64)")
    ap.add_argument("--reps", type=int, default=20, help="repetitions of each query")
    ap.add_argument("--warmup", type=float, default=135, help="seconds of scraping before measuring (9 scrape rounds, 2 runs of the 1-minute rule groups)")
    ap.add_argument("--query-budget", type=float, default=3.0, help="seconds per query before stopping its repetitions early (at least 5 runs)")
    ap.add_argument("--query-timeout", type=float, default=QUERY_TIMEOUT_S, help="Prometheus --query.timeout, seconds (a slower query is an error)")
    ap.add_argument("--query-phase-cap", type=float, default=QUERY_PHASE_CAP_S, help="seconds of queries per N, after which each remaining query runs once")
    ap.add_argument("--out", default="scale", help="result name under benchmarks/results/")
    ap.add_argument("--merge", action="store_true", help="keep the other sizes already in benchmarks/results/<out>.json")
    ap.add_argument("--report-only", action="store_true", help="rewrite the table and plot from benchmarks/results/<out>.json")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    results: list[dict[str, Any]] = []
    if args.report_only:
        data = json.loads((RESULTS / f"{args.out}.json").read_text())
        results = data["results"]
        args.reps, args.warmup = data["args"]["reps"], data["args"]["warmup"]
        sizes = []
    for n in sizes:
        print(f"== N={n}", flush=True)
        r = run_size(n, args)
        print(f"   series {r['head_series']:,.0f}  samples/s {r['samples_per_s']:,.0f}  RSS {_fmt_bytes(r['rss_bytes'])}  rules {r['rule_eval_total_s'] * 1000:.1f} ms  "
              f"up {r['targets_up']:.0f}/{n + 1}  ({r['cpu']['total_s']:.0f} s)", flush=True)
        results.append(r)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.out}.partial.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    if args.merge and (RESULTS / f"{args.out}.json").exists():
        # keep the other sizes of an earlier run (each N is measured on its own Prometheus anyway)
        earlier = json.loads((RESULTS / f"{args.out}.json").read_text())["results"]
        results = sorted([e for e in earlier if e["n"] not in sizes] + results, key=lambda r: r["n"])
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    (RESULTS / f"{args.out}.partial.json").unlink(missing_ok=True)
    plot(results, RESULTS / f"{args.out}.png")
    text = report(results, args)
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
