"""Fault 6, ``weightwatch tail`` under churn: every complete event line counted exactly once.

A separate job process (faults/churn_writer.py) logs events at a steady rate for 90 s while its log is
rotated by rename, copytruncated, deleted and recreated, gets 10 MB lines and binary junk, and has lines
written in two halves. The real ``weightwatch tail`` process follows it; at the end, its /metrics counts and
sums must equal what the job wrote (sums of unique values: a duplicate and a loss cannot cancel out).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port

pytestmark = [pytest.mark.faults, pytest.mark.slow]

WRITE_SECONDS = 90.0
RATE = 50.0  # units per second, 4 event lines each
OP_EVERY = 5.0
CATCH_UP_S = 30.0
#: The tail keeps at most one MAX_LINE (1 MiB) buffer per file: 10 MB lines must not show in its memory.
RSS_LIMIT_MB = 250


def _counts(url: str) -> dict[str, float]:
    text = httpx.get(url, timeout=5).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in (
                "rl_checkpoint_write_seconds_count",
                "rl_checkpoint_write_seconds_sum",
                "rl_generation_batch_seconds_count",
                "rl_generation_batch_seconds_sum",
                "rl_weight_update_wall_seconds_count",
            ):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def test_tail_counts_every_line_once_under_churn(tmp_path: Path, reliability) -> None:
    row = reliability
    row.fault = "`weightwatch tail` under log churn"
    log = tmp_path / "job.log"
    port = free_port()
    tail = subprocess.Popen(
        [sys.executable, "-m", "weightwatch", "tail", str(log), "--metrics-port", str(port), "--metrics-addr", "127.0.0.1", "--interval", "0.25"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    writer: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 30
        while True:
            assert tail.poll() is None, tail.communicate()[1]
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "weightwatch tail did not serve /metrics"
            time.sleep(0.2)
        summary_path = tmp_path / "written.json"
        writer = subprocess.Popen(
            [sys.executable, "-m", "faults.churn_writer", str(log), str(summary_path),
             "--seconds", str(WRITE_SECONDS), "--rate", str(RATE), "--op-every", str(OP_EVERY)],
            cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        proc = psutil.Process(tail.pid)
        rss_mb: list[float] = []
        while writer.poll() is None:
            rss_mb.append(proc.memory_info().rss / 2**20)
            assert tail.poll() is None, "weightwatch tail died under churn"
            time.sleep(1.0)
        assert writer.returncode == 0
        written = json.loads(summary_path.read_text())
        expected = {
            "rl_checkpoint_write_seconds_count": written["ckpt_write_done"],
            "rl_checkpoint_write_seconds_sum": written["write_ms_sum"] / 1000.0,
            "rl_generation_batch_seconds_count": written["gen_batch_done"],
            "rl_generation_batch_seconds_sum": written["dur_ms_sum"] / 1000.0,
            "rl_weight_update_wall_seconds_count": written["updates"],
        }
        got: dict[str, float] = {}
        deadline = time.monotonic() + CATCH_UP_S
        while time.monotonic() < deadline:
            got = _counts(url)
            if all(abs(got.get(k, 0.0) - v) < 1e-6 * max(1.0, v) for k, v in expected.items()):
                break
            time.sleep(0.5)
        ops = written["ops"]
        row.injected = ", ".join(f"{k} x{v}" for k, v in ops.items()) + f" over {written['seconds']:.0f} s at {4 * RATE:.0f} event lines/s"
        row.times = sum(ops.values())
        lines_written = written["ckpt_write_done"] + written["gen_batch_done"] + 2 * written["updates"]
        diffs = {k: (got.get(k, 0.0), v) for k, v in expected.items() if abs(got.get(k, 0.0) - v) >= 1e-6 * max(1.0, v)}
        for k, (g, v) in diffs.items():
            row.lose(f"{k}: tail {g:g}, written {v:g}")
        assert not diffs, f"tail counts differ from what was written: {diffs}"
        assert all(v >= 2 for v in ops.values()), ops
        assert max(rss_mb) < RSS_LIMIT_MB, f"tail RSS peaked at {max(rss_mb):.0f} MB"
        row.hold(f"{lines_written} event lines written, every one counted exactly once (counts and sums of unique values equal)")
        row.hold("the fake event inside each 10 MB line was not counted; lines written in two halves counted once")
        row.hold(f"tail RSS {min(rss_mb):.0f}-{max(rss_mb):.0f} MB (bounded by its 1 MiB line buffer), never died")
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait(10)
        if tail.poll() is None:
            tail.send_signal(signal.SIGTERM)
        try:
            _, err = tail.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            tail.kill()
            _, err = tail.communicate(timeout=10)
    assert tail.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    row.hold(f"tail stopped cleanly on SIGTERM: {err.strip().splitlines()[-1]}")
