"""`salun-ext` command line. Each subcommand is a thin layer over the Python API.

parse_args(argv) is separate from main(argv) so tests can run the CLI in-process.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salun-ext", description="Machine unlearning with weight saliency (SalUn)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print torch/CUDA versions and which devices have compiled kernels per op")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "env":
        from salun_ext.env import print_env

        print_env(sys.stdout)
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # argparse rejects unknown commands first
