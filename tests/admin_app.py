"""A real HTTP server on 127.0.0.1 with the admin routes of the sync (FastAPI + uvicorn in a thread).

It answers like weightwatch's plugin (``server_ms``/``rpc_ms`` in the JSON, a ``Server-Timing`` header) and
fails on purpose where a test says so: a queue of statuses per op (5xx then ok, 4xx), a delay per op, or a
hang until the test releases it. Every request is recorded with its arrival and answer times, so tests can
check the order of the phases across servers. Real vLLM behind the same routes is in test_sync_vllm.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from conftest import free_port
from weightwatch.contracts import OP_BY_PATH


@dataclass
class Seen:
    op: str
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str]
    t_recv: float
    t_done: float | None = None
    status: int | None = None


@dataclass
class AdminBehaviour:
    """What the server does; tests change it between calls."""

    statuses: dict[str, list[int]] = field(default_factory=dict)  # op -> statuses answered first, then 200
    delay_s: dict[str, float] = field(default_factory=dict)  # op -> sleep before answering
    hang: set[str] = field(default_factory=set)  # ops that wait for release (or 600 s)
    release: threading.Event = field(default_factory=threading.Event)
    seen: list[Seen] = field(default_factory=list)
    paused: bool = False
    paused_at: float | None = None

    def ops(self) -> list[str]:
        return [s.op for s in self.seen]

    def of(self, op: str) -> list[Seen]:
        return [s for s in self.seen if s.op == op]


def admin_app(b: AdminBehaviour) -> FastAPI:
    app = FastAPI()

    async def handle(request: Request, op: str) -> Any:
        t0 = time.perf_counter()
        raw = await request.body()
        body: Any
        try:
            body = await request.json() if raw else None
        except ValueError:
            body = raw
        seen = Seen(op, request.url.path, dict(request.query_params), body, dict(request.headers), time.time())
        b.seen.append(seen)
        queued = b.statuses.get(op)
        if queued:
            status = queued.pop(0)
            seen.status, seen.t_done = status, time.time()
            return JSONResponse({"detail": f"{op} failed on purpose ({status})"}, status_code=status)
        if op in b.hang:
            deadline = time.monotonic() + 600
            while not b.release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        r0 = time.perf_counter()
        await asyncio.sleep(b.delay_s.get(op, 0.0))
        rpc_ms = (time.perf_counter() - r0) * 1000.0
        answer: dict[str, Any] = {"status": "ok", "op": op}
        if op == "pause":
            b.paused, b.paused_at = True, time.time()
            answer |= {"paused": True, "inflight": 0}
        elif op == "resume":
            answer["paused_ms"] = (time.time() - b.paused_at) * 1000.0 if b.paused and b.paused_at else None
            b.paused, b.paused_at = False, None
        elif op == "is_paused":
            answer = {"is_paused": b.paused}
        else:
            answer["rpc_ms"] = rpc_ms
        server_ms = (time.perf_counter() - t0) * 1000.0
        answer["server_ms"] = server_ms
        seen.status, seen.t_done = 200, time.time()
        return JSONResponse(answer, headers={"Server-Timing": f"server;dur={server_ms:.3f}, rpc;dur={rpc_ms:.3f}"})

    for path, op in OP_BY_PATH.items():
        method = "GET" if op in ("is_paused", "liveness") else "POST"

        async def endpoint(request: Request, _op: str = op) -> Any:
            return await handle(request, _op)

        app.add_api_route(path, endpoint, methods=[method])

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        await request.body()

        async def stream():  # a tiny generation stream
            for i in range(3):
                yield f"data: {{\"i\": {i}}}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> Any:
        return {"ok": True}

    return app


class AdminServer:
    """The app in a uvicorn thread on a free port of 127.0.0.1; ``stop()`` ends it."""

    def __init__(self, behaviour: AdminBehaviour | None = None):
        self.behaviour = behaviour or AdminBehaviour()
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(admin_app(self.behaviour), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def label(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> AdminServer:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.behaviour.release.set()
        self.server.should_exit = True
        self.server.force_exit = True
        self.thread.join(10)
