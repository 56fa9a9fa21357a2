"""The admin lane's listener thread: serves, sleeps while idle (no periodic wakeups that would take the
GIL from vLLM's main loop), and stops when asked. Real uvicorn on 127.0.0.1."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from weightwatch.inference.lane import AdminLane


def _switches(tid: int) -> int:
    status = Path(f"/proc/self/task/{tid}/status").read_text()
    return sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches:" in line)


@pytest.fixture
def lane():
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    lane = AdminLane(app, "127.0.0.1", 0)
    port = lane.start()
    try:
        yield lane, f"http://127.0.0.1:{port}"
    finally:
        lane.stop()


def test_lane_serves_and_stops(lane):
    admin, url = lane
    with httpx.Client(base_url=url, timeout=10) as client:
        r = client.get("/ping")
        assert r.json() == {"ok": True}
        assert "date" not in r.headers  # nothing would refresh it while the lane sleeps
    admin.stop()
    assert admin._thread is not None and not admin._thread.is_alive()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/ping", timeout=2)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_idle_lane_thread_does_not_wake_up(lane):
    """uvicorn's own server polls every 100 ms (10 wakeups a second); the lane's sleeps until stopped."""
    admin, url = lane
    httpx.get(f"{url}/ping", timeout=10)  # served at least once, then idle
    tid = admin.native_id
    assert tid is not None
    time.sleep(0.2)
    before = _switches(tid)
    time.sleep(1.5)
    woke = _switches(tid) - before
    assert woke <= 2, f"idle lane thread was scheduled {woke} times in 1.5 s"
