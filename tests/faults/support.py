"""Helpers of the fault suite: a controllable OTLP endpoint, /metrics reading, checkpoints, load windows."""

from __future__ import annotations

import shutil
import socket
import statistics
import threading
from collections.abc import Iterable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

#: Modes of OtlpEndpoint.
OK, CLOSED, BLACKHOLE = "ok", "closed", "blackhole"


class OtlpEndpoint:
    """One 127.0.0.1 port an OTLP/HTTP exporter is pointed at, switchable between three behaviours.

    ``ok``: answers every POST with 200 (the collector, accepting spans; Tempo and the collector cannot run
    here, so this is the stand-in, as the Slack sink is for Slack). ``closed``: nothing listens (connection
    refused; open connections are reset). ``blackhole``: accepts connections, reads what is sent, never answers.
    """

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.mode = CLOSED
        self.requests_ok = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()

    def set_mode(self, mode: str) -> None:
        assert mode in (OK, CLOSED, BLACKHOLE), mode
        with self._lock:
            old, self.mode = self.mode, mode
            conns, self._conns = list(self._conns), set()
        for c in conns:  # a mode change drops the connections of the old mode
            _close(c)
        if mode == CLOSED:
            if self._listener is not None:
                _close(self._listener)
                self._listener = None
        elif old == CLOSED or self._listener is None:
            ls = socket.socket()
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", self.port))
            ls.listen(128)
            self._listener = ls
            threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def close(self) -> None:
        self.set_mode(CLOSED)

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                conn, _ = ls.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    return
                if self.mode != OK:
                    continue  # black hole: read and never answer
                buf += chunk
                while b"\r\n\r\n" in buf:
                    head, rest = buf.split(b"\r\n\r\n", 1)
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value.strip())
                    if len(rest) < length:
                        break
                    buf = rest[length:]
                    with self._lock:
                        self.requests_ok += 1
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n")
        except OSError:
            return
        finally:
            _close(conn)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


def metric_values(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def scrape(url: str, timeout: float = 10.0) -> str:
    return httpx.get(url, timeout=timeout).text


def make_checkpoint(model_dir: Path, root: Path, step: int, prefix: str = "faults_step_") -> Path:
    """What the trainer would write: the served model's files in root/<prefix>N, STABLE last."""
    d = root / f"{prefix}{step}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, d / f.name)
    (d / "STABLE").write_text("")
    return d


def read_ticks(path: Path) -> list[tuple[float, int, int]]:
    """(unix_time, tokens, errors) lines of bench_inference_load's --ticks file (cumulative)."""
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4:
            out.append((float(parts[0]), int(parts[1]), int(parts[3])))
    return out


def window_rate(ticks: list[tuple[float, int, int]], start: float, end: float) -> float | None:
    """Tokens per second between the first tick at or after ``start`` and the last at or before ``end``.

    A window shorter than the tick interval holds fewer than two ticks; it is then measured over the
    nearest ticks around it (the last at or before ``start``, the first at or after ``end``), so a
    part that took 0.2 s still gets a rate that includes it. None only when no tick brackets it.
    """
    inside = [t for t in ticks if start <= t[0] <= end]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] <= 0:
        before = [t for t in ticks if t[0] <= start]
        after = [t for t in ticks if t[0] >= end]
        lo = before[-1] if before else (inside[0] if inside else None)
        hi = after[0] if after else (inside[-1] if inside else None)
        if lo is None or hi is None or hi[0] - lo[0] <= 0:
            return None
        inside = [lo, hi]
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def pct(values: Iterable[float], q: float) -> float:
    vs = sorted(values)
    if not vs:
        return float("nan")
    if len(vs) == 1:
        return vs[0]
    return statistics.quantiles(vs, n=100, method="inclusive")[max(0, min(98, int(q) - 1))]


def start_server_on(model_dir: Path, workdir: Path, weights_root: Path, *, extra_env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """``weightwatch serve`` with a given (shared) weights root and fixed ports; ``restart(server)`` reuses both.

    Like benchmarks.servers.start_weightwatch_server, which gives every server its own weights root; a
    sync sends one weight_dir to every server, so the servers of a sync share one.
    """
    import os
    import subprocess
    import sys

    from benchmarks.servers import VLLM_ARGS, VllmServer, free_port

    workdir.mkdir(parents=True, exist_ok=True)
    weights_root.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    token = "test-admin-token"
    token_file = workdir / "admin_token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    cmd = [
        sys.executable, "-m", "weightwatch", "serve", "--model", str(model_dir), "--port", str(port), "--admin-port", str(admin_port),
        "--weights-root", str(weights_root), "--log-file", str(workdir / "inference.log"),
        "--span-file", str(workdir / "inference.spans.jsonl"), "--admin-token-file", str(token_file), "--", *VLLM_ARGS,
    ]  # fmt: skip
    env = {**os.environ, **(extra_env or {})}
    out = workdir / "server.out"
    with open(out, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = VllmServer(
        base_url=f"http://127.0.0.1:{port}", admin_url=f"http://127.0.0.1:{admin_port}", model_dir=model_dir, proc=proc,
        output_path=out, weights_root=weights_root, admin_token=token, log_path=workdir / "inference.log",
        span_path=workdir / "inference.spans.jsonl", extra={"env": env},
    )  # fmt: skip
    return server


def restart(server) -> None:  # type: ignore[no-untyped-def]
    """Start the same server again (same command, ports and environment) after it died."""
    import subprocess

    server.stop()
    with open(server.output_path, "ab") as fh:
        server.proc = subprocess.Popen(server.proc.args, stdout=fh, stderr=subprocess.STDOUT, env=server.extra["env"], start_new_session=True)


def api_server_pid(server) -> int | None:  # type: ignore[no-untyped-def]
    """The vLLM API server: the direct child of the ``weightwatch serve`` wrapper."""
    import psutil

    try:
        kids = psutil.Process(server.proc.pid).children()
    except psutil.Error:
        return None
    return kids[0].pid if kids else None


def engine_core_pids(server) -> list[int]:  # type: ignore[no-untyped-def]
    import psutil

    out = []
    try:
        procs = psutil.Process(server.proc.pid).children(recursive=True)
    except psutil.Error:
        return []
    for p in procs:
        try:
            if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out
