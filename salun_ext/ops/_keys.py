"""Python twin of csrc/include/salun_ext/key.h: the 31-bit magnitude key every select ranks (keep the two in step).

The key of a value is its fp32 bit pattern with the sign cleared, so keys order like |value|. bf16 and fp16
convert to fp32 exactly and share the fp32 key space. NaN is canonicalised to NAN_KEY, above +Inf's key, unless
it is ranked as zero.
"""

from __future__ import annotations

import torch

INF_KEY = 0x7F800000
NAN_KEY = 0x7FFFFFFF  # NaN is canonicalised above +Inf unless treated as zero
KEY_BITS = 31
KEY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def keys(t: torch.Tensor, nan_as_zero: bool) -> torch.Tensor:
    """Flat int64 keys of |t| in row-major order: the fp32 bit pattern with the sign cleared.

    bf16 and fp16 convert to fp32 exactly, so their keys share the fp32 key space. NaN becomes NAN_KEY (or 0).
    """
    bits = t.reshape(-1).to(torch.float32).view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    nan = bits > INF_KEY
    return torch.where(nan, torch.zeros_like(bits) if nan_as_zero else torch.full_like(bits, NAN_KEY), bits)
