"""Follow logs as they grow and expose their events as Prometheus metrics (no code changes in the job).

Works for any process that prints weightwatch's event lines, with or without weightwatch installed.
Follows files by name across rotation and truncation, like `tail -F`. Stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="log files to follow (they may not exist yet)")
    p.add_argument("--metrics-port", type=int, required=True, metavar="N", help="serve /metrics on this port (0: pick a free one)")
    p.add_argument("--metrics-addr", default="0.0.0.0", metavar="ADDR", help="address to bind (default 0.0.0.0)")
    p.add_argument("--from-start", action="store_true", help="replay what the files hold already (default: only new lines)")
    p.add_argument("--interval", type=float, default=0.25, metavar="S", help="poll interval in seconds (default 0.25)")


def run(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry, start_http_server

    from weightwatch.analysis.tail import Tailer

    if args.interval <= 0:
        print("weightwatch tail: --interval must be > 0", file=sys.stderr)
        return 2
    registry = CollectorRegistry()
    tailer = Tailer(args.files, registry, from_start=args.from_start, interval=args.interval)
    try:
        server, _thread = start_http_server(args.metrics_port, addr=args.metrics_addr, registry=registry)
    except OSError as exc:
        print(f"weightwatch tail: cannot serve metrics on {args.metrics_addr}:{args.metrics_port}: {exc}", file=sys.stderr)
        return 2
    port = server.server_address[1]
    print(f"weightwatch tail: following {len(args.files)} file(s); metrics on http://{args.metrics_addr}:{port}/metrics", file=sys.stderr, flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: tailer.stop())
    try:
        tailer.run()
    finally:
        tailer.close()
        server.shutdown()
        server.server_close()
    s = tailer.events.stats
    print(f"weightwatch tail: {s.lines} lines, {s.events} events, {s.rejected} skipped", file=sys.stderr)
    return 0
