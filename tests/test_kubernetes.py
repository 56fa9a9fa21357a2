"""deploy/kubernetes: generated from the compose stack's sources, rendered by the real `kubectl kustomize`.

The rendered PrometheusRule passes the compose stack's own promtool unit tests, the rendered dashboards and
collector configs equal the compose stack's up to addresses, every object has what its kind requires
(core kinds: kubernetes-validate's offline schemas, strict; the Prometheus Operator CRDs: checked here field by
field, no CRD schemas are available offline), and nothing secret is in the output.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import require, require_binary
from weightwatch.contracts import ENV_ADMIN_TOKEN, ENV_ADMIN_TOKEN_FILE
from weightwatch.inference.config import ENV_ADMIN_HOST, ENV_ADMIN_PORT, ENV_WEIGHTS_ROOT

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
GENERATOR = K8S / "generate.py"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "tests"
CHART_CONTAINERS = {"orchestrator": "prime-rl-orchestrator", "trainer": "prime-rl-trainer", "inference": "prime-rl-inference"}


def _kustomize_dirs() -> list[Path]:
    """Every base and overlay (a Component is rendered through the overlay that uses it)."""
    out = []
    for k in sorted(K8S.rglob("kustomization.yaml")):
        if yaml.safe_load(k.read_text())["kind"] == "Kustomization":
            out.append(k.parent)
    return out


def _render(d: Path) -> list[dict]:
    kubectl = require_binary("kubectl")
    res = subprocess.run([kubectl, "kustomize", str(d)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return [doc for doc in yaml.safe_load_all(res.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {str(d.relative_to(K8S)): _render(d) for d in _kustomize_dirs()}


def _of(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


# --------------------------------------------------------------------------- generated = committed


def test_committed_files_equal_a_fresh_generation():
    res = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr


def test_check_notices_a_hand_edit(tmp_path):
    out = tmp_path / "k8s"
    assert subprocess.run([sys.executable, str(GENERATOR), "--out", str(out)], capture_output=True, timeout=120).returncode == 0
    target = out / "base" / "monitoring" / "prometheusrule-weightwatch-alerts.yaml"
    target.write_text(target.read_text().replace("> 0.3", "> 0.5"))
    res = subprocess.run([sys.executable, str(GENERATOR), "--check", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "prometheusrule-weightwatch-alerts.yaml" in res.stderr and "> 0.3" in res.stdout


# --------------------------------------------------------------------------- kubectl kustomize renders every base and overlay


@pytest.mark.binaries
def test_every_base_and_overlay_renders(rendered):
    assert set(rendered) >= {"base", "base/monitoring", "base/alertmanager", "base/otel-collector", "overlays/prime-rl-example"}
    for name, docs in rendered.items():
        assert docs, name
    kinds = {d["kind"] for d in rendered["base"]}
    assert kinds == {"PrometheusRule", "PodMonitor", "ConfigMap", "Secret", "DaemonSet", "Deployment", "Service"}


# --------------------------------------------------------------------------- the rules: same groups, same promtool tests


@pytest.mark.binaries
def test_rendered_prometheusrules_hold_exactly_the_compose_rule_groups(rendered):
    rules = {d["metadata"]["name"]: d["spec"]["groups"] for d in _of(rendered["base"], "PrometheusRule")}
    sources = {p.stem: yaml.safe_load(p.read_text())["groups"] for p in (ROOT / "deploy" / "prometheus" / "rules").glob("*.yml")}
    assert rules == sources


@pytest.mark.binaries
def test_rendered_rules_pass_the_compose_stacks_promtool_unit_tests(rendered, tmp_path):
    promtool = require_binary("promtool")
    (tmp_path / "rules").mkdir()
    for d in _of(rendered["base"], "PrometheusRule"):
        (tmp_path / "rules" / f"{d['metadata']['name']}.yml").write_text(yaml.safe_dump({"groups": d["spec"]["groups"]}, sort_keys=False))
    shutil.copytree(RULE_TESTS, tmp_path / "tests")
    for test in sorted((tmp_path / "tests").glob("*.yml")):
        cfg = yaml.safe_load(test.read_text())
        # the unit tests point at ../rules/<file>.yml: that is now the rules extracted from the rendered objects
        assert all((test.parent / f).resolve().parent == (tmp_path / "rules").resolve() for f in cfg["rule_files"]), cfg["rule_files"]
        res = subprocess.run([promtool, "test", "rules", test.name], capture_output=True, text=True, cwd=test.parent, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "SUCCESS" in res.stdout


@pytest.mark.binaries
def test_promtool_fails_when_a_rendered_alert_loses_its_threshold(rendered, tmp_path):
    """The extraction above is real: a changed rule inside the rendered object fails the same unit tests."""
    promtool = require_binary("promtool")
    (tmp_path / "rules").mkdir()
    for d in _of(rendered["base"], "PrometheusRule"):
        groups = copy.deepcopy(d["spec"]["groups"])
        for g in groups:
            for r in g["rules"]:
                if r.get("alert") == "WeightUpdateQueueHigh":
                    r["expr"] = r["expr"].replace("> 0.3", "> 0.6")
        (tmp_path / "rules" / f"{d['metadata']['name']}.yml").write_text(yaml.safe_dump({"groups": groups}))
    shutil.copytree(RULE_TESTS, tmp_path / "tests")
    res = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], capture_output=True, text=True, cwd=tmp_path / "tests", timeout=300)
    assert res.returncode != 0 and "WeightUpdateQueueHigh" in (res.stdout + res.stderr)


# --------------------------------------------------------------------------- dashboards and collector equal the compose stack's


@pytest.mark.binaries
def test_rendered_dashboards_equal_the_compose_dashboards_and_are_labelled_for_the_sidecar(rendered):
    cms = [d for d in _of(rendered["base"], "ConfigMap") if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    got = {}
    for cm in cms:
        assert cm["metadata"]["annotations"]["grafana_folder"] == "weightwatch"
        assert cm["metadata"]["namespace"] == "monitoring"
        ((fname, text),) = cm["data"].items()
        got[fname] = json.loads(text)
    want = {p.name: json.loads(p.read_text()) for p in (ROOT / "dashboards").glob("*.json")}
    assert got == want


def _compose_collector() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "otel-collector" / "config.yaml").read_text())


@pytest.mark.binaries
def test_gateway_config_is_the_compose_config_with_tempos_in_cluster_address(rendered):
    docs = rendered["base"]
    cm = next(d for d in _of(docs, "ConfigMap") if d["metadata"]["name"] == "weightwatch-otel-gateway")
    gateway = yaml.safe_load(cm["data"]["config.yaml"])
    want = _compose_collector()
    assert want["exporters"]["otlp_grpc/tempo"]["endpoint"] == "tempo:4317"
    want["exporters"]["otlp_grpc/tempo"]["endpoint"] = gateway["exporters"]["otlp_grpc/tempo"]["endpoint"]
    assert gateway == want
    assert re.fullmatch(r"tempo\.[a-z0-9-]+\.svc\.cluster\.local:4317", gateway["exporters"]["otlp_grpc/tempo"]["endpoint"])


@pytest.mark.binaries
def test_agent_config_is_the_compose_config_forwarding_to_the_gateway_service(rendered):
    docs = rendered["base"]
    cm = next(d for d in _of(docs, "ConfigMap") if d["metadata"]["name"] == "weightwatch-otel-agent")
    agent = yaml.safe_load(cm["data"]["config.yaml"])
    exporter = agent["exporters"].pop("otlp_grpc/gateway")
    svc = next(d for d in _of(docs, "Service") if d["metadata"]["name"] == "weightwatch-otel-gateway")
    assert exporter["endpoint"] == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:4317"
    assert 4317 in {p["port"] for p in svc["spec"]["ports"]}
    want = _compose_collector()
    want_exporter = want["exporters"].pop("otlp_grpc/tempo")
    want_exporter["endpoint"] = exporter["endpoint"]
    assert exporter == want_exporter
    for pipe in want["service"]["pipelines"].values():
        pipe["exporters"] = ["otlp_grpc/gateway" if e == "otlp_grpc/tempo" else e for e in pipe["exporters"]]
    assert agent == want
    # the gateway Service selects the gateway pods, and the agent listens on every node's IP
    gw = next(d for d in _of(docs, "Deployment") if d["metadata"]["name"] == "weightwatch-otel-gateway")
    assert svc["spec"]["selector"].items() <= gw["spec"]["template"]["metadata"]["labels"].items()
    ds = next(iter(_of(docs, "DaemonSet")))
    host_ports = {p["hostPort"] for c in ds["spec"]["template"]["spec"]["containers"] for p in c["ports"] if "hostPort" in p}
    assert host_ports == {4317, 4318}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for w in (gw, ds):
        (c,) = w["spec"]["template"]["spec"]["containers"]
        assert c["image"] == compose["services"]["otel-collector"]["image"]
        assert w["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == w["metadata"]["name"]


# --------------------------------------------------------------------------- every object has what its kind requires


def _check_crd(doc: dict) -> list[str]:
    """The fields the Prometheus Operator's CRDs require (no CRD schemas offline)."""
    errs = []
    spec = doc.get("spec") or {}
    if doc["kind"] == "PrometheusRule":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        for g in spec.get("groups") or [errs.append("spec.groups empty") or {}]:
            if not g.get("name") or not g.get("rules"):
                errs.append(f"group without name/rules: {g}")
            for r in g.get("rules", []):
                if ("record" in r) == ("alert" in r) or not isinstance(r.get("expr"), str):
                    errs.append(f"rule needs exactly one of record/alert and an expr: {r}")
                if "for" in r and not re.fullmatch(r"\d+[smhd]", r["for"]):
                    errs.append(f"bad duration {r['for']}")
    elif doc["kind"] == "PodMonitor":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        if not spec.get("selector"):
            errs.append("spec.selector missing")
        eps = spec.get("podMetricsEndpoints") or []
        if not eps:
            errs.append("spec.podMetricsEndpoints missing")
        for ep in eps:
            if not ep.get("port"):
                errs.append("podMetricsEndpoints[].port missing")
            for rl in ep.get("relabelings", []):
                if not rl.get("sourceLabels") or not rl.get("targetLabel"):
                    errs.append(f"relabeling incomplete: {rl}")
    else:
        errs.append(f"unexpected custom kind {doc['kind']}")
    return errs


@pytest.mark.binaries
def test_every_object_has_the_fields_its_kind_requires(rendered):
    require(importlib.util.find_spec("kubernetes_validate") is not None, "kubernetes-validate (pip install -e '.[dev]')")
    import kubernetes_validate as kv
    version = kv.latest_version()
    checked = 0
    for name, docs in rendered.items():
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), (name, doc)
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                assert _check_crd(doc) == [], (name, doc["metadata"]["name"])
            else:
                kv.validate(doc, version, strict=True)  # raises ValidationError on a missing or unknown field
            checked += 1
    assert checked > 20


def test_the_crd_check_rejects_a_broken_object():
    bad_rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "x"}, "spec": {"groups": [{"name": "g", "rules": [{"alert": "A"}]}]}}
    bad_pm = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "x"}, "spec": {"podMetricsEndpoints": [{"path": "/metrics"}]}}
    assert _check_crd(bad_rule) and len(_check_crd(bad_pm)) == 2


# --------------------------------------------------------------------------- no secret values; the webhook is a reference


SECRET_PATTERNS = (re.compile(r"hooks\.slack\.com/services/[A-Za-z0-9]"), re.compile(r"xox[abposr]-"), re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY"))


@pytest.mark.binaries
def test_no_secret_values_in_the_rendered_output(rendered):
    for name, docs in rendered.items():
        for doc in docs:
            text = yaml.safe_dump(doc)
            if doc["kind"] == "Secret":
                text += "\n".join(base64.b64decode(v).decode() for v in (doc.get("data") or {}).values())
            for pat in SECRET_PATTERNS:
                assert not pat.search(text), (name, doc["metadata"]["name"], pat.pattern)
            for c in _containers(doc):
                for e in c.get("env", []):
                    assert e["name"] != ENV_ADMIN_TOKEN, "the admin token goes through a file from a Secret, never an env value"
    secrets = [d for docs in rendered.values() for d in _of(docs, "Secret")]
    assert {s["metadata"]["name"] for s in secrets} == {"weightwatch-alertmanager"}, "the only Secret is the config, which holds no value"


@pytest.mark.binaries
def test_alertmanager_config_reads_the_webhook_from_a_secret_file_and_passes_amtool(rendered, tmp_path):
    (secret,) = _of(rendered["base"], "Secret")
    files = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    cfg = yaml.safe_load(files["alertmanager.yaml"])
    compose = yaml.safe_load((ROOT / "deploy" / "alertmanager" / "alertmanager.yml").read_text())
    paths = {sc["api_url_file"] for r in cfg["receivers"] for sc in r.get("slack_configs", [])}
    assert paths == {"/etc/alertmanager/secrets/weightwatch-slack-webhook/slack_webhook_url"}
    assert not any("api_url" in sc for r in cfg["receivers"] for sc in r.get("slack_configs", []))
    # the same routes, receivers and inhibitions as the compose stack: only file paths differ
    for key in ("route", "inhibit_rules", "global"):
        assert cfg[key] == compose[key]
    for r in compose["receivers"]:
        for sc in r.get("slack_configs", []):
            sc["api_url_file"] = next(iter(paths))
    assert cfg["receivers"] == compose["receivers"]
    assert files["slack.tmpl"] == (ROOT / "deploy" / "alertmanager" / "templates" / "slack.tmpl").read_text()
    amtool = require_binary("amtool")
    (tmp_path / "alertmanager.yaml").write_text(files["alertmanager.yaml"].replace("/etc/alertmanager/config/", f"{tmp_path}/"))
    (tmp_path / "slack.tmpl").write_text(files["slack.tmpl"])
    res = subprocess.run([amtool, "check-config", str(tmp_path / "alertmanager.yaml")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 templates" in res.stdout  # the glob matched the template file, which parsed


# --------------------------------------------------------------------------- the prime-rl overlay


def _containers(doc: dict) -> list[dict]:
    return ((doc.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers", []) if isinstance(doc.get("spec"), dict) else []


def _workloads(rendered) -> dict[str, dict]:
    return {d["metadata"]["labels"]["role"]: d for d in _of(rendered["overlays/prime-rl-example"], "StatefulSet")}


@pytest.mark.binaries
def test_overlay_turns_weightwatch_on_in_the_charts_pods_with_the_packages_own_variable_names(rendered):
    wl = _workloads(rendered)
    assert set(wl) == {"orchestrator", "trainer", "inference"}
    for role, sts in wl.items():
        (c,) = [c for c in _containers(sts) if c["name"] == CHART_CONTAINERS[role]]
        env = {e["name"]: e for e in c["env"]}
        # the chart's own environment survives the patch
        assert {"POD_NAME", "POD_IP", "ROLE", "POD_NAMESPACE"} <= set(env)
        assert env["OTEL_SERVICE_NAME"]["value"] == f"prime-rl-{role}"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://$(WEIGHTWATCH_HOST_IP):4318"
        assert env["WEIGHTWATCH_HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
        # Kubernetes expands $(VAR) only for variables defined earlier in the list
        names = [e["name"] for e in c["env"]]
        for i, e in enumerate(c["env"]):
            for ref in re.findall(r"\$\((\w+)\)", e.get("value", "")):
                assert ref in names[:i], f"{role}: {e['name']} uses $({ref}) before it is defined"
        if role == "inference":
            assert env["VLLM_PLUGINS"]["value"] == "weightwatch"
            assert env[ENV_ADMIN_HOST]["value"] == "0.0.0.0"
            assert int(env[ENV_ADMIN_PORT]["value"]) in {p["containerPort"] for p in c["ports"] if p["name"] == "ww-admin"}
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert env[ENV_WEIGHTS_ROOT]["value"] in mounts, "the weights root is the chart's shared volume"
        if role in ("inference", "orchestrator"):
            token_file = Path(env[ENV_ADMIN_TOKEN_FILE]["value"])
            mount = next(m for m in c["volumeMounts"] if m["name"] == "weightwatch-admin-token")
            assert token_file.parent == Path(mount["mountPath"]) and mount["readOnly"] is True
            vol = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "weightwatch-admin-token")
            assert vol["secret"]["secretName"] == "weightwatch-admin-token"
            assert [i["path"] for i in vol["secret"]["items"]] == [token_file.name]
        else:
            assert ENV_ADMIN_TOKEN_FILE not in env


@pytest.mark.binaries
def test_podmonitors_select_the_overlays_pods_on_ports_they_declare(rendered):
    wl = _workloads(rendered)
    pms = {d["metadata"]["name"]: d for d in _of(rendered["base"], "PodMonitor")}
    compose = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    compose_ports = {j["job_name"]: int(j["static_configs"][0]["targets"][0].rsplit(":", 1)[1]) for j in compose["scrape_configs"] if j.get("static_configs")}
    for role, sts in wl.items():
        pm = pms[f"weightwatch-{role}"]["spec"]
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert pm["selector"]["matchLabels"].items() <= labels.items()
        assert labels[pm["jobLabel"]] == role, "job label = the compose stack's job name (rules and inhibitions use it)"
        ports = {p["name"]: p["containerPort"] for c in _containers(sts) for p in c["ports"]}
        (ep,) = pm["podMetricsEndpoints"]
        assert ep["port"] in ports and ep["path"] == "/metrics"
        assert ports[ep["port"]] == compose_ports[role], f"{role} serves /metrics on the compose stack's port"
    server = next(r for r in pms["weightwatch-inference"]["spec"]["podMetricsEndpoints"][0]["relabelings"] if r["targetLabel"] == "server")
    inf_env = {e["name"]: e.get("value") for e in _containers(wl["inference"])[0]["env"]}
    assert server["replacement"].endswith(f":{inf_env[ENV_ADMIN_PORT]}"), "server label = host:port of the admin URL the orchestrator calls"

