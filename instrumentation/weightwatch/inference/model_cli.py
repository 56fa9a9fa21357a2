"""Make the tiny local test model (random-weight Llama + locally trained tokenizer; no downloads)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, metavar="DIR", help="directory to write the model into (reused when complete)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")


def run(args: argparse.Namespace) -> int:
    from weightwatch.inference.tiny_model import make_tiny_model

    path = make_tiny_model(args.out_dir, seed=args.seed)
    print(path)
    return 0
