"""Benchmark: weightwatch's CPU in vLLM's API server, term by term, and the bound it puts on tokens/s.

    python -m benchmarks.bench_inference_budget [--windows 8] [--window 30] [--ab-results FILE]

Comparing tokens/s with and without weightwatch (bench_inference_ab.py, bench_inference_lane.py part 2) cannot
resolve 1 % on a small shared host: throughput swings 15-25 % between windows for reasons no setting controls.
This benchmark prices every part weightwatch adds to the API server instead, each where it can be measured
precisely, and adds them up per generated token:

* **per streamed message** (the middleware, OpenTelemetry with its fast path, per-request work spread over the
  request's messages): CPU per message of weightwatch's app minus the bare app, in process
  (``bench_inference_overhead.measure``), for default (untraced) and traced requests;
* **routing**: vLLM appends plugin routes after its own (a plugin route that replaces a core route takes its
  place), so a completion rarely tries them; priced as if every one were tried first, once per request;
* **process-wide** (the event-loop lag probe, the span exporter and admin-lane threads, the metrics
  collector, the ``weightwatch serve`` parent): CPU per second of two real idle servers, ``weightwatch serve``
  and vLLM's own, up together and scraped every 15 s like Prometheus would, front-end processes only (the
  engine's processes are the same code in both); and the lag probe's cost per wake-up, in process, as a check.

The added µs per token, over vLLM's own API-server CPU per token under the 256-stream load (from a
bench_inference_ab.py run), bounds the tokens/s lost: a front end that does x % more work per token can slow
generation by at most x %, and only when it is the bottleneck. The burn windows of that run measure the real
slope (tokens/s lost per µs per message); it must stay under the bound's 1/(API µs per token) for the bound to
hold, and the report checks it. Each term uses the upper end of its 95 % interval.

Prints a table and writes benchmarks/results/inference_budget.md (and .json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent

from benchmarks.bench_inference_ab import add_run_args, bootstrap_ci, publish, run_or_reload  # noqa: E402
from benchmarks.bench_inference_lane import tree_cpu  # noqa: E402
from weightwatch.telemetry import LAG_PROBE_INTERVAL_S  # noqa: E402

DEFAULT_AB = HERE / "results" / "inference_ab_two_modes.json"
DEFAULT_SLOPE = HERE / "results" / "inference_ab.json"
SCRAPE_EVERY_S = 15.0


# --------------------------------------------------------------------------- per streamed message


def per_message(requests: int, chunks: int, repeats: int) -> dict[str, Any]:
    """µs of CPU per streamed message that weightwatch adds to the bare app, per repeat, default and traced."""
    from bench_inference_overhead import measure_request_path

    runs = measure_request_path(requests, chunks, repeats)
    added = {v: [a - b for a, b in zip(runs[v], runs["bare"], strict=True)] for v in ("weightwatch", "weightwatch, traced")}
    return added | {"bare": runs["bare"]}


# --------------------------------------------------------------------------- routing


def weightwatch_routes() -> list[Any]:
    """The routes the plugin adds to vLLM's app (admin and metrics), built as the plugin builds them."""
    from weightwatch.inference.admin import build_router
    from weightwatch.inference.metrics_endpoint import build_metrics_router

    return [*build_router(None, lambda: None).routes, *build_metrics_router().routes]  # type: ignore[arg-type]


def routing_us_per_request(routes: list[Any], n: int = 20_000) -> float:
    """CPU µs to try every one of ``routes`` against a completion request (none matches it)."""
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "", "headers": []}
    for route in routes:
        assert route.matches(scope)[0].name == "NONE", f"{route.path} would take completion requests"
    t0 = time.process_time()
    for _ in range(n):
        for route in routes:
            route.matches(scope)
    return (time.process_time() - t0) / n * 1e6


# --------------------------------------------------------------------------- the lag probe


def probe_us_per_wakeup(seconds: float = 1.0, interval: float = 1e-4) -> tuple[float, int]:
    """CPU µs per wake-up of weightwatch's lag probe (timer, wake-up, histogram observation), woken as often as the
    loop allows, so with warm caches; a check on the idle servers, which price it at its real 100 ms interval."""
    from prometheus_client import CollectorRegistry

    import weightwatch
    from weightwatch import telemetry

    registry = CollectorRegistry()
    weightwatch.shutdown()
    weightwatch.setup(role="inference", registry=registry, set_global_tracer_provider=False)

    def count() -> int:
        return int(registry.get_sample_value("rl_event_loop_lag_seconds_count") or 0)

    async def run() -> tuple[float, int]:
        task = telemetry.start_loop_lag_probe("rl_event_loop_lag_seconds", interval)
        await asyncio.sleep(0.2)  # past the first wake-ups' one-off costs
        n0, t0 = count(), time.process_time()
        await asyncio.sleep(seconds)
        used, wakeups = time.process_time() - t0, count() - n0
        task.cancel()
        return used, wakeups

    try:
        used, wakeups = asyncio.run(run())
    finally:
        weightwatch.shutdown()
    return (used / wakeups * 1e6 if wakeups else float("nan")), wakeups


# --------------------------------------------------------------------------- idle servers


class Scraper(threading.Thread):
    """GETs each server's /metrics every ``every`` s, as Prometheus would, until stopped."""

    def __init__(self, urls: list[str], every: float = SCRAPE_EVERY_S):
        super().__init__(daemon=True)
        self.urls, self.every = urls, every
        self.stop = threading.Event()
        self.scrapes = 0

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                for url in self.urls:
                    client.get(url).raise_for_status()
                self.scrapes += 1
                self.stop.wait(self.every)


def idle_servers(model: Path, windows: int, window: float) -> dict[str, Any]:
    """Front-end CPU ms per s of ``weightwatch serve`` and vLLM's own server, both up and idle, same windows."""
    from bench_inference_lane import SERVER_ARGS
    from benchmarks.servers import start_plain_server, start_weightwatch_server, wait_ready

    work = Path(tempfile.mkdtemp(prefix="ww-bench-budget-"))
    plain = start_plain_server(model, work / "plain", vllm_args=SERVER_ARGS)
    ww = start_weightwatch_server(model, work / "weightwatch", admin_token=None, vllm_args=SERVER_ARGS)
    servers = {"vLLM": plain, "weightwatch serve": ww}
    rows: list[dict[str, float]] = []
    try:
        for s in servers.values():
            wait_ready(s)
        scraper = Scraper([s.metrics_url for s in servers.values()])
        scraper.start()
        time.sleep(window)  # past start-up work (first scrapes, compile caches)
        for _ in range(windows):
            t0, cpu0 = time.monotonic(), {k: tree_cpu(s.proc.pid)["front end"] for k, s in servers.items()}
            time.sleep(window)
            wall = time.monotonic() - t0
            rows.append({k: (tree_cpu(s.proc.pid)["front end"] - cpu0[k]) / wall * 1e3 for k, s in servers.items()})
        scraper.stop.set()
        scraper.join(timeout=30)
    finally:
        for s in servers.values():
            s.stop()
    return {"ms_per_s": rows, "scrapes": scraper.scrapes}


# --------------------------------------------------------------------------- the sum


def load_context(ab_path: Path, slope_path: Path) -> dict[str, Any]:
    """What the bound divides by, from saved bench_inference_ab.py runs: vLLM's own API-server CPU per token and
    tokens/s under the 256-stream load, each the lowest of its windows (the smaller, the larger the bound), and
    the measured burn slope with its interval."""
    from bench_inference_ab import BYPASS, analyse

    ab = json.loads(ab_path.read_text())
    own = [w for w in ab["windows"] if w["mode"] == BYPASS]
    out: dict[str, Any] = {
        "source": ab_path.name,
        "api_us_per_token": min(w["api_us_per_token"] for w in own if w["api_us_per_token"]),
        "tokens_per_s_min": min(w["tokens_per_s"] for w in own),
        "windows": len(own),
    }
    if slope_path.exists():
        a = analyse(json.loads(slope_path.read_text()))
        out |= {"slope_source": slope_path.name, "slope": a["slope"], "slope_ci": list(a["slope_ci"])}
    return out


def upper(values: list[float]) -> float:
    """Upper end of the 95 % bootstrap interval of the mean (one value: itself)."""
    return bootstrap_ci(values)[1] if len(values) > 1 else values[0]


def budget(
    message_us: float, routing_us: float, tokens_per_request: float, background_us_per_s: float, tokens_per_s: float
) -> dict[str, float]:
    """µs of API-server CPU weightwatch adds per generated token, by term (one SSE message per token is the
    unmerged case, the most messages vLLM sends)."""
    terms = {
        "per streamed message": max(message_us, 0.0),
        "routing, per request": max(routing_us, 0.0) / tokens_per_request,
        "process-wide, per second": max(background_us_per_s, 0.0) / tokens_per_s,
    }
    return terms | {"total": sum(terms.values())}


def run(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    idle = idle_servers(model, args.windows, args.window)
    msg = per_message(args.requests, args.max_tokens, args.repeats)
    routes = weightwatch_routes()
    routing = [routing_us_per_request(routes) for _ in range(5)]
    probe = [probe_us_per_wakeup() for _ in range(3)]
    return {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "idle": idle,
        "per_message_us": msg,
        "routes": [r.path for r in routes],
        "routing_us": routing,
        "probe_us_per_wakeup": [p[0] for p in probe],
        "probe_wakeups": [p[1] for p in probe],
        "context": load_context(Path(args.ab_results), Path(args.slope_results)),
    }


def analyse(res: dict[str, Any]) -> dict[str, Any]:
    ctx, args = res["context"], res["args"]
    diffs = [r["weightwatch serve"] - r["vLLM"] for r in res["idle"]["ms_per_s"]]
    probe_us_per_s = statistics.median(res["probe_us_per_wakeup"]) / LAG_PROBE_INTERVAL_S
    background = max(upper(diffs) * 1e3, probe_us_per_s)
    routing = max(res["routing_us"])
    budgets = {
        v: budget(upper(res["per_message_us"][v]), routing, args["max_tokens"], background, ctx["tokens_per_s_min"])
        for v in ("weightwatch", "weightwatch, traced")
    }
    bound = {v: b["total"] / ctx["api_us_per_token"] for v, b in budgets.items()}
    out = {
        "idle_diff_ms_per_s": (statistics.fmean(diffs), *bootstrap_ci(diffs)),
        "probe_us_per_s": probe_us_per_s,
        "background_us_per_s": background,
        "routing_us": routing,
        "budgets": budgets,
        "bound": bound,
        "bound_slope": 1 / ctx["api_us_per_token"],
    }
    if "slope" in ctx:
        out["slope_estimate"] = {v: (b["total"] * ctx["slope"], b["total"] * ctx["slope_ci"][1]) for v, b in budgets.items()}
        out["slope_under_bound"] = ctx["slope_ci"][1] <= out["bound_slope"]
    return out


def report(res: dict[str, Any]) -> str:
    a, ctx, args = analyse(res), res["context"], res["args"]
    idle = res["idle"]["ms_per_s"]
    med = {k: statistics.median(r[k] for r in idle) for k in idle[0]}
    lo, hi = a["idle_diff_ms_per_s"][1:]
    bare = statistics.median(res["per_message_us"]["bare"])
    lines = [
        "# weightwatch's CPU in vLLM's API server, and the bound on tokens/s",
        "",
        f"Run {res['when']} on {res['machine']} (load average at the end {' '.join(f'{x:.1f}' for x in res['load_average'])}). "
        f"`python -m benchmarks.bench_inference_budget --windows {args['windows']} --window {args['window']:g}`.",
        "",
        "| term | how measured | µs per token, default requests | µs per token, every request traced |",
        "|---|---|---|---|",
    ]
    how = {
        "per streamed message": f"in process, {args['repeats']} interleaved repeats of {args['requests']} requests x {args['max_tokens']} "
        f"messages; weightwatch's app minus the bare app ({bare:.2f} µs per message), upper 95 % end",
        "routing, per request": f"all {len(res['routes'])} weightwatch routes tried against a completion ({a['routing_us']:.2f} µs), "
        f"once per request of {args['max_tokens']} tokens (as if all were tried before vLLM's completion route)",
        "process-wide, per second": f"two idle servers, same {len(idle)} windows of {args['window']:g} s, /metrics scraped every "
        f"{SCRAPE_EVERY_S:g} s: front end {med['weightwatch serve']:.2f} ms/s (weightwatch serve) vs {med['vLLM']:.2f} ms/s (vLLM), "
        f"difference {a['idle_diff_ms_per_s'][0]:+.3f} ms/s (95 % {lo:+.3f} to {hi:+.3f}); the lag probe alone "
        f"{a['probe_us_per_s']:.0f} µs/s; the larger upper end ({a['background_us_per_s']:.0f} µs/s) over the slowest "
        f"tokens/s under load ({ctx['tokens_per_s_min']:,.0f})",
    }
    d, t = a["budgets"]["weightwatch"], a["budgets"]["weightwatch, traced"]
    for term in how:
        lines.append(f"| {term} | {how[term]} | {d[term]:.3f} | {t[term]:.3f} |")
    lines += [
        f"| **total** | | **{d['total']:.3f}** | **{t['total']:.3f}** |",
        "",
        f"vLLM's own API server spends at least {ctx['api_us_per_token']:.0f} µs of CPU per token under the 256-stream load (the "
        f"lowest of {ctx['windows']} windows of `{ctx['source']}`). A front end that does x % more work per token can slow generation by "
        "at most x %, and only when it is the bottleneck, so:",
        "",
        "| requests | weightwatch's CPU per token | bound on tokens/s lost | measured slope x CPU (95 % upper end) | target (1 %) |",
        "|---|---|---|---|---|",
    ]
    names = {
        "weightwatch": "default (traced only when the caller sends a `traceparent`)",
        "weightwatch, traced": "every request traced (opt-in)",
    }
    for v, b in a["bound"].items():
        est = a.get("slope_estimate", {}).get(v)
        verdict = "met" if b <= 0.01 else ("met by the slope estimate, not by the bound" if est and est[1] <= 0.01 else "not shown")
        slope_cell = f"{est[0] * 100:.3f} % ({est[1] * 100:.3f} %)" if est else "n/a"
        lines.append(f"| {names[v]} | {a['budgets'][v]['total']:.3f} µs | **{b * 100:.3f} %** | {slope_cell} | {verdict} |")
    if "slope" in ctx:
        s_lo, s_hi = ctx["slope_ci"]
        lines += [
            "",
            f"Check of the bound's premise: the burn windows of `{ctx['slope_source']}` measured {ctx['slope'] * 100:.2f} % of "
            f"tokens/s per µs per message (95 % {s_lo * 100:.2f} to {s_hi * 100:.2f} %); the bound assumes at most "
            f"{a['bound_slope'] * 100:.2f} %: {'holds' if a['slope_under_bound'] else '**does not hold**: use the slope'}.",
        ]
    lines += [
        "",
        f"Lag probe: {statistics.median(res['probe_us_per_wakeup']):.1f} µs per wake-up on a loop that wakes only for it "
        f"({min(res['probe_wakeups']):,} to {max(res['probe_wakeups']):,} wake-ups per 1 s run); it wakes 10 times a second. "
        f"Idle front ends scraped {res['idle']['scrapes']} times each.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=8, help="idle windows measured on both servers")
    p.add_argument("--window", type=float, default=30.0, help="seconds per idle window")
    p.add_argument("--max-tokens", type=int, default=256, help="messages per request (the load's mean completion length)")
    p.add_argument("--ab-results", type=Path, default=DEFAULT_AB, help="bench_inference_ab.py results: vLLM's CPU per token")
    p.add_argument("--slope-results", type=Path, default=DEFAULT_SLOPE, help="bench_inference_ab.py results with burn windows")
    add_run_args(p, HERE / "results" / "inference_budget.md")
    args = p.parse_args()
    res = run_or_reload(args, run)
    publish(report(res), res, args.out)


if __name__ == "__main__":
    main()
