"""Exact global saliency masks: the top-k |gradient| entries over a whole list of tensors.

SalUn ranks the gradient magnitudes of all parameters together and keeps the top `ratio` as salient. The select
here never concatenates: it walks the 31-bit magnitude key (csrc/include/salun_ext/key.h) from the top digit
down with histogram passes over the whole tensor list (`salun_ext::key_histogram`), then writes the bit-packed
mask in one more pass (`salun_ext::mask_words`). Several ratios share every histogram pass; only the mask
writes repeat. Extra memory: the N/8-byte mask plus a few histograms.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch

from salun_ext import _reference
from salun_ext.mask import SaliencyMask

# Digit widths, top down, of the 31-bit key: small enough for shared-memory histograms on a GPU (4096 bins).
DIGIT_WIDTHS = (12, 10, 9)
# fp16 and bf16 keys have their low 13 bits zero: the last digit then always lands in bin 0 and is skipped.
_LOW_BITS_ZERO_FOR_16BIT = 13

NanPolicy = str  # "raise" | "zero"
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


def find_thresholds(
    tensors: list[torch.Tensor],
    ks: Sequence[int],
    *,
    nan_as_zero: bool = False,
    names: Sequence[str] | None = None,
    reducer: HistogramReducer | None = None,
) -> list[Threshold]:
    """Exact k-th largest |g| key over `tensors` for every k in `ks` (histogram passes shared by all ks)."""
    reducer = reducer or HistogramReducer()
    total = sum(t.numel() for t in tensors)
    for k in ks:
        if not 0 <= k <= total:
            raise ValueError(f"k = {k} is outside [0, {total}]")
    active = [i for i, k in enumerate(ks) if k > 0]
    prefix = dict.fromkeys(active, 0)
    greater = dict.fromkeys(active, 0)
    ties = dict.fromkeys(active, 0)
    all_16bit = all(t.dtype in (torch.bfloat16, torch.float16) for t in tensors)

    low_bit = _reference.KEY_BITS
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
        hist = torch.ops.salun_ext.key_histogram(tensors, low_bit, width, rows, nan_as_zero)
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
    first_nan_bin = (_reference.INF_KEY >> low_bit) + 1  # NaN is canonicalised to 0x7FFFFFFF, above +Inf's bin
    nan_count = int(hist[:, first_nan_bin:].sum().item())
    if nan_count == 0:
        return
    culprits = [
        f"{names[i] if names else f'tensor {i}'} ({int(torch.isnan(t).sum().item())} NaN)"
        for i, t in enumerate(tensors)
        if bool(torch.isnan(t).any())
    ]
    raise ValueError(
        f"gradient contains NaN: {', '.join(culprits)}. NaN has no magnitude to rank; fix the loss, or pass "
        "nan='zero' to rank NaN entries as 0"
    )


def ratio_to_k(ratio: float, total: int) -> int:
    """k = floor(N * ratio), with the ratio read as the decimal it was written as (0.29 * 100 -> 29, not 28)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a float in [0, 1], got {type(ratio).__name__}")
    if not (0.0 <= float(ratio) <= 1.0):
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
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
                raise ValueError(f"parameter {name!r} has no .grad: run backward first, or pass gradients directly")
            value = value.grad
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"gradient {name!r} is a {type(value).__name__}, expected a tensor")
        if value.is_sparse or value.layout != torch.strided:
            raise TypeError(f"gradient {name!r} has layout {value.layout}; dense gradients only")
        if value.dtype not in _reference.KEY_DTYPES:
            hint = " (call .float() first)" if value.is_floating_point() else ""
            raise TypeError(f"gradient {name!r} has dtype {value.dtype}; expected float32, bfloat16 or float16{hint}")
        names.append(name)
        tensors.append(value.detach())
    if not tensors:
        raise ValueError("saliency_masks: no gradients given (grads is empty)")
    if len(set(names)) != len(names):
        raise ValueError("saliency_masks: duplicate tensor names")
    device = tensors[0].device
    for name, t in zip(names, tensors):
        if t.device != device:
            raise ValueError(f"gradient {name!r} is on {t.device} but {names[0]!r} is on {device}; use one device")
    return names, tensors


def _nan_as_zero(nan: NanPolicy) -> bool:
    if nan not in ("raise", "zero"):
        raise ValueError(f"nan must be 'raise' or 'zero', got {nan!r}")
    return nan == "zero"


def saliency_masks(
    grads: GradsLike,
    ratios: float | Sequence[float],
    *,
    exact_k: bool = True,
    nan: NanPolicy = "raise",
    reducer: HistogramReducer | None = None,
) -> SaliencyMask | list[SaliencyMask]:
    """Exact global top-k saliency masks over many tensors, without concatenating them.

    Args:
        grads: name -> gradient mapping, `model.named_parameters()` after backward (the `.grad` is ranked), or
            a list of tensors (named "0", "1", ...). fp32, bf16, fp16 and mixed lists; one device.
        ratios: a float in [0, 1] or a sequence of them; k = floor(N * ratio) with N the total element count.
        exact_k: True selects exactly k entries, breaking ties at the threshold by ascending global index
            (tensor order, then flat index): deterministic. False selects every entry with |g| >= threshold.
        nan: "raise" (default) raises naming the tensors that hold NaN; "zero" ranks NaN as 0.

    Returns:
        A SaliencyMask (mask = 1: salient), or a list of them when `ratios` is a sequence.
    """
    names, tensors = _named_tensors(grads)
    single = not isinstance(ratios, Sequence)
    ratio_list = [ratios] if single else list(ratios)
    if not ratio_list:
        raise ValueError("saliency_masks: ratios is an empty sequence")
    total = sum(t.numel() for t in tensors)
    if total == 0:
        raise ValueError("saliency_masks: every gradient is empty (0 elements in total)")
    ks = [ratio_to_k(r, total) for r in ratio_list]
    nan_as_zero = _nan_as_zero(nan)
    tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]

    thresholds = find_thresholds(tensors, ks, nan_as_zero=nan_as_zero, names=names, reducer=reducer)
    masks = []
    for ratio, th in zip(ratio_list, thresholds):
        if th.k == 0:
            words = torch.zeros(_total_words(tensors), dtype=torch.int32, device=tensors[0].device)
        else:
            words = torch.ops.salun_ext.mask_words(tensors, th.key, th.tie_limit(exact_k), nan_as_zero)
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


def _total_words(tensors: list[torch.Tensor]) -> int:
    from salun_ext._mask_layout import word_offsets

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
            raise ValueError(f"unknown parameter preset {params!r}; expected 'all' or 'conv_linear'")
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        wanted_names = list(params)
        index = dict(named)
        unknown = [n for n in wanted_names if n not in index]
        if unknown:
            raise ValueError(f"unknown or frozen parameter name(s): {unknown[:5]}")
        chosen = [(n, index[n]) for n in wanted_names]
    if not chosen:
        raise ValueError(f"parameter selection {params!r} matched no trainable parameter")
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
) -> SaliencyMask | list[SaliencyMask]:
    """Accumulate forget-loss gradients over `batches` and return the saliency mask(s).

    Args:
        loss_fn: (model, batch) -> scalar loss. SalUn's classification recipe uses -CE on the forget set (the
            sign does not matter: magnitudes are ranked).
        reduction: "abs_of_sum" (the paper: |sum_b g_b|) or "sum_of_abs" (sum_b |g_b|).
        params: which parameters are ranked (see `select_parameters`); the paper ranks all of them.
        clip_grad_norm: clip each batch's gradient to this norm before summing (the DDPM recipe uses 1.0).
        train_mode: run the model in train mode (the paper computes masks in eval mode).
    The parameters' `.grad` are cleared on return.
    """
    from tqdm.auto import tqdm

    if reduction not in ("abs_of_sum", "sum_of_abs"):
        raise ValueError(f"reduction must be 'abs_of_sum' or 'sum_of_abs', got {reduction!r}")
    if clip_grad_norm is not None and not (clip_grad_norm > 0 and math.isfinite(clip_grad_norm)):
        raise ValueError(f"clip_grad_norm must be a positive finite float, got {clip_grad_norm}")
    named = select_parameters(model, params)
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
        for batch in tqdm(batches, total=total, desc="saliency", disable=not progress, leave=False):
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
    if count == 0:
        raise ValueError("compute_saliency: 'batches' yielded no batch")
    if own_buffers:
        magnitudes = {n: (g.abs_() if reduction == "abs_of_sum" else g) for n, g in accum.items()}
    else:
        # a parameter the loss never reached has a zero gradient; it still takes part in the ranking
        magnitudes = {n: (p.grad.abs_() if p.grad is not None else torch.zeros_like(p)) for n, p in named}
    for _, p in named:
        p.grad = None
    return saliency_masks(magnitudes, ratios, exact_k=exact_k, nan=nan, reducer=reducer)
