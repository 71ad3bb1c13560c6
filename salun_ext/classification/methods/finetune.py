"""Training on the retain set: original training, Retrain (the gold standard), FT and l1-sparse."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from salun_ext.classification.methods.base import (
    CrossEntropyTask,
    RunOptions,
    TrainConfig,
    UnlearnData,
    UnlearnMethod,
)
from salun_ext.data import Augment, ImageDataset
from salun_ext.models import reinitialize
from salun_ext.train.classifier import train_classifier
from salun_ext.utils import UsageError, stream_seed


@dataclasses.dataclass
class OriginalTrainConfig(TrainConfig):
    """The paper's original model: 182 epochs, SGD lr 0.1, x0.1 at epochs 91 and 136 (half, three quarters)."""

    epochs: int = 182
    lr: float = 0.1
    schedule: str = "multistep"
    milestones: tuple[float, ...] = (0.5, 0.75)
    batch_size: int | None = 256


def train_original_model(
    model: nn.Module,
    dataset: ImageDataset,
    config: TrainConfig | None = None,
    options: RunOptions | None = None,
    *,
    augment: Augment | None = None,
    reinit: bool = True,
) -> dict[str, Any]:
    """Train `model` (re-initialised from options.seed unless reinit=False) with cross-entropy on `dataset`.

    The original model of every experiment; Retrain runs the same recipe on the retain set.
    """
    config = config or OriginalTrainConfig()
    options = options or RunOptions()
    result = train_classifier(
        model,
        dataset,
        config.recipe(),
        options,
        batch_size=config.batch_size or 256,
        augment=augment,
        reinit=reinit,
        desc="Original",
    )
    return {"epochs": result.epochs, "history": result.history, "seconds": result.seconds}


@dataclasses.dataclass
class RetrainConfig(OriginalTrainConfig):
    """Retrain: the original model's recipe on the retain set, for the paper's 160 epochs."""

    epochs: int = 160
    batch_size: int | None = None  # UnlearnData.batch_size


class Retrain(UnlearnMethod):
    """Exact unlearning: discard the weights, train from a fresh initialisation on the retain set only."""

    name = "retrain"
    label = "Retrain"
    Config = RetrainConfig
    trains_from_scratch = True

    def unlearn(self, model, data: UnlearnData, options: RunOptions, mask) -> dict[str, Any]:
        reinitialize(model, stream_seed(options.seed, "init"))
        task = CrossEntropyTask(self.loader(data, "retain", options, "retain"))
        result = self.fit(model, task, options, mask=mask)
        return {"history": result.history}


class FineTune(UnlearnMethod):
    """FT: fine-tune on the retain set (catastrophic forgetting of the forget set). Paper: lr 0.01, 10 epochs."""

    name = "ft"
    label = "FT"

    def unlearn(self, model, data: UnlearnData, options: RunOptions, mask) -> dict[str, Any]:
        task = CrossEntropyTask(self.loader(data, "retain", options, "retain"))
        return {"history": self.fit(model, task, options, mask=mask).history}


@dataclasses.dataclass
class L1SparseConfig(TrainConfig):
    """l1-sparse (Jia et al. 2023): FT + alpha_e ||theta||_1, alpha_e decaying linearly to 0.

    alpha 1e-4: the value the authors' run scripts pass (the code has no default of its own).
    """

    alpha: float = 1e-4
    no_l1_epochs: int = 0  # final epochs without the penalty (undefined in the paper code: 0)


class _L1Task(CrossEntropyTask):
    def __init__(self, source, params: list[torch.Tensor], alpha: float, epochs: int, no_l1_epochs: int) -> None:
        super().__init__(source)
        self.params, self.alpha, self.epochs, self.no_l1_epochs = params, alpha, epochs, no_l1_epochs

    def current_alpha(self) -> float:
        active = self.epochs - self.no_l1_epochs
        return self.alpha * (1 - self.epoch / active) if self.epoch < active else 0.0

    def loss(self, model, batch):
        loss = super().loss(model, batch)
        alpha = self.current_alpha()
        if alpha == 0.0:
            return loss
        return loss + alpha * sum(p.abs().sum() for p in self.params)


class L1Sparse(UnlearnMethod):
    """l1-sparse: FT with a decaying l1 penalty over all parameters (sparsity-aware unlearning)."""

    name = "l1_sparse"
    label = "l1-sparse"
    Config = L1SparseConfig

    def unlearn(self, model, data: UnlearnData, options: RunOptions, mask) -> dict[str, Any]:
        cfg: L1SparseConfig = self.config
        if not 0 <= cfg.no_l1_epochs < cfg.epochs:
            raise UsageError(f"no_l1_epochs must be in [0, epochs={cfg.epochs}), got {cfg.no_l1_epochs}")
        params = [p for p in model.parameters() if p.requires_grad]
        task = _L1Task(self.loader(data, "retain", options, "retain"), params, cfg.alpha, cfg.epochs, cfg.no_l1_epochs)
        return {"history": self.fit(model, task, options, mask=mask).history}
