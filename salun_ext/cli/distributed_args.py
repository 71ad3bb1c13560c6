"""What every command needs to run under torchrun: two flags and a session (process group + rank-0 output).

def register(sub):
    p = sub.add_parser(...)
    add_distributed_args(p)

def run(args):
    with distributed_session(args) as ctx:      # torchrun env -> process group (or one process)
        cfg = EngineConfig(..., distributed=ctx.engine_mode, device=str(ctx.device))
        ...
        if ctx.is_main:
            write_results(...)
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator

from salun_ext.distributed.runtime import DEFAULT_TIMEOUT_S, DistContext, configure_logging, init_distributed
from salun_ext.utils.errors import UsageError


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process (start with torchrun --nproc-per-node N -m salun_ext ...)")
    group.add_argument(
        "--dist-backend", choices=["auto", "nccl", "gloo"], default="auto", help="default: nccl on CUDA, else gloo"
    )
    group.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="a rank waiting longer than this for the others fails with an error (default %(default)s)",
    )


def single_process_only(command: str) -> None:
    """Fail at once, with a clear message, when a single-process command is started by torchrun (WORLD_SIZE > 1).

    Without this each rank would run the whole command and write the same files concurrently.
    """
    world = os.environ.get("WORLD_SIZE", "1")
    if world.strip() not in ("", "0", "1"):
        raise UsageError(
            f"this command runs in one process only, but it was started with "
            f"WORLD_SIZE={world}; run it without torchrun (see docs/distributed.md for the commands that support it)"
        )


@contextlib.contextmanager
def distributed_session(args: argparse.Namespace, *, device: str | None = None) -> Iterator[DistContext]:
    """Join the torchrun process group (if any), log on rank 0 only, and leave the group on exit."""
    backend = None if getattr(args, "dist_backend", "auto") == "auto" else args.dist_backend
    requested = str(device if device is not None else getattr(args, "device", "auto"))
    kind = requested if requested in ("auto", "cpu", "cuda") else ("cuda" if requested.startswith("cuda") else "cpu")
    ctx = init_distributed(backend, timeout_s=getattr(args, "dist_timeout", DEFAULT_TIMEOUT_S), device=kind)
    if not ctx.is_distributed:  # one process: honour an explicit device such as cuda:1
        from salun_ext.utils import resolve_device

        ctx.device = resolve_device(requested)
    configure_logging(ctx)
    if not ctx.is_main:
        with contextlib.suppress(ImportError):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
    try:
        yield ctx
    finally:
        ctx.close()
