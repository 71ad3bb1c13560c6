"""Devices and process ranks."""

from __future__ import annotations

import torch

from salun_ext.utils.errors import UsageError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' / None -> cuda when available, else cpu; clear error for a device that does not exist."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"device: expected auto, cpu, cuda or cuda:N; got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def is_main_process() -> bool:
    """Rank 0 of torch.distributed, or True without a process group."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )
