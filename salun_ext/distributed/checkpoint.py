"""Engine checkpoints of FSDP2-sharded models: one file per rank holding its local shards (plain tensors).

A sharded checkpoint never gathers the model: each rank writes and reads only what it holds, so 7B-class runs
checkpoint as fast as one GPU writes its shard. Loading needs the same world size and sharding (checked). For a
single consolidated export of the trained model use `full_state_dict` (rank 0 gets every tensor, on CPU).
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import torch

from salun_ext.distributed.shards import is_dtensor, to_local
from salun_ext.utils.errors import UsageError

_RANK_FILE = re.compile(r"\.rank(\d+)-of-(\d+)\.pt$")


def local_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every DTensor replaced by a copy-free view of its local shard."""
    return {k: to_local(v) if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}


def load_local_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy local shards written by `local_state_dict` back into the (sharded) model, in place."""
    current = model.state_dict()
    missing = [k for k in current if k not in state]
    unexpected = [k for k in state if k not in current]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, target in current.items():
            local = to_local(target)
            value = state[key]
            if tuple(local.shape) != tuple(value.shape):
                raise RuntimeError(
                    f"{key}: the checkpoint holds a shard of shape {tuple(value.shape)} but this rank's shard has "
                    f"{tuple(local.shape)} (different sharding)"
                )
            local.copy_(value)


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with DTensor state (exp_avg, momentum, ...) replaced by the local shards."""
    sd = optimizer.state_dict()
    sd["state"] = {
        pid: {k: to_local(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
        for pid, st in sd["state"].items()
    }
    return sd


def restore_dtensor_state(optimizer: torch.optim.Optimizer) -> None:
    """After load_state_dict of a local optimizer state: wrap shard-shaped state tensors as the params' DTensors."""
    from torch.distributed.tensor import DTensor

    if getattr(optimizer, "state_layout", "dense") == "compact":  # packed local state: never shard-shaped DTensors
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_dtensor(p) or p not in optimizer.state:
                continue
            state = optimizer.state[p]
            local_shape = to_local(p).shape
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and not is_dtensor(value) and value.shape == local_shape:
                    state[key] = DTensor.from_local(
                        value.to(to_local(p).device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                    )


def check_world_size(path: Path, world_size: int) -> None:
    """Before resuming: refuse per-rank (FSDP) checkpoint files written by a run with another world size or mode."""
    if path.exists():
        return
    others = glob.glob(str(path.parent / "last.rank*-of-*.pt"))
    sizes = sorted({int(m.group(2)) for o in others if (m := _RANK_FILE.search(o))})
    if sizes:
        raise UsageError(
            f"{path.parent}: the sharded (FSDP) checkpoint was written by a run of {'/'.join(map(str, sizes))} "
            f"process(es) but this run has {world_size} process(es) and looks for {path.name}: resume with the same "
            "number of processes and the same distributed mode"
        )


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU on rank 0 ({} elsewhere): call on every rank (it gathers shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not any(is_dtensor(v) for v in model.state_dict().values()):
        from salun_ext.utils import is_main_process

        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if is_main_process() else {}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
