"""Fingerprints of what determines a run's result, so a resumed run can refuse a checkpoint written with other
settings (another method, hyperparameter, data set, base model or mask) instead of mixing it in."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch

_CHUNK = 1 << 22  # elements per pass: bounds the int64 temporaries
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_checksum(t: torch.Tensor) -> int:
    """A position-weighted sum of the tensor's bit patterns (int64, wrapping): any changed element, and any two
    swapped elements, change it. Runs on the tensor's device; reads the data once."""
    if t.numel() == 0:
        return 0
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    bits = flat.view(_INT_VIEW[flat.element_size()]) if flat.is_floating_point() or flat.is_complex() else flat
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, bits.numel(), _CHUNK):
        part = bits[start : start + _CHUNK].to(torch.int64)
        weight = torch.arange(start, start + part.numel(), device=t.device, dtype=torch.int64) % 1_000_003 + 1
        total += (part * weight).sum()
    return int(total.item())


def state_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Digest of named tensors: names, shapes, dtypes and contents."""
    rows = [(name, list(t.shape), str(t.dtype), tensor_checksum(t)) for name, t in tensors]
    return digest(rows)


def digest(obj: Any) -> str:
    """A short stable digest of a JSON-able value (unknown types by their str)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differing_fields(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """The names whose value differs between two fingerprints (missing on one side counts)."""
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
