"""Benchmark: `weightwatch analyze` against the classic grep | sed | awk pipeline on the same big log.

    python -m benchmarks.bench_analyze              # ~1 GB, 6 M lines (as in MEASUREMENTS.md)
    python -m benchmarks.bench_analyze --lines 600000 --repeat 1   # a quick run

Generates an orchestrator log with loguru-style prefixes (a quarter `client.done`, the rest `client.send`,
generation batches and free-text step lines) in a temp dir, runs both side by side (alternating, page
cache warm for both), prints a table of seconds, MB/s and the ratio, and writes benchmarks/results/analyze.md.
The pipeline only computes mean/stddev/max of queue_ms; weightwatch does the full join by trace id,
diagnosis per update and percentiles of every measure.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIPELINE = (
    "grep '\\[weights\\]' {path} | sed -n 's/.*queue_ms=\\([0-9.]*\\).*/\\1/p' "
    "| awk '{{s+=$1; ss+=$1*$1; n++; if ($1>m) m=$1}} END {{print n, s/n, sqrt(ss/n-(s/n)^2), m}}'"
)
PREFIX = "2026-11-26 12:{m:02d}:{s:02d}.{ms:03d} | INFO     | prime_rl.orchestrator.orchestrator:{fn}:{ln} - "


def generate(path: Path, lines: int, seed: int = 0) -> None:
    """Write ``lines`` lines: per update one client.send, one gen batch, one step line, one client.done."""
    rnd = random.Random(seed)
    t = 1.79e9
    with open(path, "w", buffering=1 << 22) as f:
        for i in range(lines // 4):
            tid = f"{rnd.getrandbits(128):032x}"
            t += 0.5
            stamp = dict(m=i // 60000 % 60, s=i // 1000 % 60, ms=i % 1000)
            q = rnd.lognormvariate(3, 1.5)
            r = rnd.uniform(10, 400)
            f.write(
                PREFIX.format(fn="update", ln=412, **stamp)
                + f"[weights][{tid}] client.send url=http://10.0.0.{i % 8}:8000/update_weights op=update_weights t={t:.6f}\n"
                + PREFIX.format(fn="generate", ln=230, **stamp)
                + f"[gen] batch.done completions={rnd.randint(1, 256)} dur_ms={rnd.uniform(100, 3000):.3f} inflight={rnd.randint(0, 256)}\n"
                + PREFIX.format(fn="loop", ln=88, **stamp)
                + f"step {i} loss={rnd.random():.5f} reward={rnd.random():.4f} lr=1e-6 tokens_per_s=6300.5 mfu=0.41\n"
                + PREFIX.format(fn="update", ln=431, **stamp)
                + f"[weights][{tid}] client.done wall_ms={q + r:.3f} rpc_ms={r:.3f} queue_ms={q:.3f}\n"
            )


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _time(cmd: list[str] | str, shell: bool = False, ok: tuple[int, ...] = (0,)) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds of every process it ran (pipeline stages, pool workers), stdout."""
    c0, t0 = _cpu(), time.perf_counter()
    proc = subprocess.run(cmd, shell=shell, capture_output=True, text=True)
    elapsed, cpu = time.perf_counter() - t0, _cpu() - c0
    if proc.returncode not in ok:
        raise SystemExit(f"{cmd} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed, cpu, proc.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=6_000_000, help="lines to generate (default 6 M, about 1 GB)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side (the median is reported)")
    ap.add_argument("--jobs", type=int, default=None, help="weightwatch analyze --jobs (default: all cores)")
    ap.add_argument("--keep", type=Path, default=None, help="reuse/keep the generated log at this path")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "analyze.md")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="ww-bench-"))
    path = args.keep or tmp / "orchestrator.log"
    try:
        if not path.exists():
            t0 = time.perf_counter()
            generate(path, args.lines)
            print(f"generated {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        size = path.stat().st_size
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache for both
        ww = [sys.executable, "-m", "weightwatch", "analyze", str(path), "--format", "json", "--updates-limit", "0"]
        if args.jobs:
            ww += ["--jobs", str(args.jobs)]
        pipe_t, ww_t, pipe_c, ww_c, loads = [], [], [], [], []
        pipe_out = ww_out = ""
        for _ in range(args.repeat):  # alternate so both see the same machine load
            loads.append(os.getloadavg()[0])
            t, c, pipe_out = _time(PIPELINE.format(path=str(path)), shell=True)
            pipe_t.append(t)
            pipe_c.append(c)
            t, c, ww_out = _time(ww, ok=(0, 3))  # 3 = some update breached the queue threshold: expected here
            ww_t.append(t)
            ww_c.append(c)
        import json

        report = json.loads(ww_out)
        q = report["measures"]["queue_ms"]
        mb = size / 1e6
        p, w = statistics.median(pipe_t), statistics.median(ww_t)
        pc, wc = statistics.median(pipe_c), statistics.median(ww_c)
        rows = [
            ("grep \\| sed \\| awk (mean, stddev, max of queue_ms)", p, mb / p, pc, mb / pc),
            ("weightwatch analyze (join, diagnosis, percentiles)", w, mb / w, wc, mb / wc),
        ]
        cpu = os.cpu_count()
        lines = [
            f"# analyze benchmark: {args.lines:,} lines, {mb:,.0f} MB, {cpu} cores, median of {args.repeat}",
            "",
            f"1-minute load average before each run: {', '.join(f'{x:.1f}' for x in loads)} (other jobs share the {cpu} cores)",
            "",
            "| tool | wall s | MB/s (wall) | CPU s (all processes) | MB per CPU-second |",
            "|---|---:|---:|---:|---:|",
            *[f"| {name} | {s:.2f} | {r:.0f} | {c:.2f} | {rc:.0f} |" for name, s, r, c, rc in rows],
            "",
            f"**ratio of throughput, weightwatch / pipeline: {p / w:.2f}x wall, {pc / wc:.2f}x per CPU-second** (target: at least 2x)",
            "",
            f"all runs, wall seconds: pipeline {', '.join(f'{x:.2f}' for x in pipe_t)}; weightwatch {', '.join(f'{x:.2f}' for x in ww_t)}",
            f"all runs, CPU seconds: pipeline {', '.join(f'{x:.2f}' for x in pipe_c)}; weightwatch {', '.join(f'{x:.2f}' for x in ww_c)}",
            "ratio in each back-to-back pair (pipeline / weightwatch): wall "
            + ", ".join(f"{a / b:.2f}x" for a, b in zip(pipe_t, ww_t, strict=True))
            + "; CPU " + ", ".join(f"{a / b:.2f}x" for a, b in zip(pipe_c, ww_c, strict=True)),
            "(CPU seconds are the load-robust figure: wall time depends on how much of the 2 cores other jobs leave)",
            "",
            f"pipeline printed (n mean stddev max): `{pipe_out.strip()}`",
            f"weightwatch: {report['updates_summary']['count']:,} updates joined, queue_ms mean {q['mean']:.3f} stddev {q['stddev']:.3f} "
            f"p50 {q['p50']:.3f} p95 {q['p95']:.3f} p99 {q['p99']:.3f} max {q['max']:.3f}, verdict {report['verdict']['signature']}",
        ]
        text = "\n".join(lines) + "\n"
        print(text)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
