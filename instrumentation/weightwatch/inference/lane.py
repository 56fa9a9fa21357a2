"""The server-side admin lane: a second HTTP listener, on its own port, thread and event loop.

Under heavy streaming the API server's single event loop is busy turning engine outputs into SSE
chunks; every admin request on the main port waits behind that work several times over (accept,
reading the request, running the handler, writing the answer). The lane accepts, parses and answers
admin requests on a loop nobody else uses. Only the engine call itself must run on the main loop
(vLLM's engine client owns zmq sockets bound to that loop), so it hops over with
``run_coroutine_threadsafe``: a single scheduling slot instead of the whole request path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI

from weightwatch.inference.admin import AdminService, EngineCalls, build_router
from weightwatch.inference.config import QUIET_PATHS
from weightwatch.inference.middleware import FirstByteMiddleware

_log = logging.getLogger("weightwatch.inference")


def on_loop(loop: asyncio.AbstractEventLoop, factory: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    """Wrap a coroutine factory so that, awaited from another loop, it runs on ``loop``."""

    async def call() -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(factory(), loop))  # type: ignore[arg-type]

    return call


class _Reply:
    """What vLLM's output reader resolves: forwards to a concurrent Future and never raises.

    vLLM catches only asyncio.InvalidStateError around ``set_result``; a cancelled concurrent Future
    would raise another kind inside its output reader and take the engine client down with it.
    """

    __slots__ = ("future",)

    def __init__(self, future: concurrent.futures.Future[Any]):
        self.future = future

    def set_result(self, value: Any) -> None:
        if not self.future.done():
            try:
                self.future.set_result(value)
            except Exception:  # noqa: BLE001
                pass

    def set_exception(self, exc: BaseException) -> None:
        if not self.future.done():
            try:
                self.future.set_exception(exc)
            except Exception:  # noqa: BLE001
                pass

    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> bool:
        return self.future.cancel()


class DirectUtility:
    """Engine utility calls (``collective_rpc`` and friends) with the fewest possible main-loop turns.

    The usual path, ``run_coroutine_threadsafe(engine_client.collective_rpc(...))``, needs the saturated
    main loop several times: to start the task, to send, to wake the task when vLLM's output reader
    resolves its future, to finish the task and hand the result over. Here one scheduled callback sends
    the request, and the reply resolves a thread-safe future directly from vLLM's output reader, which
    wakes the lane's own loop: two main-loop turns instead of four or five. It relies on vLLM's
    AsyncMPClient internals (``utility_results``, ``encoder``, ``_send_input_message``), checked at
    startup; when they differ (other vLLM versions, data parallel clients) the usual path is used.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, engine_client: Any):
        self.loop = loop
        self.core: Any = getattr(engine_client, "engine_core", None)
        self.available = self._supported(self.core)

    @staticmethod
    def _supported(core: Any) -> bool:
        try:
            from vllm.v1.engine import EngineCoreRequestType  # noqa: F401
            from vllm.v1.engine.core_client import AsyncMPClient
        except Exception:  # noqa: BLE001
            return False
        if type(core) is not AsyncMPClient:  # subclasses (data parallel) route utilities differently
            return False
        needed = (
            "utility_results",
            "encoder",
            "client_index",
            "core_engine",
            "_send_input_message",
            "_ensure_output_queue_task",
            "resources",
        )
        return all(hasattr(core, name) for name in needed)

    def _submit(self, method: str, args: tuple[Any, ...], future: concurrent.futures.Future[Any]) -> None:
        """Runs on the main loop: register the reply slot and send the request frame."""
        from vllm.v1.engine import EngineCoreRequestType

        core = self.core
        call_id = uuid.uuid1().int >> 64
        try:
            core.utility_results[call_id] = _Reply(future)
            message = (EngineCoreRequestType.UTILITY.value, *core.encoder.encode((core.client_index, call_id, method, args)))
            sent = core._send_input_message(message, core.core_engine)
            core._ensure_output_queue_task()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller, never raised into the loop
            core.utility_results.pop(call_id, None)
            _Reply(future).set_exception(exc)
            return

        def check_sent(f: Any) -> None:
            exc = asyncio.CancelledError() if f.cancelled() else f.exception()
            if exc is not None:
                core.utility_results.pop(call_id, None)
                _Reply(future).set_exception(exc)

        if hasattr(sent, "add_done_callback"):
            sent.add_done_callback(check_sent)

    async def call(self, method: str, *args: Any) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.loop.call_soon_threadsafe(self._submit, method, args, future)
        waiting = asyncio.wrap_future(future)
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=1.0)
            if done:
                return waiting.result()
            if getattr(self.core.resources, "engine_dead", False):
                future.cancel()
                raise RuntimeError("EngineCore died while the call was in flight")


def engine_calls_on(loop: asyncio.AbstractEventLoop, engine_client: Any, *, direct: bool = True, state: Any = None) -> EngineCalls:
    """EngineCalls for handlers on the lane's loop: engine work is dispatched to the main loop.

    With ``direct`` (the default, when vLLM's client supports it) the engine-core utilities behind pause,
    resume, is_paused, liveness and collective_rpc are sent by one main-loop callback (DirectUtility); the
    rest (vLLM's update_info path, LoRA loading, cache clearing) runs as a coroutine on the main loop.
    """
    from weightwatch.inference import vllm_engine

    fast = DirectUtility(loop, engine_client)
    use_direct = direct and fast.available

    def main(factory: Callable[[], Awaitable[Any]]) -> Awaitable[Any]:
        return on_loop(loop, factory)()

    async def rpc(method: str, kwargs: dict[str, Any], args: tuple[Any, ...] = ()) -> Any:
        if use_direct:
            return await fast.call("collective_rpc", method, None, tuple(args), kwargs)
        return await main(lambda: engine_client.collective_rpc(method, args=tuple(args), kwargs=kwargs))

    async def ping(mode: str | None = None) -> Any:
        if (mode or ("direct" if use_direct else "coroutine")) == "direct" and fast.available:
            return await fast.call("is_scheduler_paused")
        return await main(engine_client.is_paused)

    async def pause(mode: str, clear_cache: bool) -> None:
        if not use_direct:
            await main(lambda: engine_client.pause_generation(mode=mode, clear_cache=clear_cache))
            return
        # What AsyncLLM.pause_generation does, with the scheduler call sent directly.
        renderer = getattr(engine_client, "renderer", None)
        if clear_cache and renderer is not None:
            await main(renderer.clear_mm_cache_async)
        await fast.call("pause_scheduler", mode, clear_cache)
        # vLLM sleeps 20 ms so final outputs of in-flight requests are handed out before the pause answers;
        # kept for the same ordering (here on the lane's loop, which costs the main loop nothing).
        await asyncio.sleep(0.02)

    async def resume() -> None:
        if use_direct:
            await fast.call("resume_scheduler")
        else:
            await main(engine_client.resume_generation)

    async def is_paused() -> bool:
        if use_direct:
            return bool(await fast.call("is_scheduler_paused"))
        return bool(await main(engine_client.is_paused))

    _log.info("weightwatch: admin lane engine dispatch: %s", "direct utility calls" if use_direct else "run_coroutine_threadsafe")
    return EngineCalls(
        collective_rpc=rpc,
        ping=ping,
        pause=pause,
        resume=resume,
        is_paused=is_paused,
        update_info=lambda info: main(lambda: vllm_engine.update_weights_info(engine_client, info)),
        load_lora=lambda fields: main(lambda: vllm_engine.load_lora_adapter(state, fields)),
        lora_enabled=lambda: vllm_engine.lora_enabled(engine_client),
        # A length read under the GIL: safe from the lane's thread, no hop needed.
        inflight=lambda: vllm_engine.unfinished_requests(engine_client),
    )


def build_lane_app(service: AdminService, engine: EngineCalls) -> FastAPI:
    """The lane's app: the admin routes plus /health, behind the first-byte middleware on the admin lane."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(build_router(service, lambda: engine))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "lane": "admin"}

    app.add_middleware(FirstByteMiddleware, lane="admin", quiet_paths=QUIET_PATHS)
    return app


def _quiet_server(config: Any) -> Any:
    """A uvicorn server whose loop sleeps while idle.

    uvicorn's main loop wakes every 100 ms to poll ``should_exit`` and refresh the Date header. Inside the
    API server process every wakeup takes the GIL from vLLM's main loop, and on a CPU-saturated host the
    handover costs that loop milliseconds while the lane thread waits for a core: with 256 streams on
    2 cores, a lane that did nothing cost about 4 % of tokens/s (docs/inference.md, Instrumentation cost).
    This one waits until ``stop()`` wakes it. Date headers are off, since nothing would refresh them.
    """
    import uvicorn

    class QuietServer(uvicorn.Server):
        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self._wake: asyncio.Event | None = None
            self._loop: asyncio.AbstractEventLoop | None = None

        async def main_loop(self) -> None:
            self._wake = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            await self.on_tick(0)  # default headers, once
            while not self.should_exit:
                await self._wake.wait()
                self._wake.clear()

        def request_exit(self) -> None:
            self.should_exit = True
            loop, wake = self._loop, self._wake
            if loop is not None and wake is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(wake.set)
                except RuntimeError:  # the loop closed meanwhile
                    pass

    return QuietServer(config)


class AdminLane:
    """Runs the lane's uvicorn server in a daemon thread with its own event loop (idle: asleep)."""

    def __init__(self, app: FastAPI, host: str, port: int):
        self.app, self.host, self.port = app, host, port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.error: BaseException | None = None

    def start(self, timeout: float = 30.0) -> int:
        """Start listening; returns the bound port. Raises when the port cannot be bound."""
        import socket

        import uvicorn

        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))  # bind here so a busy port fails loudly in the caller
        sock.listen(2048)
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=300, date_header=False)
        self._server = _quiet_server(config)

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                self._started.set()
                loop.run_until_complete(self._server.serve(sockets=[sock]))
            except BaseException as exc:  # noqa: BLE001 - keep the reason for the host's log
                self.error = exc
                _log.exception("weightwatch: admin lane stopped")
            finally:
                sock.close()
                loop.close()

        self._thread = threading.Thread(target=run, name="weightwatch-admin-lane", daemon=True)
        self._thread.start()
        self._started.wait(timeout)
        return self.port

    @property
    def native_id(self) -> int | None:
        """The lane thread's OS thread id (for /proc and profilers)."""
        return self._thread.native_id if self._thread is not None else None

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.request_exit()
        if self._thread is not None:
            self._thread.join(timeout)
