"""Start and stop real vLLM servers on CPU for tests and benchmarks (``weightwatch serve`` or plain vLLM).

Servers listen on free ports on 127.0.0.1, each in its own process group; ``wait_ready`` raises
ServerNotReady with the tail of the server's output when it dies or does not come up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


class ServerNotReady(RuntimeError):
    """The server died while starting or did not answer /health in time (the message has its output tail)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


STARTUP_TIMEOUT_S = float(os.environ.get("WEIGHTWATCH_VLLM_STARTUP_TIMEOUT", "300"))
#: Flags for every test server: small and CPU-friendly.
VLLM_ARGS = ["--max-model-len", "512", "--max-num-seqs", "64", "--disable-uvicorn-access-log", "--enforce-eager"]


def vllm_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("vllm") is not None
    except Exception:  # noqa: BLE001
        return False


@dataclass
class VllmServer:
    """A running server: addresses, files and a stop()."""

    base_url: str
    model_dir: Path
    proc: subprocess.Popen[bytes]
    output_path: Path
    admin_url: str | None = None
    weights_root: Path | None = None
    admin_token: str | None = None
    log_path: Path | None = None
    span_path: Path | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def metrics_url(self) -> str:
        return f"{self.base_url}/metrics"

    @property
    def model_name(self) -> str:
        """The served model name (vLLM uses the --model argument)."""
        return str(self.model_dir)

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}

    def output_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.output_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop_process_group(self.proc)


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """Stop a server and everything it started.

    SIGTERM goes to the process itself (``weightwatch serve`` forwards it to vLLM, which stops its engine
    and workers); whatever is still alive after ``grace`` seconds, in its process group or among the
    descendants seen before, gets SIGKILL.
    """
    try:
        import psutil

        descendants = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    except Exception:  # noqa: BLE001
        descendants = []
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    for child in descendants:
        try:
            if child.is_running():
                child.kill()
        except Exception:  # noqa: BLE001
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def wait_ready(server: VllmServer, timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Poll /health (and the lane's /health) until 200; fail with the output tail if the server dies."""
    deadline = time.monotonic() + timeout
    urls = [f"{server.base_url}/health"] + ([f"{server.admin_url}/health"] if server.admin_url else [])
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not server.alive():
                raise ServerNotReady(f"vLLM server exited with {server.proc.returncode} while starting:\n{server.output_tail()}")
            try:
                if all(client.get(u).status_code == 200 for u in urls):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
    server.stop()
    raise ServerNotReady(f"vLLM server not ready after {timeout:.0f} s:\n{server.output_tail()}")


def start_weightwatch_server(
    model_dir: Path,
    workdir: Path,
    *,
    admin_token: str | None = "test-admin-token",
    admin_lane: bool = True,
    extra_env: dict[str, str] | None = None,
    vllm_args: list[str] | None = None,
) -> VllmServer:
    """Start ``weightwatch serve`` (not waiting for readiness)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    admin_port = free_port() if admin_lane else -1
    weights_root = workdir / "weights"
    weights_root.mkdir(exist_ok=True)
    cmd = [
        sys.executable, "-m", "weightwatch", "serve",
        "--model", str(model_dir), "--port", str(port), "--admin-port", str(admin_port),
        "--weights-root", str(weights_root),
        "--log-file", str(workdir / "inference.log"), "--span-file", str(workdir / "inference.spans.jsonl"),
    ]  # fmt: skip
    if admin_token:
        token_file = workdir / "admin_token"
        token_file.write_text(admin_token + "\n")
        token_file.chmod(0o600)
        cmd += ["--admin-token-file", str(token_file)]
    cmd += ["--", *(vllm_args if vllm_args is not None else VLLM_ARGS)]
    out = workdir / "server.out"
    env = {**os.environ, **(extra_env or {})}
    with open(out, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return VllmServer(
        base_url=f"http://127.0.0.1:{port}",
        admin_url=f"http://127.0.0.1:{admin_port}" if admin_lane else None,
        model_dir=model_dir,
        proc=proc,
        output_path=out,
        weights_root=weights_root,
        admin_token=admin_token,
        log_path=workdir / "inference.log",
        span_path=workdir / "inference.spans.jsonl",
    )


def start_plain_server(
    model_dir: Path, workdir: Path, *, vllm_args: list[str] | None = None, extra_env: dict[str, str] | None = None
) -> VllmServer:
    """Start vLLM's own OpenAI server without weightwatch (not waiting for readiness)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
    env.pop("VLLM_PLUGINS", None)
    env.update(extra_env or {})
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", *(vllm_args if vllm_args is not None else VLLM_ARGS),
    ]  # fmt: skip
    out = workdir / "server.out"
    with open(out, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return VllmServer(base_url=f"http://127.0.0.1:{port}", model_dir=model_dir, proc=proc, output_path=out)
