#!/usr/bin/env python3
"""Generate the Grafana dashboards in ``dashboards/`` from weightwatch's catalogue.

Why generate: every PromQL name comes from ``weightwatch.catalogue`` (or the short, checked list of vLLM's own
``vllm:*`` metrics below), so a renamed metric breaks this script instead of leaving an empty panel. The JSON in
``dashboards/`` is what Grafana provisions; this script is run by a developer after changing it or the catalogue:

    python deploy/grafana/generate_dashboards.py          # rewrite dashboards/*.json
    python deploy/grafana/generate_dashboards.py --check  # exit 1 if the committed JSON is stale (used by the tests)

Plain dicts, not grafana-foundation-sdk: the SDK's Python releases are tied to one Grafana version each and
add a dependency to a dev script whose output is checked in and tested anyway (parsing, names, units, and
every query run against a real Prometheus).

Durations stay in seconds with Grafana's ``s`` unit, which prints sub-second values in ms ("230 ms"): a
query multiplied by 1000 would put the exemplars (raw observations, in seconds) at the wrong height.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "instrumentation"))

from weightwatch import catalogue  # noqa: E402

DASHBOARD_DIR = ROOT / "dashboards"
#: The classic dashboard schema Grafana 12 writes (the stack pins grafana/grafana:12.4.3).
SCHEMA_VERSION = 41
TAGS = ["weightwatch"]

#: Datasource uids provisioned by deploy/grafana/provisioning (fixed names shared with the stack).
PROMETHEUS_UID = "prometheus"
TEMPO_UID = "tempo"
ALERTMANAGER_UID = "alertmanager"
PROM = {"type": "prometheus", "uid": "${datasource}"}

#: vLLM's own metrics the dashboards use, as exposed on /metrics (counters with ``_total``); defined in
#: vllm/v1/metrics/loggers.py of the installed vLLM (tests check each name is still there).
VLLM_METRICS: dict[str, str] = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:generation_tokens_total": "counter",
    "vllm:prompt_tokens_total": "counter",
    # vLLM's own RL weight-transfer metrics (vllm/entrypoints/rl/online/metrics.py, label `operation` = init |
    # shutdown | start | start_draft | update | finish). Registered lazily by vLLM's own weight-transfer routes
    # (the `update_info` shape), so a server that never ran them exposes nothing: those panels say "no data".
    "vllm:rl_weight_update_operation_duration_seconds": "histogram",
    "vllm:rl_weight_update_operations_in_flight": "gauge",
}
#: vLLM's RL metrics exist only where vLLM's own weight-transfer routes ran; panels on them may be empty.
VLLM_OPTIONAL_METRICS = ("vllm:rl_weight_update_operation_duration_seconds", "vllm:rl_weight_update_operations_in_flight")
#: Prometheus' own series the dashboards read (alert state).
PROMETHEUS_BUILTINS = ("ALERTS",)

#: Checkpoint wait above this counts as slow (the checkpoint_io_slow signature of the analyzer).
CHECKPOINT_WAIT_SLOW_SECONDS = float(getattr(catalogue, "CHECKPOINT_WAIT_SLOW_SECONDS", 1.0))

#: Alert rule (deploy/prometheus/rules) -> the threshold the panels draw for it. A panel whose description says
#: "Alert: NAME" draws NAME's threshold; the tests check each value against the rule file and the catalogue.
ALERT_THRESHOLDS: dict[str, float] = {
    "WeightUpdateQueueHigh": catalogue.QUEUE_THRESHOLD_SECONDS,
    "WeightUpdateRpcSlow": catalogue.RPC_SLOW_SECONDS,
    "WeightUpdateStalled": 600.0,
    "CheckpointWaitSlow": CHECKPOINT_WAIT_SLOW_SECONDS,
    "TruncationHigh": 0.1,
    "WeightSyncPauseSlow": catalogue.PAUSE_SLOW_SECONDS,
    "WeightSyncResumeSlow": catalogue.RESUME_SLOW_SECONDS,
    "WeightSyncStraggler": catalogue.STRAGGLER_MIN_GAP_SECONDS,
    "AdminCallHung": catalogue.HUNG_BUDGET_FRACTION,
}

QUANTILES = (0.5, 0.95, 0.99)
#: A zero series labelled alertname="none": alert panels show 0, not "no data", when nothing fires.
NO_ALERTS = 'label_replace(vector(0), "alertname", "none", "", "")'
RATE = "$__rate_interval"

# Label selectors: orchestrator-side update metrics carry `server`; inference-side ones are told apart by the
# scrape target (`instance`); everything can be narrowed by `job`.
SEL_JOB = 'job=~"$job"'
SEL_UPDATE = 'job=~"$job", server=~"$server"'
SEL_INFER = 'job=~"$job", instance=~"$instance"'


# --------------------------------------------------------------------------- metric names


def metric(name: str, kind: str | None = None) -> str:
    """A catalogue metric name; KeyError here means the dashboard and the catalogue drifted apart."""
    spec = catalogue.METRICS_BY_NAME[name]
    if kind is not None and spec.type != kind:
        raise TypeError(f"{name} is a {spec.type}, the dashboard uses it as a {kind}")
    return name


def vllm(name: str) -> str:
    if name not in VLLM_METRICS:
        raise KeyError(f"{name} is not in VLLM_METRICS; add it there (tests check it against vLLM's source)")
    return name


def vllm_series(name: str, sel: str, suffix: str = "") -> str:
    """A selector for one of vLLM's metrics under either spelling of its name.

    prometheus_client (0.26) writes the colon of `vllm:*` sample names as `_` in OpenMetrics unless the scraper asks
    for `escaping=allow-utf-8`: Prometheus 3 asks and stores `vllm:x`, Prometheus 2 (Debian's 2.42) does not and
    stores `vllm_x`. Matching both keeps the panels working on both.
    """
    rest = vllm(name).removeprefix("vllm:")
    return f'{{__name__=~"vllm[:_]{rest}{suffix}", {sel}}}'


def bucket(name: str) -> str:
    return metric(name, "histogram") + "_bucket"


def recorded(name: str) -> str:
    """A recording rule's series (deploy/prometheus/rules); the tests check each one is defined there."""
    level, base, _op = name.split(":")
    base = base.removesuffix("_bucket")
    if base not in catalogue.METRICS_BY_NAME:
        raise KeyError(f"{name}: {base} is not a catalogue metric")
    return name


# --------------------------------------------------------------------------- PromQL helpers


def quantile(q: float, hist: str, sel: str, by: Sequence[str] = ()) -> str:
    by_clause = ", ".join(("le", *by))
    return f"histogram_quantile({q}, sum by ({by_clause}) (rate({bucket(hist)}{{{sel}}}[{RATE}])))"


def quantile_targets(hist: str, sel: str, by: Sequence[str], legend_prefix: str = "", exemplar: bool = True) -> list[dict]:
    label = " ".join("{{" + b + "}}" for b in by)
    out = []
    for q in QUANTILES:
        legend = f"{legend_prefix}{label} p{round(q * 100)}".strip()
        out.append(target(quantile(q, hist, sel, by), legend, exemplar=exemplar))
    return out


def fleet_quantile_targets(hist: str) -> list[dict]:
    """All servers together, per op, from the recording rules: a few series and cheap at any fleet size."""
    return [
        target(f"max by (op) ({recorded(f'op:{hist}:p{round(q * 100)}_5m')}{{{SEL_JOB}}})", f"all servers {{{{op}}}} p{round(q * 100)}")
        for q in QUANTILES
    ]


def per_server_and_fleet(hist: str) -> list[dict]:
    """p50/p95/p99 of the servers picked in $server (raw buckets, few series) and of the whole fleet (recorded)."""
    return [*quantile_targets(hist, SEL_UPDATE, ("server", "op")), *fleet_quantile_targets(hist)]


def slowest_servers(hist: str) -> list[dict]:
    """The ten worst servers by the per-server p95 the alerts read: which server to pick in $server."""
    p95 = recorded(f"op_server:{hist}:p95_5m")
    return [target(f"topk(10, max by (server, op) ({p95}{{{SEL_JOB}}}))", "{{server}} {{op}}", instant=True)]


#: Appended to the per-server latency panels of the weight-sync dashboard.
PICKED_SERVERS = (" Lines named by a server are the servers picked in `$server` (raw buckets); `all servers` lines are the "
                  "fleet per op (recording rules), so one server can be held against the rest at any fleet size.")


# --------------------------------------------------------------------------- panel builders


def target(expr: str, legend: str = "", *, exemplar: bool = False, instant: bool = False) -> dict:
    return {
        "datasource": PROM,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
        "exemplar": exemplar,
        "editorMode": "code",
    }


def thresholds_steps(threshold: float | None, *, below_is_bad: bool = False) -> dict:
    """Green below the threshold and red from it on (or the other way round for a headroom)."""
    good, bad = ("red", "green") if below_is_bad else ("green", "red")
    steps: list[dict[str, Any]] = [{"color": good, "value": None}]
    if threshold is not None:
        steps.append({"color": bad, "value": threshold})
    return {"mode": "absolute", "steps": steps}


def timeseries(
    title: str,
    description: str,
    targets: list[dict],
    unit: str,
    *,
    threshold: float | None = None,
    min_value: float | None = 0,
    max_value: float | None = None,
    overrides: Sequence[dict] = (),
    draw: str = "line",
    stacked: bool = False,
    step_lines: bool = False,
    no_value: str | None = None,
) -> dict:
    custom: dict[str, Any] = {
        "drawStyle": draw,
        "lineWidth": 1,
        "fillOpacity": 60 if stacked else 10,
        "showPoints": "auto",
        "spanNulls": False,
        "thresholdsStyle": {"mode": "dashed" if threshold is not None else "off"},
    }
    if stacked:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    if step_lines:
        custom["lineInterpolation"] = "stepAfter"
    defaults: dict[str, Any] = {"unit": unit, "custom": custom, "thresholds": thresholds_steps(threshold)}
    if no_value is not None:
        defaults["noValue"] = no_value
    if min_value is not None:
        defaults["min"] = min_value
    if max_value is not None:
        defaults["max"] = max_value
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": PROM,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": list(overrides)},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"], "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str,
    description: str,
    targets: list[dict],
    unit: str,
    *,
    threshold: float | None = None,
    below_is_bad: bool = False,
    decimals: int | None = None,
) -> dict:
    steps = thresholds_steps(threshold, below_is_bad=below_is_bad)
    defaults: dict[str, Any] = {"unit": unit, "thresholds": steps, "color": {"mode": "thresholds"}}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": PROM,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "area",
            "justifyMode": "auto",
            "textMode": "value_and_name",
            "orientation": "auto",
        },
    }


def heatmap(title: str, description: str, targets: list[dict], unit: str) -> dict:
    """One row per series (here: per server), coloured by value: a straggler is the one hot row."""
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": PROM,
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"hideFrom": {"legend": False, "tooltip": False, "viz": False}}}, "overrides": []},
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5, "fill": "dark-orange", "reverse": False},
            "rowsFrame": {"layout": "auto"},
            "yAxis": {"axisPlacement": "left", "reverse": False},
            "cellValues": {"unit": unit},
            "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": True},
            "legend": {"show": True},
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
        },
    }


def bargauge(title: str, description: str, targets: list[dict], unit: str, *, threshold: float | None = None) -> dict:
    """A ranked list (instant top-k): the worst servers named, largest first."""
    return {
        "type": "bargauge",
        "title": title,
        "description": description,
        "datasource": PROM,
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, "min": 0, "thresholds": thresholds_steps(threshold), "color": {"mode": "thresholds"}}, "overrides": []},
        "options": {
            "orientation": "horizontal",
            "displayMode": "gradient",
            "showUnfilled": True,
            "valueMode": "color",
            "namePlacement": "left",
            "sizing": "auto",
            "minVizHeight": 12,
            "maxVizHeight": 24,
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        },
    }


def text(title: str, markdown: str) -> dict:
    return {
        "type": "text",
        "title": title,
        "description": "What each panel shows and what a bad value looks like; read this first.",
        "options": {"mode": "markdown", "content": markdown.strip() + "\n"},
    }


def alert_list(description: str) -> dict:
    """Grafana's alert list: Prometheus rules show up when the Prometheus datasource has manageAlerts on."""
    return {
        "type": "alertlist",
        "title": "Alert rules (Prometheus ruler, through Grafana)",
        "description": description,
        "options": {
            "viewMode": "list",
            "groupMode": "default",
            "groupBy": [],
            "maxItems": 20,
            "sortOrder": 1,
            "dashboardAlerts": False,
            "alertName": "",
            "alertInstanceLabelFilter": "",
            "datasource": "",
            "folder": None,
            "showInstances": True,
            "stateFilter": {"firing": True, "pending": True, "noData": False, "normal": True, "error": True},
        },
    }


def series_style(name_regex: str, **custom: Any) -> dict:
    """An override for the series whose display name matches a regex (for example the async_level line)."""
    props = [{"id": f"custom.{k}", "value": v} for k, v in custom.items()]
    return {"matcher": {"id": "byRegexp", "options": name_regex}, "properties": props}


# --------------------------------------------------------------------------- dashboard assembly


def layout(rows: Iterable[Sequence[tuple[dict, int, int]]]) -> list[dict]:
    """Place panels row by row: each item is (panel, width out of 24, height)."""
    panels: list[dict] = []
    y = 0
    pid = 1
    for row in rows:
        x = 0
        tallest = 0
        for panel, w, h in row:
            if x + w > 24:
                raise ValueError(f"row too wide at {panel['title']!r}")
            panel = dict(panel, id=pid, gridPos={"x": x, "y": y, "w": w, "h": h})
            panels.append(panel)
            pid += 1
            x += w
            tallest = max(tallest, h)
        y += tallest
    return panels


def var_datasource() -> dict:
    return {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {"selected": False, "text": "Prometheus", "value": PROMETHEUS_UID},
        "regex": "",
        "hide": 0,
        "refresh": 1,
        "includeAll": False,
        "multi": False,
        "options": [],
    }


def var_query(name: str, label: str, query: str, description: str) -> dict:
    return {
        "name": name,
        "label": label,
        "description": description,
        "type": "query",
        "datasource": PROM,
        "definition": query,
        "query": query,
        "refresh": 2,
        "regex": "",
        "sort": 1,
        "hide": 0,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
    }


def variables(server_series: str | None = None, instance_series: str | None = None, include_all: bool = True) -> list[dict]:
    """The four variables every dashboard has; the sync dashboard takes them from cheaper series, without All."""
    server = var_query(
        "server",
        "server (orchestrator's view)",
        f"label_values({server_series or bucket('rl_weight_update_wall_seconds')}{{{SEL_JOB}}}, server)",
        "The `server` label the orchestrator puts on weight-update metrics (the admin URL it calls).",
    )
    instance = var_query(
        "instance",
        "inference instance",
        f"label_values({instance_series or metric('rl_http_inflight_requests')}{{{SEL_JOB}}}, instance)",
        "Scrape target of an inference server (its /metrics host:port), for the server-side and vLLM panels.",
    )
    if not include_all:
        # per-server detail on demand: Grafana selects the first value, pick more by hand (1,024 lines help nobody)
        for var in (server, instance):
            var.update(includeAll=False, current={}, allValue=None)
            var["description"] += " Per-server panels show only the servers picked here; fleet-wide panels ignore it."
    return [
        var_datasource(),
        var_query("job", "job", "label_values(job)", "Prometheus job: orchestrator, trainer, inference (or your own names)."),
        server,
        instance,
    ]


def update_annotation() -> dict:
    """Marks every weight update on every panel, so load and slow updates line up in time."""
    count = metric("rl_weight_update_wall_seconds", "histogram") + "_count"
    return {
        "name": "Weight updates",
        "datasource": PROM,
        "enable": True,
        "hide": False,
        "iconColor": "rgba(255, 152, 48, 1)",
        "expr": f"sum by (op, server) (changes({count}{{{SEL_UPDATE}}}[{RATE}])) > 0",
        "step": "",
        "titleFormat": "weight update",
        "textFormat": "{{op}} on {{server}}",
        "tagKeys": "op,server",
        "useValueForTime": False,
    }


def sync_annotation() -> dict:
    """Marks every weight sync (pause -> transfer -> resume) on every panel."""
    count = metric("rl_weight_sync_seconds", "histogram") + "_count"
    return {
        "name": "Weight syncs",
        "datasource": PROM,
        "enable": True,
        "hide": False,
        "iconColor": "rgba(163, 82, 204, 1)",
        "expr": f"sum by (job, instance) (changes({count}{{{SEL_JOB}}}[{RATE}])) > 0",
        "step": "",
        "titleFormat": "weight sync",
        "textFormat": "sync on {{instance}}",
        "tagKeys": "job,instance",
        "useValueForTime": False,
    }


def dashboard(
    uid: str,
    title: str,
    description: str,
    panels: list[dict],
    *,
    templating: list[dict] | None = None,
    extra_annotations: Sequence[dict] = (),
) -> dict:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": TAGS,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,  # shared crosshair: one moment lines up across all panels
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "10s",
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "timepicker": {},
        "links": [{"type": "dashboards", "title": "weightwatch", "tags": TAGS, "asDropdown": True, "includeVars": True, "keepTime": True}],
        "templating": {"list": templating if templating is not None else variables()},
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                },
                update_annotation(),
                *extra_annotations,
            ]
        },
        "panels": panels,
    }


# --------------------------------------------------------------------------- the four dashboards

QUEUE_MS = round(catalogue.QUEUE_THRESHOLD_SECONDS * 1000)
RPC_SLOW_MS = round(catalogue.RPC_SLOW_SECONDS * 1000)


def weight_sync() -> dict:
    fail = metric("rl_weight_update_failures_total", "counter")
    wall_count = metric("rl_weight_update_wall_seconds", "histogram") + "_count"
    failures = f"sum by (server, op) (increase({fail}{{{SEL_UPDATE}}}[{RATE}]))"
    attempts_ok = f"sum by (server, op) (increase({wall_count}{{{SEL_UPDATE}}}[{RATE}]))"
    # zero-filled on both sides: a server with no failures shows 0 %, a server that only fails shows 100 %
    failures_or_zero = f"({failures} or 0 * {attempts_ok})"
    successes_or_zero = f"({attempts_ok} or 0 * {failures})"
    how = f"""
**Where does a weight update's time go?** The orchestrator times each update per server (`wall`); the server reports
its own handling time, so `queue = wall - server` is everything *in front of* the engine (client pool, connect,
accept backlog, event loop) and `rpc` is the engine reload itself.

* **queue >> rpc** (say 3,300 ms against 230 ms): the update waited behind generation traffic. Fix: a dedicated admin
  lane (own client, own port). The dashed line is the alert threshold, {QUEUE_MS} ms (`WeightUpdateQueueHigh`).
* **rpc above {RPC_SLOW_MS:,} ms with a small queue**: weight loading itself is slow.
* **pool wait > 0**: the orchestrator's HTTP pool is shared with streaming and saturated.

Orange marks are updates. Click an exemplar dot on a latency panel to open that update's trace in Tempo.
Baselines: models up to 2B wall < 1 s, queue < 100 ms, rpc < 500 ms; 7B wall < 3 s, queue < 300 ms, rpc < 2 s.
"""
    last_queue = timeseries(
        "Last update's queue vs the alert threshold",
        f"Queue time of the most recent update per server and op (gauge rl_weight_update_last_queue_seconds). Bad: above the dashed "
        f"{QUEUE_MS} ms line the update waited behind generation. Alert: WeightUpdateQueueHigh (its p95 over 5 min above the line).",
        [target(f"max by (server, op) ({metric('rl_weight_update_last_queue_seconds', 'gauge')}{{{SEL_UPDATE}}})", "{{server}} {{op}}")],
        "s",
        threshold=ALERT_THRESHOLDS["WeightUpdateQueueHigh"],
        draw="line",
    )
    rows = [
        [(text("How to read this", how), 24, 7)],
        [
            (
                stat(
                    "Last update's queue",
                    f"Queue time of the latest update, per server and op. Bad: red means above {QUEUE_MS} ms. Alert: WeightUpdateQueueHigh.",
                    [target(f"max by (server, op) ({metric('rl_weight_update_last_queue_seconds', 'gauge')}{{{SEL_UPDATE}}})", "{{server}} {{op}}")],
                    "s",
                    threshold=ALERT_THRESHOLDS["WeightUpdateQueueHigh"],
                ),
                9,
                5,
            ),
            (
                stat(
                    "Time since last successful update",
                    "Seconds since each server last loaded weights successfully. Bad: growing past a few update intervals means "
                    "updates stall or fail and rollouts come from ever older weights (red above 10 min). Alert: WeightUpdateStalled.",
                    [
                        target(
                            f"time() - max by (server, op) ({metric('rl_weight_update_last_success_timestamp_seconds', 'gauge')}{{{SEL_UPDATE}}})",
                            "{{server}} {{op}}",
                        )
                    ],
                    "s",
                    threshold=ALERT_THRESHOLDS["WeightUpdateStalled"],
                ),
                9,
                5,
            ),
            (
                stat(
                    "Alerts firing",
                    "Prometheus alerts firing now (ALERTS series). Bad: anything above 0; see the alert list for which.",
                    [target(f'count(ALERTS{{alertstate="firing"}}) or {NO_ALERTS}', "firing")],
                    "none",
                    threshold=1,
                    decimals=0,
                ),
                6,
                5,
            ),
        ],
        [
            (
                timeseries(
                    "Queue (in front of the engine) p50 / p95 / p99",
                    f"wall minus server time, from the histogram rl_weight_update_queue_seconds, per server and op. Bad: above "
                    f"{QUEUE_MS} ms (dashed) and far above rpc means the update queued behind generation (front_end_queue). "
                    "Alert: WeightUpdateQueueHigh." + PICKED_SERVERS,
                    per_server_and_fleet("rl_weight_update_queue_seconds"),
                    "s",
                    threshold=ALERT_THRESHOLDS["WeightUpdateQueueHigh"],
                ),
                8,
                9,
            ),
            (
                timeseries(
                    "Engine reload (rpc) p50 / p95 / p99",
                    f"Engine reload time reported by the server (rl_weight_update_rpc_seconds). Bad: above {RPC_SLOW_MS:,} ms "
                    "(dashed) with a small queue means weight loading itself is slow (engine_reload_slow). Alert: WeightUpdateRpcSlow." + PICKED_SERVERS,
                    per_server_and_fleet("rl_weight_update_rpc_seconds"),
                    "s",
                    threshold=ALERT_THRESHOLDS["WeightUpdateRpcSlow"],
                ),
                8,
                9,
            ),
            (
                timeseries(
                    "Wall (seen by the orchestrator) p50 / p95 / p99",
                    "Whole update per server as the orchestrator saw it (rl_weight_update_wall_seconds). Bad: above the model's "
                    "baseline (1 s up to 2B, 3 s at 7B); compare with queue and rpc to see which part grew." + PICKED_SERVERS,
                    per_server_and_fleet("rl_weight_update_wall_seconds"),
                    "s",
                ),
                8,
                9,
            ),
        ],
        [
            (
                bargauge(
                    "Slowest servers: queue p95",
                    f"The ten servers with the highest p95 queue over 5 minutes, per op (op_server:rl_weight_update_queue_seconds:p95_5m, "
                    f"the series WeightUpdateQueueHigh reads). Bad: red above {QUEUE_MS} ms. Pick a server here in `$server` to see its "
                    "p50/p95/p99 below.",
                    slowest_servers("rl_weight_update_queue_seconds"),
                    "s",
                    threshold=ALERT_THRESHOLDS["WeightUpdateQueueHigh"],
                ),
                12,
                7,
            ),
            (
                bargauge(
                    "Slowest servers: engine reload (rpc) p95",
                    f"The ten servers with the highest p95 engine reload over 5 minutes, per op (op_server:rl_weight_update_rpc_seconds:p95_5m, "
                    f"the series WeightUpdateRpcSlow reads). Bad: red above {RPC_SLOW_MS:,} ms: loading weights is slow on that host.",
                    slowest_servers("rl_weight_update_rpc_seconds"),
                    "s",
                    threshold=ALERT_THRESHOLDS["WeightUpdateRpcSlow"],
                ),
                12,
                7,
            ),
        ],
        [
            (last_queue, 12, 8),
            (
                timeseries(
                    "Pool wait p50 / p95 / p99",
                    "Time the admin request waited for a connection from the orchestrator's HTTP pool "
                    "(rl_weight_update_pool_wait_seconds). Bad: anything above a few ms means the pool is shared with "
                    "streaming generation and saturated; give updates their own client." + PICKED_SERVERS,
                    per_server_and_fleet("rl_weight_update_pool_wait_seconds"),
                    "s",
                ),
                12,
                8,
            ),
        ],
        [
            (
                timeseries(
                    "Failed updates (share of attempts)",
                    "Failed updates over failed plus successful ones, per server and op (rl_weight_update_failures_total, by "
                    "timeout, transport, http_4xx, http_5xx). Bad: anything above 0; a server that misses updates serves stale "
                    "weights.",
                    [target(f"{failures_or_zero} / ({failures_or_zero} + {successes_or_zero})", "{{server}} {{op}}")],
                    "percentunit",
                    max_value=1,
                ),
                12,
                8,
            ),
            (
                timeseries(
                    "Server-side admin time and engine call p95",
                    "The inference server's own view (rl_admin_server_seconds, rl_admin_rpc_seconds): first byte to response, and "
                    "the engine call. Bad: server time far above rpc means the server's event loop is busy; both small while "
                    "queue is large means the delay is before the server (client pool, accept backlog).",
                    [
                        target(quantile(0.95, "rl_admin_server_seconds", SEL_INFER, ("instance", "op")), "server {{instance}} {{op}} p95", exemplar=True),
                        target(quantile(0.95, "rl_admin_rpc_seconds", SEL_INFER, ("instance", "op")), "rpc {{instance}} {{op}} p95", exemplar=True),
                    ],
                    "s",
                ),
                12,
                8,
            ),
        ],
        [
            (
                alert_list(
                    "Alert rules and their state (WeightUpdateQueueHigh and the rest of deploy/prometheus/rules). "
                    "Bad: any rule firing or pending."
                ),
                12,
                8,
            ),
            (
                timeseries(
                    "Alert state over time",
                    "Number of weightwatch alerts pending or firing, by name (Prometheus' ALERTS series). Bad: anything above 0; "
                    "line it up with the latency panels to see which update raised it.",
                    [target(f"sum by (alertname, alertstate) (ALERTS) or {NO_ALERTS}", "{{alertname}} {{alertstate}}")],
                    "none",
                    threshold=1,
                ),
                12,
                8,
            ),
        ],
    ]
    return dashboard(
        "ww-weight-sync",
        "RL weight sync",
        "Where weight-update time goes (queue, engine reload, wall, pool wait), per server and op.",
        layout(rows),
        # per-server detail on demand: with 1,024 servers an All of raw per-server quantiles takes 8-29 s a panel
        templating=variables(server_series=metric("rl_weight_update_last_queue_seconds", "gauge"), include_all=False),
    )


def checkpoints() -> dict:
    how = f"""
**Is the checkpoint pipeline keeping up?** The trainer writes `weights/step_N/` and marks it `STABLE` last; the
orchestrator waits for that marker, then pushes the weights to the servers.

* **write time** grows: the trainer's disk (or fsync) is slow.
* **wait time** above {CHECKPOINT_WAIT_SLOW_SECONDS:g} s (dashed): the orchestrator stalls on checkpoints (`checkpoint_io_slow`):
  the trainer is slow to write, or the orchestrator polls the wrong path.
* **steps**: the loaded checkpoint step should trail the orchestrator by at most `async_level`.
"""
    rows = [
        [(text("How to read this", how), 24, 6)],
        [
            (
                timeseries(
                    "Checkpoint write time p50 / p95 / p99",
                    "Trainer time to write one checkpoint, fsync, rename and mark it STABLE (rl_checkpoint_write_seconds). Bad: "
                    "growing with constant size means the disk is slow; above the training step time it holds training up.",
                    quantile_targets("rl_checkpoint_write_seconds", SEL_JOB, ()),
                    "s",
                ),
                12,
                9,
            ),
            (
                timeseries(
                    "Checkpoint wait time p50 / p95 / p99",
                    f"Orchestrator time waiting for a checkpoint's STABLE marker (rl_checkpoint_wait_seconds). Bad: above "
                    f"{CHECKPOINT_WAIT_SLOW_SECONDS:g} s (dashed): checkpoint I/O is the bottleneck (trainer slow, or wrong path polled). "
                    "Alert: CheckpointWaitSlow.",
                    quantile_targets("rl_checkpoint_wait_seconds", SEL_JOB, ()),
                    "s",
                    threshold=ALERT_THRESHOLDS["CheckpointWaitSlow"],
                ),
                12,
                9,
            ),
        ],
        [
            (
                timeseries(
                    "Checkpoint step vs orchestrator step vs trainer step",
                    "The trainer's step, the orchestrator's step and the step of the checkpoint the servers loaded "
                    "(rl_trainer_step, rl_orchestrator_step, rl_checkpoint_step). Bad: the checkpoint line falling further "
                    "behind the other two; a flat orchestrator line means training stalled.",
                    [
                        target(f"max({metric('rl_trainer_step', 'gauge')}{{{SEL_JOB}}})", "trainer step"),
                        target(f"max({metric('rl_orchestrator_step', 'gauge')}{{{SEL_JOB}}})", "orchestrator step"),
                        target(f"max({metric('rl_checkpoint_step', 'gauge')}{{{SEL_JOB}}})", "loaded checkpoint step"),
                    ],
                    "suffix: steps",
                    min_value=None,
                ),
                12,
                8,
            ),
            (
                timeseries(
                    "Orchestrator step minus loaded checkpoint step",
                    "How many steps the weights in the servers trail the orchestrator, against async_level (dashed series). "
                    "Bad: above async_level: rollouts are more off-policy than configured.",
                    [
                        target(
                            f"max({metric('rl_orchestrator_step', 'gauge')}{{{SEL_JOB}}}) - max({metric('rl_checkpoint_step', 'gauge')}{{{SEL_JOB}}})",
                            "steps behind",
                        ),
                        target(f"max({metric('rl_async_level', 'gauge')}{{{SEL_JOB}}})", "async_level"),
                    ],
                    "suffix: steps",
                    overrides=[series_style("async_level", lineStyle={"fill": "dash", "dash": [10, 10]}, fillOpacity=0)],
                ),
                12,
                8,
            ),
        ],
        [
            (
                timeseries(
                    "Checkpoint size",
                    "Bytes of the last checkpoint written (rl_checkpoint_bytes). Bad: a jump without a model change (extra "
                    "state saved) makes writes and reloads slower.",
                    [target(f"max({metric('rl_checkpoint_bytes', 'gauge')}{{{SEL_JOB}}})", "checkpoint size")],
                    "bytes",
                ),
                12,
                7,
            ),
            (
                timeseries(
                    "Checkpoints written and waited for, per minute",
                    "Rate of checkpoint writes (trainer) and completed waits (orchestrator). Bad: writes without waits means "
                    "the orchestrator is not picking checkpoints up; waits without writes should not happen.",
                    [
                        target(f"sum(rate({metric('rl_checkpoint_write_seconds', 'histogram')}_count{{{SEL_JOB}}}[{RATE}])) * 60", "written"),
                        target(f"sum(rate({metric('rl_checkpoint_wait_seconds', 'histogram')}_count{{{SEL_JOB}}}[{RATE}])) * 60", "waited for"),
                    ],
                    "suffix: /min",
                ),
                12,
                7,
            ),
        ],
    ]
    return dashboard(
        "ww-checkpoints",
        "RL checkpoint pipeline",
        "Checkpoint write and wait times, and checkpoint step against orchestrator and trainer steps.",
        layout(rows),
    )


def generation() -> dict:
    how = """
**Is generation load what slows the updates?** Everything here shares one time axis with the weight-update
marks (orange) and the update panel at the top right: when in-flight requests, vLLM's waiting queue or the
event-loop lag climb at the same moment the update queue does, the update waited behind generation.

* **event-loop lag** (server or orchestrator) of hundreds of ms delays every request on that loop, admin calls included.
* **vLLM waiting > 0** for long: the engine is at capacity (KV cache near 100 % or max-num-seqs reached).
* **admin lane in-flight** stuck above 0: an update is hanging.
"""
    rows = [
        [(text("How to read this", how), 24, 6)],
        [
            (
                timeseries(
                    "In-flight requests per lane, and from the orchestrator",
                    "Requests being handled by each inference server per lane (rl_http_inflight_requests: inference, admin) "
                    "and requests the orchestrator has in flight (rl_generation_inflight_requests). Bad: admin above 0 for "
                    "long (an update hangs); inference far above vLLM's running count means requests queue in front of the engine.",
                    [
                        target(f"sum by (instance, lane) ({metric('rl_http_inflight_requests', 'gauge')}{{{SEL_INFER}}})", "{{instance}} {{lane}}"),
                        target(f"sum({metric('rl_generation_inflight_requests', 'gauge')}{{{SEL_JOB}}})", "orchestrator in flight"),
                    ],
                    "short",
                ),
                12,
                8,
            ),
            (
                timeseries(
                    "Weight update queue and rpc p95 (same time axis)",
                    f"The update latency from the weight-sync dashboard, here to line up with the load. Bad: queue above "
                    f"{QUEUE_MS} ms (dashed) while the panels around it show high load: the update waited behind generation. "
                    "Alert: WeightUpdateQueueHigh (it reads these recorded per-server p95s; exemplars are on the weight-sync dashboard).",
                    [
                        target(f"max by (server) ({recorded('op_server:rl_weight_update_queue_seconds:p95_5m')}{{{SEL_UPDATE}}})", "queue {{server}} p95"),
                        target(f"max by (server) ({recorded('op_server:rl_weight_update_rpc_seconds:p95_5m')}{{{SEL_UPDATE}}})", "rpc {{server}} p95"),
                    ],
                    "s",
                    threshold=ALERT_THRESHOLDS["WeightUpdateQueueHigh"],
                ),
                12,
                8,
            ),
        ],
        [
            (
                timeseries(
                    "vLLM running and waiting requests",
                    "vLLM's scheduler: requests in the running batch and requests waiting (vllm:num_requests_running, "
                    "vllm:num_requests_waiting). Bad: waiting above 0 for long means the engine is saturated; new work, "
                    "and the reload's engine call, wait behind it.",
                    [
                        target(f"sum by (instance) ({vllm_series('vllm:num_requests_running', SEL_INFER)})", "running {{instance}}"),
                        target(f"sum by (instance) ({vllm_series('vllm:num_requests_waiting', SEL_INFER)})", "waiting {{instance}}"),
                    ],
                    "short",
                ),
                12,
                8,
            ),
            (
                timeseries(
                    "vLLM KV-cache usage",
                    "Share of the KV cache in use (vllm:kv_cache_usage_perc, 1 = full). Bad: near 100 % the scheduler stops "
                    "admitting requests (waiting grows) and may preempt running ones.",
                    [target(f"max by (instance) ({vllm_series('vllm:kv_cache_usage_perc', SEL_INFER)})", "{{instance}}")],
                    "percentunit",
                    threshold=0.9,
                    max_value=1,
                ),
                12,
                8,
            ),
        ],
        [
            (
                timeseries(
                    "Tokens per second",
                    "Generated and prompt tokens per second (rate of vllm:generation_tokens_total, vllm:prompt_tokens_total). "
                    "Bad: a drop to 0 during an update means generation paused for the reload; a drop without one means the "
                    "engine or the orchestrator stalled.",
                    [
                        target(f"sum by (instance) (rate({vllm_series('vllm:generation_tokens_total', SEL_INFER)}[{RATE}]))", "generated {{instance}}"),
                        target(f"sum by (instance) (rate({vllm_series('vllm:prompt_tokens_total', SEL_INFER)}[{RATE}]))", "prompt {{instance}}"),
                    ],
                    "suffix: tok/s",
                ),
                12,
                8,
            ),
            (
                timeseries(
                    "Generation batch duration p50 / p95 / p99",
                    "Duration of one generation batch in the orchestrator (rl_generation_batch_seconds). Bad: growing while "
                    "tokens/s stays flat means more is being asked per batch; growing while tokens/s drops means the servers slowed.",
                    quantile_targets("rl_generation_batch_seconds", SEL_JOB, ()),
                    "s",
                ),
                12,
                8,
            ),
        ],
        [
            (
                timeseries(
                    "Event-loop lag: inference server and orchestrator",
                    "How late a periodic timer wakes on each asyncio loop (rl_event_loop_lag_seconds on the servers, "
                    "rl_orchestrator_event_loop_lag_seconds in the orchestrator). Bad: tens of ms or more; every request on that "
                    "loop (admin calls too) waits that long before its handler runs.",
                    [
                        target(quantile(0.5, "rl_event_loop_lag_seconds", SEL_INFER, ("instance",)), "server {{instance}} p50"),
                        target(quantile(0.99, "rl_event_loop_lag_seconds", SEL_INFER, ("instance",)), "server {{instance}} p99"),
                        target(quantile(0.5, "rl_orchestrator_event_loop_lag_seconds", SEL_JOB), "orchestrator p50"),
                        target(quantile(0.99, "rl_orchestrator_event_loop_lag_seconds", SEL_JOB), "orchestrator p99"),
                    ],
                    "s",
                    threshold=0.1,
                ),
                24,
                8,
            ),
        ],
    ]
    return dashboard(
        "ww-generation",
        "RL generation pressure",
        "In-flight requests, vLLM scheduler and KV cache, tokens/s and event-loop lag, on the same time axis as the weight updates.",
        layout(rows),
    )


def rl_hygiene() -> dict:
    how = """
**Are the rollouts still good training data?**

* **truncation %**: completions cut at `max_tokens`. Near 0 is healthy; a rising share means the model rambles or
  `max_tokens` is too small, and truncated rollouts bias the reward.
* **staleness**: current step minus the step of the weights that generated the rollouts. It must stay at or below
  `async_level` (dashed); above it, slow weight updates are making training more off-policy than configured.
"""
    staleness = metric("rl_rollout_staleness_steps", "gauge")
    async_level = metric("rl_async_level", "gauge")
    trunc = metric("rl_rollout_truncated_ratio", "gauge")
    rows = [
        [(text("How to read this", how), 24, 6)],
        [
            (
                stat(
                    "Truncated rollouts (last step)",
                    "Share of the last step's completions cut at max_tokens (rl_rollout_truncated_ratio). Bad: above a few % "
                    "(red above 10 %): truncated rollouts bias the reward. Alert: TruncationHigh (10-min average above it).",
                    [target(f"max({trunc}{{{SEL_JOB}}})", "truncated")],
                    "percentunit",
                    threshold=ALERT_THRESHOLDS["TruncationHigh"],
                ),
                6,
                5,
            ),
            (
                stat(
                    "Staleness (last step)",
                    "Current step minus the step of the weights that generated the rollouts (rl_rollout_staleness_steps). "
                    "Bad: above async_level.",
                    [target(f"max({staleness}{{{SEL_JOB}}})", "staleness")],
                    "suffix: steps",
                    decimals=0,
                ),
                6,
                5,
            ),
            (
                stat(
                    "async_level",
                    "Configured maximum staleness (rl_async_level). Bad: not a health signal itself; it is the bound staleness must stay under.",
                    [target(f"max({async_level}{{{SEL_JOB}}})", "async_level")],
                    "suffix: steps",
                    decimals=0,
                ),
                6,
                5,
            ),
            (
                stat(
                    "Staleness headroom",
                    "async_level minus staleness. Bad: below 0 (red) rollouts are staler than configured; at 0 the next slow "
                    "update pushes them over.",
                    [target(f"max({async_level}{{{SEL_JOB}}}) - max({staleness}{{{SEL_JOB}}})", "headroom")],
                    "suffix: steps",
                    threshold=0,
                    below_is_bad=True,
                    decimals=0,
                ),
                6,
                5,
            ),
        ],
        [
            (
                timeseries(
                    "Truncation %",
                    "Share of completions cut at max_tokens, per step (rl_rollout_truncated_ratio). Bad: above a few % or "
                    "rising (dashed at 10 %): raise max_tokens or look at the reward. Alert: TruncationHigh.",
                    [target(f"max({trunc}{{{SEL_JOB}}})", "truncated")],
                    "percentunit",
                    threshold=ALERT_THRESHOLDS["TruncationHigh"],
                    max_value=1,
                ),
                12,
                9,
            ),
            (
                timeseries(
                    "Staleness against async_level",
                    "Rollout staleness in steps (rl_rollout_staleness_steps) with the configured bound async_level (dashed "
                    "series, rl_async_level). Bad: staleness above the dashed line. Alert: StalenessAboveAsyncLevel.",
                    [
                        target(f"max({staleness}{{{SEL_JOB}}})", "staleness"),
                        target(f"max({async_level}{{{SEL_JOB}}})", "async_level"),
                    ],
                    "suffix: steps",
                    overrides=[series_style("async_level", lineStyle={"fill": "dash", "dash": [10, 10]}, fillOpacity=0)],
                ),
                12,
                9,
            ),
        ],
    ]
    return dashboard(
        "ww-rl-hygiene",
        "RL hygiene",
        "Truncation and staleness of rollouts against async_level.",
        layout(rows),
    )


STRAGGLER_GAP_MS = round(catalogue.STRAGGLER_MIN_GAP_SECONDS * 1000)
#: Syncs are events minutes apart: panels that rate raw sync histograms use the recording rules' window.
SYNC_WINDOW = "5m"
SYNC_ALERTS = ("WeightSyncPauseSlow", "WeightSyncResumeSlow", "WeightSyncStraggler", "AdminCallHung", "WeightVersionSkew", "EngineLeftPaused")
SEL_SYNC_SERVER = 'job=~"$job", server=~"$server"'


def sync_phases() -> dict:
    """The sync of today (pause -> transfer -> resume on every server), fleet-wide from recording rules, per server on demand."""
    phase_mean = recorded("phase_server:rl_weight_sync_phase_seconds:mean_5m")
    over_median = recorded("phase_server:rl_weight_sync_phase_seconds:over_median_5m")
    slowest = recorded("phase:rl_weight_sync_phase_seconds:slowest_server_5m")
    budget_ratio = recorded("op_server:rl_admin_call_inflight_age_seconds:budget_ratio")
    version = metric("rl_weight_version", "gauge")
    paused = metric("rl_engine_paused", "gauge")
    held = metric("rl_engine_pause_inflight_requests", "histogram")
    vllm_ops = vllm_series("vllm:rl_weight_update_operation_duration_seconds", SEL_INFER, "_bucket")
    sync_ops = "|".join(op for op in catalogue.OPS if op in catalogue.PHASE_OF_OP)
    pause_ms, resume_ms = round(catalogue.PAUSE_SLOW_SECONDS * 1000), round(catalogue.RESUME_SLOW_SECONDS * 1000)
    how = f"""
**Which phase took the time, which server held everyone up, is a call hanging, does every engine serve the same
weights?** A sync pauses every server, transfers the weights to every server, then resumes every server; each phase
lasts as long as its slowest server.

* **Stacked phases** (top left): the slowest server's mean per phase. At scale the pause is usually most of it.
  The dashed line is the {QUEUE_MS} ms queue threshold; the unstacked queue lines show how much of each admin call
  waited in front of the server (above the line: the admin calls queue behind generation, use the admin lane).
* **Heat maps / stragglers**: one row per server. A straggler is one hot row; the bar list names it with its gap
  over the median server (straggler: at least {catalogue.STRAGGLER_RATIO:g}x the median and {STRAGGLER_GAP_MS} ms over it).
* **Versions**: skew above 0 after a sync means some servers did not take the new weights.
* **In-flight age / budget**: above 50 % a call is hung (`AdminCallHung` fires before the budget kills the run).
* **Engine paused**: 1 for longer than a sync means nobody resumed it (`EngineLeftPaused`).

Fleet-wide panels read recording rules (cheap at 1,024 servers); the per-server panels show only the servers picked
in the `server` / `instance` variables. Purple marks are syncs. Click an exemplar on *Whole sync* or on the
per-server phase p95 to open that sync's trace in Tempo (one trace per sync: phases, servers, engine calls).
Thresholds: pause/resume slow above {pause_ms:,}/{resume_ms:,} ms.
"""
    rows = [
        [(text("How to read this", how), 24, 9)],
        [
            (
                stat(
                    "Whole sync p95 (5 min)",
                    "p95 of one whole sync, first pause sent to last resume answered (job:rl_weight_sync_seconds:p95_5m). Bad: above "
                    "the model's baseline (1 s up to 2B, 3 s at 7B); training waits this long at every sync.",
                    [target(f"max({recorded('job:rl_weight_sync_seconds:p95_5m')}{{{SEL_JOB}}})", "sync p95")],
                    "s",
                    threshold=3.0,
                ),
                4,
                5,
            ),
            (
                stat(
                    "Weight version skew",
                    "Newest minus oldest weight version over the servers (job:rl_weight_version:skew). Bad: above 0 outside a "
                    "sync: some servers serve old weights and rollouts mix policies. Alert: WeightVersionSkew.",
                    [target(f"max({recorded('job:rl_weight_version:skew')}{{{SEL_JOB}}})", "skew")],
                    "suffix: steps",
                    threshold=1,
                    decimals=0,
                ),
                4,
                5,
            ),
            (
                stat(
                    "Engines paused now",
                    "Inference engines with rl_engine_paused = 1 (job:rl_engine_paused:sum). Bad: above 0 for longer than a sync "
                    "takes: generation stands still there. Alert: EngineLeftPaused.",
                    [target(f"sum({recorded('job:rl_engine_paused:sum')}{{{SEL_JOB}}})", "paused")],
                    "short",
                    threshold=1,
                    decimals=0,
                ),
                4,
                5,
            ),
            (
                stat(
                    "Oldest admin call, share of its budget",
                    "Largest age / budget over every admin call in flight (op:rl_admin_call_inflight_age_seconds:max_budget_ratio). "
                    "Bad: red from 50 %: the call is hung and the caller's timeout will kill it. Alert: AdminCallHung.",
                    [target(f"max({recorded('op:rl_admin_call_inflight_age_seconds:max_budget_ratio')}{{{SEL_JOB}}})", "age / budget")],
                    "percentunit",
                    threshold=ALERT_THRESHOLDS["AdminCallHung"],
                ),
                4,
                5,
            ),
            (
                stat(
                    "Largest straggler gap",
                    f"Largest phase time minus the median server's, over servers and phases ({over_median}). Bad: red from "
                    f"{STRAGGLER_GAP_MS} ms: one server sets the length of every sync. Alert: WeightSyncStraggler.",
                    [target(f"max({over_median}{{{SEL_JOB}}})", "gap")],
                    "s",
                    threshold=ALERT_THRESHOLDS["WeightSyncStraggler"],
                ),
                4,
                5,
            ),
            (
                stat(
                    "Sync alerts firing",
                    "Weight-sync alerts firing now (ALERTS for " + ", ".join(SYNC_ALERTS) + "). Bad: anything above 0.",
                    [target(f'count(ALERTS{{alertstate="firing", alertname=~"{"|".join(SYNC_ALERTS)}"}}) or {NO_ALERTS}', "firing")],
                    "none",
                    threshold=1,
                    decimals=0,
                ),
                4,
                5,
            ),
        ],
        [
            (
                timeseries(
                    "Sync by phase, stacked (slowest server per phase), with the queue line",
                    f"Per phase the slowest server's mean over 5 minutes ({slowest}), stacked: the height is about one sync. Unstacked: "
                    f"p95 queue (wall minus server time) of the sync's admin calls per op. Bad: a phase growing (at scale the "
                    f"pause dominates), or a queue line above the dashed {QUEUE_MS} ms: admin calls wait behind generation.",
                    [
                        target(f"max by (phase) ({slowest}{{{SEL_JOB}}})", "{{phase}}"),
                        target(
                            f'max by (op) ({recorded("op_server:rl_weight_update_queue_seconds:p95_5m")}{{{SEL_JOB}, op=~"{sync_ops}"}})',
                            "queue p95 {{op}}",
                        ),
                    ],
                    "s",
                    threshold=catalogue.QUEUE_THRESHOLD_SECONDS,
                    stacked=True,
                    overrides=[series_style("^queue p95 .*", stacking={"mode": "none", "group": "A"}, fillOpacity=0, lineStyle={"fill": "dash", "dash": [4, 4]})],
                ),
                14,
                9,
            ),
            (
                timeseries(
                    "Whole sync p50 / p95 / p99 (exemplar: the sync's trace)",
                    "First pause sent to last resume answered (rl_weight_sync_seconds), from the raw histogram so the exemplar dots "
                    "carry each sync's trace id: click one to open the sync in Tempo. Bad: above the model's baseline, or p99 far "
                    "above p50 (some syncs wait for a straggler or a hung call).",
                    [target(quantile(q, "rl_weight_sync_seconds", SEL_JOB).replace(RATE, SYNC_WINDOW), f"sync p{round(q * 100)}", exemplar=True) for q in QUANTILES],
                    "s",
                ),
                10,
                9,
            ),
        ],
        [
            (
                heatmap(
                    f"{phase.capitalize()} per server (heat map)",
                    f"Mean {phase} time of each server over 5 minutes ({phase_mean}, phase {phase}), one row per server. Bad: "
                    f"one hot row is a straggler (named in the bar list below); the whole map hot means the {phase} itself is slow"
                    + (f" (above {pause_ms:,} ms WeightSyncPauseSlow fires)." if phase == "pause" else
                       f" (above {resume_ms:,} ms WeightSyncResumeSlow fires)." if phase == "resume" else " (weight loading)."),
                    [target(f'max by (server) ({phase_mean}{{{SEL_JOB}, phase="{phase}"}})', "{{server}}")],
                    "s",
                ),
                8,
                9,
            )
            for phase in catalogue.PHASES
        ],
        [
            (
                bargauge(
                    "Stragglers: top 10 servers by phase time minus the median",
                    f"Per server and phase, mean phase time minus the median server's ({over_median}), largest first. Bad: red from "
                    f"{STRAGGLER_GAP_MS} ms; with at least {catalogue.STRAGGLER_RATIO:g}x the median that server is a straggler and "
                    "every sync waits for it. Alert: WeightSyncStraggler.",
                    [target(f"topk(10, max by (phase, server) ({over_median}{{{SEL_JOB}}}))", "{{phase}} {{server}}", instant=True)],
                    "s",
                    threshold=ALERT_THRESHOLDS["WeightSyncStraggler"],
                ),
                12,
                9,
            ),
            (
                timeseries(
                    "Straggler gap per phase (orchestrator's own, p95)",
                    "Per sync and phase the orchestrator records slowest server minus median server (rl_weight_sync_straggler_seconds; "
                    f"p95 over 5 minutes). Bad: above the dashed {STRAGGLER_GAP_MS} ms the sync waits for one server. "
                    "Alert: WeightSyncStraggler.",
                    [target(f"max by (phase) ({recorded('phase:rl_weight_sync_straggler_seconds:p95_5m')}{{{SEL_JOB}}})", "{{phase}}")],
                    "s",
                    threshold=ALERT_THRESHOLDS["WeightSyncStraggler"],
                ),
                12,
                9,
            ),
        ],
        [
            (
                timeseries(
                    "Pause and resume on the selected servers (mean per sync)",
                    f"Mean pause and resume time of the servers picked in `server` ({phase_mean}). Bad: above the dashed "
                    f"{pause_ms:,} ms generation stands still that long at every sync. Alert: WeightSyncPauseSlow. Alert: WeightSyncResumeSlow.",
                    [target(f'max by (phase, server) ({phase_mean}{{{SEL_SYNC_SERVER}, phase=~"pause|resume"}})', "{{phase}} {{server}}")],
                    "s",
                    threshold=ALERT_THRESHOLDS["WeightSyncPauseSlow"],
                ),
                12,
                8,
            ),
            (
                timeseries(
                    "Phase p95 on the selected servers (exemplar: the sync's trace)",
                    "p95 of each phase on the servers picked in `server`, from the raw histogram rl_weight_sync_phase_seconds so the "
                    "exemplars carry the sync's trace id. Bad: one phase far above the others, or a server far above the fleet's p95.",
                    [target(quantile(0.95, "rl_weight_sync_phase_seconds", SEL_SYNC_SERVER, ("phase", "server")).replace(RATE, SYNC_WINDOW),
                            "{{phase}} {{server}} p95", exemplar=True)],
                    "s",
                ),
                12,
                8,
            ),
        ],
        [
            (
                timeseries(
                    "Weight version per server",
                    "The step each picked server serves (rl_weight_version), and the newest over all servers (dashed). Bad: a server "
                    "below the dashed line after a sync serves old weights. Alert: WeightVersionSkew.",
                    [
                        target(f"max by (server) ({version}{{{SEL_SYNC_SERVER}}})", "{{server}}"),
                        target(f"max({version}{{{SEL_JOB}}})", "newest"),
                    ],
                    "suffix: steps",
                    min_value=None,
                    step_lines=True,
                    overrides=[series_style("^newest$", lineStyle={"fill": "dash", "dash": [10, 10]}, fillOpacity=0)],
                ),
                9,
                8,
            ),
            (
                timeseries(
                    "Version skew and servers behind",
                    "Newest minus oldest version (job:rl_weight_version:skew) and how many servers are behind the newest "
                    "(job:rl_weight_version:servers_behind). Bad: above 0 for more than a sync: those servers missed the update. "
                    "Alert: WeightVersionSkew.",
                    [
                        target(f"max({recorded('job:rl_weight_version:skew')}{{{SEL_JOB}}})", "skew (steps)"),
                        target(f"sum({recorded('job:rl_weight_version:servers_behind')}{{{SEL_JOB}}})", "servers behind"),
                    ],
                    "short",
                    threshold=1,
                    step_lines=True,
                ),
                8,
                8,
            ),
            (
                bargauge(
                    "Most steps behind (top 10 servers)",
                    "Steps each server is behind the newest server (server:rl_weight_version:behind), largest first. Bad: anything "
                    "above 0 after a sync names a server that did not take the new weights. Alert: WeightVersionSkew.",
                    [target(f"topk(10, max by (server) ({recorded('server:rl_weight_version:behind')}{{{SEL_JOB}}}))", "{{server}}", instant=True)],
                    "suffix: steps",
                    threshold=1,
                ),
                7,
                8,
            ),
        ],
        [
            (
                timeseries(
                    "In-flight admin call age against its budget",
                    f"Age of the oldest waiting admin call divided by the caller's budget for that op ({budget_ratio}): fleet-wide "
                    "per op, and per picked server. Bad: from the dashed 50 % the call is hung; at 100 % the caller gives up and the "
                    "run may die. Alert: AdminCallHung.",
                    [
                        target(f"max by (op) ({recorded('op:rl_admin_call_inflight_age_seconds:max_budget_ratio')}{{{SEL_JOB}}})", "{{op}} (any server)"),
                        target(f"max by (op, server) ({budget_ratio}{{{SEL_SYNC_SERVER}}})", "{{op}} {{server}}"),
                    ],
                    "percentunit",
                    threshold=ALERT_THRESHOLDS["AdminCallHung"],
                ),
                12,
                8,
            ),
            (
                timeseries(
                    "In-flight admin call age and budget",
                    "Oldest waiting admin call per op (rl_admin_call_inflight_age_seconds, 0 when none) and the caller's budget "
                    "(rl_admin_call_budget_seconds, dashed). Bad: age climbing toward its budget line; an age that resets to 0 every "
                    "sync is healthy.",
                    [
                        target(f"max by (op) ({metric('rl_admin_call_inflight_age_seconds', 'gauge')}{{{SEL_JOB}}})", "age {{op}}"),
                        target(f"max by (op) ({metric('rl_admin_call_budget_seconds', 'gauge')}{{{SEL_JOB}}})", "budget {{op}}"),
                    ],
                    "s",
                    overrides=[series_style("^budget .*", lineStyle={"fill": "dash", "dash": [10, 10]}, fillOpacity=0)],
                ),
                12,
                8,
            ),
        ],
        [
            (
                timeseries(
                    "Engine paused (1 = paused), per instance",
                    "rl_engine_paused of each picked inference server, at the scrape interval (a paused engine shows within one "
                    "scrape). Bad: 1 for longer than a sync takes: nobody resumed it and it generates nothing. Alert: EngineLeftPaused.",
                    [target(f"max by (instance) ({paused}{{{SEL_INFER}}})", "{{instance}}")],
                    "none",
                    max_value=1,
                    step_lines=True,
                ),
                8,
                8,
            ),
            (
                timeseries(
                    "Paused time per pause (engine's view) p50 / p95",
                    "How long generation stood still, pause answered to resume answered, measured by the server "
                    "(rl_engine_paused_seconds). Bad: far above the sync's own length (the engine waited for a late resume), or "
                    "growing: every paused second is lost generation.",
                    [target(quantile(q, "rl_engine_paused_seconds", SEL_INFER, ("instance",)).replace(RATE, SYNC_WINDOW), f"{{{{instance}}}} p{round(q * 100)}", exemplar=True)
                     for q in (0.5, 0.95)],
                    "s",
                ),
                8,
                8,
            ),
            (
                timeseries(
                    "Requests held at pause",
                    "Generation requests in flight when a pause took effect (rl_engine_pause_inflight_requests): mean and max bucket "
                    "per pause. Bad: many held requests make the pause (mode=wait) or the resume slow, and those requests wait the "
                    "whole sync.",
                    [
                        target(f"sum by (instance) (rate({held}_sum{{{SEL_INFER}}}[{SYNC_WINDOW}])) / sum by (instance) (rate({held}_count{{{SEL_INFER}}}[{SYNC_WINDOW}]))",
                               "{{instance}} mean"),
                        target(f"histogram_quantile(0.99, sum by (le, instance) (rate({held}_bucket{{{SEL_INFER}}}[{SYNC_WINDOW}])))", "{{instance}} p99"),
                    ],
                    "short",
                ),
                8,
                8,
            ),
        ],
        [
            (
                timeseries(
                    "vLLM's own weight-transfer time beside ours (p95)",
                    "vLLM's vllm:rl_weight_update_operation_duration_seconds per operation (start, update, finish, ...; recorded only "
                    "by vLLM's own weight-transfer routes, the update_info shape), beside weightwatch's transfer phase (orchestrator) "
                    "and the server's update_weights time. Bad: ours far above vLLM's means the time is outside vLLM's operation "
                    "(queue, pause, HTTP); vLLM's only series empty is normal for weight_dir updates or vLLM builds without it.",
                    [
                        target(f"histogram_quantile(0.95, sum by (le, operation) (rate({vllm_ops}[{SYNC_WINDOW}])))", "vLLM {{operation}} p95"),
                        target(f'max({recorded("phase:rl_weight_sync_phase_seconds:p95_5m")}{{{SEL_JOB}, phase="transfer"}})', "weightwatch transfer phase p95"),
                        target(f'max({recorded("op:rl_admin_server_seconds:p95_5m")}{{{SEL_JOB}, op="update_weights"}})', "weightwatch server update_weights p95"),
                    ],
                    "s",
                    no_value="no data: no weight transfer measured yet",
                ),
                16,
                8,
            ),
            (
                timeseries(
                    "vLLM weight-transfer operations in flight",
                    "vLLM's vllm:rl_weight_update_operations_in_flight per operation (present only where vLLM's own weight-transfer "
                    "routes ran). Bad: above 0 for longer than a transfer takes: a vLLM weight operation hangs.",
                    [target(f"sum by (instance, operation) ({vllm_series('vllm:rl_weight_update_operations_in_flight', SEL_INFER)})", "{{instance}} {{operation}}")],
                    "short",
                    step_lines=True,
                    no_value="not exposed by this server (vLLM records it only in its own weight-transfer routes)",
                ),
                8,
                8,
            ),
        ],
    ]
    return dashboard(
        "ww-sync-phases",
        "RL weight sync phases",
        "The weight sync of today (pause -> transfer -> resume on every server): phases over time, per-server heat maps and "
        "stragglers, weight versions, hung admin calls against their budget, paused engines, vLLM's own transfer metrics.",
        layout(rows),
        templating=variables(server_series=metric("rl_weight_version", "gauge"), instance_series=metric("rl_engine_paused", "gauge"), include_all=False),
        extra_annotations=[sync_annotation()],
    )


#: file name -> builder; uids and file names are fixed names shared with the stack.
DASHBOARDS = {
    "weight-sync.json": weight_sync,
    "checkpoints.json": checkpoints,
    "generation.json": generation,
    "rl-hygiene.json": rl_hygiene,
    "sync-phases.json": sync_phases,
}


def render(builder: Any) -> str:
    return json.dumps(builder(), indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if dashboards/ differs from what this script generates")
    parser.add_argument("--out", type=Path, default=DASHBOARD_DIR, help="directory to write (default: dashboards/)")
    args = parser.parse_args(argv)
    stale = []
    for file_name, builder in DASHBOARDS.items():
        path = args.out / file_name
        want = render(builder)
        if args.check:
            have = path.read_text(encoding="utf-8") if path.exists() else ""
            if have != want:
                stale.append(file_name)
                diff = difflib.unified_diff(have.splitlines(), want.splitlines(), str(path), "generated", lineterm="", n=1)
                sys.stderr.write("\n".join(list(diff)[:40]) + "\n")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(want, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        sys.stderr.write(f"stale: {', '.join(stale)}; run python deploy/grafana/generate_dashboards.py\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
