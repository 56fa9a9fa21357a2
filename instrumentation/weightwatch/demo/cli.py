"""Run a real, tiny async-RL loop on vLLM (CPU) and show where weight-sync time goes.

Processes as in a real deployment, all writing into one run directory:

* inference: the tiny model on real vLLM through ``weightwatch serve`` (OpenAI API + /metrics on
  --port, admin lane on --admin-port), ``--servers N`` of them;
* trainer: one real AdamW step per step on the orchestrator's completions, atomic checkpoints;
* orchestrator: streaming generation load, checkpoint waits, and every step a weight sync of today
  (pause -> update -> resume on every server) or, with ``--sync bare``, the seed-era single update.

Switches inject each bottleneck on purpose: ``--admin shared`` (updates queue behind generation in
the shared client pool), ``--slow-reload MS`` (slow engine reload), ``--slow-writes MS`` (slow
checkpoint writes), and the sync's faults ``--slow-pause MS``, ``--straggler MS``, ``--hung-update``,
``--version-skew`` (demo/faults.py). At the end it prints the analyzer's verdict for the run directory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from weightwatch.contracts import DEFAULT_PAUSE_MODE, PAUSE_MODES
from weightwatch.demo.faults import HUNG_UPDATE_BUDGET_S, HUNG_UPDATE_DELAY_MS, FaultPlan, FaultPlanError, plan_faults

DEFAULT_PORTS = {"port": 8000, "admin_port": 8001, "orchestrator_metrics_port": 9400, "trainer_metrics_port": 9401}
SYNC_MODES = ("today", "bare")
#: Seconds the admin lane may take to answer once the main port does (it starts with the app; minutes on a busy host).
LANE_READY_TIMEOUT_S = 120.0
#: vLLM flags of each server when the demo starts more than one on a small machine: a small batch keeps two engines
#: (and their KV caches, VLLM_CPU_KVCACHE_SPACE=1 GiB each from `weightwatch serve`) within 2 cores and a laptop's memory.
MULTI_SERVER_VLLM_ARGS = ("--max-num-seqs", "16")


def _default_model_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "weightwatch" / "tiny-model"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    g = parser.add_argument_group("the run")
    g.add_argument("--duration", type=_non_negative, default=60.0, help="seconds of RL loop once the server is up (0: until Ctrl-C)")
    g.add_argument("--run-dir", type=Path, default=None, help="where logs, spans, checkpoints go (default ./weightwatch-runs/demo-TIME)")
    g.add_argument("--model", type=Path, default=None, help=f"tiny model directory, made if missing (default {_default_model_dir()})")
    g.add_argument("--concurrency", type=_positive_int, default=64, help="generation requests the orchestrator keeps going")
    g.add_argument("--pool-size", type=_positive_int, default=16, help="connections in the generation client's pool")
    g.add_argument("--batch-size", type=_positive_int, default=32, help="completions per step")
    g.add_argument("--max-tokens", type=_positive_int, default=64, help="max_tokens of each completion")
    g.add_argument("--async-level", type=int, default=2, help="maximum staleness: step N waits for checkpoint N - async_level")
    g.add_argument("--lr", type=float, default=3e-3, help="the trainer's AdamW learning rate")
    g.add_argument("--servers", type=_positive_int, default=1, help="inference servers (2 fit a 2-core laptop: small KV cache, few seqs each)")
    g.add_argument("--sync", choices=SYNC_MODES, default=None,
                   help="today: pause -> update -> resume on every server (default); bare: the seed-era single POST /update_weights "
                        "(default with --admin shared)")
    g.add_argument("--pause-mode", choices=PAUSE_MODES, default=DEFAULT_PAUSE_MODE, help="how /pause treats requests in flight")
    g.add_argument("--pause-budget", type=_positive_float, default=None, metavar="S", help="seconds one pause call may take (default 300)")
    g.add_argument("--update-budget", type=_positive_float, default=None, metavar="S",
                   help=f"seconds one update call may take (default 720; {HUNG_UPDATE_BUDGET_S:g} with --hung-update)")
    g.add_argument("--resume-budget", type=_positive_float, default=None, metavar="S", help="seconds one resume call may take (default 300)")
    g = parser.add_argument_group("bottleneck switches")
    g.add_argument("--admin", choices=("lane", "shared"), default="lane",
                   help="lane: updates on a dedicated client to the admin port; shared: through the generation pool")
    g.add_argument("--slow-reload", type=_non_negative, default=0.0, metavar="MS", help="add MS inside each engine reload (server side)")
    g.add_argument("--slow-writes", type=_non_negative, default=0.0, metavar="MS", help="delay each checkpoint's STABLE marker by MS")
    g.add_argument("--slow-pause", type=_non_negative, default=0.0, metavar="MS", help="every server sleeps MS before pausing: pause_slow")
    g.add_argument("--straggler", type=_non_negative, default=0.0, metavar="MS",
                   help="one of two (or more) servers sleeps MS before loading weights: straggler")
    g.add_argument("--hung-update", action="store_true",
                   help="every update takes --hung-delay, past half its budget: hung while in flight, then it ends")
    g.add_argument("--hung-delay", type=_positive_float, default=None, metavar="MS",
                   help=f"the hung update's time (default {HUNG_UPDATE_DELAY_MS:g} ms with the {HUNG_UPDATE_BUDGET_S:g} s budget)")
    g.add_argument("--version-skew", action="store_true", help="one of two (or more) servers fails every weight load: version_skew")
    g = parser.add_argument_group("network")
    g.add_argument("--host-bind", default="127.0.0.1", help="address every listener binds (0.0.0.0 lets Prometheus in a container scrape)")
    g.add_argument("--port", type=int, default=DEFAULT_PORTS["port"], help="inference OpenAI API and /metrics (server i: PORT + 2i)")
    g.add_argument("--admin-port", type=int, default=DEFAULT_PORTS["admin_port"], help="inference admin lane (server i: ADMIN_PORT + 2i)")
    g.add_argument("--orchestrator-metrics-port", type=int, default=DEFAULT_PORTS["orchestrator_metrics_port"])
    g.add_argument("--trainer-metrics-port", type=int, default=DEFAULT_PORTS["trainer_metrics_port"])
    g.add_argument("--ports", "--metrics-ports", dest="ports", choices=("fixed", "auto"), default="fixed",
                   help="auto: free ports for everything (printed at start, saved in RUN/demo.json)")
    g.add_argument("--server-url", action="append", default=None,
                   help="reuse a running `weightwatch serve` (its weights root must contain --run-dir) instead of starting one; "
                        "repeat for more servers")
    g.add_argument("--admin-url", action="append", default=None,
                   help="with --server-url: that server's admin lane (default: port + 1); repeat in --server-url's order")
    g = parser.add_argument_group("output")
    g.add_argument("--no-live", action="store_true", help="one line per step instead of the redrawn view (automatic when not a TTY)")
    g.add_argument("--startup-timeout", type=_non_negative, default=600.0, help="seconds to wait for vLLM to come up")
    g.add_argument("--stop-timeout", type=_non_negative, default=20.0, help="seconds each process gets to stop before it is killed")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if host != "0.0.0.0" else "127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local(host: str) -> str:
    """The address to reach a listener bound to ``host`` from this machine."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _admin_url_for(server_url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(server_url)
    port = (parts.port or 80) + 1
    return urlunsplit((parts.scheme, f"{parts.hostname}:{port}", "", "", ""))


def _wait_http(url: str, timeout: float, alive: Any, what: str) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"{what} exited before it was ready")
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code < 500:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready at {url} after {timeout:.0f} s ({last})")


class _Interrupted(Exception):
    pass


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise _Interrupted(signal.Signals(signum).name)


@dataclass(frozen=True)
class ServerAddr:
    role: str  # the run directory's name for it: inference, inference-1, ...
    api_url: str
    admin_url: str
    port: int | None = None
    admin_port: int | None = None


def server_role(i: int) -> str:
    """Server 0 keeps the seed-era name (``inference.log``); the others are ``inference-1`` ..."""
    return "inference" if i == 0 else f"inference-{i}"


def resolve_sync(args: argparse.Namespace) -> str | None:
    """The sync mode for these flags; None (after printing why) when they cannot work."""
    from weightwatch.demo.orchestrator_proc import SHARED_PAUSE_DEADLOCK

    if args.sync is None:
        return "bare" if args.admin == "shared" else "today"
    if args.sync == "today" and args.admin == "shared":
        print(f"weightwatch demo: {SHARED_PAUSE_DEADLOCK}", file=sys.stderr)
        return None
    return str(args.sync)


def build_plan(args: argparse.Namespace, sync: str) -> FaultPlan:
    servers = len(args.server_url) if args.server_url else args.servers
    return plan_faults(
        servers=servers, sync=sync, slow_pause_ms=args.slow_pause, straggler_ms=args.straggler, hung_update=args.hung_update,
        hung_delay_ms=args.hung_delay, version_skew=args.version_skew, slow_reload_ms=args.slow_reload,
        pause_budget_s=args.pause_budget, update_budget_s=args.update_budget, resume_budget_s=args.resume_budget,
    )


def switches_title(args: argparse.Namespace, sync: str, plan: FaultPlan) -> str:
    parts = [f"sync={sync}", f"admin={args.admin}", f"servers={plan.count}"]
    parts += [f"{k}={v:g}ms" for k, v in (("slow-reload", args.slow_reload), ("slow-writes", args.slow_writes),
                                          ("slow-pause", args.slow_pause), ("straggler", args.straggler)) if v]
    parts += [name for name, on in (("hung-update", args.hung_update), ("version-skew", args.version_skew)) if on]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    from weightwatch.demo.live import LiveView
    from weightwatch.demo.supervisor import Supervisor

    if args.async_level < 0:
        print("weightwatch demo: --async-level must be >= 0", file=sys.stderr)
        return 2
    sync = resolve_sync(args)
    if sync is None:
        return 2
    try:
        plan = build_plan(args, sync)
    except FaultPlanError as exc:
        print(f"weightwatch demo: {exc}", file=sys.stderr)
        return 2
    if args.server_url and plan.any_fault:
        envs = "; ".join(f"server {i}: " + " ".join(f"{k}={v}" for k, v in s.env().items()) for i, s in enumerate(plan.servers) if s.env())
        print("weightwatch demo: the fault switches set the demo's own servers' environment; with --server-url start those "
              f"servers with it instead ({envs}) and leave the switches off", file=sys.stderr)
        return 2
    if args.server_url and args.admin_url and len(args.admin_url) != len(args.server_url):
        print("weightwatch demo: give one --admin-url per --server-url (or none: port + 1)", file=sys.stderr)
        return 2
    run_dir = (args.run_dir or Path("weightwatch-runs") / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    from weightwatch.demo.layout import RunLayout

    layout = RunLayout.create(run_dir)
    host = args.host_bind
    if args.ports == "auto":
        for name in DEFAULT_PORTS:
            if getattr(args, name) == DEFAULT_PORTS[name]:
                setattr(args, name, _free_port(host))
    servers = _server_addresses(args, plan.count, host)
    api_url, admin_url = servers[0].api_url, servers[0].admin_url
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    settings.update(run_dir=str(run_dir), api_url=api_url, admin_url=admin_url, started=time.time(), sync=sync,
                    servers=[{"role": s.role, "api_url": s.api_url, "admin_url": s.admin_url,
                              "faults": plan.servers[i].env()} for i, s in enumerate(servers)],
                    budgets_s=dict(plan.budgets_s), expected=list(plan.expected))
    for note in plan.notes:
        print(f"weightwatch demo: {note}", flush=True)

    # SIGTERM (docker stop, CI) behaves like Ctrl-C: stop everything, keep what was written.
    previous = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    sup = Supervisor()
    interrupted = False
    failure: str | None = None
    view: LiveView | None = None
    try:
        model_dir = _ensure_model(args.model)
        settings["model"] = str(model_dir)
        layout.settings.write_text(json.dumps(settings, indent=2))
        print(f"weightwatch demo: run directory {run_dir}", flush=True)
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        py = sys.executable
        if not args.server_url:
            started = []
            for i, addr in enumerate(servers):
                server_env = dict(env, **plan.servers[i].env())
                vllm_args = ["--max-model-len", "512", "--served-model-name", "tiny"]
                if plan.count > 1:
                    vllm_args += list(MULTI_SERVER_VLLM_ARGS)
                argv = [py, "-m", "weightwatch", "serve", "--model", str(model_dir), "--host", host, "--port", str(addr.port),
                        "--admin-port", str(addr.admin_port), "--weights-root", str(layout.weights),
                        "--log-file", str(layout.log(addr.role)), "--span-file", str(layout.spans(addr.role)), "--", *vllm_args]
                started.append((addr, sup.spawn(addr.role, argv, layout.out(addr.role), env=server_env)))
                faults = plan.servers[i].describe()
                print(f"weightwatch demo: starting vLLM {addr.role} on {addr.api_url} (admin lane {addr.admin_url}; {faults})", flush=True)
            print(f"weightwatch demo: vLLM start-up takes about {40 * plan.count} s on 2 CPU cores ...", flush=True)
            for addr, server in started:
                try:
                    _wait_http(addr.api_url + "/health", args.startup_timeout, server.alive, f"the inference server {addr.role}")
                    _wait_http(addr.admin_url + "/health", LANE_READY_TIMEOUT_S, server.alive, f"the admin lane of {addr.role}")
                except RuntimeError as exc:
                    raise RuntimeError(f"{exc}\n--- {layout.out(addr.role)} (end) ---\n{server.tail()}") from None
        else:
            for addr in servers:
                _wait_http(addr.api_url + "/health", args.startup_timeout, None, f"the inference server at {addr.api_url}")

        trainer_env = dict(env, OMP_NUM_THREADS="1")
        trainer = sup.spawn("trainer", [
            py, "-m", "weightwatch.demo.trainer_proc", "--run-dir", str(run_dir), "--model", str(model_dir),
            "--metrics-port", str(args.trainer_metrics_port), "--metrics-addr", host, "--lr", repr(args.lr),
            "--slow-writes", repr(args.slow_writes),
        ], layout.out("trainer"), env=trainer_env)
        print("weightwatch demo: trainer loading the model and writing step 0 ...", flush=True)
        deadline = time.monotonic() + 120
        while not (layout.weights / "step_0" / "STABLE").exists():
            if not trainer.alive():
                raise RuntimeError(f"the trainer exited before writing step 0\n--- {layout.out('trainer')} (end) ---\n{trainer.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError("the trainer did not write step 0 within 120 s")
            time.sleep(0.2)

        orch_argv = [
            py, "-m", "weightwatch.demo.orchestrator_proc", "--run-dir", str(run_dir), "--admin", args.admin, "--sync", sync,
            "--pause-mode", args.pause_mode, "--pause-budget", repr(plan.budgets_s["pause"]),
            "--update-budget", repr(plan.budgets_s["update_weights"]), "--resume-budget", repr(plan.budgets_s["resume"]),
            "--concurrency", str(args.concurrency), "--pool-size", str(args.pool_size),
            "--batch-size", str(args.batch_size), "--max-tokens", str(args.max_tokens), "--async-level", str(args.async_level),
            "--metrics-port", str(args.orchestrator_metrics_port), "--metrics-addr", host,
            # the sync in flight at the end may finish, within the time the supervisor gives the orchestrator to stop
            "--stop-grace", repr(max(1.0, args.stop_timeout - 3.0)),
        ]
        for addr in servers:
            orch_argv += ["--api-url", addr.api_url, "--admin-url", addr.admin_url]
        sup.spawn("orchestrator", orch_argv, layout.out("orchestrator"), env=env)
        metrics = {s.role: f"{s.api_url}/metrics" for s in servers}
        metrics.update(orchestrator=f"http://{_local(host)}:{args.orchestrator_metrics_port}/metrics",
                       trainer=f"http://{_local(host)}:{args.trainer_metrics_port}/metrics")
        print("weightwatch demo: /metrics at " + ", ".join(f"{k} {v}" for k, v in metrics.items()), flush=True)
        settings["metrics"] = metrics
        # Prometheus jobs (deploy/prometheus/prometheus.yml) -> host:port targets, and each server's name in the
        # orchestrator's `server` label (host:port of its admin URL), for a scrape config of this run.
        settings["targets"] = {"inference": [urlsplit(s.api_url).netloc for s in servers],
                               "orchestrator": [urlsplit(metrics["orchestrator"]).netloc],
                               "trainer": [urlsplit(metrics["trainer"]).netloc]}
        settings["server_labels"] = {urlsplit(s.api_url).netloc: urlsplit(s.admin_url).netloc for s in servers}
        layout.settings.write_text(json.dumps(settings, indent=2))

        roles = ["orchestrator", "trainer", *(s.role for s in servers)]
        view = LiveView({r: layout.log(r) for r in roles}, switches_title(args, sync, plan), live=False if args.no_live else None,
                        budgets_s=plan.budgets_s)
        started_at = time.monotonic()
        while args.duration <= 0 or time.monotonic() - started_at < args.duration:
            dead = sup.first_dead()
            if dead is not None:
                failure = f"{dead.name} exited with code {dead.popen.returncode}\n--- {dead.out_path} (end) ---\n{dead.tail()}"
                break
            view.poll()
            left = f"{max(0.0, args.duration - (time.monotonic() - started_at)):.0f} s left" if args.duration > 0 else "Ctrl-C to stop"
            view.status = left
            view.render()
            time.sleep(0.5)
    except (_Interrupted, KeyboardInterrupt):
        interrupted = True
    except RuntimeError as exc:
        failure = str(exc)
    finally:
        # A second Ctrl-C must not leave processes behind: ignore it while stopping (stop has its own timeouts).
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        if sup.children:
            print("\nweightwatch demo: stopping " + ", ".join(c.name for c in reversed(sup.children)) + " ...", flush=True)
        codes = sup.stop_all(timeout=args.stop_timeout)
        for s, h in previous.items():
            signal.signal(s, h)
    if view is not None:
        view.poll()
        view.render(final=True)
        print(view.summary())
    if failure:
        print(f"weightwatch demo: {failure}", file=sys.stderr)
    print(f"weightwatch demo: processes stopped ({', '.join(f'{k} {v}' for k, v in codes.items())}); "
          f"everything is in {run_dir}", flush=True)
    _verdict(run_dir, args.async_level)
    if failure:
        return 1
    # With --duration 0, Ctrl-C is the normal way to end; otherwise it cut the run short.
    return 130 if interrupted and args.duration > 0 else 0


def _server_addresses(args: argparse.Namespace, count: int, host: str) -> list[ServerAddr]:
    if args.server_url:
        admins = args.admin_url or [None] * len(args.server_url)
        pairs = enumerate(zip(args.server_url, admins, strict=True))
        return [ServerAddr(server_role(i), u.rstrip("/"), (a or _admin_url_for(u)).rstrip("/")) for i, (u, a) in pairs]
    out = []
    for i in range(count):
        if i == 0:
            port, admin_port = args.port, args.admin_port
        elif args.ports == "auto":
            port, admin_port = _free_port(host), _free_port(host)
        else:
            port, admin_port = args.port + 2 * i, args.admin_port + 2 * i
        out.append(ServerAddr(server_role(i), f"http://{_local(host)}:{port}", f"http://{_local(host)}:{admin_port}", port, admin_port))
    return out


def _ensure_model(model: Path | None) -> Path:
    from weightwatch.inference.tiny_model import is_complete, make_tiny_model

    target = model or _default_model_dir()
    if model is not None and (target / "config.json").is_file():
        return target.resolve()
    if not is_complete(target, 0):
        print(f"weightwatch demo: making the tiny model in {target} (once, about 10 s) ...", flush=True)
    return make_tiny_model(target)


def _verdict(run_dir: Path, async_level: int | None = None) -> str | None:
    """Print the analyzer's verdict for the run and save its JSON report next to the logs."""
    from weightwatch.events import Event, parse_line

    log = run_dir / "orchestrator.log"
    try:
        updates = sum(1 for line in log.open(encoding="utf-8", errors="replace")
                      if isinstance(ev := parse_line(line), Event) and ev.key == "weights.client.done")
    except OSError:
        updates = 0
    if not updates:
        print(f"weightwatch demo: no weight update was made; nothing to diagnose (files in {run_dir})")
        return None
    try:
        from weightwatch.analysis import analyze_paths
    except ImportError as exc:
        print(f"weightwatch demo: the analyzer is not available ({exc}); run `weightwatch analyze {run_dir}` later")
        return None
    try:
        report = analyze_paths([str(run_dir)], async_level=async_level)
        data = report.to_dict()
    except Exception as exc:  # noqa: BLE001 - the run's files are kept whatever the analyzer thinks
        print(f"weightwatch demo: analysis failed: {exc}; the files are in {run_dir}", file=sys.stderr)
        return None
    (run_dir / "report.json").write_text(json.dumps(data, indent=2, default=str))
    verdict = report.verdict
    signature = getattr(verdict, "signature", None)
    print("")
    print(f"verdict: {signature}")
    for attr in ("summary", "rule", "explanation", "fix"):
        value = getattr(verdict, attr, None)
        if value:
            print(f"  {attr}: {value}")
    syncs = data.get("syncs") if isinstance(data.get("syncs"), dict) else {}
    named = {k: v for k, v in (syncs.get("by_signature") or {}).items() if v}
    if syncs.get("count"):
        found = ", ".join(f"{k} in {v}" for k, v in named.items()) or "no sync signature"
        print(f"  syncs: {syncs['count']} ({found})")
    print(f"  full report: weightwatch analyze {run_dir}   (JSON: {run_dir / 'report.json'})")
    return signature
