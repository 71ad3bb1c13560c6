"""`salun-ext` / `python -m salun_ext` command line: a thin layer over the Python API.

Each command family lives in its own module with `register(subparsers)`; the handler of a parsed command is
`args.handler(args) -> int`. `parse_args(argv)` is separate from `main(argv)` so tests run the CLI in-process.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

# command-family modules, each with register(subparsers)
COMMAND_MODULES = [
    "salun_ext.cli.env_cmd",
    "salun_ext.cli.classification",
    "salun_ext.cli.lm",
    "salun_ext.cli.diffusion",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salun-ext", description="Machine unlearning with weight saliency (SalUn)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return int(args.handler(args) or 0)
