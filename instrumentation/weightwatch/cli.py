"""The ``weightwatch`` command.

Each subcommand lives in the module that owns its role and exposes ``add_arguments(parser)`` and
``run(args) -> int``. Those modules import heavy dependencies (vLLM, torch) inside ``run`` only, so
``weightwatch --help`` stays fast and works without them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help). A module that is not installed is left out of the command.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "catalogue": ("weightwatch.catalogue_cli", "print every metric, span and log event weightwatch emits"),
    "serve": ("weightwatch.inference.serve_cli", "start vLLM's OpenAI server with weightwatch loaded"),
    "make-model": ("weightwatch.inference.model_cli", "make the tiny local test model (no downloads)"),
    "demo": ("weightwatch.demo.cli", "run a real, tiny async-RL loop on vLLM (CPU) and show where update time goes"),
    "analyze": ("weightwatch.analysis.cli", "read a run's logs and spans, join each weight update, name the bottleneck"),
    "tail": ("weightwatch.analysis.tail_cli", "follow logs and expose their events as Prometheus metrics"),
    "stack": ("weightwatch.stack_cli", "run Prometheus and Alertmanager locally with the stack's configs"),
}


def build_parser() -> argparse.ArgumentParser:
    from weightwatch import __version__

    parser = argparse.ArgumentParser(prog="weightwatch", description="Observability for weight updates in async RL.")
    parser.add_argument("--version", action="version", version=f"weightwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
                continue  # that part of weightwatch is not built into this install
            raise
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
