"""Exact global saliency masks across processes: histograms travel, gradients never do.

Every process histograms the elements it is responsible for (its shards; its share of replicated tensors), the
histograms are all-reduced (a few KiB per digit, whatever the model size), and every process walks the same
global histogram to the same threshold key. The mask equals the single-process mask of the full list bit for
bit, ties included. Global order: the parameter list order, then the flat index of the full tensor; for
layout="per_rank" lists, rank order, then list order.

When exact-k cuts through the elements tied at the threshold, the tie quota is placed without moving data:
  1. tie counts per tensor are all-reduced (8 bytes per tensor) -> the one tensor where the quota ends;
  2. for that tensor, each process's (flat start, tie count) is all-gathered (24 bytes per process) and the
     quota of every contiguous shard follows from a prefix sum;
  3. shards that are not one contiguous run of the global tensor (Shard(1), 2-D meshes) instead locate the
     exact boundary position with a radix select over global flat positions (4096-bin all-reduces).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import torch
import torch.distributed as dist

from salun_ext import ops
from salun_ext.distributed.agreement import agree
from salun_ext.distributed.runtime import Collectives
from salun_ext.distributed.shards import Box, counted_part, global_positions, is_dtensor, tensor_box, to_local
from salun_ext.mask import MaskShard, SaliencyMask
from salun_ext.saliency._threshold import find_thresholds, named_tensors, nan_flag, ratio_to_k
from salun_ext.utils.errors import UsageError

LAYOUTS = ("replicated", "per_rank")
POSITION_DIGIT_BITS = 12  # radix width of the tie-boundary search over global positions
DEFAULT_SELECT_TIMEOUT_S = 300.0


class _AllReduce:
    """HistogramReducer over a process group."""

    def __init__(self, comm: Collectives) -> None:
        self.comm = comm

    def reduce(self, hist: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(hist)


@dataclasses.dataclass(eq=False)  # identity: entries hold tensors
class _Entry:
    """One tensor of this process's list: its data, its box, its global index, the part it counts."""

    name: str
    local: torch.Tensor
    box: Box
    index: int  # position in the global list
    part: torch.Tensor | None = None
    part_start: int | None = None  # global flat start of the counted part (None: not a contiguous run)


def distributed_saliency_masks(
    grads,
    ratios: float | Sequence[float],
    *,
    exact_k: bool = True,
    nan: str = "raise",
    process_group: dist.ProcessGroup | None = None,
    layout: str = "replicated",
    timeout_s: float | None = DEFAULT_SELECT_TIMEOUT_S,
    stats: dict | None = None,
) -> SaliencyMask | list[SaliencyMask]:
    """saliency_masks over a process group (see `salun_ext.saliency_masks` for the arguments).

    layout: how plain (non-DTensor) tensors are spread over the group: "replicated" (every rank holds the same
    full tensors, as DDP gradients: each element is counted once) or "per_rank" (each rank holds its own
    tensors). DTensors describe themselves (Shard / Replicate placements).
    stats: when given, receives the bytes this rank sent and the number of collectives (benchmarks).
    """
    comm = Collectives(process_group, timeout_s=timeout_s, what="saliency_masks")
    single = not isinstance(ratios, Sequence)
    ratio_list = [ratios] if single else list(ratios)
    # every rank checks its input, then all of them agree (or all raise) before any histogram is reduced
    error: BaseException | None = None
    entries: list[_Entry] = []
    fields: dict[str, tuple[str, str]] = {}
    summary: dict = {}
    nan_as_zero = False
    try:
        nan_as_zero = _check_options(ratio_list, nan, layout)
        options = f"ratios={[repr(float(r)) for r in ratio_list]} exact_k={exact_k} nan={nan} layout={layout}"
        entries, fields, summary = _local_entries(grads, layout, comm, options)
    except (TypeError, ValueError, NotImplementedError) as exc:
        error = exc
    ranks = agree(comm, error=error, fields=fields, summary=summary)
    total, num_tensors = _global_counts(entries, ranks, layout, comm.rank)
    all_16bit = all(r["all16"] for r in ranks)
    for e in entries:
        counted = counted_part(e.box, e.local)
        if counted is not None:
            e.part, e.part_start = counted
    parts = [e for e in entries if e.part is not None]

    ks = [ratio_to_k(r, total) for r in ratio_list]
    thresholds = find_thresholds(
        [e.part for e in parts],
        ks,
        nan_as_zero=nan_as_zero,
        names=[e.name for e in parts],
        reducer=_AllReduce(comm),
        total=total,
        all_16bit=all_16bit,
    )
    masks = []
    paths: list[str] = []  # how each ratio's tie quota was placed (for tests and benchmarks)
    for ratio, th in zip(ratio_list, thresholds):
        words = _mask_for_threshold(comm, entries, parts, th, exact_k, nan_as_zero, num_tensors, paths)
        masks.append(_build_mask(words, entries, ratio, th, exact_k, layout, comm))
    if stats is not None:
        stats.update(bytes_sent=comm.bytes_sent, collectives=comm.calls, tie_paths=paths)
    return masks[0] if single else masks


def _check_options(ratio_list: list, nan: str, layout: str) -> bool:
    """Validate layout, ratios and the NaN policy (before any collective); the kernels' nan_as_zero flag."""
    if layout not in LAYOUTS:
        raise UsageError(f"layout must be 'replicated' or 'per_rank', got {layout!r}")
    if not ratio_list:
        raise UsageError("saliency_masks: ratios is an empty sequence")
    for r in ratio_list:
        ratio_to_k(r, 0)  # type and range checks
    return nan_flag(nan)


def _local_entries(grads, layout: str, comm: Collectives, options: str) -> tuple[list[_Entry], dict, dict]:
    """This rank's entries, the fields every rank must agree on, and the summary every rank shares.

    The fields are compared in order and the first mismatch is reported: the options, then the parameter list.
    """
    names, tensors = named_tensors(grads)
    has_dtensor = any(is_dtensor(t) for t in tensors)
    if has_dtensor and layout == "per_rank":
        raise UsageError("layout='per_rank' describes plain per-rank tensors; DTensors carry their own placement")
    replicated_over = (comm.rank, comm.world) if layout == "replicated" else None
    entries: list[_Entry] = []
    for i, (name, t) in enumerate(zip(names, tensors)):
        box = tensor_box(t, name, replicated_over=replicated_over)
        if is_dtensor(t):
            _check_mesh(t, name, comm)
        local = to_local(t)
        entries.append(_Entry(name, local if local.is_contiguous() else local.contiguous(), box, i))
    fields: dict[str, tuple[str, str]] = {"ratios and options": (options, options)}
    if layout == "replicated":
        structure = json.dumps(
            [
                (e.name, list(e.box.global_shape), str(e.local.dtype), _placement_text(t))
                for e, t in zip(entries, tensors)
            ]
        )
        numel = sum(e.box.global_shape.numel() for e in entries)
        fields["parameter list"] = (structure, f"{len(entries)} tensors, {numel:,} elements")
    summary = {
        "tensors": len(entries),
        "numel": sum(e.box.numel for e in entries),
        "all16": all(e.local.dtype in (torch.bfloat16, torch.float16) for e in entries),
    }
    return entries, fields, summary


def _global_counts(entries: list[_Entry], ranks: list[dict], layout: str, rank: int) -> tuple[int, int]:
    """(global element count, global tensor count); per_rank entries get their global list index."""
    if layout == "per_rank":
        base = sum(r["tensors"] for r in ranks[:rank])
        total = sum(r["numel"] for r in ranks)
        num_tensors = sum(r["tensors"] for r in ranks)
        for e in entries:
            e.index += base
    else:
        total = sum(e.box.global_shape.numel() for e in entries)
        num_tensors = len(entries)
    if total == 0:
        raise UsageError("saliency_masks: every gradient is empty (0 elements in total)")
    return total, num_tensors


def _check_mesh(t: torch.Tensor, name: str, comm: Collectives) -> None:
    mesh = t.device_mesh
    if mesh.size() != comm.world:
        raise UsageError(
            f"{name!r} is a DTensor over {mesh.size()} processes but the process group has {comm.world}: pass the "
            "group that spans the DTensor's device mesh"
        )


def _placement_text(t: torch.Tensor) -> str:
    if is_dtensor(t):
        return f"{t.placements} on mesh {tuple(t.device_mesh.shape)}"
    return "plain"


def _build_mask(words, entries, ratio, th, exact_k, layout, comm) -> SaliencyMask:
    names = [e.name for e in entries]
    common = dict(ratio=float(ratio), k=th.k, threshold=th.value, exact_k=exact_k)
    whole = all(e.box.local_shape == e.box.global_shape for e in entries)
    if layout == "replicated" and whole:
        return SaliencyMask(words, names, [e.box.global_shape for e in entries], **common)
    shard = MaskShard(
        rank=comm.rank,
        world_size=comm.world,
        global_shapes=tuple(e.box.global_shape for e in entries),
        offsets=tuple(e.box.offset for e in entries),
        layout="per_rank" if layout == "per_rank" else "boxes",
    )
    return SaliencyMask(words, names, [e.box.local_shape for e in entries], shard=shard, **common)


# -------------------------------------------------------------------------------------------------------------
# Writing the mask: per-tensor tie limits


def _mask_for_threshold(comm, entries, parts, th, exact_k, nan_as_zero, num_tensors, paths) -> torch.Tensor:
    device = entries[0].local.device
    if th.k == 0:
        paths.append("empty")
        words = ops.word_offsets([e.box.numel for e in entries])[1]
        return torch.zeros(words, dtype=torch.int32, device=device)
    wanted = th.tie_limit(exact_k)
    if wanted <= 0:  # every tie (-1) or none (0): one rule for all tensors
        paths.append("all ties" if wanted < 0 else "no ties")
        return _write(entries, th.key, [wanted] * len(entries), nan_as_zero)

    # 1. which global tensor holds the boundary of the tie quota
    local_counts = torch.zeros(num_tensors, dtype=torch.int64)
    if parts:
        counts = torch.stack([_tie_histogram(e.part, th.key, nan_as_zero) for e in parts]).cpu()
        local_counts[[e.index for e in parts]] = counts
    cum = comm.all_reduce(local_counts.clone()).cpu().cumsum(0)
    boundary = int(torch.searchsorted(cum, wanted).item())
    quota = wanted - (int(cum[boundary - 1].item()) if boundary > 0 else 0)

    # 2. that tensor's shards: contiguous runs share out the quota by a prefix sum over flat starts
    mine = next((e for e in entries if e.index == boundary), None)
    row = [0, 0, 0]  # kind (0 none, 1 contiguous run, 2 box), flat start, ties
    if mine is not None and mine.part is not None:
        row = [1 if mine.part_start is not None else 2, mine.part_start or 0, int(local_counts[boundary])]
    table = comm.all_gather(torch.tensor(row, dtype=torch.int64)).cpu().tolist()
    limits = [-1 if e.index < boundary else 0 for e in entries]
    if all(kind != 2 for kind, _, _ in table):
        if mine is not None and mine.box.numel > 0:
            start, n = mine.box.contiguous_start, mine.box.numel
            before = sum(t for kind, s, t in table if kind == 1 and s < start)
            inside = sum(t for kind, s, t in table if kind == 1 and start <= s < start + n)
            limits[entries.index(mine)] = min(max(quota - before, 0), inside)
        paths.append("contiguous quota")
        return _write(entries, th.key, limits, nan_as_zero)

    # 3. shards that are boxes: find the global position of the quota-th tie, then take ties up to it
    paths.append("box quota")
    position = _boundary_position(comm, mine, th.key, quota, nan_as_zero)
    override = _box_words_upto(mine, th.key, position, nan_as_zero) if mine.box.numel > 0 else None
    return _write(entries, th.key, limits, nan_as_zero, override=(mine, override))


def _tie_histogram(t: torch.Tensor, key: int, nan_as_zero: bool) -> torch.Tensor:
    """0-d count of the elements of t whose key equals `key` (a 2-bin histogram pass; stays on the device)."""
    hist = ops.key_histogram([t], low_bit=0, num_bits=1, prefixes=[key >> 1], nan_as_zero=nan_as_zero)
    return hist[0, key & 1]


def _write(entries, key, limits, nan_as_zero, override=(None, None)) -> torch.Tensor:
    """Mask words of every local tensor: runs of tensors sharing a tie limit go through one mask_words call."""
    special, special_words = override
    out: list[torch.Tensor] = []
    run: list[torch.Tensor] = []
    run_limit = None

    def flush():
        if run:
            out.append(ops.mask_words(run, threshold_key=key, tie_limit=run_limit, nan_as_zero=nan_as_zero))
            run.clear()

    for e, limit in zip(entries, limits):
        if e.box.numel == 0:
            continue
        if e is special:
            flush()
            out.append(special_words)
            continue
        if limit != run_limit or limit > 0:
            flush()
            run_limit = limit
        run.append(e.local)
        if limit > 0:
            flush()
    flush()
    if not out:
        return torch.zeros(0, dtype=torch.int32, device=entries[0].local.device)
    return torch.cat(out)


# -------------------------------------------------------------------------------------------------------------
# Tie boundary inside non-contiguous shards (radix select over global flat positions)

_ROW_CHUNK_ELEMENTS = 1 << 24  # bounds the int64 temporaries of position arithmetic


def _tie_positions(entry: _Entry, key: int, nan_as_zero: bool) -> torch.Tensor:
    """Global flat positions of the ties in this rank's counted part of the tensor."""
    if entry.part_start is not None:  # a contiguous run: positions are start + local flat index
        keys = ops.keys(entry.part, nan_as_zero)
        return torch.nonzero(keys == key).reshape(-1) + entry.part_start
    out = []
    for rows, local in _row_chunks(entry):
        keys = ops.keys(local, nan_as_zero)
        pos = global_positions(entry.box, rows.start, rows.stop, device=local.device)
        out.append(pos[keys == key])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def _row_chunks(entry: _Entry):
    local = entry.local
    if local.dim() == 0:
        yield range(0, 1), local.reshape(1)
        return
    rows = local.shape[0]
    per_row = max(1, local[0].numel()) if rows else 1
    step = max(1, _ROW_CHUNK_ELEMENTS // per_row)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        yield range(a, b), local[a:b]


def _boundary_position(comm, mine, key, quota, nan_as_zero) -> int:
    """Global flat position of the quota-th tie (1-based) of the boundary tensor, in global order.

    Only DTensor layouts get here, and there every rank lists every tensor (`mine` is never None).
    """
    counted = mine.part is not None
    positions = _tie_positions(mine, key, nan_as_zero) if counted else torch.zeros(0, dtype=torch.int64)
    numel = mine.box.global_shape.numel()
    lo, width, remaining = 0, max(numel, 1), quota
    while True:
        shift = max(0, (width - 1).bit_length() - POSITION_DIGIT_BITS)
        buckets = ((width - 1) >> shift) + 1
        inside = positions[(positions >= lo) & (positions < lo + width)]
        hist = torch.bincount(((inside - lo) >> shift).cpu(), minlength=buckets)[:buckets]
        hist = comm.all_reduce(hist).cpu()
        cum = hist.cumsum(0)
        b = int(torch.searchsorted(cum, remaining).item())
        remaining -= int(cum[b - 1].item()) if b > 0 else 0
        lo += b << shift
        if shift == 0:
            return lo
        width = min(1 << shift, width - (b << shift))


def _box_words_upto(entry: _Entry, key: int, position: int, nan_as_zero: bool) -> torch.Tensor:
    """Mask words of a box: keys above the threshold, plus ties at global positions <= `position`."""
    take = []
    for rows, local in _row_chunks(entry):
        keys = ops.keys(local, nan_as_zero)
        pos = global_positions(entry.box, rows.start, rows.stop, device=local.device)
        take.append((keys > key) | ((keys == key) & (pos <= position)))
    return ops.pack_bits(torch.cat(take))
