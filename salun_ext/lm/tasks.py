"""LMUnlearnTask: the forget loss + retain loss of one step, as an Engine task (the engine owns the loop).

Each step draws a batch of forget examples (a fresh permutation per epoch, from a generator seeded by
(seed, epoch), so resume is exact) and, when a retain set is given, the same number of random retain examples.
Both go through ONE forward pass (padded together), which keeps DistributedDataParallel to one forward per
backward.

    method        forget loss L_f                                         (L = gamma L_f + alpha NLL_retain)
    ga            -NLL(forget)                                             gradient ascent (GradDiff with alpha > 0)
    npo           -(2/beta) mean log sigmoid(-beta (log pi - log pi_ref))  reference: the initial model
    idk           NLL(forget prompts -> "I don't know"-style answers)
    random_label  NLL(forget prompts -> random retain answers)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from salun_ext.lm.data import Encoded, collate
from salun_ext.lm.losses import mean_nll, npo_loss, target_logprobs

METHODS = ("ga", "npo", "idk", "random_label")


class LMUnlearnTask:
    """Engine task for language-model unlearning (see the module docstring)."""

    def __init__(
        self,
        forget: Sequence[Encoded],
        retain: Sequence[Encoded] | None,
        *,
        method: str,
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        forget_weight: float = 1.0,
        retain_weight: float = 1.0,
        beta: float = 0.1,
        reference_logps: torch.Tensor | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not forget:
            raise ValueError("the forget set is empty")
        if retain_weight < 0 or forget_weight < 0:
            raise ValueError("forget_weight and retain_weight must be >= 0")
        if retain_weight > 0 and not retain:
            raise ValueError("retain_weight > 0 needs a retain set (or pass retain_weight=0)")
        if method == "npo":
            if not beta > 0:
                raise ValueError(f"beta must be positive, got {beta}")
            if reference_logps is None or reference_logps.numel() != len(forget):
                raise ValueError("npo needs reference_logps: one sequence log-prob per forget example")
        self.forget = list(forget)
        self.retain = list(retain or [])
        self.method = method
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.forget_weight = forget_weight
        self.retain_weight = retain_weight
        self.beta = beta
        self.reference_logps = reference_logps.detach().float().cpu() if reference_logps is not None else None

    def num_batches(self, epoch: int) -> int:
        return math.ceil(len(self.forget) / self.batch_size)

    def batches(self, epoch: int) -> Iterator[dict]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.forget), generator=gen)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            items = [self.forget[i] for i in index.tolist()]
            if self.retain_weight > 0:
                picks = torch.randint(len(self.retain), (len(items),), generator=gen)
                items += [self.retain[i] for i in picks.tolist()]
            batch = collate(items, self.pad_id)
            batch["index"] = index
            yield batch

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logps, counts = target_logprobs(model, batch)
        n = batch["index"].numel()
        forget_logps, forget_counts = logps[:n], counts[:n]
        if self.method == "ga":
            forget_loss = -mean_nll(forget_logps, forget_counts)
        elif self.method == "npo":
            reference = self.reference_logps[batch["index"].cpu()]
            forget_loss = npo_loss(forget_logps, reference, self.beta)
        else:  # idk / random_label: the forget set was relabelled; learn the new answers
            forget_loss = mean_nll(forget_logps, forget_counts)
        loss = self.forget_weight * forget_loss
        if self.retain_weight > 0:
            loss = loss + self.retain_weight * mean_nll(logps[n:], counts[n:])
        return loss
