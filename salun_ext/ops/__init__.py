"""The kernel layer: one typed, keyword-only wrapper per op of the `salun_ext` torch.library namespace.

Imports nothing else of salun_ext. Every caller in the package goes through these wrappers, never through
`torch.ops.salun_ext.*` directly, so an op's arguments are named at every call site and checked in one place.

    _schemas.py      schemas + fake kernels (torch.compile / meta tensors), each schema with its contract
    _reference.py    plain-PyTorch kernels: the spec and the fallback, registered by `@reference("<op>")`
    _native.py       guarded load of the compiled C++/CUDA kernels (csrc/), with the reason when they are absent
    _keys.py         the 31-bit magnitude key (Python twin of csrc/include/salun_ext/key.h)
    _mask_layout.py  the bit-packed mask layout (Python twin of csrc/include/salun_ext/mask_layout.h)
    diagnostics.py   `salun-ext env`: versions and which devices have compiled kernels per op

Tensor lists hold fp32, bf16 or fp16 tensors, contiguous, on one device; the kernels raise RuntimeError for any
other list (the messages name the tensor), as the reference does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from salun_ext.ops import _native, _schemas
from salun_ext.ops import _reference as _reference  # registers the reference kernels
from salun_ext.ops._keys import INF_KEY, KEY_BITS, KEY_DTYPES, NAN_KEY, keys
from salun_ext.ops._mask_layout import pack_bits, popcount, segment_words, unpack_bits, word_offsets

NativeStatus = _native.NativeStatus
STATUS = _native.STATUS
op_names = _schemas.op_names
has_kernel = _native.has_kernel
Tensors = Sequence[torch.Tensor]
# The CUDA key_histogram keeps the prefixes in shared memory: at most this many per call (a caller with more splits
# them into several calls; the CPU kernel and the reference take any number).
MAX_HISTOGRAM_PREFIXES = 64

__all__ = [
    "INF_KEY",
    "KEY_BITS",
    "KEY_DTYPES",
    "MAX_HISTOGRAM_PREFIXES",
    "NAN_KEY",
    "STATUS",
    "NativeStatus",
    "has_kernel",
    "key_histogram",
    "keys",
    "mask_words",
    "masked_adam_",
    "masked_adam_compact_",
    "masked_sgd_",
    "masked_sgd_compact_",
    "op_names",
    "pack_bits",
    "popcount",
    "sample_keys",
    "segment_words",
    "unpack_bits",
    "window_select",
    "word_offsets",
]


def key_histogram(
    grads: Tensors, *, low_bit: int, num_bits: int, prefixes: Sequence[int], nan_as_zero: bool = False
) -> torch.Tensor:
    """Histogram of one key digit over the whole list: int64 [len(prefixes), 2**num_bits].

    Row r counts, for each digit value d, the elements whose key has `(key >> low_bit) & (2**num_bits - 1) == d`
    and whose higher digits `key >> (low_bit + num_bits)` equal `prefixes[r]` (strictly increasing). On CUDA at most
    MAX_HISTOGRAM_PREFIXES prefixes per call.
    """
    return torch.ops.salun_ext.key_histogram(list(grads), low_bit, num_bits, list(prefixes), nan_as_zero)


def mask_words(grads: Tensors, *, threshold_key: int, tie_limit: int, nan_as_zero: bool = False) -> torch.Tensor:
    """Bit-packed mask words of the list: key > threshold_key, plus the ties at the threshold.

    tie_limit < 0 takes every tie; otherwise the first `tie_limit` ties in global index order (tensor order, then
    flat index). Layout: `_mask_layout.py` (one 128-bit padded segment per tensor).
    """
    return torch.ops.salun_ext.mask_words(list(grads), threshold_key, tie_limit, nan_as_zero)


def sample_keys(grads: Tensors, *, num_samples: int, nan_as_zero: bool = False) -> torch.Tensor:
    """int32 keys at the global indices floor(i * N / num_samples), i < num_samples (every key when >= N)."""
    return torch.ops.salun_ext.sample_keys(list(grads), num_samples, nan_as_zero)


def window_select(
    grads: Tensors, *, lo_key: int, hi_key: int, capacity: int, nan_as_zero: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass for a bracketed threshold: (words, counts, cand_keys, cand_pos).

    words: the mask bits of key > hi_key; counts: int64 [above hi_key, in [lo_key, hi_key], NaN (unless
    nan_as_zero)]; cand_keys / cand_pos: the keys and global bit positions of the in-window elements, in
    unspecified order, the first `capacity` of them (which ones is unspecified when more fall in the window).
    """
    return torch.ops.salun_ext.window_select(list(grads), lo_key, hi_key, capacity, nan_as_zero)


def masked_sgd_(
    params: Tensors,
    grads: Tensors,
    momentum_buffers: Tensors,
    mask_words: Tensors,
    *,
    lr: float,
    lr_tensor: torch.Tensor | None = None,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """torch.optim.SGD's update (fp32 math) of the salient entries of every param, in place.

    mask_words[i]: params[i]'s bit-packed mask (an empty tensor: every entry salient). Non-salient entries of the
    params and momentum buffers keep their exact bits. momentum_buffers: [] when momentum == 0; first_step: the
    buffers are new (torch initialises them to the first gradient). found_inf != 0 skips the step; grads are
    divided by grad_scale when given (AMP); lr_tensor, when given, replaces lr.
    """
    torch.ops.salun_ext.masked_sgd_(
        list(params),
        list(grads),
        list(momentum_buffers),
        list(mask_words),
        lr,
        lr_tensor,
        momentum,
        dampening,
        weight_decay,
        nesterov,
        maximize,
        first_step,
        grad_scale,
        found_inf,
    )


def masked_adam_(
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    max_exp_avg_sqs: Tensors,
    state_steps: Tensors,
    mask_words: Tensors,
    *,
    lr: float,
    lr_tensor: torch.Tensor | None = None,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """torch.optim.Adam / AdamW's update (fp32 math) of the salient entries of every param, in place.

    state_steps: each param's step count, already incremented for this step (as torch's fused Adam);
    max_exp_avg_sqs: [] unless amsgrad. Masks, AMP and lr_tensor: as `masked_sgd_`. Non-salient entries of the
    params and of every state tensor keep their exact bits.
    """
    torch.ops.salun_ext.masked_adam_(
        list(params),
        list(grads),
        list(exp_avgs),
        list(exp_avg_sqs),
        list(max_exp_avg_sqs),
        list(state_steps),
        list(mask_words),
        lr,
        lr_tensor,
        beta1,
        beta2,
        eps,
        weight_decay,
        decoupled_weight_decay,
        amsgrad,
        maximize,
        grad_scale,
        found_inf,
    )


def masked_sgd_compact_(
    params: Tensors,
    grads: Tensors,
    momentum_buffers: Tensors,
    mask_words: Tensors,
    *,
    lr: float,
    lr_tensor: torch.Tensor | None = None,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """`masked_sgd_` with compact momentum buffers: momentum_buffers[i] is 1-D and holds only the salient entries
    of params[i], in flat element order (one per set mask bit; params[i].numel() when its mask words are empty).
    Every salient entry gets exactly the update `masked_sgd_` gives it."""
    torch.ops.salun_ext.masked_sgd_compact_(
        list(params),
        list(grads),
        list(momentum_buffers),
        list(mask_words),
        lr,
        lr_tensor,
        momentum,
        dampening,
        weight_decay,
        nesterov,
        maximize,
        first_step,
        grad_scale,
        found_inf,
    )


def masked_adam_compact_(
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    max_exp_avg_sqs: Tensors,
    state_steps: Tensors,
    mask_words: Tensors,
    *,
    lr: float,
    lr_tensor: torch.Tensor | None = None,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """`masked_adam_` with compact moments: exp_avgs[i], exp_avg_sqs[i] (and max_exp_avg_sqs[i]) are 1-D and hold
    only the salient entries of params[i], in flat element order (one per set mask bit; params[i].numel() when its
    mask words are empty). Every salient entry gets exactly the update `masked_adam_` gives it."""
    torch.ops.salun_ext.masked_adam_compact_(
        list(params),
        list(grads),
        list(exp_avgs),
        list(exp_avg_sqs),
        list(max_exp_avg_sqs),
        list(state_steps),
        list(mask_words),
        lr,
        lr_tensor,
        beta1,
        beta2,
        eps,
        weight_decay,
        decoupled_weight_decay,
        amsgrad,
        maximize,
        grad_scale,
        found_inf,
    )
