"""Distributed masks on disk: consolidated (one global file) or per shard (one file per rank).

    full = gather_mask(local_mask)                      # global SaliencyMask on rank 0 (None elsewhere)
    save_mask(local_mask, "out/mask.safetensors")       # consolidated: rank 0 writes one file
    save_mask(local_mask, "out/mask.safetensors", sharded=True)   # out/mask.rank0-of-4.safetensors, ...
    mask = load_mask("out/mask.safetensors", params=model.named_parameters())

Consolidation moves N/8 bytes to rank 0 (it is the mask itself); nothing else in this package moves
per-element data.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re

import torch
import torch.distributed as dist

from salun_ext import ops
from salun_ext.distributed.agreement import agree
from salun_ext.distributed.runtime import Collectives, DistributedError, current_world
from salun_ext.distributed.shards import is_dtensor, shard_mask
from salun_ext.mask import SaliencyMask
from salun_ext.utils.errors import MissingFileError, UsageError

_SHARD_SUFFIX = re.compile(r"\.rank(\d+)-of-(\d+)$")


def shard_path(path: str | os.PathLike, rank: int, world_size: int) -> str:
    """out/mask.safetensors -> out/mask.rank{rank}-of-{world_size}.safetensors"""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.rank{rank}-of-{world_size}{ext}"


def gather_mask(
    mask: SaliencyMask, process_group: dist.ProcessGroup | None = None, *, dst: int = 0, timeout_s: float = 300.0
) -> SaliencyMask | None:
    """Consolidate every rank's shard into the global mask on rank `dst` (None on the others).

    A mask without shard information is already global (DDP): it is returned as is on every rank.
    """
    if mask.shard is None:
        return mask
    group = process_group if process_group is not None else dist.group.WORLD
    comm = Collectives(group, timeout_s=timeout_s, what="gather_mask")
    shard = mask.shard
    error = None
    if shard.world_size != comm.world or shard.rank != comm.rank:
        error = ValueError(
            f"this mask is rank {shard.rank}'s shard of a {shard.world_size}-process run, but this process is rank "
            f"{comm.rank} of {comm.world}"
        )
    fields = {}
    if shard.layout == "boxes":
        structure = json.dumps([[n, list(s)] for n, s in zip(mask.names, shard.global_shapes)])
        fields["parameter list"] = (structure, f"{len(mask.names)} tensors")
    fields["mask"] = (json.dumps([shard.layout, mask.k, mask.exact_k]), f"layout {shard.layout}, k={mask.k}")
    agree(comm, error=error, fields=fields)

    meta = json.dumps({"names": list(mask.names), "shapes": [list(s) for s in mask.shapes], "offsets": shard.offsets})
    metas = comm.gather_varlen(torch.frombuffer(bytearray(meta.encode()), dtype=torch.uint8), dst)
    words = comm.gather_varlen(mask.words, dst)
    if metas is None:
        return None
    ranks = [json.loads(bytes(m.cpu().tolist()).decode()) for m in metas]
    words = [w.cpu() for w in words]
    if shard.layout == "per_rank":
        names = [n for r in ranks for n in r["names"]]
        shapes = [s for r in ranks for s in r["shapes"]]
        full = SaliencyMask(torch.cat(words), names, shapes, **_header(mask))
    else:
        full = _assemble_boxes(mask, ranks, words)
    if full.exact_k and full.k is not None and full.count() != full.k:
        raise DistributedError(f"gather_mask: the shards hold {full.count()} salient entries but k = {full.k}")
    return full


def _header(mask: SaliencyMask) -> dict:
    return dict(ratio=mask.ratio, k=mask.k, threshold=mask.threshold, exact_k=mask.exact_k)


def _assemble_boxes(mask: SaliencyMask, ranks: list[dict], words: list[torch.Tensor]) -> SaliencyMask:
    global_shapes = mask.shard.global_shapes
    segments = []
    per_rank_offsets = [ops.word_offsets([math.prod(s) for s in r["shapes"]])[0] for r in ranks]
    for i, shape in enumerate(global_shapes):
        dense = torch.zeros(shape, dtype=torch.bool)
        for r, info in enumerate(ranks):
            local_shape = info["shapes"][i]
            n = math.prod(local_shape)
            if n == 0:
                continue
            start = per_rank_offsets[r][i]
            bits = ops.unpack_bits(words[r][start : start + ops.segment_words(n)], n)
            box = tuple(slice(o, o + m) for o, m in zip(info["offsets"][i], local_shape))
            dense[box] = bits.view(local_shape)
        segments.append(ops.pack_bits(dense.reshape(-1)))
    return SaliencyMask(torch.cat(segments), mask.names, global_shapes, **_header(mask))


def save_mask(
    mask: SaliencyMask,
    path: str | os.PathLike,
    *,
    sharded: bool = False,
    process_group: dist.ProcessGroup | None = None,
) -> str | None:
    """Write a (distributed) mask; returns the path this rank wrote, or None.

    sharded=False: consolidated on rank 0 into `path` (one global file that any world size can load).
    sharded=True: every rank writes its own shard (`shard_path(path, rank, world)`); only the same world size and
        sharding can load it back, and `load_mask` checks that.
    Global masks (DDP) are written by rank 0 only. Collective whenever the mask is a shard.
    """
    from salun_ext.utils import atomic_save

    rank, world = current_world()
    if sharded and mask.shard is not None:
        target = shard_path(path, mask.shard.rank, mask.shard.world_size)
        atomic_save(mask, target, saver=lambda m, p: m.save(p))
        return target
    full = gather_mask(mask, process_group)
    if full is not None and rank == 0:
        atomic_save(full, path, saver=lambda m, p: m.save(p))
        written = os.fspath(path)
    else:
        written = None
    if world > 1:  # the file exists for everyone once this returns
        dist.barrier(group=process_group)
    return written


def load_mask(path: str | os.PathLike, *, params=None, device: torch.device | str = "cpu") -> SaliencyMask:
    """Read a consolidated mask, or this rank's shard file (`shard_path(path, rank, world)`).

    With `params` (named DTensor parameters, e.g. an FSDP2 model's named_parameters()), a consolidated mask is cut
    to this rank's shards. A shard file written by a run of another world size raises ValueError saying so.
    """
    path = os.fspath(path)
    rank, world = current_world()
    if os.path.exists(path):
        mask = SaliencyMask.load(path, device=device)
    else:
        mine = shard_path(path, rank, world)
        if not os.path.exists(mine):
            root, ext = os.path.splitext(path)
            others = sorted(glob.glob(f"{glob.escape(root)}.rank*-of-*{ext}"))
            if others:
                sizes = sorted({int(_SHARD_SUFFIX.search(os.path.splitext(o)[0]).group(2)) for o in others})
                raise UsageError(
                    f"{path}: found per-shard mask files of a {'/'.join(map(str, sizes))}-process run, but this run "
                    f"has {world} process(es): run with the same world size, or save a consolidated mask "
                    "(save_mask(..., sharded=False)) and load that"
                )
            raise MissingFileError(f"mask file not found: {path} (nor this rank's shard {mine})")
        mask = SaliencyMask.load(mine, device=device)
    if mask.shard is not None and (mask.shard.world_size != world or mask.shard.rank != rank):
        raise UsageError(
            f"{path}: rank {mask.shard.rank}'s shard of a {mask.shard.world_size}-process run cannot be used by "
            f"rank {rank} of {world}: load the consolidated mask instead"
        )
    if params is not None and mask.shard is None:
        named = list(params.items()) if hasattr(params, "items") else list(params)
        if any(is_dtensor(p) for _, p in named):
            mask = shard_mask(mask, named)
    return mask
