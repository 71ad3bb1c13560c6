"""Exact global saliency masks in one process: the top-k |gradient| entries over a whole list of tensors.

Two exact paths write the bit-packed mask (`method=`): the histogram path finds each ratio's threshold with the
radix select of `_threshold.py`, then writes the mask in one `ops.mask_words` pass; the window path brackets
the threshold with a strided sample and writes the mask in one fused `ops.window_select` pass, falling back to
the histogram path when the bracket misses. Extra memory: the N/8-byte mask plus a few histograms (or the
window's candidates). With a process group or DTensor gradients, `saliency_masks` hands over to
`distributed.py`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from operator import attrgetter
from typing import Any

import torch

from salun_ext import ops
from salun_ext.mask import SaliencyMask
from salun_ext.saliency._threshold import (
    GradsLike,
    HistogramReducer,
    NanPolicy,
    Threshold,
    as_ratio_list,
    find_thresholds,
    has_dtensor,
    named_tensors,
    nan_flag,
    raise_nan_error,
    ratio_to_k,
    total_words,
)
from salun_ext.utils.errors import UsageError

LOG = logging.getLogger("salun_ext")
Method = str  # "auto" | "histogram" | "window"
METHODS = ("auto", "histogram", "window")

# The window select (one pass when a sample brackets the threshold) pays off above this many elements.
WINDOW_MIN_ELEMENTS = 1 << 16
# Candidate buffers (12 bytes per candidate) are sized per k: WINDOW_HEADROOM x the window's expected count (from
# the sample) + WINDOW_SLACK, never above WINDOW_CAPACITY (the extra-memory budget of each device kind). A window
# that overflows its buffer falls back to the exact histogram path, so the sizing only affects speed and memory.
WINDOW_CAPACITY = {"cuda": 5 << 20, "cpu": 1 << 20}
WINDOW_HEADROOM = 2.0
WINDOW_SLACK = 1 << 14
WINDOW_SAMPLES = {"cuda": 1 << 20, "cpu": 1 << 16}
WINDOW_SIGMAS = 3.5  # half-width of the bracket, in binomial standard deviations of the sample rank


def saliency_masks(
    grads: GradsLike,
    ratios: float | Sequence[float],
    *,
    exact_k: bool = True,
    nan: NanPolicy = "raise",
    reducer: HistogramReducer | None = None,
    method: Method = "auto",
    process_group: Any = None,
    layout: str = "replicated",
    timeout_s: float | None = 300.0,
) -> SaliencyMask | list[SaliencyMask]:
    """Exact global top-k saliency masks over many tensors, without concatenating them.

    Args:
        grads: name -> gradient mapping, `model.named_parameters()` after backward (the `.grad` is ranked), or
            a list of tensors (named "0", "1", ...). fp32, bf16, fp16 and mixed lists; one device.
        ratios: a float in [0, 1] or a sequence of them; k = floor(N * ratio) with N the total element count.
        exact_k: True selects exactly k entries, breaking ties at the threshold by ascending global index
            (tensor order, then flat index): deterministic. False selects every entry with |g| >= threshold.
        nan: "raise" (default) raises naming the tensors that hold NaN; "zero" ranks NaN as 0.
        method: "histogram" (radix-select histogram passes, then one mask pass), "window" (a sample brackets the
            threshold and one fused pass writes the mask; falls back to the histogram path when the bracket
            misses), or "auto" (window for one-process lists of 65536+ elements; below that, every key is read
            once and the threshold selected from them). Every method is exact.
        process_group: a torch.distributed group (or `torch.distributed.group.WORLD`): the mask is global over
            the whole group, bit-identical to the single-process mask of the full list. Only histograms are
            communicated (KiB, whatever the model size). DTensor gradients (FSDP2) use the default group when
            this is None. Every rank must call with the same ratios and options. See docs/distributed.md.
        layout: how plain tensors are spread over the group: "replicated" (DDP: every rank holds the same full
            gradients; returns the global mask) or "per_rank" (each rank its own tensors; global order = rank
            order, then list order). DTensors follow their placements and return this rank's shard of the mask
            (`mask.shard` says where it lies; `salun_ext.distributed.gather_mask` consolidates).
        timeout_s: with a process group, how long to wait for the other ranks before raising DistributedError.

    Returns:
        A SaliencyMask (mask = 1: salient), or a list of them when `ratios` is a sequence.
    """
    if not isinstance(grads, (Mapping, list, tuple, torch.Tensor)):
        grads = list(grads)  # e.g. model.named_parameters(): materialise once
    if process_group is not None or has_dtensor(grads):
        return _distributed(grads, ratios, exact_k, nan, method, process_group, layout, timeout_s)
    names, tensors = named_tensors(grads)
    ratio_list, single = as_ratio_list(ratios)
    total = sum(map(torch.Tensor.numel, tensors))
    if total == 0:
        raise UsageError("saliency_masks: every gradient is empty (0 elements in total)")
    ks = [ratio_to_k(r, total) for r in ratio_list]
    nan_as_zero = nan_flag(nan)
    if not all(map(torch.Tensor.is_contiguous, tensors)):
        tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    use_window = _use_window(method, reducer, total)
    # "auto" below the window's size: one read of every key and a host select beat three histogram passes
    read_all = method == "auto" and reducer is None and not use_window
    results = _select(tensors, names, ks, exact_k, nan_as_zero, use_window, reducer, read_all)
    shapes = list(map(attrgetter("shape"), tensors))
    masks = [
        SaliencyMask(words, names, shapes, ratio=float(r), k=th.k, threshold=th.value, exact_k=exact_k)
        for r, (words, th) in zip(ratio_list, results)
    ]
    return masks[0] if single else masks


def _distributed(grads, ratios, exact_k, nan, method, process_group, layout, timeout_s):
    """The select over a process group (the default one for DTensor gradients without a group)."""
    from salun_ext.saliency.distributed import distributed_saliency_masks

    if method == "window":
        raise UsageError("method='window' works in one process only; distributed selects use the histogram path")
    if process_group is None:
        process_group = _default_group()
    return distributed_saliency_masks(
        grads, ratios, exact_k=exact_k, nan=nan, process_group=process_group, layout=layout, timeout_s=timeout_s
    )


def _default_group():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError("DTensor gradients need an initialised torch.distributed process group")
    return dist.group.WORLD


def _use_window(method: Method, reducer: HistogramReducer | None, total: int) -> bool:
    if method not in METHODS:
        raise UsageError(f"method must be 'auto', 'histogram' or 'window', got {method!r}")
    if method == "window" and reducer is not None:
        raise UsageError("method='window' works in one process only; distributed selects use the histogram path")
    return method == "window" or (method == "auto" and reducer is None and total >= WINDOW_MIN_ELEMENTS)


def _select(
    tensors, names, ks, exact_k, nan_as_zero, use_window, reducer, read_all=False
) -> list[tuple[torch.Tensor, Threshold]]:
    """(mask words, threshold) per k: the window select where it decides, the histogram path for the rest."""
    results: list[tuple[torch.Tensor, Threshold] | None] = (
        _window_masks(tensors, names, ks, exact_k, nan_as_zero) if use_window else [None] * len(ks)
    )
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        wanted = [ks[i] for i in missing]
        thresholds = (
            _thresholds_from_every_key(tensors, names, wanted, nan_as_zero)
            if read_all
            else find_thresholds(tensors, wanted, nan_as_zero=nan_as_zero, names=names, reducer=reducer)
        )
        for i, th in zip(missing, thresholds):
            results[i] = (_histogram_words(tensors, th, exact_k, nan_as_zero), th)
    return results  # type: ignore[return-value]


def _thresholds_from_every_key(tensors, names, ks, nan_as_zero: bool) -> list[Threshold]:
    """The exact thresholds of a small list (below WINDOW_MIN_ELEMENTS) from all of its keys at once: one kernel
    call (`ops.sample_keys` with num_samples = N returns every key) and a k-th-value select, instead of three
    histogram passes. The same Threshold as find_thresholds gives, by definition."""
    total = sum(map(torch.Tensor.numel, tensors))
    keys = ops.sample_keys(tensors, num_samples=total, nan_as_zero=nan_as_zero)
    if not nan_as_zero and bool((keys == ops.NAN_KEY).any()):
        raise_nan_error(tensors, names)
    out = []
    for k in ks:
        if k == 0:
            out.append(Threshold(k=0, key=0, greater=0, ties=0))
            continue
        key = int(torch.kthvalue(keys, total - k + 1).values)
        out.append(Threshold(k=k, key=key, greater=int((keys > key).sum()), ties=int((keys == key).sum())))
    return out


def _histogram_words(tensors, th: Threshold, exact_k: bool, nan_as_zero: bool) -> torch.Tensor:
    """The mask words of a threshold found by the histogram path (one mask_words pass)."""
    if th.k == 0:
        return torch.zeros(total_words(tensors), dtype=torch.int32, device=tensors[0].device)
    return ops.mask_words(tensors, threshold_key=th.key, tie_limit=th.tie_limit(exact_k), nan_as_zero=nan_as_zero)


# ---------------------------------------------------------------------------------------------------------------
# Window select: one pass over the gradients when a strided sample brackets the k-th largest key.
#
# A sample gives the approximate rank of every key; [lo, hi] is chosen around the k-th largest sample key with a
# margin of WINDOW_SIGMAS binomial standard deviations. One fused pass (ops.window_select) then writes the final
# bit of every element above hi, leaves every element below lo at 0, counts the elements above hi and compacts
# the few in-window elements (key and global position). If the k-th largest lies in the window, it is found
# exactly among the candidates (ties ordered by position = global index); otherwise, or if the window held more
# candidates than the buffer, the exact histogram path runs instead. Only speed depends on the sample.


def _select_kth(values: torch.Tensor, r: int) -> torch.Tensor:
    """The r-th largest of a 1-D tensor (0-dim tensor), exact; the fastest exact primitive per device."""
    if values.device.type == "cpu":
        return torch.kthvalue(values, values.numel() - r + 1).values
    return torch.sort(values, descending=True).values[r - 1]


def _set_bits(words: torch.Tensor, positions: torch.Tensor) -> None:
    """Set the bits at global positions (word * 32 + bit); they are all 0 before, so adding is OR."""
    if positions.numel() == 0:
        return
    values = torch.ones_like(positions) << (positions & 31)
    values = torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)
    words.index_add_(0, positions >> 5, values)


def _window_masks(tensors, names, ks, exact_k: bool, nan_as_zero: bool) -> list[tuple[torch.Tensor, Threshold] | None]:
    """(words, threshold) per k from the window select, or None where the histogram path must decide."""
    device_kind = "cuda" if tensors[0].device.type == "cuda" else "cpu"
    total = sum(map(torch.Tensor.numel, tensors))
    sample = ops.sample_keys(tensors, num_samples=WINDOW_SAMPLES[device_kind], nan_as_zero=nan_as_zero)
    sample = torch.sort(sample.long(), descending=True).values.cpu()
    out: list[tuple[torch.Tensor, Threshold] | None] = []
    for k in ks:
        window = _bracket(sample, k, total, device_kind) if k > 0 else None
        if window is None:
            out.append(None)
            continue
        lo_key, hi_key, capacity = window
        words, counts, cand_keys, cand_pos = ops.window_select(
            tensors, lo_key=lo_key, hi_key=hi_key, capacity=capacity, nan_as_zero=nan_as_zero
        )
        above, inside, nans = counts.tolist()
        if nans:
            raise_nan_error(tensors, names)
        if inside > capacity or not (above < k <= above + inside):
            LOG.debug(
                "window select missed (k=%d above=%d inside=%d capacity=%d): histogram path", k, above, inside, capacity
            )
            out.append(None)
            continue
        # 31-bit keys: int32 compares and selects like int64, at half the memory
        th = _finish_in_window(words, cand_keys[:inside], cand_pos[:inside], k, above, exact_k)
        out.append((words, th))
    return out


def _bracket(sample: torch.Tensor, k: int, total: int, device_kind: str) -> tuple[int, int, int] | None:
    """(lo_key, hi_key, capacity) of the window around the k-th largest sample key; None when it would overflow."""
    n_sample = sample.numel()
    q = k / total
    center = q * n_sample
    margin = math.ceil(WINDOW_SIGMAS * math.sqrt(n_sample * q * (1 - q))) + 2
    hi_rank, lo_rank = math.floor(center) - margin, math.ceil(center) + margin
    hi_key = int(sample[hi_rank]) if hi_rank >= 0 else ops.NAN_KEY
    lo_key = int(sample[lo_rank]) if lo_rank < n_sample else 0
    expected = (min(lo_rank, n_sample - 1) - max(hi_rank, 0) + 1) / n_sample * total
    if expected > WINDOW_CAPACITY[device_kind]:  # the window would overflow any buffer we allow: skip the pass
        LOG.debug("window of ~%d candidates exceeds the buffer budget (k=%d): histogram path", expected, k)
        return None
    capacity = min(total, WINDOW_CAPACITY[device_kind], math.ceil(WINDOW_HEADROOM * expected) + WINDOW_SLACK)
    return lo_key, hi_key, capacity


def _finish_in_window(words, keys, pos, k: int, above: int, exact_k: bool) -> Threshold:
    """Set the bits of the in-window candidates that are selected; the threshold of the whole list."""
    r = k - above
    key = _select_kth(keys, r)
    greater = keys > key
    tie = keys == key
    n_greater, n_ties = int(greater.sum()), int(tie.sum())
    need = r - n_greater
    if exact_k and need < n_ties:
        tie_pos = torch.sort(pos[tie]).values[:need]  # the first ties in global order
        _set_bits(words, torch.cat([pos[greater], tie_pos]))
    else:
        _set_bits(words, pos[greater | tie])
    # greater/ties of the whole list: everything above hi, plus the candidates above / at the threshold
    return Threshold(k=k, key=int(key), greater=above + n_greater, ties=n_ties)
