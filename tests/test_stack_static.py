"""Static checks for the parts of the stack that cannot start here (no Docker engine).

The compose file is valid against the Compose Specification's JSON schema (the copy that check-jsonschema
vendors from the compose-spec repository), every image is pinned to an exact version, and the service names
and ports agree across docker-compose.yml, the collector, Prometheus, Tempo, Alertmanager and Grafana files.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from conftest import require
from test_stack_support import DEPLOY, ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
COLLECTOR_FILE = DEPLOY / "otel-collector" / "config.yaml"
TEMPO_FILE = DEPLOY / "tempo" / "tempo.yaml"
PROMETHEUS_FILE = DEPLOY / "prometheus" / "prometheus.yml"
ALERTMANAGER_FILE = DEPLOY / "alertmanager" / "alertmanager.yml"
DATASOURCES_FILE = DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yaml"
DASHBOARD_PROVIDER_FILE = DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
DOCKERFILE = ROOT / "Dockerfile"

#: Exact versions: vX.Y.Z or X.Y.Z, nothing floating (no latest, no X.Y).
PINNED = re.compile(r"^[a-z0-9][a-z0-9._/-]*:v?\d+\.\d+\.\d+$")


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(COMPOSE_FILE)


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _container_ports(service: dict[str, Any]) -> set[int]:
    """Container-side ports a service publishes ("127.0.0.1:8000:8000" -> 8000)."""
    return {int(str(p).split("#")[0].strip().rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}


def _host_port(address: str) -> tuple[str, int]:
    if "://" in address:
        parts = urlsplit(address)
        assert parts.hostname and parts.port, address
        return parts.hostname, parts.port
    host, _, port = address.rpartition(":")
    return host, int(port)


def _command_flags(service: dict[str, Any]) -> dict[str, str]:
    flags = {}
    for item in service.get("command", []):
        key, _, value = str(item).partition("=")
        flags[key] = value
    return flags


# --------------------------------------------------------------------------- compose specification


def _compose_schema() -> dict[str, Any]:
    require(importlib.util.find_spec("check_jsonschema") is not None, "check-jsonschema (pip install -e '.[dev]')")
    text = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    return json.loads(text)


def _schema_errors(document: Any) -> list[str]:
    import jsonschema

    schema = _compose_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_is_valid_against_the_compose_specification(compose):
    assert _schema_errors(compose) == []


def test_the_schema_check_can_fail(compose):
    broken = json.loads(json.dumps(compose))
    broken["services"]["prometheus"]["volumes"] = {"./deploy/prometheus": "/etc/prometheus"}  # must be a list
    broken["services"]["grafana"]["depend_on"] = ["prometheus"]  # a typo of depends_on
    errors = _schema_errors(broken)
    assert any(e.startswith("services/prometheus/volumes") for e in errors), errors
    assert any("depend_on" in e for e in errors), errors


# --------------------------------------------------------------------------- pinning


def test_every_image_is_pinned_to_an_exact_version(compose):
    for name, service in _services(compose).items():
        image = service.get("image")
        assert image, f"{name} has no image (built services name theirs too)"
        assert PINNED.match(image), f"{name}: {image} is not pinned to an exact version"
        assert "latest" not in image


def test_dockerfile_base_image_is_pinned():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base, "Dockerfile must name its base image in ARG PYTHON_IMAGE"
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base.group(1)), base.group(1)
    for line in re.findall(r"^FROM\s+(\S+)", text, re.M):
        assert line == "${PYTHON_IMAGE}", line
    assert re.search(r"^ARG VLLM_VERSION=\d+\.\d+\.\d+$", text, re.M)


def test_the_stack_has_every_part_and_the_demo_is_built_here(compose):
    services = _services(compose)
    assert {"otel-collector", "tempo", "prometheus", "alertmanager", "grafana", "demo"} <= set(services)
    assert services["demo"]["build"]["dockerfile"] == "Dockerfile"
    assert services["demo"]["build"]["target"] == "cpu"
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS cpu$", DOCKERFILE.read_text(), re.M)


def test_gpu_variant_reserves_gpus_under_a_profile(compose):
    gpu = _services(compose)["inference-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    assert gpu["build"]["target"] == "gpu"
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS gpu$", DOCKERFILE.read_text(), re.M)


# --------------------------------------------------------------------------- compose wiring


def test_depends_on_names_real_services_with_health_checks_where_required(compose):
    services = _services(compose)
    for name, service in services.items():
        for dep, cond in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy but {dep} has no healthcheck"
            if cond["condition"] == "service_completed_successfully":
                assert services[dep].get("restart") == "no"


def test_health_checks_probe_the_service_own_port(compose):
    for name, service in _services(compose).items():
        hc = service.get("healthcheck")
        if not hc:
            continue
        url = next(a for a in hc["test"] if "http://" in a)
        url = re.search(r"http://[^'\" ]+", url).group(0)
        _, port = _host_port(url)
        assert port in _container_ports(service), f"{name}: health check on {port}, publishes {_container_ports(service)}"


def test_named_volumes_are_declared_and_bind_mounts_exist(compose):
    declared = set(compose.get("volumes", {}))
    for name, service in _services(compose).items():
        for vol in service.get("volumes", []):
            source = vol.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists() or source == "./dashboards", f"{name}: {source} missing"
            else:
                assert source in declared, f"{name}: named volume {source} not declared"


def test_published_ports_bind_loopback_only(compose):
    for name, service in _services(compose).items():
        for p in service.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), f"{name}: {p} is published on every interface"


def test_grafana_has_no_default_admin_password(compose):
    grafana = _services(compose)["grafana"]
    value = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert value.startswith("${GF_SECURITY_ADMIN_PASSWORD:?"), "compose must fail loudly when the password is unset"
    assert ".env" in grafana["env_file"]
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^GF_SECURITY_ADMIN_PASSWORD=$", example, re.M), ".env.example must not carry a password"
    gitignore = (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in gitignore


# --------------------------------------------------------------------------- collector


@pytest.fixture(scope="module")
def collector() -> dict[str, Any]:
    return _load(COLLECTOR_FILE)


def test_every_collector_pipeline_component_is_defined(collector):
    service = collector["service"]
    for ext in service.get("extensions", []):
        assert ext in collector.get("extensions", {}), ext
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for name, pipeline in service["pipelines"].items():
        for kind in used:
            for component in pipeline.get(kind, []):
                assert component in (collector.get(kind) or {}), f"pipeline {name}: {kind[:-1]} {component} is not defined"
                used[kind].add(component)
        assert pipeline["processors"][0] == "memory_limiter", f"pipeline {name}: memory_limiter must come first"
    for kind, names in used.items():
        assert set(collector.get(kind) or {}) == names, f"{kind} defined but unused: {set(collector.get(kind) or {}) - names}"


def test_collector_receives_otlp_on_both_protocols_and_exposes_health_and_metrics(collector, compose):
    protocols = collector["receivers"]["otlp"]["protocols"]
    grpc = _host_port(protocols["grpc"]["endpoint"])
    http = _host_port(protocols["http"]["endpoint"])
    assert grpc == ("0.0.0.0", 4317) and http == ("0.0.0.0", 4318)
    health = _host_port(collector["extensions"]["health_check"]["endpoint"])
    assert health == ("0.0.0.0", 13133)
    assert "health_check" in collector["service"]["extensions"]
    reader = collector["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]["prometheus"]
    assert reader["host"] == "0.0.0.0"
    published = _container_ports(_services(compose)["otel-collector"])
    assert {4317, 4318, 13133} <= published
    # the config file compose mounts is the one the command loads
    svc = _services(compose)["otel-collector"]
    target = next(v.split(":")[1] for v in svc["volumes"] if v.startswith("./deploy/otel-collector/config.yaml"))
    assert svc["command"] == [f"--config={target}"]


def test_collector_sends_traces_to_tempo_otlp_port(collector, compose):
    exporter = collector["exporters"]["otlp_grpc/tempo"]
    host, port = _host_port(exporter["endpoint"])
    assert host == "tempo" and host in _services(compose)
    tempo = _load(TEMPO_FILE)
    assert _host_port(tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])[1] == port


def test_demo_exports_spans_to_the_collector_http_receiver(compose, collector):
    for name in ("demo", "inference-gpu"):
        env = _services(compose)[name]["environment"]
        host, port = _host_port(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert host == "otel-collector"
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
        assert port == _host_port(collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"])[1]


# --------------------------------------------------------------------------- prometheus


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    return _load(PROMETHEUS_FILE)


def test_prometheus_jobs_are_the_fixed_names(prometheus):
    assert [sc["job_name"] for sc in prometheus["scrape_configs"]] == ["orchestrator", "trainer", "inference", "otel-collector"]


def test_prometheus_targets_are_compose_services_on_their_ports(prometheus, compose, collector):
    services = _services(compose)
    expected = {
        "orchestrator": ("demo", 9400),
        "trainer": ("demo", 9401),
        "inference": ("demo", 8000),
        "otel-collector": ("otel-collector", collector["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]["prometheus"]["port"]),
    }
    for sc in prometheus["scrape_configs"]:
        targets = [_host_port(t) for g in sc["static_configs"] for t in g["targets"]]
        assert targets == [expected[sc["job_name"]]], sc["job_name"]
        host, port = targets[0]
        assert host in services
        if host == "demo":
            assert port in _container_ports(services["demo"])
            assert "EXPOSE 8000 8001 9400 9401" in DOCKERFILE.read_text()
    am_host, am_port = _host_port(prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0])
    assert am_host == "alertmanager" and am_port in _container_ports(services["alertmanager"])


def test_prometheus_inference_server_label_matches_the_demo_admin_lane(prometheus):
    inference = next(sc for sc in prometheus["scrape_configs"] if sc["job_name"] == "inference")
    # the demo's orchestrator calls the admin lane at 127.0.0.1:8001 in the same container; its `server` label is host:port
    assert inference["static_configs"][0]["labels"]["server"] == "127.0.0.1:8001"


def test_prometheus_command_loads_the_mounted_config_with_exemplars_and_remote_write(compose):
    svc = _services(compose)["prometheus"]
    flags = _command_flags(svc)
    assert "--enable-feature" in flags and "exemplar-storage" in flags["--enable-feature"].split(",")
    assert "--web.enable-remote-write-receiver" in flags
    assert "./deploy/prometheus:/etc/prometheus:ro" in svc["volumes"]
    assert flags["--config.file"] == "/etc/prometheus/prometheus.yml"


def test_tempo_remote_writes_to_prometheus(compose):
    tempo = _load(TEMPO_FILE)
    gen = tempo["metrics_generator"]
    url = gen["storage"]["remote_write"][0]["url"]
    host, port = _host_port(url)
    assert host == "prometheus" and port in _container_ports(_services(compose)["prometheus"])
    assert urlsplit(url).path == "/api/v1/write"
    assert set(tempo["overrides"]["defaults"]["metrics_generator"]["processors"]) >= {"service-graphs", "span-metrics"}
    assert tempo["storage"]["trace"]["backend"] == "local"
    tempo_svc = _services(compose)["tempo"]
    assert tempo["server"]["http_listen_port"] in _container_ports(tempo_svc)
    assert any(v.startswith("tempo-data:/var/tempo") for v in tempo_svc["volumes"])
    assert gen["storage"]["path"].startswith("/var/tempo/") and tempo["storage"]["trace"]["local"]["path"].startswith("/var/tempo/")


def test_alertmanager_paths_are_inside_its_mount(compose):
    svc = _services(compose)["alertmanager"]
    assert "./deploy/alertmanager:/etc/alertmanager:ro" in svc["volumes"]
    am = _load(ALERTMANAGER_FILE)
    for tmpl in am["templates"]:
        assert tmpl.startswith("/etc/alertmanager/")
        assert list((DEPLOY / "alertmanager").glob(tmpl.removeprefix("/etc/alertmanager/"))), tmpl
    for receiver in am["receivers"]:
        for slack in receiver.get("slack_configs", []):
            local = DEPLOY / "alertmanager" / slack["api_url_file"].removeprefix("/etc/alertmanager/")
            assert local.parent.is_dir() and (local.parent / "README.md").is_file()


# --------------------------------------------------------------------------- grafana


def test_grafana_datasources_have_the_fixed_uids_and_point_at_compose_services(compose, prometheus):
    services = _services(compose)
    datasources = {d["uid"]: d for d in _load(DATASOURCES_FILE)["datasources"]}
    assert set(datasources) == {"prometheus", "tempo", "alertmanager"}
    ports = {"prometheus": 9090, "tempo": _load(TEMPO_FILE)["server"]["http_listen_port"], "alertmanager": 9093}
    for uid, ds in datasources.items():
        assert ds["type"] == uid
        host, port = _host_port(ds["url"])
        assert host == uid and host in services
        assert port == ports[uid] and port in _container_ports(services[host])


def test_grafana_datasources_link_exemplars_traces_metrics_and_service_map():
    datasources = {d["uid"]: d for d in _load(DATASOURCES_FILE)["datasources"]}
    exemplar = datasources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert exemplar == [{"name": "trace_id", "datasourceUid": "tempo"}]
    tempo = datasources["tempo"]["jsonData"]
    assert tempo["tracesToMetrics"]["datasourceUid"] == "prometheus"
    assert tempo["serviceMap"]["datasourceUid"] == "prometheus"
    # Grafana expands $VAR in provisioning files; Grafana's own $__tags must be escaped as $$__tags
    for q in tempo["tracesToMetrics"]["queries"]:
        assert not re.search(r"(?<!\$)\$__", q["query"]), q["query"]
    assert datasources["alertmanager"]["jsonData"]["implementation"] == "prometheus"


def test_exemplar_label_is_the_one_weightwatch_writes():
    from weightwatch import telemetry

    src = Path(telemetry.__file__).read_text()
    assert '"trace_id": format(ctx.trace_id' in src


def test_dashboard_provider_reads_the_mounted_dashboards_directory(compose):
    provider = _load(DASHBOARD_PROVIDER_FILE)["providers"][0]
    mounts = dict(v.split(":")[:2] for v in _services(compose)["grafana"]["volumes"])
    assert mounts["./dashboards"] == provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert mounts["./deploy/grafana/provisioning"] == _services(compose)["grafana"]["environment"]["GF_PATHS_PROVISIONING"]
    assert provider["type"] == "file"


# --------------------------------------------------------------------------- the images' commands


def _dockerfile_commands(program: str) -> list[list[str]]:
    """Every `weightwatch <program> ...` invocation in the Dockerfile's CMDs, shell variables given sample values."""
    import shlex

    text = DOCKERFILE.read_text().replace("\\\n", " ")
    samples = {"$DEMO_DURATION": "1800", "$run": "/runs/demo-1", "$WEIGHTWATCH_DEMO_ARGS": "", "$MODEL": "/models/tiny",
               "$WEIGHTWATCH_WEIGHTS_ROOT": "/weights"}  # fmt: skip
    found = []
    for match in re.finditer(rf"weightwatch {program} ([^;|&\]]*)", text):
        raw = match.group(1).rstrip()
        if raw.endswith('"') and not raw.endswith('\\"'):
            raw = raw[:-1]  # the end of the CMD's JSON string
        cmd = raw.replace('\\"', '"')
        for var, value in samples.items():
            cmd = cmd.replace(var, value)
        found.append([program, *shlex.split(cmd)])
    return found


@pytest.mark.parametrize("program", ["demo", "serve", "make-model"])
def test_dockerfile_commands_parse_with_the_real_cli(program):
    from weightwatch.cli import build_parser

    commands = _dockerfile_commands(program)
    assert commands, f"the Dockerfile never runs weightwatch {program}"
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)
        assert args.command == program
        if program == "demo":
            assert args.host_bind == "0.0.0.0", "Prometheus in another container must reach the demo's listeners"
            assert (args.port, args.admin_port, args.orchestrator_metrics_port, args.trainer_metrics_port) == (8000, 8001, 9400, 9401)
        if program == "serve":
            assert args.host == "0.0.0.0" and (args.port, args.admin_port) == (8000, 8001)
