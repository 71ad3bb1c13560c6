"""Plain-PyTorch kernels of every op: the readable specification and the fallback.

Registered as the CompositeExplicitAutograd ("default") kernels of the `salun_ext` ops, so every device without
a compiled kernel (or a process with SALUN_EXT_FORCE_REFERENCE=1) runs these. The compiled kernels must equal
them bit for bit; tests/ call both and compare. Written for clarity, not speed: per tensor they allocate
int64 keys (8 bytes per element of that tensor), never a concatenation of the whole list.
"""

from __future__ import annotations

import torch

from salun_ext import _mask_layout

INF_KEY = 0x7F800000
NAN_KEY = 0x7FFFFFFF  # NaN is canonicalised above +Inf unless treated as zero
KEY_BITS = 31
KEY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_grads(grads: list[torch.Tensor]) -> None:
    """The same validation as the C++ kernels (csrc/include/salun_ext/tensor_list.h), with the same messages."""
    if len(grads) == 0:
        raise RuntimeError("salun_ext: argument 'grads' is an empty list; expected at least one tensor")
    device = grads[0].device
    for i, g in enumerate(grads):
        if g.dtype not in KEY_DTYPES:
            raise RuntimeError(f"salun_ext: grads[{i}] has dtype {g.dtype}, expected float32, bfloat16 or float16")
        if g.device != device:
            raise RuntimeError(
                f"salun_ext: grads[{i}] is on {g.device}, expected {device} "
                "(all tensors of one list must share a device)"
            )
        if not g.is_contiguous():
            raise RuntimeError(f"salun_ext: grads[{i}] must be contiguous")


def keys(t: torch.Tensor, nan_as_zero: bool) -> torch.Tensor:
    """Flat int64 keys of |t| in row-major order: the fp32 bit pattern with the sign cleared.

    bf16 and fp16 convert to fp32 exactly, so their keys share the fp32 key space. NaN becomes NAN_KEY (or 0).
    """
    bits = t.reshape(-1).to(torch.float32).view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    nan = bits > INF_KEY
    return torch.where(nan, torch.zeros_like(bits) if nan_as_zero else torch.full_like(bits, NAN_KEY), bits)


def _check_digit(low_bit: int, num_bits: int, prefixes: list[int]) -> None:
    if not 1 <= num_bits <= 16:
        raise RuntimeError(f"salun_ext: argument 'num_bits': expected 1..16, got {num_bits}")
    if low_bit < 0 or low_bit + num_bits > KEY_BITS:
        raise RuntimeError(
            "salun_ext: argument 'low_bit': expected 0 <= low_bit and low_bit + num_bits <= 31, "
            f"got low_bit={low_bit} num_bits={num_bits}"
        )
    if len(prefixes) == 0:
        raise RuntimeError("salun_ext: argument 'prefixes': expected at least one prefix (use [0] for the top digit)")
    limit = 1 << (KEY_BITS - low_bit - num_bits)
    for r, p in enumerate(prefixes):
        if not 0 <= p < limit:
            raise RuntimeError(
                f"salun_ext: argument 'prefixes': prefixes[{r}] = {p} is outside [0, {limit}) "
                f"for low_bit + num_bits = {low_bit + num_bits}"
            )
        if r > 0 and p <= prefixes[r - 1]:
            raise RuntimeError(
                f"salun_ext: argument 'prefixes': must be strictly increasing, got {prefixes[r - 1]} before {p}"
            )


def key_histogram(
    grads: list[torch.Tensor], low_bit: int, num_bits: int, prefixes: list[int], nan_as_zero: bool
) -> torch.Tensor:
    check_grads(grads)
    _check_digit(low_bit, num_bits, prefixes)
    bins = 1 << num_bits
    out = torch.zeros((len(prefixes), bins), dtype=torch.int64, device=grads[0].device)
    for g in grads:
        k = keys(g, nan_as_zero)
        high = k >> (low_bit + num_bits)
        digit = (k >> low_bit) & (bins - 1)
        for row, prefix in enumerate(prefixes):
            out[row] += torch.bincount(digit[high == prefix], minlength=bins)
    return out


def mask_words(grads: list[torch.Tensor], threshold_key: int, tie_limit: int, nan_as_zero: bool) -> torch.Tensor:
    check_grads(grads)
    if not 0 <= threshold_key <= NAN_KEY:
        raise RuntimeError(
            f"salun_ext: argument 'threshold_key': expected a 31-bit key in [0, 0x7FFFFFFF], got {threshold_key}"
        )
    offsets, total = _mask_layout.word_offsets([g.numel() for g in grads])
    out = torch.zeros(total, dtype=torch.int32, device=grads[0].device)
    ties_seen = 0  # ties at the threshold met so far in global index order
    for g, offset in zip(grads, offsets):
        k = keys(g, nan_as_zero)
        take = k > threshold_key
        tie = k == threshold_key
        if tie_limit < 0:
            take |= tie
        elif tie_limit > 0:
            rank = torch.cumsum(tie.to(torch.int64), 0) - 1 + ties_seen
            take |= tie & (rank < tie_limit)
            ties_seen += int(tie.sum().item())
        words = _mask_layout.pack_bits(take)
        out[offset : offset + words.numel()] = words
    return out


def register(library: torch.library.Library) -> None:
    """Register these as the CompositeExplicitAutograd kernels (the fallback for every device)."""
    library.impl("key_histogram", key_histogram, "CompositeExplicitAutograd")
    library.impl("mask_words", mask_words, "CompositeExplicitAutograd")
