"""Orchestrator side of weightwatch: drop into an existing asyncio orchestrator without rewriting it.

* ``AdminClient.sync_weights``: the sync of today (pause -> transfer -> resume on every server), traced
  as one trace with a span per phase, measured per phase and server, resume guaranteed.
* ``AdminClient``: weight updates to many inference servers in parallel on a dedicated HTTP client
  (or, on purpose, through the generation pool), traced end to end and split into queue/rpc/pool wait.
* ``AdminHTTPXInstrumentor``: the same per-call and per-sync telemetry on httpx clients you did not write.
* ``wait_for_checkpoint``: the wait for the trainer's STABLE marker, timed, with a wrong-path warning.
* ``GenerationTracker`` / ``record_rollout``: batch timing, in-flight requests, truncation and staleness.
* ``start_loop_lag_probe``: lag of the orchestrator's own event loop.
"""

from weightwatch.orchestrator.admin_client import AdminClient
from weightwatch.orchestrator.admin_types import (
    AdminSyncError,
    AdminTimeouts,
    AdminUpdateError,
    LoraAdapter,
    ServerResult,
    SyncResult,
    SyncTimeouts,
    UpdateResult,
)
from weightwatch.orchestrator.checkpoint_wait import CheckpointWaitTimeout, wait_for_checkpoint, wait_for_checkpoint_sync
from weightwatch.orchestrator.generation import Batch, GenerationTracker, RolloutStats, record_rollout
from weightwatch.orchestrator.httpx_instrumentor import AdminHTTPXInstrumentor
from weightwatch.orchestrator.loop_lag import start_loop_lag_probe

__all__ = [
    "AdminClient",
    "AdminHTTPXInstrumentor",
    "AdminSyncError",
    "AdminTimeouts",
    "AdminUpdateError",
    "Batch",
    "CheckpointWaitTimeout",
    "GenerationTracker",
    "LoraAdapter",
    "RolloutStats",
    "ServerResult",
    "SyncResult",
    "SyncTimeouts",
    "UpdateResult",
    "record_rollout",
    "start_loop_lag_probe",
    "wait_for_checkpoint",
    "wait_for_checkpoint_sync",
]
