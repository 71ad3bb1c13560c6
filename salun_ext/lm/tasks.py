"""LMUnlearnTask: the forget loss + retain loss of one step, as an Engine task (the engine owns the loop).

Each step draws a batch of forget examples (a fresh permutation per epoch, from the "lm" stream's generator of
(seed, epoch), so resume is exact) and, when a retain set is given, the same number of random retain examples.
Both go through ONE forward pass (padded together), which keeps DistributedDataParallel to one forward per
backward. The forget term is the method's (lm/methods.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from salun_ext.lm.data import Encoded, collate
from salun_ext.lm.losses import mean_nll, target_logprobs
from salun_ext.lm.methods import METHODS
from salun_ext.utils import epoch_generator
from salun_ext.utils.errors import UsageError


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
        method_cls = METHODS.get_class(method)
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        if not forget:
            raise UsageError("the forget set is empty")
        if retain_weight < 0 or forget_weight < 0:
            raise UsageError("forget_weight and retain_weight must be >= 0")
        if retain_weight > 0 and not retain:
            raise UsageError("retain_weight > 0 needs a retain set (or pass retain_weight=0)")
        if method_cls.needs_reference:
            if not beta > 0:
                raise UsageError(f"beta must be positive, got {beta}")
            if reference_logps is None or reference_logps.numel() != len(forget):
                raise UsageError("npo needs reference_logps: one sequence log-prob per forget example")
        self.forget = list(forget)
        self.retain = list(retain or [])
        self.method = method_cls.name
        self.forget_term = method_cls()
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
        gen = epoch_generator(self.seed, epoch, "lm")
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
        forget_loss = self.forget_term.forget_loss(forget_logps, forget_counts, batch["index"], self)
        loss = self.forget_weight * forget_loss
        if self.retain_weight > 0:
            loss = loss + self.retain_weight * mean_nll(logps[n:], counts[n:])
        return loss
