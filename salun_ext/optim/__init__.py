"""Masked optimizers: non-salient weights (and their optimizer state) never move.

MaskedSGD, MaskedAdam, MaskedAdamW   torch.optim twins with mask=, unmasked=, mode="strict"|"compat",
                                     state="dense"|"compact" (state of the salient entries only)
compact_to_dense_state, dense_to_compact_state   convert a state_dict between the two layouts
masked(optimizer, mask)              strict semantics for any torch optimizer (save/restore hooks)
"""

from salun_ext.optim._compact import compact_to_dense_state, dense_to_compact_state
from salun_ext.optim.adam import MaskedAdam, MaskedAdamW
from salun_ext.optim.sgd import MaskedSGD
from salun_ext.optim.wrap import masked, unmask

__all__ = [
    "MaskedAdam",
    "MaskedAdamW",
    "MaskedSGD",
    "compact_to_dense_state",
    "dense_to_compact_state",
    "masked",
    "unmask",
]
