"""What a PyTorch user can do today without our kernels: the baselines every saliency benchmark compares with.

  upstream_argsort  the paper code's method: concatenate |g|, argsort twice (ranks), int64 masks per tensor
  cat_topk          concatenate |g|, torch.topk(k).values.min() as threshold, bool masks (ties: all kept)
  cat_partition     concatenate |g| (on the host), numpy's introselect (np.partition) for the k-th largest,
                    then one compare per tensor (ties: all kept): the classic CPU selection
  radix_bincount    no concatenation: two 16-bit torch.bincount passes over int32 views of |g|, then masks
Each returns one mask per tensor. Our op is `salun_ext.saliency_masks`.
"""

from __future__ import annotations

import torch


def upstream_argsort(grads: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    flat = torch.cat([g.abs().reshape(-1) for g in grads])
    order = torch.argsort(flat, descending=True)
    ranks = torch.argsort(order)
    masks, start = [], 0
    for g in grads:
        n = g.numel()
        masks.append((ranks[start : start + n] < k).to(torch.int64).view(g.shape))
        start += n
    return masks


def cat_topk(grads: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    flat = torch.cat([g.abs().reshape(-1) for g in grads])
    threshold = torch.topk(flat, k, sorted=False).values.min()
    del flat
    return [g.abs() >= threshold for g in grads]


def cat_partition(grads: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    import numpy as np

    flat = torch.cat([g.abs().reshape(-1).float() for g in grads]).cpu().numpy()
    n = flat.size
    threshold = float("inf") if k == 0 else float(np.partition(flat, n - k)[n - k])
    del flat
    return [g.abs() >= threshold for g in grads]


def radix_bincount(grads: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    keys = [(g.float().view(torch.int32) & 0x7FFFFFFF) for g in grads]
    hist = torch.zeros(1 << 16, dtype=torch.int64, device=grads[0].device)
    for key in keys:
        hist += torch.bincount((key >> 15).reshape(-1), minlength=1 << 16)
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, k).item())
    high = (1 << 16) - 1 - j
    above = int(from_top[j].item() - hist[high].item())
    hist2 = torch.zeros(1 << 15, dtype=torch.int64, device=grads[0].device)
    for key in keys:
        sel = key[(key >> 15) == high] & 0x7FFF
        hist2 += torch.bincount(sel.reshape(-1), minlength=1 << 15)
    from_top2 = hist2.flip(0).cumsum(0)
    low = (1 << 15) - 1 - int(torch.searchsorted(from_top2, k - above).item())
    threshold = (high << 15) | low
    return [key >= threshold for key in keys]


def ours(grads: list[torch.Tensor], k: int, ratio: float):
    import salun_ext

    return salun_ext.saliency_masks(grads, ratio)


METHODS = {
    "salun_ext": None,  # handled by the callers (needs the ratio)
    "cat_topk": cat_topk,
    "cat_partition": cat_partition,
    "radix_bincount": radix_bincount,
    "upstream_argsort": upstream_argsort,
}
