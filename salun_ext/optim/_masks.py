"""Matching saliency masks to an optimizer's parameters (shared by every masked optimizer)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from salun_ext import ops
from salun_ext.distributed.shards import is_dtensor, param_mask_words, tensor_box, to_local
from salun_ext.mask import SaliencyMask
from salun_ext.utils.errors import UsageError

Unmasked = Literal["train", "freeze"]
MaskSpec = SaliencyMask | Mapping[str, torch.Tensor] | Sequence[torch.Tensor | None]

TRAIN_ALL = "train"  # marker: parameter not covered by the mask, trained densely
FROZEN = "freeze"  # marker: parameter not covered by the mask, never updated


def _params_and_names(param_groups) -> list[tuple[torch.Tensor, str | None]]:
    out = []
    for group in param_groups:
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            out.append((p, names[i] if names is not None else None))
    return out


def resolve_param_masks(param_groups, mask: MaskSpec | None, unmasked: Unmasked | None) -> dict[int, object]:
    """id(param) -> int32 mask words on the param's device, TRAIN_ALL or FROZEN.

    Raises ValueError (before any parameter changes) for masks that cannot apply: unknown names, shape
    mismatches, parameters the mask does not cover without an explicit `unmasked` policy.
    """
    if unmasked not in (None, "train", "freeze"):
        raise UsageError(f"unmasked must be 'train' or 'freeze', got {unmasked!r}")
    entries = _params_and_names(param_groups)
    if mask is None:
        return {id(p): TRAIN_ALL for p, _ in entries}

    by_param: dict[int, torch.Tensor] = {}
    if isinstance(mask, (SaliencyMask, Mapping)):
        if isinstance(mask, Mapping):
            mask = SaliencyMask.from_dense(mask)
        unnamed = [i for i, (_, n) in enumerate(entries) if n is None]
        if unnamed:
            raise UsageError(
                "a named mask needs parameter names: pass model.named_parameters() (or param groups built from it) "
                "to the optimizer, or give per-parameter masks as a list"
            )
        names = {n for _, n in entries}
        unknown = [n for n in mask.names if n not in names]
        if unknown:
            raise UsageError(f"the mask covers {len(unknown)} parameter(s) the optimizer does not have: {unknown[:5]}")
        moved: dict[torch.device, SaliencyMask] = {}
        for p, name in entries:
            if name not in mask:
                continue
            if mask.shard is not None or is_dtensor(p):  # sharded parameters / masks: the local box's words
                by_param[id(p)] = param_mask_words(mask, name, p)
                continue
            shape = mask.shapes[mask.names.index(name)]
            if shape != p.shape:
                raise UsageError(f"mask for {name!r} has shape {tuple(shape)} but the parameter has {tuple(p.shape)}")
            if p.device not in moved:
                moved[p.device] = mask.to(p.device)
            by_param[id(p)] = moved[p.device].segment(name)
    else:
        masks = list(mask)
        if len(masks) != len(entries):
            raise UsageError(f"got {len(masks)} per-parameter masks for {len(entries)} parameters")
        for i, ((p, name), m) in enumerate(zip(entries, masks)):
            if m is None:
                continue
            label = name or f"params[{i}]"
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"mask for {label} is a {type(m).__name__}, expected a tensor or None")
            if m.shape != p.shape:
                raise UsageError(f"mask for {label} has shape {tuple(m.shape)} but the parameter has {tuple(p.shape)}")
            if m.dtype != torch.bool and bool(((m != 0) & (m != 1)).any()):
                raise UsageError(f"mask for {label} holds values other than 0 and 1")
            if is_dtensor(p):  # a global dense mask of a sharded parameter: this rank's box of it
                m = to_local(m) if is_dtensor(m) else m[tensor_box(p, label, replicated_over=None).slices()]
            by_param[id(p)] = ops.pack_bits(m.detach().to(to_local(p).device).reshape(-1) != 0)

    uncovered = [name or f"params[{i}]" for i, (p, name) in enumerate(entries) if id(p) not in by_param]
    if uncovered and unmasked is None:
        raise UsageError(
            f"{len(uncovered)} parameter(s) are not covered by the mask ({uncovered[:5]}); say what happens to "
            "them: unmasked='train' (updated densely) or unmasked='freeze' (never updated)"
        )
    out: dict[int, object] = {}
    for p, _ in entries:
        out[id(p)] = by_param.get(id(p), TRAIN_ALL if unmasked == "train" else FROZEN)
    return out


def dense_mask(p: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Bool mask of p's (local) shape from its mask words."""
    shape = to_local(p).shape
    return ops.unpack_bits(words, math.prod(shape)).view(shape)


def check_grad(p: torch.Tensor, name: str) -> None:
    g = p.grad
    if g.is_sparse:
        raise RuntimeError(f"masked optimizers do not support sparse gradients ({name})")
    if g.is_complex() or p.is_complex():
        raise RuntimeError(f"masked optimizers do not support complex parameters or gradients ({name})")
    if g.shape != p.shape:
        raise RuntimeError(f"gradient of {name} has shape {tuple(g.shape)}, expected {tuple(p.shape)}")
    if g.dtype != p.dtype or g.device != p.device:  # what the step kernels require, checked before any group steps
        raise RuntimeError(
            f"gradient of {name} has dtype {g.dtype} on {g.device}, expected {p.dtype} on {p.device} (the parameter's)"
        )


def check_finite(**values) -> None:
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise UsageError(f"{key} must be a scalar tensor")
            value = float(value.item())
        if not math.isfinite(value):
            raise UsageError(f"{key} must be finite, got {value}")
