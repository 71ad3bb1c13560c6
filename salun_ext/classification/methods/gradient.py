"""Gradient ascent on the forget loss: GA (forget set only) and NegGrad+ (retain descent + forget ascent)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from salun_ext.classification.methods.base import CrossEntropyTask, RunOptions, TrainConfig, UnlearnData, UnlearnMethod
from salun_ext.utils.errors import UsageError


@dataclasses.dataclass
class GAConfig(TrainConfig):
    """GA: the paper code's lr 1e-4, 5 epochs. Very lr-sensitive: sweep lr on tuning seeds (unlearn.sweep)."""

    epochs: int = 5
    lr: float = 1e-4


class GradientAscent(UnlearnMethod):
    """GA: maximise the cross-entropy of the forget set."""

    name = "ga"
    label = "GA"
    Config = GAConfig

    def unlearn(self, model, data: UnlearnData, options: RunOptions, mask) -> dict[str, Any]:
        task = CrossEntropyTask(self.loader(data, "forget", options, "ga.forget"), sign=-1.0)
        return {"history": self.fit(model, task, options, mask=mask).history}


@dataclasses.dataclass
class NegGradPlusConfig(TrainConfig):
    """NegGrad+ (Kurmanji et al. 2023): L = alpha CE(retain) - (1 - alpha) CE(forget); alpha 0.95, lr 0.01, 10 ep."""

    alpha: float = 0.95


class _NegGradTask:
    """One retain batch with the next forget batch (the forget set cycles) per step."""

    def __init__(self, retain, forget, alpha: float) -> None:
        self.retain, self.forget, self.alpha = retain, forget, alpha

    def num_batches(self, epoch: int) -> int:
        return len(self.retain)

    def batches(self, epoch: int) -> Iterator:
        forget_pass = 0
        forget_iter = self.forget.epoch(epoch * 1_000_003)
        for xr, yr in self.retain.epoch(epoch):
            try:
                xf, yf = next(forget_iter)
            except StopIteration:  # cycle: a fresh, differently shuffled pass over the forget set
                forget_pass += 1
                forget_iter = self.forget.epoch(epoch * 1_000_003 + forget_pass)
                xf, yf = next(forget_iter)
            yield xr, yr, xf, yf

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        xr, yr, xf, yf = batch
        ce = nn.functional.cross_entropy
        return self.alpha * ce(model(xr), yr) - (1.0 - self.alpha) * ce(model(xf), yf)


class NegGradPlus(UnlearnMethod):
    """NegGrad+: descend on the retain loss while ascending on the forget loss, in one weighted objective."""

    name = "neggrad_plus"
    label = "NegGrad+"
    Config = NegGradPlusConfig
    in_paper = False

    def unlearn(self, model, data: UnlearnData, options: RunOptions, mask) -> dict[str, Any]:
        cfg: NegGradPlusConfig = self.config
        if not 0.0 <= cfg.alpha <= 1.0:
            raise UsageError(f"alpha must be in [0, 1], got {cfg.alpha}")
        task = _NegGradTask(
            self.loader(data, "retain", options, "ga.retain"),
            self.loader(data, "forget", options, "ga.forget"),
            cfg.alpha,
        )
        return {"history": self.fit(model, task, options, mask=mask).history}
