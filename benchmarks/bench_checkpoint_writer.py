"""Benchmark: what atomicity costs. CheckpointWriter.write vs a plain safetensors save, same tensors, same disk.

    python -m benchmarks.bench_checkpoint_writer [--sizes-mb 2 64 512] [--repeats 7] [--dir DIR] [--demo]

Per size: ``plain`` is ``safetensors.torch.save_file`` into an existing directory (what many trainers do:
no fsync, no rename, no marker, readers can see half a file); ``atomic`` is ``CheckpointWriter.write``
(temporary directory, fsync of files and directories, rename, fsynced STABLE marker, pruning, span,
event and metrics). Both write the same state dict to the same filesystem in alternation, so page
cache and disk state are shared fairly. Prints p50/p99 per row and the atomic/plain ratio side by side.

``--demo`` also times a default ``weightwatch demo --duration 60`` from start to exit (the README's
"about two minutes").

Writes benchmarks/results/checkpoint_writer.md (and .json).
"""

from __future__ import annotations

import argparse
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
RESULTS = HERE / "results"


def _state(mb: float):  # type: ignore[no-untyped-def]
    import torch

    n = max(1, int(mb * 1024 * 1024 / 4))
    side = 1024
    rows = max(1, n // side)
    g = torch.Generator().manual_seed(0)
    # a few tensors like a model's layers, float32
    parts = max(1, min(16, rows))
    per = max(1, rows // parts)
    return {f"layers.{i}.weight": torch.randn(per, side, generator=g) for i in range(parts)}


def _pct(values: list[float], q: float) -> float:
    """Percentile (q in 0..100), the analyzer's definition: linear interpolation between ranks."""
    from weightwatch.analysis.stats import percentile

    return percentile(sorted(values), q)


def bench(sizes: list[float], repeats: int, base: Path) -> list[dict]:
    from safetensors.torch import save_file

    import weightwatch
    from weightwatch.trainer import CheckpointWriter

    weightwatch.setup("bench-trainer", role="trainer")
    rows = []
    for mb in sizes:
        state = _state(mb)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        plain_dir = base / f"plain-{mb}"
        plain_dir.mkdir(parents=True, exist_ok=True)
        writer = CheckpointWriter(base / f"atomic-{mb}", keep_last=2)
        plain: list[float] = []
        atomic: list[float] = []
        for i in range(repeats + 1):  # the first round warms up and is dropped
            t0 = time.perf_counter()
            save_file(state, str(plain_dir / "model.safetensors"), metadata={"format": "pt"})
            p = time.perf_counter() - t0
            t0 = time.perf_counter()
            writer.write(i, state)
            a = time.perf_counter() - t0
            if i:
                plain.append(p * 1000)
                atomic.append(a * 1000)
        shutil.rmtree(plain_dir, ignore_errors=True)
        shutil.rmtree(base / f"atomic-{mb}", ignore_errors=True)
        row = {
            "size_mb": round(nbytes / 2**20, 1),
            "plain_p50_ms": _pct(plain, 50), "plain_p99_ms": _pct(plain, 99),
            "atomic_p50_ms": _pct(atomic, 50), "atomic_p99_ms": _pct(atomic, 99),
        }
        row["ratio_p50"] = row["atomic_p50_ms"] / row["plain_p50_ms"]
        row["atomic_mb_s"] = row["size_mb"] / (row["atomic_p50_ms"] / 1000)
        rows.append(row)
        print(_fmt_row(row), flush=True)
    return rows


HEADER = "| size | plain save p50 / p99 | atomic write p50 / p99 | atomic / plain (p50) | atomic MB/s |\n|---|---|---|---|---|"


def _fmt_row(r: dict) -> str:
    return (f"| {r['size_mb']:.1f} MB | {r['plain_p50_ms']:.1f} / {r['plain_p99_ms']:.1f} ms | "
            f"{r['atomic_p50_ms']:.1f} / {r['atomic_p99_ms']:.1f} ms | {r['ratio_p50']:.2f}x | {r['atomic_mb_s']:.0f} |")


def bench_demo() -> dict:
    with tempfile.TemporaryDirectory(prefix="ww-demo-bench-") as d:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "weightwatch", "demo", "--no-live", "--ports", "auto", "--run-dir", d + "/run"],
                              capture_output=True, text=True, timeout=600)
        total = time.perf_counter() - t0
        verdict = next((ln.split(":", 1)[1].strip() for ln in proc.stdout.splitlines() if ln.startswith("verdict:")), None)
        if proc.returncode != 0:
            print("demo output (end):\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-30:]), file=sys.stderr)
    return {"demo_total_s": round(total, 1), "exit": proc.returncode, "verdict": verdict}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[2, 64, 512])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory on /tmp's filesystem)")
    ap.add_argument("--demo", action="store_true", help="also time a default `weightwatch demo` from start to exit")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ww-ckpt-bench-", dir=args.dir))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; writing under {base}")
    print(HEADER)
    try:
        rows = bench(args.sizes_mb, args.repeats, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result: dict = {"rows": rows, "repeats": args.repeats, "cores": os.cpu_count()}
    if args.demo:
        result["demo"] = bench_demo()
        print(f"\nweightwatch demo (defaults, --duration 60): {result['demo']['demo_total_s']} s from start to exit, "
              f"exit {result['demo']['exit']}, verdict {result['demo']['verdict']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checkpoint_writer.json").write_text(json.dumps(result, indent=2))
    md = ["# CheckpointWriter vs plain safetensors save", "", f"{args.repeats} writes per size after one warm-up, {os.cpu_count()} cores.", "",
          HEADER, *(_fmt_row(r) for r in rows)]
    if "demo" in result:
        md += ["", f"`weightwatch demo` with defaults: {result['demo']['demo_total_s']} s from start to exit (verdict {result['demo']['verdict']})."]
    (RESULTS / "checkpoint_writer.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
