"""The CPU-budget benchmark's parts (benchmarks/bench_inference_budget.py): each term must measure what it names
(the front-end CPU must leave the engine's processes out, the probe's cost must be per real wake-up, routing
must be priced on routes that never take a completion), and the sum and the bound must be the arithmetic the
report claims."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
from benchmarks import bench_inference_budget as budget  # noqa: E402
from benchmarks.bench_inference_lane import tree_cpu  # noqa: E402
from fastapi.routing import APIRoute


def test_front_end_cpu_leaves_out_the_engine_processes() -> None:
    """A parent that burns ~0.6 s with a child named like vLLM's engine that burns ~0.6 s too: only the
    parent's CPU counts."""
    code = textwrap.dedent(
        """
        import subprocess, sys, time
        engine = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
        end = time.process_time() + 0.6
        while time.process_time() < end:
            pass
        time.sleep(60)
        """
    )
    engine = textwrap.dedent(
        """
        import ctypes, time
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(b"VLLM::Worker"), 0, 0, 0)  # PR_SET_NAME, read by psutil.name()
        end = time.process_time() + 0.6
        while time.process_time() < end:
            pass
        time.sleep(60)
        """
    )
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", code, engine])
    try:
        root = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until both have burnt their share
            kids = root.children()
            if kids and kids[0].name() == "VLLM::Worker" and sum(kids[0].cpu_times()[:2]) >= 0.6 and sum(root.cpu_times()[:2]) >= 0.6:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the processes did not burn their CPU in 30 s")
        front = tree_cpu(proc.pid)["front end"]
        assert 0.6 <= front < 1.0  # the parent's burn and start-up, not the engine's 0.6 s
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        proc.kill()
        proc.wait()
    assert tree_cpu(proc.pid)["front end"] == 0.0  # gone: nothing to count, no error


def test_routes_are_weightwatchs_and_none_takes_a_completion() -> None:
    routes = budget.weightwatch_routes()
    paths = {r.path for r in routes}
    assert {"/update_weights", "/reload_weights", "/metrics"} <= paths
    assert budget.routing_us_per_request(routes, n=200) > 0


def test_routing_refuses_a_route_that_would_take_completions() -> None:
    async def completions() -> None:
        return None

    with pytest.raises(AssertionError, match="/v1/completions would take completion requests"):
        budget.routing_us_per_request([APIRoute("/v1/completions", completions, methods=["POST"])], n=10)


def test_probe_cost_is_per_real_wake_up(telemetry_reset: Any) -> None:
    """At a 10 ms interval a 0.3 s run has at most ~30 wake-ups (counted by the probe's own histogram); each costs CPU."""
    us, wakeups = budget.probe_us_per_wakeup(seconds=0.3, interval=0.01)
    assert 5 <= wakeups <= 31
    assert us > 0


def test_budget_adds_the_terms_per_token() -> None:
    b = budget.budget(message_us=0.5, routing_us=2.56, tokens_per_request=256, background_us_per_s=600.0, tokens_per_s=6000)
    assert b["per streamed message"] == pytest.approx(0.5)
    assert b["routing, per request"] == pytest.approx(0.01)
    assert b["process-wide, per second"] == pytest.approx(0.1)
    assert b["total"] == pytest.approx(0.61)
    # a term measured below zero (noise) adds nothing rather than cancelling another term
    assert budget.budget(-1.0, 0.0, 256, -5.0, 6000)["total"] == 0.0


def synthetic_result(slope_hi: float) -> dict[str, Any]:
    return {
        "when": "now", "machine": "x86_64, 2 cores", "load_average": [1.0, 1.0, 1.0],
        "args": {"windows": 3, "window": 30.0, "max_tokens": 256, "requests": 10, "repeats": 3},
        "idle": {"ms_per_s": [{"vLLM": 2.0, "weightwatch serve": 2.5}] * 3, "scrapes": 6},
        "per_message_us": {"bare": [1.0] * 3, "weightwatch": [0.1] * 3, "weightwatch, traced": [1.0] * 3},
        "routes": ["/update_weights"], "routing_us": [2.56, 1.0],
        "probe_us_per_wakeup": [20.0, 30.0, 40.0], "probe_wakeups": [900, 910, 920],
        "context": {"source": "ab.json", "api_us_per_token": 100.0, "tokens_per_s_min": 5000.0, "windows": 30,
                    "slope_source": "ab5.json", "slope": 0.003, "slope_ci": [0.0, slope_hi]},
    }  # fmt: skip


def test_bound_is_the_added_cpu_over_vllms_cpu_per_token() -> None:
    a = budget.analyse(synthetic_result(slope_hi=0.006))
    # background: the larger of the idle difference (500 µs/s) and the probe (30 µs x 10/s = 300 µs/s)
    assert a["background_us_per_s"] == pytest.approx(500.0)
    default = 0.1 + 2.56 / 256 + 500.0 / 5000.0
    assert a["budgets"]["weightwatch"]["total"] == pytest.approx(default)
    assert a["bound"]["weightwatch"] == pytest.approx(default / 100.0)
    assert a["bound"]["weightwatch, traced"] == pytest.approx((1.0 + 2.56 / 256 + 0.1) / 100.0)
    assert a["slope_under_bound"] is True
    text = budget.report(synthetic_result(slope_hi=0.006))
    assert f"**{default:.3f}**" in text and "holds" in text


def test_report_says_when_the_measured_slope_breaks_the_bound() -> None:
    a = budget.analyse(synthetic_result(slope_hi=0.02))  # 2 % per µs: more than 1/(100 µs per token)
    assert a["slope_under_bound"] is False
    assert "does not hold" in budget.report(synthetic_result(slope_hi=0.02))


@pytest.mark.vllm
@pytest.mark.slow
def test_front_end_of_a_real_server_is_its_processes_minus_vllms_engine(vllm_server: Any) -> None:
    """On the session's ``weightwatch serve``: the engine's processes really are named ``VLLM::...`` (else the
    budget would count them as front end), and the front end is the launcher, the API server and multiprocessing's
    resource tracker."""
    import psutil

    root = psutil.Process(vllm_server.proc.pid)
    procs = [root, *root.children(recursive=True)]
    names = [p.name() for p in procs]
    assert any(n.startswith("VLLM::") for n in names), names
    front = [" ".join(p.cmdline()) for p in procs if not p.name().startswith("VLLM::")]
    kinds = sorted(k for c in front for k in ("weightwatch serve", "api_server", "resource_tracker") if k in c)
    assert len(kinds) == len(front) and {"weightwatch serve", "api_server"} <= set(kinds), front
    cpu = tree_cpu(vllm_server.proc.pid)
    assert 0 < cpu["front end"] < cpu["all"]
    assert cpu["api"] <= cpu["front end"]
