"""`weightwatch demo` end to end on real vLLM (CPU): three processes, the contract, the verdicts, Ctrl-C.

Two kinds of runs keep the time bounded:
* one full run that starts its own server (``--slow-reload``, the sync of today), checked while it runs
  (events, every metric on each process's /metrics, weights changing on the server) and then interrupted
  with SIGINT (verdict engine_reload_slow, no process left, files kept);
* short runs against the session's shared server (``--server-url``): lane -> healthy,
  ``--admin shared`` (the bare update: a pause through the shared pool would deadlock) -> front_end_queue,
  ``--slow-writes`` -> checkpoint_io_slow.
The sync fault switches are in tests/test_demo_faults.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from conftest import require
from weightwatch.catalogue import EVENTS, METRICS
from weightwatch.events import Event, parse_line

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROLE_OF_METRIC = {m.name: m.role for m in METRICS if m.role != "internal"}
#: vLLM start-up plus 4 updates: about 2 minutes on 2 idle cores, 6+ when other jobs share them.
FULL_RUN_TIMEOUT_S = 900.0
#: Enough to be far above catalogue.RPC_SLOW_SECONDS (2 s) whatever the machine's load.
SLOW_RELOAD_MS = 2500
#: The same load for every verdict run: 32 streams wanting 8 pooled connections keeps the shared pool
#: saturated (an update waits behind ~24 queued requests) while leaving CPU for the lane on 2 cores.
LOAD = ("--concurrency", "32", "--pool-size", "8", "--batch-size", "16")


def _events(path: Path) -> list[Event]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        ev = parse_line(line)
        if isinstance(ev, Event):
            out.append(ev)
    return out


def _greedy(api_url: str, model: str) -> tuple[float, ...]:
    """Greedy logprobs of a fixed prompt: any change of the server's weights changes them."""
    r = httpx.post(f"{api_url}/v1/completions", timeout=60.0,
                   json={"model": model, "prompt": "The trainer writes new weights", "max_tokens": 4, "temperature": 0, "logprobs": 1})
    r.raise_for_status()
    return tuple(round(x, 4) for x in r.json()["choices"][0]["logprobs"]["token_logprobs"])


def _model_name(api_url: str) -> str:
    return str(httpx.get(f"{api_url}/v1/models", timeout=10.0).json()["data"][0]["id"])


def _demo_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "weightwatch", "demo", "--no-live", "--ports", "auto", *args]


@dataclass
class FullRun:
    run_dir: Path
    output: Path
    returncode: int | None = None
    settings: dict = field(default_factory=dict)
    scraped: dict[str, str] = field(default_factory=dict)
    greedy: list[tuple[float, ...]] = field(default_factory=list)
    tree: list[int] = field(default_factory=list)
    survivors: list[str] = field(default_factory=list)

    def text(self) -> str:
        return self.output.read_text(errors="replace")


@pytest.fixture(scope="module")
def full_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullRun]:
    """A full demo (own server, slow reload), observed while running, then stopped with SIGINT."""
    psutil = pytest.importorskip("psutil")
    require(_vllm_importable(), "vllm importable")
    base = tmp_path_factory.mktemp("demo_full")
    run = FullRun(run_dir=base / "run", output=base / "demo.out")
    cmd = _demo_cmd("--run-dir", str(run.run_dir), "--model", str(tiny_model), "--duration", "0",
                    "--slow-reload", str(SLOW_RELOAD_MS), *LOAD)
    with open(run.output, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen_pids: set[int] = set()
    try:
        deadline = time.monotonic() + FULL_RUN_TIMEOUT_S
        model = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the demo exited early ({proc.returncode}):\n{run.text()[-4000:]}", pytrace=False)
            try:
                seen_pids.update(c.pid for c in psutil.Process(proc.pid).children(recursive=True))
            except psutil.Error:
                pass
            settings_path = run.run_dir / "demo.json"
            if settings_path.exists():
                run.settings = json.loads(settings_path.read_text())
            metrics_urls = run.settings.get("metrics")
            done = [e for e in _events(run.run_dir / "orchestrator.log") if e.key == "weights.client.done"]
            if metrics_urls:
                if model is None:
                    model = _model_name(run.settings["api_url"])
                run.greedy.append(_greedy(run.settings["api_url"], model))
                for role, url in metrics_urls.items():
                    try:
                        run.scraped[role] = httpx.get(url, timeout=5.0).text
                    except httpx.HTTPError:
                        pass
            if len(done) >= 4 and len(set(run.greedy)) >= 2 and len(run.scraped) == 3:
                break
            time.sleep(2.0)
        else:
            pytest.fail(f"the demo did not get through 4 updates in {FULL_RUN_TIMEOUT_S:.0f} s:\n{run.text()[-4000:]}", pytrace=False)
        seen_pids.update(c.pid for c in psutil.Process(proc.pid).children(recursive=True))
        run.tree = sorted(seen_pids)
        proc.send_signal(signal.SIGINT)
        run.returncode = proc.wait(timeout=150)
        time.sleep(0.5)
        for pid in run.tree:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    run.survivors.append(f"{pid} {' '.join(p.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                pass
        yield run
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in seen_pids:  # never leave a server behind, whatever the test found
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def test_full_run_writes_every_event_type(full_run: FullRun):
    keys = set()
    for role in ("orchestrator", "trainer", "inference"):
        keys |= {e.key for e in _events(full_run.run_dir / f"{role}.log")}
    missing = {e.key for e in EVENTS} - keys
    assert not missing, f"event types never logged: {sorted(missing)}"
    for role in ("orchestrator", "trainer", "inference"):
        spans = (full_run.run_dir / f"{role}.spans.jsonl").read_text().splitlines()
        assert spans, f"{role} wrote no spans"
    names = {json.loads(s)["name"] for role in ("orchestrator", "trainer", "inference")
             for s in (full_run.run_dir / f"{role}.spans.jsonl").read_text().splitlines()}
    # the sync of today by default: one weights.sync per step, a span per phase, a client span per server and call
    assert {"weights.sync", "weights.sync.phase", "weights.update.server", "engine.rpc", "ckpt.write", "ckpt.wait", "gen.batch"} <= names


def test_full_run_serves_every_metric_on_each_process(full_run: FullRun):
    assert set(full_run.scraped) == {"orchestrator", "trainer", "inference"}
    for name, role in ROLE_OF_METRIC.items():
        text = full_run.scraped[role]
        declared = f"# TYPE {name} " in text or f"# TYPE {name.removesuffix('_total')} " in text
        assert declared, f"{name} missing from the {role}'s /metrics"
    # and they carry values, not only declarations
    assert "rl_weight_update_wall_seconds_count{" in full_run.scraped["orchestrator"]
    assert "rl_checkpoint_write_seconds_count " in full_run.scraped["trainer"]
    assert 'rl_admin_rpc_seconds_count{op="update_weights"}' in full_run.scraped["inference"]


def test_full_run_changes_the_servers_weights(full_run: FullRun):
    assert len(set(full_run.greedy)) >= 2, "greedy logprobs of a fixed prompt never changed: the server kept its weights"
    done = [e for e in _events(full_run.run_dir / "orchestrator.log") if e.key == "weights.client.done"]
    assert done and all(e.get("ok") == "1" for e in done), [e.fields for e in done if e.get("ok") != "1"]
    steps = [e["step"] for e in _events(full_run.run_dir / "trainer.log") if e.key == "ckpt.write.done"]
    assert steps[:3] == [0, 1, 2]


def test_interrupt_stops_every_process_and_keeps_the_run(full_run: FullRun):
    assert len(full_run.tree) >= 4, f"expected server, engine, trainer and orchestrator processes, saw {full_run.tree}"
    assert not full_run.survivors, f"processes left after SIGINT: {full_run.survivors}"
    text = full_run.text()
    assert "stopping orchestrator, trainer, inference" in text
    assert full_run.returncode == 0, text[-3000:]
    for name in ("orchestrator.log", "trainer.log", "inference.log", "orchestrator.spans.jsonl", "report.json"):
        assert (full_run.run_dir / name).stat().st_size > 0, name
    assert any((full_run.run_dir / "weights").glob("step_*/STABLE"))


def test_slow_reload_verdict(full_run: FullRun):
    from weightwatch.analysis import analyze_paths

    assert analyze_paths([full_run.run_dir]).verdict.signature == "engine_reload_slow"
    assert "verdict: engine_reload_slow" in full_run.text()


# --------------------------------------------------------------------------- runs against the shared server


def _run_against(server, tiny_model: Path, name: str, *args: str, duration: float = 35.0) -> tuple[Path, str]:
    run_dir = server.weights_root / f"demo-{name}"  # inside the server's weights root, as updates require
    env = dict(os.environ)
    if server.admin_token:
        env["WEIGHTWATCH_ADMIN_TOKEN"] = server.admin_token
    cmd = _demo_cmd("--run-dir", str(run_dir), "--model", str(tiny_model), "--server-url", server.base_url,
                    "--admin-url", server.admin_url, "--duration", str(duration), *LOAD, *args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return run_dir, output


#: Above this share of updates over the queue threshold the lane run fails outright, whatever the machine.
LANE_TAIL_MAX_SHARE = 0.2


def _xfail_if_only_a_cpu_tail(done: list[Event], waits: list[Event], load_before: float) -> None:
    """The lane's verdict needs CPU headroom in the API server process, which 2 shared cores do not give.

    Measured here (docs/inference.md): on 2 cores the engine, its worker and the API server use both cores,
    and the lane thread waits for the GIL now and then, so 1-3 updates in 20 queue 300-500 ms while the
    typical update queues 5-30 ms. The analyzer names a bottleneck when 2 updates and 5 % show it. Such a
    run is an expected failure only when the typical update is healthy (median queue, rpc and checkpoint wait
    under their thresholds) and the slow ones stay a small tail (LANE_TAIL_MAX_SHARE); anything else fails.
    """
    from weightwatch.analysis.rules import CKPT_WAIT_SLOW_MS, QUEUE_THRESHOLD_MS, RPC_SLOW_MS

    def median(events: list[Event], key: str) -> float:
        values = sorted(e[key] for e in events if e[key] is not None)
        return values[len(values) // 2] if values else float("inf")

    q50, r50, w50 = median(done, "queue_ms"), median(done, "rpc_ms"), median(waits, "wait_ms")
    slow = sum(1 for e in done if e["queue_ms"] is not None and e["queue_ms"] > QUEUE_THRESHOLD_MS)
    share = slow / max(1, len(done))
    if q50 < QUEUE_THRESHOLD_MS / 3 and r50 < RPC_SLOW_MS and w50 < CKPT_WAIT_SLOW_MS and share <= LANE_TAIL_MAX_SHARE:
        pytest.xfail(f"CPU tail on {os.cpu_count()} cores (load {load_before:.1f}/{os.getloadavg()[0]:.1f}): {slow} of {len(done)} "
                     f"lane updates queued > {QUEUE_THRESHOLD_MS:.0f} ms; medians queue {q50:.0f} ms, rpc {r50:.0f} ms, "
                     f"checkpoint wait {w50:.0f} ms")


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("lane", (), "healthy"),
        ("shared", ("--admin", "shared"), "front_end_queue"),
        # async level 0: step N waits for checkpoint N itself, so every wait includes the 5 s write delay
        # however fast or slow generation is on this machine
        ("slow-writes", ("--slow-writes", "5000", "--async-level", "0"), "checkpoint_io_slow"),
    ],
)
def test_verdict_against_shared_server(vllm_server, tiny_model, name, args, expected):
    from weightwatch.analysis import analyze_paths

    model = _model_name(vllm_server.base_url)
    before = _greedy(vllm_server.base_url, model)
    load_before = os.getloadavg()[0]
    run_dir, output = _run_against(vllm_server, tiny_model, name, *args)
    report = analyze_paths([run_dir])
    events = _events(run_dir / "orchestrator.log")
    done = [e for e in events if e.key == "weights.client.done" and e.get("op") == "update_weights"]
    assert len(done) >= 3 and all(e.get("ok") == "1" for e in done)
    ops = {e.get("op") for e in events if e.key == "weights.client.done"}
    syncs = [e for e in events if e.key == "weights.sync.done"]
    if name == "shared":  # the bare update of the seed: no pause, no resume
        assert ops == {"update_weights"} and not syncs
    else:  # the sync of today by default, every call of it answered
        assert ops == {"pause", "update_weights", "resume"} and len(syncs) >= 3 and all(e["ok"] == 1 for e in syncs)
    if expected == "healthy" and report.verdict.signature != "healthy":
        waits = [e for e in _events(run_dir / "orchestrator.log") if e.key == "ckpt.wait.done"]
        _xfail_if_only_a_cpu_tail(done, waits, load_before)
    assert report.verdict.signature == expected, f"{report.verdict}\n{output[-3000:]}"
    assert f"verdict: {expected}" in output
    # the server now runs the run's last checkpoint, not what it had before
    assert _greedy(vllm_server.base_url, model) != before
