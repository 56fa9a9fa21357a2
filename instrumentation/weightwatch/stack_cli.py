"""Run Prometheus and Alertmanager locally (no Docker) with the stack's own config files.

``weightwatch stack`` renders deploy/prometheus/prometheus.yml and deploy/alertmanager/alertmanager.yml for
127.0.0.1 (the compose service names become a host you choose, paths become absolute), starts the
``prometheus`` and ``prometheus-alertmanager`` (or ``alertmanager``) binaries found on PATH, prints the URLs
and stops both on Ctrl-C. The same rendering is what the end-to-end tests use, so the files the compose
stack loads are the files the tests exercise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Host names of docker-compose.yml services that the configs refer to; rewritten for a local run.
COMPOSE_HOSTS = ("demo", "otel-collector", "alertmanager", "tempo", "prometheus", "grafana", "inference", "inference-gpu")
#: Where docker-compose.yml mounts deploy/alertmanager inside the Alertmanager container.
ALERTMANAGER_MOUNT = "/etc/alertmanager"
PROMETHEUS_BINARIES = ("prometheus",)
ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")
SLACK_WEBHOOK_FILE = Path("alertmanager") / "secrets" / "slack_webhook_url"


class StackError(RuntimeError):
    """A problem the user can fix (missing binary, missing deploy directory, a port in use)."""


def _yaml() -> Any:
    try:
        import yaml
    except ModuleNotFoundError as exc:  # pragma: no cover - pyyaml is a dependency
        raise StackError("weightwatch stack needs PyYAML: pip install pyyaml") from exc
    return yaml


def find_deploy_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The repository's deploy/ directory: explicit, else found above the working directory or this package."""
    if explicit:
        path = Path(explicit).resolve()
        if not (path / "prometheus" / "prometheus.yml").is_file():
            raise StackError(f"{path} has no prometheus/prometheus.yml; pass the repository's deploy/ directory")
        return path
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for parent in (start, *start.parents):
            candidate = parent / "deploy"
            if (candidate / "prometheus" / "prometheus.yml").is_file():
                return candidate
    raise StackError("cannot find deploy/prometheus/prometheus.yml; run from the weightwatch checkout or pass --deploy-dir")


def _rewrite_host(target: str, host: str) -> str:
    name, sep, port = target.rpartition(":")
    if sep and name in COMPOSE_HOSTS:
        return f"{host}:{port}"
    return target


def render_prometheus_config(
    deploy_dir: Path,
    out_dir: Path,
    *,
    alertmanager: str,
    target_host: str = "127.0.0.1",
    jobs: Mapping[str, Sequence[str]] | None = None,
    skip_jobs: Sequence[str] = (),
    scrape_interval: str | None = None,
    evaluation_interval: str | None = None,
) -> Path:
    """Write a copy of prometheus.yml for a local run and return its path.

    Compose service hosts become ``target_host``; rule files and file_sd files become absolute paths into
    ``deploy_dir``; alerts go to ``alertmanager`` (host:port). With ``jobs`` ({job: [host:port, ...]}) only
    those jobs are kept, scraping exactly those targets (no file_sd), which is what a hermetic test wants;
    ``skip_jobs`` drops jobs (a local run without a collector should not page about it). An
    ``evaluation_interval`` other than the shipped one scales the rule groups' own intervals with it (copies of
    the rule files go to ``out_dir/rules``).
    """
    yaml = _yaml()
    prom_dir = deploy_dir / "prometheus"
    config = yaml.safe_load((prom_dir / "prometheus.yml").read_text(encoding="utf-8"))
    config["rule_files"] = [str((prom_dir / p).resolve()) if not os.path.isabs(p) else p for p in config.get("rule_files", [])]
    glob = config.setdefault("global", {})
    if scrape_interval:
        glob["scrape_interval"] = scrape_interval
        glob["scrape_timeout"] = scrape_interval
    if evaluation_interval:
        shipped = glob.get("evaluation_interval", "1m")
        glob["evaluation_interval"] = evaluation_interval
        config["rule_files"] = scaled_rule_files(config["rule_files"], out_dir / "rules", _seconds(evaluation_interval) / _seconds(shipped))
    config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    known = {sc["job_name"] for sc in config.get("scrape_configs", [])}
    if jobs is not None:
        unknown = sorted(set(jobs) - known)
        if unknown:
            raise StackError(f"unknown scrape job(s) {unknown}; prometheus.yml has {sorted(known)}")
    scrape_configs = []
    for sc in config.get("scrape_configs", []):
        if sc["job_name"] in skip_jobs:
            continue
        if jobs is not None:
            if sc["job_name"] not in jobs:
                continue
            labels: dict[str, str] = {}
            for group in sc.get("static_configs", []):
                labels.update(group.get("labels", {}))
            sc["static_configs"] = [{"targets": list(jobs[sc["job_name"]]), **({"labels": labels} if labels else {})}]
            sc.pop("file_sd_configs", None)
        else:
            for group in sc.get("static_configs", []):
                group["targets"] = [_rewrite_host(t, target_host) for t in group.get("targets", [])]
            for sd in sc.get("file_sd_configs", []):
                sd["files"] = [str((prom_dir / f).resolve()) if not os.path.isabs(f) else f for f in sd.get("files", [])]
        scrape_configs.append(sc)
    config["scrape_configs"] = scrape_configs
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "prometheus.yml"
    out.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return out


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _seconds(duration: str) -> float:
    """A Prometheus duration (``15s``, ``1m``, ``1m30s``, ``500ms``) in seconds."""
    import re

    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise StackError(f"not a Prometheus duration: {duration!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _format_seconds(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def scaled_rule_files(patterns: Sequence[str], out_dir: Path, factor: float) -> list[str]:
    """Copies of the rule files whose groups' own ``interval`` is scaled like the global evaluation interval.

    A group that runs every minute under a 15 s global interval runs every 4 s under a 1 s one: a run that
    compresses time compresses all of it, and the alerts keep their order of firing. Files are unchanged otherwise.
    """
    import glob as globmod

    if factor == 1.0:
        return list(patterns)
    yaml = _yaml()
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    for pattern in patterns:
        for src in sorted(globmod.glob(pattern)):
            doc = yaml.safe_load(Path(src).read_text(encoding="utf-8")) or {}
            for group in doc.get("groups", []):
                if "interval" in group:
                    group["interval"] = _format_seconds(_seconds(str(group["interval"])) * factor)
            dst = out_dir / Path(src).name
            dst.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
            files.append(str(dst))
    return files


def render_alertmanager_config(
    deploy_dir: Path,
    out_dir: Path,
    *,
    webhook_url_file: Path | None = None,
    group_wait: str | None = None,
    group_interval: str | None = None,
) -> Path:
    """Write a copy of alertmanager.yml whose container paths point into ``deploy_dir`` (or at the given webhook file)."""
    yaml = _yaml()
    am_dir = deploy_dir / "alertmanager"
    config = yaml.safe_load((am_dir / "alertmanager.yml").read_text(encoding="utf-8"))

    def local(path: str) -> str:
        if path.startswith(ALERTMANAGER_MOUNT + "/"):
            return str((am_dir / path[len(ALERTMANAGER_MOUNT) + 1 :]).resolve())
        return path

    config["templates"] = [local(t) for t in config.get("templates", [])]
    for receiver in config.get("receivers", []):
        for slack in receiver.get("slack_configs", []):
            if "api_url_file" in slack:
                slack["api_url_file"] = str(webhook_url_file) if webhook_url_file else local(slack["api_url_file"])
    route = config.setdefault("route", {})
    routes = [route, *route.get("routes", [])]
    for r in routes:
        if group_wait and (r is route or "group_wait" in r):
            r["group_wait"] = group_wait
        if group_interval and (r is route or "group_interval" in r):
            r["group_interval"] = group_interval
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "alertmanager.yml"
    out.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return out


def find_binary(names: Sequence[str]) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def _name(proc: subprocess.Popen[bytes]) -> str:
    args = proc.args
    first = args[0] if isinstance(args, list | tuple) else args
    return Path(str(first)).name


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(encoding="utf-8", errors="replace")[-2000:] if log.exists() else ""
            raise StackError(f"{_name(proc)} exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(url + "/-/ready", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise StackError(f"{url} not ready after {timeout:.0f} s (log: {log})")


def _stop_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM to every process at once, then one shared deadline: shutdown takes the slowest one's time,
    not the sum (Prometheus closing its TSDB on a busy host can take seconds)."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in running:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class LocalStack:
    """A running local Prometheus + Alertmanager pair; ``stop()`` (or the context manager) ends both."""

    prometheus_url: str
    alertmanager_url: str
    work_dir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stop(self) -> None:
        _stop_all(list(reversed(self.processes)))

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_stack(
    deploy_dir: Path,
    work_dir: Path,
    *,
    host: str = "127.0.0.1",
    prometheus_port: int = 9090,
    alertmanager_port: int = 9093,
    target_host: str = "127.0.0.1",
    jobs: Mapping[str, Sequence[str]] | None = None,
    skip_jobs: Sequence[str] = (),
    webhook_url_file: Path | None = None,
    scrape_interval: str | None = None,
    evaluation_interval: str | None = None,
    group_wait: str | None = None,
    group_interval: str | None = None,
    ready_timeout: float = 60.0,
) -> LocalStack:
    """Render both configs into ``work_dir`` and start Alertmanager, then Prometheus; wait until both are ready."""
    prometheus = find_binary(PROMETHEUS_BINARIES)
    alertmanager = find_binary(ALERTMANAGER_BINARIES)
    if not prometheus or not alertmanager:
        missing = [n for n, b in (("prometheus", prometheus), ("prometheus-alertmanager", alertmanager)) if not b]
        raise StackError(f"not on PATH: {', '.join(missing)} (Debian/Ubuntu: apt-get install prometheus prometheus-alertmanager)")
    work_dir.mkdir(parents=True, exist_ok=True)
    am_addr = f"{host}:{alertmanager_port}"
    prom_cfg = render_prometheus_config(
        deploy_dir,
        work_dir,
        alertmanager=am_addr,
        target_host=target_host,
        jobs=jobs,
        skip_jobs=skip_jobs,
        scrape_interval=scrape_interval,
        evaluation_interval=evaluation_interval,
    )
    am_cfg = render_alertmanager_config(
        deploy_dir, work_dir, webhook_url_file=webhook_url_file, group_wait=group_wait, group_interval=group_interval
    )
    stack = LocalStack(f"http://{host}:{prometheus_port}", f"http://{am_addr}", work_dir)
    am_log, prom_log = work_dir / "alertmanager.log", work_dir / "prometheus.log"
    try:
        with open(am_log, "ab") as log:
            am = subprocess.Popen(
                [
                    alertmanager,
                    f"--config.file={am_cfg}",
                    f"--storage.path={work_dir / 'alertmanager-data'}",
                    f"--web.listen-address={am_addr}",
                    "--cluster.listen-address=",  # single node: no gossip port
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        stack.processes.append(am)
        _wait_ready(stack.alertmanager_url, am, am_log, ready_timeout)
        with open(prom_log, "ab") as log:
            prom = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={prom_cfg}",
                    f"--storage.tsdb.path={work_dir / 'prometheus-data'}",
                    f"--web.listen-address={host}:{prometheus_port}",
                    "--enable-feature=exemplar-storage",
                    "--web.enable-remote-write-receiver",
                    "--web.enable-lifecycle",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        stack.processes.append(prom)
        _wait_ready(stack.prometheus_url, prom, prom_log, ready_timeout)
    except BaseException:
        stack.stop()
        raise
    return stack


# --------------------------------------------------------------------------- CLI


def _parse_targets(values: Sequence[str]) -> dict[str, list[str]] | None:
    if not values:
        return None
    jobs: dict[str, list[str]] = {}
    for value in values:
        job, sep, target = value.partition("=")
        if not sep or not job or not target or ":" not in target:
            raise StackError(f"--target {value!r}: expected JOB=HOST:PORT, e.g. orchestrator=127.0.0.1:9400")
        jobs.setdefault(job, []).append(target)
    return jobs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deploy-dir", help="the repository's deploy/ directory (default: found from the working directory)")
    parser.add_argument("--host", default="127.0.0.1", help="address Prometheus and Alertmanager listen on (default 127.0.0.1)")
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--alertmanager-port", type=int, default=9093)
    parser.add_argument("--target-host", default="127.0.0.1", help="host of the default targets (orchestrator :9400, trainer :9401, inference :8000)")
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="JOB=HOST:PORT",
        help="scrape only these targets (repeatable; jobs: orchestrator, trainer, inference, otel-collector)",
    )
    parser.add_argument(
        "--collector", action="store_true", help="also scrape an OTel collector's own metrics on TARGET_HOST:8888 (job otel-collector)"
    )
    parser.add_argument("--data-dir", help="where rendered configs, data and logs go (default: a new temporary directory)")
    parser.add_argument("--slack-webhook-file", help="file holding the Slack webhook URL (default deploy/alertmanager/secrets/slack_webhook_url)")
    parser.add_argument("--scrape-interval", help="override the scrape interval (e.g. 5s)")
    parser.add_argument("--render-only", action="store_true", help="write the rendered configs into --data-dir and exit")


def run(args: argparse.Namespace) -> int:
    try:
        deploy_dir = find_deploy_dir(args.deploy_dir)
        jobs = _parse_targets(args.target)
        skip = () if (args.collector or (jobs and "otel-collector" in jobs)) else ("otel-collector",)
        work_dir = Path(args.data_dir).resolve() if args.data_dir else Path(tempfile.mkdtemp(prefix="weightwatch-stack-"))
        webhook = Path(args.slack_webhook_file).resolve() if args.slack_webhook_file else (deploy_dir / SLACK_WEBHOOK_FILE)
        if not webhook.is_file():
            print(f"note: no Slack webhook file at {webhook}: alerts show in Alertmanager but reach no Slack channel", file=sys.stderr)
        if args.render_only:
            am_addr = f"{args.host}:{args.alertmanager_port}"
            p = render_prometheus_config(
                deploy_dir,
                work_dir,
                alertmanager=am_addr,
                target_host=args.target_host,
                jobs=jobs,
                skip_jobs=skip,
                scrape_interval=args.scrape_interval,
            )
            a = render_alertmanager_config(deploy_dir, work_dir, webhook_url_file=webhook)
            print(p)
            print(a)
            return 0
        stack = start_stack(
            deploy_dir,
            work_dir,
            host=args.host,
            prometheus_port=args.prometheus_port,
            alertmanager_port=args.alertmanager_port,
            target_host=args.target_host,
            jobs=jobs,
            skip_jobs=skip,
            webhook_url_file=webhook,
            scrape_interval=args.scrape_interval,
        )
    except StackError as exc:
        print(f"weightwatch stack: {exc}", file=sys.stderr)
        return 2

    stopping = False

    def _on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = signal.signal(signal.SIGTERM, _on_term)
    # "Ctrl-C stops both" must hold whatever this process inherited: a parent may have left SIGINT ignored
    # or blocked (both survive exec), and then Python never raises KeyboardInterrupt.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    print(f"Prometheus    {stack.prometheus_url}   (targets: {stack.prometheus_url}/targets, alerts: {stack.prometheus_url}/alerts)")
    print(f"Alertmanager  {stack.alertmanager_url}")
    print(f"configs, data and logs in {work_dir}; Ctrl-C stops both")
    sys.stdout.flush()
    code = 0
    try:
        while not stopping:
            for proc in stack.processes:
                if proc.poll() is not None:
                    print(f"weightwatch stack: {_name(proc)} exited with {proc.returncode}; see logs in {work_dir}", file=sys.stderr)
                    stopping, code = True, 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        print("stopped Prometheus and Alertmanager")
    return code
