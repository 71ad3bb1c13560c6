"""SalUn inside Hugging Face `Trainer` (and so accelerate): the saliency mask of a forget set, then MaskedAdamW.

    trainer = SalUnTrainer(model=model, args=TrainingArguments(...), train_dataset=relabelled_or_retain,
                           forget_dataset=forget, mask_ratio=0.5, data_collator=collator)
    trainer.train()      # only the salient weights (and their Adam moments) ever change, bit for bit

The mask is computed once, when the Trainer builds its optimizer: |sum over the forget set's batches of the
gradient of the model's own loss| (the LM's NLL, as SalUn for LMs), ranked over every trainable parameter (the top
`mask_ratio` train). The optimizer is `salun_ext.optim.MaskedAdamW` with the Trainer's learning rate, betas, eps
and weight decay (decay / no-decay groups as the Trainer makes them), so the Trainer's schedule, gradient
accumulation, clipping, bf16 and accelerate all work as usual. `ascent=True` maximises the training loss instead
(gradient ascent on the forget set: pass it as `train_dataset`).
"""

from __future__ import annotations

from typing import Any

import torch

from salun_ext.mask import SaliencyMask
from salun_ext.optim import MaskedAdamW
from salun_ext.saliency import compute_saliency
from salun_ext.utils import UsageError

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("salun_ext.integrations.transformers needs `pip install transformers`") from exc


class SalUnTrainer(Trainer):
    """A `transformers.Trainer` that updates only the weights SalUn's mask marks salient (see the module doc).

    forget_dataset: examples of the data to forget (the mask's source) in the train dataset's format; not needed
        when `mask` is given. mask: a SaliencyMask over the model's parameter names (e.g. SaliencyMask.load(...)).
    mask_ratio: the salient fraction when the mask is computed here. saliency_batches: use only the first N
        batches of the forget set for the mask. ascent: minimise -loss (gradient ascent). optimizer_state: "compact"
    keeps AdamW's moments for the salient entries only (salun_ext.optim; the same trajectory bit for bit).
    """

    def __init__(
        self,
        *args: Any,
        forget_dataset: Any = None,
        mask: SaliencyMask | None = None,
        mask_ratio: float = 0.5,
        saliency_batches: int | None = None,
        ascent: bool = False,
        optimizer_state: str = "dense",
        **kwargs: Any,
    ) -> None:
        if mask is None and forget_dataset is None:
            raise UsageError("forget_dataset: SalUnTrainer needs the forget set (or a precomputed mask=), got None")
        if not 0.0 < mask_ratio <= 1.0:
            raise UsageError(f"mask_ratio: expected a fraction in (0, 1], got {mask_ratio}")
        super().__init__(*args, **kwargs)
        self.forget_dataset, self.mask, self.mask_ratio = forget_dataset, mask, mask_ratio
        if optimizer_state not in ("dense", "compact"):
            raise UsageError(f"optimizer_state: expected 'dense' or 'compact', got {optimizer_state!r}")
        self.saliency_batches, self.ascent, self.optimizer_state = saliency_batches, ascent, optimizer_state

    def saliency_mask(self) -> SaliencyMask:
        """SalUn's mask of the forget set: the gradient of the model's own loss, summed, ranked globally."""
        loader = self.get_eval_dataloader(self.forget_dataset)
        batches = [b for i, b in enumerate(loader) if self.saliency_batches is None or i < self.saliency_batches]
        device = next(self.model.parameters()).device

        def forget_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
            return model(**{k: v.to(device) for k, v in batch.items()}).loss

        checkpointing = bool(getattr(self.model, "is_gradient_checkpointing", False))  # HF checkpoints in train mode
        return compute_saliency(self.model, forget_loss, batches, self.mask_ratio, train_mode=checkpointing)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            if self.mask is None:
                self.mask = self.saliency_mask()
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = []
            for wd, members in ((self.args.weight_decay, [x for x in named if x[0] in decay]),
                                (0.0, [x for x in named if x[0] not in decay])):  # fmt: skip
                if members:  # the Trainer's decay / no-decay split, with names for the mask
                    names, params = zip(*members)
                    groups.append({"params": list(params), "param_names": list(names), "weight_decay": wd})
            self.optimizer = MaskedAdamW(
                groups,
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
                mask=self.mask,
                unmasked="freeze",
                state=self.optimizer_state,
            )
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs: bool = False, **kwargs: Any):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if not self.ascent:
            return out
        if return_outputs:
            loss, outputs = out
            return -loss, outputs
        return -out
