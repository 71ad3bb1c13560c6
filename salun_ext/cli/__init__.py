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
import signal
import sys
import threading
from collections.abc import Sequence

from salun_ext.cli.config import apply_config
from salun_ext.utils.errors import Terminated, UsageError

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
    path = _config_path(argv)
    if path is not None:  # before parsing: the file may hold required options
        apply_config(_command_parser(parser, argv), path)
    return parser.parse_args(argv)


def _config_path(argv: list[str]) -> str | None:
    for i, word in enumerate(argv):
        if word == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith("--config="):
            return word.split("=", 1)[1]
    return None


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the (sub)command that `argv` names."""
    words = iter(w for w in argv if not w.startswith("-"))
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return parser
        word = next(words, None)
        if word not in subs[0].choices:
            return parser  # argparse itself reports the unknown command
        parser = subs[0].choices[word]


def command_name(args: argparse.Namespace | None, argv: Sequence[str] | None) -> str:
    """'salun-ext diffusion mask' for messages."""
    words = [getattr(args, k) for k in ("command", "diffusion_command", "lm_command") if getattr(args, k, None)]
    if not words and argv:
        words = [w for w in list(argv)[:2] if not w.startswith("-")]
    return " ".join(["salun-ext", *words])


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 2 bad input (one line on stderr), 130 Ctrl-C, 143 SIGTERM; an
    interrupted training says where it stopped and whether its checkpoint lets `--resume` continue it."""
    args = None
    previous = _terminate_like_ctrl_c()
    try:
        args = parse_args(argv)
        return int(args.handler(args) or 0)
    except UsageError as exc:
        print(f"{command_name(args, argv)}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"{command_name(args, argv)}: {exc or 'interrupted'}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate_like_ctrl_c():
    """SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread, so cleanup runs; the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum, frame):
        raise Terminated("terminated (SIGTERM)")

    return signal.signal(signal.SIGTERM, terminate)
