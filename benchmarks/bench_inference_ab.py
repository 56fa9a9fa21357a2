"""Benchmark: what weightwatch's request path costs in tokens/s, measured inside one vLLM server.

    python -m benchmarks.bench_inference_ab [--streams 256] [--rounds 14] [--window 20] [--burn-us 10,40]

Comparing two servers (bench_inference_lane.py part 2) cannot resolve 1 % on a small shared host: two identical
plain servers differ by up to 15 % per round. Here one server (``benchmarks/ab_api_server.py``: vLLM's OpenAI server
with the weightwatch plugin and a benchmark-only switch above it) carries one continuous 256-stream load, and
the switch changes, window by window, how new requests are served:

* ``vLLM's stack``: straight to the stack OpenTelemetry wraps (vLLM's own middleware and router), skipping
  weightwatch's first-byte middleware, fast path and OpenTelemetry;
* ``weightwatch``: weightwatch's request path as ``weightwatch serve`` runs it (requests without a
  ``traceparent``: not traced, the default policy);
* ``weightwatch, traced``: the same with a ``traceparent`` on every request (a server span each, exported);
* ``weightwatch + burn N µs``: weightwatch's path plus N µs of CPU burnt on the event loop per streamed
  message: a known cost, to measure what one µs of API-server CPU per token costs in tokens/s.

After a switch the benchmark waits until no request started under the previous mode is in flight (the burn
dose changes at once). Windows run forward and backward in alternate rounds, so slow drift cancels. Each
window's tokens/s comes from the load generator's cumulative counts. The first two give the direct A/B, with
a bootstrap 95 % interval over rounds. The burn windows give the slope (tokens/s lost per µs per token). The
slope times weightwatch's CPU per token, measured in process after the load (bench_inference_overhead.py),
gives a second estimate of the cost: both factors are measured here, but the slope rests on two doses in a
noisy system. What the switch
cannot separate: weightwatch's routes in vLLM's router, its metrics and its idle threads (event-loop lag probe,
span exporter, admin lane) are there in every window.

Prints a table and writes benchmarks/results/inference_ab.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent

from benchmarks.bench_inference_lane import SERVER_ARGS, CpuSampler  # noqa: E402
from benchmarks.servers import VllmServer, free_port, wait_ready  # noqa: E402

BYPASS = "vLLM's stack"
WEIGHTWATCH = "weightwatch"
TRACED = "weightwatch, traced"


def burn_label(us: float) -> str:
    return f"weightwatch + burn {us:g} µs"


#: A window whose median SSE event carries fewer tokens than this is in the unmerged regime (see report()).
UNMERGED_BELOW = 1.1


def modes(burns: list[float], traced: bool = True) -> dict[str, dict[str, Any]]:
    """Window label -> switch settings, in forward order (adjacent windows share as much as possible)."""
    out: dict[str, dict[str, Any]] = {
        BYPASS: {"path": "vllm", "traced": False, "burn_us": 0.0},
        WEIGHTWATCH: {"path": "weightwatch", "traced": False, "burn_us": 0.0},
    }
    if traced:
        out[TRACED] = {"path": "weightwatch", "traced": True, "burn_us": 0.0}
    for us in burns:
        out[burn_label(us)] = {"path": "weightwatch", "traced": False, "burn_us": us}
    return out


def needs_settling(before: dict[str, Any] | None, after: dict[str, Any]) -> bool:
    """Whether requests started under ``before`` are served differently from new ones (the burn dose is read per
    message, so only switching it on or off is)."""
    if before is None:
        return True
    return before["path"] != after["path"] or before["traced"] != after["traced"] or (before["burn_us"] > 0) != (after["burn_us"] > 0)


def parse_cpus(text: str | None) -> set[int] | None:
    """``--frontend-cpus`` ("1", "2,3", or None for no pinning) as a CPU set."""
    return {int(x) for x in text.split(",") if x.strip()} if text else None


def pinned_to(cpus: set[int] | None) -> Any:
    """A ``preexec_fn`` that pins the child (and what it spawns) to ``cpus``. Threads that bind themselves can leave:
    vLLM's OpenMP workers go to the cores ``VLLM_CPU_OMP_THREADS_BIND`` names (start_ab_server sets it)."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def start_ab_server(model: Path, work: Path, cpus: set[int] | None = None) -> VllmServer:
    from weightwatch.inference.serve_cli import build_command

    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ns = argparse.Namespace(
        model=str(model), host="127.0.0.1", port=port, admin_port=free_port(), admin_host=None, weights_root=work,
        admin_token_file=None, log_file=work / "inference.log", span_file=work / "inference.spans.jsonl",
        engine_nice=None, trace_generation=None, vllm_args=SERVER_ARGS,
    )  # fmt: skip
    cmd, env = build_command(ns, dict(os.environ))
    if cpus:  # vLLM's auto-binding picks from the CPUs the process may use: name the engine's cores instead
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0) - cpus))
    module_at = cmd.index("-m")
    cmd[module_at : module_at + 2] = ["-m", "benchmarks.ab_api_server"]
    out = work / "server.out"
    with open(out, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=pinned_to(cpus), cwd=HERE.parent)
    return VllmServer(base_url=f"http://127.0.0.1:{port}", model_dir=model, proc=proc, output_path=out)


def set_mode(client: httpx.Client, mode: dict[str, Any], settle: bool, timeout: float = 180.0) -> dict[str, Any]:
    params = {"path": mode["path"], "traced": "1" if mode["traced"] else "0", "burn_us": str(mode["burn_us"])}
    started = time.monotonic()
    state = client.post("/_ab/mode", params=params).raise_for_status().json()
    deadline = time.monotonic() + timeout
    while settle and state["stale_inflight"] and time.monotonic() < deadline:
        time.sleep(0.25)
        state = client.get("/_ab/mode").raise_for_status().json()
    if settle and state["stale_inflight"]:
        raise RuntimeError(f"requests of the previous mode still in flight after {timeout:.0f} s: {state}")
    time.sleep(1.0)  # let the loop settle into the new mix
    return {**state, "settled_s": round(time.monotonic() - started, 1)}


def tokens_between(ticks: list[tuple[float, int]], t0: float, t1: float) -> float:
    """Tokens counted between two instants, interpolating the load generator's cumulative ticks."""

    def at(t: float) -> float:
        for (ta, na), (tb, nb) in zip(ticks, ticks[1:], strict=False):
            if ta <= t <= tb:
                return na + (nb - na) * ((t - ta) / (tb - ta) if tb > ta else 0.0)
        raise ValueError(f"instant {t:.3f} outside the load generator's ticks")

    return at(t1) - at(t0)


def read_ticks(path: Path, column: int = 1) -> list[tuple[float, int]]:
    """(time, cumulative count) from the load generator's ticks; column 1 is tokens, 4 SSE events."""
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) > column:
            out.append((float(parts[0]), int(parts[column])))
    return out


def parse_burns(text: str) -> list[float]:
    """``--burn-us`` ("10,40", or "" for none) as doses in µs."""
    return [float(x) for x in text.split(",") if x.strip()]


def run(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    burns = parse_burns(args.burn_us)
    plan = modes(burns, traced=not args.skip_traced)
    work = Path(tempfile.mkdtemp(prefix="ww-bench-ab-"))
    cpus = parse_cpus(args.frontend_cpus)
    server = start_ab_server(model, work / "server", cpus)
    load = None
    windows: list[dict[str, Any]] = []
    try:
        wait_ready(server)
        ticks_path = work / "ticks.txt"
        load = subprocess.Popen(
            [sys.executable, str(HERE / "bench_inference_load.py"), "--url", server.base_url, "--model", str(model),
             "--streams", str(args.streams), "--duration", "1e9", "--warmup", str(args.warmup), "--spread", str(args.spread),
             "--max-tokens", str(args.max_tokens), "--ticks", str(ticks_path), "--tick-every", "0.5", "--out", str(work / "load.json")],
            preexec_fn=pinned_to(cpus),
        )  # fmt: skip
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            time.sleep(args.warmup + 2)
            current: dict[str, Any] | None = None
            calibration = client.get("/_ab/mode").raise_for_status().json()["iterations_per_us"]
            for rnd in range(args.rounds):
                order = list(plan) if rnd % 2 == 0 else list(reversed(plan))
                for label in order:
                    mode = plan[label]
                    settled = set_mode(client, mode, needs_settling(current, mode))["settled_s"]
                    current = mode
                    sampler = CpuSampler(server.proc.pid, load.pid)
                    sampler.begin()
                    t0 = time.time()
                    time.sleep(args.window)
                    t1 = time.time()
                    cpu = sampler.end()
                    windows.append({"round": rnd + 1, "mode": label, "t0": t0, "t1": t1, "cpu": cpu, "settled_s": settled, **mode})
                print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        time.sleep(1.0)
        ticks, events = read_ticks(ticks_path), read_ticks(ticks_path, column=4)
        for w in windows:
            w["tokens"] = tokens_between(ticks, w["t0"], w["t1"])
            w["tokens_per_event"] = w["tokens"] / max(tokens_between(events, w["t0"], w["t1"]), 1.0)
            w["tokens_per_s"] = w["tokens"] / (w["t1"] - w["t0"])
            api = w["cpu"].get("API server")
            w["api_us_per_token"] = api / 100 * (w["t1"] - w["t0"]) / w["tokens"] * 1e6 if api and w["tokens"] else None
    finally:
        if load is not None:
            load.send_signal(signal.SIGTERM)
            load.wait(timeout=30)
        server.stop()
    from bench_inference_overhead import measure_request_path

    in_process = measure_request_path(args.requests, args.max_tokens, args.repeats)
    return {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "iterations_per_us": calibration,
        "windows": windows,
        "in_process_us_per_chunk": in_process,
    }


# --------------------------------------------------------------------------- analysis


def bootstrap_ci(values: list[float], stat: Any = statistics.fmean, n: int = 10_000, seed: int = 1) -> tuple[float, float]:
    """95 % percentile bootstrap interval of ``stat`` over ``values`` (rounds are the independent units)."""
    if len(values) < 2:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    draws = sorted(stat([rng.choice(values) for _ in values]) for _ in range(n))
    return draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def per_round(windows: list[dict[str, Any]]) -> dict[int, dict[str, dict[str, Any]]]:
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for w in windows:
        out.setdefault(w["round"], {})[w["mode"]] = w
    return out


def slope_per_round(rnd: dict[str, dict[str, Any]], burns: list[float]) -> float | None:
    """Fraction of tokens/s lost per µs of API-server CPU per streamed message, least squares through the origin over the
    round's burn doses, each against the same round's plain weightwatch window."""
    base = rnd.get(WEIGHTWATCH)
    pts = [(us, 1 - rnd[burn_label(us)]["tokens_per_s"] / base["tokens_per_s"]) for us in burns if base and burn_label(us) in rnd]
    den = sum(us * us for us, _ in pts)
    return sum(us * loss for us, loss in pts) / den if den else None


def analyse(res: dict[str, Any]) -> dict[str, Any]:
    burns = parse_burns(res["args"]["burn_us"])
    labels = modes(burns, traced=not res["args"].get("skip_traced", False))
    rounds = per_round(res["windows"])
    complete = [r for r in rounds.values() if all(label in r for label in labels)]
    ratios: dict[str, list[float]] = {
        "weightwatch / vLLM's stack": [r[WEIGHTWATCH]["tokens_per_s"] / r[BYPASS]["tokens_per_s"] for r in complete],
    }
    if TRACED in labels:
        ratios["weightwatch, traced / vLLM's stack"] = [r[TRACED]["tokens_per_s"] / r[BYPASS]["tokens_per_s"] for r in complete]
        ratios["weightwatch, traced / weightwatch"] = [r[TRACED]["tokens_per_s"] / r[WEIGHTWATCH]["tokens_per_s"] for r in complete]
    for us in burns:
        ratios[f"{burn_label(us)} / weightwatch"] = [
            r[burn_label(us)]["tokens_per_s"] / r[WEIGHTWATCH]["tokens_per_s"] for r in complete if burn_label(us) in r
        ]
    slopes = [s for s in (slope_per_round(r, burns) for r in complete) if s is not None]
    ip = res["in_process_us_per_chunk"]
    bare = statistics.median(ip["bare"])
    added = {v: statistics.median(ip[v]) - bare for v in ("weightwatch", "weightwatch, traced")}
    slope = statistics.fmean(slopes) if slopes else float("nan")
    slope_ci = bootstrap_ci(slopes)
    windows_of = {label: [r[label] for r in complete] for label in labels}

    def median_of(key: str) -> dict[str, float]:
        return {
            label: statistics.median([w[key] for w in ws if w.get(key) is not None] or [float("nan")]) for label, ws in windows_of.items()
        }

    return {
        "burns": burns,
        "n_rounds": len(complete),
        "ratios": {
            k: {"values": v, "mean": statistics.fmean(v), "median": statistics.median(v), "ci": bootstrap_ci(v)}
            for k, v in ratios.items()
            if v
        },
        "slope": slope,
        "slope_ci": slope_ci,
        "added_us_per_chunk": added,
        "predicted_cost": {v: (a * slope, a * slope_ci[0], a * slope_ci[1]) for v, a in added.items()},
        "api_us_per_token": median_of("api_us_per_token"),
        "tokens_per_event": median_of("tokens_per_event"),
        "unmerged": {label: sum(1 for w in ws if w.get("tokens_per_event", 2.0) < UNMERGED_BELOW) for label, ws in windows_of.items()},
        "tokens_per_s": {label: [w["tokens_per_s"] for w in ws] for label, ws in windows_of.items()},
    }


def report(res: dict[str, Any]) -> str:
    a = analyse(res)
    args = res["args"]
    pct = lambda x: f"{x * 100:+.2f} %"  # noqa: E731
    lines = [
        "# weightwatch's request path: tokens/s inside one server",
        "",
        f"Run {res['when']} on {res['machine']} (load average at the end {' '.join(f'{x:.1f}' for x in res['load_average'])}). "
        f"`python -m benchmarks.bench_inference_ab --streams {args['streams']} --rounds {args['rounds']} --window {args['window']:g} "
        f"--burn-us '{args['burn_us']}'{' --skip-traced' if args.get('skip_traced') else ''}"
        f"{' --frontend-cpus ' + args['frontend_cpus'] if args.get('frontend_cpus') else ''}`."
        + (
            f" API server and load generator pinned to CPU {args['frontend_cpus']}, the engine's OpenMP threads to the others."
            if args.get("frontend_cpus")
            else ""
        ),
        "",
        f"One `benchmarks/ab_api_server.py` server (vLLM's OpenAI server with the weightwatch plugin and a benchmark-only switch above it), "
        f"tiny Llama, `--max-num-seqs 256`; {args['streams']} concurrent streaming completions (max_tokens {args['max_tokens']} "
        f"+-{args['spread'] * 100:.0f} %) from one load generator for the whole run. {a['n_rounds']} rounds; in each, every mode gets a "
        f"{args['window']:g} s window after no request of the previous mode is left in flight; windows run forward and backward in "
        "alternate rounds. The burn loop runs "
        f"{res['iterations_per_us']:.1f} iterations per µs (calibrated in the server at start).",
        "",
        "| mode | tokens/s per round (median) | min | max | API server CPU µs per token (median) | tokens per SSE event (median) "
        f"| windows unmerged (< {UNMERGED_BELOW:g} tokens per event) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, values in a["tokens_per_s"].items():
        if values:
            lines.append(
                f"| {label} | {statistics.median(values):,.0f} | {min(values):,.0f} | {max(values):,.0f} "
                f"| {a['api_us_per_token'][label]:.0f} | {a['tokens_per_event'][label]:.2f} | {a['unmerged'][label]} of {len(values)} |"
            )
    lines += [
        "",
        "vLLM merges the tokens a request generated since its last event into one SSE event when the API server is behind. "
        "Windows fall into two regimes: unmerged (one token per event: the front end keeps up, does more work per token and "
        "leaves the engine less CPU) and merged (more tokens per event, more tokens/s). Which regime a window lands in moves "
        "tokens/s by 15-25 %, far more than any request path's CPU.",
    ]
    lines += ["", "| ratio, same round | mean | 95 % interval of the mean | median | min | max |", "|---|---|---|---|---|---|"]
    for label, r in a["ratios"].items():
        lines.append(
            f"| {label} | {r['mean']:.3f} | {r['ci'][0]:.3f} to {r['ci'][1]:.3f} | {r['median']:.3f} | {min(r['values']):.3f} | {max(r['values']):.3f} |"
        )
    s, (lo, hi) = a["slope"], a["slope_ci"]
    lines += (
        []
        if not a["burns"]
        else [
            "",
            f"Slope from the burn windows: one µs of event-loop CPU per streamed message costs **{s * 100:.2f} %** of tokens/s "
            f"(95 % interval {lo * 100:.2f} to {hi * 100:.2f} %), against vLLM's own ~{a['api_us_per_token'][BYPASS]:.0f} µs of "
            "API-server CPU per token.",
            "",
            "| weightwatch request path | CPU added per streamed message, in process (bench_inference_overhead.py, this run) | x slope = tokens/s cost | 95 % interval |",
            "|---|---|---|---|",
        ]
    )
    for v, (cost, clo, chi) in a["predicted_cost"].items() if a["burns"] else ():
        lines.append(f"| {v} | {a['added_us_per_chunk'][v]:+.2f} µs | {pct(cost)} | {pct(clo)} to {pct(chi)} |")
    direct = a["ratios"]["weightwatch / vLLM's stack"]
    traced = a["ratios"].get("weightwatch, traced / vLLM's stack")
    lines += [
        "",
        "Target: instrumentation costs at most 1 % of tokens/s.",
        f"* Direct A/B, default (untraced) requests: weightwatch / vLLM's stack mean {direct['mean']:.3f}, 95 % interval "
        f"{direct['ci'][0]:.3f} to {direct['ci'][1]:.3f}: " + verdict(direct["ci"]),
    ]
    if traced:
        lines.append(
            f"* Direct A/B, every request traced: mean {traced['mean']:.3f}, 95 % interval {traced['ci'][0]:.3f} to {traced['ci'][1]:.3f}: "
            + verdict(traced["ci"])
        )
    if a["burns"]:
        lines.append(
            "* Calibrated: "
            + "; ".join(
                f"{v} {pct(c[0])} (interval up to {pct(c[2])}): {'**met**' if c[2] <= 0.01 else 'not shown'}"
                for v, c in a["predicted_cost"].items()
            )
            + "."
        )
    return "\n".join(lines) + "\n"


def verdict(ci: tuple[float, float]) -> str:
    lo, hi = ci
    if lo >= 0.99:
        return "**met** (the whole interval is within 1 %)"
    if hi < 0.99:
        return "**missed** (the whole interval costs more than 1 %)"
    return f"consistent with the target, but the interval (down to {(1 - lo) * 100:.1f} % cost) is wider than 1 %"


def add_run_args(p: argparse.ArgumentParser, out: Path) -> None:
    """The options the throughput benchmarks share: the in-process measurement, the model, where results go."""
    p.add_argument("--requests", type=int, default=300, help="in-process measurement: requests per repeat")
    p.add_argument("--repeats", type=int, default=9, help="in-process measurement: interleaved repeats")
    p.add_argument("--model", type=Path, default=None, help="tiny model dir (made if missing)")
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--report-only", type=Path, default=None, help="re-render the report from a results .json, run nothing")


def run_or_reload(args: argparse.Namespace, run_fn: Any) -> dict[str, Any]:
    """The results ``--report-only`` names, or a fresh ``run_fn(args, model)`` on the tiny model (made if missing)."""
    if args.report_only:
        return json.loads(args.report_only.read_text())
    from weightwatch.inference.tiny_model import make_tiny_model

    return run_fn(args, make_tiny_model(args.model or (Path(tempfile.gettempdir()) / "ww-bench-tiny-model")))


def publish(text: str, res: dict[str, Any], out: Path) -> None:
    """Print the report and save it with its raw results (``out`` and ``out`` as .json)."""
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--rounds", type=int, default=14)
    p.add_argument("--window", type=float, default=20.0, help="seconds measured per mode and round")
    p.add_argument("--warmup", type=float, default=20.0)
    p.add_argument("--burn-us", default="10,40", help="comma-separated CPU doses per streamed message (SSE event), µs")
    p.add_argument(
        "--frontend-cpus",
        default=None,
        help="pin the API server and the load generator to these CPUs (e.g. 1); the engine's OpenMP threads get the others",
    )
    p.add_argument("--skip-traced", action="store_true", help="no window with every request traced")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--spread", type=float, default=0.5, help="completion lengths uniform in max_tokens * (1 +- spread)")
    add_run_args(p, HERE / "results" / "inference_ab.md")
    args = p.parse_args()
    res = run_or_reload(args, run)
    publish(report(res), res, args.out)


if __name__ == "__main__":
    main()
