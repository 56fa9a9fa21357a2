"""What the roles agree on across process boundaries: paths, headers, markers, layouts, variable names.

The inference server, the orchestrator, the trainer and the analyzer each import these from here, so a
change is made once and both sides of a wire move together. No behaviour lives here, only names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# --------------------------------------------------------------------------- admin HTTP API (inference server)

#: prime-rl's bare update: ``{"weight_dir": DIR}`` (weightwatch) or ``{"update_info": {...}}`` (vLLM's own).
UPDATE_PATH = "/update_weights"
#: Reload the model's own weights from disk (no body).
RELOAD_PATH = "/reload_weights"
#: The sync of today: pause generation, update, resume (ARCHITECTURE.md, "The weight sync of today").
PAUSE_PATH = "/pause"
RESUME_PATH = "/resume"
IS_PAUSED_PATH = "/is_paused"
LOAD_LORA_PATH = "/load_lora_adapter"
LIVENESS_PATH = "/liveness"

#: Admin op (metric label ``op``) of each admin path.
OP_BY_PATH: dict[str, str] = {
    UPDATE_PATH: "update_weights",
    RELOAD_PATH: "reload_weights",
    PAUSE_PATH: "pause",
    RESUME_PATH: "resume",
    IS_PAUSED_PATH: "is_paused",
    LOAD_LORA_PATH: "load_lora_adapter",
    LIVENESS_PATH: "liveness",
}
PATH_BY_OP: dict[str, str] = {op: path for path, op in OP_BY_PATH.items()}
ADMIN_PATHS = frozenset(OP_BY_PATH)
#: Pause modes: keep (hold requests, resume continues them; prime-rl's choice), wait (let running requests
#: finish first), abort (vLLM 0.33's default: running requests end).
PAUSE_MODES = ("keep", "wait", "abort")
DEFAULT_PAUSE_MODE = "keep"

#: ``Server-Timing`` metric names the server writes and the client reads.
TIMING_SERVER = "server"
TIMING_RPC = "rpc"
SERVER_TIMING_HEADER = "Server-Timing"

#: Bearer token for the admin endpoints, given directly or as a file (both sides read the same names).
ENV_ADMIN_TOKEN = "WEIGHTWATCH_ADMIN_TOKEN"
ENV_ADMIN_TOKEN_FILE = "WEIGHTWATCH_ADMIN_TOKEN_FILE"

#: The budgets prime-rl's orchestrator gives one attempt of each call, seconds.
PRIME_RL_BUDGETS_S: dict[str, float] = {"pause": 300.0, "resume": 300.0, "update_weights": 720.0}


def op_of_path(path: str) -> str:
    """The op of an admin URL path; for a path we do not know, its last segment (seed-era logs)."""
    path = path.split("?", 1)[0].rstrip("/")
    for known, op in OP_BY_PATH.items():
        if path.endswith(known):
            return op
    return path.rsplit("/", 1)[-1] or path


def admin_token_from_env(env: dict[str, str] | None = None) -> str | None:
    """The admin token from WEIGHTWATCH_ADMIN_TOKEN, else the file WEIGHTWATCH_ADMIN_TOKEN_FILE names.

    Raises OSError when the file is named but cannot be read; the caller decides whether that is fatal.
    """
    env = os.environ if env is None else env
    token = (env.get(ENV_ADMIN_TOKEN) or "").strip()
    if token:
        return token
    path = env.get(ENV_ADMIN_TOKEN_FILE) or ""
    if not path:
        return None
    return Path(path).read_text(encoding="utf-8").strip() or None


# --------------------------------------------------------------------------- checkpoints on the shared filesystem

#: Written last into a checkpoint directory: its presence means the directory is complete.
STABLE_MARKER = "STABLE"
#: The weights file the trainer writes.
WEIGHTS_FILE = "model.safetensors"
#: ``ROOT/step_N``: one directory per checkpoint step.
STEP_DIR_RE = re.compile(r"^step_(\d+)$")
#: Where a checkpoint is assembled before the atomic rename.
TMP_STEP_PREFIX = ".tmp-step_"


def step_dir(root: str | os.PathLike[str], step: int) -> Path:
    """The directory of checkpoint ``step`` under ``root`` (it may not exist yet)."""
    return Path(root) / f"step_{int(step)}"


def step_of_dir(path: str | os.PathLike[str]) -> int | None:
    """N for a ``.../step_N`` directory, else None."""
    m = STEP_DIR_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- tracing

#: W3C trace context header that crosses every HTTP hop.
TRACEPARENT_HEADER = "traceparent"
