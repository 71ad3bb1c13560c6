"""SSD: selective synaptic dampening (Foster et al., AAAI 2024). No training.

Importance of a weight on a dataset = mean over minibatches of the squared minibatch gradient of the mean
cross-entropy (a diagonal Fisher estimate), model in eval mode. With I_f on the forget set and I_D on the whole
training set, every weight with I_f > alpha * I_D is scaled by min(lambda * I_D / I_f, 1).
Defaults: the SSD paper's ResNet-18 / CIFAR values, lambda 1, alpha 10.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from salun_ext.classification.methods.base import RunOptions, UnlearnData, UnlearnMethod
from salun_ext.utils.errors import UsageError


@dataclasses.dataclass
class SSDConfig:
    dampening: float = 1.0  # lambda
    selection: float = 10.0  # alpha
    batch_size: int | None = None


def fisher_importance(model: nn.Module, batches, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Mean over batches of the squared gradient of the mean cross-entropy, per parameter."""
    totals = [torch.zeros_like(p) for p in params]
    count = 0
    for x, y in batches:
        for p in params:
            p.grad = None
        nn.functional.cross_entropy(model(x), y).backward()
        for total, p in zip(totals, params):
            if p.grad is not None:
                total.add_(p.grad.square())
        count += 1
    for p in params:
        p.grad = None
    if count == 0:
        raise UsageError("SSD: no batches to estimate the importances from")
    return [t.div_(count) for t in totals]


class SSD(UnlearnMethod):
    """SSD: dampen the weights that matter much more to the forget set than to the whole training set."""

    name = "ssd"
    label = "SSD"
    Config = SSDConfig
    in_paper = False

    def unlearn(self, model, data: UnlearnData, options: RunOptions, mask) -> dict[str, Any]:
        cfg: SSDConfig = self.config
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        model.eval()
        forget = self.loader(data, "forget", options, "ssd", shuffle=False, augment=False)
        full = self.loader(data, "all", options, "ssd", shuffle=False, augment=False)
        imp_forget = fisher_importance(model, forget, params)
        imp_full = fisher_importance(model, full, params)
        dampened = 0
        with torch.no_grad():
            for (name, p), i_f, i_d in zip(named, imp_forget, imp_full):
                selected = i_f > cfg.selection * i_d
                if mask is not None and name in mask:
                    selected &= mask.dense(name).to(selected.device)
                factor = (cfg.dampening * i_d / i_f.clamp_min(torch.finfo(i_f.dtype).tiny)).clamp_max(1.0)
                p.copy_(torch.where(selected, p * factor, p))
                dampened += int(selected.sum())
        return {"dampened": dampened}
