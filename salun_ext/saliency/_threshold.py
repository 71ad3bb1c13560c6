"""The exact k-th largest |g| over a tensor list: radix-select histogram passes, and what feeds them.

SalUn ranks the gradient magnitudes of all parameters together and keeps the top `ratio` as salient. The select
never concatenates: it walks the 31-bit magnitude key (csrc/include/salun_ext/key.h) from the top digit down
with histogram passes over the whole tensor list (`ops.key_histogram`); several ratios share every pass. The
mask is then written by `local.py` (one process) or `distributed.py` (a process group).

Also here, shared by both: ratio -> k, the NaN policy and its error, and the normalisation of `grads` (a
mapping, `named_parameters()` or a list) into named tensors.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from operator import attrgetter

import torch

from salun_ext import ops
from salun_ext.utils.errors import UsageError

# Digit widths, top down, of the 31-bit key: small enough for shared-memory histograms on a GPU (4096 bins).
DIGIT_WIDTHS = (12, 10, 9)
# fp16 and bf16 keys have their low 13 bits zero: the last digit then always lands in bin 0 and is skipped.
_LOW_BITS_ZERO_FOR_16BIT = 13

NanPolicy = str  # "raise" | "zero"
GradsLike = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Sequence[torch.Tensor]
_DTYPE, _LAYOUT, _DEVICE, _GRAD = attrgetter("dtype"), attrgetter("layout"), attrgetter("device"), attrgetter("grad")
_16BIT = frozenset((torch.bfloat16, torch.float16))
_KEY_DTYPES = frozenset(ops.KEY_DTYPES)


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
    """key_histogram over the non-empty tensors (zeros when there are none: a process may hold no elements), in
    batches of at most ops.MAX_HISTOGRAM_PREFIXES rows (the CUDA kernel's limit; more ratios than that are fine)."""
    nonempty = tensors if all(map(torch.Tensor.numel, tensors)) else [t for t in tensors if t.numel() > 0]
    if not nonempty:
        device = tensors[0].device if tensors else "cpu"
        return torch.zeros((len(rows), 1 << width), dtype=torch.int64, device=device)
    batch = ops.MAX_HISTOGRAM_PREFIXES
    parts = [
        ops.key_histogram(
            nonempty, low_bit=low_bit, num_bits=width, prefixes=rows[i : i + batch], nan_as_zero=nan_as_zero
        )
        for i in range(0, len(rows), batch)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


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
    if not all(map(torch.Tensor.is_contiguous, tensors)):
        tensors = [_dense_view(t) for t in tensors]
    if total is None:
        total = sum(map(torch.Tensor.numel, tensors))
    for k in ks:
        if not 0 <= k <= total:
            raise UsageError(f"k = {k} is outside [0, {total}]")
    active = [i for i, k in enumerate(ks) if k > 0]
    prefix = dict.fromkeys(active, 0)
    greater = dict.fromkeys(active, 0)
    ties = dict.fromkeys(active, 0)
    if all_16bit is None:
        all_16bit = set(map(_DTYPE, tensors)) <= _16BIT

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


def ratio_to_k(ratio: float, total: int) -> int:
    """k = floor(N * ratio), with the ratio read as the decimal it was written as (0.29 * 100 -> 29, not 28)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a float in [0, 1], got {type(ratio).__name__}")
    if not (0.0 <= float(ratio) <= 1.0):
        raise UsageError(f"ratio must be in [0, 1], got {ratio}")
    return math.floor(Fraction(repr(float(ratio))) * total)


def as_ratio_list(ratios: float | Sequence[float]) -> tuple[list[float], bool]:
    """(the ratios as a list, whether a single ratio was given); an empty sequence is a UsageError."""
    single = not isinstance(ratios, Sequence)
    out = [ratios] if single else list(ratios)
    if not out:
        raise UsageError("saliency_masks: ratios is an empty sequence")
    return out, single


# ---------------------------------------------------------------------------------------------------------------
# NaN policy


def nan_flag(nan: NanPolicy) -> bool:
    """The kernels' nan_as_zero flag for a NaN policy: "raise" -> False, "zero" -> True."""
    if nan not in ("raise", "zero"):
        raise UsageError(f"nan must be 'raise' or 'zero', got {nan!r}")
    return nan == "zero"


def _raise_on_nan(hist: torch.Tensor, low_bit: int, tensors: list[torch.Tensor], names: Sequence[str] | None) -> None:
    first_nan_bin = (ops.INF_KEY >> low_bit) + 1  # NaN is canonicalised to 0x7FFFFFFF, above +Inf's bin
    if int(hist[:, first_nan_bin:].sum().item()) > 0:
        raise_nan_error(tensors, names)


def raise_nan_error(tensors: list[torch.Tensor], names: Sequence[str] | None) -> None:
    """Raise the UsageError of a NaN gradient, naming the tensors (of this process) that hold NaN."""
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
# grads -> named tensors


def named_tensors(grads: GradsLike) -> tuple[list[str], list[torch.Tensor]]:
    """(names, tensors) of a mapping, `named_parameters()` (their `.grad`) or a list (named "0", "1", ...).

    Checks what every select needs: dense float32 / bfloat16 / float16 tensors, unique names, one device.
    """
    if isinstance(grads, torch.Tensor):
        raise TypeError("grads must be a mapping name -> tensor or an iterable of tensors, not a single tensor")
    fast = _plain_named_tensors(grads)
    if fast is not None:
        return fast
    items = list(grads.items()) if isinstance(grads, Mapping) else list(grads)
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    for i, item in enumerate(items):
        name, value = _named_gradient(i, item)
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


def _plain_named_tensors(grads) -> tuple[list, list[torch.Tensor]] | None:
    """named_tensors of the usual inputs (plain tensors or parameters with their .grad, valid, one device) with one
    C-level pass per property instead of Python per tensor; None sends anything else down the checked path (which
    also words every error)."""
    if isinstance(grads, Mapping):
        names, values = list(grads.keys()), list(grads.values())
    elif isinstance(grads, (list, tuple)) and grads:
        values, names = list(grads), None
        if type(values[0]) is tuple:  # (name, tensor) pairs
            if set(map(len, values)) != {2}:
                return None
            names, values = map(list, zip(*values))
    else:
        return None
    kinds = set(map(type, values))
    if kinds == {torch.nn.Parameter}:  # model.named_parameters() after backward: rank the gradients
        values = list(map(_GRAD, values))
        kinds = set(map(type, values))
    if kinds != {torch.Tensor}:
        return None
    if (
        not set(map(_DTYPE, values)) <= _KEY_DTYPES
        or set(map(_LAYOUT, values)) != {torch.strided}
        or len(set(map(_DEVICE, values))) != 1
    ):
        return None
    names = list(map(str, range(len(values)))) if names is None else names
    if len(set(names)) != len(names):
        return None
    if any(map(attrgetter("requires_grad"), values)):
        values = [v.detach() if v.requires_grad else v for v in values]
    return names, values


def _named_gradient(i: int, item) -> tuple[str, torch.Tensor]:
    """One entry of `grads` as (name, gradient tensor), checked."""
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
    return name, value


def has_dtensor(grads: GradsLike) -> bool:
    """Whether `grads` (a mapping or a list, of tensors, pairs or parameters) holds a DTensor (FSDP2)."""
    from salun_ext.distributed.shards import is_dtensor

    if sys.modules.get("torch.distributed.tensor") is None:  # without it no DTensor can exist (is_dtensor)
        return False
    if isinstance(grads, Mapping):
        values = list(grads.values())
    elif isinstance(grads, (list, tuple)):
        values = [v[1] if isinstance(v, tuple) and len(v) == 2 else v for v in grads]
    else:
        return False
    return any(is_dtensor(v.grad if isinstance(v, torch.nn.Parameter) else v) for v in values)


def total_words(tensors: list[torch.Tensor]) -> int:
    """Mask words of a list (`ops.word_offsets`)."""
    return ops.word_offsets([t.numel() for t in tensors])[1]
