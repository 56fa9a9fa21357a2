"""The scale benchmark measures what it says: the project's emitters with every op, phase and server label,
every dashboard query as the dashboard opens, and fleet views that answer the same series raw and recorded."""

from __future__ import annotations

import argparse
import json
import re
import subprocess

import pytest
import yaml
from benchmarks import bench_scale
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import require_binary
from weightwatch import catalogue


def _families(registry) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        out[fam.name] = list(fam.samples)
    return out


def test_fleet_exports_every_op_phase_and_server_through_the_catalogue():
    fleet = bench_scale.Fleet(5)
    fleet.sync_round()
    orch = _families(fleet.orchestrator.registry)
    names = {catalogue.METRICS_BY_NAME[m].name for m in catalogue.METRICS_BY_NAME}
    assert {n for n in orch if not n.endswith("_created")} <= {n.removesuffix("_total") for n in names}
    wall = [s for s in orch["rl_weight_update_wall_seconds"] if s.name.endswith("_count")]
    assert {s.labels["server"] for s in wall} == set(fleet.servers) and len(fleet.servers) == 5
    assert {s.labels["op"] for s in wall} == set(catalogue.OPS)
    phases = [s for s in orch["rl_weight_sync_phase_seconds"] if s.name.endswith("_count")]
    assert {(s.labels["phase"], s.labels["server"]) for s in phases} == {(p, srv) for p in catalogue.PHASES for srv in fleet.servers}
    buckets = {s.labels["le"] for s in orch["rl_weight_update_queue_seconds"] if s.name.endswith("_bucket")}
    assert len(buckets) == len(catalogue.LATENCY_BUCKETS) + 1
    for inf in fleet.inference:
        fams = _families(inf.registry)
        assert {s.labels["op"] for s in fams["rl_admin_server_seconds"] if s.name.endswith("_count")} == set(catalogue.OPS)
        assert "rl_engine_paused_seconds" in fams and "rl_engine_pause_inflight_requests" in fams
    # a second round moves the counters (rates are real, not flat)
    before = {s.labels["server"]: s.value for s in wall if s.labels["op"] == "pause"}
    fleet.sync_round()
    after = {s.labels["server"]: s.value for s in _families(fleet.orchestrator.registry)["rl_weight_update_wall_seconds"] if s.name.endswith("_count") and s.labels["op"] == "pause"}
    assert all(after[k] == before[k] + 1 for k in before)


def test_every_dashboard_panel_target_is_measured_as_the_dashboard_opens():
    queries = bench_scale.dashboard_queries()
    want = 0
    for path in sorted(bench_scale.DASHBOARDS.glob("*.json")):
        for panel in bench_scale._panels(json.loads(path.read_text())["panels"]):
            want += sum(1 for t in panel.get("targets", []) if t.get("expr"))
    assert len(queries) == want > 0
    for q in queries:
        assert "$" not in bench_scale.substitute(q["expr"], "60s"), q["expr"]
    assert bench_scale.variable_queries(), "the template variables' label_values queries are measured too"
    # the dashboards whose server variable has no All open at one server; the others at All
    opened = {q["dashboard"]: q["first_value_vars"] for q in queries if "$server" in q["expr"]}
    assert opened["weight-sync"] == opened["sync-phases"] == ["server"]
    assert opened["generation"] == []
    one = bench_scale.substitute('x{server=~"$server", instance=~"$instance"}[$__rate_interval]', "60s", {"server": "a:1"})
    assert one == 'x{server=~"a:1", instance=~".*"}[60s]'


def test_fleet_views_read_shipped_recording_rules_and_intervals_come_from_the_rule_files():
    recorded = bench_scale.recorded_names()
    for _name, raw, rec in bench_scale.FLEET_PAIRS:
        assert re.search(r"\(([\w:]+)\{", rec).group(1) in recorded
        assert "_bucket" in raw and "_bucket" not in rec
    intervals = bench_scale.group_intervals()
    assert intervals["weightwatch-weight-update-quantiles"] == 60.0
    assert intervals["weightwatch-weight-update"] == bench_scale.SCRAPE_INTERVAL_S


@pytest.mark.binaries
@pytest.mark.slow
def test_a_small_fleet_is_scraped_and_every_query_answers(monkeypatch):
    require_binary("prometheus")
    args = argparse.Namespace(warmup=70.0, reps=2, query_budget=5.0, query_timeout=60.0, query_phase_cap=300.0)
    r = bench_scale.run_size(3, args)
    assert r["targets_up"] == 4
    assert r["head_series"] >= r["samples_per_scrape_round"] > 3 * 300
    assert r["rss_bytes"] > 0 and r["rule_group_s"]["weightwatch-weight-update-quantiles"] > 0
    for q in r["queries"]:
        assert q["error"] is None and q["reps"] >= 1, q
    picked = [q for q in r["queries"] if "every_server" in q]
    assert picked
    for q in picked:
        # opened at the first server; every server picked reads all three (per-server quantiles: one series per op)
        assert q["opened_with"].get("server", "inference-0:8001") == "inference-0:8001"
        if q["expr"].startswith("histogram_quantile") and "by (le, server, op)" in q["expr"]:
            assert q["series"] == len(catalogue.OPS) and q["every_server"]["series"] == 3 * len(catalogue.OPS), q["expr"]
    assert r["rule_load"] and all(v >= 0 for v in r["rule_load"].values())
    for f in r["fleet"]:
        assert f["raw"]["error"] is None and f["recorded"]["error"] is None
        if f["recorded_expr"].startswith("topk(10"):
            # over a range each step's ten can differ (the raw query's 1m window moves faster than the rule's 5m)
            assert min(f["recorded"]["series"], f["raw"]["series"]) >= 10, f["name"]
        else:
            assert f["recorded"]["series"] == f["raw"]["series"] > 0, f["name"]
    text = bench_scale.report([r], argparse.Namespace(reps=2, warmup=35.0))
    assert "| 3 |" in text and "How the CPU was shared" in text
