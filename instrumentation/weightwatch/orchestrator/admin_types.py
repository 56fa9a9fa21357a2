"""Plain data of the admin client: the timeouts a user sets and what an update returns.

Kept apart from the client so results can be built, compared and logged without touching the network.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from weightwatch.catalogue import PHASES
from weightwatch.contracts import PRIME_RL_BUDGETS_S

FailureReason = Literal["timeout", "transport", "http_4xx", "http_5xx"]
FAILURE_REASONS: tuple[str, ...] = ("timeout", "transport", "http_4xx", "http_5xx")
#: Not a failure of the server: the caller was cancelled while the call ran (counted nowhere as a failure).
CANCELLED = "cancelled"


@dataclass(frozen=True)
class AdminTimeouts:
    """Per-call limits of an admin call, in seconds. Every one is finite: no call waits forever.

    * ``connect``: opening the TCP connection to a server.
    * ``read``: waiting for the answer once the request is sent (the reload itself lives here,
      so size it for the largest model: a 70B reload can take minutes).
    * ``total``: the whole call to one server including retries and backoff, enforced with
      ``asyncio.timeout``; the call ends as a ``timeout`` failure when it runs out.
    * ``pool``: waiting for a free connection from the client's pool (``None``: same as ``total``;
      matters in shared-pool mode where generation streams hold the connections).

    The defaults are deliberately long (10 min read, 15 min total) rather than httpx's silent 5 s or
    the 30 s that kills large models' updates; set them to what your model needs.
    """

    connect: float = 10.0
    read: float = 600.0
    total: float = 900.0
    pool: float | None = None

    def __post_init__(self) -> None:
        for name in ("connect", "read", "total", "pool"):
            value = getattr(self, name)
            if value is None and name == "pool":
                continue
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"AdminTimeouts.{name} must be a finite number of seconds > 0, got {value!r} (no call may wait forever)")

    @property
    def pool_seconds(self) -> float:
        return self.total if self.pool is None else self.pool


@dataclass
class ServerResult:
    """The outcome of one admin call to one server. Times in ms; ``None`` means honestly unknown.

    ``queue_ms`` is ``wall_ms - server_ms`` and ``rpc_ms``/``server_ms`` come from the server's answer:
    a server without weightwatch reports neither, so all three stay ``None`` rather than guessed.
    """

    server: str
    op: str
    ok: bool
    wall_ms: float
    queue_ms: float | None = None
    server_ms: float | None = None
    rpc_ms: float | None = None
    pool_wait_ms: float | None = None
    status: int | None = None
    reason: str | None = None
    error: str | None = None
    attempts: int = 1
    trace_id: str | None = None
    body: Any = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AdminUpdateError(RuntimeError):
    """Raised by ``UpdateResult.raise_for_failures`` when at least one server did not take the update."""

    def __init__(self, result: UpdateResult):
        self.result = result
        lines = [f"{r.server}: {r.reason}: {r.error}" for r in result.failed]
        super().__init__(f"{result.op} failed on {len(result.failed)} of {len(result.servers)} server(s): " + "; ".join(lines))


@dataclass
class UpdateResult:
    """One update (or reload) across all servers: the parent span's trace id and one result per server."""

    op: str
    step: int | None
    wall_ms: float
    trace_id: str | None
    servers: list[ServerResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.servers) and all(r.ok for r in self.servers)

    @property
    def failed(self) -> list[ServerResult]:
        return [r for r in self.servers if not r.ok]

    def raise_for_failures(self) -> UpdateResult:
        """Return self when every server succeeded, else raise AdminUpdateError naming each failure."""
        if not self.ok:
            raise AdminUpdateError(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "step": self.step,
            "wall_ms": self.wall_ms,
            "trace_id": self.trace_id,
            "ok": self.ok,
            "servers": [r.to_dict() for r in self.servers],
        }


def _budget(op: str) -> AdminTimeouts:
    seconds = PRIME_RL_BUDGETS_S[op]
    return AdminTimeouts(read=seconds, total=seconds)


@dataclass(frozen=True)
class SyncTimeouts:
    """The budget of each phase's call to one server (retries and backoff included).

    Defaults are prime-rl's: 300 s for pause and resume, 720 s for the update. The budget is what
    ``rl_admin_call_budget_seconds{op}`` shows and what the hung-call alert compares the call's age with.
    """

    pause: AdminTimeouts = field(default_factory=lambda: _budget("pause"))
    transfer: AdminTimeouts = field(default_factory=lambda: _budget("update_weights"))
    resume: AdminTimeouts = field(default_factory=lambda: _budget("resume"))

    def __post_init__(self) -> None:
        for phase in PHASES:
            if not isinstance(getattr(self, phase), AdminTimeouts):
                raise TypeError(f"SyncTimeouts.{phase} must be an AdminTimeouts, got {type(getattr(self, phase)).__name__}")

    def of(self, phase: str) -> AdminTimeouts:
        return getattr(self, phase)


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA run's transfer: ``POST /load_lora_adapter {"lora_name": name, "lora_path": path}`` instead of an update."""

    name: str
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"LoraAdapter.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"LoraAdapter.path must be a non-empty path, got {self.path!r}")


class AdminSyncError(RuntimeError):
    """Raised by ``SyncResult.raise_for_failures`` when a phase failed on at least one server."""

    def __init__(self, result: SyncResult):
        self.result = result
        lines = [f"{phase} on {r.server}: {r.reason}: {r.error}" for phase, rs in result.phases.items() for r in rs if not r.ok]
        if result.transfer_skipped:
            lines.append("transfer skipped on every server (a pause failed, so no server took new weights)")
        if result.reason and not lines:
            lines.append(result.reason)
        super().__init__(f"weight sync to step {result.step} failed: " + "; ".join(lines))


@dataclass
class SyncResult:
    """One weight sync (pause -> transfer -> resume) across all servers.

    ``phases``: the calls of each phase that ran (``transfer`` is absent when it was skipped after a
    failed pause). ``phase_ms``: each phase's slowest server. ``versions``: the step each server serves
    after the sync (None: not known to this client). ``reason``: why it failed (pause_failed,
    transfer_failed, resume_failed, cancelled, error), None when ok.
    """

    step: int
    wall_ms: float
    trace_id: str | None
    phases: dict[str, list[ServerResult]] = field(default_factory=dict)
    phase_ms: dict[str, float] = field(default_factory=dict)
    straggler_ms: dict[str, float] = field(default_factory=dict)
    versions: dict[str, int | None] = field(default_factory=dict)
    transfer_skipped: bool = False
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None and all(phase in self.phases for phase in PHASES) and all(
            r.ok for rs in self.phases.values() for r in rs
        )

    def raise_for_failures(self) -> SyncResult:
        """Return self when every phase succeeded on every server, else raise AdminSyncError naming each failure."""
        if not self.ok:
            raise AdminSyncError(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "ok": self.ok,
            "wall_ms": self.wall_ms,
            "trace_id": self.trace_id,
            "phase_ms": dict(self.phase_ms),
            "straggler_ms": dict(self.straggler_ms),
            "versions": dict(self.versions),
            "transfer_skipped": self.transfer_skipped,
            "reason": self.reason,
            "phases": {p: [r.to_dict() for r in rs] for p, rs in self.phases.items()},
        }
