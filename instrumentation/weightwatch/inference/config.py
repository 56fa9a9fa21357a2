"""Server-side settings of the inference plugin, read once from the environment.

The plugin runs inside vLLM's process, where the only channel from a user's ``vllm serve`` command
line is the environment; ``weightwatch serve`` translates its flags into these same variables.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from weightwatch.contracts import ADMIN_PATHS, ENV_ADMIN_TOKEN, ENV_ADMIN_TOKEN_FILE, RELOAD_PATH, UPDATE_PATH

__all__ = ["ADMIN_PATHS", "ENV_ADMIN_TOKEN", "ENV_ADMIN_TOKEN_FILE", "RELOAD_PATH", "UPDATE_PATH", "QUIET_PATHS", "ConfigError", "InferenceConfig"]

_log = logging.getLogger("weightwatch.inference")

ENV_WEIGHTS_ROOT = "WEIGHTWATCH_WEIGHTS_ROOT"
ENV_ADMIN_PORT = "WEIGHTWATCH_ADMIN_PORT"
ENV_ADMIN_HOST = "WEIGHTWATCH_ADMIN_HOST"
ENV_INJECT_RPC_DELAY_MS = "WEIGHTWATCH_INJECT_RPC_DELAY_MS"
ENV_LOG_FILE = "WEIGHTWATCH_LOG_FILE"
ENV_SPAN_FILE = "WEIGHTWATCH_SPAN_FILE"
ENV_LANE_DISPATCH = "WEIGHTWATCH_LANE_DISPATCH"
ENV_TRACE_EXCLUDE = "WEIGHTWATCH_TRACE_EXCLUDE"
ENV_ENGINE_NICE = "WEIGHTWATCH_ENGINE_NICE"
ENV_TRACE_GENERATION = "WEIGHTWATCH_TRACE_GENERATION"
#: Which generation (inference-lane) requests get OpenTelemetry server spans: those whose caller sent a valid
#: ``traceparent`` ("parent", the default), all of them ("all"), or none ("off"). Admin requests always do.
TRACE_GENERATION_POLICIES = ("parent", "all", "off")

#: The admin paths (prime-rl's request shapes, weightwatch.contracts); everything else is the inference lane.
#: Paths polled constantly by health checks and scrapers: not traced, no server.recv event.
QUIET_PATHS = frozenset({"/health", "/metrics", "/ping", "/load", "/version"})


class ConfigError(ValueError):
    """A setting is present but unusable; raised at startup so a typo never silently disables safety."""


@dataclass(frozen=True)
class InferenceConfig:
    weights_root: Path | None = None
    admin_token: str | None = None
    admin_port: int | None = None
    admin_host: str = "127.0.0.1"
    inject_rpc_delay_ms: float = 0.0
    log_file: Path | None = None
    span_file: Path | None = None
    #: How the admin lane reaches the engine: "direct" (fewest main-loop turns) or "coroutine".
    lane_dispatch: str = "direct"
    #: Extra comma-separated URL regexes the OTel FastAPI instrumentation leaves alone (e.g. /v1/completions).
    trace_exclude: str = ""
    #: Nice value for vLLM's engine processes (0 leaves them alone); see engine_priority.py.
    engine_nice: int = 0
    #: Generation requests with server spans: "parent" (only those whose caller sent a traceparent), "all", "off".
    trace_generation: str = "parent"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> InferenceConfig:
        env = dict(os.environ if env is None else env)
        root = env.get(ENV_WEIGHTS_ROOT) or None
        token = env.get(ENV_ADMIN_TOKEN) or None
        token_file = env.get(ENV_ADMIN_TOKEN_FILE) or None
        if token is None and token_file:
            try:
                token = Path(token_file).read_text(encoding="utf-8").strip() or None
            except OSError as exc:
                raise ConfigError(f"{ENV_ADMIN_TOKEN_FILE}={token_file}: cannot read the token ({exc})") from exc
            if token is None:
                raise ConfigError(f"{ENV_ADMIN_TOKEN_FILE}={token_file}: the file is empty")
        port_raw = env.get(ENV_ADMIN_PORT) or None
        port: int | None = None
        if port_raw is not None:
            try:
                port = int(port_raw)
            except ValueError as exc:
                raise ConfigError(f"{ENV_ADMIN_PORT}={port_raw!r} is not a port number") from exc
            if not 0 <= port <= 65535:
                raise ConfigError(f"{ENV_ADMIN_PORT}={port} is out of range")
        delay_raw = env.get(ENV_INJECT_RPC_DELAY_MS) or "0"
        try:
            delay = float(delay_raw)
        except ValueError as exc:
            raise ConfigError(f"{ENV_INJECT_RPC_DELAY_MS}={delay_raw!r} is not a number") from exc
        if delay < 0 or delay != delay:
            raise ConfigError(f"{ENV_INJECT_RPC_DELAY_MS}={delay_raw!r} must be >= 0")
        dispatch = (env.get(ENV_LANE_DISPATCH) or "direct").strip().lower()
        if dispatch not in ("direct", "coroutine"):
            raise ConfigError(f"{ENV_LANE_DISPATCH}={dispatch!r} must be direct or coroutine")
        nice_raw = (env.get(ENV_ENGINE_NICE) or "0").strip()
        try:
            engine_nice = int(nice_raw)
        except ValueError as exc:
            raise ConfigError(f"{ENV_ENGINE_NICE}={nice_raw!r} is not an integer") from exc
        if not 0 <= engine_nice <= 19:
            raise ConfigError(f"{ENV_ENGINE_NICE}={engine_nice} must be between 0 (leave alone) and 19")
        trace_generation = (env.get(ENV_TRACE_GENERATION) or "parent").strip().lower()
        if trace_generation not in TRACE_GENERATION_POLICIES:
            raise ConfigError(f"{ENV_TRACE_GENERATION}={trace_generation!r} must be one of {', '.join(TRACE_GENERATION_POLICIES)}")
        weights_root = Path(root).resolve() if root else None
        if weights_root is not None and not weights_root.is_dir():
            _log.warning("weightwatch: %s=%s does not exist (yet); updates fail until it does", ENV_WEIGHTS_ROOT, weights_root)
        return cls(
            weights_root=weights_root,
            admin_token=token,
            admin_port=port,
            admin_host=env.get(ENV_ADMIN_HOST) or "127.0.0.1",
            inject_rpc_delay_ms=delay,
            log_file=Path(env[ENV_LOG_FILE]) if env.get(ENV_LOG_FILE) else None,
            span_file=Path(env[ENV_SPAN_FILE]) if env.get(ENV_SPAN_FILE) else None,
            lane_dispatch=dispatch,
            trace_exclude=(env.get(ENV_TRACE_EXCLUDE) or "").strip(),
            engine_nice=engine_nice,
            trace_generation=trace_generation,
        )
