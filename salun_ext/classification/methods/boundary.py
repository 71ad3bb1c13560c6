"""Boundary unlearning (Chen et al. 2023): BE (boundary expanding) and BS (boundary shrinking).

Both fine-tune on the forget set only. Default lr 1e-5 for both: the paper code's generic unlearning lr (0.01)
wrecks the model in 10 epochs on the forget set alone, and the authors' run scripts use 1e-6..1e-5; tune it on
tuning seeds for other datasets (see the presets).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from salun_ext.classification.methods.base import (
    LoaderTask,
    RunOptions,
    TrainConfig,
    UnlearnData,
    UnlearnMethod,
    frozen_copy,
)
from salun_ext.models import last_linear, replace_module
from salun_ext.utils.errors import UsageError


@dataclasses.dataclass
class BoundaryConfig(TrainConfig):
    lr: float = 1e-5


class _ShadowClassTask(LoaderTask):
    """Every forget sample is labelled with the extra (shadow) class."""

    def __init__(self, source, shadow_class: int) -> None:
        super().__init__(source)
        self.shadow_class = shadow_class

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x = batch[0]
        target = torch.full((x.shape[0],), self.shadow_class, dtype=torch.long, device=x.device)
        return nn.functional.cross_entropy(model(x), target)


@dataclasses.dataclass
class BoundaryExpandingConfig(BoundaryConfig):
    """BE. keep_shadow: keep the shadow neuron after training (the paper code's evaluated (C+1)-way model, where a
    shadow-class prediction counts as an error); False drops it (the original architecture)."""

    keep_shadow: bool = False


class BoundaryExpanding(UnlearnMethod):
    """BE: add a shadow output neuron, train the forget set toward it, then remove it (unless keep_shadow).

    The paper code never removes the extra neuron (its evaluated model has C+1 outputs); by default it is dropped
    after training, so the unlearned model has the original architecture and predicts among the real classes.
    """

    name = "be"
    label = "BE"
    Config = BoundaryExpandingConfig

    def unlearn(self, model, data: UnlearnData, options: RunOptions, mask) -> dict[str, Any]:
        if mask is not None:
            raise UsageError("BE changes the classification head's shape; it does not take a saliency mask")
        head_name, head = last_linear(model)
        if head.out_features != data.num_classes:
            raise UsageError(f"BE: the last Linear has {head.out_features} outputs, expected {data.num_classes}")
        expanded = nn.Linear(head.in_features, head.out_features + 1, bias=head.bias is not None)
        expanded.to(device=head.weight.device, dtype=head.weight.dtype)
        with torch.no_grad():
            expanded.weight[:-1] = head.weight
            if head.bias is not None:
                expanded.bias[:-1] = head.bias
        replace_module(model, head_name, expanded)
        task = _ShadowClassTask(self.loader(data, "forget", options, "be.forget"), data.num_classes)
        try:
            result = self.fit(model, task, options)
        except BaseException:
            self._drop_shadow(model, head_name, head, expanded)
            raise
        if self.config.keep_shadow:
            return {"history": result.history, "shadow_class": data.num_classes}
        self._drop_shadow(model, head_name, head, expanded)
        return {"history": result.history}

    @staticmethod
    def _drop_shadow(model, head_name: str, head: nn.Linear, expanded: nn.Linear) -> None:
        """Put back a head of the original shape holding the trained rows of the real classes."""
        shrunk = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        shrunk.to(device=expanded.weight.device, dtype=expanded.weight.dtype)
        with torch.no_grad():
            shrunk.weight.copy_(expanded.weight[:-1])
            if head.bias is not None:
                shrunk.bias.copy_(expanded.bias[:-1])
        replace_module(model, head_name, shrunk)


def fgsm_nearest_labels(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bound: float = 0.1) -> torch.Tensor:
    """BS's labels: the frozen model's prediction on an FGSM step of size `bound` (8-bit quantised, in [0, 1])."""
    x_adv = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = nn.functional.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
    with torch.no_grad():
        x_adv = torch.round(torch.clamp(x + bound * grad.sign(), 0.0, 1.0) * 255) / 255
        return model(x_adv).argmax(dim=1)


@dataclasses.dataclass
class BoundaryShrinkConfig(BoundaryConfig):
    bound: float = 0.1  # FGSM step, fixed in the paper


class _NearestLabelTask(LoaderTask):
    def __init__(self, source, frozen: nn.Module, bound: float) -> None:
        super().__init__(source)
        self.frozen, self.bound = frozen, bound

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch[0], batch[1]
        target = fgsm_nearest_labels(self.frozen, x, y, self.bound)
        return nn.functional.cross_entropy(model(x), target)


class BoundaryShrink(UnlearnMethod):
    """BS: relabel each forget sample with its nearest wrong class (found by FGSM on a frozen copy), fine-tune."""

    name = "bs"
    label = "BS"
    Config = BoundaryShrinkConfig

    def unlearn(self, model, data: UnlearnData, options: RunOptions, mask) -> dict[str, Any]:
        task = _NearestLabelTask(
            self.loader(data, "forget", options, "be.forget"), frozen_copy(model), self.config.bound
        )
        return {"history": self.fit(model, task, options, mask=mask).history}
