"""SCRUB (Kurmanji et al., NeurIPS 2023): a student moves away from a frozen teacher on the forget set (max steps)
and stays close to it on the retain set (min steps), one optimizer for both.

Per epoch: while epoch < max_steps, one pass over the forget set minimising -KL_T(teacher || student); then one
pass over the retain set minimising gamma CE + alpha KL_T. KL_T = T^2 KL(softmax(z_t / T) || softmax(z_s / T)),
summed over classes and averaged over the batch. Defaults: the SCRUB code's large-scale (CIFAR-10 ResNet) recipe:
SGD lr 5e-4, 3 epochs, 2 max epochs, T 4, gamma 0.99, alpha 0.001.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from salun_ext.classification.methods.base import RunOptions, TrainConfig, UnlearnData, UnlearnMethod, frozen_copy


@dataclasses.dataclass
class SCRUBConfig(TrainConfig):
    epochs: int = 3
    lr: float = 5e-4
    max_steps: int = 2  # epochs that start with a max pass over the forget set
    temperature: float = 4.0
    gamma: float = 0.99  # retain cross-entropy weight
    alpha: float = 0.001  # retain KL weight


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), summed over classes, mean over the batch."""
    log_s = nn.functional.log_softmax(student_logits / temperature, dim=1)
    log_t = nn.functional.log_softmax(teacher_logits / temperature, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=1).mean()
    return kl * temperature**2


class _ScrubTask:
    def __init__(self, forget, retain, teacher: nn.Module, cfg: SCRUBConfig) -> None:
        self.forget, self.retain, self.teacher, self.cfg = forget, retain, teacher, cfg

    def num_batches(self, epoch: int) -> int:
        return (len(self.forget) if epoch < self.cfg.max_steps else 0) + len(self.retain)

    def batches(self, epoch: int) -> Iterator:
        max_pass = (("max", *b) for b in self.forget.epoch(epoch)) if epoch < self.cfg.max_steps else ()
        min_pass = (("min", *b) for b in self.retain.epoch(epoch))
        return itertools.chain(max_pass, min_pass)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        phase, x, y = batch
        logits = model(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        kl = distill_kl(logits, teacher_logits, self.cfg.temperature)
        if phase == "max":
            return -kl
        return self.cfg.gamma * nn.functional.cross_entropy(logits, y) + self.cfg.alpha * kl


class SCRUB(UnlearnMethod):
    """SCRUB: teacher-student max-min unlearning."""

    name = "scrub"
    label = "SCRUB"
    Config = SCRUBConfig
    in_paper = False

    def unlearn(self, model, data: UnlearnData, options: RunOptions, mask) -> dict[str, Any]:
        teacher = frozen_copy(model)
        task = _ScrubTask(
            self.loader(data, "forget", options, "scrub.forget"),
            self.loader(data, "retain", options, "scrub.retain"),
            teacher,
            self.config,
        )
        return {"history": self.fit(model, task, options, mask=mask).history}
