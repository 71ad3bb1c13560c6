"""Random labelling: RL, SalUn (RL on the salient weights only) and SalUn-soft (RL + soft-thresholding).

Each forget sample gets a random label y' != y, drawn anew every epoch (the paper's equation; the paper code's
randint(0, C) can return y itself). Two orders, as in the paper code:
    "sequential" (CIFAR-10, SVHN): per epoch one pass over the relabelled forget set, then one over the retain set;
    "mixed" (CIFAR-100, TinyImageNet): forget (relabelled) and retain shuffled together.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from salun_ext.classification.methods.base import RunOptions, TrainConfig, UnlearnData, UnlearnMethod
from salun_ext.data import Batches
from salun_ext.mask import SaliencyMask
from salun_ext.saliency import compute_saliency, find_thresholds
from salun_ext.utils import UsageError, epoch_generator


def random_other_labels(labels: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random label different from each given label."""
    if num_classes < 2:
        raise UsageError("random labelling needs at least 2 classes")
    shift = torch.randint(1, num_classes, labels.shape, generator=gen).to(labels.device)
    return (labels + shift) % num_classes


@dataclasses.dataclass
class RLConfig(TrainConfig):
    """RL: the paper code's defaults (lr 0.01, 10 epochs, SGD 0.9, wd 5e-4)."""

    order: str = "sequential"  # or "mixed" (the paper code's choice for CIFAR-100 / TinyImageNet)


class _RandomLabelTask:
    """Batches of (x, y_train): forget samples relabelled y' != y, retain samples with their labels."""

    def __init__(self, data: UnlearnData, method: UnlearnMethod, options: RunOptions, order: str) -> None:
        if order not in ("sequential", "mixed"):
            raise UsageError(f"order must be 'sequential' or 'mixed', got {order!r}")
        self.order = order
        self.num_classes = data.num_classes
        self.seed = options.seed
        if order == "sequential":
            self.forget = method.loader(data, "forget", options, "rl.forget")
            self.retain = method.loader(data, "retain", options, "rl.retain")
        else:
            images = torch.cat([data.forget.images, data.retain.images])
            labels = torch.cat([data.forget.labels, data.retain.labels])
            is_forget = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
            is_forget[: len(data.forget)] = True
            batch_size = method.config.batch_size or data.batch_size
            self.mixed = Batches(
                images,
                labels,
                is_forget,
                batch_size=batch_size,
                augment=data.augment,
                seed=options.seed,
                stream="rl.mixed",
            )

    def num_batches(self, epoch: int) -> int:
        return len(self.forget) + len(self.retain) if self.order == "sequential" else len(self.mixed)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = epoch_generator(self.seed, epoch, "rl.labels")
        if self.order == "sequential":
            relabelled = ((x, random_other_labels(y, self.num_classes, gen)) for x, y in self.forget.epoch(epoch))
            return itertools.chain(relabelled, self.retain.epoch(epoch))
        return (
            (x, torch.where(f, random_other_labels(y, self.num_classes, gen), y)) for x, y, f in self.mixed.epoch(epoch)
        )

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)


class RandomLabel(UnlearnMethod):
    """RL: fine-tune on the forget set with random labels y' != y, and on the retain set."""

    name = "rl"
    label = "RL"
    Config = RLConfig

    def unlearn(self, model, data: UnlearnData, options: RunOptions, mask) -> dict[str, Any]:
        task = _RandomLabelTask(data, self, options, self.config.order)
        return {"history": self.fit(model, task, options, mask=mask).history}


# ----------------------------------------------------------------------------------------------------- SalUn
def forget_saliency(
    model: nn.Module,
    forget: Batches,
    ratios: float | list[float] = 0.5,
    *,
    progress: bool = False,
    process_group: Any = None,
) -> SaliencyMask | list[SaliencyMask]:
    """SalUn's classification mask: |sum of the gradients of -CE over the forget set| at theta_0, in eval mode,
    ranked globally over all parameters; mask = 1 for the top `ratio`.

    process_group: every rank passes the same `forget` batches; the ranking is shared over the group and every
    rank gets the one-process mask (see compute_saliency's replicated_batches)."""

    def forget_loss(m: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return -nn.functional.cross_entropy(m(x), y)

    return compute_saliency(
        model,
        forget_loss,
        forget,
        ratios,
        reduction="abs_of_sum",
        params="all",
        train_mode=False,
        progress=progress,
        process_group=process_group,
        replicated_batches=process_group is not None,
    )


@dataclasses.dataclass
class SalUnConfig(RLConfig):
    """SalUn: RL on the salient weights. Paper recommendation for 10% random forgetting: lr 0.013, 10 epochs,
    mask ratio 0.5. mask_mode "strict" keeps non-salient weights exactly at theta_0 (the paper's equation);
    "compat" reproduces the paper code's grad *= mask (weight decay and momentum still move them)."""

    lr: float = 0.013
    mask_ratio: float = 0.5
    mask_mode: str = "strict"
    # the mask's forget batches: "plain" (in order, no augmentation: the gradient of the data itself) or
    # "augmented" (shuffled, with the training augmentation, as the paper code's loaders)
    mask_batches: str = "plain"


class SalUn(UnlearnMethod):
    """SalUn: saliency mask from the forget loss, then RL updating only the salient weights.

    Without a given mask it computes one (counted in the RTE, as in the issue's figure).
    """

    name = "salun"
    label = "SalUn"
    Config = SalUnConfig

    def unlearn(self, model, data: UnlearnData, options: RunOptions, mask) -> dict[str, Any]:
        cfg: SalUnConfig = self.config
        if cfg.mask_mode not in ("strict", "compat"):
            raise UsageError(f"mask_mode must be 'strict' or 'compat', got {cfg.mask_mode!r}")
        if cfg.mask_batches not in ("plain", "augmented"):
            raise UsageError(f"mask_batches must be 'plain' or 'augmented', got {cfg.mask_batches!r}")
        computed = None  # returned (as UnlearnResult.mask) only when computed here
        if mask is None:
            plain = cfg.mask_batches == "plain"
            forget = self.loader(data, "forget", options, "rl.forget", shuffle=not plain, augment=not plain)
            mask = computed = forget_saliency(
                model, forget, cfg.mask_ratio, progress=options.progress, process_group=options.mask_group()
            )
        task = _RandomLabelTask(data, self, options, cfg.order)
        result = self.fit(model, task, options, mask=mask, optim=cfg.optim(mask_mode=cfg.mask_mode))
        return {"history": result.history, "mask_density": mask.density, "mask": computed}


@dataclasses.dataclass
class SalUnSoftConfig(RLConfig):
    """SalUn-soft: RL on all weights, then after every step soft-threshold theta - theta_0 at the k_t-th smallest
    |theta - theta_0|, with k_t = soft_ratio * (1 - t/T) * N decaying to 0 (the paper code's RL_proximal, which
    mixes forget and retain data)."""

    lr: float = 0.013
    soft_ratio: float = 0.5
    order: str = "mixed"


class _SoftThreshold:
    """Proximal step of an l1 penalty on theta - theta_0, with the threshold chosen by rank (exact, global)."""

    def __init__(self, params: list[torch.Tensor], ratio: float, total_steps: int) -> None:
        self.params = params
        self.theta0 = [p.detach().clone() for p in params]
        self.numel = sum(p.numel() for p in params)
        self.ratio = ratio
        self.total_steps = max(1, total_steps)

    @torch.no_grad()
    def __call__(self, step: int) -> float:
        k = int(self.ratio * (self.total_steps - step) / self.total_steps * self.numel)
        if k <= 0:
            return 0.0
        diffs = [p - p0 for p, p0 in zip(self.params, self.theta0)]
        # the k-th smallest |d| is the (N - k + 1)-th largest: the library's exact global select, no concatenation
        threshold = find_thresholds(diffs, [self.numel - k + 1])[0].value
        for p, p0, d in zip(self.params, self.theta0, diffs):
            shrunk = p - torch.sign(d) * threshold
            p.copy_(torch.where(d.abs() > threshold, shrunk, p0))
        return threshold


class _SoftTask(_RandomLabelTask):
    prox: _SoftThreshold

    def on_step_end(self, engine, step: int) -> None:
        self.prox(step)


class SalUnSoft(UnlearnMethod):
    """SalUn-soft: soft-thresholding instead of a hard mask (proximal gradient with an l1 penalty on the update)."""

    name = "salun_soft"
    label = "SalUn-soft"
    Config = SalUnSoftConfig

    def unlearn(self, model, data: UnlearnData, options: RunOptions, mask) -> dict[str, Any]:
        cfg: SalUnSoftConfig = self.config
        if not 0.0 <= cfg.soft_ratio <= 1.0:
            raise UsageError(f"soft_ratio must be in [0, 1], got {cfg.soft_ratio}")
        params = [p for p in model.parameters() if p.requires_grad]
        task = _SoftTask(data, self, options, cfg.order)
        task.prox = _SoftThreshold(params, cfg.soft_ratio, cfg.epochs * task.num_batches(0))
        return {"history": self.fit(model, task, options, mask=mask).history}
