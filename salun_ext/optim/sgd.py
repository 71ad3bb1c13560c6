"""MaskedSGD: torch.optim.SGD whose update never touches non-salient weights (strict) or the paper's recipe (compat)."""

from __future__ import annotations

import torch

from salun_ext import ops
from salun_ext.optim._base import MaskedOptimizerMixin, Mode, lr_args, on_device
from salun_ext.optim._compact import StateLayout
from salun_ext.optim._masks import MaskSpec, Unmasked, check_finite
from salun_ext.optim._plan import Bucket, Item


class MaskedSGD(MaskedOptimizerMixin, torch.optim.SGD):
    """SGD (momentum, dampening, nesterov, weight decay, maximize) restricted to a saliency mask.

    Same hyperparameters and defaults as torch.optim.SGD, plus:
        mask: a SaliencyMask or dict name -> 0/1 tensor (pass `model.named_parameters()` so names can match), or a
            list of per-parameter 0/1 tensors (None = not covered), aligned with the parameters.
        unmasked: what happens to parameters the mask does not cover: "train" (updated densely) or "freeze"
            (never updated). Required whenever some parameter is not covered.
        mode: "strict" (default) or "compat" (see MaskedOptimizerMixin).
        state: "dense" (default: every state tensor shaped like its parameter, torch.optim's layout) or "compact"
            (strict mode only): each per-entry state tensor is 1-D and holds only the salient entries, in flat
            element order, so state memory scales with the mask's density. The trajectory is bit-identical to
            "dense"; state_dict() saves the compact layout (compact_to_dense_state / dense_to_compact_state convert,
            and load_state_dict packs a dense-layout state itself). Needs contiguous parameters; FSDP2
            (DTensor) parameters: each rank packs its local shard.
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
        state: StateLayout = "dense",
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
        self._init_masks(mask, unmasked, mode, state)

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _group_items(self, group: dict) -> list[Item]:
        momentum = group["momentum"]
        items = []
        for i, p in enumerate(group["params"]):
            words = self._words_for(p)
            if p.grad is None or words is None:
                continue
            states, first = (), False
            if momentum != 0:
                state = self.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = self._new_state(p, words)
                    first = True
                states = (self._state_view(p, state, "momentum_buffer", self._param_name(group, i)),)
            items.append(self._item(p, states, words, first))
        return items

    def _launch(self, group: dict, bucket: Bucket, grads: list[torch.Tensor], grad_scale, found_inf) -> None:
        momentum = group["momentum"]
        lr, lr_tensor = lr_args(group["lr"])
        device = bucket.device
        bufs = bucket.states[0] if momentum != 0 else []
        parts = [(False, None)]
        if any(bucket.first):  # new momentum buffers take the gradient itself (torch's first step)
            parts = [(first, [i for i, f in enumerate(bucket.first) if f == first]) for first in (True, False)]
        kernel = ops.masked_sgd_compact_ if self.state_layout == "compact" else ops.masked_sgd_
        for first, index in parts:
            if index is not None and not index:
                continue
            pick = (lambda xs: xs) if index is None else (lambda xs: [xs[i] for i in index])  # noqa: B023
            kernel(
                pick(bucket.params),
                pick(grads),
                pick(bufs) if momentum != 0 else [],
                pick(bucket.words),
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
