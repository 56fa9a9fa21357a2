"""The Prometheus side of the stack, checked with Debian's real promtool.

promtool check config / check rules / test rules (deploy/prometheus/tests/*_test.yml hold the unit tests:
every alert fires when it should, stays silent when it should not, honours its `for:`), and the rules agree with
the catalogue: thresholds, metric names, bucket boundaries.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import require_binary
from test_stack_support import DEPLOY, ROOT
from weightwatch import catalogue
from weightwatch.stack_cli import render_prometheus_config

pytestmark = pytest.mark.binaries

RULES_DIR = DEPLOY / "prometheus" / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
UNIT_TEST_DIR = DEPLOY / "prometheus" / "tests"
UNIT_TEST_FILES = sorted(UNIT_TEST_DIR.glob("*_test.yml"))
EXPECTED_ALERTS = {
    "WeightUpdateQueueHigh",
    "WeightUpdateRpcSlow",
    "CheckpointWaitSlow",
    "WeightUpdateFailing",
    "WeightUpdateStalled",
    "StalenessAboveAsyncLevel",
    "TruncationHigh",
    "TargetDown",
    # the weight sync of today (weightwatch-sync-alerts.yml)
    "WeightSyncPauseSlow",
    "WeightSyncResumeSlow",
    "WeightSyncStraggler",
    "AdminCallHung",
    "WeightVersionSkew",
    "EngineLeftPaused",
}


def _rules() -> list[dict]:
    out = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            out.extend(group["rules"])
    return out


def _alerts() -> dict[str, dict]:
    return {r["alert"]: r for r in _rules() if "alert" in r}


def _recorded() -> dict[str, str]:
    return {r["record"]: r["expr"] for r in _rules() if "record" in r}


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    promtool = require_binary("promtool")
    return subprocess.run([promtool, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_promtool_check_config_accepts_prometheus_yml():
    res = _promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in res.stdout


def test_promtool_check_config_accepts_the_rendered_local_config(tmp_path):
    cfg = render_prometheus_config(DEPLOY, tmp_path, alertmanager="127.0.0.1:9093")
    res = _promtool("check", "config", str(cfg))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_rules():
    res = _promtool("check", "rules", *map(str, RULE_FILES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("SUCCESS") == len(RULE_FILES)


def test_promtool_check_rules_rejects_a_broken_rule(tmp_path):
    """The check above can fail: a rule with bad PromQL is refused."""
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n- name: g\n  rules:\n  - alert: Broken\n    expr: rate(x[5m]) >\n")
    res = _promtool("check", "rules", str(bad))
    assert res.returncode != 0


def test_promtool_unit_tests_pass():
    assert len(UNIT_TEST_FILES) >= 2
    res = _promtool("test", "rules", *(f.name for f in UNIT_TEST_FILES), cwd=UNIT_TEST_DIR)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("SUCCESS") == len(UNIT_TEST_FILES)


def _unit_tests() -> list[dict]:
    return [t for f in UNIT_TEST_FILES for t in yaml.safe_load(f.read_text())["tests"]]


def _copy_for_mutation(tmp_path: Path, edit) -> None:
    """rules/ and tests/ side by side in tmp_path, each rule file passed through edit(text) -> text."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    for path in RULE_FILES:
        (tmp_path / "rules" / path.name).write_text(edit(path.read_text()))
    for f in UNIT_TEST_FILES:
        (tmp_path / "tests" / f.name).write_text(f.read_text())


def _run_mutated(tmp_path: Path) -> tuple[int, set[str]]:
    res = _promtool("test", "rules", *(f.name for f in UNIT_TEST_FILES), cwd=tmp_path / "tests")
    return res.returncode, set(re.findall(r"alertname: (\w+), time:", res.stdout + res.stderr))


def test_every_alert_exists_and_has_a_unit_test_that_fires_and_one_that_stays_silent():
    alerts = _alerts()
    assert set(alerts) == EXPECTED_ALERTS
    tests = _unit_tests()
    fired: set[str] = set()
    silent: set[str] = set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    assert fired == EXPECTED_ALERTS
    assert silent == EXPECTED_ALERTS


def test_unit_tests_notice_when_for_is_dropped(tmp_path):
    """The unit tests really check `for:`: with every `for:` set to 0s, each alert's tests must fail."""

    def drop_for(text: str) -> str:
        doc = yaml.safe_load(text)
        for group in doc["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert "for" in rule, f"{rule['alert']} has no for:"
                    rule["for"] = "0s"
        return yaml.safe_dump(doc)

    _copy_for_mutation(tmp_path, drop_for)
    code, failing = _run_mutated(tmp_path)
    assert code != 0
    assert failing == EXPECTED_ALERTS


def test_unit_tests_notice_a_wrong_threshold(tmp_path):
    """Mutation check: moving the queue threshold from 0.3 s to 0.5 s makes the WeightUpdateQueueHigh tests fail."""
    _copy_for_mutation(
        tmp_path,
        lambda t: t.replace("op_server:rl_weight_update_queue_seconds:p95_5m > 0.3", "op_server:rl_weight_update_queue_seconds:p95_5m > 0.5"),
    )
    code, failing = _run_mutated(tmp_path)
    assert code != 0
    assert failing == {"WeightUpdateQueueHigh"}


def test_every_alert_has_severity_summary_description_runbook_and_dashboard():
    stack_doc = (ROOT / "docs" / "stack.md").read_text(encoding="utf-8")
    for name, rule in _alerts().items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"], name
        assert "Likely cause" in ann["description"], f"{name}: the description must name the likely cause"
        assert ann["runbook_url"] == f"docs/stack.md#{name.lower()}", name
        assert f"### {name}" in stack_doc, f"docs/stack.md has no runbook entry for {name}"
        assert ann["dashboard"].startswith("/d/ww-"), name
        assert "value" in ann, name


def _threshold(expr: str) -> float:
    m = re.search(r">\s*([0-9.]+)\s*$", expr.strip())
    assert m, expr
    return float(m.group(1))


def test_queue_threshold_matches_the_catalogue_and_is_a_bucket_boundary():
    rule = _alerts()["WeightUpdateQueueHigh"]
    assert _threshold(rule["expr"]) == catalogue.QUEUE_THRESHOLD_SECONDS
    # histogram_quantile compares exactly at a bucket boundary: "p95 > 0.3" means more than 5 % of updates above 0.3 s
    assert catalogue.QUEUE_THRESHOLD_SECONDS in catalogue.LATENCY_BUCKETS
    assert "300 ms" in rule["annotations"]["description"]


def test_rpc_threshold_matches_the_catalogue_and_is_a_bucket_boundary():
    rule = _alerts()["WeightUpdateRpcSlow"]
    assert _threshold(rule["expr"]) == catalogue.RPC_SLOW_SECONDS
    assert catalogue.RPC_SLOW_SECONDS in catalogue.LATENCY_BUCKETS


def test_checkpoint_wait_threshold_matches_the_analysis_constant():
    rule = _alerts()["CheckpointWaitSlow"]
    expected = getattr(catalogue, "CHECKPOINT_WAIT_SLOW_SECONDS", 1.0)
    assert _threshold(rule["expr"]) == expected
    assert expected in catalogue.LATENCY_BUCKETS


def test_rules_use_only_catalogue_metrics():
    names = set(catalogue.METRICS_BY_NAME)
    histogram_series = {f"{m.name}_{s}" for m in catalogue.METRICS if m.type == "histogram" for s in ("bucket", "sum", "count")}
    known = names | histogram_series | set(_recorded()) | {"up", "ALERTS"}
    functions = {
        "histogram_quantile", "sum", "by", "rate", "increase", "or", "unless", "offset", "and", "on", "max", "time", "changes",
        "avg_over_time", "le", "job", "instance", "op", "server",
        "quantile", "count", "min", "label_replace", "group_left", "group_right", "bool", "min_over_time", "max_over_time", "phase",
    }
    for rule in _rules():
        expr = re.sub(r'"[^"]*"|\[[^\]]*\]|\{[^}]*\}|\b\d+(\.\d+)?[smhdwy]?\b', " ", rule["expr"])
        for token in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
            if token in functions:
                continue
            assert token in known, f"{rule.get('alert') or rule.get('record')}: {token} is not a catalogue metric"


def test_recording_rules_cover_p50_p95_p99_of_queue_rpc_wall_and_pool_wait_fleet_wide():
    recorded = _recorded()
    for metric in ("queue", "rpc", "wall", "pool_wait"):
        rate = f"op_le:rl_weight_update_{metric}_seconds_bucket:rate5m"
        assert "sum by (job, instance, op, le) (rate(" in recorded[rate]
        for q in ("p50", "p95", "p99"):
            name = f"op:rl_weight_update_{metric}_seconds:{q}_5m"
            assert recorded[name] == f"histogram_quantile(0.{q[1:]}, {rate})", name
    # per server: the p95 the alerts read
    for metric in ("queue", "rpc"):
        name = f"op_server:rl_weight_update_{metric}_seconds:p95_5m"
        assert "by (job, instance, op, server, le)" in recorded[name]
        assert any(name in r["expr"] for r in _alerts().values()), f"{name}: no alert reads it"


def _groups() -> list[dict]:
    return [g for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]]


def test_each_histograms_buckets_are_read_at_most_twice_per_evaluation():
    """At 1,024 servers one read of a histogram's buckets costs seconds (docs/scale.md): per server once, fleet once."""
    reads: dict[str, int] = {}
    for rule in _rules():
        for name in re.findall(r"rate\((\w+_bucket)\[", rule["expr"]):
            reads[name] = reads.get(name, 0) + 1
    assert reads, "no bucket rates in the rules"
    assert {n: k for n, k in reads.items() if k > 2} == {}


def test_groups_that_read_every_servers_buckets_run_every_minute_and_no_alert_waits_on_a_slow_group_it_cannot_see():
    for group in _groups():
        per_server_buckets = any("_bucket[" in r.get("expr", "") and "server" in r.get("expr", "") for r in group["rules"])
        if group["name"] in ("weightwatch-weight-update-quantiles", "weightwatch-sync-quantiles"):
            assert group.get("interval") == "1m", group["name"]
        elif per_server_buckets:
            pytest.fail(f"{group['name']} reads every server's buckets at the global interval")
        if any("alert" in r for r in group["rules"]):
            assert "interval" not in group, f"{group['name']}: alerts run at the global interval"


def test_a_compressed_evaluation_interval_scales_the_groups_own_intervals(tmp_path):
    cfg = yaml.safe_load(render_prometheus_config(DEPLOY, tmp_path, alertmanager="a:1", evaluation_interval="1s").read_text())
    copies = [Path(f) for f in cfg["rule_files"]]
    assert copies and all(f.parent == tmp_path / "rules" for f in copies)
    assert sorted(f.name for f in copies) == sorted(f.name for f in RULE_FILES)
    intervals = {g["name"]: g.get("interval") for f in copies for g in yaml.safe_load(f.read_text())["groups"]}
    assert intervals["weightwatch-weight-update-quantiles"] == "4000ms"  # 1m under 15s -> 4 s under 1 s
    assert intervals["weightwatch-sync-quantiles"] == "4000ms"
    assert intervals["weightwatch-weight-update"] is None
    # the copies hold the same rules
    assert [r for f in copies for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]] == _rules()
    res = _promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_alert_dashboard_links_point_at_provisioned_dashboards_and_their_variables():
    import json
    from urllib.parse import parse_qs, urlsplit

    fixed = {"ww-weight-sync": "weight-sync.json", "ww-checkpoints": "checkpoints.json", "ww-generation": "generation.json", "ww-rl-hygiene": "rl-hygiene.json", "ww-sync-phases": "sync-phases.json"}
    for name, rule in _alerts().items():
        link = urlsplit(rule["annotations"]["dashboard"])
        uid = link.path.removeprefix("/d/").split("/")[0]
        assert uid in fixed, f"{name}: {uid} is not one of the fixed dashboard uids"
        path = ROOT / "dashboards" / fixed[uid]
        if not path.exists():
            continue
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] == uid
        variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
        for key in parse_qs(link.query):
            assert key.removeprefix("var-") in variables, f"{name}: {uid} has no variable {key}"


# --------------------------------------------------------------------------- the weight-sync alerts


def _numbers_after(expr: str, metric: str, op: str) -> list[float]:
    """The constants an expression compares `metric...` with using `op` (">" or ">=")."""
    flat = " ".join(expr.split())
    return [float(x) for x in re.findall(rf"{re.escape(metric)}(?:\{{[^}}]*\}})?\s*{re.escape(op)}\s*([0-9.]+)", flat)]


def test_sync_alert_thresholds_are_the_catalogue_numbers():
    alerts = _alerts()
    pause, resume = alerts["WeightSyncPauseSlow"]["expr"], alerts["WeightSyncResumeSlow"]["expr"]
    assert _numbers_after(pause, "phase_server:rl_weight_sync_phase_seconds:mean_5m", ">") == [catalogue.PAUSE_SLOW_SECONDS]
    assert 'phase="pause"' in pause
    assert _numbers_after(resume, "phase_server:rl_weight_sync_phase_seconds:mean_5m", ">") == [catalogue.RESUME_SLOW_SECONDS]
    assert 'phase="resume"' in resume
    straggler = alerts["WeightSyncStraggler"]["expr"]
    assert _numbers_after(straggler, "phase_server:rl_weight_sync_phase_seconds:over_median_5m", ">") == [catalogue.STRAGGLER_MIN_GAP_SECONDS]
    assert _numbers_after(straggler, "phase_server:rl_weight_sync_phase_seconds:ratio_to_median_5m", ">=") == [catalogue.STRAGGLER_RATIO]
    assert _threshold(alerts["AdminCallHung"]["expr"]) == catalogue.HUNG_BUDGET_FRACTION
    # the words people read say the same numbers
    assert f"above {catalogue.PAUSE_SLOW_SECONDS:g} s" in alerts["WeightSyncPauseSlow"]["annotations"]["description"]
    assert f"above {catalogue.RESUME_SLOW_SECONDS:g} s" in alerts["WeightSyncResumeSlow"]["annotations"]["description"]
    assert (
        f"at least {catalogue.STRAGGLER_RATIO:g}x the median and {catalogue.STRAGGLER_MIN_GAP_SECONDS:g} s over it"
        in alerts["WeightSyncStraggler"]["annotations"]["description"]
    )
    assert catalogue.HUNG_BUDGET_FRACTION == 0.5 and "past half" in alerts["AdminCallHung"]["annotations"]["description"]


def test_hung_alert_names_the_phase_of_every_op_as_the_catalogue_does():
    expr = " ".join(_alerts()["AdminCallHung"]["expr"].split())
    mapping = re.findall(r'"phase", "(\w+)", "op", "([^"]+)"', expr)
    assert {phase for phase, _ in mapping} == set(catalogue.PHASES)
    for op in catalogue.OPS:
        phases = [phase for phase, regex in mapping if re.fullmatch(regex, op)]
        assert phases == ([catalogue.PHASE_OF_OP[op]] if op in catalogue.PHASE_OF_OP else []), op


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


def test_hung_alert_reaches_slack_well_before_the_budget_runs_out():
    """Worst case from the stack's own intervals: half the budget, one scrape, one evaluation, `for:`, group_wait."""
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["global"]
    am = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    critical = next(r for r in am["route"]["routes"] if r["matchers"] == ['severity="critical"'])
    rule = _alerts()["AdminCallHung"]
    assert rule["labels"]["severity"] == "critical"
    scrape, evaluation = _seconds(prom["scrape_interval"]), _seconds(prom["evaluation_interval"])
    for budget in (300.0, 720.0):  # prime-rl's pause/resume and update budgets
        worst = catalogue.HUNG_BUDGET_FRACTION * budget + scrape + evaluation + _seconds(rule["for"]) + _seconds(critical["group_wait"])
        assert worst <= 0.75 * budget, (budget, worst)
    # and the unit test with the series of a hung 300 s pause expects it firing at 3m, two minutes early
    hung = next(c for t in _unit_tests() for c in t.get("alert_rule_test", []) if c["alertname"] == "AdminCallHung" and c.get("exp_alerts"))
    assert _seconds(hung["eval_time"]) <= 180


@pytest.mark.parametrize(
    ("old", "new", "breaks"),
    [
        ('mean_5m{phase="pause"} > 1', 'mean_5m{phase="pause"} > 1.6', {"WeightSyncPauseSlow"}),
        ('mean_5m{phase="resume"} > 1', 'mean_5m{phase="resume"} > 1.3', {"WeightSyncResumeSlow"}),
        ("ratio_to_median_5m >= 2", "ratio_to_median_5m >= 9", {"WeightSyncStraggler"}),
        ("over_median_5m > 0.5", "over_median_5m > 0.4", {"WeightSyncStraggler"}),
        ("\n          > 0.5\n", "\n          > 0.7\n", {"AdminCallHung"}),
        ("min_over_time(rl_engine_paused[1m]) == 1", "rl_engine_paused == 1", {"EngineLeftPaused"}),
        ("count by (job, instance, phase) (phase_server:rl_weight_sync_phase_seconds:mean_5m) > 2", "count by (job, instance, phase) (phase_server:rl_weight_sync_phase_seconds:mean_5m) > 0", {"WeightSyncStraggler"}),
    ],
)
def test_sync_unit_tests_notice_a_wrong_threshold_or_window(tmp_path, old, new, breaks):
    """Mutation check: each threshold, the engine-paused window and the two-server median are pinned by a unit test."""
    texts = "".join(p.read_text() for p in RULE_FILES)
    assert texts.count(old) == 1, old
    _copy_for_mutation(tmp_path, lambda t: t.replace(old, new))
    code, failing = _run_mutated(tmp_path)
    assert code != 0
    assert failing == breaks
