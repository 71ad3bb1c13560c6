"""File writes that never leave a half-written file: `atomic_save` and the one JSON writer, `write_json`."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: str | os.PathLike, saver: Callable = torch.save) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        saver(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def json_clean(obj: Any) -> Any:
    """A JSON-safe copy: NaN / inf -> None (strict JSON has neither), tuples -> lists, tensors -> numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return json_clean(obj.item())
    return obj


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Atomically write `obj` as indented, strict JSON (NaN/inf -> null; unknown types via str)."""

    def dump(value: Any, target: str) -> None:
        with open(target, "w", encoding="utf-8") as f:
            json.dump(json_clean(value), f, indent=2, default=str, allow_nan=False)
            f.write("\n")

    atomic_save(obj, path, saver=dump)
