"""LMUnlearnTask: the forget loss + retain loss of one step, as an Engine task (the engine owns the loop).

Each step draws a batch of forget examples (a fresh permutation per epoch, from the "lm" stream's generator of
(seed, epoch), so resume is exact) and, when a retain set is given, the same number of random retain examples.
Both go through ONE forward pass (padded together), which keeps DistributedDataParallel to one forward per
backward. The forget term is the method's (lm/methods.py); the retain term is the retain NLL or, with
retain_loss="kl", KL(ref || theta) over the retain target tokens, the reference (the initial model) given by
its log-probs cached up front (kl_reference="cache": retain target tokens x vocabulary floats on the CPU) or a
frozen copy of the model (kl_reference="copy": a second model in device memory, no cache).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence

import torch

from salun_ext.lm.data import Encoded, collate
from salun_ext.lm.losses import kl_to_reference, mean_nll, target_log_softmax
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
        margin: float = 0.0,
        retain_loss: str = "nll",
        kl_reference: str = "cache",
        rmu_layer: int = 7,
        rmu_coeff: float = 6.5,
        rmu_params: str | None = None,
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
        if not beta > 0:
            raise UsageError(f"beta must be positive, got {beta}")
        if method_cls.needs_reference and (reference_logps is None or reference_logps.numel() != len(forget)):
            raise UsageError("npo needs reference_logps: one sequence log-prob per forget example")
        self.forget = list(forget)
        self.retain = list(retain or [])
        self.method = method_cls.name
        self.impl = method_cls()
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.forget_weight = forget_weight
        self.retain_weight = retain_weight
        self.beta = beta
        self.reference_logps = reference_logps.detach().float().cpu() if reference_logps is not None else None
        if retain_loss not in ("nll", "kl") or kl_reference not in ("cache", "copy"):
            raise UsageError(f"retain_loss nll|kl, kl_reference cache|copy; got {retain_loss!r}, {kl_reference!r}")
        self.margin = margin
        self.retain_loss = retain_loss
        self.kl_reference = kl_reference
        self.rmu_layer, self.rmu_coeff, self.rmu_params = rmu_layer, rmu_coeff, rmu_params
        self.retain_reference: list[torch.Tensor] | None = None  # kl + cache: [target tokens, V] per retain example
        self.reference_model: torch.nn.Module | None = None  # kl + copy: the frozen initial model

    def prepare(self, model: torch.nn.Module, *, amp: str = "none") -> None:
        """Before the first step, on the initial model: the KL reference (cache or copy) and the method's setup."""
        from salun_ext.lm.evaluate import _autocast

        if self.retain_weight > 0 and self.retain_loss == "kl":
            if self.kl_reference == "copy":
                self.reference_model = copy.deepcopy(model).eval().requires_grad_(False)
            else:
                device = next(model.parameters()).device
                was_training = model.training
                model.eval()
                cached = []
                try:
                    with torch.no_grad():
                        for start in range(0, len(self.retain), self.batch_size):
                            chunk = self.retain[start : start + self.batch_size]
                            batch = {k: v.to(device) for k, v in collate(chunk, self.pad_id).items()}
                            with _autocast(device, amp):
                                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                            logp = target_log_softmax(logits.logits, batch["labels"]).to("cpu", logits.logits.dtype)
                            sizes = [e.target_len - int(e.prompt_len == 0) for e in chunk]
                            cached.extend(logp.split(sizes))
                finally:
                    model.train(was_training)
                self.retain_reference = cached
        self.impl.setup(model, self, amp=amp)

    def retain_term(self, batch: dict, logits: torch.Tensor, logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The retain loss of the batch's retain rows (their logits, log-probs and token counts)."""
        if self.retain_loss == "nll":
            return mean_nll(logps, counts)
        n = batch["index"].numel()
        labels = batch["labels"][n:]
        logp = target_log_softmax(logits, labels)
        if self.reference_model is not None:
            with torch.no_grad():
                ref = self.reference_model(input_ids=batch["input_ids"][n:], attention_mask=batch["attention_mask"][n:])
            reference = target_log_softmax(ref.logits, labels)
        else:
            reference = torch.cat([self.retain_reference[i] for i in batch["retain_index"].tolist()])
        return kl_to_reference(reference, logp)

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
            if self.retain_weight > 0:
                batch["retain_index"] = picks
            yield batch

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return self.impl.loss(model, batch, self)
