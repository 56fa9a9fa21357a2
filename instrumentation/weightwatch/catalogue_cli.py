"""Print every metric, span and log event weightwatch emits."""

from __future__ import annotations

import argparse

from weightwatch import catalogue


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("table", "json"), default="table", help="table for people, json for machines")


def run(args: argparse.Namespace) -> int:
    print(catalogue.to_json() if args.format == "json" else catalogue.to_table())
    return 0
