"""The scale benchmark measures what it says: the project's emitters with every op, phase and server label,
every dashboard query, and recorded equivalents that answer the same series as the raw queries."""

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


def test_every_dashboard_panel_target_is_measured_with_all_variables_substituted():
    queries = bench_scale.dashboard_queries()
    want = 0
    for path in sorted(bench_scale.DASHBOARDS.glob("*.json")):
        for panel in bench_scale._panels(json.loads(path.read_text())["panels"]):
            want += sum(1 for t in panel.get("targets", []) if t.get("expr"))
    assert len(queries) == want > 0
    for q in queries:
        assert "$" not in bench_scale.substitute(q["expr"], "60s"), q["expr"]
    assert bench_scale.variable_queries(), "the template variables' label_values queries are measured too"


def test_recorded_equivalents_name_only_rules_that_exist():
    recorded = bench_scale.recorded_names()
    mapped = [(q["expr"], bench_scale.recorded_equivalent(q["expr"], recorded)) for q in bench_scale.dashboard_queries()]
    mapped = [(raw, eq) for raw, eq in mapped if eq]
    assert mapped, "the weight-sync per-server quantile panels have recorded equivalents"
    for _raw, eq in mapped:
        assert re.search(r"\(([\w:]+)\{", eq).group(1) in recorded
    for _name, _raw, rec in bench_scale.FLEET_PAIRS:
        assert re.search(r"\(([\w:]+)\{", rec).group(1) in recorded
    assert bench_scale.recorded_equivalent("sum(rate(x[1m]))", recorded) is None


@pytest.mark.binaries
def test_fleet_rules_pass_promtool_check():
    promtool = require_binary("promtool")
    res = subprocess.run([promtool, "check", "rules", str(bench_scale.FLEET_RULES)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    groups = yaml.safe_load(bench_scale.FLEET_RULES.read_text())["groups"]
    deploy_groups = {g["name"] for p in bench_scale.RULES_DIR.glob("*.yml") for g in yaml.safe_load(p.read_text())["groups"]}
    assert not {g["name"] for g in groups} & deploy_groups, "a separate group, loaded next to the project's"


@pytest.mark.binaries
@pytest.mark.slow
def test_a_small_fleet_is_scraped_and_every_query_answers(monkeypatch):
    require_binary("prometheus")
    args = argparse.Namespace(warmup=50.0, reps=2, query_budget=5.0, query_timeout=60.0, query_phase_cap=300.0)
    r = bench_scale.run_size(3, args)
    assert r["targets_up"] == 4
    assert r["head_series"] >= r["samples_per_scrape_round"] > 3 * 300
    assert r["rss_bytes"] > 0 and r["rule_group_s"]["weightwatch-weight-update-quantiles"] > 0
    for q in r["queries"]:
        assert q["error"] is None and q["reps"] >= 1, q
    for q in r["queries"]:
        if "recorded" in q:
            # the recorded series cover the same (server, op) pairs as the raw quantile
            assert q["recorded"]["series"] == q["series"] == 3 * len(catalogue.OPS), q["expr"]
            assert q["one_server"]["series"] == len(catalogue.OPS)
    for f in r["fleet"]:
        assert f["raw"]["error"] is None and f["recorded"]["error"] is None
        assert f["recorded"]["series"] == f["raw"]["series"] > 0, f["name"]
    text = bench_scale.report([r], argparse.Namespace(reps=2, warmup=35.0))
    assert "| 3 |" in text and "How the CPU was shared" in text
