"""Helpers for the stack tests: a Slack-compatible sink and small real weightwatch workload processes.

Holds no tests; imported by tests/test_stack_*.py, tests/test_alerts_*.py and tests/test_dashboards_live.py.
Run as a script it is the sync exporter (see ``SyncExporter``):

    python tests/test_stack_support.py orchestrator '{"phases": {"a:8001": {"pause": 1.5, ...}}, ...}'
    python tests/test_stack_support.py inference '{}'     # SIGUSR1: pause for good (never resume)
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


class SlackSink:
    """A local HTTP server that accepts Slack incoming-webhook posts and keeps their JSON bodies."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"_unparsed": raw.decode("utf-8", "replace")}
                with sink._lock:
                    sink.posts.append({"path": self.path, "body": body})
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000/weightwatch"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.posts)

    def wait_for(self, predicate: Any, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for post in self.snapshot():
                if predicate(post["body"]):
                    return post
            time.sleep(0.5)
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


#: A real weightwatch process: weightwatch.setup + the catalogue's metrics, one weight update every 0.5 s
#: inside a span (so every observation carries the trace id as exemplar). argv: server queue_seconds.
WORKLOAD = r"""
import sys, time
import weightwatch
server, queue = sys.argv[1], float(sys.argv[2])
tele = weightwatch.setup(service_name="stack-e2e-orchestrator", role="orchestrator", metrics_port=0, metrics_addr="127.0.0.1")
print(tele.metrics_port, flush=True)
tracer = tele.tracer()
m = tele.metrics
step = 0
while True:
    step += 1
    with tracer.start_as_current_span("weights.update.server"):
        rpc = 0.02
        m.observe("rl_weight_update_queue_seconds", queue, op="update_weights", server=server)
        m.observe("rl_weight_update_rpc_seconds", rpc, op="update_weights", server=server)
        m.observe("rl_weight_update_wall_seconds", queue + rpc + 0.005, op="update_weights", server=server)
        m.set("rl_weight_update_last_queue_seconds", queue, op="update_weights", server=server)
        m.set("rl_weight_update_last_success_timestamp_seconds", time.time(), op="update_weights", server=server)
    m.set("rl_orchestrator_step", step)
    time.sleep(0.5)
"""


class Workload:
    """Runs WORKLOAD in a child process and knows its /metrics port."""

    def __init__(self, server: str, queue_seconds: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKLOAD, server, str(queue_seconds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.stop()
            raise RuntimeError(f"workload did not start: {line!r} {err[-2000:]}")
        self.port = int(line)
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --------------------------------------------------------------------------- the weight sync of today, as series

#: The admin op whose call makes up each phase in the exporter (catalogue.PHASE_OF_OP read backwards).
SYNC_OP_OF_PHASE = {"pause": "pause", "transfer": "update_weights", "resume": "resume"}
SYNC_OPS = tuple(SYNC_OP_OF_PHASE.values())


@dataclass
class SyncScenario:
    """What one orchestrator's syncs look like: per server and phase a duration, servers left behind, hung calls."""

    phases: dict[str, dict[str, float]]
    behind: dict[str, int] = field(default_factory=dict)
    hung: dict[str, str] = field(default_factory=dict)  # server -> op of a call that never answers
    budgets: dict[str, float] = field(default_factory=lambda: {"pause": 300.0, "update_weights": 720.0, "resume": 300.0})
    queue_s: float = 0.01

    @classmethod
    def from_json(cls, text: str) -> SyncScenario:
        return cls(**json.loads(text))


def record_sync(metrics: Any, tracer: Any, scenario: SyncScenario, step: int, hung_since: float) -> None:
    """One sync through weightwatch's own Metrics, with the series AdminClient.sync_weights writes: the sync, its
    phases per server, the straggler gap per phase, the version per server, in-flight age and budget per op.
    Everything inside one weights.sync span, so each observation's exemplar is the sync's trace id."""
    from weightwatch import catalogue

    with tracer.start_as_current_span("weights.sync") as sync_span:
        sync_span.set_attribute("rl.step", step)
        total = 0.0
        for phase in catalogue.PHASES:
            op = SYNC_OP_OF_PHASE[phase]
            assert catalogue.PHASE_OF_OP[op] == phase
            with tracer.start_as_current_span("weights.sync.phase") as phase_span:
                phase_span.set_attribute("rl.phase", phase)
                times = {server: durations[phase] for server, durations in scenario.phases.items()}
                for server, seconds in times.items():
                    with tracer.start_as_current_span("weights.update.server"):
                        metrics.observe("rl_weight_sync_phase_seconds", seconds, phase=phase, server=server)
                        # the per-call families keep their meaning, `op` gains pause | resume
                        metrics.observe("rl_weight_update_queue_seconds", scenario.queue_s, op=op, server=server)
                        metrics.observe("rl_weight_update_wall_seconds", seconds, op=op, server=server)
                metrics.observe("rl_weight_sync_straggler_seconds", max(times.values()) - statistics.median(times.values()), phase=phase)
                total += max(times.values())
        metrics.observe("rl_weight_sync_seconds", total)
    now = time.time()
    for server in scenario.phases:
        metrics.set("rl_weight_version", step - scenario.behind.get(server, 0), server=server)
        for op in SYNC_OPS:
            age = now - hung_since if scenario.hung.get(server) == op else 0.0
            metrics.set("rl_admin_call_inflight_age_seconds", age, op=op, server=server)
    for op, budget in scenario.budgets.items():
        metrics.set("rl_admin_call_budget_seconds", budget, op=op)


def vllm_weight_operation_metrics(registry: Any) -> Any | None:
    """vLLM's own RL weight-transfer metrics class (vllm/entrypoints/rl/online/metrics.py) on our registry, or None
    without vLLM. Loaded from its file: that module needs only prometheus_client, `import vllm` takes ~10 s."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "entrypoints" / "rl" / "online" / "metrics.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("vllm_rl_online_metrics", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.WeightOperationMetrics(registry)


class EngineFeeder:
    """The inference side of a sync through weightwatch's Metrics: pause (requests held), paused time, resume; and
    vLLM's own operation metrics around a short transfer. After ``stick()`` it pauses and never resumes."""

    def __init__(self, metrics: Any, tracer: Any, registry: Any, *, held: int = 8, paused_s: float = 0.03, vllm_rl: bool = True) -> None:
        self.metrics, self.tracer = metrics, tracer
        self.stuck = False
        self.held, self.paused_s = held, paused_s
        self.vllm = vllm_weight_operation_metrics(registry) if vllm_rl else None
        self.paused_since: float | None = None

    def tick(self) -> None:
        m = self.metrics
        if self.stuck:
            if self.paused_since is None:
                self.paused_since = time.time()
                m.set("rl_engine_paused", 1)
            return
        with self.tracer.start_as_current_span("admin.request"):
            m.set("rl_engine_paused", 1)
            m.observe("rl_engine_pause_inflight_requests", self.held)
        if self.vllm is not None:
            with self.vllm.record("update"):
                time.sleep(self.paused_s)
        else:
            time.sleep(self.paused_s)
        with self.tracer.start_as_current_span("admin.request"):
            m.observe("rl_engine_paused_seconds", self.paused_s)
            m.set("rl_engine_paused", 0)

    def stick(self) -> None:
        self.stuck = True


def _run_exporter(role: str, scenario_json: str) -> None:
    """The exporter process: weightwatch.setup (explicit registry, /metrics over HTTP), then a sync every 0.5 s."""
    import weightwatch

    tele = weightwatch.setup(service_name=f"sync-exporter-{role}", role=role, metrics_port=0, metrics_addr="127.0.0.1")
    tracer = tele.tracer()
    started = time.time()
    if role == "orchestrator":
        scenario = SyncScenario.from_json(scenario_json)
        step = 0
        print(json.dumps({"port": tele.metrics_port, "started": started}), flush=True)
        while True:  # until the test stops this process
            step += 1
            record_sync(tele.metrics, tracer, scenario, step, started)
            time.sleep(0.5)
    else:
        feeder = EngineFeeder(tele.metrics, tracer, tele.registry, **json.loads(scenario_json))
        signal.signal(signal.SIGUSR1, lambda *_: feeder.stick())
        print(json.dumps({"port": tele.metrics_port, "started": started}), flush=True)
        announced = False
        while True:
            feeder.tick()
            if feeder.paused_since is not None and not announced:
                print(json.dumps({"paused_since": feeder.paused_since}), flush=True)
                announced = True
            time.sleep(0.5)


class SyncExporter:
    """Runs this file as the sync exporter for one role in a child process; knows its /metrics target."""

    def __init__(self, role: str, scenario: dict[str, Any]) -> None:
        env = dict(os.environ, OTEL_TRACES_EXPORTER="none")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, role, json.dumps(scenario)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        try:
            hello = json.loads(line)
        except ValueError:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.stop()
            raise RuntimeError(f"sync exporter ({role}) did not start: {line!r} {err[-2000:]}") from None
        self.port, self.started = int(hello["port"]), float(hello["started"])
        self.target = f"127.0.0.1:{self.port}"

    def stick(self) -> None:
        """Inference exporter: pause for good from the next tick on."""
        self.proc.send_signal(signal.SIGUSR1)

    def read_event(self) -> dict[str, Any]:
        """The next JSON line the exporter prints (the inference one prints when it pauses for good)."""
        assert self.proc.stdout is not None
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


if __name__ == "__main__":
    _run_exporter(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "{}")
