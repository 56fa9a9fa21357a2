"""Plain data of the admin client: the timeouts a user sets and what an update returns.

Kept apart from the client so results can be built, compared and logged without touching the network.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FailureReason = Literal["timeout", "transport", "http_4xx", "http_5xx"]
FAILURE_REASONS: tuple[str, ...] = ("timeout", "transport", "http_4xx", "http_5xx")


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
