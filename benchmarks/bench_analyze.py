"""Benchmark: `weightwatch analyze` against the seed's grep | sed | awk pipeline on the same log, of the real shape.

    python -m benchmarks.bench_analyze                   # ~1 GB (5.3 M lines), twice each side
    python -m benchmarks.bench_analyze --lines 200000    # the quick mode (~40 MB)
    python -m benchmarks.bench_analyze --engines 400000  # also compare the candidate engines (docs/analyze.md)

The log is what weightwatch's own emitters write, made with the project's formatter (events.format_event) behind
the standard logging prefix (``%(asctime)s %(levelname)s %(name)s %(message)s``): ``client.send`` with
url/op/t/attempt/pool/step, ``client.done`` with wall_ms/rpc_ms/queue_ms then server_ms/pool_wait_ms/status/ok/
attempts/op/url/step, checkpoint waits, generation batches, rollout lines, and per step one weight sync
(sync.start, pause -> update_weights -> resume on 4 servers, sync.done).

Both sides run alternately in one run (page cache warm for both), each timed for wall seconds, CPU seconds
(every process it started) and peak RSS, beside the floor ``grep -c queue_ms=``. The pipeline computes mean,
stddev and max of queue_ms; weightwatch does the full join by trace id, the sync phases and signatures,
diagnosis per call and percentiles of every measure. Results: benchmarks/results/analyze.md (+ .json).
"""

from __future__ import annotations

import argparse
import json
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
from typing import Any, TextIO

from weightwatch.contracts import PATH_BY_OP
from weightwatch.events import format_event

PIPELINE = (
    "grep 'queue_ms=' {path} | sed -n 's/.*queue_ms=\\([0-9.]*\\).*/\\1/p' "
    "| awk '{{s+=$1; ss+=$1*$1; n++; if ($1>m) m=$1}} END {{printf \"%d %.6f %.6f %.6f\\n\", n, s/n, sqrt(ss/n-(s/n)^2), m}}'"
)
FLOOR = "grep -c queue_ms= {path}"
LINES_PER_GB = 5_300_000

SERVERS = tuple(f"10.0.0.{i}:8000" for i in range(1, 5))
_OPS = ("pause", "update_weights", "resume")


def _prefix(t: float, name: str) -> str:
    ms = int((t % 1) * 1000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + f",{ms:03d} INFO {name} "


def write_step(f: TextIO, rnd: random.Random, step: int, t: float) -> tuple[float, int]:
    """One training step's lines; returns (the clock after it, lines written)."""
    orch = "weightwatch.orchestrator"
    n = 0
    out: list[str] = []
    wait = rnd.uniform(20, 400)
    out.append(_prefix(t, orch) + format_event("ckpt.wait.start", target_step=step, path=f"/ckpt/step_{step}"))
    t += wait / 1000
    out.append(_prefix(t, orch) + format_event("ckpt.wait.done", target_step=step, wait_ms=wait))
    for _ in range(3):
        inflight = rnd.randint(64, 256)
        out.append(_prefix(t, orch) + format_event("gen.batch.start", inflight=inflight, target_batch=256))
        dur = rnd.uniform(200, 2000)
        t += dur / 1000
        out.append(_prefix(t, orch) + format_event("gen.batch.done", completions=256, dur_ms=dur, inflight=rnd.randint(0, 64)))
    out.append(_prefix(t, orch) + format_event("rollout", trunc_pct=rnd.uniform(0, 2), current_step=step, ckpt_step=step - 1,
                                               staleness=1, async_level=2))
    tid = f"{rnd.getrandbits(128):032x}"
    out.append(_prefix(t, orch) + format_event("weights.sync.start", tid, step=step, servers=len(SERVERS), t=t))
    phase_ms = {}
    t0 = t
    for op in _OPS:
        slowest = 0.0
        for srv in SERVERS:
            url = f"http://{srv}{PATH_BY_OP[op]}"
            out.append(_prefix(t, orch) + format_event("weights.client.send", tid, url=url, op=op, t=t, attempt=1, pool="dedicated",
                                                       step=step))
            q = rnd.lognormvariate(2.5, 1.2)
            r = rnd.uniform(50, 400) if op == "update_weights" else rnd.uniform(1, 40)
            server_ms = r + rnd.uniform(0.2, 2)
            wall = q + server_ms
            slowest = max(slowest, wall)
            out.append(_prefix(t + wall / 1000, orch) + format_event(
                "weights.client.done", tid, wall_ms=wall, rpc_ms=r, queue_ms=q, server_ms=server_ms, pool_wait_ms=rnd.uniform(0, 1),
                status=200, ok=1, attempts=1, op=op, url=url, step=step))
        phase_ms[op] = slowest
        t += slowest / 1000
    out.append(_prefix(t, orch) + format_event("weights.sync.done", tid, step=step, wall_ms=(t - t0) * 1000, pause_ms=phase_ms["pause"],
                                               transfer_ms=phase_ms["update_weights"], resume_ms=phase_ms["resume"], ok=1))
    n = len(out)
    f.write("\n".join(out) + "\n")
    return t + 0.01, n


def generate(path: Path, lines: int, seed: int = 0) -> int:
    """Write about ``lines`` lines (whole steps) to ``path``; returns the number written."""
    rnd = random.Random(seed)
    t, written, step = 1.795e9, 0, 1
    with open(path, "w", buffering=1 << 22) as f:
        while written < lines:
            t, n = write_step(f, rnd, step, t)
            written += n
            step += 1
    return written


class _Children:
    """CPU seconds and peak RSS of finished children, from getrusage deltas (subprocess reaps them itself)."""

    def __enter__(self) -> _Children:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu0 = r.ru_utime + r.ru_stime
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.wall = time.perf_counter() - self.t0
        self.cpu = r.ru_utime + r.ru_stime - self.cpu0


def timed(cmd: list[str] | str, shell: bool = False, ok: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """Wall and CPU seconds of every process the command ran, and the peak RSS of its largest (/usr/bin/time)."""
    argv = ["/usr/bin/time", "-f", "%M", *(["bash", "-c", cmd] if shell else cmd)]  # type: ignore[list-item]
    with _Children() as c:
        proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode not in ok:
        raise SystemExit(f"{cmd} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rss = int(proc.stderr.strip().splitlines()[-1]) / 1024
    return {"wall_s": c.wall, "cpu_s": c.cpu, "rss_mb": rss, "out": proc.stdout}


# --------------------------------------------------------------------------- candidate engines (docs/analyze.md)

_ENGINE_FIELDS = ("wall_ms", "rpc_ms", "queue_ms", "server_ms", "op", "url", "step", "t")


def engine_re(path: Path) -> int:
    """Plain ``re`` over mmap: one bytes regex finds every tagged line, a token loop takes its fields."""
    import mmap
    import re

    line = re.compile(rb"\[(weights|ckpt|gen|rollout)\](?:\[([^\]\s]*)\])?[ \t]*(\S*)([^\n]*)")
    cols: dict[bytes, list[bytes | None]] = {f.encode(): [] for f in _ENGINE_FIELDS}
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for _tag, _tid, _name, rest in line.findall(mm):
            d = dict(t.split(b"=", 1) for t in rest.split() if b"=" in t)
            for k, v in cols.items():
                v.append(d.get(k))
    return sum(v is not None for v in cols[b"queue_ms"])


def _arrow_lines(data: bytes) -> Any:
    import numpy as np
    import pyarrow as pa

    nl = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    offsets = np.zeros(len(nl) + 1, dtype=np.int64)
    offsets[1:] = nl + 1
    return pa.Array.from_buffers(pa.large_string(), len(nl), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


_HEAD = r"\[(?P<tag>weights|ckpt|gen|rollout)\](?:\[(?P<tid>[^\]\s]*)\])?\s*(?P<name>\S*)"


def engine_pyarrow(path: Path) -> int:
    import pyarrow.compute as pc

    s = _arrow_lines(path.read_bytes())
    s = pc.filter(s, pc.match_substring_regex(s, r"\[(weights|ckpt|gen|rollout)\]"))
    pc.extract_regex(s, _HEAD)
    out = {f: pc.struct_field(pc.extract_regex(s, r"\s" + f + r"=(?P<v>\S*)"), "v") for f in _ENGINE_FIELDS}
    return int(pc.sum(pc.is_valid(out["queue_ms"])).as_py())


def engine_polars(path: Path) -> int:
    import polars as pl

    df = pl.DataFrame({"line": pl.from_arrow(_arrow_lines(path.read_bytes()))})
    df = df.filter(pl.col("line").str.contains(r"\[(weights|ckpt|gen|rollout)\]"))
    df = df.with_columns(pl.col("line").str.extract_groups(_HEAD).alias("head"),
                         *(pl.col("line").str.extract(r"\s" + f + r"=(\S*)", 1).alias(f) for f in _ENGINE_FIELDS))
    return int(df["queue_ms"].is_not_null().sum())


def engine_duckdb(path: Path) -> int:
    import duckdb

    sel = ", ".join(f"regexp_extract(line, '\\s{f}=(\\S*)', 1) AS {f}" for f in _ENGINE_FIELDS)
    q = f"""
      WITH l AS (SELECT column0 AS line FROM read_csv('{path}', delim='\x01', header=false, quote='', escape='',
                 columns={{'column0': 'VARCHAR'}}, auto_detect=false)),
      t AS (SELECT line, regexp_extract(line, '{_HEAD}', ['tag', 'tid', 'name']) AS head FROM l
            WHERE regexp_matches(line, '\\[(weights|ckpt|gen|rollout)\\]'))
      SELECT count(*) FILTER (WHERE queue_ms <> '') FROM (SELECT {sel} FROM t)"""
    return int(duckdb.connect().sql(q).fetchone()[0])  # type: ignore[index]


def engine_weightwatch(path: Path) -> int:
    from weightwatch.analysis import scan

    b = scan.scan(path.read_bytes())
    return int(b.frame["queue_ms"].is_not_null().sum())


ENGINES = {"re over mmap": engine_re, "pyarrow.compute": engine_pyarrow, "polars": engine_polars, "duckdb": engine_duckdb,
           "weightwatch scan (polars, the full grammar)": engine_weightwatch}


def compare_engines(path: Path, repeat: int) -> list[dict[str, Any]]:
    """Each candidate in its own process (alternating), wall and CPU seconds: reading the real shape into columns."""
    out = []
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in ENGINES}
    for _ in range(repeat):
        for name in ENGINES:
            code = f"from pathlib import Path; from benchmarks.bench_analyze import ENGINES; print(ENGINES[{name!r}](Path({str(path)!r})))"
            try:
                runs[name].append(timed([sys.executable, "-c", code]))
            except SystemExit as exc:
                print(f"engine {name} unavailable: {str(exc)[-300:]}", file=sys.stderr)
    for name, rs in runs.items():
        if rs:
            out.append({"engine": name, "wall_s": statistics.median(r["wall_s"] for r in rs), "cpu_s": statistics.median(r["cpu_s"] for r in rs),
                        "queue_ms_values": int(rs[0]["out"].strip() or 0), "runs": len(rs)})
    return out


# --------------------------------------------------------------------------- the benchmark


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=LINES_PER_GB, help=f"lines to generate (default {LINES_PER_GB:,}, about 1 GB)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each side, alternating (default 2)")
    ap.add_argument("--keep", type=Path, default=None, help="reuse/keep the generated log at this path")
    ap.add_argument("--engines", type=int, default=0, metavar="LINES", help="also compare the candidate engines on the first LINES lines")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "analyze.md")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="ww-bench-"))
    path = args.keep or tmp / "orchestrator.log"
    try:
        if not path.exists():
            t0 = time.perf_counter()
            n = generate(path, args.lines)
            print(f"generated {n:,} lines, {path.stat().st_size / 1e6:,.0f} MB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        size = path.stat().st_size
        n_lines = sum(1 for _ in open(path, "rb"))
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache for both
        ww = [sys.executable, "-m", "weightwatch", "analyze", str(path), "--format", "json", "--updates-limit", "0"]
        sides: dict[str, list[dict[str, Any]]] = {"pipeline": [], "weightwatch": [], "floor": []}
        loads = []
        for _ in range(args.repeat):  # alternate so both see the same machine load
            loads.append(os.getloadavg()[0])
            sides["floor"].append(timed(FLOOR.format(path=str(path)), shell=True))
            sides["pipeline"].append(timed(PIPELINE.format(path=str(path)), shell=True))
            sides["weightwatch"].append(timed(ww, ok=(0, 3)))
        loads.append(os.getloadavg()[0])
        rss = {k: max(r["rss_mb"] for r in v) for k, v in sides.items()}
        report = json.loads(sides["weightwatch"][-1]["out"])
        q = report["measures"]["queue_ms"]
        n_pipe, p_mean, p_std, p_max = sides["pipeline"][-1]["out"].split()
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "cpu_s")} for k, v in sides.items()}
        mb = size / 1e6
        n = q["count"]
        # the pipeline's stddev is the population one; weightwatch reports the sample one (n - 1)
        pop_std = q["stddev"] * ((n - 1) / n) ** 0.5 if n > 1 else 0.0
        same = (int(n_pipe) == n and abs(float(p_mean) - q["mean"]) <= 1e-6 * max(1.0, q["mean"])
                and abs(float(p_std) - pop_std) <= 1e-5 * max(1.0, pop_std) and abs(float(p_max) - q["max"]) < 1e-3)
        engines = compare_engines(_head(path, args.engines, tmp), args.repeat) if args.engines else []
        cpu = os.cpu_count()
        wr, cr = med["pipeline"]["wall_s"] / med["weightwatch"]["wall_s"], med["pipeline"]["cpu_s"] / med["weightwatch"]["cpu_s"]
        lines = [
            f"# analyze benchmark: {n_lines:,} lines, {mb:,.0f} MB of the real shape, {cpu} cores, median of {args.repeat} alternating runs",
            "",
            f"Machine shared: 1-minute load average {', '.join(f'{x:.1f}' for x in loads)} around the runs on {cpu} cores "
            "(other helpers' test runs); wall times depend on the share left, CPU seconds much less.",
            "",
            "| side | wall s | MB/s (wall) | CPU s (all its processes) | peak RSS MB |",
            "|---|---:|---:|---:|---:|",
            f"| `grep -c queue_ms=` (the floor) | {med['floor']['wall_s']:.2f} | {mb / med['floor']['wall_s']:,.0f} | {med['floor']['cpu_s']:.2f} | - |",
            f"| seed pipeline grep \\| sed \\| awk (n, mean, stddev, max of queue_ms) | {med['pipeline']['wall_s']:.2f} | "
            f"{mb / med['pipeline']['wall_s']:,.0f} | {med['pipeline']['cpu_s']:.2f} | {rss['pipeline']:,.0f} |",
            f"| `weightwatch analyze` (full join, syncs, percentiles, verdict) | {med['weightwatch']['wall_s']:.2f} | "
            f"{mb / med['weightwatch']['wall_s']:,.0f} | {med['weightwatch']['cpu_s']:.2f} | {rss['weightwatch']:,.0f} |",
            "",
            f"**weightwatch vs the pipeline: {wr:.2f}x wall, {cr:.2f}x CPU-seconds** (targets: 5x wall, 2x CPU); "
            f"peak RSS {rss['weightwatch']:,.0f} MB for a {mb:,.0f} MB log.",
            "",
            "each run (wall s / CPU s): " + "; ".join(
                f"{k} " + ", ".join(f"{r['wall_s']:.2f}/{r['cpu_s']:.2f}" for r in v) for k, v in sides.items()),
            "",
            f"pipeline printed (n mean stddev max): `{sides['pipeline'][-1]['out'].strip()}`",
            f"weightwatch: {report['updates_summary']['count']:,} calls joined, {report['syncs']['count']:,} syncs; queue_ms n {n:,} mean {q['mean']:.6f} "
            f"stddev {q['stddev']:.6f} (population {pop_std:.6f}) p50 {q['p50']:.3f} p95 {q['p95']:.3f} p99 {q['p99']:.3f} max {q['max']:.3f}; "
            f"verdict {report['verdict']['signature']}",
            f"same n, mean, stddev and max as the pipeline: {'yes' if same else 'NO'}",
        ]
        if engines:
            lines += ["", f"## Candidate engines: {args.engines:,} lines of the same log into typed columns (median of {args.repeat})", "",
                      "| engine | wall s | CPU s | queue_ms values |", "|---|---:|---:|---:|",
                      *(f"| {e['engine']} | {e['wall_s']:.2f} | {e['cpu_s']:.2f} | {e['queue_ms_values']:,} |" for e in engines)]
        text = "\n".join(lines) + "\n"
        print(text)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({
            "lines": n_lines, "bytes": size, "cores": cpu, "loadavg": loads, "runs": {k: [{m: r[m] for m in ("wall_s", "cpu_s")} for r in v] for k, v in sides.items()},
            "median": med, "peak_rss_mb": rss, "ratio_wall": wr, "ratio_cpu": cr, "same_stats": same, "engines": engines,
            "queue_ms": q}, indent=1))
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _head(path: Path, lines: int, tmp: Path) -> Path:
    out = tmp / "head.log"
    with open(path, "rb") as src, open(out, "wb") as dst:
        for i, line in enumerate(src):
            if i >= lines:
                break
            dst.write(line)
    return out


if __name__ == "__main__":
    sys.exit(main())
