"""Which part of each global tensor a process holds (DTensor / FSDP2 shards, DDP replicas, per-rank lists).

A process holds, of every tensor of the global list, one *box*: `local_shape` elements at `offset` of the
global tensor (the whole tensor when replicated). Ranks that hold the same box are *replicas* of it. For the
saliency select, every element must be counted exactly once over the group: the replicas of a box split it
between them (flat ranges when the box is one contiguous run of the global tensor, else replica 0 counts it).
"""

from __future__ import annotations

import dataclasses
import math
import sys

import torch

from salun_ext import ops
from salun_ext.mask import MaskShard, SaliencyMask
from salun_ext.utils.errors import UsageError


def is_dtensor(t: object) -> bool:
    # no import here: torch.distributed.tensor takes seconds to import, and without it no DTensor can exist
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def to_local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (an alias: in-place writes reach the DTensor), any other tensor as is."""
    return t.to_local() if is_dtensor(t) else t


@dataclasses.dataclass(frozen=True)
class Box:
    """This rank's box of one global tensor, and how many ranks hold the same box."""

    global_shape: torch.Size
    offset: tuple[int, ...]
    local_shape: torch.Size
    replica_index: int = 0
    replicas: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.local_shape)

    @property
    def contiguous_start(self) -> int | None:
        """Global flat index of the box's first element when the box is one contiguous run, else None."""
        return contiguous_start(self.offset, self.local_shape, self.global_shape)

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.local_shape))


def contiguous_start(offset, local_shape, global_shape) -> int | None:
    if math.prod(local_shape) == 0:
        return 0
    dims = len(global_shape)
    first_partial = next((d for d in range(dims) if local_shape[d] > 1), dims)
    if any(local_shape[d] != global_shape[d] for d in range(first_partial + 1, dims)):
        return None
    strides = _strides(global_shape)
    return sum(o * s for o, s in zip(offset, strides))


def _strides(shape) -> list[int]:
    strides, acc = [], 1
    for n in reversed(tuple(shape)):
        strides.append(acc)
        acc *= n
    return strides[::-1]


def dtensor_box(t: torch.Tensor, name: str) -> Box:
    """The box a DTensor's local shard covers; clear errors for placements without a box (Partial, strided)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = t.device_mesh, t.placements
    for p in placements:
        if type(p) is not Shard and not isinstance(p, Replicate):
            raise NotImplementedError(
                f"{name!r} has placement {p}: only Shard(dim) and Replicate() are supported (a Partial gradient "
                "must be reduced first; strided shards from FSDP + tensor parallel are not boxes)"
            )
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise UsageError(f"{name!r} lives on a device mesh this process is not part of")
    local_shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    replica_index, replicas = 0, 1
    for dim, p in enumerate(placements):
        if isinstance(p, Replicate):
            replica_index = replica_index * mesh.size(dim) + coordinate[dim]
            replicas *= mesh.size(dim)
    return Box(torch.Size(t.shape), tuple(offset), torch.Size(local_shape), replica_index, replicas)


def tensor_box(t: torch.Tensor, name: str, *, replicated_over: tuple[int, int] | None) -> Box:
    """Box of a DTensor, or of a plain tensor: whole, replicated over (rank, world) or held by this rank alone."""
    if is_dtensor(t):
        return dtensor_box(t, name)
    index, count = replicated_over or (0, 1)
    return Box(torch.Size(t.shape), (0,) * t.dim(), torch.Size(t.shape), index, count)


def counted_part(box: Box, local: torch.Tensor) -> tuple[torch.Tensor, int | None] | None:
    """The part of `local` this rank counts in the global histograms: (tensor, global flat start or None).

    Replicas of a contiguous box split it into flat ranges; a non-contiguous box is counted by replica 0 alone.
    """
    n = box.numel
    if n == 0:
        return None
    start = box.contiguous_start
    if box.replicas == 1:
        return local, start
    if start is None:
        return (local, None) if box.replica_index == 0 else None
    a = n * box.replica_index // box.replicas
    b = n * (box.replica_index + 1) // box.replicas
    if a == b:
        return None
    return local.reshape(-1)[a:b], start + a


def global_positions(box: Box, row_start: int = 0, row_stop: int | None = None, device=None) -> torch.Tensor:
    """int64 global flat index of every element of local rows [row_start, row_stop) of the box (row-major)."""
    shape = list(box.local_shape)
    if not shape:
        return torch.tensor([0], dtype=torch.int64, device=device)
    row_stop = shape[0] if row_stop is None else row_stop
    strides = _strides(box.global_shape)
    pos = torch.zeros((), dtype=torch.int64, device=device)
    for d, (o, n, s) in enumerate(zip(box.offset, shape, strides)):
        idx = torch.arange(row_start, row_stop, device=device) if d == 0 else torch.arange(n, device=device)
        view = [1] * len(shape)
        view[d] = -1
        pos = pos + ((idx + o) * s).view(view)
    return pos.reshape(-1)


# -------------------------------------------------------------------------------------------------------------
# Masks of boxes


def box_bits(mask: SaliencyMask, name: str, box: Box) -> torch.Tensor:
    """Flat bool bits of `box` cut from the global mask `mask` (the local rows of a Shard(0) parameter, ...)."""
    i = mask.names.index(name)
    if mask.shard is not None:
        raise UsageError(f"box_bits needs a global mask; this one is rank {mask.shard.rank}'s shard")
    if mask.shapes[i] != box.global_shape:
        raise UsageError(
            f"mask for {name!r} has shape {tuple(mask.shapes[i])} but the parameter's global shape is "
            f"{tuple(box.global_shape)}"
        )
    n = box.numel
    seg = mask.segment(name)
    start = box.contiguous_start
    if start is not None:  # unpack only the words covering [start, start + n)
        first, last = start // 32, (start + n + 31) // 32
        bits = ops.unpack_bits(seg[first:last], (last - first) * 32)
        return bits[start - first * 32 : start - first * 32 + n]
    dense = ops.unpack_bits(seg, math.prod(box.global_shape)).view(box.global_shape)
    return dense[box.slices()].reshape(-1)


def box_words(mask: SaliencyMask, name: str, box: Box) -> torch.Tensor:
    """int32 mask words of the box (one padded segment), for a masked optimizer stepping a local shard."""
    return ops.pack_bits(box_bits(mask, name, box))


def shard_mask(mask: SaliencyMask, params) -> SaliencyMask:
    """Cut a global mask to this process's shards of `params` (name -> DTensor/tensor, or named_parameters()).

    Plain tensors keep their whole segment. The result carries a MaskShard (save it per rank, or hand it to a
    masked optimizer over the same sharded parameters).
    """
    if mask.shard is not None:
        raise UsageError("shard_mask needs a global mask; this one is already a shard")
    from salun_ext.distributed.runtime import current_world

    items = params.items() if hasattr(params, "items") else params
    index = dict(items)
    missing = [n for n in mask.names if n not in index]
    if missing:
        raise UsageError(f"shard_mask: {len(missing)} masked tensor(s) are not among the parameters: {missing[:5]}")
    boxes = [tensor_box(index[n], n, replicated_over=None) for n in mask.names]
    words = [box_words(mask, n, b) for n, b in zip(mask.names, boxes)]
    rank, world = current_world()
    return SaliencyMask(
        torch.cat(words) if words else torch.zeros(0, dtype=torch.int32),
        mask.names,
        [b.local_shape for b in boxes],
        ratio=mask.ratio,
        k=mask.k,
        threshold=mask.threshold,
        exact_k=mask.exact_k,
        shard=MaskShard(rank, world, tuple(b.global_shape for b in boxes), tuple(b.offset for b in boxes)),
    )


def param_mask_words(mask: SaliencyMask, name: str, param: torch.Tensor) -> torch.Tensor:
    """Mask words of one optimizer parameter (a DTensor's local shard, or a plain tensor), on its local device.

    Accepts a global mask (cut to the parameter's box) or this rank's shard of a mask (checked against the
    parameter's box and the current world size). Raises ValueError naming the parameter on any mismatch.
    """
    i = mask.names.index(name)
    box = tensor_box(param, name, replicated_over=None)
    device = to_local(param).device
    if mask.shard is None:
        if box.local_shape == box.global_shape:  # a plain tensor, or a DTensor held whole
            if mask.shapes[i] != box.global_shape:
                raise UsageError(
                    f"mask for {name!r} has shape {tuple(mask.shapes[i])} but the parameter has {tuple(param.shape)}"
                )
            return mask.segment(name).to(device)
        return box_words(mask, name, box).to(device)
    shard = mask.shard
    from salun_ext.distributed.runtime import current_world

    rank, world = current_world()
    if shard.world_size != world or (shard.layout == "per_rank" and shard.rank != rank):
        raise UsageError(
            f"the mask is rank {shard.rank}'s shard of a {shard.world_size}-process run but this is rank {rank} of "
            f"{world}: load the consolidated mask (salun_ext.distributed.gather_mask / save_mask) and shard it"
        )
    if shard.global_shapes[i] != box.global_shape:
        raise UsageError(
            f"mask for {name!r} has global shape {tuple(shard.global_shapes[i])} but the parameter has "
            f"{tuple(box.global_shape)}"
        )
    if tuple(shard.offsets[i]) != tuple(box.offset) or mask.shapes[i] != box.local_shape:
        raise UsageError(
            f"mask shard for {name!r} covers {tuple(mask.shapes[i])} at {tuple(shard.offsets[i])} but this rank holds "
            f"{tuple(box.local_shape)} at {tuple(box.offset)}: the parameters are sharded differently; shard the "
            "consolidated mask instead"
        )
    return mask.segment(name).to(device)
