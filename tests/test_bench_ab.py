"""The benchmark-only A/B switch (benchmarks/ab_api_server.py) and the A/B benchmark's arithmetic: the switch must
really route around weightwatch, really trace, really burn, and know when the previous mode has drained;
otherwise bench_inference_ab.py would compare a thing with itself."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest
from benchmarks import ab_api_server  # noqa: E402
from benchmarks import bench_inference_ab as bench  # noqa: E402
from fastapi import FastAPI, Request
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from starlette.responses import StreamingResponse

import weightwatch
from weightwatch.inference import middleware
from weightwatch.inference.middleware import SCOPE_LANE

CHUNKS = 5


@pytest.fixture
def switched(
    telemetry_reset: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[ab_api_server.ABSwitch, FastAPI, InMemorySpanExporter, list[dict[str, Any]]]:
    """A FastAPI app instrumented as the plugin does it, with the switch installed the way ab_api_server does; calls
    go through the app (``app.middleware_stack`` is the built stack) as uvicorn's would."""
    weightwatch.setup(role="inference", registry=CollectorRegistry(), set_global_tracer_provider=False)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    seen: list[dict[str, Any]] = []
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        seen.append({"lane": request.scope.get(SCOPE_LANE), "traceparent": request.headers.get("traceparent")})

        async def body():  # type: ignore[no-untyped-def]
            for i in range(CHUNKS):
                yield f"data: {i}\n\n".encode()

        return StreamingResponse(body(), media_type="text/event-stream")

    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, exclude_spans=["receive", "send"])
    monkeypatch.setattr(middleware, "wrap_outermost", middleware.wrap_outermost)  # undone after the test
    ab_api_server.install()
    middleware.wrap_outermost(app, trace_generation="parent")  # what the plugin calls, now with the switch on top
    stack = app.build_middleware_stack()
    assert isinstance(stack, ab_api_server.ABSwitch)
    stack.iterations_per_us = 10.0  # no calibration needed for behaviour
    app.middleware_stack = stack
    return stack, app, exporter, seen


async def _call(app: Any, path: str = "/v1/completions", method: str = "POST", query: bytes = b"") -> tuple[int, bytes, int]:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
        "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    messages: list[dict[str, Any]] = []

    received = []

    async def receive() -> dict[str, Any]:
        if received:  # the client stays connected; the response ends first
            await asyncio.sleep(3600)
        received.append(1)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, body, sum(1 for m in messages if m["type"] == "http.response.body")


def test_switch_routes_around_weightwatch_or_through_it(switched: Any) -> None:
    switch, app, exporter, seen = switched
    switch.set_mode(path="vllm")
    status, body, _ = asyncio.run(_call(app))
    assert status == 200 and body.count(b"data:") == CHUNKS
    assert seen[-1] == {"lane": None, "traceparent": None}  # weightwatch's first-byte middleware never saw it
    switch.set_mode(path="weightwatch")
    asyncio.run(_call(app))
    assert seen[-1] == {"lane": "inference", "traceparent": None}
    assert exporter.get_finished_spans() == ()  # the default policy: no traceparent, no span


def test_traced_mode_gives_every_request_a_server_span(switched: Any) -> None:
    switch, app, exporter, seen = switched
    switch.set_mode(path="weightwatch", traced=True)
    asyncio.run(_call(app))
    assert seen[-1]["traceparent"] == ab_api_server.TRACEPARENT.decode()
    spans = exporter.get_finished_spans()
    assert len(spans) == 1 and format(spans[0].context.trace_id, "032x") == ab_api_server.TRACEPARENT.decode().split("-")[1]


def test_burn_runs_its_loop_per_message(switched: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    switch, app, _, _ = switched
    loops: list[int] = []
    real_range = range
    monkeypatch.setattr(ab_api_server, "range", lambda n: loops.append(n) or real_range(n), raising=False)
    switch.set_mode(burn_us=3.0)
    _, _, messages = asyncio.run(_call(app))
    # every response message (start and each body message) paid the dose: 3 µs x 10 iterations per µs
    assert loops and set(loops) == {30} and len(loops) == messages + 1
    loops.clear()
    switch.set_mode(burn_us=0.0)
    asyncio.run(_call(app))
    assert loops == []


def test_control_endpoint_sets_modes_and_rejects_bad_ones(switched: Any) -> None:
    switch, app, _, _ = switched
    status, body, _ = asyncio.run(_call(app, ab_api_server.CONTROL_PATH, "POST", b"path=vllm&traced=1&burn_us=2"))
    state = json.loads(body)
    assert status == 200 and state["path"] == "vllm" and state["traced"] is True and state["burn_us"] == 2.0
    status, body, _ = asyncio.run(_call(app, ab_api_server.CONTROL_PATH, "POST", b"path=nginx"))
    assert status == 400 and "path must be one of" in json.loads(body)["error"]
    assert switch.path == "vllm"  # a rejected change leaves the mode alone
    status, body, _ = asyncio.run(_call(app, ab_api_server.CONTROL_PATH, "GET"))
    assert status == 200 and json.loads(body)["generation"] == switch.generation


def test_stale_inflight_counts_requests_of_older_modes_until_they_end(switched: Any) -> None:
    switch, app, _, _ = switched
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        started.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    switch.weightwatch = slow_app

    async def scenario() -> list[int]:
        task = asyncio.create_task(_call(app))
        await started.wait()
        counts = [switch.state()["stale_inflight"]]
        switch.set_mode(traced=True)
        counts.append(switch.state()["stale_inflight"])
        release.set()
        await task
        counts.append(switch.state()["stale_inflight"])
        return counts

    assert asyncio.run(scenario()) == [0, 1, 0]


def test_settling_only_when_new_requests_are_served_differently() -> None:
    m = bench.modes([5.0, 20.0])
    assert bench.needs_settling(None, m[bench.BYPASS])
    assert bench.needs_settling(m[bench.BYPASS], m[bench.WEIGHTWATCH])
    assert bench.needs_settling(m[bench.WEIGHTWATCH], m[bench.TRACED])
    assert bench.needs_settling(m[bench.WEIGHTWATCH], m[bench.burn_label(5.0)])
    assert not bench.needs_settling(m[bench.burn_label(5.0)], m[bench.burn_label(20.0)])


def test_tokens_between_interpolates_cumulative_ticks() -> None:
    ticks = [(100.0, 0), (101.0, 1000), (102.0, 3000)]
    assert bench.tokens_between(ticks, 100.5, 101.5) == pytest.approx(1500.0)
    with pytest.raises(ValueError, match="outside"):
        bench.tokens_between(ticks, 99.0, 101.0)


def test_slope_recovers_a_linear_cost() -> None:
    rnd = {
        bench.WEIGHTWATCH: {"tokens_per_s": 1000.0},
        bench.burn_label(5.0): {"tokens_per_s": 950.0},
        bench.burn_label(20.0): {"tokens_per_s": 800.0},
    }
    assert bench.slope_per_round(rnd, [5.0, 20.0]) == pytest.approx(0.01)  # 1 % of tokens/s per µs


def test_bootstrap_interval_brackets_the_mean() -> None:
    values = [0.97, 1.01, 0.99, 1.03, 1.0, 0.98]
    lo, hi = bench.bootstrap_ci(values)
    assert lo < sum(values) / len(values) < hi
    assert lo >= min(values) and hi <= max(values)


def test_frontend_pinning_moves_a_child_to_the_named_cpus() -> None:
    import os
    import subprocess

    assert bench.parse_cpus(None) is None and bench.pinned_to(None) is None
    assert bench.parse_cpus("1, 0") == {0, 1}
    cpu = min(os.sched_getaffinity(0))
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
        preexec_fn=bench.pinned_to({cpu}),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"[{cpu}]"
