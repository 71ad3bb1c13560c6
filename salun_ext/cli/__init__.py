"""`salun-ext` / `python -m salun_ext` command line: argparse and printing only, over the library's workflows.

Each command family lives in its own module with `register(subparsers)`; the handler of a parsed command is
`args.handler(args) -> int`. `parse_args(argv)` is separate from `main(argv)` so tests run the CLI in-process.
Every command takes `--config FILE` (cli/config.py). `main` is the one error boundary: a UsageError (bad input,
raised by the library with the argument, the expected and the actual value) becomes one line on stderr and exit
status 2; any other exception keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from salun_ext.cli.config import apply_config
from salun_ext.utils.errors import UsageError

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
    """Parse the command line; with --config, the file's values fill every option the command line leaves out."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        apply_config(args._parser, args.config)
        args = parser.parse_args(argv)
    return args


def command_name(args: argparse.Namespace | None, argv: Sequence[str] | None) -> str:
    """'salun-ext diffusion mask' for messages."""
    words = [getattr(args, k) for k in ("command", "diffusion_command", "lm_command") if getattr(args, k, None)]
    if not words and argv:
        words = [w for w in list(argv)[:2] if not w.startswith("-")]
    return " ".join(["salun-ext", *words])


def main(argv: Sequence[str] | None = None) -> int:
    args = None
    try:
        args = parse_args(argv)
        return int(args.handler(args) or 0)
    except UsageError as exc:
        print(f"{command_name(args, argv)}: error: {exc}", file=sys.stderr)
        return 2
