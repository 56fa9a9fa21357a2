"""Event-loop lag of the orchestrator's own asyncio loop.

A loop busy parsing thousands of streamed tokens wakes admin calls late too: that delay shows up as
``queue_ms`` although no server is at fault. This probe makes it visible on its own histogram.
"""

from __future__ import annotations

import asyncio

from weightwatch import telemetry

METRIC = "rl_orchestrator_event_loop_lag_seconds"


def start_loop_lag_probe(interval: float = telemetry.LAG_PROBE_INTERVAL_S) -> asyncio.Task[None]:
    """Start the probe on the running loop (call from async code); cancel the returned task to stop it."""
    if not (0 < interval < 60):
        raise ValueError(f"interval must be between 0 and 60 s, got {interval!r}")
    return telemetry.start_loop_lag_probe(METRIC, interval)
