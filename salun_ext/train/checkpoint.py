"""The Engine's checkpoints: everything a resumed run needs to continue bit for bit, and a fingerprint of what
determines its result, so a resume with other settings is refused instead of mixed in.

The fingerprint holds digests of: the recipe (optimizer, lr, schedule, clipping, precision; the budget only where the
schedule depends on it, so an interrupted run may be resumed with a larger budget), the seed,
the number of processes, the trained parameters (names, shapes, dtypes), the model's weights when the run
started (content), the mask (content), the library version, and whatever the caller adds (the method, its
hyperparameters, the data).
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import torch

from salun_ext.utils import atomic_save
from salun_ext.utils.errors import UsageError
from salun_ext.utils.fingerprint import differing_fields, digest, state_digest
from salun_ext.utils.version import __version__

CHECKPOINT_FORMAT = "salun_ext.engine_checkpoint.v2"
# recipe fields of EngineConfig that do not change what a run computes
_NOT_RESULT = {"device", "progress", "desc", "checkpoint_dir", "checkpoint_every", "resume", "compile"}


def run_fingerprint(engine: Any, extra: dict[str, Any] | None) -> dict[str, str]:
    """Digests of what determines the result of `engine`'s run (see the module docstring)."""
    config = {f.name: getattr(engine.config, f.name) for f in dataclasses.fields(engine.config)}
    budget = {k: config.pop(k) for k in ("epochs", "max_steps")}
    fields = {
        "recipe": digest({k: v for k, v in config.items() if k not in _NOT_RESULT | {"seed"}}),
        # a cosine schedule spans the whole budget: another budget is another lr at every step
        "budget": digest(budget) if engine.config.schedule == "cosine" else "not part of the schedule",
        "seed": str(engine.config.seed),
        "processes": str(engine.world_size),
        "parameters": digest([(n, list(p.shape), str(p.dtype)) for n, p in engine.named_trained]),
        "initial weights": state_digest(_local_state(engine).items()),
        "mask": "none" if engine.mask is None else state_digest([("words", engine.mask.words)]),
        "library": __version__,
    }
    fields.update({key: digest(value) for key, value in (extra or {}).items()})
    return fields


def _local_state(engine: Any) -> dict[str, torch.Tensor]:
    """The model's state as this process holds it (FSDP2: its shards, as plain tensors)."""
    from salun_ext.distributed.shards import to_local

    return {name: to_local(t) if isinstance(t, torch.Tensor) else t for name, t in engine.model.state_dict().items()}


def first_non_finite(engine: Any) -> str | None:
    """The name of the first parameter or floating buffer holding NaN or Inf (None when all are finite)."""
    for name, t in _local_state(engine).items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def write(engine: Any, task: Any, path: Path, sharded: bool) -> None:
    from salun_ext.distributed.checkpoint import local_optimizer_state, local_state_dict

    state = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": engine.fingerprint,
        "world_size": engine.world_size,
        "model": local_state_dict(engine.model) if sharded else engine.model.state_dict(),
        "optimizer": local_optimizer_state(engine.optimizer) if sharded else engine.optimizer.state_dict(),
        "scheduler": engine.scheduler.state_dict() if engine.scheduler is not None else None,
        "scaler": engine.scaler.state_dict(),
        "step": engine.step,
        "epoch": engine.epoch,
        "batch_index": engine.batch_index,
        "history": engine.history,
        "segments": [*engine.segments, time.perf_counter() - engine.segment_start],  # this run's time so far
        "rng": {
            "torch": torch.get_rng_state(),
            "python": _flatten_py_rng(random.getstate()),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "task": task.state_dict() if task is not None and hasattr(task, "state_dict") else None,
    }
    atomic_save(state, path)


def read(path: Path) -> dict[str, Any]:
    """A checkpoint file's contents (tensors only: weights_only), or a UsageError naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or holding more than tensors: never unpickle it further
        kind = type(exc).__name__
        raise UsageError(
            f"{path}: not a readable engine checkpoint ({kind}; truncated or corrupt?); delete it to start over"
        ) from None
    if not isinstance(state, dict) or not str(state.get("format", "")).startswith("salun_ext.engine_checkpoint"):
        raise UsageError(f"{path}: not a salun_ext engine checkpoint")
    if state["format"] != CHECKPOINT_FORMAT:
        raise UsageError(
            f"{path}: written by an older salun_ext ({state['format']}, without a fingerprint of its settings); "
            "delete it to start over"
        )
    return state


def check_same_run(path: Path, saved: dict[str, str], current: dict[str, str]) -> None:
    """UsageError naming the fields that differ when the checkpoint comes from a run with other settings."""
    changed = differing_fields(saved, current)
    if changed:
        raise UsageError(
            f"{path}: the checkpoint was written by a run with other settings (differ: {', '.join(changed)}); "
            "resume with the settings it was written with, or start over without --resume (or another "
            "checkpoint folder)"
        )


def restore(engine: Any, task: Any, state: dict[str, Any], path: Path) -> None:
    """Load `state` into the engine (weights, optimizer, schedule, scaler, position, RNG, task)."""
    from salun_ext.distributed.checkpoint import load_local_state_dict, restore_dtensor_state

    try:
        if engine.config.distributed == "fsdp":
            load_local_state_dict(engine.model, state["model"])
        else:
            engine.model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UsageError(f"{path}: checkpoint is for a different architecture: {exc}") from exc
    engine.optimizer.load_state_dict(state["optimizer"])
    if engine.config.distributed == "fsdp":
        restore_dtensor_state(engine.optimizer)
    if state["scheduler"] is not None:
        engine.scheduler.load_state_dict(state["scheduler"])
    engine.scaler.load_state_dict(state["scaler"])
    engine.step, engine.epoch, engine.history = state["step"], state["epoch"], list(state["history"])
    engine.batch_index = state["batch_index"]
    engine.segments = [float(s) for s in state["segments"]]
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(_unflatten_py_rng(state["rng"]["python"]))
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    if state["task"] is not None and hasattr(task, "load_state_dict"):
        task.load_state_dict(state["task"])


def _flatten_py_rng(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _unflatten_py_rng(flat) -> tuple:
    version, internal, gauss = flat
    return (version, tuple(internal), gauss)
