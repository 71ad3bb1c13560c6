"""Operator schemas and fake (meta) kernels of the `salun_ext` torch.library namespace: one place for every op.

Each op has, in the obvious places:
  * its schema and fake kernel here,
  * a plain-PyTorch kernel in `_reference.py`, registered as the CompositeExplicitAutograd ("default") kernel:
    the readable spec, and the fallback on devices without a compiled kernel,
  * C++ CPU and CUDA kernels in `csrc/cpu/` and `csrc/cuda/`, registered from C++ with TORCH_LIBRARY_IMPL,
  * tests in `tests/` (kernel == reference, opcheck) and a benchmark in `benchmarks/`.
"""

from __future__ import annotations

import torch

from salun_ext import _mask_layout

LIBRARY = torch.library.Library("salun_ext", "DEF")

SCHEMAS: dict[str, str] = {
    # Histogram of one key digit, (key >> low_bit) & (2**num_bits - 1), over the elements whose higher digits
    # (key >> (low_bit + num_bits)) equal prefixes[r]; one int64 row per prefix. Keys: see csrc/include/key.h.
    "key_histogram": (
        "key_histogram(Tensor[] grads, int low_bit, int num_bits, int[] prefixes, bool nan_as_zero) -> Tensor"
    ),
    # Bit-packed mask words (layout: _mask_layout.py): key > threshold_key, plus ties at the threshold: all of
    # them when tie_limit < 0, else the first tie_limit in global index order (tensor order, then flat index).
    "mask_words": "mask_words(Tensor[] grads, int threshold_key, int tie_limit, bool nan_as_zero) -> Tensor",
}

for _schema in SCHEMAS.values():
    LIBRARY.define(_schema)


@torch.library.register_fake("salun_ext::key_histogram")
def _key_histogram_fake(grads, low_bit, num_bits, prefixes, nan_as_zero):
    torch._check(len(grads) > 0, lambda: "salun_ext: argument 'grads' is an empty list")
    return grads[0].new_empty((len(prefixes), 1 << num_bits), dtype=torch.int64)


@torch.library.register_fake("salun_ext::mask_words")
def _mask_words_fake(grads, threshold_key, tie_limit, nan_as_zero):
    torch._check(len(grads) > 0, lambda: "salun_ext: argument 'grads' is an empty list")
    total = sum(_mask_layout.segment_words(g.numel()) for g in grads)
    return grads[0].new_empty((total,), dtype=torch.int32)


def op_names() -> list[str]:
    return [f"salun_ext::{name}" for name in SCHEMAS]
