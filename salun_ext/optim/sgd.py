"""MaskedSGD: torch.optim.SGD whose update never touches non-salient weights (strict) or the paper's recipe (compat)."""

from __future__ import annotations

import torch

from salun_ext import ops
from salun_ext.optim._base import MaskedOptimizerMixin, Mode, lr_args, on_device
from salun_ext.optim._masks import MaskSpec, Unmasked, check_finite


class MaskedSGD(MaskedOptimizerMixin, torch.optim.SGD):
    """SGD (momentum, dampening, nesterov, weight decay, maximize) restricted to a saliency mask.

    Same hyperparameters and defaults as torch.optim.SGD, plus:
        mask: a SaliencyMask or dict name -> 0/1 tensor (pass `model.named_parameters()` so names can match), or a
            list of per-parameter 0/1 tensors (None = not covered), aligned with the parameters.
        unmasked: what happens to parameters the mask does not cover: "train" (updated densely) or "freeze"
            (never updated). Required whenever some parameter is not covered.
        mode: "strict" (default) or "compat" (see MaskedOptimizerMixin).
    In strict mode the momentum buffer of a non-salient entry stays 0 for ever and its weight stays theta_0.
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        mask: MaskSpec | None = None,
        unmasked: Unmasked | None = None,
        mode: Mode = "strict",
    ) -> None:
        check_finite(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        self._init_masks(mask, unmasked, mode)

    def _strict_group_step(self, group: dict, grad_scale, found_inf) -> None:
        momentum = group["momentum"]
        lr, lr_tensor = lr_args(group["lr"])
        items = []
        for p in group["params"]:
            words = self._words_for(p)
            if p.grad is None or words is None:
                continue
            buf, first = None, False
            if momentum != 0:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                    first = True
                buf = state["momentum_buffer"] = self._relayout(p, buf)
                buf = self._kernel_view(p, buf)
            grad = self._kernel_view(p, self._relayout(p, p.grad))
            items.append((self._kernel_view(p, p), grad, buf, self._kernel_words_for(p, words), first))
        for device, bucket in self._by_device(items).items():
            for first in (True, False):  # new momentum buffers take the gradient itself (torch's first step)
                chosen = [it for it in bucket if it[4] == first]
                if not chosen:
                    continue
                ops.masked_sgd_(
                    [it[0] for it in chosen],
                    [it[1] for it in chosen],
                    [it[2] for it in chosen] if momentum != 0 else [],
                    [it[3] for it in chosen],
                    lr=lr,
                    lr_tensor=on_device(lr_tensor, device),
                    momentum=momentum,
                    dampening=group["dampening"],
                    weight_decay=group["weight_decay"],
                    nesterov=group["nesterov"],
                    maximize=group["maximize"],
                    first_step=first,
                    grad_scale=on_device(grad_scale, device),
                    found_inf=on_device(found_inf, device),
                )
