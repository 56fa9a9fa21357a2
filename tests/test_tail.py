"""`weightwatch tail`: follows real files as they grow, rotate and get truncated; serves the catalogue's metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from weightwatch.analysis.tail import Follower, Tailer
from weightwatch.catalogue import METRICS_BY_NAME
from weightwatch.events import format_event


def _update(tid: str, queue: float, rpc: float, server: str = "10.0.0.1:8000") -> str:
    return (format_event("weights.client.send", tid, url=f"http://{server}/update_weights", op="update_weights", t=1.0) + "\n"
            + "INFO x - " + format_event("weights.client.done", tid, wall_ms=queue + rpc, rpc_ms=rpc, queue_ms=queue) + "\n")


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in registry.collect() for s in fam.samples}


def test_follower_survives_rotation_and_truncation(tmp_path: Path) -> None:
    log = tmp_path / "orch.log"
    log.write_text("old line\n")
    f = Follower(str(log))
    assert f.poll() == []  # starts at the end, like tail -F
    with log.open("a") as fh:
        fh.write("one\ntw")
    assert f.poll() == [b"one"]  # the partial line waits for its newline
    with log.open("a") as fh:
        fh.write("o\n")
    assert f.poll() == [b"two"]
    with log.open("a") as fh:
        fh.write("last of old\n")
    log.rename(tmp_path / "orch.log.1")  # rotation: rename, then a new file
    log.write_text("first of new\n")
    assert f.poll() == [b"last of old", b"first of new"]
    assert f.rotations == 1
    with log.open("r+") as fh:  # copytruncate
        fh.truncate(0)
    with log.open("a") as fh:
        fh.write("after truncate\n")
    assert f.poll() == [b"after truncate"]
    assert f.truncations == 1
    f.close()


def test_file_that_appears_later_is_read_from_its_start(tmp_path: Path) -> None:
    f = Follower(str(tmp_path / "later.log"))
    assert f.poll() == []
    (tmp_path / "later.log").write_text("a\nb\n")
    assert f.poll() == [b"a", b"b"]


def test_events_become_catalogue_metrics(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    log.write_text("")
    reg = CollectorRegistry()
    t = Tailer([str(log)], reg)
    with log.open("a") as fh:
        fh.write(_update("aa", queue=3300.0, rpc=230.0))
        fh.write(_update("bb", queue=20.0, rpc=2500.0, server="10.0.0.2:8000"))
        fh.write("[ckpt] wait.done target_step=4 wait_ms=1500\n[ckpt] write.done step=4 write_ms=800\n")
        fh.write("[gen] batch.done completions=64 dur_ms=1200 inflight=17\n")
        fh.write("[rollout] trunc_pct=2.5 current_step=5 ckpt_step=4 staleness=1 async_level=2\n")
        fh.write("[weights][cc] client.done wall_ms=oops rpc_ms=1 queue_ms=1\n")
    t.poll_once()
    s = _samples(reg)
    a = (("op", "update_weights"), ("server", "10.0.0.1:8000"))
    b = (("op", "update_weights"), ("server", "10.0.0.2:8000"))
    assert s[("rl_weight_update_last_queue_seconds", a)] == pytest.approx(3.3)
    assert s[("rl_weight_update_queue_seconds_count", a)] == 1
    assert s[("rl_weight_update_queue_seconds_bucket", tuple(sorted((*a, ("le", "5.0")))))] == 1
    assert s[("rl_weight_update_queue_seconds_bucket", tuple(sorted((*a, ("le", "3.0")))))] == 0
    assert s[("rl_weight_update_rpc_seconds_sum", b)] == pytest.approx(2.5)
    assert s[("rl_checkpoint_wait_seconds_sum", ())] == pytest.approx(1.5)
    assert s[("rl_checkpoint_write_seconds_sum", ())] == pytest.approx(0.8)
    assert s[("rl_generation_batch_seconds_count", ())] == 1
    assert s[("rl_generation_inflight_requests", ())] == 17
    assert s[("rl_rollout_truncated_ratio", ())] == pytest.approx(0.025)
    assert s[("rl_rollout_staleness_steps", ())] == 1 and s[("rl_async_level", ())] == 2
    assert t.events.stats.rejected == 1 and t.events.stats.events == 8
    for name, _labels in s:  # every family comes from the catalogue
        base = name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum").removesuffix("_created")
        assert base in METRICS_BY_NAME, name


def test_tail_command_serves_metrics_across_rotation(tmp_path: Path) -> None:
    """The real command, real files, a real HTTP scrape; the job writing the log never imported weightwatch."""
    log = tmp_path / "orchestrator.log"
    log.write_text("2026-11-26 INFO booting\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "weightwatch", "tail", str(log), "--metrics-port", str(port),
                             "--metrics-addr", "127.0.0.1", "--interval", "0.05"], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def queue_count() -> float:
            for fam in text_string_to_metric_families(httpx.get(url, timeout=5).text):
                for smp in fam.samples:
                    if smp.name == "rl_weight_update_queue_seconds_count":
                        return smp.value
            return 0.0

        def wait_count(n: float) -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    if queue_count() == n:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            raise AssertionError(f"queue count never reached {n}, last {queue_count()}")

        wait_count(0)
        with log.open("a") as fh:  # a plain print-based job appending lines
            fh.write(_update("t1", 50.0, 100.0))
            fh.flush()
        wait_count(1)
        log.rename(tmp_path / "orchestrator.log.1")
        log.write_text(_update("t2", 400.0, 100.0) + _update("t3", 10.0, 100.0))
        wait_count(3)
        with log.open("r+") as fh:
            fh.truncate(0)
        with log.open("a") as fh:
            fh.write(_update("t4", 10.0, 100.0))
        wait_count(4)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            _out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "metrics on http://127.0.0.1:" in err and "8 events" in err
