"""The admin endpoints: ``POST /update_weights {"weight_dir"}`` and ``POST /reload_weights``.

These are the request shapes prime-rl's orchestrator sends. Each answer carries ``rpc_ms`` (the
engine call) and ``server_ms`` (first byte to answer) in the body and a ``Server-Timing`` header, so
the client can split its wall time into queue and server time.

The engine is reached through one injected coroutine function (``EngineCalls``), so the same
handlers serve vLLM's main listener and the separate admin-lane listener, whose loop runs in
another thread and must hop to the main loop for the engine's sockets.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from weightwatch import events, telemetry
from weightwatch.contracts import OP_BY_PATH, TIMING_RPC, TIMING_SERVER
from weightwatch.inference.checkpoint import CheckpointError, TensorInfo, check_compatible, describe
from weightwatch.inference.config import RELOAD_PATH, UPDATE_PATH, InferenceConfig
from weightwatch.inference.middleware import SCOPE_LANE, SCOPE_RECV_PERF, SCOPE_RECV_WALL, SCOPE_TRACE_ID

PING_PATH = "/weightwatch/ping"
ENGINE_PING_PATH = "/weightwatch/engine_ping"



class AdminError(Exception):
    """A request the admin API refuses, with the HTTP status and the reason given to the client."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


@dataclass
class EngineCalls:
    """How the handlers reach the engine (all coroutines on the caller's loop)."""

    collective_rpc: Callable[[str, dict[str, Any]], Awaitable[Any]]
    #: A cheap utility round trip through the engine (for the lane research endpoint).
    ping: Callable[[str | None], Awaitable[Any]] | None = None


#: Largest admin request body read (a weight update's JSON is well under 1 KiB); larger ones get 413 unread,
#: so a hostile or broken client cannot make the listener buffer and parse megabytes on its event loop.
MAX_ADMIN_BODY_BYTES = 64 * 1024
#: Longest piece of a client's value echoed back in an error message.
MAX_ECHO_CHARS = 200


def _shown(raw: str) -> str:
    """The client's value for an error message, cut: a 64 KiB path is not echoed back whole."""
    return repr(raw) if len(raw) <= MAX_ECHO_CHARS else f"{raw[:MAX_ECHO_CHARS]!r}... ({len(raw)} characters)"


def validate_weight_dir(raw: Any, root: Path | None) -> Path:
    """The resolved weight directory, or AdminError(400) saying what is wrong with it."""
    if not isinstance(raw, str) or not raw.strip():
        raise AdminError(400, 'body must be a JSON object with a non-empty string "weight_dir"')
    if "\x00" in raw:
        raise AdminError(400, "weight_dir contains a NUL byte")
    try:
        path = Path(raw).expanduser().resolve(strict=True)
    except (OSError, RuntimeError):
        raise AdminError(400, f"weight_dir {_shown(raw)} does not exist") from None
    if root is not None and not path.is_relative_to(root):
        raise AdminError(400, f"weight_dir {_shown(raw)} resolves to {_shown(str(path))}, outside the weights root {root}")
    if not path.is_dir():
        raise AdminError(400, f"weight_dir {_shown(raw)} is not a directory")
    try:
        has_weights = any(p.is_file() for p in path.glob("*.safetensors"))
    except OSError as exc:
        raise AdminError(400, f"weight_dir {_shown(raw)} cannot be read: {exc}") from None
    if not has_weights:
        raise AdminError(400, f"weight_dir {_shown(raw)} holds no *.safetensors files")
    return path


def check_token(request: Request, token: str | None) -> None:
    """401 unless the request carries ``Authorization: Bearer <token>`` (when a token is configured)."""
    if token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise AdminError(401, "missing admin token (Authorization: Bearer ...)", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise AdminError(401, "wrong admin token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})


async def _read_body(request: Request) -> bytes:
    """The body, or AdminError(413) once it is longer than MAX_ADMIN_BODY_BYTES (declared or actually sent)."""
    declared = request.headers.get("content-length", "")
    if declared.strip().isdigit() and int(declared) > MAX_ADMIN_BODY_BYTES:
        raise AdminError(413, f"body of {int(declared)} bytes is over the admin limit of {MAX_ADMIN_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_ADMIN_BODY_BYTES:
            raise AdminError(413, f"body is over the admin limit of {MAX_ADMIN_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_json_object(request: Request, *, required: bool) -> dict[str, Any]:
    body = await _read_body(request)
    if not body.strip():
        if required:
            raise AdminError(400, 'missing JSON body {"weight_dir": ...}')
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdminError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdminError(400, f"body must be a JSON object, got {type(data).__name__}")
    return data


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class _EngineFailure(Exception):
    def __init__(self, cause: BaseException, restored: str | None):
        super().__init__(str(cause))
        self.cause, self.restored = cause, restored


class AdminService:
    """Validation, mutual exclusion, timing and telemetry of weight updates; shared by both listeners."""

    def __init__(self, config: InferenceConfig, model_path: str | None):
        self.config = config
        self.model_path = model_path
        # A threading lock, not an asyncio one: the main listener and the admin lane run different loops.
        self._busy = threading.Lock()
        #: The weights the engine last loaded completely; restored after a failed load.
        self.last_good: str | None = model_path
        self._expected: dict[str, TensorInfo] | None = None
        self._expected_from: str | None = None

    @property
    def _tracer(self) -> trace.Tracer:
        return telemetry.get().tracer("weightwatch.inference")

    def expected_tensors(self) -> dict[str, TensorInfo] | None:
        """Tensor names and shapes of the served model's own checkpoint (None when it is not a local directory)."""
        if self.model_path and self._expected_from != self.model_path:
            self._expected_from = self.model_path
            try:
                self._expected = describe(Path(self.model_path))
            except (CheckpointError, OSError):
                self._expected = None
        return self._expected

    # ------------------------------------------------------------------ helpers

    def _check_checkpoint(self, path: Path) -> None:
        try:
            check_compatible(describe(path), self.expected_tensors())
        except CheckpointError as exc:
            raise AdminError(400, f"weight_dir {str(path)!r} does not fit the served model: {exc}") from None

    async def _target(self, op: str, body: dict[str, Any]) -> str:
        if op == "update_weights":
            if "weight_dir" not in body and "update_info" in body:
                raise AdminError(
                    400,
                    "this /update_weights is weightwatch's (prime-rl shape {\"weight_dir\": ...}); vLLM's dev-mode "
                    "update_info route is replaced while the weightwatch endpoint plugin is loaded",
                )
            path = validate_weight_dir(body.get("weight_dir"), self.config.weights_root)
            # Header reads are small, but the filesystem may be a slow network mount: keep them off the loop.
            await asyncio.to_thread(self._check_checkpoint, path)
            return str(path)
        if not self.model_path:
            raise AdminError(500, "the server does not know its model path; cannot reload")
        return self.model_path

    async def _engine_call(self, engine: EngineCalls, op: str, weights_path: str, tid: str) -> float:
        """Run the reload inside the ``engine.rpc`` span; returns rpc seconds. Raises on engine failure."""
        metrics = telemetry.get().metrics
        with self._tracer.start_as_current_span("engine.rpc", kind=SpanKind.INTERNAL) as span:
            span.set_attribute("rl.op", op)
            span.set_attribute("rl.weights_path", weights_path)
            t0_wall = time.time()
            t0 = time.perf_counter()
            events.emit("weights.rpc.start", tid, op=op, t=t0_wall)
            ok = False
            try:
                if self.config.inject_rpc_delay_ms > 0:
                    await asyncio.sleep(self.config.inject_rpc_delay_ms / 1000.0)
                await engine.collective_rpc("reload_weights", {"weights_path": weights_path})
                ok = True
            finally:
                rpc_s = time.perf_counter() - t0
                span.set_attribute("rl.rpc_ms", _ms(rpc_s))
                metrics.observe("rl_admin_rpc_seconds", rpc_s, op=op)
                events.emit("weights.rpc.done", tid, op=op, t=time.time(), rpc_ms=rpc_s * 1000.0, ok=int(ok))
        return rpc_s

    # ------------------------------------------------------------------ the handler

    async def handle(self, request: Request, engine: EngineCalls | None) -> JSONResponse:
        scope = request.scope
        op = OP_BY_PATH.get(scope.get("path", ""), "reload_weights")
        recv_perf = scope.get(SCOPE_RECV_PERF) or time.perf_counter()
        recv_wall = scope.get(SCOPE_RECV_WALL) or time.time()
        parent = propagate.extract(dict(request.headers))
        with self._tracer.start_as_current_span(
            "admin.request",
            context=parent,
            kind=SpanKind.SERVER,
            start_time=int(recv_wall * 1e9),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            span.set_attribute("rl.op", op)
            span.set_attribute("rl.lane", str(scope.get(SCOPE_LANE, "admin")))
            span.set_attribute("http.route", scope.get("path", ""))
            tid = telemetry.current_tid()
            if scope.get(SCOPE_TRACE_ID) is None:
                # No traceparent: the middleware could not name the trace; this span starts it.
                events.emit("weights.server.recv", tid, path=scope.get("path", ""), t=recv_wall, lane=scope.get(SCOPE_LANE, "admin"))
            span.set_attribute("rl.handler_delay_ms", _ms(time.perf_counter() - recv_perf))
            status, headers = 200, {}
            payload: dict[str, Any] = {}
            try:
                check_token(request, self.config.admin_token)
                body = await _read_json_object(request, required=(op == "update_weights"))
                target = await self._target(op, body)
                if engine is None:
                    raise AdminError(503, "no engine attached to this server")
                if not self._busy.acquire(blocking=False):
                    raise AdminError(409, "another weight update is running on this server; retry when it finishes")
                try:
                    try:
                        rpc_s = await self._engine_call(engine, op, target, tid)
                    except Exception as exc:
                        raise _EngineFailure(exc, await self._recover(engine, target)) from exc
                    self.last_good = target
                finally:
                    self._busy.release()
                payload = {"status": "ok", "op": op, "weights_path": target, "rpc_ms": _ms(rpc_s)}
            except AdminError as exc:
                status, headers = exc.status, exc.headers
                payload = {"status": "error", "op": op, "error": exc.reason}
            except _EngineFailure as failure:
                cause = failure.cause
                dead = type(cause).__name__ == "EngineDeadError" or failure.restored is None
                status = 503 if dead else 500
                payload = {
                    "status": "error",
                    "op": op,
                    "error": f"engine reload_weights failed: {type(cause).__name__}: {cause}",
                    "restored_weights": failure.restored,
                }
                span.record_exception(cause)
            except Exception as bug:  # noqa: BLE001 - a bug here must answer, not kill the connection
                status = 500
                payload = {"status": "error", "op": op, "error": f"{type(bug).__name__}: {bug}"}
                span.record_exception(bug)
            server_s = time.perf_counter() - recv_perf
            server_ms = _ms(server_s)
            payload["server_ms"] = server_ms
            span.set_attribute("rl.server_ms", server_ms)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR, str(payload.get("error", ""))[:200]))
            telemetry.get().metrics.observe("rl_admin_server_seconds", server_s, op=op)
            timing = [f"{TIMING_SERVER};dur={payload['server_ms']}"]
            if "rpc_ms" in payload:
                timing.insert(0, f"{TIMING_RPC};dur={payload['rpc_ms']}")
            headers = {**headers, "Server-Timing": ", ".join(timing)}
            return JSONResponse(payload, status_code=status, headers=headers)

    async def _recover(self, engine: EngineCalls, failed: str) -> str | None:
        """After a failed load, reload the last complete weights so the engine keeps serving.

        vLLM's in-place reload leaves layers on the meta device when it fails half-way; loading a good
        checkpoint again materializes them. Returns the restored path, or None if that failed too.
        """
        # The last good checkpoint may have been rotated away by the trainer; the model's own weights remain.
        for target in dict.fromkeys(p for p in (self.last_good, self.model_path) if p):
            with self._tracer.start_as_current_span("engine.rpc.restore", kind=SpanKind.INTERNAL) as span:
                span.set_attribute("rl.weights_path", target)
                span.set_attribute("rl.failed_weights_path", failed)
                try:
                    await engine.collective_rpc("reload_weights", {"weights_path": target})
                    self.last_good = target
                    return target
                except Exception as exc:  # noqa: BLE001
                    span.record_exception(exc)
        return None

    async def ping(self, request: Request) -> JSONResponse:
        """No engine work: how long the listener alone takes to answer (lane research)."""
        recv_perf = request.scope.get(SCOPE_RECV_PERF) or time.perf_counter()
        handler_ms = _ms(time.perf_counter() - recv_perf)
        return JSONResponse({"handler_delay_ms": handler_ms, "lane": request.scope.get(SCOPE_LANE)})

    async def engine_ping(self, request: Request, engine: EngineCalls | None) -> JSONResponse:
        """A cheap utility round trip to the engine, no reload (lane research)."""
        try:
            check_token(request, self.config.admin_token)
        except AdminError as exc:
            return JSONResponse({"error": exc.reason}, status_code=exc.status, headers=exc.headers)
        if engine is None or engine.ping is None:
            return JSONResponse({"error": "no engine"}, status_code=503)
        recv_perf = request.scope.get(SCOPE_RECV_PERF) or time.perf_counter()
        handler_ms = _ms(time.perf_counter() - recv_perf)
        mode = request.query_params.get("mode")
        if mode not in (None, "direct", "coroutine"):
            return JSONResponse({"error": "mode must be direct or coroutine"}, status_code=400)
        t0 = time.perf_counter()
        await engine.ping(mode)
        return JSONResponse({"handler_delay_ms": handler_ms, "engine_ms": _ms(time.perf_counter() - t0)})


def build_router(service: AdminService, engine: Callable[[], EngineCalls | None]) -> APIRouter:
    """FastAPI routes (APIRoute, so vLLM's endpoint-plugin override replaces same-path core routes)."""
    router = APIRouter()

    @router.post(UPDATE_PATH, include_in_schema=True, summary="Load new weights from a directory of safetensors (prime-rl shape)")
    async def update_weights(request: Request) -> JSONResponse:
        return await service.handle(request, engine())

    @router.post(RELOAD_PATH, include_in_schema=True, summary="Reload the model's own weights (prime-rl shape)")
    async def reload_weights(request: Request) -> JSONResponse:
        return await service.handle(request, engine())

    @router.get(PING_PATH, include_in_schema=False)
    async def ping(request: Request) -> JSONResponse:
        return await service.ping(request)

    @router.post(ENGINE_PING_PATH, include_in_schema=False)
    async def engine_ping(request: Request) -> JSONResponse:
        return await service.engine_ping(request, engine())

    return router
