"""Helpers for the stack tests: a Slack-compatible sink and a small real weightwatch workload process.

Holds no tests; imported by tests/test_stack_*.py and tests/test_alerts_*.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
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
