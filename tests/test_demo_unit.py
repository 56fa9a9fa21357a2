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


# --------------------------------------------------------------------------- the sync of today: fault plan, live view


def test_fault_plan_per_switch():
    from weightwatch.demo.faults import ENV_INJECT_DELAY_MS, ENV_INJECT_FAIL, plan_faults

    assert [s.env() for s in plan_faults().servers] == [{}]
    slow = plan_faults(slow_pause_ms=1500, servers=2)
    assert [s.env() for s in slow.servers] == [{ENV_INJECT_DELAY_MS: "pause=1500"}] * 2 and slow.expected == ("pause_slow",)
    # the straggler needs a second server to straggle against: one is added, and only the last is slowed
    strag = plan_faults(straggler_ms=3000)
    assert strag.count == 2 and strag.notes and [s.env() for s in strag.servers] == [{}, {ENV_INJECT_DELAY_MS: "update_weights=3000"}]
    skew = plan_faults(version_skew=True)
    assert [s.env() for s in skew.servers] == [{}, {ENV_INJECT_FAIL: "update_weights"}] and skew.expected == ("version_skew",)
    # together: the failing server cannot straggle (it answers at once), so the straggler is the other one
    both = plan_faults(straggler_ms=3000, version_skew=True, slow_pause_ms=1500)
    assert [s.env() for s in both.servers] == [
        {ENV_INJECT_DELAY_MS: "pause=1500,update_weights=3000"},
        {ENV_INJECT_DELAY_MS: "pause=1500", ENV_INJECT_FAIL: "update_weights"},
    ]
    assert set(both.expected) == {"pause_slow", "straggler", "version_skew"}


def test_fault_plan_hung_update_sits_between_half_and_all_of_its_budget():
    from weightwatch.catalogue import HUNG_BUDGET_FRACTION
    from weightwatch.demo.faults import ENV_INJECT_DELAY_MS, FaultPlanError, plan_faults

    plan = plan_faults(hung_update=True)
    budget = plan.budgets_s["update_weights"]
    delay = float(plan.servers[0].env()[ENV_INJECT_DELAY_MS].split("=")[1])
    assert budget * 1000 * HUNG_BUDGET_FRACTION < delay < budget * 1000
    # AdminCallHung holds for 15 s past half the budget before it fires: the default leaves room for that
    assert delay - budget * 1000 * HUNG_BUDGET_FRACTION > 15_000
    custom = plan_faults(hung_update=True, update_budget_s=100)
    assert custom.budgets_s["update_weights"] == 100 and "update_weights=90000" in custom.servers[0].env()[ENV_INJECT_DELAY_MS]
    for bad in (10_000, 70_000):  # under half the budget: not hung; over all of it: cut off, never ends
        with pytest.raises(FaultPlanError, match="between half the update budget"):
            plan_faults(hung_update=True, hung_delay_ms=bad)
    with pytest.raises(FaultPlanError, match="drop --sync bare"):
        plan_faults(hung_update=True, sync="bare")
    assert plan_faults().budgets_s == {"pause": 300.0, "update_weights": 720.0, "resume": 300.0}


def test_cli_sync_defaults_and_refusals(tmp_path, capsys):
    assert demo_cli.resolve_sync(_parse()) == "today"
    assert demo_cli.resolve_sync(_parse("--admin", "shared")) == "bare"  # a pause through the shared pool deadlocks
    assert demo_cli.resolve_sync(_parse("--admin", "shared", "--sync", "today")) is None
    assert "--sync bare with --admin shared" in capsys.readouterr().err
    a = _parse("--admin", "shared", "--sync", "today", "--run-dir", str(tmp_path / "r"))
    assert demo_cli.run(a) == 2
    assert "freezes the generation streams" in capsys.readouterr().err and not (tmp_path / "r").exists()
    a = _parse("--server-url", "http://127.0.0.1:1", "--version-skew", "--run-dir", str(tmp_path / "r"))
    assert demo_cli.run(a) == 2
    assert "WEIGHTWATCH_INJECT_FAIL=update_weights" in capsys.readouterr().err
    for bad in (["--servers", "0"], ["--sync", "sideways"], ["--update-budget", "0"], ["--hung-delay", "-1"]):
        with pytest.raises(SystemExit):
            _parse(*bad)


def test_cli_server_addresses_for_several_servers():
    a = _parse("--servers", "2")
    addrs = demo_cli._server_addresses(a, 2, "127.0.0.1")
    assert [(s.role, s.api_url, s.admin_url) for s in addrs] == [
        ("inference", "http://127.0.0.1:8000", "http://127.0.0.1:8001"),
        ("inference-1", "http://127.0.0.1:8002", "http://127.0.0.1:8003"),
    ]
    a = _parse("--server-url", "http://h:9000", "--server-url", "http://h:9010", "--admin-url", "http://h:9001", "--admin-url", "http://h:9011")
    assert [s.admin_url for s in demo_cli._server_addresses(a, 2, "127.0.0.1")] == ["http://h:9001", "http://h:9011"]


def test_orchestrator_refuses_a_sync_through_the_shared_pool():
    from weightwatch.demo import orchestrator_proc

    args = orchestrator_proc.build_parser().parse_args(["--run-dir", "x", "--api-url", "http://h:1", "--admin", "shared"])
    with pytest.raises(SystemExit, match="cannot run the sync of today"):
        orchestrator_proc.check_args(args)
    args.sync = "bare"
    orchestrator_proc.check_args(args)
    lane = orchestrator_proc.build_parser().parse_args(["--run-dir", "x", "--api-url", "http://h:1", "--api-url", "http://h:3",
                                                        "--admin-url", "http://h:2"])
    with pytest.raises(SystemExit, match="one --admin-url"):
        orchestrator_proc.check_args(lane)


def _sync_lines(tid: str, step: int, calls: list[tuple[str, str, float, bool]], t: float, done: bool = True) -> list[str]:
    lines = [format_event("weights.sync.start", tid, step=step, servers=2, t=t)]
    for op, server, wall, ok in calls:
        url = f"http://{server}/{op}"
        lines.append(format_event("weights.client.send", tid, url=url, op=op, t=t, step=step, budget_s=60))
        lines.append(format_event("weights.client.done", tid, wall_ms=wall, rpc_ms=wall / 2, queue_ms=1.0, op=op, url=url,
                                  ok=1 if ok else 0, step=step))
    if done:
        phase = {"pause": 0.0, "transfer": 0.0, "resume": 0.0}
        for op, _s, wall, _ok in calls:
            key = {"pause": "pause", "update_weights": "transfer", "resume": "resume"}[op]
            phase[key] = max(phase[key], wall)
        lines.append(format_event("weights.sync.done", tid, step=step, wall_ms=sum(phase.values()), pause_ms=phase["pause"],
                                  transfer_ms=phase["transfer"], resume_ms=phase["resume"], ok=int(all(c[3] for c in calls))))
    return lines


def test_live_view_shows_sync_phases_slowest_server_versions_and_hung_calls(tmp_path):
    layout = RunLayout.create(tmp_path)
    a, b = "127.0.0.1:8001", "127.0.0.1:8003"
    now = time.time()
    lines = _sync_lines("t1", 1, [("pause", a, 1500.0, True), ("pause", b, 1490.0, True), ("update_weights", a, 3100.0, True),
                                  ("update_weights", b, 40.0, False), ("resume", a, 20.0, True), ("resume", b, 25.0, True)], now - 100)
    # a second sync whose update to b is still in flight, 40 s of its 60 s budget
    lines += [format_event("weights.sync.start", "t2", step=2, servers=2, t=now - 41),
              format_event("weights.client.send", "t2", url=f"http://{b}/update_weights", op="update_weights", t=now - 40,
                           step=2, budget_s=60)]
    layout.log("orchestrator").write_text("\n".join(lines) + "\n")
    out = io.StringIO()
    view = LiveView({"orchestrator": layout.log("orchestrator")}, "sync=today", out=out, live=False)
    view.poll()
    s = view.state
    row = s.syncs[0]
    assert row.slowest("pause") == (a, 1500.0) and row.slowest("transfer") == (a, 3100.0) and row.slowest("resume") == (b, 25.0)
    assert row.ok is False and row.failed == [f"update_weights {b}"]
    assert s.versions == {a: 1, b: None}  # b failed its only update: it still serves what it started with
    assert s.all_phase["pause"] == [1500.0] and s.all_wall == [3100.0, 40.0]  # pause/resume calls are not "updates"
    view.render()
    printed = out.getvalue()
    assert f"transfer     3100 ms ({a})" in printed and f"FAILED update_weights {b}" in printed
    assert f"in flight: update_weights on {b} for 40 s of its 60 s budget  <- past half: hung" in printed
    screen = view.screen()
    assert "weight version per server" in screen and "SKEW" in screen and "sync to ckpt   2" in screen and "in flight" in screen
    assert "syncs 1  p50/p99  pause 1500 / 1500 ms" in view.summary()
    view.render()
    assert out.getvalue() == printed  # the hung call is reported once, the finished sync once
