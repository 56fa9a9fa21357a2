"""Start vLLM's OpenAI server with weightwatch loaded (plugin, middleware, admin API and lane, metrics).

    weightwatch serve --model PATH [--host H] [--port P] [--admin-port P] [--weights-root DIR]
                      [--log-file F] [--span-file F] [--engine-nice N] [--trace-generation parent|all|off]
                      [--update-method NAME] [--inject-delay OP=MS ...] [--inject-fail OP ...]
                      [-- extra vLLM args]

It runs ``python -m vllm.entrypoints.openai.api_server`` as a child with ``VLLM_PLUGINS`` including
``weightwatch`` and the WEIGHTWATCH_* settings in its environment, forwards SIGINT/SIGTERM, and exits
with the child's code. On machines without a GPU it adds CPU-friendly defaults (float32 and
``VLLM_CPU_KVCACHE_SPACE=1``) unless the extra arguments or environment say otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from weightwatch.inference import config as cfg

#: Engine processes' nice value under ``weightwatch serve``: 0 leaves them alone. Opt in with --engine-nice; it
#: trades tokens/s for the admin tail (docs/inference.md, "CPU priority", has both sides measured).
DEFAULT_ENGINE_NICE = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (or name) for vLLM")
    parser.add_argument("--host", default="127.0.0.1", help="address of the OpenAI API (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="OpenAI API port; vLLM's /metrics is served here too (default 8000)")
    parser.add_argument(
        "--admin-port",
        type=int,
        default=None,
        help="admin lane port (own listener, thread and event loop); default PORT+1, 0 picks a free port, -1 disables the lane",
    )
    parser.add_argument("--admin-host", default=None, help="admin lane address (default: same as --host)")
    parser.add_argument(
        "--weights-root", type=Path, default=None, help="updates must resolve inside this directory (WEIGHTWATCH_WEIGHTS_ROOT)"
    )
    parser.add_argument("--admin-token-file", type=Path, default=None, help="file holding the Bearer token for admin endpoints")
    parser.add_argument("--log-file", type=Path, default=None, help="append weightwatch's event lines here (WEIGHTWATCH_LOG_FILE)")
    parser.add_argument("--span-file", type=Path, default=None, help="write finished spans here as JSON lines (WEIGHTWATCH_SPAN_FILE)")
    parser.add_argument(
        "--engine-nice",
        type=int,
        default=None,
        choices=range(0, 20),
        metavar="N",
        help="opt in: nice value (1-19) for vLLM's engine processes, so the API server and admin lane get the CPU first "
        "on a saturated host, at a cost in tokens/s (docs/inference.md, CPU priority) "
        f"(default: ${cfg.ENV_ENGINE_NICE} or {DEFAULT_ENGINE_NICE}; 0 leaves them alone)",
    )
    parser.add_argument(
        "--trace-generation",
        choices=cfg.TRACE_GENERATION_POLICIES,
        default=None,
        help="which generation requests get OpenTelemetry server spans: parent (those that arrive with a traceparent), "
        f"all, or off; admin requests always do (default: ${cfg.ENV_TRACE_GENERATION} or parent)",
    )
    parser.add_argument(
        "--update-method",
        default=None,
        metavar="NAME",
        help="worker method behind /update_weights {weight_dir}: vLLM's reload_weights (default; kwargs weights_path=DIR) or a "
        "worker extension's method such as prime-rl's update_weights_from_path (called with DIR as its one positional argument) "
        f"(${cfg.ENV_UPDATE_METHOD})",
    )
    parser.add_argument(
        "--inject-delay",
        action="append",
        default=None,
        metavar="OP=MS",
        help="fault injection for demos and tests: sleep MS before OP's engine call (repeatable; "
        f"${cfg.ENV_INJECT_DELAY_MS}, e.g. pause=1500,update_weights=20000)",
    )
    parser.add_argument(
        "--inject-fail",
        action="append",
        default=None,
        metavar="OP",
        help=f"fault injection: OP answers 500 as an engine failure without reaching the engine (repeatable; ${cfg.ENV_INJECT_FAIL})",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the command and environment, do not start")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after --: extra arguments for vLLM's server")


def _has_gpu() -> bool:
    try:
        metadata.distribution("vllm-cpu")
        return False
    except metadata.PackageNotFoundError:
        pass
    return shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists() or Path("/dev/kfd").exists()


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def build_command(args: argparse.Namespace, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The child's argv and environment (pure, for tests and --dry-run)."""
    extra = list(args.vllm_args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(args.model),
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    child_env = dict(env)
    plugins = [p for p in (child_env.get("VLLM_PLUGINS") or "").split(",") if p.strip()]
    if "weightwatch" not in plugins:
        plugins.append("weightwatch")
    child_env["VLLM_PLUGINS"] = ",".join(plugins)
    child_env.setdefault("VLLM_NO_USAGE_STATS", "1")
    child_env.setdefault("DO_NOT_TRACK", "1")
    if Path(str(args.model)).is_dir():
        child_env.setdefault("HF_HUB_OFFLINE", "1")
        child_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not _has_gpu():
        child_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if not _has_flag(extra, "--dtype"):
            cmd += ["--dtype", "float32"]
    admin_port = args.port + 1 if args.admin_port is None else args.admin_port
    if admin_port >= 0:
        child_env[cfg.ENV_ADMIN_PORT] = str(admin_port)
        child_env[cfg.ENV_ADMIN_HOST] = args.admin_host or args.host
    else:
        child_env.pop(cfg.ENV_ADMIN_PORT, None)
    if getattr(args, "engine_nice", None) is not None:
        child_env[cfg.ENV_ENGINE_NICE] = str(args.engine_nice)
    else:
        child_env.setdefault(cfg.ENV_ENGINE_NICE, str(DEFAULT_ENGINE_NICE))
    if getattr(args, "trace_generation", None) is not None:
        child_env[cfg.ENV_TRACE_GENERATION] = args.trace_generation
    if getattr(args, "update_method", None):
        child_env[cfg.ENV_UPDATE_METHOD] = args.update_method
    if getattr(args, "inject_delay", None):
        spec = ",".join(args.inject_delay)
        cfg.parse_inject_delays(spec, "--inject-delay")  # a bad spec stops here, not inside vLLM's startup
        child_env[cfg.ENV_INJECT_DELAY_MS] = spec
    if getattr(args, "inject_fail", None):
        spec = ",".join(args.inject_fail)
        cfg.parse_inject_fail(spec, "--inject-fail")
        child_env[cfg.ENV_INJECT_FAIL] = spec
    if args.weights_root is not None:
        child_env[cfg.ENV_WEIGHTS_ROOT] = str(args.weights_root.resolve())
    if args.admin_token_file is not None:
        child_env[cfg.ENV_ADMIN_TOKEN_FILE] = str(args.admin_token_file.resolve())
    if args.log_file is not None:
        child_env[cfg.ENV_LOG_FILE] = str(args.log_file.resolve())
    if args.span_file is not None:
        child_env[cfg.ENV_SPAN_FILE] = str(args.span_file.resolve())
    return cmd + extra, child_env


def run(args: argparse.Namespace) -> int:
    try:
        cmd, env = build_command(args, dict(os.environ))
        cfg.InferenceConfig.from_env(env)  # every WEIGHTWATCH_* setting checked before vLLM spends 40 s starting
    except cfg.ConfigError as exc:
        print(f"weightwatch serve: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for key in sorted(k for k in env if k.startswith(("WEIGHTWATCH_", "VLLM_"))):
            print(f"{key}={env[key]}")
        print(" ".join(cmd))
        return 0
    # Own process group: vLLM starts engine and worker processes; at the end none may be left behind.
    child = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _reap_group(child.pid)
    return code if code >= 0 else 128 - code


def _reap_group(pgid: int, grace: float = 5.0) -> None:
    """Terminate what the server left in its process group (engine core, workers)."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
