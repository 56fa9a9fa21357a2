"""vLLM's OpenAI server with weightwatch loaded and a benchmark-only A/B switch on top of the request path.

    python -m benchmarks.ab_api_server --model DIR [vLLM args...]   # environment as ``weightwatch serve`` sets it

Used by bench_inference_ab.py to price weightwatch's request path inside one server, so the comparison does not
carry the difference between two servers (which on a small shared host is larger than what is being measured).
``ABSwitch`` sits above weightwatch's first-byte middleware and sends each new request, by the current mode, either
through weightwatch's stack or straight to the stack OpenTelemetry wraps (vLLM's own middleware and router); it can
add a ``traceparent`` (every request traced, as when the caller's client is instrumented) and burn a known amount
of CPU per streamed message on the event loop (to measure what a microsecond of API-server CPU per token costs in
tokens/s). ``GET/POST /_ab/mode`` reads and sets the mode. None of this is in the package: it exists for the
benchmark only.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from benchmarks import bench_inference_load

CONTROL_PATH = "/_ab/mode"
PATHS = ("weightwatch", "vllm")
#: The load generator's --traceparent header (bench_inference_load.py, beside this file).
TRACEPARENT = bench_inference_load.TRACEPARENT.encode()

Send = Callable[[dict[str, Any]], Awaitable[None]]


def calibrate_burn(repeats: int = 7, iterations: int = 200_000) -> float:
    """Iterations of the burn loop per microsecond of this thread's CPU (best of ``repeats``)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(iterations):
            pass
        best = min(best, time.thread_time() - t0)
    return iterations / (best * 1e6)


class ABSwitch:
    """Outermost ASGI layer: picks the request path per request by the current mode (see module docstring)."""

    def __init__(self, weightwatch_stack: Any, vllm_stack: Any, iterations_per_us: float | None = None) -> None:
        self.weightwatch = weightwatch_stack
        self.vllm = vllm_stack
        self.iterations_per_us = iterations_per_us if iterations_per_us is not None else calibrate_burn()
        self.path = "weightwatch"
        self.traced = False
        self.burn_us = 0.0
        self._burn_iterations = 0
        #: Bumped on every mode change; requests are counted in flight under the generation they started in,
        #: so the benchmark can wait until none from an older mode is left.
        self.generation = 0
        self.inflight: Counter[int] = Counter()

    def state(self) -> dict[str, Any]:
        stale = sum(n for gen, n in self.inflight.items() if gen != self.generation)
        return {
            "path": self.path,
            "traced": self.traced,
            "burn_us": self.burn_us,
            "generation": self.generation,
            "inflight": sum(self.inflight.values()),
            "stale_inflight": stale,
            "iterations_per_us": self.iterations_per_us,
        }

    def set_mode(self, path: str | None = None, traced: bool | None = None, burn_us: float | None = None) -> None:
        if path is not None:
            if path not in PATHS:
                raise ValueError(f"path must be one of {PATHS}, got {path!r}")
            self.path = path
        if traced is not None:
            self.traced = traced
        if burn_us is not None:
            if burn_us < 0:
                raise ValueError("burn_us must be >= 0")
            self.burn_us = burn_us
            self._burn_iterations = round(burn_us * self.iterations_per_us)
        self.generation += 1

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope.get("type") != "http":
            await self.weightwatch(scope, receive, send)
            return
        if scope.get("path") == CONTROL_PATH:
            await self._control(scope, receive, send)
            return
        generation = self.generation
        self.inflight[generation] += 1
        try:
            if self.traced:
                scope["headers"] = [*scope.get("headers", ()), (b"traceparent", TRACEPARENT)]
            if self._burn_iterations:
                send = self._burning(send)
            await (self.vllm if self.path == "vllm" else self.weightwatch)(scope, receive, send)
        finally:
            self.inflight[generation] -= 1
            if not self.inflight[generation]:
                del self.inflight[generation]

    def _burning(self, send: Send) -> Send:
        def burn_then_send(message: dict[str, Any]) -> Awaitable[None]:
            for _ in range(self._burn_iterations):  # read per message: a new dose applies at once
                pass
            return send(message)

        return burn_then_send

    async def _control(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        status = 200
        if scope.get("method") == "POST":
            q = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
            try:
                self.set_mode(
                    path=q.get("path"),
                    traced=None if "traced" not in q else q["traced"] in ("1", "true"),
                    burn_us=float(q["burn_us"]) if "burn_us" in q else None,
                )
                body = self.state()
            except ValueError as exc:
                status, body = 400, {"error": str(exc)}
        else:
            body = self.state()
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})


def vllm_stack_of(weightwatch_stack: Any) -> Any:
    """The stack OpenTelemetry wraps under weightwatch's first-byte middleware and fast path: vLLM's own."""
    from weightwatch.inference.middleware import FirstByteMiddleware
    from weightwatch.inference.otel_stream_fastpath import OtelStreamFastPath

    if not isinstance(weightwatch_stack, FirstByteMiddleware) or not isinstance(weightwatch_stack.app, OtelStreamFastPath):
        raise RuntimeError(f"unexpected weightwatch stack {weightwatch_stack!r}: cannot find vLLM's own stack below it")
    return weightwatch_stack.app.inner


def install() -> None:
    """Make the plugin's ``wrap_outermost`` put ``ABSwitch`` above weightwatch's stack."""
    from weightwatch.inference import middleware

    original = middleware.wrap_outermost

    def wrap_outermost(app: Any, **kwargs: Any) -> None:
        original(app, **kwargs)
        build_weightwatch = app.build_middleware_stack

        def build_middleware_stack() -> Any:
            stack = build_weightwatch()
            return ABSwitch(stack, vllm_stack_of(stack))

        app.build_middleware_stack = build_middleware_stack

    middleware.wrap_outermost = wrap_outermost


if __name__ == "__main__":
    install()
    from vllm.entrypoints.launchers.api_server.entry import main

    main()
