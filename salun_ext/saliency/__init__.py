"""Exact global saliency masks: gradients -> the top-k |g| entries over a whole list of tensors.

    _threshold.py   Threshold, find_thresholds (radix-select histogram passes), ratio_to_k, the NaN policy, grads
                    -> named tensors
    local.py        saliency_masks: one process (histogram or one-pass window select); hands a process group or
                    DTensor gradients to distributed.py
    distributed.py  the same select over a process group (histograms all-reduced; DTensor shards, DDP replicas)
    gradients.py    select_parameters, compute_saliency: accumulate a loss's gradients -> share them over ranks
                    -> rank them

Imports inside the package go one way: _threshold <- distributed <- local (lazily) <- gradients. The window
select's tuning constants (WINDOW_*) live in `local` and are read from there at call time (tests patch them).
"""

from salun_ext.saliency._threshold import DIGIT_WIDTHS, HistogramReducer, Threshold, find_thresholds, ratio_to_k
from salun_ext.saliency.gradients import compute_saliency, select_parameters
from salun_ext.saliency.local import saliency_masks

__all__ = [
    "DIGIT_WIDTHS",
    "HistogramReducer",
    "Threshold",
    "compute_saliency",
    "find_thresholds",
    "ratio_to_k",
    "saliency_masks",
    "select_parameters",
]
