"""Demo parts that need no vLLM: process supervision, the live view, the rollout hand-over, the CLI."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from weightwatch.demo import cli as demo_cli
from weightwatch.demo.layout import RunLayout, read_rollouts, write_rollouts
from weightwatch.demo.live import LiveView, LogFollower
from weightwatch.demo.supervisor import Supervisor, alive_pids, descendants
from weightwatch.demo.trainer_proc import config_files
from weightwatch.events import format_event

# A process tree like `weightwatch serve`: the child starts a grandchild in a session of its own
# (out of the child's process group) and another one in its group; the grandchild ignores SIGTERM.
_TREE = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"
    a = subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True)
    b = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print("tree", a.pid, b.pid, flush=True)
    time.sleep(600)
    """
)


def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_supervisor_leaves_no_process_behind(tmp_path):
    sup = Supervisor()
    child = sup.spawn("tree", [sys.executable, "-c", _TREE], tmp_path / "tree.out")
    _wait_for(lambda: "tree" in (tmp_path / "tree.out").read_text() and len(descendants(child.pid)) >= 2)
    tree = descendants(child.pid)
    # the stubborn grandchild ignores SIGTERM and lives in another session: only the kill path gets it
    codes = sup.stop_all(timeout=2.0)
    assert "tree" in codes
    assert alive_pids(tree + [child.pid]) == []


def test_supervisor_stops_in_reverse_order(tmp_path):
    sup = Supervisor()
    log = tmp_path / "order.txt"
    prog = "import signal, sys, time\n" \
           "def bye(*_):\n    open(sys.argv[2], 'a').write(sys.argv[1] + '\\n'); sys.exit(0)\n" \
           "signal.signal(signal.SIGTERM, bye)\nprint('up', flush=True)\ntime.sleep(600)\n"
    for name in ("inference", "trainer", "orchestrator"):
        sup.spawn(name, [sys.executable, "-c", prog, name, str(log)], tmp_path / f"{name}.out")
    _wait_for(lambda: all("up" in (tmp_path / f"{n}.out").read_text() for n in ("inference", "trainer", "orchestrator")))
    codes = sup.stop_all(timeout=10.0)
    assert codes == {"orchestrator": 0, "trainer": 0, "inference": 0}
    assert log.read_text().split() == ["orchestrator", "trainer", "inference"]


def test_log_follower_reads_only_complete_lines(tmp_path):
    path = tmp_path / "x.log"
    f = LogFollower(path)
    assert f.read() == []  # not there yet
    path.write_text("one\ntw")
    assert f.read() == ["one"]
    with open(path, "a") as fh:
        fh.write("o\nthree\n")
    assert f.read() == ["two", "three"]
    path.write_text("new\n")  # truncated and rewritten
    assert f.read() == ["new"]


def test_live_view_from_log_events(tmp_path):
    layout = RunLayout.create(tmp_path)
    lines = {
        "orchestrator": [
            format_event("ckpt.wait.start", target_step=1),
            format_event("ckpt.wait.done", target_step=1, wait_ms=1234.5),
            format_event("weights.client.send", "abc", url="http://x/update_weights", op="update_weights", t=1.0),
            format_event("weights.client.done", "abc", wall_ms=3650.0, rpc_ms=40.0, queue_ms=3600.0),
            format_event("gen.batch.start", "abc", inflight=64, target_batch=32),
            format_event("gen.batch.done", "abc", completions=32, dur_ms=900.0, inflight=63),
            format_event("rollout", trunc_pct=25.0, current_step=3, ckpt_step=1, staleness=2),
        ],
        "trainer": [format_event("ckpt.write.done", step=2, write_ms=12.5)],
        "inference": ["noise without a tag", "[weights] rpc.done broken"],
    }
    for role, ls in lines.items():
        layout.log(role).write_text("2026-01-01 INFO weightwatch.x " + "\n2026-01-01 INFO weightwatch.x ".join(ls) + "\n")
    out = io.StringIO()
    view = LiveView({r: layout.log(r) for r in lines}, "admin=shared", out=out, live=False)
    view.poll()
    s = view.state
    assert (s.step, s.ckpt_step, s.staleness, s.trunc_pct, s.inflight) == (3, 1, 2, 25.0, 63)
    assert (s.trainer_step, s.last_write_ms, s.last_wait_ms) == (2, 12.5, 1234.5)
    assert s.all_queue == [3600.0] and s.all_rpc == [40.0]
    view.render()
    printed = out.getvalue()
    assert "step   3" in printed and "queue     3600 ms" in printed and "ckpt-wait     1234 ms" in printed
    screen = view.screen()
    assert "admin=shared" in screen and "3600 ms" in screen
    assert "queue 3600 / 3600 ms" in view.summary()
    # nothing new: nothing printed again
    view.poll()
    view.render()
    assert out.getvalue() == printed


def test_rollouts_hand_over_round_trip(tmp_path):
    layout = RunLayout.create(tmp_path / "run")
    recs = [{"prompt": "a b", "text": " c d", "finish_reason": "length", "ckpt_step": 0}]
    write_rollouts(layout.rollout_file(0), recs)
    assert read_rollouts(layout.rollout_file(0)) == recs
    assert [p.name for p in layout.rollouts.iterdir()] == ["step_0.jsonl"]  # no temporary left
    with open(layout.rollout_file(0), "a") as fh:
        fh.write("not json\n[1, 2]\n")
    assert read_rollouts(layout.rollout_file(0)) == recs


def test_config_files_skip_weights_and_markers(tmp_path):
    for name in ("config.json", "tokenizer.json", "model.safetensors", ".weightwatch-tiny-model.json", "generation_config.json"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in config_files(tmp_path)] == ["config.json", "generation_config.json", "tokenizer.json"]


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    demo_cli.add_arguments(p)
    return p.parse_args(list(argv))


def test_cli_defaults_and_bad_values():
    a = _parse()
    assert (a.duration, a.concurrency, a.admin, a.port, a.admin_port) == (60.0, 64, "lane", 8000, 8001)
    assert (a.orchestrator_metrics_port, a.trainer_metrics_port, a.host_bind) == (9400, 9401, "127.0.0.1")
    for bad in (["--concurrency", "0"], ["--slow-writes", "-5"], ["--duration", "nan"], ["--admin", "both"]):
        with pytest.raises(SystemExit):
            _parse(*bad)


def test_cli_refuses_slow_reload_on_a_foreign_server(tmp_path, capsys):
    a = _parse("--server-url", "http://127.0.0.1:1", "--slow-reload", "100", "--run-dir", str(tmp_path / "r"))
    assert demo_cli.run(a) == 2
    assert "WEIGHTWATCH_INJECT_RPC_DELAY_MS" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_cli_reports_an_unreachable_server_and_keeps_the_run(tmp_path, capsys):
    from conftest import free_port

    a = _parse("--server-url", f"http://127.0.0.1:{free_port()}", "--run-dir", str(tmp_path / "r"),
               "--model", str(tmp_path / "model"), "--ports", "auto")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    a.startup_timeout = 1.0
    t0 = time.monotonic()
    code = demo_cli.run(a)
    err = capsys.readouterr().err
    assert code == 1 and "not ready" in err
    assert time.monotonic() - t0 < 120
    assert json.loads((tmp_path / "r" / "demo.json").read_text())["admin"] == "lane"


def test_admin_url_defaults_to_the_next_port():
    assert demo_cli._admin_url_for("http://10.0.0.5:8000") == "http://10.0.0.5:8001"


def test_processes_run_standalone_help():
    for mod in ("weightwatch.demo.trainer_proc", "weightwatch.demo.orchestrator_proc"):
        out = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "--run-dir" in out.stdout


def test_weightwatch_demo_help_lists_the_switches():
    out = subprocess.run([sys.executable, "-m", "weightwatch", "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ("--admin", "--slow-reload", "--slow-writes", "--duration", "--concurrency", "--host-bind", "--server-url"):
        assert flag in out.stdout


def test_run_dir_layout_names(tmp_path):
    layout = RunLayout.create(tmp_path / "r")
    assert layout.log("trainer") == tmp_path / "r" / "trainer.log"
    assert layout.spans("inference") == tmp_path / "r" / "inference.spans.jsonl"
    assert layout.weights == tmp_path / "r" / "weights" and layout.weights.is_dir()
    assert Path(layout.rollout_file(3)).name == "step_3.jsonl"
