"""The HTML report opens offline in real headless Chromium with no console errors and shows its plots."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import require, require_binary
from weightwatch.cli import main

FIX = Path(__file__).parent / "fixtures" / "logs"
PLOTS = {"plot-timeline", "plot-distributions", "plot-ckpt-wait", "plot-inflight"}
pytestmark = pytest.mark.binaries


class Chromium:
    """Headless Chromium driven over the DevTools protocol (websockets), on a fresh profile."""

    def __init__(self, tmp: Path):
        binary = require_binary("chromium")
        profile = tmp / "profile"
        profile.mkdir()
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                require(False, "chromium with a DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        from websockets.sync.client import connect

        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=20))
        self._id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self._id += 1
        my = self._id
        self.ws.send(json.dumps({"id": my, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == my:
                assert "error" not in msg, msg
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))))

    def close(self) -> None:
        try:
            self._stack.close()
        except Exception:  # noqa: BLE001
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def chromium(tmp_path: Path):
    c = Chromium(tmp_path)
    yield c
    c.close()


def _load(chromium: Chromium, page: Path) -> dict:
    for domain in ("Runtime.enable", "Log.enable", "Page.enable", "Network.enable"):
        chromium.call(domain)
    chromium.call("Page.navigate", url=page.as_uri())
    chromium.wait_for("Page.loadEventFired")
    time.sleep(0.3)  # let late console messages arrive
    res = chromium.call("Runtime.evaluate", returnByValue=True, expression="""
        JSON.stringify(Array.from(document.querySelectorAll('svg.plot')).map(s => ({
            id: s.id, marks: s.querySelectorAll('rect').length, width: s.getBoundingClientRect().width,
            height: s.getBoundingClientRect().height})))""")
    chromium.call("Runtime.evaluate", expression="1")  # drain events that came with the evaluation
    verdict = chromium.call("Runtime.evaluate", returnByValue=True, expression="document.getElementById('verdict').textContent")
    errors = [e for e in chromium.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    urls = [e["params"]["request"]["url"] for e in chromium.events if e.get("method") == "Network.requestWillBeSent"]
    return {"plots": json.loads(res["result"]["value"]), "errors": errors, "urls": urls, "verdict": verdict["result"]["value"]}


def test_html_report_shows_its_plots_offline(chromium: Chromium, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    assert main(["analyze", str(FIX / "mixed"), "--html", str(page)]) == 3
    got = _load(chromium, page)
    assert got["errors"] == []
    assert all(u.startswith("file://") for u in got["urls"]), got["urls"]  # nothing fetched from a network
    by_id = {p["id"]: p for p in got["plots"]}
    assert set(by_id) == PLOTS
    for p in by_id.values():
        assert p["marks"] > 0 and p["width"] > 100 and p["height"] > 100, p
    assert by_id["plot-timeline"]["marks"] == 2 * 21  # queue + rpc bar per update with a measured part
    assert got["verdict"].startswith("front_end_queue")


def test_compare_page_loads_too(chromium: Chromium, tmp_path: Path) -> None:
    page = tmp_path / "compare.html"
    assert main(["analyze", "--compare", str(FIX / "front_end_queue"), str(FIX / "healthy"), "--html", str(page)]) == 0
    got = _load(chromium, page)
    assert got["errors"] == []
    assert {p["id"] for p in got["plots"]} == PLOTS | {"plot-compare"}
    assert all(p["marks"] > 0 for p in got["plots"])


def test_the_harness_sees_console_errors(chromium: Chromium, tmp_path: Path) -> None:
    """Guards the two tests above: a page that logs an error and throws is caught."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><svg class='plot' id='x'></svg>"
                    "<p id='verdict'>x</p><script>console.error('boom'); undefinedFunction();</script></body></html>")
    got = _load(chromium, page)
    assert len(got["errors"]) >= 2


def test_sync_page_shows_the_phases_as_a_stacked_timeline(chromium: Chromium, tmp_path: Path) -> None:
    page = tmp_path / "sync.html"
    assert main(["analyze", str(FIX / "sync_straggler"), "--html", str(page)]) == 0
    got = _load(chromium, page)
    assert got["errors"] == []
    by_id = {p["id"]: p for p in got["plots"]}
    assert set(by_id) == PLOTS | {"plot-sync-timeline"}
    assert by_id["plot-sync-timeline"]["marks"] == 6 * 3 + 6  # pause, transfer, resume per sync + a flag per straggler sync
    assert got["verdict"].startswith("straggler")
    html = page.read_text()
    assert "held up by 10.0.0.2:8000 (transfer)" in html and "Weight syncs by phase" in html
