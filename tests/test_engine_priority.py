"""Engine priority: every thread of every process below the API server gets the nice value; the API
server itself and other processes keep theirs; a higher nice value is never lowered. Real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from weightwatch.inference.engine_priority import descendants, lower_engine_priority

# Stands in for the API server: starts an "engine" child with a second thread, prints its pid, sleeps.
API_SERVER = r"""
import subprocess, sys, time
engine = subprocess.Popen([sys.executable, "-c", ENGINE])
print(engine.pid, flush=True)
time.sleep(120)
"""
ENGINE = r"""
import threading, time
threading.Thread(target=time.sleep, args=(120,), daemon=True).start()
time.sleep(120)
"""


def _nice_of_threads(pid: int) -> dict[int, int]:
    return {int(t): os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{pid}/task")}


@pytest.fixture
def api_server_with_engine():
    proc = subprocess.Popen(
        [sys.executable, "-c", f"ENGINE = {ENGINE!r}\n" + API_SERVER], stdout=subprocess.PIPE, text=True
    )
    try:
        engine_pid = int(proc.stdout.readline())  # type: ignore[union-attr]
        deadline = time.monotonic() + 20
        while len(os.listdir(f"/proc/{engine_pid}/task")) < 2:  # wait for the engine's second thread
            assert time.monotonic() < deadline, "engine thread did not start"
            time.sleep(0.05)
        yield proc.pid, engine_pid
    finally:
        proc.kill()
        proc.wait()
        try:
            os.kill(engine_pid, 9)
        except (ProcessLookupError, UnboundLocalError):
            pass


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_engine_threads_get_the_nice_value_and_the_api_server_keeps_its_own(api_server_with_engine):
    api_pid, engine_pid = api_server_with_engine
    assert descendants(api_pid) == [engine_pid]
    own_before = os.getpriority(os.PRIO_PROCESS, 0)

    assert lower_engine_priority(7, parent=api_pid) == [engine_pid]

    engine = _nice_of_threads(engine_pid)
    assert len(engine) >= 2 and set(engine.values()) == {7}  # every thread, not just the main one
    assert set(_nice_of_threads(api_pid).values()) == {own_before}
    assert os.getpriority(os.PRIO_PROCESS, 0) == own_before

    # Never lowers a nice value (that would need privileges, and someone chose it): 12 stays 12.
    for tid in engine:
        os.setpriority(os.PRIO_PROCESS, tid, 12)
    lower_engine_priority(7, parent=api_pid)
    assert set(_nice_of_threads(engine_pid).values()) == {12}


def test_zero_leaves_everything_alone(api_server_with_engine):
    api_pid, engine_pid = api_server_with_engine
    before = _nice_of_threads(engine_pid)
    assert lower_engine_priority(0, parent=api_pid) == []
    assert _nice_of_threads(engine_pid) == before


def test_a_process_without_children_has_no_descendants():
    assert descendants(2**22 + 12345) == []  # no such pid
