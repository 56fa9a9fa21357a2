"""Server-side settings of the inference plugin, read once from the environment.

The plugin runs inside vLLM's process, where the only channel from a user's ``vllm serve`` command
line is the environment; ``weightwatch serve`` translates its flags into these same variables.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightwatch.catalogue import OPS
from weightwatch.contracts import ADMIN_PATHS, ENV_ADMIN_TOKEN, ENV_ADMIN_TOKEN_FILE, RELOAD_PATH, UPDATE_PATH

__all__ = [
    "ADMIN_PATHS",
    "ENV_ADMIN_TOKEN",
    "ENV_ADMIN_TOKEN_FILE",
    "RELOAD_PATH",
    "UPDATE_PATH",
    "QUIET_PATHS",
    "ConfigError",
    "InferenceConfig",
]

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
#: Worker method behind ``/update_weights {"weight_dir"}``: vLLM's ``reload_weights`` (kwargs ``weights_path``) or a
#: worker extension's method such as prime-rl's ``update_weights_from_path`` (one positional argument, the directory).
ENV_UPDATE_METHOD = "WEIGHTWATCH_UPDATE_METHOD"
DEFAULT_UPDATE_METHOD = "reload_weights"
#: Seconds ``GET /liveness`` waits for the engine's no-op round trip before answering 503 engine_unresponsive.
ENV_LIVENESS_TIMEOUT_S = "WEIGHTWATCH_LIVENESS_TIMEOUT_S"
DEFAULT_LIVENESS_TIMEOUT_S = 10.0
#: Fault injection for demos and tests: ``op=ms,...`` sleeps before that op's engine call; ``op,...`` fails it (500).
ENV_INJECT_DELAY_MS = "WEIGHTWATCH_INJECT_DELAY_MS"
ENV_INJECT_FAIL = "WEIGHTWATCH_INJECT_FAIL"
#: Which generation (inference-lane) requests get OpenTelemetry server spans: those whose caller sent a valid
#: ``traceparent`` ("parent", the default), all of them ("all"), or none ("off"). Admin requests always do.
TRACE_GENERATION_POLICIES = ("parent", "all", "off")

#: The admin paths (prime-rl's request shapes, weightwatch.contracts); everything else is the inference lane.
#: Paths polled constantly by health checks and scrapers: not traced, no server.recv event.
QUIET_PATHS = frozenset({"/health", "/metrics", "/ping", "/load", "/version"})


class ConfigError(ValueError):
    """A setting is present but unusable; raised at startup so a typo never silently disables safety."""


def _known_op(op: str, source: str) -> str:
    op = op.strip()
    if op not in OPS:
        raise ConfigError(f"{source}: unknown op {op!r}; known ops: {', '.join(OPS)}")
    return op


def parse_inject_delays(raw: str, source: str = ENV_INJECT_DELAY_MS) -> dict[str, float]:
    """``"pause=1500,update_weights=20000"`` -> {op: ms}; ConfigError for anything else."""
    delays: dict[str, float] = {}
    for item in (part.strip() for part in (raw or "").split(",")):
        if not item:
            continue
        op, sep, ms_raw = item.partition("=")
        if not sep:
            raise ConfigError(f"{source}: {item!r} is not OP=MS")
        op = _known_op(op, source)
        try:
            ms = float(ms_raw)
        except ValueError:
            raise ConfigError(f"{source}: {item!r}: {ms_raw.strip()!r} is not a number of milliseconds") from None
        if not 0 <= ms < float("inf"):
            raise ConfigError(f"{source}: {item!r}: the delay must be a finite number >= 0")
        if op in delays:
            raise ConfigError(f"{source}: op {op!r} is given twice")
        delays[op] = ms
    return delays


def parse_inject_fail(raw: str, source: str = ENV_INJECT_FAIL) -> frozenset[str]:
    """``"update_weights,pause"`` -> the ops that answer 500 as an engine failure; ConfigError for unknown ops."""
    return frozenset(_known_op(op, source) for op in (raw or "").split(",") if op.strip())


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
    #: Worker method behind ``/update_weights {"weight_dir"}`` (see ``update_call``).
    update_method: str = DEFAULT_UPDATE_METHOD
    liveness_timeout_s: float = DEFAULT_LIVENESS_TIMEOUT_S
    #: Injected sleep before an op's engine call, ms (WEIGHTWATCH_INJECT_DELAY_MS; update ops also take the old
    #: WEIGHTWATCH_INJECT_RPC_DELAY_MS).
    inject_delay_ms: Mapping[str, float] = field(default_factory=dict)
    #: Ops whose engine call is replaced by an injected failure (WEIGHTWATCH_INJECT_FAIL).
    inject_fail: frozenset[str] = frozenset()

    def update_call(self, weight_dir: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
        """(method, args, kwargs) of the ``collective_rpc`` that loads ``weight_dir`` in every worker.

        vLLM's ``reload_weights`` takes ``weights_path=DIR``; any other method (a worker extension's, such as
        prime-rl's ``update_weights_from_path(weight_dir)``) gets the directory as its one positional argument,
        exactly as prime-rl's own server calls it.
        """
        if self.update_method == DEFAULT_UPDATE_METHOD:
            return self.update_method, (), {"weights_path": weight_dir}
        return self.update_method, (weight_dir,), {}

    def delay_ms(self, op: str) -> float:
        """Injected delay before ``op``'s engine call (0 when none)."""
        if op in self.inject_delay_ms:
            return self.inject_delay_ms[op]
        if op in ("update_weights", "reload_weights"):
            return self.inject_rpc_delay_ms
        return 0.0

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
        update_method = (env.get(ENV_UPDATE_METHOD) or DEFAULT_UPDATE_METHOD).strip()
        if not update_method.isidentifier():
            raise ConfigError(f"{ENV_UPDATE_METHOD}={update_method!r} is not a method name")
        liveness_raw = (env.get(ENV_LIVENESS_TIMEOUT_S) or str(DEFAULT_LIVENESS_TIMEOUT_S)).strip()
        try:
            liveness_timeout = float(liveness_raw)
        except ValueError as exc:
            raise ConfigError(f"{ENV_LIVENESS_TIMEOUT_S}={liveness_raw!r} is not a number of seconds") from exc
        if not 0 < liveness_timeout < float("inf"):
            raise ConfigError(f"{ENV_LIVENESS_TIMEOUT_S}={liveness_raw!r} must be a finite number > 0")
        inject_delay = parse_inject_delays(env.get(ENV_INJECT_DELAY_MS) or "")
        inject_fail = parse_inject_fail(env.get(ENV_INJECT_FAIL) or "")
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
            update_method=update_method,
            liveness_timeout_s=liveness_timeout,
            inject_delay_ms=inject_delay,
            inject_fail=inject_fail,
        )
