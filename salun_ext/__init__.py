"""salun-ext: fast, exact machine unlearning with gradient-based weight saliency (SalUn, ICLR 2024).

Public API (stable):
    saliency_masks(grads, ratios, *, exact_k=True, nan="raise") -> SaliencyMask | list[SaliencyMask]
    compute_saliency(model, loss_fn, batches, ratios=0.5, ...) -> SaliencyMask | list[SaliencyMask]
    SaliencyMask: the bit-packed mask type used everywhere (save/load, dense views, upstream format)
    salun_ext.optim: MaskedSGD, MaskedAdam, MaskedAdamW, masked(optimizer, mask)

The package is layered (docs/development.md): ops -> mask -> distributed -> saliency / optim -> data / models ->
train -> classification / diffusion / lm -> cli; a layer imports only the layers below it.
"""

from __future__ import annotations

from salun_ext import ops
from salun_ext.mask import SaliencyMask
from salun_ext.saliency import compute_saliency, saliency_masks, select_parameters
from salun_ext.utils.version import __version__

native = ops.STATUS

__all__ = [
    "SaliencyMask",
    "__version__",
    "compute_saliency",
    "native",
    "saliency_masks",
    "select_parameters",
]
