"""Micro-benchmark: CPU cost per streamed chunk of weightwatch's server-side instrumentation.

    python benchmarks/bench_inference_overhead.py [--requests 300] [--chunks 256]

A FastAPI endpoint streams ``--chunks`` SSE chunks shaped like vLLM's completion chunks; the ASGI app is
called directly (no sockets, no vLLM), so only the middleware's own work is measured, in process CPU time:
bare app, with weightwatch's first-byte middleware, with OpenTelemetry's FastAPI instrumentation as the
plugin configures it (no per-chunk spans), and with both (what ``weightwatch serve`` loads: the middleware
puts OpenTelemetry's send wrapper on the streaming fast path), also without that fast path. Variants run interleaved, several times, and
the table shows the median per chunk and the difference to the bare app. Divide by vLLM's own API-server
CPU per token (from bench_inference_lane.py part 2) to get the share of the front end's CPU.
Prints the table and writes it to benchmarks/results/inference_overhead.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.responses import StreamingResponse

import weightwatch

CHUNK = b'data: {"id":"cmpl-0","object":"text_completion","created":0,"model":"m","choices":[{"index":0,"text":" tok","logprobs":null,"finish_reason":null}]}\n\n'


def build(variant: str, chunks: int) -> Any:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions() -> StreamingResponse:
        async def gen():  # type: ignore[no-untyped-def]
            for _ in range(chunks):
                yield CHUNK

        return StreamingResponse(gen(), media_type="text/event-stream")

    if variant in ("otel", "both", "both-no-fast-path"):
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        from weightwatch.inference.plugin import OTEL_EXCLUDED

        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=weightwatch.get().tracer_provider, excluded_urls=OTEL_EXCLUDED, exclude_spans=["receive", "send"]
        )
    if variant in ("first-byte", "both", "both-no-fast-path"):
        from weightwatch.inference.config import ADMIN_PATHS, QUIET_PATHS
        from weightwatch.inference.middleware import wrap_outermost

        wrap_outermost(app, admin_paths=ADMIN_PATHS, quiet_paths=QUIET_PATHS, otel_fast_path=variant != "both-no-fast-path")
    return app


async def cpu_per_chunk(app: Any, requests: int, chunks: int) -> float:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                    (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip

    async def receive() -> dict:
        await asyncio.sleep(3600)  # the client never disconnects; the response ends first
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        return None

    t0 = time.process_time()
    for _ in range(requests):
        await app(dict(scope), receive, send)
    return (time.process_time() - t0) / (requests * chunks) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--chunks", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "inference_overhead.md")
    args = p.parse_args()
    weightwatch.setup(role="inference", registry=CollectorRegistry(), set_global_tracer_provider=False)
    variants = ["bare", "first-byte", "otel", "both-no-fast-path", "both"]
    apps = {v: build(v, args.chunks) for v in variants}
    results: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:
        asyncio.run(cpu_per_chunk(apps[v], 20, args.chunks))  # warm up
    for _ in range(args.repeats):
        for v in variants:
            results[v].append(asyncio.run(cpu_per_chunk(apps[v], args.requests, args.chunks)))
    base = statistics.median(results["bare"])
    lines = [
        "# Server-side instrumentation: CPU per streamed chunk",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, {os.cpu_count()} cores. "
        f"`python benchmarks/bench_inference_overhead.py --requests {args.requests} --chunks {args.chunks} --repeats {args.repeats}`: "
        f"{args.requests} requests x {args.chunks} chunks, {args.repeats} interleaved repeats; process CPU microseconds per chunk.",
        "",
        "| variant | median | min | max | added vs bare |",
        "|---|---|---|---|---|",
    ]
    for v in variants:
        med = statistics.median(results[v])
        lines.append(f"| {v} | {med:.2f} | {min(results[v]):.2f} | {max(results[v]):.2f} | {med - base:+.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
