"""weightwatch: observability for the weight-update path of asynchronous RL for LLMs."""

from weightwatch.telemetry import Telemetry, current_tid, current_trace_id, get, setup, shutdown

__all__ = ["Telemetry", "current_tid", "current_trace_id", "get", "setup", "shutdown", "__version__"]
__version__ = "0.1.0"
