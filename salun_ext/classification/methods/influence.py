"""IU: influence unlearning with a WoodFisher inverse-Hessian approximation (Izzo et al.; Jia et al. 2023).

One Newton-like step theta += alpha * H^-1 (g_forget - g_retain), no training. As in the paper code:
    g_forget = (sum of the forget gradients) / (n_f + n_r)
    g_retain = (sum of the retain gradients) * n_f / ((n_f + n_r) n_r)
    H^-1 v by the reference's rank-one recursion over `num_samples` per-sample retain gradients g (model in eval mode):
        k = v, o = g_1;  for each next g:  t = o.g;  k -= (k.g / (N + t)) o;  o -= (t / (N + t)) o
with N = num_samples (the recursion is the paper code's approximation, kept for comparable numbers). Per-sample
gradients come from torch.func (vmap over grad), `chunk` samples at a time, instead of a loop at batch size 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from salun_ext.classification.methods.base import RunOptions, UnlearnData, UnlearnMethod
from salun_ext.utils.errors import UsageError


@dataclasses.dataclass
class IUConfig:
    """alpha: the step size (the paper code's default 0.2; its run scripts use up to 2): dataset-dependent, tune it."""

    alpha: float = 0.2
    num_samples: int = 1000  # per-sample retain gradients in the WoodFisher recursion
    batch_size: int | None = None  # for the summed gradients (None: UnlearnData.batch_size)
    chunk: int = 32  # per-sample gradients computed together


def _flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def summed_gradient(model: nn.Module, batches, params: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Flat gradient of the summed cross-entropy over all batches, and the sample count."""
    for p in params:
        p.grad = None
    count = 0
    for x, y in batches:
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        count += y.numel()
    grad = _flat_grad(params)
    for p in params:
        p.grad = None
    return grad, count


def per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, P) flat per-sample gradients of the cross-entropy (model in eval mode: BN uses running statistics)."""
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_of(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(loss_of), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([grads[n].reshape(x.shape[0], -1) for n in names], dim=1)


@torch.no_grad()
def woodfisher_inverse_product(v: torch.Tensor, sample_grads, damping: float) -> torch.Tensor:
    """The paper code's WoodFisher recursion applied to v (see the module docstring)."""
    k = v.clone()
    o = None
    for g in sample_grads:
        if o is None:
            o = g.clone()
            continue
        t = torch.dot(o, g)
        k -= (torch.dot(k, g) / (damping + t)) * o
        o -= (t / (damping + t)) * o
    return k


class InfluenceUnlearning(UnlearnMethod):
    """IU (WoodFisher): one influence-function step away from the forget set. No training loop."""

    name = "iu"
    label = "IU"
    Config = IUConfig

    def unlearn(self, model, data: UnlearnData, options: RunOptions, mask) -> dict[str, Any]:
        cfg: IUConfig = self.config
        if cfg.num_samples < 1 or cfg.chunk < 1:
            raise UsageError(f"num_samples and chunk must be >= 1, got {cfg.num_samples}, {cfg.chunk}")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        model.eval()
        forget = self.loader(data, "forget", options, "iu", shuffle=False, augment=False)
        retain = self.loader(data, "retain", options, "iu", shuffle=False, augment=False)
        g_forget, n_f = summed_gradient(model, forget, params)
        g_retain, n_r = summed_gradient(model, retain, params)
        v = g_forget / (n_f + n_r) - g_retain * (n_f / ((n_f + n_r) * n_r))

        n = min(cfg.num_samples, len(data.retain))

        def sample_grads():
            for start in range(0, n, cfg.chunk):
                stop = min(n, start + cfg.chunk)
                x = data.retain.images[start:stop].float().div_(255.0)
                yield from per_sample_gradients(model, x, data.retain.labels[start:stop])

        k = woodfisher_inverse_product(v, sample_grads(), damping=float(cfg.num_samples))
        apply_flat_update(named, cfg.alpha * k, mask)
        return {"update_norm": float(cfg.alpha * k.norm()), "samples": n}


@torch.no_grad()
def apply_flat_update(named: list[tuple[str, torch.Tensor]], delta: torch.Tensor, mask=None) -> None:
    """theta += delta (a flat vector over `named`), restricted to the mask's salient entries when given."""
    offset = 0
    for name, p in named:
        step = delta[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if mask is not None:
            if name not in mask:
                continue
            step = step * mask.dense(name).to(step.dtype)
        p.add_(step)
