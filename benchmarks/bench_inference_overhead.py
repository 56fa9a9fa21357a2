"""Micro-benchmark: CPU that weightwatch's server-side instrumentation adds per streamed token.

    python -m benchmarks.bench_inference_overhead [--requests 300] [--chunks 256] [--repeats 9]

A FastAPI endpoint streams ``--chunks`` SSE chunks shaped like vLLM's completion chunks (vLLM streams one per
generated token); the ASGI app is called directly (no sockets, no vLLM), so only the middleware's own work is
measured, in process CPU time of all threads (the span exporter's thread included: spans are written to a
JSON-lines file as ``weightwatch serve --span-file`` does, and flushed inside the timed window). Variants:

* ``bare``: the endpoint alone (vLLM without weightwatch);
* ``first-byte``: weightwatch's first-byte middleware alone;
* ``otel``: OpenTelemetry's FastAPI instrumentation alone, as the plugin configures it (no send spans), every
  request traced;
* ``weightwatch``: what ``weightwatch serve`` loads (middleware, instrumentation, fast path, default
  ``WEIGHTWATCH_TRACE_GENERATION=parent``), requests without a ``traceparent`` (not traced);
* ``weightwatch, traced``: the same app, every request with a ``traceparent`` (a server span each);
* ``weightwatch, traced, no fast path``: as above without the fast path (OpenTelemetry's wrappers on every chunk).

Variants run interleaved, several times; the table shows the median per chunk, the difference to ``bare``
and that difference as a share of vLLM's own API-server CPU per token under the 256-stream load
(``--api-us-per-token``, by default the plain server's median from bench_inference_lane.py part 2). That share
is the most weightwatch can take from tokens/s: all of it if the API server is the bottleneck, less when the
engine is. Prints the table and writes it to benchmarks/results/inference_overhead.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.responses import StreamingResponse

import weightwatch

HERE = Path(__file__).resolve().parent
CHUNK = b'data: {"id":"cmpl-0","object":"text_completion","created":0,"model":"m","choices":[{"index":0,"text":" tok","logprobs":null,"finish_reason":null}]}\n\n'
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

#: variant -> (what to load, whether requests carry a traceparent)
VARIANTS: dict[str, tuple[str, bool]] = {
    "bare": ("bare", False),
    "first-byte": ("first-byte", False),
    "otel": ("otel", False),
    "weightwatch": ("weightwatch", False),
    "weightwatch, traced": ("weightwatch", True),
    "weightwatch, traced, no fast path": ("weightwatch-no-fast-path", True),
}


def build(kind: str, chunks: int) -> Any:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions() -> StreamingResponse:
        async def gen():  # type: ignore[no-untyped-def]
            for _ in range(chunks):
                yield CHUNK

        return StreamingResponse(gen(), media_type="text/event-stream")

    if kind in ("otel", "weightwatch", "weightwatch-no-fast-path"):
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        from weightwatch.inference.plugin import OTEL_EXCLUDED

        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=weightwatch.get().tracer_provider, excluded_urls=OTEL_EXCLUDED, exclude_spans=["receive", "send"]
        )
    if kind in ("first-byte", "weightwatch", "weightwatch-no-fast-path"):
        from weightwatch.inference.config import ADMIN_PATHS, QUIET_PATHS, InferenceConfig
        from weightwatch.inference.middleware import wrap_outermost

        wrap_outermost(
            app,
            admin_paths=ADMIN_PATHS,
            quiet_paths=QUIET_PATHS,
            otel_fast_path=kind != "weightwatch-no-fast-path",
            trace_generation=InferenceConfig().trace_generation,
        )
    return app


async def cpu_per_chunk(app: Any, requests: int, chunks: int, traceparent: bool) -> float:
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"accept", b"*/*"), (b"user-agent", b"bench")]
    if traceparent:
        headers.append((b"traceparent", TRACEPARENT))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
        "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip

    async def receive() -> dict:
        await asyncio.sleep(3600)  # the client never disconnects; the response ends first
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        return None

    provider = weightwatch.get().tracer_provider
    t0 = time.process_time()
    for _ in range(requests):
        await app(dict(scope), receive, send)
    provider.force_flush()  # the exporter thread's work for these spans counts too
    return (time.process_time() - t0) / (requests * chunks) * 1e6


def measure(
    requests: int, chunks: int, repeats: int, variants: dict[str, tuple[str, bool]] = VARIANTS
) -> tuple[dict[str, list[float]], int]:
    """µs of process CPU per chunk, ``repeats`` values per variant (interleaved), and the number of spans exported."""
    span_dir = Path(tempfile.mkdtemp(prefix="ww-bench-overhead-"))
    weightwatch.setup(role="inference", registry=CollectorRegistry(), set_global_tracer_provider=False, span_file=span_dir / "spans.jsonl")
    apps = {kind: build(kind, chunks) for kind in {k for k, _ in variants.values()}}
    results: dict[str, list[float]] = {v: [] for v in variants}
    for kind, traced in variants.values():
        asyncio.run(cpu_per_chunk(apps[kind], 20, chunks, traced))  # warm up
    for _ in range(repeats):
        for v, (kind, traced) in variants.items():
            results[v].append(asyncio.run(cpu_per_chunk(apps[kind], requests, chunks, traced)))
    spans = sum(1 for _ in (span_dir / "spans.jsonl").open()) if (span_dir / "spans.jsonl").exists() else 0
    return results, spans


def measure_request_path(requests: int, chunks: int, repeats: int) -> dict[str, list[float]]:
    """µs per chunk of the bare app and of weightwatch's request path, default and traced: what the throughput
    benchmarks set against tokens/s."""
    runs, _ = measure(requests, chunks, repeats, {v: VARIANTS[v] for v in ("bare", "weightwatch", "weightwatch, traced")})
    return runs


def api_us_per_token_from_lane_results(path: Path) -> float | None:
    """vLLM's own API-server CPU per token (plain server, median of part 2's rounds), if a run left one."""
    try:
        rows = json.loads(path.read_text())["part2"]["rounds"]
        return float(statistics.median(row["plain vLLM api cpu ms/1k tok"] for row in rows))  # ms per 1k = us per token
    except (OSError, KeyError, ValueError, TypeError, statistics.StatisticsError):
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--chunks", type=int, default=256, help="chunks (tokens) per streamed completion")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument(
        "--api-us-per-token",
        type=float,
        default=None,
        help="vLLM's API-server CPU per token to compare against (default: from benchmarks/results/inference_lane.json)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "inference_overhead.md")
    args = p.parse_args()
    results, spans = measure(args.requests, args.chunks, args.repeats)
    api = args.api_us_per_token
    api_source = "--api-us-per-token"
    if api is None:
        api = api_us_per_token_from_lane_results(HERE / "results" / "inference_lane.json")
        api_source = "plain vLLM's median in benchmarks/results/inference_lane.json (part 2)"
    base = statistics.median(results["bare"])
    lines = [
        "# Server-side instrumentation: CPU per streamed token",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, {os.cpu_count()} cores. "
        f"`python -m benchmarks.bench_inference_overhead --requests {args.requests} --chunks {args.chunks} --repeats {args.repeats}`: "
        f"{args.requests} requests x {args.chunks} chunks, {args.repeats} interleaved repeats; process CPU microseconds per chunk "
        f"(one chunk per generated token), span export to a file included ({spans:,} spans written).",
        "",
        "| variant | traceparent | median µs/chunk | min | max | added vs bare | share of vLLM's API-server CPU per token |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, (_, traced) in VARIANTS.items():
        med = statistics.median(results[v])
        share = f"{(med - base) / api * 100:+.2f} %" if api else "n/a"
        lines.append(
            f"| {v} | {'yes' if traced else 'no'} | {med:.2f} | {min(results[v]):.2f} | {max(results[v]):.2f} | {med - base:+.2f} | {share} |"
        )
    lines.append("")
    if api:
        lines.append(f"vLLM's API-server CPU per token under 256 streams: {api:.0f} µs ({api_source}).")
        for v in ("weightwatch", "weightwatch, traced"):
            share = (statistics.median(results[v]) - base) / api * 100
            verdict = "within" if share <= 1.0 else "over"
            lines.append(f"* {v}: {share:+.2f} % of it, {verdict} the 1 % budget.")
    else:
        lines.append("No API-server CPU per token to compare against: run bench_inference_lane.py or pass --api-us-per-token.")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
