"""masked(optimizer, mask): strict mask semantics for ANY torch optimizer (no kernel needed).

Hooks the optimizer in place: before each step the non-salient entries of every masked parameter and of its
per-parameter state tensors are saved; after the step they are written back, so they stay bit-identical. State
created during a step (lazy init) gets 0 in its non-salient entries. Frozen parameters skip the step entirely.
Costs a gather and a scatter of the non-salient entries per step: use MaskedSGD/MaskedAdam(W) where they apply.
"""

from __future__ import annotations

import torch

from salun_ext.optim._masks import FROZEN, TRAIN_ALL, MaskSpec, Unmasked, check_grad, dense_mask, resolve_param_masks
from salun_ext.utils.errors import UsageError


def masked(optimizer: torch.optim.Optimizer, mask: MaskSpec, *, unmasked: Unmasked | None = None):
    """Give `optimizer` strict mask semantics in place and return it (it stays a torch.optim.Optimizer)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"masked() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if getattr(optimizer, "_salun_mask_hooks", None):
        raise UsageError("this optimizer is already masked")
    from salun_ext.distributed.shards import is_dtensor

    if any(is_dtensor(p) for group in optimizer.param_groups for p in group["params"]):
        raise NotImplementedError(
            "masked() does not support FSDP2 (DTensor) parameters; use MaskedSGD / MaskedAdam / MaskedAdamW, which "
            "step the local shards"
        )
    specs = resolve_param_masks(optimizer.param_groups, mask, unmasked)
    dense = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            spec = specs[id(p)]
            if spec is not FROZEN and spec is not TRAIN_ALL:
                dense[id(p)] = ~dense_mask(p, spec)  # True = keep (non-salient)
    saved: dict[int, tuple] = {}
    held_grads: dict[int, torch.Tensor] = {}

    def pre_hook(opt, args, kwargs):
        saved.clear()
        held_grads.clear()
        for group in opt.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if specs.get(id(p), FROZEN) is FROZEN:
                    held_grads[id(p)] = p.grad
                    p.grad = None  # torch optimizers skip parameters without gradients
                    continue
                names = group.get("param_names")
                check_grad(p, names[i] if names else f"params[{i}]")
                keep = dense.get(id(p))
                if keep is None:
                    continue
                state = opt.state.get(p, {})
                state_saved = {
                    k: v[keep].clone() for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == p.shape
                }
                saved[id(p)] = (p, p.detach()[keep].clone(), state_saved)

    def post_hook(opt, args, kwargs):
        with torch.no_grad():
            for p, values, state_saved in saved.values():
                keep = dense[id(p)]
                p[keep] = values
                for k, v in opt.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        v[keep] = state_saved.get(k, 0)
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in held_grads:
                    p.grad = held_grads[id(p)]
        saved.clear()
        held_grads.clear()

    optimizer._salun_mask_hooks = (
        optimizer.register_step_pre_hook(pre_hook),
        optimizer.register_step_post_hook(post_hook),
    )
    return optimizer


def unmask(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Remove the hooks installed by masked()."""
    for handle in getattr(optimizer, "_salun_mask_hooks", ()):
        handle.remove()
    optimizer._salun_mask_hooks = None
    return optimizer
