"""Masked optimizers: non-salient weights (and their optimizer state) never move.

MaskedSGD, MaskedAdam, MaskedAdamW   torch.optim twins with mask=, unmasked=, mode="strict"|"compat"
masked(optimizer, mask)              strict semantics for any torch optimizer (save/restore hooks)
"""

from salun_ext.optim.adam import MaskedAdam, MaskedAdamW
from salun_ext.optim.sgd import MaskedSGD
from salun_ext.optim.wrap import masked, unmask

__all__ = ["MaskedAdam", "MaskedAdamW", "MaskedSGD", "masked", "unmask"]
