"""What AdminHTTPXInstrumentor costs: the same httpx client, instrumented and not, alternating, one run.

* Admin calls: ``POST /update_weights`` (the lane of a real ``weightwatch serve`` on vLLM CPU when vLLM is
  importable, else ``/pause`` on a real uvicorn app in its own process), 200+ calls per side, the side of
  each pair drawn at random. Wall p50/p99 per side and the ratio instrumented/plain with a bootstrap 95 %
  interval. The instrumented side records everything a user gets: span (to a span file), events (to a
  log file), metrics, traceparent, pool-wait probe.
* Generation calls: streamed ``/v1/completions`` through the same client, same alternation: the ratio.
* The per-request cost on a non-admin request, in microseconds: the instrumentor's wrapper around a
  coroutine that does nothing, against the bare coroutine (200,000 calls, best of 7 repeats), so the
  number is the wrapper itself and not the network's noise.

The server runs in its own process; the machine's 2 cores are shared with it and with whatever else
runs (the load average before and after is printed). Run from the worktree root:

    python -m benchmarks.bench_instrumentor [--server auto|vllm|uvicorn] [--calls 200] [--gen-calls 200]

Prints a table and writes benchmarks/results/instrumentor.md (and .json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


# --------------------------------------------------------------------------- the fallback server (its own process)


def serve(port: int) -> None:
    """A real uvicorn app with the admin routes and a streamed completion route (used without vLLM)."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()

    @app.post("/pause")
    async def pause() -> Any:
        t0 = time.perf_counter()
        await asyncio.sleep(0.005)  # an engine call that yields to the loop, as vLLM's does
        ms = (time.perf_counter() - t0) * 1000
        return JSONResponse({"status": "ok", "op": "pause", "paused": True, "inflight": 0, "server_ms": ms},
                            headers={"Server-Timing": f"server;dur={ms:.3f}"})

    @app.post("/v1/completions")
    async def completions() -> Any:
        async def stream():  # type: ignore[no-untyped-def]
            for i in range(4):
                yield f'data: {{"i": {i}}}\n\n'.encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> Any:
        return {"ok": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --------------------------------------------------------------------------- statistics


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def ratio_ci(instr: list[float], plain: list[float], q: float, n_boot: int = 2000, seed: int = 1) -> tuple[float, float, float]:
    """Ratio of the q-th percentiles (instrumented / plain) and its bootstrap 95 % interval."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(instr), np.asarray(plain)
    point = float(np.percentile(a, q) / np.percentile(b, q))
    ia = rng.integers(0, len(a), size=(n_boot, len(a)))
    ib = rng.integers(0, len(b), size=(n_boot, len(b)))
    boots = np.percentile(a[ia], q, axis=1) / np.percentile(b[ib], q, axis=1)
    return point, float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


# --------------------------------------------------------------------------- measurements


async def alternate(client: httpx.AsyncClient, call: Callable[[], Awaitable[None]], n: int, seed: int) -> dict[str, list[float]]:
    """n pairs of calls, one plain and one instrumented in random order; wall ms per call, and the client
    process's CPU µs per call (``<side>_cpu_us``: what the recording itself costs, much less disturbed by the
    other jobs on the machine than the wall time)."""
    from weightwatch.orchestrator import AdminHTTPXInstrumentor

    inst = AdminHTTPXInstrumentor()
    rng = random.Random(seed)
    out: dict[str, list[float]] = {"plain": [], "instrumented": [], "plain_cpu_us": [], "instrumented_cpu_us": []}
    for _ in range(n):
        sides = ["plain", "instrumented"]
        rng.shuffle(sides)
        for side in sides:
            if side == "instrumented":
                inst.instrument_client(client)
            c0, t0 = time.thread_time(), time.perf_counter()
            await call()
            out[side].append((time.perf_counter() - t0) * 1000.0)
            out[side + "_cpu_us"].append((time.thread_time() - c0) * 1e6)
            if side == "instrumented":
                inst.uninstrument_client(client)
    return out


def wrapper_cost_us(repeats: int = 7, n: int = 200_000) -> dict[str, float]:
    """Microseconds the instrumentor adds to one non-admin request: its ``send`` wrapper around a no-op ``send``."""
    from weightwatch.orchestrator import AdminHTTPXInstrumentor

    request = httpx.Request("POST", "http://127.0.0.1:8000/v1/completions", json={"prompt": "x", "stream": True})

    async def send(client: Any, req: httpx.Request, **kwargs: Any) -> None:
        return None

    wrapped = AdminHTTPXInstrumentor().async_send_wrapper(send)  # exactly what instrument() installs, around a no-op

    async def loop(fn: Callable[..., Awaitable[None]]) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await fn(None, request)
        return (time.perf_counter() - t0) / n * 1e6

    async def run() -> dict[str, float]:
        bare, inst_t = [], []
        for _ in range(repeats):
            bare.append(await loop(send))
            inst_t.append(await loop(wrapped))
        return {"bare_us": min(bare), "wrapped_us": min(inst_t), "added_us": min(inst_t) - min(bare),
                "added_us_median": statistics.median(inst_t) - statistics.median(bare)}

    return asyncio.run(run())


# --------------------------------------------------------------------------- servers


def tiny_model_dir(work: Path) -> Path:
    from weightwatch.inference.tiny_model import make_tiny_model

    cached = os.environ.get("WEIGHTWATCH_TINY_MODEL_DIR")
    return make_tiny_model(Path(cached) if cached else work / "tiny-model")


def vllm_importable() -> bool:
    from benchmarks.servers import vllm_available

    return vllm_available()


async def run_client(a: argparse.Namespace, target: dict[str, Any]) -> dict[str, Any]:
    headers = target.get("headers", {})
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:

        async def admin_call() -> None:
            r = await client.post(target["admin_url"], json=target.get("admin_body"), headers=headers)
            r.raise_for_status()

        async def gen_call() -> None:
            body = {"model": target["model"], "prompt": "hello there", "max_tokens": 4, "stream": True}
            async with client.stream("POST", target["gen_url"], json=body) as r:
                r.raise_for_status()
                async for _ in r.aiter_bytes():
                    pass

        for _ in range(10):  # warm the connections and both code paths
            await admin_call()
            await gen_call()
        cpu0 = time.process_time()
        admin = await alternate(client, admin_call, a.calls, seed=1)
        gen = await alternate(client, gen_call, a.gen_calls, seed=2)
        return {"admin": admin, "gen": gen, "client_cpu_s": time.process_time() - cpu0}


def measure(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    import weightwatch

    kind = a.server
    if kind == "auto":
        kind = "vllm" if vllm_importable() else "uvicorn"
    proc = None
    server = None
    tele = weightwatch.setup("bench-instrumentor", role="orchestrator", log_file=work / "orchestrator.log",
                             span_file=work / "orchestrator.spans.jsonl")
    try:
        if kind == "vllm":
            from benchmarks.servers import start_weightwatch_server, wait_ready

            model = tiny_model_dir(work)
            server = start_weightwatch_server(model, work / "server")
            wait_ready(server)
            assert server.weights_root is not None
            ckpt = server.weights_root / "step_1"
            ckpt.mkdir(exist_ok=True)
            for f in model.iterdir():
                if f.is_file():
                    shutil.copy2(f, ckpt / f.name)
            target = {
                "admin_url": f"{server.admin_url}/update_weights",
                "admin_body": {"weight_dir": str(ckpt)},
                "headers": server.admin_headers(),
                "gen_url": f"{server.base_url}/v1/completions",
                "model": server.model_name,
                "what": "weightwatch serve (vLLM CPU, tiny model): POST /update_weights on the admin lane",
            }
        else:
            from benchmarks.servers import free_port

            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_instrumentor", "--serve-port", str(port)],
                                    start_new_session=True)
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the uvicorn app did not start")
                time.sleep(0.2)
            target = {
                "admin_url": f"http://127.0.0.1:{port}/pause?mode=keep",
                "gen_url": f"http://127.0.0.1:{port}/v1/completions",
                "model": "none",
                "what": "uvicorn app in its own process: POST /pause (5 ms engine call)",
            }
        load0 = os.getloadavg()
        res = asyncio.run(run_client(a, target))
        load1 = os.getloadavg()
        res.update(server=kind, what=target["what"], load_before=load0, load_after=load1, cpus=os.cpu_count())
        return res
    finally:
        tele.force_flush()
        if server is not None:
            server.stop()
        if proc is not None:
            from benchmarks.servers import stop_process_group

            stop_process_group(proc)


# --------------------------------------------------------------------------- report


def rows_for(name: str, s: dict[str, list[float]]) -> dict[str, Any]:
    plain, instr = s["plain"], s["instrumented"]
    r50 = ratio_ci(instr, plain, 50)
    r99 = ratio_ci(instr, plain, 99)
    return {
        "calls": name,
        "n_per_side": len(plain),
        "plain_p50_ms": pct(plain, 50),
        "instr_p50_ms": pct(instr, 50),
        "plain_p99_ms": pct(plain, 99),
        "instr_p99_ms": pct(instr, 99),
        "ratio_p50": r50,
        "ratio_p99": r99,
        "added_p50_ms": pct(instr, 50) - pct(plain, 50),
        "plain_cpu_us_p50": pct(s["plain_cpu_us"], 50),
        "instr_cpu_us_p50": pct(s["instrumented_cpu_us"], 50),
        "added_cpu_us_p50": pct(s["instrumented_cpu_us"], 50) - pct(s["plain_cpu_us"], 50),
        "added_cpu_share_of_wall_p50": (pct(s["instrumented_cpu_us"], 50) - pct(s["plain_cpu_us"], 50)) / 1000.0 / pct(plain, 50),
    }


def report(res: dict[str, Any], micro: dict[str, float]) -> str:
    rows = [rows_for("admin (" + res["what"].split(": ")[-1] + ")", res["admin"]), rows_for("generation (streamed /v1/completions)", res["gen"])]
    lines = [
        "# AdminHTTPXInstrumentor overhead",
        "",
        f"Server: {res['what']}. Same httpx.AsyncClient, instrumented (instrument_client) and plain, alternating in random order",
        f"per pair, {rows[0]['n_per_side']} admin and {rows[1]['n_per_side']} generation calls per side, one run. The instrumented side",
        "writes spans to a file, events to a log file and the metrics, as a user's orchestrator would.",
        f"CPU: {res['cpus']} cores shared by the client process, the server process and other jobs on the machine "
        f"(load average {res['load_before'][0]:.2f} before, {res['load_after'][0]:.2f} after); client CPU {res['client_cpu_s']:.1f} s.",
        "",
        "| calls | n/side | plain p50 ms | instr p50 ms | plain p99 ms | instr p99 ms | ratio p50 (95 % CI) | ratio p99 (95 % CI) | added p50 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['calls']} | {r['n_per_side']} | {r['plain_p50_ms']:.3f} | {r['instr_p50_ms']:.3f} | {r['plain_p99_ms']:.3f} | "
            f"{r['instr_p99_ms']:.3f} | {r['ratio_p50'][0]:.4f} ({r['ratio_p50'][1]:.4f}-{r['ratio_p50'][2]:.4f}) | "
            f"{r['ratio_p99'][0]:.3f} ({r['ratio_p99'][1]:.3f}-{r['ratio_p99'][2]:.3f}) | {r['added_p50_ms']:+.3f} |"
        )
    lines += [
        "",
        "Client CPU per call (the event loop's thread, median; the recording runs on it, so instrumented minus plain is its cost):",
        "",
        "| calls | plain CPU µs | instr CPU µs | added CPU µs | added / plain wall p50 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['calls']} | {r['plain_cpu_us_p50']:.0f} | {r['instr_cpu_us_p50']:.0f} | {r['added_cpu_us_p50']:+.0f} | "
                     f"{r['added_cpu_share_of_wall_p50'] * 100:+.3f} % |")
    lines += [
        "",
        "Per-request cost on a non-admin request (the instrumentor's send wrapper around a send that does nothing, 200,000 calls, best of 7):",
        "",
        "| bare call µs | through the wrapper µs | added µs (best) | added µs (median) |",
        "|---|---|---|---|",
        f"| {micro['bare_us']:.3f} | {micro['wrapped_us']:.3f} | {micro['added_us']:.3f} | {micro['added_us_median']:.3f} |",
        "",
        "Target: at most 1 % on an admin call's wall time (ratio p50 <= 1.01) and nothing measurable on generation calls.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", choices=("auto", "vllm", "uvicorn"), default="auto")
    p.add_argument("--calls", type=int, default=200, help="admin calls per side (default 200)")
    p.add_argument("--gen-calls", type=int, default=200, help="generation calls per side (default 200)")
    p.add_argument("--results", type=Path, default=RESULTS / "instrumentor.md")
    p.add_argument("--serve-port", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve_port is not None:
        serve(a.serve_port)
        return
    if a.calls < 100 or a.gen_calls < 100:
        p.error("--calls and --gen-calls must be at least 100 (percentiles over fewer samples mean little)")
    with tempfile.TemporaryDirectory(prefix="bench-instrumentor-") as tmp:
        res = measure(a, Path(tmp))
    micro = wrapper_cost_us()
    text = report(res, micro)
    print(text)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text(text)
    a.results.with_suffix(".json").write_text(json.dumps({"result": res, "wrapper": micro}, indent=1, default=str))


if __name__ == "__main__":
    main()
