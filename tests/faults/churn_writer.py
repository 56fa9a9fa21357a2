"""A job that logs weightwatch events at a steady rate while its log file churns (run as a separate process).

``python -m faults.churn_writer LOG SUMMARY_JSON --seconds S --rate R --op-every S`` (from tests/ on the path).

Every 1/R seconds one unit of events goes to LOG, with a logger prefix as a real job writes it:
``[ckpt] write.done`` (unique step, write_ms = step), ``[gen] batch.done`` (dur_ms = its number) and a
``client.send`` / ``client.done`` pair of one update (tid unique). Every ``--op-every`` seconds one churn
operation, round robin: rotation by rename, copytruncate, delete and recreate, a 10 MB line (with an
event inside its last megabyte: a line that long is not an event line), binary junk (no newline, no ``[``),
and a line written in two halves a second apart. SUMMARY_JSON gets what was written.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

from weightwatch.events import format_event

PREFIX = "2026-12-03 12:00:00,000 INFO weightwatch.job "
OPS = ("rename", "copytruncate", "delete_recreate", "huge_line", "binary_junk", "split_line")


class Job:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = open(path, "ab", buffering=0)
        self.step = 0
        self.batches = 0
        self.updates = 0
        self.write_ms_sum = 0
        self.dur_ms_sum = 0
        self.rotated = 0
        self.ops: dict[str, int] = {op: 0 for op in OPS}

    def line(self, text: str) -> None:
        self.fh.write((PREFIX + text + "\n").encode())

    def unit(self) -> None:
        self.step += 1
        self.line(format_event("ckpt.write.done", None, step=self.step, write_ms=self.step))
        self.write_ms_sum += self.step
        self.batches += 1
        self.line(format_event("gen.batch.done", None, completions=8, dur_ms=self.batches, inflight=3))
        self.dur_ms_sum += self.batches
        self.updates += 1
        tid = f"{self.updates:032x}"
        self.line(format_event("weights.client.send", tid, url="http://10.0.0.1:8001/update_weights", op="update_weights", t=time.time()))
        self.line(format_event("weights.client.done", tid, wall_ms=20.0, rpc_ms=5.0, queue_ms=15.0))

    def _reopen(self) -> None:
        self.fh.close()
        self.fh = open(self.path, "ab", buffering=0)

    def _rotated_name(self) -> Path:
        self.rotated += 1
        return self.path.with_name(f"{self.path.name}.{self.rotated}")

    def op(self, name: str, rng: random.Random) -> None:
        self.ops[name] += 1
        if name == "rename":
            os.rename(self.path, self._rotated_name())
            self._reopen()
        elif name == "copytruncate":  # as logrotate does it; the job keeps its O_APPEND descriptor
            shutil.copyfile(self.path, self._rotated_name())
            os.truncate(self.path, 0)
        elif name == "delete_recreate":
            os.unlink(self.path)
            self._reopen()
        elif name == "huge_line":
            fake = format_event("ckpt.write.done", None, step=10**9, write_ms=1)
            self.fh.write(PREFIX.encode() + b"payload=" + b"x" * (10 << 20) + b" " + fake.encode() + b"\n")
        elif name == "binary_junk":
            junk = bytes(b for b in rng.randbytes(4096) if b not in (0x0A, 0x5B))
            self.fh.write(junk + b"\n")
        elif name == "split_line":
            text = (PREFIX + format_event("ckpt.write.done", None, step=self.step + 1, write_ms=self.step + 1) + "\n").encode()
            self.step += 1
            self.write_ms_sum += self.step
            self.fh.write(text[: len(text) // 2])
            time.sleep(1.0)
            self.fh.write(text[len(text) // 2 :])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("log", type=Path)
    p.add_argument("summary", type=Path)
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--rate", type=float, default=50.0, help="units per second (4 event lines each)")
    p.add_argument("--op-every", type=float, default=5.0)
    args = p.parse_args()
    rng = random.Random(18)
    job = Job(args.log)
    start = time.monotonic()
    next_op = start + args.op_every
    n_op = 0
    period = 1.0 / args.rate
    tick = start
    while time.monotonic() - start < args.seconds:
        job.unit()
        if time.monotonic() >= next_op:
            job.op(OPS[n_op % len(OPS)], rng)
            n_op += 1
            next_op += args.op_every
        tick += period
        delay = tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    job.fh.close()
    summary = {
        "ckpt_write_done": job.step,
        "write_ms_sum": job.write_ms_sum,
        "gen_batch_done": job.batches,
        "dur_ms_sum": job.dur_ms_sum,
        "updates": job.updates,
        "ops": job.ops,
        "seconds": round(time.monotonic() - start, 2),
    }
    args.summary.write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
