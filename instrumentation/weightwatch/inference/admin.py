"""The admin endpoints of the weight sync of today (ARCHITECTURE.md): pause, transfer, resume.

``POST /pause``, ``POST /resume``, ``GET /is_paused``, ``POST /update_weights`` (``{"weight_dir"}``, prime-rl's
shape, or ``{"update_info"}``, vLLM's own), ``POST /reload_weights``, ``POST /load_lora_adapter`` and
``GET /liveness``: the request shapes prime-rl's orchestrator sends. Each answer carries ``server_ms`` (first
byte to answer) and, when the engine was called, ``rpc_ms``, in the body and a ``Server-Timing`` header, so
the client can split its wall time into queue and server time.

The engine is reached through injected coroutine functions (``EngineCalls``), so the same handlers serve
vLLM's main listener and the separate admin-lane listener, whose loop runs in another thread and must hop
to the main loop for the engine's sockets.
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
from weightwatch.contracts import (
    DEFAULT_PAUSE_MODE,
    IS_PAUSED_PATH,
    LIVENESS_PATH,
    LOAD_LORA_PATH,
    OP_BY_PATH,
    PAUSE_MODES,
    PAUSE_PATH,
    RESUME_PATH,
    SERVER_TIMING_HEADER,
    TIMING_RPC,
    TIMING_SERVER,
)
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
    """How the handlers reach the engine: coroutine functions awaited on the handler's own loop.

    ``vllm_engine.main_calls`` builds them for vLLM's main loop, ``lane.engine_calls_on`` for the lane's loop
    (each call hops to the main loop there). A missing call answers 503 on its route.
    """

    #: ``collective_rpc(method, kwargs, args)`` on every worker.
    collective_rpc: Callable[..., Awaitable[Any]]
    #: A cheap utility round trip through the EngineCore (liveness, and the lane research endpoint).
    ping: Callable[[str | None], Awaitable[Any]] | None = None
    #: ``pause(mode, clear_cache)``: returns once the pause took effect (vLLM's ``pause_generation``).
    pause: Callable[[str, bool], Awaitable[Any]] | None = None
    resume: Callable[[], Awaitable[Any]] | None = None
    is_paused: Callable[[], Awaitable[bool]] | None = None
    #: vLLM's own ``update_weights(update_info)`` of its weight-transfer engine.
    update_info: Callable[[Any], Awaitable[Any]] | None = None
    #: ``load_lora(fields)`` -> (http status, answer text) from vLLM's own LoRA loader.
    load_lora: Callable[[dict[str, Any]], Awaitable[tuple[int, str]]] | None = None
    #: Whether the engine was started with LoRA support (``--enable-lora``).
    lora_enabled: Callable[[], bool] | None = None
    #: Generation requests the front end holds right now (vLLM's unfinished requests: running and waiting).
    inflight: Callable[[], int | None] | None = None


def validate_weight_dir(raw: Any, root: Path | None) -> Path:
    """The resolved weight directory, or AdminError(400) saying what is wrong with it."""
    if not isinstance(raw, str) or not raw.strip():
        raise AdminError(400, 'body must be a JSON object with a non-empty string "weight_dir"')
    if "\x00" in raw:
        raise AdminError(400, "weight_dir contains a NUL byte")
    try:
        path = Path(raw).expanduser().resolve(strict=True)
    except (OSError, RuntimeError):
        raise AdminError(400, f"weight_dir {raw!r} does not exist") from None
    if root is not None and not path.is_relative_to(root):
        raise AdminError(400, f"weight_dir {raw!r} resolves to {path}, outside the weights root {root}")
    if not path.is_dir():
        raise AdminError(400, f"weight_dir {raw!r} is not a directory")
    try:
        has_weights = any(p.is_file() for p in path.glob("*.safetensors"))
    except OSError as exc:
        raise AdminError(400, f"weight_dir {raw!r} cannot be read: {exc}") from None
    if not has_weights:
        raise AdminError(400, f"weight_dir {raw!r} holds no *.safetensors files")
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


async def _read_json_object(request: Request, *, required: bool) -> dict[str, Any]:
    body = await request.body()
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


def _count(counter: Callable[[], int | None] | None) -> int | None:
    if counter is None:
        return None
    try:
        value = counter()
        return None if value is None else int(value)
    except Exception:  # noqa: BLE001 - a count for telemetry, never a reason to fail the pause
        return None


class InjectedFailure(RuntimeError):
    """The engine failure WEIGHTWATCH_INJECT_FAIL asks for (the engine itself was not called)."""


class _EngineFailure(Exception):
    """An engine call failed; ``what`` names the call, ``extra`` goes into the answer."""

    def __init__(self, cause: BaseException, what: str, extra: dict[str, Any] | None = None):
        super().__init__(str(cause))
        self.cause, self.what, self.extra = cause, what, extra or {}

    @property
    def dead(self) -> bool:
        return type(self.cause).__name__ == "EngineDeadError"


class _Call:
    """One admin request in flight: its op, trace id, span and the engine time spent so far."""

    __slots__ = ("op", "tid", "span", "rpc_s")

    def __init__(self, op: str, tid: str, span: trace.Span):
        self.op, self.tid, self.span = op, tid, span
        self.rpc_s: float | None = None


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise AdminError(400, f"{name} must be true or false, got {value!r}")


def pause_arguments(query: dict[str, str], body: dict[str, Any]) -> tuple[str, bool]:
    """(mode, clear_cache) of a ``/pause`` from its query string or JSON body (query wins); AdminError(400) if bad.

    Defaults are prime-rl's: ``mode=keep``, ``clear_cache=false`` (vLLM's own dev route defaults to abort/true).
    """
    mode = query.get("mode", body.get("mode", DEFAULT_PAUSE_MODE))
    if mode not in PAUSE_MODES:
        raise AdminError(400, f"mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}")
    return mode, _as_bool(query.get("clear_cache", body.get("clear_cache", False)), "clear_cache")


def update_info_of(body: dict[str, Any]) -> Any:
    """vLLM's ``update_info`` payload (an object, or a list of objects one per worker rank); AdminError(400) if bad."""
    if "weight_dir" in body:
        raise AdminError(400, 'give either "weight_dir" (a checkpoint directory) or "update_info" (vLLM\'s weight transfer), not both')
    info = body["update_info"]
    if isinstance(info, dict) or (isinstance(info, list) and info and all(isinstance(x, dict) for x in info)):
        return info
    raise AdminError(400, f'"update_info" must be a JSON object or a non-empty list of objects, got {type(info).__name__}')


def lora_fields(body: dict[str, Any], root: Path | None) -> dict[str, Any]:
    """vLLM's LoadLoRAAdapterRequest fields with ``load_inplace`` forced on (as prime-rl does); AdminError(400) if bad.

    With a weights root configured, the adapter directory must resolve inside it, like ``weight_dir``.
    """
    for key in ("lora_name", "lora_path"):
        if not isinstance(body.get(key), str) or not body[key].strip():
            raise AdminError(400, f'body must be a JSON object with non-empty strings "lora_name" and "lora_path" (missing {key!r})')
    unknown = set(body) - {"lora_name", "lora_path", "load_inplace", "is_3d_lora_weight"}
    if unknown:
        raise AdminError(
            400, f"unknown fields {sorted(unknown)}; vLLM's load_lora_adapter takes lora_name, lora_path, load_inplace, is_3d_lora_weight"
        )
    path = body["lora_path"]
    if root is not None:
        try:
            resolved = Path(path).expanduser().resolve(strict=True)
        except (OSError, RuntimeError):
            raise AdminError(400, f"lora_path {path!r} does not exist") from None
        if not resolved.is_relative_to(root):
            raise AdminError(400, f"lora_path {path!r} resolves to {resolved}, outside the weights root {root}")
        path = str(resolved)
    return {
        "lora_name": body["lora_name"],
        "lora_path": path,
        "load_inplace": True,
        "is_3d_lora_weight": _as_bool(body.get("is_3d_lora_weight", False), "is_3d_lora_weight"),
    }


class AdminService:
    """Validation, mutual exclusion, pause state, timing and telemetry of the admin ops; shared by both listeners."""

    def __init__(self, config: InferenceConfig, model_path: str | None):
        self.config = config
        self.model_path = model_path
        # Threading locks, not asyncio ones: the main listener and the admin lane run different loops.
        self._busy = threading.Lock()
        self._state = threading.Lock()
        #: perf_counter() when the current pause took effect (None: not paused by us).
        self.paused_at: float | None = None
        #: The weights the engine last loaded completely; restored after a failed load.
        self.last_good: str | None = model_path
        self._expected: dict[str, TensorInfo] | None = None
        self._expected_from: str | None = None
        telemetry.get().metrics.set("rl_engine_paused", 0)  # a scrape shows 0 from the start, not nothing

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

    async def _weight_dir(self, body: dict[str, Any]) -> str:
        path = validate_weight_dir(body.get("weight_dir"), self.config.weights_root)
        # Header reads are small, but the filesystem may be a slow network mount: keep them off the loop.
        await asyncio.to_thread(self._check_checkpoint, path)
        return str(path)

    @staticmethod
    def _need(call: Any, what: str) -> Any:
        if call is None:
            raise AdminError(503, f"this server's engine client offers no {what}")
        return call

    async def _rpc(self, call: _Call, what: str, factory: Callable[[], Awaitable[Any]]) -> Any:
        """One engine call inside the ``engine.rpc`` span, timed into ``rl_admin_rpc_seconds{op}`` and the rpc events.

        Injected faults act here, before the engine is reached. Raises _EngineFailure when the call fails.
        """
        op = call.op
        metrics = telemetry.get().metrics
        with self._tracer.start_as_current_span("engine.rpc", kind=SpanKind.INTERNAL, record_exception=False) as span:
            span.set_attribute("rl.op", op)
            span.set_attribute("rl.engine_call", what)
            t0 = time.perf_counter()
            events.emit("weights.rpc.start", call.tid, op=op, t=time.time())
            ok = False
            try:
                delay_ms = self.config.delay_ms(op)
                if delay_ms > 0:
                    span.set_attribute("rl.injected_delay_ms", delay_ms)
                    await asyncio.sleep(delay_ms / 1000.0)
                if op in self.config.inject_fail:
                    raise InjectedFailure(f"injected failure of {op} (WEIGHTWATCH_INJECT_FAIL)")
                result = await factory()
                ok = True
                return result
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:200]))
                raise _EngineFailure(exc, what) from exc
            finally:
                rpc_s = time.perf_counter() - t0
                call.rpc_s = (call.rpc_s or 0.0) + rpc_s
                span.set_attribute("rl.rpc_ms", _ms(rpc_s))
                metrics.observe("rl_admin_rpc_seconds", rpc_s, op=op)
                events.emit("weights.rpc.done", call.tid, op=op, t=time.time(), rpc_ms=rpc_s * 1000.0, ok=int(ok))

    # ------------------------------------------------------------------ the request frame every op shares

    async def serve(
        self, request: Request, engine: EngineCalls | None, op: str, work: Callable[..., Awaitable[dict[str, Any]]]
    ) -> JSONResponse:
        """Span, events, token check, timing, metrics and error mapping around one op's ``work``."""
        scope = request.scope
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
            call = _Call(op, tid, span)
            status, headers = 200, {}
            payload: dict[str, Any]
            try:
                check_token(request, self.config.admin_token)
                if engine is None:
                    # Input errors first would be nicer, but without an engine nothing can be done anyway.
                    raise AdminError(503, "no engine attached to this server")
                payload = {"status": "ok", "op": op, **await work(request, engine, call)}
            except AdminError as exc:
                status, headers = exc.status, exc.headers
                payload = {"status": "error", "op": op, "error": exc.reason}
            except _EngineFailure as failure:
                cause = failure.cause
                status = 503 if failure.dead else int(failure.extra.pop("_status", 500))
                payload = {
                    "status": "error",
                    "op": op,
                    "error": f"engine {failure.what} failed: {type(cause).__name__}: {cause}",
                    **failure.extra,
                }
            except Exception as bug:  # noqa: BLE001 - a bug here must answer, not kill the connection
                status = 500
                payload = {"status": "error", "op": op, "error": f"{type(bug).__name__}: {bug}"}
                span.record_exception(bug)
            if call.rpc_s is not None:
                payload["rpc_ms"] = _ms(call.rpc_s)
            server_s = time.perf_counter() - recv_perf
            payload["server_ms"] = _ms(server_s)
            span.set_attribute("rl.server_ms", payload["server_ms"])
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR, str(payload.get("error", ""))[:200]))
            telemetry.get().metrics.observe("rl_admin_server_seconds", server_s, op=op)
            timing = [f"{TIMING_SERVER};dur={payload['server_ms']}"]
            if "rpc_ms" in payload:
                timing.insert(0, f"{TIMING_RPC};dur={payload['rpc_ms']}")
            headers = {**headers, SERVER_TIMING_HEADER: ", ".join(timing)}
            return JSONResponse(payload, status_code=status, headers=headers)

    async def handle(self, request: Request, engine: EngineCalls | None) -> JSONResponse:
        """The op of the request's path (kept for callers of the seed's single entry point)."""
        op = OP_BY_PATH.get(request.scope.get("path", ""), "reload_weights")
        work = {"update_weights": self._update, "reload_weights": self._update, "pause": self._pause, "resume": self._resume,
                "is_paused": self._is_paused, "load_lora_adapter": self._load_lora, "liveness": self._liveness}[op]  # fmt: skip
        return await self.serve(request, engine, op, work)

    # ------------------------------------------------------------------ the ops

    def _exclusive(self) -> None:
        if not self._busy.acquire(blocking=False):
            raise AdminError(409, "another weight update is running on this server; retry when it finishes")

    async def _update(self, request: Request, engine: EngineCalls, call: _Call) -> dict[str, Any]:
        op = call.op
        body = await _read_json_object(request, required=(op == "update_weights"))
        if op == "update_weights" and "update_info" in body:
            info = update_info_of(body)
            update_info = self._need(engine.update_info, "update_info weight transfer")
            self._exclusive()
            try:
                await self._rpc(call, "update_weights(update_info)", lambda: update_info(info))
            finally:
                self._busy.release()
            return {"shape": "update_info", "message": "Weights updated"}
        if op == "update_weights":
            target = await self._weight_dir(body)
        elif self.model_path:
            target = self.model_path
        else:
            raise AdminError(500, "the server does not know its model path; cannot reload")
        method, args, kwargs = (
            self.config.update_call(target) if op == "update_weights" else ("reload_weights", (), {"weights_path": target})
        )
        call.span.set_attribute("rl.weights_path", target)
        self._exclusive()
        try:
            try:
                await self._rpc(call, method, lambda: engine.collective_rpc(method, kwargs, args))
            except _EngineFailure as failure:
                if isinstance(failure.cause, InjectedFailure):
                    restored: str | None = self.last_good  # the engine was never touched: it still serves these
                else:
                    restored = await self._recover(engine, target)
                if restored is None:
                    failure.extra["_status"] = 503
                failure.extra["restored_weights"] = restored
                raise
            self.last_good = target
        finally:
            self._busy.release()
        return {"weights_path": target, "method": method}

    async def _pause(self, request: Request, engine: EngineCalls, call: _Call) -> dict[str, Any]:
        mode, clear_cache = pause_arguments(dict(request.query_params), await _read_json_object(request, required=False))
        pause = self._need(engine.pause, "pause")
        call.span.set_attribute("rl.mode", mode)
        inflight = _count(engine.inflight)
        await self._rpc(call, "pause_generation", lambda: pause(mode, clear_cache))
        metrics = telemetry.get().metrics
        metrics.set("rl_engine_paused", 1)  # the moment the pause took effect
        with self._state:
            already = self.paused_at is not None
            if not already:
                self.paused_at = time.perf_counter()
        if not already and inflight is not None:
            metrics.observe("rl_engine_pause_inflight_requests", inflight)
        call.span.set_attribute("rl.inflight", -1 if inflight is None else inflight)
        return {"paused": True, "mode": mode, "clear_cache": clear_cache, "inflight": inflight, "already_paused": already}

    async def _resume(self, request: Request, engine: EngineCalls, call: _Call) -> dict[str, Any]:
        resume = self._need(engine.resume, "resume")
        await self._rpc(call, "resume_generation", resume)
        now = time.perf_counter()
        with self._state:
            since, self.paused_at = self.paused_at, None
        metrics = telemetry.get().metrics
        metrics.set("rl_engine_paused", 0)
        paused_ms = None
        if since is not None:
            metrics.observe("rl_engine_paused_seconds", now - since)
            paused_ms = _ms(now - since)
            call.span.set_attribute("rl.paused_ms", paused_ms)
        return {"paused": False, "paused_ms": paused_ms}

    async def _is_paused(self, request: Request, engine: EngineCalls, call: _Call) -> dict[str, Any]:
        is_paused = self._need(engine.is_paused, "is_paused")
        paused = bool(await self._rpc(call, "is_paused", is_paused))
        telemetry.get().metrics.set("rl_engine_paused", int(paused))  # the engine's word, whoever paused it
        return {"is_paused": paused}

    async def _load_lora(self, request: Request, engine: EngineCalls, call: _Call) -> dict[str, Any]:
        fields = lora_fields(await _read_json_object(request, required=True), self.config.weights_root)
        if engine.lora_enabled is None or engine.load_lora is None or not engine.lora_enabled():
            raise AdminError(
                400, "LoRA is not enabled on this server: start vLLM with --enable-lora (and --max-lora-rank) to load adapters"
            )
        load_lora = engine.load_lora
        call.span.set_attribute("rl.weights_path", fields["lora_path"])
        self._exclusive()
        try:
            code, text = await self._rpc(call, "load_lora_adapter", lambda: load_lora(fields))
        finally:
            self._busy.release()
        if code >= 500:
            raise _EngineFailure(RuntimeError(text), "load_lora_adapter")
        if code >= 400:
            raise AdminError(code, f"vLLM refused the adapter: {text}")
        return {"lora_name": fields["lora_name"], "lora_path": fields["lora_path"], "load_inplace": True, "message": text}

    async def _liveness(self, request: Request, engine: EngineCalls, call: _Call) -> dict[str, Any]:
        ping = self._need(engine.ping, "engine round trip")
        timeout = self.config.liveness_timeout_s
        try:
            await asyncio.wait_for(self._rpc(call, "liveness (is_scheduler_paused)", lambda: ping(None)), timeout)
        except (TimeoutError, _EngineFailure):
            # The cause (timeout or the engine's exception) is on the engine.rpc span and in rpc.done ok=0.
            raise AdminError(503, "engine_unresponsive") from None
        return {"alive": True, "timeout_s": timeout}

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
                    await engine.collective_rpc("reload_weights", {"weights_path": target}, ())
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

    @router.post(PAUSE_PATH, summary="Pause generation (mode keep|wait|abort, default keep; clear_cache, default false)")
    async def pause(request: Request) -> JSONResponse:
        return await service.serve(request, engine(), "pause", service._pause)

    @router.post(RESUME_PATH, summary="Resume generation (harmless without a pause)")
    async def resume(request: Request) -> JSONResponse:
        return await service.serve(request, engine(), "resume", service._resume)

    @router.get(IS_PAUSED_PATH, summary="Whether generation is paused")
    async def is_paused(request: Request) -> JSONResponse:
        return await service.serve(request, engine(), "is_paused", service._is_paused)

    @router.post(UPDATE_PATH, summary='Load new weights: {"weight_dir": DIR} (prime-rl) or {"update_info": {...}} (vLLM)')
    async def update_weights(request: Request) -> JSONResponse:
        return await service.serve(request, engine(), "update_weights", service._update)

    @router.post(RELOAD_PATH, summary="Reload the model's own weights (prime-rl shape)")
    async def reload_weights(request: Request) -> JSONResponse:
        return await service.serve(request, engine(), "reload_weights", service._update)

    @router.post(LOAD_LORA_PATH, summary="Load (in place) a LoRA adapter: vLLM's request shape")
    async def load_lora_adapter(request: Request) -> JSONResponse:
        return await service.serve(request, engine(), "load_lora_adapter", service._load_lora)

    @router.get(LIVENESS_PATH, summary="A no-op engine round trip (503 engine_unresponsive after the timeout)")
    async def liveness(request: Request) -> JSONResponse:
        return await service.serve(request, engine(), "liveness", service._liveness)

    @router.get(PING_PATH, include_in_schema=False)
    async def ping(request: Request) -> JSONResponse:
        return await service.ping(request)

    @router.post(ENGINE_PING_PATH, include_in_schema=False)
    async def engine_ping(request: Request) -> JSONResponse:
        return await service.engine_ping(request, engine())

    return router
