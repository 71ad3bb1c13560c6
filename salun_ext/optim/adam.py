"""MaskedAdam / MaskedAdamW: torch's Adam and AdamW restricted to a saliency mask."""

from __future__ import annotations

import torch

from salun_ext import ops
from salun_ext.optim._base import MaskedOptimizerMixin, Mode, lr_args, on_device
from salun_ext.optim._compact import StateLayout
from salun_ext.optim._masks import MaskSpec, Unmasked, check_finite
from salun_ext.optim._plan import Bucket, GroupPlan, Item


class _MaskedAdamStep(MaskedOptimizerMixin):
    """The strict step shared by MaskedAdam and MaskedAdamW (they differ in defaults and decoupled weight decay)."""

    DEFAULT_WEIGHT_DECAY = 0.0

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        mask: MaskSpec | None = None,
        unmasked: Unmasked | None = None,
        mode: Mode = "strict",
        state: StateLayout = "dense",
    ) -> None:
        weight_decay = self.DEFAULT_WEIGHT_DECAY if weight_decay is None else weight_decay
        check_finite(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize
        )
        self._init_masks(mask, unmasked, mode, state)

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")
        return (*moments, "step")

    def _group_items(self, group: dict) -> list[Item]:
        amsgrad = group["amsgrad"]
        items = []
        for i, p in enumerate(group["params"]):
            words = self._words_for(p)
            if p.grad is None or words is None:
                continue
            state = self.state[p]
            if len(state) == 0:
                # the step count lives on the parameter's device so a step needs no host sync (capturable)
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = self._new_state(p, words)
                state["exp_avg_sq"] = self._new_state(p, words)
                if amsgrad:
                    state["max_exp_avg_sq"] = self._new_state(p, words)
            if state["step"].device != p.device or state["step"].dtype != torch.float32:
                state["step"] = state["step"].to(p.device, torch.float32)  # e.g. from torch.optim.Adam
            name = self._param_name(group, i)
            views = [self._state_view(p, state, key, name) for key in self._state_keys(group)[:-1]]
            items.append(self._item(p, (*views, state["step"]), words))
        return items

    def _plan_built(self, plan: GroupPlan) -> None:
        """Each bucket's step counts become views of one tensor: one add per step instead of one per parameter
        (state["step"] stays a 0-dim float32 tensor of its own; only its storage is shared)."""
        for bucket in plan.buckets:
            flat = torch.stack(bucket.states[-1])
            views = list(flat.unbind(0))
            for p, view in zip(bucket.sources, views):
                self.state[p]["step"] = view
            bucket.states[-1], bucket.flat_step = views, flat
        plan.record_state()

    def _launch(self, group: dict, bucket: Bucket, grads: list[torch.Tensor], grad_scale, found_inf) -> None:
        amsgrad = group["amsgrad"]
        beta1, beta2 = group["betas"]
        lr, lr_tensor = lr_args(group["lr"])
        device = bucket.device
        steps = bucket.states[-1]
        flat = bucket.flat_step
        if flat is not None:
            flat.add_(1)
        else:
            torch._foreach_add_(steps, 1)
        found = on_device(found_inf, device)
        kernel = ops.masked_adam_compact_ if self.state_layout == "compact" else ops.masked_adam_
        kernel(
            bucket.params,
            grads,
            bucket.states[0],
            bucket.states[1],
            bucket.states[2] if amsgrad else [],
            steps,
            bucket.words,
            lr=lr,
            lr_tensor=on_device(lr_tensor, device),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            amsgrad=amsgrad,
            maximize=group["maximize"],
            grad_scale=on_device(grad_scale, device),
            found_inf=found,
        )
        if found is not None:  # a skipped step does not count (as torch's fused Adam)
            # (a CPU found_inf with device parameters is read on the host, as the kernel read it: no copy)
            undo = found.to(torch.float32) if found.device == device else float(found)
            if flat is not None:
                flat.sub_(undo)
            else:
                torch._foreach_sub_(steps, [undo] * len(steps))


class MaskedAdam(_MaskedAdamStep, torch.optim.Adam):
    """torch.optim.Adam (betas, eps, L2 weight_decay, amsgrad, maximize) restricted to a saliency mask.

    mask / unmasked / mode / state: as MaskedSGD. In strict mode the moments of non-salient entries stay 0 for
    ever; state="compact" keeps only the salient ones (exp_avg, exp_avg_sq, max_exp_avg_sq packed, see MaskedSGD).
    """

    DEFAULT_WEIGHT_DECAY = 0.0  # torch.optim.Adam's (L2, added to the gradient)


class MaskedAdamW(_MaskedAdamStep, torch.optim.AdamW):
    """torch.optim.AdamW (decoupled weight decay, default 1e-2) restricted to a saliency mask.

    mask / unmasked / mode / state: as MaskedSGD. Decoupled weight decay applies to salient entries only (strict
    mode); state="compact" keeps the moments of the salient entries only.
    """

    DEFAULT_WEIGHT_DECAY = 1e-2  # torch.optim.AdamW's (decoupled)
