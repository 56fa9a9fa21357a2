"""weightwatch: observability for the weight-update path of asynchronous RL for LLMs."""

from __future__ import annotations

from typing import Any

__all__ = ["Telemetry", "current_tid", "current_trace_id", "get", "setup", "shutdown", "__version__"]
__version__ = "0.1.0"

_TELEMETRY = frozenset({"Telemetry", "current_tid", "current_trace_id", "get", "setup", "shutdown"})


def __getattr__(name: str) -> Any:
    # Lazy: the log grammar (weightwatch.events) and the analyzer must import without the OpenTelemetry SDK.
    if name in _TELEMETRY:
        from weightwatch import telemetry

        return getattr(telemetry, name)
    raise AttributeError(f"module 'weightwatch' has no attribute {name!r}")
