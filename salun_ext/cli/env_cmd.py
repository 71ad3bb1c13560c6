"""`salun-ext env`: torch/CUDA versions and which devices have compiled kernels per op."""

from __future__ import annotations

import argparse
import sys

from salun_ext.cli.config import add_config_flag


def register(sub) -> None:
    p = sub.add_parser("env", help="print torch/CUDA versions and the compiled kernels per op and device")
    add_config_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from salun_ext.ops.diagnostics import print_env

    print_env(sys.stdout)
    return 0
