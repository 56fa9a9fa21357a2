"""vLLM endpoint plugin (entry point ``vllm.endpoint_plugins: weightwatch``, enabled with ``VLLM_PLUGINS=weightwatch``).

Loaded by vLLM's own OpenAI server (``vllm serve`` or ``weightwatch serve``), it adds:

* the first-byte middleware (``server.recv`` events, in-flight requests per lane), outermost;
* the admin routes of the weight sync (``/pause``, ``/resume``, ``/is_paused``, ``/update_weights`` in both shapes,
  ``/reload_weights``, ``/load_lora_adapter``, ``/liveness``; admin.py), replacing vLLM's dev-mode routes of the
  same paths, as the endpoint-plugin contract says, and needing no dev mode;
* OpenTelemetry's FastAPI instrumentation (health and metrics paths excluded) on weightwatch's tracer provider;
  generation requests get server spans when their caller sent a ``traceparent`` (WEIGHTWATCH_TRACE_GENERATION);
* weightwatch's metrics on vLLM's ``/metrics`` (the default Prometheus registry vLLM serves);
* the event-loop lag probe, and the admin lane listener when ``WEIGHTWATCH_ADMIN_PORT`` is set;
* with ``WEIGHTWATCH_ENGINE_NICE=N``, vLLM's engine processes at nice N (engine_priority.py).

Telemetry failures are logged, never raised: the server must come up even if, say, the span file
cannot be written.
"""

from __future__ import annotations

import asyncio
import logging
from argparse import Namespace
from typing import Any

from weightwatch.inference.config import ADMIN_PATHS, QUIET_PATHS, InferenceConfig

_log = logging.getLogger("weightwatch.inference")

#: Paths the OTel FastAPI instrumentation leaves alone: scrapes and health checks (noise), and the admin
#: paths, whose server span (``admin.request``) weightwatch makes itself with the first-byte start time.
OTEL_EXCLUDED = ",".join([*(f"{p}(\\?|$)" for p in sorted(QUIET_PATHS | ADMIN_PATHS)), "/weightwatch/"])


class WeightwatchPlugin:
    """The object vLLM's endpoint-plugin loader instantiates (see vllm/plugins/endpoint_plugins/interface.py)."""

    name = "weightwatch"
    required_tasks = None

    def __init__(self) -> None:
        self.config: InferenceConfig | None = None
        self.service: Any = None
        self.engine_calls: Any = None
        self.lane: Any = None
        self.lane_port: int | None = None
        self._lag_task: asyncio.Task[Any] | None = None

    # Phase A: while vLLM builds the app, before serving.
    def attach_router(self, app: Any) -> None:
        import prometheus_client

        import weightwatch
        from weightwatch.inference.admin import AdminService, build_router
        from weightwatch.inference.metrics_endpoint import build_metrics_router
        from weightwatch.inference.middleware import wrap_outermost

        self.config = InferenceConfig.from_env()  # a ConfigError stops startup: a bad token file must not disable auth
        weightwatch.setup(
            service_name=None,
            role="inference",
            registry=prometheus_client.REGISTRY,  # vLLM serves this registry on /metrics (single API process)
            metrics_port=None,
            span_file=self.config.span_file,
            log_file=self.config.log_file,
        )
        model_path = getattr(getattr(app.state, "args", None), "model", None)
        self.service = AdminService(self.config, model_path)
        app.include_router(build_router(self.service, lambda: self.engine_calls))
        app.include_router(build_metrics_router())
        self._instrument(app)
        wrap_outermost(
            app,
            admin_paths=ADMIN_PATHS | {"/weightwatch/ping", "/weightwatch/engine_ping"},
            quiet_paths=QUIET_PATHS,
            trace_generation=self.config.trace_generation,
        )
        if self.config.weights_root is None:
            _log.warning("weightwatch: WEIGHTWATCH_WEIGHTS_ROOT is not set; /update_weights accepts any directory with safetensors")
        if self.config.admin_token is None:
            _log.warning("weightwatch: no admin token configured; admin endpoints are open to anyone who can reach the port")

    def _instrument(self, app: Any) -> None:
        try:
            from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

            import weightwatch

            FastAPIInstrumentor.instrument_app(
                app,
                tracer_provider=weightwatch.get().tracer_provider,
                excluded_urls=",".join(p for p in (OTEL_EXCLUDED, self.config.trace_exclude if self.config else "") if p),
                # Per-chunk send/receive spans would cost thousands of spans a second on streamed completions.
                exclude_spans=["receive", "send"],
            )
        except Exception:  # noqa: BLE001
            _log.warning("weightwatch: OpenTelemetry FastAPI instrumentation unavailable; admin spans still work", exc_info=True)

    # Phase B: on the server's running loop, with the engine client.
    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        from weightwatch import telemetry
        from weightwatch.inference.vllm_engine import main_calls

        if self.service is None:  # attach_router was not called (e.g. run_batch builds its own state)
            return
        if getattr(args, "model", None):
            self.service.model_path = args.model
            self.service.last_good = self.service.last_good or args.model
        if engine_client is None:
            _log.warning("weightwatch: no engine client (render-only server); admin endpoints answer 503")
            return

        self.engine_calls = main_calls(engine_client, state)
        try:
            self._lag_task = telemetry.start_loop_lag_probe("rl_event_loop_lag_seconds")
        except Exception:  # noqa: BLE001
            _log.warning("weightwatch: cannot start the event-loop lag probe", exc_info=True)
        state.weightwatch = self
        assert self.config is not None
        if self.config.engine_nice > 0:
            try:
                from weightwatch.inference.engine_priority import lower_engine_priority

                lower_engine_priority(self.config.engine_nice)
            except Exception:  # noqa: BLE001 - a scheduling nicety, never a reason to stop serving
                _log.warning("weightwatch: cannot lower the engine processes' priority", exc_info=True)
        if self.config.admin_port is not None:
            self._start_lane(engine_client, state)

    def _start_lane(self, engine_client: Any, state: Any) -> None:
        from weightwatch.inference.lane import AdminLane, build_lane_app, engine_calls_on

        assert self.config is not None and self.config.admin_port is not None
        loop = asyncio.get_running_loop()
        app = build_lane_app(self.service, engine_calls_on(loop, engine_client, direct=self.config.lane_dispatch == "direct", state=state))
        self.lane = AdminLane(app, self.config.admin_host, self.config.admin_port)
        # A lane that cannot bind is a startup error: the operator asked for it and would otherwise
        # silently fall back to the congested main port.
        self.lane_port = self.lane.start()
        _log.info("weightwatch: admin lane listening on http://%s:%d", self.config.admin_host, self.lane_port)


def plugin() -> WeightwatchPlugin:
    """Zero-argument factory named by the ``vllm.endpoint_plugins`` entry point."""
    return WeightwatchPlugin()
