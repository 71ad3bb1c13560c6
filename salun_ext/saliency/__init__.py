"""Exact global saliency masks: gradients -> the top-k |g| entries over a whole list of tensors.

    _threshold.py   Threshold, find_thresholds (radix-select histogram passes), ratio_to_k, the NaN policy
    local.py        saliency_masks: one process (histogram or one-pass window select)
    distributed.py  the same select over a process group (histograms all-reduced; DTensor shards, DDP replicas)
    gradients.py    compute_saliency: accumulate a loss's gradients -> share them over ranks -> rank them
"""

from salun_ext.saliency.local import (
    HistogramReducer,
    Threshold,
    compute_saliency,
    find_thresholds,
    ratio_to_k,
    saliency_masks,
    select_parameters,
)

__all__ = [
    "HistogramReducer",
    "Threshold",
    "compute_saliency",
    "find_thresholds",
    "ratio_to_k",
    "saliency_masks",
    "select_parameters",
]
