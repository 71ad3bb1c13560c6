"""salun-ext: fast, exact machine unlearning with gradient-based weight saliency (SalUn, ICLR 2024).

Public API (stable):
    saliency_masks(grads, ratios, *, exact_k=True, nan="raise") -> SaliencyMask | list[SaliencyMask]
    compute_saliency(model, loss_fn, batches, ratios=0.5, ...) -> SaliencyMask | list[SaliencyMask]
    SaliencyMask: the bit-packed mask type used everywhere (save/load, dense views, upstream format)
"""

from __future__ import annotations

from salun_ext import _native, _ops, _reference

_reference.register(_ops.LIBRARY)

from salun_ext.mask import SaliencyMask  # noqa: E402
from salun_ext.saliency import compute_saliency, saliency_masks, select_parameters  # noqa: E402

__version__ = "0.1.0"
native = _native.STATUS

__all__ = [
    "SaliencyMask",
    "__version__",
    "compute_saliency",
    "native",
    "saliency_masks",
    "select_parameters",
]
