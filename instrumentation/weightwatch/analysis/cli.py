"""Read a run's logs and span files, join each weight update, name the bottleneck.

Exit status: 0 no update queued over the 300 ms threshold (or --compare validated), 3 some update did
(--compare: the fix is not validated), 1 nothing to analyze (no events in the input), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_EMPTY, EXIT_USAGE, EXIT_BREACH = 0, 1, 2, 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="PATH", help="log files, span files (*.spans.jsonl), run directories, .gz files, or - for stdin")
    p.add_argument("--format", choices=("text", "json"), default="text", help="terminal report (default) or the JSON schema of docs/analyze.md")
    p.add_argument("--html", metavar="FILE", type=Path, help="also write a self-contained HTML page with plots")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="validate a fix: compare two runs of the same workload")
    p.add_argument("--slowest", type=int, default=10, metavar="N", help="list the N slowest updates (default 10)")
    p.add_argument("--model-size", choices=("2b", "7b", "70b"), help="check the run against the baselines of this model size class")
    p.add_argument("--async-level", type=int, metavar="N", help="max staleness allowed (default: async_level= in rollout lines)")
    p.add_argument("--jobs", type=int, metavar="N", help="worker processes for big files (default: all cores)")
    p.add_argument("--updates-limit", type=int, default=1000, metavar="N",
                   help="per-update rows in --format json (default 1000, -1 all, 0 none; 'slowest' is always complete)")


def _fail(msg: str) -> int:
    print(f"weightwatch analyze: {msg}", file=sys.stderr)
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    from weightwatch.analysis import InputError, analyze_paths

    if args.slowest < 0:
        return _fail("--slowest must be >= 0")
    if args.jobs is not None and args.jobs < 1:
        return _fail("--jobs must be >= 1")
    opts = dict(slowest=args.slowest, model_size=args.model_size, async_level=args.async_level, jobs=args.jobs)
    if args.compare:
        if args.paths:
            return _fail("give either PATH... or --compare BEFORE AFTER, not both")
        from weightwatch.analysis.compare import compare, render_compare

        try:
            before = analyze_paths([args.compare[0]], **opts)
            after = analyze_paths([args.compare[1]], **opts)
        except InputError as exc:
            return _fail(str(exc))
        for name, rep in (("BEFORE", before), ("AFTER", after)):
            if not rep.updates:
                print(f"weightwatch analyze: no weight updates in {name} ({args.compare[0 if name == 'BEFORE' else 1]})", file=sys.stderr)
                return EXIT_EMPTY
        result = compare(before, after)
        if args.format == "json":
            print(json.dumps(result, indent=2, default=str))
        else:
            sys.stdout.write(render_compare(result))
        if args.html:
            from weightwatch.analysis.render_html import write_html

            write_html(after, args.html, compare=result, before=before)
        return EXIT_OK if result["validated"] else EXIT_BREACH
    if not args.paths:
        return _fail("no input: give log files, span files, run directories or - for stdin (see --help)")
    try:
        report = analyze_paths(args.paths, **opts)
    except InputError as exc:
        return _fail(str(exc))
    if report.empty:
        print(f"weightwatch analyze: no weightwatch events found in {report.parse['lines']:,} lines of "
              f"{len(report.inputs)} input(s); expected lines like '[weights][TID] client.done wall_ms=...' "
              "(see `weightwatch catalogue`)", file=sys.stderr)
        if report.parse["rejected_total"]:
            print(f"  {report.parse['rejected_total']:,} tagged lines were skipped: " +
                  "; ".join(f"{n} {r}" for r, n in report.parse["rejected"].items()), file=sys.stderr)
        return EXIT_EMPTY
    if args.format == "json":
        json.dump(report.to_dict(updates_limit=args.updates_limit), sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    else:
        from weightwatch.analysis.render_text import render

        sys.stdout.write(render(report))
    if args.html:
        from weightwatch.analysis.render_html import write_html

        write_html(report, args.html)
        if args.format == "text":
            print(f"\nHTML report: {args.html}")
    return EXIT_BREACH if report.breached else EXIT_OK
