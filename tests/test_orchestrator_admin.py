"""AdminClient against real HTTP servers on 127.0.0.1 (uvicorn + Starlette), no mocks.

The fakes answer like weightwatch's admin API (server_ms/rpc_ms in JSON or Server-Timing), like a
server without weightwatch (no timing), fail on purpose (4xx, 5xx, dropped connection) or hang.
The same behaviour against real vLLM servers is in test_orchestrator_vllm.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import weightwatch
from conftest import free_port
from weightwatch import events
from weightwatch.orchestrator import AdminClient, AdminTimeouts, AdminUpdateError, UpdateResult
from weightwatch.orchestrator.timing import parse_server_timing, server_times

# --------------------------------------------------------------------------- real local servers


@dataclass
class Behaviour:
    """What the fake admin server does; tests change it between calls."""

    timing: str = "json"  # json | header | none
    rpc_delay: float = 0.02
    statuses: list[int] = field(default_factory=list)  # answered first, one per request, then 200
    hang: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


def admin_app(b: Behaviour) -> Starlette:
    async def handle(request: Request) -> Response:
        t0 = time.perf_counter()
        raw = await request.body()
        b.requests.append({"path": request.url.path, "headers": dict(request.headers), "body": raw, "t": time.time()})
        if b.statuses:
            status = b.statuses.pop(0)
            return JSONResponse({"detail": f"on purpose {status}"}, status_code=status)
        if b.hang:
            await asyncio.sleep(b.hang)
        r0 = time.perf_counter()
        await asyncio.sleep(b.rpc_delay)
        rpc_ms = (time.perf_counter() - r0) * 1000
        server_ms = (time.perf_counter() - t0) * 1000
        if b.timing == "json":
            return JSONResponse({"rpc_ms": rpc_ms, "server_ms": server_ms}, headers={"Server-Timing": "server;dur=1, rpc;dur=1"})
        if b.timing == "header":
            return JSONResponse(
                {"message": "ok"}, headers={"Server-Timing": f'server;dur={server_ms:.3f}, rpc;dur={rpc_ms:.3f};desc="reload"'}
            )
        return JSONResponse({"message": "Weights updated"})

    async def stream(request: Request) -> Response:
        async def body():
            yield b"x"
            while not b.release.is_set():
                await asyncio.sleep(0.01)
            yield b"y"

        return StreamingResponse(body())

    async def health(request: Request) -> Response:
        b.requests.append({"path": request.url.path, "headers": dict(request.headers), "body": b"", "t": time.time()})
        return JSONResponse({})

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/update_weights", handle, methods=["POST"]),
            Route("/reload_weights", handle, methods=["POST"]),
            Route("/stream", stream),
        ]
    )


class ServerThread:
    """A uvicorn server in a thread on a free port; stopped by the fixture."""

    def __init__(self, app: Any):
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.server.force_exit = True  # handlers that hang on purpose must not hold the test up
        self.thread.join(10)


class DroppingProxy:
    """TCP proxy that closes the first ``drop`` connections after reading the request, then forwards."""

    def __init__(self, upstream_port: int, drop: int = 1):
        self.upstream_port, self.drop, self.accepted = upstream_port, drop, 0
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy.accepted += 1
                if proxy.accepted <= proxy.drop:
                    self.request.recv(65536)
                    self.request.close()
                    return
                up = socket.create_connection(("127.0.0.1", proxy.upstream_port))
                pipes = [
                    threading.Thread(target=_pipe, args=(self.request, up), daemon=True),
                    threading.Thread(target=_pipe, args=(up, self.request), daemon=True),
                ]
                for p in pipes:
                    p.start()
                for p in pipes:
                    p.join()

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def servers():
    started: list[ServerThread] = []

    def make(b: Behaviour | None = None) -> tuple[ServerThread, Behaviour]:
        b = b or Behaviour()
        s = ServerThread(admin_app(b)).start()
        started.append(s)
        return s, b

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def tele(telemetry_reset, tmp_path):
    return weightwatch.setup("orch-test", role="orchestrator", span_file=tmp_path / "orchestrator.spans.jsonl")


def spans(tele) -> list[dict]:
    tele.force_flush()
    return [json.loads(l) for l in tele.span_file.read_text().splitlines()]


def sample(tele, name: str, **labels: str) -> float | None:
    return tele.registry.get_sample_value(name, labels)


def client_events(caplog) -> list[events.Event]:
    out = []
    for rec in caplog.records:
        if rec.name == "weightwatch.orchestrator":
            ev = events.parse_line(rec.getMessage())
            if isinstance(ev, events.Event):
                out.append(ev)
    return out


FAST = AdminTimeouts(connect=2, read=5, total=10)


def run(coro):
    return asyncio.run(coro)


# --------------------------------------------------------------------------- tests


def test_two_servers_in_parallel_one_trace_events_spans_metrics(tele, servers, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    (a, ba), (b, bb) = servers(Behaviour(rpc_delay=0.05)), servers(Behaviour(rpc_delay=0.05, timing="header"))

    async def go() -> UpdateResult:
        async with AdminClient([a.url, b.url + "/"], timeouts=FAST) as admin:
            return await admin.update_weights("/tmp/weights/step_3", step=3)

    result = run(go())
    assert result.ok and result.step == 3 and len(result.servers) == 2
    tid = result.trace_id
    assert tid and len(tid) == 32
    for r in result.servers:
        assert r.ok and r.status == 200 and r.attempts == 1 and r.trace_id == tid
        assert r.server_ms is not None and r.rpc_ms is not None and r.queue_ms is not None and r.pool_wait_ms is not None
        assert r.wall_ms >= r.server_ms >= r.rpc_ms >= 40  # the server slept 50 ms in its "rpc"
        assert r.queue_ms == pytest.approx(r.wall_ms - r.server_ms)
    # the body the server got is prime-rl's shape, with an absolute path
    assert json.loads(ba.requests[0]["body"]) == {"weight_dir": "/tmp/weights/step_3"}

    # W3C traceparent reached both servers with the update's trace id
    for beh in (ba, bb):
        tp = beh.requests[0]["headers"]["traceparent"]
        assert tp.split("-")[1] == tid

    # events: per server client.send then client.done, all with the trace id
    evs = [e for e in client_events(caplog) if e.tag == "weights"]
    assert [e.name for e in evs].count("client.send") == 2 and [e.name for e in evs].count("client.done") == 2
    assert {e.tid for e in evs} == {tid}
    for url in (a.url, b.url):
        mine = [e for e in evs if e["url"] == url + "/update_weights"]
        assert [e.name for e in mine] == ["client.send", "client.done"]
        assert mine[0]["op"] == "update_weights"
        done = mine[1]
        assert isinstance(done["wall_ms"], float) and isinstance(done["rpc_ms"], float) and isinstance(done["queue_ms"], float)

    # spans: one weights.update with one child per server; the HTTP span (instrumentation) under each child
    sp = spans(tele)
    parent = [s for s in sp if s["name"] == "weights.update"]
    assert len(parent) == 1 and parent[0]["trace_id"] == tid and parent[0]["attributes"]["rl.step"] == 3
    children = [s for s in sp if s["name"] == "weights.update.server"]
    assert len(children) == 2 and {c["parent_span_id"] for c in children} == {parent[0]["span_id"]}
    assert {c["attributes"]["rl.server"] for c in children} == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
    http_spans = [s for s in sp if s["parent_span_id"] in {c["span_id"] for c in children}]
    assert len(http_spans) == 2
    assert {beh.requests[0]["headers"]["traceparent"].split("-")[2] for beh in (ba, bb)} == {s["span_id"] for s in http_spans}

    # metrics, per server, with the last-success timestamp and the checkpoint step
    for s in (a, b):
        labels = {"op": "update_weights", "server": f"127.0.0.1:{s.port}"}
        for h in ("wall", "queue", "rpc", "pool_wait"):
            assert sample(tele, f"rl_weight_update_{h}_seconds_count", **labels) == 1
        assert sample(tele, "rl_weight_update_last_queue_seconds", **labels) >= 0
        assert time.time() - sample(tele, "rl_weight_update_last_success_timestamp_seconds", **labels) < 60
    assert sample(tele, "rl_checkpoint_step") == 3


def test_server_without_weightwatch_reports_unknown_not_invented(tele, servers, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    s, _ = servers(Behaviour(timing="none"))

    async def go() -> UpdateResult:
        async with AdminClient([s.url], timeouts=FAST) as admin:
            return await admin.reload_weights()

    r = run(go()).servers[0]
    assert r.ok and r.server_ms is None and r.rpc_ms is None and r.queue_ms is None
    assert r.wall_ms > 0 and r.pool_wait_ms is not None
    done = [e for e in client_events(caplog) if e.name == "client.done"][0]
    assert done["rpc_ms"] is None and done["queue_ms"] is None and done["server_ms"] == "na"
    line = [rec.getMessage() for rec in caplog.records if "client.done" in rec.getMessage()][0]
    assert "rpc_ms=na" in line and "queue_ms=na" in line
    labels = {"op": "reload_weights", "server": f"127.0.0.1:{s.port}"}
    assert sample(tele, "rl_weight_update_wall_seconds_count", **labels) == 1
    assert sample(tele, "rl_weight_update_queue_seconds_count", **labels) is None
    assert sample(tele, "rl_weight_update_rpc_seconds_count", **labels) is None
    assert math.isnan(sample(tele, "rl_weight_update_last_queue_seconds", **labels))
    child = [x for x in spans(tele) if x["name"] == "weights.update.server"][0]
    assert child["attributes"]["rl.timing_known"] is False and "rl.rpc_ms" not in child["attributes"]


def test_retries_after_a_dropped_connection(tele, servers, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    s, beh = servers()
    proxy = DroppingProxy(s.port, drop=1)
    try:

        async def go() -> UpdateResult:
            async with AdminClient([proxy.url], timeouts=FAST, retries=2, backoff_base=0.01, backoff_max=0.02) as admin:
                return await admin.update_weights("/w")

        r = run(go()).servers[0]
    finally:
        proxy.stop()
    assert r.ok and r.attempts == 2 and proxy.accepted == 2 and len(beh.requests) == 1
    sends = [e for e in client_events(caplog) if e.name == "client.send"]
    assert [e["attempt"] for e in sends] == ["1", "2"]
    assert (
        sample(tele, "rl_weight_update_failures_total", op="update_weights", server=f"127.0.0.1:{proxy.port}", reason="transport") is None
    )


def test_5xx_is_retried_with_bounded_attempts(tele, servers) -> None:
    s, beh = servers(Behaviour(statuses=[503, 500, 502, 500]))

    async def go() -> UpdateResult:
        async with AdminClient([s.url], timeouts=FAST, retries=2, backoff_base=0.01, backoff_max=0.02) as admin:
            return await admin.update_weights("/w")

    res = run(go())
    r = res.servers[0]
    assert not r.ok and r.reason == "http_5xx" and r.attempts == 3 and len(beh.requests) == 3 and r.status == 502
    assert beh.statuses == [500]  # the fourth answer was never asked for
    assert sample(tele, "rl_weight_update_failures_total", op="update_weights", server=f"127.0.0.1:{s.port}", reason="http_5xx") == 1
    with pytest.raises(AdminUpdateError, match="http_5xx"):
        res.raise_for_failures()


def test_4xx_is_not_retried_and_explained(tele, servers) -> None:
    s, beh = servers(Behaviour(statuses=[404, 200]))

    async def go() -> UpdateResult:
        async with AdminClient([s.url], timeouts=FAST, retries=3, backoff_base=0.01, backoff_max=0.02) as admin:
            return await admin.update_weights("/w")

    r = run(go()).servers[0]
    assert not r.ok and r.reason == "http_4xx" and r.status == 404 and r.attempts == 1 and len(beh.requests) == 1
    assert "no /update_weights route" in r.error and "weightwatch serve" in r.error
    assert r.queue_ms is None and r.rpc_ms is None
    assert sample(tele, "rl_weight_update_failures_total", op="update_weights", server=f"127.0.0.1:{s.port}", reason="http_4xx") == 1
    assert sample(tele, "rl_weight_update_wall_seconds_count", op="update_weights", server=f"127.0.0.1:{s.port}") is None


def test_total_timeout_is_a_counted_failure_not_a_hang(tele, servers, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    slow, _ = servers(Behaviour(hang=30))
    fast, _ = servers()

    async def go() -> UpdateResult:
        async with AdminClient([slow.url, fast.url], timeouts=AdminTimeouts(connect=2, read=60, total=0.5)) as admin:
            # the guard only proves the call returns by itself; the client's own limit is 0.5 s
            return await asyncio.wait_for(admin.update_weights("/w"), 20)

    res = run(go())
    by = {r.server: r for r in res.servers}
    assert by[fast.url].ok
    r = by[slow.url]
    assert not r.ok and r.reason == "timeout" and "total=0.5s" in r.error and r.attempts == 1
    assert sample(tele, "rl_weight_update_failures_total", op="update_weights", server=f"127.0.0.1:{slow.port}", reason="timeout") == 1
    done = [e for e in client_events(caplog) if e.name == "client.done" and e["url"].startswith(slow.url)][0]
    assert done["ok"] == "0" and done["reason"] == "timeout" and done["rpc_ms"] is None
    child = [x for x in spans(tele) if x["name"] == "weights.update.server" and x["attributes"]["rl.server"] == f"127.0.0.1:{slow.port}"][0]
    assert child["status"] == "error" and child["attributes"]["rl.failure_reason"] == "timeout"


def test_read_timeout_is_not_retried(tele, servers) -> None:
    s, beh = servers(Behaviour(hang=30))

    async def go() -> UpdateResult:
        async with AdminClient([s.url], timeouts=AdminTimeouts(connect=2, read=0.3, total=20), retries=3) as admin:
            return await admin.update_weights("/w")

    r = run(go()).servers[0]
    assert not r.ok and r.reason == "timeout" and r.attempts == 1 and len(beh.requests) == 1 and "read=0.3s" in r.error


def test_connection_refused_is_retried_then_counted_as_transport(tele) -> None:
    dead = f"http://127.0.0.1:{free_port()}"

    async def go() -> UpdateResult:
        async with AdminClient([dead], timeouts=FAST, retries=2, backoff_base=0.01, backoff_max=0.02) as admin:
            return await admin.reload_weights()

    r = run(go()).servers[0]
    assert not r.ok and r.reason == "transport" and r.attempts == 3 and "ConnectError" in r.error


def test_shared_pool_waits_behind_generation_dedicated_does_not(tele, servers) -> None:
    s, beh = servers()

    async def go() -> tuple[UpdateResult, UpdateResult]:
        gen = httpx.AsyncClient(limits=httpx.Limits(max_connections=1))
        try:
            async with gen.stream("GET", s.url + "/stream") as resp:  # holds the only connection
                it = resp.aiter_bytes()
                await it.__anext__()
                shared_task = asyncio.create_task(AdminClient([s.url], timeouts=FAST, client=gen).update_weights("/w"))
                await asyncio.sleep(0.1)  # the shared call is now queued for the pool
                asyncio.get_running_loop().call_later(0.6, beh.release.set)
                async with AdminClient([s.url], timeouts=FAST) as dedicated:
                    own = await dedicated.update_weights("/w")
                async for _ in it:
                    pass
            shared = await shared_task
            return shared, own
        finally:
            await gen.aclose()

    shared, own = run(go())
    rs, ro = shared.servers[0], own.servers[0]
    assert rs.ok and ro.ok
    # the shared call could only start once the stream gave its connection back (released 0.6 s after it queued)
    assert rs.pool_wait_ms >= 600 and rs.queue_ms >= rs.pool_wait_ms
    assert ro.pool_wait_ms < rs.pool_wait_ms and ro.queue_ms < rs.queue_ms
    # the shared client is not instrumented: traceparent injected by hand, same trace
    tp = [r for r in beh.requests if r["path"] == "/update_weights"]
    assert {r["headers"]["traceparent"].split("-")[1] for r in tp} == {shared.trace_id, own.trace_id}
    parents = [x for x in spans(tele) if x["name"] == "weights.update"]
    assert {p["attributes"]["rl.pool"] for p in parents} == {"shared", "dedicated"}


def test_token_is_sent_as_bearer_and_never_logged(tele, servers, caplog, monkeypatch) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    monkeypatch.setenv("WEIGHTWATCH_ADMIN_TOKEN", "s3cret-from-env")
    s, beh = servers()

    async def go() -> None:
        async with AdminClient([s.url], timeouts=FAST) as admin:
            await admin.reload_weights()
        async with AdminClient([s.url], timeouts=FAST, token="explicit-tok") as admin:
            await admin.reload_weights()

    run(go())
    assert [r["headers"]["authorization"] for r in beh.requests] == ["Bearer s3cret-from-env", "Bearer explicit-tok"]
    assert json.loads(beh.requests[0]["body"] or b"null") is None
    assert not any("s3cret" in rec.getMessage() or "explicit-tok" in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("bad", [dict(total=float("inf")), dict(read=0), dict(connect=-1), dict(total=None), dict(pool=float("nan"))])
def test_timeouts_must_be_finite(bad) -> None:
    with pytest.raises(ValueError, match="finite"):
        AdminTimeouts(**bad)


@pytest.mark.parametrize("servers_arg", [[], ["localhost:8001"], ["ftp://x"], ["http://a:1", "http://a:1/"]])
def test_bad_server_lists_are_refused(servers_arg) -> None:
    with pytest.raises(ValueError):
        AdminClient(servers_arg)


def test_server_timing_parsing() -> None:
    assert parse_server_timing('server;dur=12.5, rpc;desc="reload";dur=9.75, cache;desc=x, bad;dur=abc') == {"server": 12.5, "rpc": 9.75}
    assert parse_server_timing(None) == {} and parse_server_timing("") == {}
    # JSON wins over the header; the header fills what JSON lacks; garbage is unknown
    h = httpx.Headers({"Server-Timing": "server;dur=5, rpc;dur=3"})
    assert server_times({"server_ms": 7.0, "rpc_ms": 6.0}, h) == (7.0, 6.0)
    assert server_times({"server_ms": 7.0}, h) == (7.0, 3.0)
    assert server_times({"server_ms": "7", "rpc_ms": float("nan")}, httpx.Headers()) == (None, None)
    assert server_times(["not", "a", "dict"], h) == (5.0, 3.0)


def test_shared_pool_that_never_frees_is_a_timeout_with_the_pool_wait(tele, servers) -> None:
    s, beh = servers()

    async def go() -> UpdateResult:
        gen = httpx.AsyncClient(limits=httpx.Limits(max_connections=1))
        try:
            async with gen.stream("GET", s.url + "/stream") as resp:  # holds the only connection throughout
                it = resp.aiter_bytes()  # keep the iterator: dropping it would close the stream
                await it.__anext__()
                admin = AdminClient([s.url], timeouts=AdminTimeouts(connect=2, read=30, total=0.6), client=gen)
                res = await asyncio.wait_for(admin.update_weights("/w"), 20)
                beh.release.set()
                return res
        finally:
            beh.release.set()
            await gen.aclose()

    r = run(go()).servers[0]
    assert not r.ok and r.reason == "timeout" and "still waiting for a pool connection" in r.error
    assert r.pool_wait_ms is not None and r.pool_wait_ms >= 500  # it waited for the pool the whole 0.6 s
    assert not [x for x in beh.requests if x["path"] == "/update_weights"]  # never reached the server
    labels = {"op": "update_weights", "server": f"127.0.0.1:{s.port}"}
    assert sample(tele, "rl_weight_update_pool_wait_seconds_count", **labels) == 1
    assert sample(tele, "rl_weight_update_failures_total", reason="timeout", **labels) == 1


def test_own_loop_runs_while_the_callers_loop_is_blocked_and_keeps_the_parent_span(tele, servers, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightwatch")
    s, beh = servers()

    async def go() -> tuple[UpdateResult, float, str]:
        admin = AdminClient([s.url], timeouts=FAST, own_loop=True)
        try:
            with tele.tracer().start_as_current_span("orchestrator.step") as step_span:
                task = asyncio.create_task(admin.update_weights("/w"))
                for _ in range(3):
                    await asyncio.sleep(0)  # the call is handed to the admin thread
                time.sleep(1.5)  # the orchestrator's loop hogged by token parsing
                blocked_until = time.time()
                res = await task
            return res, blocked_until, format(step_span.get_span_context().span_id, "016x")
        finally:
            await admin.aclose()

    res, blocked_until, step_span_id = run(go())
    assert res.ok
    done = [r for r in caplog.records if "client.done" in r.getMessage()][0]
    # the request reached the server and the answer was processed while the caller's loop was blocked
    assert beh.requests[0]["t"] < blocked_until and done.created < blocked_until
    assert done.threadName == "weightwatch-admin-loop"
    parent = [x for x in spans(tele) if x["name"] == "weights.update"][0]
    assert parent["parent_span_id"] == step_span_id


def test_own_loop_is_the_default_for_the_dedicated_client_only() -> None:
    gen = httpx.AsyncClient()
    with pytest.raises(ValueError, match="own_loop"):
        AdminClient(["http://127.0.0.1:1"], client=gen, own_loop=True)
    shared = AdminClient(["http://127.0.0.1:1"], client=gen)
    dedicated = AdminClient(["http://127.0.0.1:1"])
    assert shared.shared_pool and not shared.own_loop
    assert dedicated.own_loop and not dedicated.shared_pool
    assert not AdminClient(["http://127.0.0.1:1"], own_loop=False).own_loop
    run(dedicated.aclose())
    assert not dedicated.own_loop


def test_total_timeout_while_backing_off_names_the_last_failure(tele, servers) -> None:
    s, beh = servers(Behaviour(statuses=[503] * 10))

    async def go() -> UpdateResult:
        # 2 s for the first attempt to reach the server on a loaded machine; the backoff (2.5-5 s) outlasts the rest
        admin = AdminClient([s.url], timeouts=AdminTimeouts(connect=2, read=5, total=2.0), retries=5, backoff_base=5, backoff_max=5)
        async with admin:
            return await asyncio.wait_for(admin.update_weights("/w"), 20)

    r = run(go()).servers[0]
    assert not r.ok and r.reason == "timeout" and r.attempts == 1 and len(beh.requests) == 1
    assert "last failure: http_5xx: HTTP 503" in r.error


def test_warm_up_opens_the_connection_before_the_first_update(tele, servers) -> None:
    """warm_up() builds the dedicated client and reaches every server; the first update then reuses it."""
    (s1, b1), (s2, b2) = servers(), servers()

    async def go() -> None:
        async with AdminClient([s1.url, s2.url], own_loop=False) as admin:
            await admin.warm_up()
            assert [r["path"] for r in b1.requests] == ["/health"] and [r["path"] for r in b2.requests] == ["/health"]
            result = await admin.reload_weights()
            assert result.ok
            assert [r["path"] for r in b1.requests] == ["/health", "/reload_weights"]

    asyncio.run(go())
