"""Exact global saliency masks: the top-k |gradient| entries over a whole list of tensors.

SalUn ranks the gradient magnitudes of all parameters together and keeps the top `ratio` as salient. The select
here never concatenates: it walks the 31-bit magnitude key (csrc/include/salun_ext/key.h) from the top digit
down with histogram passes over the whole tensor list (`salun_ext::key_histogram`), then writes the bit-packed
mask in one more pass (`salun_ext::mask_words`). Several ratios share every histogram pass; only the mask
writes repeat. Extra memory: the N/8-byte mask plus a few histograms.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch

from salun_ext import ops
from salun_ext.mask import SaliencyMask
from salun_ext.utils.errors import UsageError

# Digit widths, top down, of the 31-bit key: small enough for shared-memory histograms on a GPU (4096 bins).
DIGIT_WIDTHS = (12, 10, 9)
# fp16 and bf16 keys have their low 13 bits zero: the last digit then always lands in bin 0 and is skipped.
_LOW_BITS_ZERO_FOR_16BIT = 13

LOG = logging.getLogger("salun_ext")
NanPolicy = str  # "raise" | "zero"
Method = str  # "auto" | "histogram" | "window"

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
GradsLike = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Sequence[torch.Tensor]


@dataclasses.dataclass
class Threshold:
    """Where the k-th largest key lies: the exact selection rule for one ratio."""

    k: int
    key: int  # the k-th largest key (undefined when k == 0)
    greater: int  # elements with key > threshold
    ties: int  # elements with key == threshold

    def tie_limit(self, exact_k: bool) -> int:
        """mask_words' tie_limit: -1 takes every tie, otherwise the first `limit` ties in global order."""
        wanted = self.k - self.greater
        if not exact_k or wanted >= self.ties:
            return -1
        return wanted

    @property
    def value(self) -> float:
        """The threshold as a float |g| (+inf when nothing is selected)."""
        if self.k == 0:
            return math.inf
        return struct.unpack("<f", struct.pack("<I", self.key))[0]


class HistogramReducer:
    """Hook for distributed selects: combines per-process histograms (identity in one process)."""

    def reduce(self, hist: torch.Tensor) -> torch.Tensor:
        return hist


def _histogram(
    tensors: list[torch.Tensor], low_bit: int, width: int, rows: list[int], nan_as_zero: bool
) -> torch.Tensor:
    """key_histogram over the non-empty tensors (zeros when there are none: a process may hold no elements)."""
    nonempty = [t for t in tensors if t.numel() > 0]
    if not nonempty:
        device = tensors[0].device if tensors else "cpu"
        return torch.zeros((len(rows), 1 << width), dtype=torch.int64, device=device)
    return torch.ops.salun_ext.key_histogram(nonempty, low_bit, width, rows, nan_as_zero)


def _dense_view(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when contiguous, else a contiguous permutation of it when one exists, else a contiguous copy."""
    if t.is_contiguous():
        return t
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.size(d)))
    view = t.permute(order)
    return view if view.is_contiguous() else t.contiguous()


def find_thresholds(
    tensors: list[torch.Tensor],
    ks: Sequence[int],
    *,
    nan_as_zero: bool = False,
    names: Sequence[str] | None = None,
    reducer: HistogramReducer | None = None,
    total: int | None = None,
    all_16bit: bool | None = None,
) -> list[Threshold]:
    """Exact k-th largest |g| key over `tensors` for every k in `ks` (histogram passes shared by all ks).

    With a distributed `reducer`, `tensors` are this process's part; `total` (the global element count) and
    `all_16bit` (whether every process's tensors are 16-bit) must then be the same on every process.
    """
    reducer = reducer or HistogramReducer()
    # the kernels read flat memory; a count does not depend on element order, so a permuted dense view
    # (channels_last, transposes) is as good as a copy and costs nothing
    tensors = [_dense_view(t) for t in tensors]
    if total is None:
        total = sum(t.numel() for t in tensors)
    for k in ks:
        if not 0 <= k <= total:
            raise UsageError(f"k = {k} is outside [0, {total}]")
    active = [i for i, k in enumerate(ks) if k > 0]
    prefix = dict.fromkeys(active, 0)
    greater = dict.fromkeys(active, 0)
    ties = dict.fromkeys(active, 0)
    if all_16bit is None:
        all_16bit = all(t.dtype in (torch.bfloat16, torch.float16) for t in tensors)

    low_bit = ops.KEY_BITS
    for level, width in enumerate(DIGIT_WIDTHS):
        low_bit -= width
        if not active:
            break
        if all_16bit and low_bit + width <= _LOW_BITS_ZERO_FOR_16BIT:
            # every 16-bit key has these bits zero: the digit is 0 for everyone, the bucket count is unchanged
            for i in active:
                prefix[i] <<= width
            continue
        rows = sorted(set(prefix.values()))
        hist = _histogram(tensors, low_bit, width, rows, nan_as_zero)
        hist = reducer.reduce(hist).cpu()
        if level == 0 and not nan_as_zero:
            _raise_on_nan(hist, low_bit, tensors, names)
        for i in active:
            row = hist[rows.index(prefix[i])]
            need = ks[i] - greater[i]  # how many of the remaining selected elements fall in this prefix
            from_top = row.flip(0).cumsum(0)
            j = int(torch.searchsorted(from_top, need).item())
            digit = row.numel() - 1 - j
            greater[i] += int(from_top[j].item()) - int(row[digit].item())
            ties[i] = int(row[digit].item())
            prefix[i] = (prefix[i] << width) | digit
    return [
        Threshold(k=k, key=prefix.get(i, 0), greater=greater.get(i, 0), ties=ties.get(i, 0)) for i, k in enumerate(ks)
    ]


def _raise_on_nan(hist: torch.Tensor, low_bit: int, tensors: list[torch.Tensor], names: Sequence[str] | None) -> None:
    first_nan_bin = (ops.INF_KEY >> low_bit) + 1  # NaN is canonicalised to 0x7FFFFFFF, above +Inf's bin
    if int(hist[:, first_nan_bin:].sum().item()) > 0:
        _raise_nan_error(tensors, names)


def _raise_nan_error(tensors: list[torch.Tensor], names: Sequence[str] | None) -> None:
    culprits = [
        f"{names[i] if names else f'tensor {i}'} ({int(torch.isnan(t).sum().item())} NaN)"
        for i, t in enumerate(tensors)
        if bool(torch.isnan(t).any())
    ]
    where = ", ".join(culprits) if culprits else "every NaN entry is held by another process"
    raise UsageError(
        f"gradient contains NaN: {where}. NaN has no magnitude to rank; fix the loss, or pass "
        "nan='zero' to rank NaN entries as 0"
    )


# ---------------------------------------------------------------------------------------------------------------
# Window select: one pass over the gradients when a strided sample brackets the k-th largest key.
#
# A sample gives the approximate rank of every key; [lo, hi] is chosen around the k-th largest sample key with a
# margin of WINDOW_SIGMAS binomial standard deviations. One fused pass (salun_ext::window_select) then writes the
# final bit of every element above hi, leaves every element below lo at 0, counts the elements above hi and
# compacts the few in-window elements (key and global position). If the k-th largest lies in the window, it is
# found exactly among the candidates (ties ordered by position = global index); otherwise, or if the window held
# more candidates than the buffer, the exact histogram path runs instead. Only speed depends on the sample.


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
    total = sum(t.numel() for t in tensors)
    sample = torch.ops.salun_ext.sample_keys(tensors, WINDOW_SAMPLES[device_kind], nan_as_zero)
    sample = torch.sort(sample.long(), descending=True).values.cpu()
    n_sample = sample.numel()
    out: list[tuple[torch.Tensor, Threshold] | None] = []
    for k in ks:
        if k == 0:
            out.append(None)
            continue
        q = k / total
        center = q * n_sample
        margin = math.ceil(WINDOW_SIGMAS * math.sqrt(n_sample * q * (1 - q))) + 2
        hi_rank, lo_rank = math.floor(center) - margin, math.ceil(center) + margin
        hi_key = int(sample[hi_rank]) if hi_rank >= 0 else ops.NAN_KEY
        lo_key = int(sample[lo_rank]) if lo_rank < n_sample else 0
        expected = (min(lo_rank, n_sample - 1) - max(hi_rank, 0) + 1) / n_sample * total
        if expected > WINDOW_CAPACITY[device_kind]:  # the window would overflow any buffer we allow: skip the pass
            LOG.debug("window of ~%d candidates exceeds the buffer budget (k=%d): histogram path", expected, k)
            out.append(None)
            continue
        capacity = min(total, WINDOW_CAPACITY[device_kind], math.ceil(WINDOW_HEADROOM * expected) + WINDOW_SLACK)
        words, counts, cand_keys, cand_pos = torch.ops.salun_ext.window_select(
            tensors, lo_key, hi_key, capacity, nan_as_zero
        )
        above, inside, nans = counts.tolist()
        if nans:
            _raise_nan_error(tensors, names)
        if inside > capacity or not (above < k <= above + inside):
            LOG.debug(
                "window select missed (k=%d above=%d inside=%d capacity=%d): histogram path", k, above, inside, capacity
            )
            out.append(None)
            continue
        keys = cand_keys[:inside]  # 31-bit keys: int32 compares and selects like int64, at half the memory
        pos = cand_pos[:inside]
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
        out.append((words, Threshold(k=k, key=int(key), greater=above + n_greater, ties=n_ties)))
    return out


def ratio_to_k(ratio: float, total: int) -> int:
    """k = floor(N * ratio), with the ratio read as the decimal it was written as (0.29 * 100 -> 29, not 28)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a float in [0, 1], got {type(ratio).__name__}")
    if not (0.0 <= float(ratio) <= 1.0):
        raise UsageError(f"ratio must be in [0, 1], got {ratio}")
    return math.floor(Fraction(repr(float(ratio))) * total)


def _named_tensors(grads: GradsLike) -> tuple[list[str], list[torch.Tensor]]:
    if isinstance(grads, torch.Tensor):
        raise TypeError("grads must be a mapping name -> tensor or an iterable of tensors, not a single tensor")
    items = list(grads.items()) if isinstance(grads, Mapping) else list(grads)
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            name, value = str(i), item
        elif isinstance(item, tuple) and len(item) == 2:
            name, value = item
        else:
            raise TypeError(f"grads[{i}] must be a tensor or a (name, tensor) pair, got {type(item).__name__}")
        if isinstance(value, torch.nn.Parameter):
            # model.named_parameters() after backward: rank the gradients
            if value.grad is None:
                raise UsageError(f"parameter {name!r} has no .grad: run backward first, or pass gradients directly")
            value = value.grad
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"gradient {name!r} is a {type(value).__name__}, expected a tensor")
        if value.is_sparse or value.layout != torch.strided:
            raise TypeError(f"gradient {name!r} has layout {value.layout}; dense gradients only")
        if value.dtype not in ops.KEY_DTYPES:
            hint = " (call .float() first)" if value.is_floating_point() else ""
            raise TypeError(f"gradient {name!r} has dtype {value.dtype}; expected float32, bfloat16 or float16{hint}")
        names.append(name)
        tensors.append(value.detach() if value.requires_grad else value)  # (DTensor.detach is not free)
    if not tensors:
        raise UsageError("saliency_masks: no gradients given (grads is empty)")
    if len(set(names)) != len(names):
        raise UsageError("saliency_masks: duplicate tensor names")
    device = tensors[0].device
    for name, t in zip(names, tensors):
        if t.device != device:
            raise UsageError(f"gradient {name!r} is on {t.device} but {names[0]!r} is on {device}; use one device")
    return names, tensors


def _nan_as_zero(nan: NanPolicy) -> bool:
    if nan not in ("raise", "zero"):
        raise UsageError(f"nan must be 'raise' or 'zero', got {nan!r}")
    return nan == "zero"


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
            misses), or "auto" (window for one-process lists of 65536+ elements). Every method is exact.
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
    if process_group is not None or _has_dtensor(grads):
        from salun_ext.saliency.distributed import distributed_saliency_masks

        if method == "window":
            raise UsageError("method='window' works in one process only; distributed selects use the histogram path")
        if process_group is None:
            process_group = _default_group()
        return distributed_saliency_masks(
            grads, ratios, exact_k=exact_k, nan=nan, process_group=process_group, layout=layout, timeout_s=timeout_s
        )
    names, tensors = _named_tensors(grads)
    single = not isinstance(ratios, Sequence)
    ratio_list = [ratios] if single else list(ratios)
    if not ratio_list:
        raise UsageError("saliency_masks: ratios is an empty sequence")
    total = sum(t.numel() for t in tensors)
    if total == 0:
        raise UsageError("saliency_masks: every gradient is empty (0 elements in total)")
    ks = [ratio_to_k(r, total) for r in ratio_list]
    nan_as_zero = _nan_as_zero(nan)
    tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    if method not in ("auto", "histogram", "window"):
        raise UsageError(f"method must be 'auto', 'histogram' or 'window', got {method!r}")
    if method == "window" and reducer is not None:
        raise UsageError("method='window' works in one process only; distributed selects use the histogram path")
    use_window = method == "window" or (method == "auto" and reducer is None and total >= WINDOW_MIN_ELEMENTS)

    results: list[tuple[torch.Tensor, Threshold] | None] = (
        _window_masks(tensors, names, ks, exact_k, nan_as_zero) if use_window else [None] * len(ks)
    )
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        thresholds = find_thresholds(
            tensors, [ks[i] for i in missing], nan_as_zero=nan_as_zero, names=names, reducer=reducer
        )
        for i, th in zip(missing, thresholds):
            if th.k == 0:
                words = torch.zeros(_total_words(tensors), dtype=torch.int32, device=tensors[0].device)
            else:
                words = torch.ops.salun_ext.mask_words(tensors, th.key, th.tie_limit(exact_k), nan_as_zero)
            results[i] = (words, th)
    masks = []
    for ratio, (words, th) in zip(ratio_list, results):
        masks.append(
            SaliencyMask(
                words,
                names,
                [t.shape for t in tensors],
                ratio=float(ratio),
                k=th.k,
                threshold=th.value,
                exact_k=exact_k,
            )
        )
    return masks[0] if single else masks


def _has_dtensor(grads: GradsLike) -> bool:
    from salun_ext.distributed.shards import is_dtensor

    if isinstance(grads, Mapping):
        values = list(grads.values())
    elif isinstance(grads, (list, tuple)):
        values = [v[1] if isinstance(v, tuple) and len(v) == 2 else v for v in grads]
    else:
        return False
    return any(is_dtensor(v.grad if isinstance(v, torch.nn.Parameter) else v) for v in values)


def _default_group():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError("DTensor gradients need an initialised torch.distributed process group")
    return dist.group.WORLD


def _total_words(tensors: list[torch.Tensor]) -> int:
    from salun_ext.ops._mask_layout import word_offsets

    return word_offsets([t.numel() for t in tensors])[1]


# ---------------------------------------------------------------------------------------------------------------
# Gradients of a model -> masks


ParamSelector = str | Callable[[str, torch.nn.Parameter], bool] | Iterable[str]


def select_parameters(model: torch.nn.Module, params: ParamSelector = "all") -> list[tuple[str, torch.nn.Parameter]]:
    """Named trainable parameters chosen by a preset, a predicate, or a list of names.

    Presets: "all" (every parameter with requires_grad: the paper's choice, BN and FC included) and
    "conv_linear" (the weights of Conv and Linear layers only).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(params, str):
        if params == "all":
            chosen = named
        elif params == "conv_linear":
            wanted = {
                f"{mod_name}.weight" if mod_name else "weight"
                for mod_name, mod in model.named_modules()
                if isinstance(mod, (torch.nn.modules.conv._ConvNd, torch.nn.Linear))
            }
            chosen = [(n, p) for n, p in named if n in wanted]
        else:
            raise UsageError(f"unknown parameter preset {params!r}; expected 'all' or 'conv_linear'")
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        wanted_names = list(params)
        index = dict(named)
        unknown = [n for n in wanted_names if n not in index]
        if unknown:
            raise UsageError(f"unknown or frozen parameter name(s): {unknown[:5]}")
        chosen = [(n, index[n]) for n in wanted_names]
    if not chosen:
        raise UsageError(f"parameter selection {params!r} matched no trainable parameter")
    return chosen


def compute_saliency(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    ratios: float | Sequence[float] = 0.5,
    *,
    reduction: str = "abs_of_sum",
    params: ParamSelector = "all",
    clip_grad_norm: float | None = None,
    exact_k: bool = True,
    nan: NanPolicy = "raise",
    train_mode: bool = False,
    progress: bool = True,
    reducer: HistogramReducer | None = None,
    process_group: Any = None,
    replicated_batches: bool = False,
    timeout_s: float | None = 300.0,
) -> SaliencyMask | list[SaliencyMask]:
    """Accumulate forget-loss gradients over `batches` and return the saliency mask(s).

    Args:
        loss_fn: (model, batch) -> scalar loss. SalUn's classification recipe uses -CE on the forget set (the
            sign does not matter: magnitudes are ranked).
        reduction: "abs_of_sum" (the paper: |sum_b g_b|) or "sum_of_abs" (sum_b |g_b|).
        params: which parameters are ranked (see `select_parameters`); the paper ranks all of them.
        clip_grad_norm: clip each batch's gradient to this norm before summing (the DDPM recipe uses 1.0).
        train_mode: run the model in train mode (the paper computes masks in eval mode).
        process_group: compute one global mask over a torch.distributed group, each rank iterating its own share
            of the batches. A DistributedDataParallel model (its gradients are already averaged) and FSDP2
            models (DTensor shards) are used as they are; for a plain module the summed gradients are
            all-reduced once before ranking. Names are the unwrapped module's. With DDP/FSDP a "batch" for
            sum_of_abs and clip_grad_norm is the global batch (all ranks' batches together).
        replicated_batches: with a plain module and `process_group`, every rank iterates the SAME batches, so its
            summed gradients already are the global ones: they are ranked as replicated tensors (each element
            counted once, the ranking work split over the ranks) without an all-reduce. The mask then equals the
            one-process mask bit for bit (no change of summation order) when the kernels are deterministic.
            Rank 0's sums are broadcast first, so the ranks always agree on one mask even when they are not.
    The parameters' `.grad` are cleared on return.
    """
    from tqdm.auto import tqdm

    if reduction not in ("abs_of_sum", "sum_of_abs"):
        raise UsageError(f"reduction must be 'abs_of_sum' or 'sum_of_abs', got {reduction!r}")
    if clip_grad_norm is not None and not (clip_grad_norm > 0 and math.isfinite(clip_grad_norm)):
        raise UsageError(f"clip_grad_norm must be a positive finite float, got {clip_grad_norm}")
    module = model.module if _is_ddp(model) else model
    named = select_parameters(module, params)
    # Gradients accumulate in .grad directly unless each batch must be transformed first (no extra memory).
    own_buffers = reduction == "sum_of_abs" or clip_grad_norm is not None
    accum = {n: torch.zeros_like(p) for n, p in named} if own_buffers else None
    was_training = model.training
    model.train(train_mode)
    for p in model.parameters():
        p.grad = None
    count = 0
    try:
        total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        from salun_ext.utils import is_main_process

        bar = tqdm(batches, total=total, desc="saliency", disable=not (progress and is_main_process()), leave=False)
        for batch in bar:
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("loss_fn must return a scalar tensor")
            loss.backward()
            count += 1
            if own_buffers:
                # clip_grad_norm_ takes the parameters (it reads their .grad): given bare gradient tensors it
                # would find no .grad and silently clip nothing
                with_grad = [p for _, p in named if p.grad is not None]
                if clip_grad_norm is not None and with_grad:
                    torch.nn.utils.clip_grad_norm_(with_grad, clip_grad_norm)
                for n, p in named:
                    if p.grad is not None:
                        accum[n].add_(p.grad.abs() if reduction == "sum_of_abs" else p.grad)
                        p.grad = None
    finally:
        model.train(was_training)
    if process_group is not None:
        from salun_ext.distributed.agreement import agree
        from salun_ext.distributed.runtime import Collectives

        comm = Collectives(process_group, timeout_s=timeout_s, what="compute_saliency")
        # same parameters and options everywhere before any gradient is all-reduced
        structure = repr([(n, tuple(p.shape), str(p.dtype)) for n, p in named])
        options = repr((ratios, reduction, clip_grad_norm, exact_k, nan))
        agree(
            comm,
            error=None,
            fields={
                "parameter list": (structure, f"{len(named)} tensors, {sum(p.numel() for _, p in named):,} elements"),
                "ratios and options": (options, options),
            },
        )
        count = int(comm.all_reduce(torch.tensor([count], dtype=torch.int64)).item())
    if count == 0:
        raise UsageError("compute_saliency: 'batches' yielded no batch" + (" on any rank" if process_group else ""))
    # a parameter the loss never reached has a zero gradient; it still takes part in the ranking
    sums = accum if own_buffers else {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in named}
    # DDP already all-reduced the gradients; DTensor shards are ranked where they are
    plain_module = process_group is not None and not _is_ddp(model) and not _has_dtensor(sums)
    for g in sums.values() if plain_module else ():
        wire = g.float() if g.dtype == torch.bfloat16 else g  # gloo has no bf16 collectives
        if replicated_batches:
            # the ranks summed the same batches, but nothing guarantees bit-identical sums (non-deterministic
            # CUDA kernels, other thread counts): rank 0's sums, shared once, make every rank rank the same numbers
            g.copy_(comm.broadcast(wire).to(g.device, g.dtype))
        else:  # each rank summed its own batches: one all-reduce makes the global sum
            g.copy_(comm.all_reduce(wire).to(g.device, g.dtype))
    magnitudes = {n: (g.abs_() if reduction == "abs_of_sum" else g) for n, g in sums.items()}
    for _, p in named:
        p.grad = None
    return saliency_masks(
        magnitudes, ratios, exact_k=exact_k, nan=nan, reducer=reducer, process_group=process_group, timeout_s=timeout_s
    )


def _is_ddp(model: torch.nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)
