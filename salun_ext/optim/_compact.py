"""Compact optimizer state: per parameter, only the salient entries of each state tensor, packed in mask order.

A strict masked step never moves a non-salient entry, so its optimizer state is 0 for ever: a compact state tensor
of parameter p is 1-D with one entry per set bit of p's mask, in flat (row-major) element order, and p's dtype
(so the kernels round it exactly as the dense state). The mask is the index: no index tensors. At density 0.1,
AdamW's two moments take 10% of their dense bytes.

    pack / unpack                 one tensor: dense <-> packed under a parameter's mask words
    compact_to_dense_state        an optimizer state_dict in the compact layout -> the dense layout (torch.optim's)
    dense_to_compact_state        and back, under a masked optimizer's mask

Each compact state records `mask_digest`, a fingerprint of the mask it was packed under: loading it into an
optimizer whose mask differs is refused (the packed positions would silently move to other weights).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch

from salun_ext import ops
from salun_ext.distributed.shards import to_local
from salun_ext.utils.errors import UsageError

StateLayout = Literal["dense", "compact"]
PACKED_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")  # per-entry state of the optimizers
DIGEST_KEY = "mask_digest"
_PRIME = 2_147_483_647  # 2**31 - 1: products of a word (< 2**32) and a weight (< 2**31) stay below 2**63


def mask_digest(words: torch.Tensor, numel: int) -> int:
    """A fingerprint of a parameter's mask words (empty = every entry salient): equal masks give equal digests,
    a change of bits almost surely another one. One pass over the words, one host sync (once per parameter)."""
    if words.numel() == 0:
        return numel
    w = words.reshape(-1).to(torch.int64) & 0xFFFFFFFF
    weights = torch.arange(1, w.numel() + 1, dtype=torch.int64, device=w.device) * 0x9E3779B1 % _PRIME + 1
    return numel + (int((w * weights % _PRIME).sum().item()) << 40)


def salient_positions(words: torch.Tensor, numel: int) -> torch.Tensor | None:
    """Flat bool mask of the salient entries (None: every entry)."""
    return None if words.numel() == 0 else ops.unpack_bits(words, numel)


def pack(dense: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """The salient entries of `dense` (a parameter-shaped tensor), 1-D in flat element order (a new tensor)."""
    flat = dense.detach().reshape(-1)
    salient = salient_positions(words, flat.numel())
    return flat.clone() if salient is None else flat[salient.to(flat.device)]


def unpack(packed: torch.Tensor, words: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A tensor shaped and typed like `like` holding `packed` at the salient entries and 0 elsewhere."""
    out = torch.zeros(like.shape, dtype=packed.dtype, device=packed.device)
    salient = salient_positions(words, out.numel())
    flat = out.view(-1)
    if salient is None:
        flat.copy_(packed.reshape(-1))
    else:
        flat[salient.to(flat.device)] = packed.reshape(-1)
    return out


def _param_states(state_dict: dict, optimizer):
    """(parameter, its words or None when frozen, its saved state) for every parameter with state in state_dict."""
    if not hasattr(optimizer, "_words_for"):
        raise UsageError(
            f"optimizer must be a MaskedSGD / MaskedAdam / MaskedAdamW (its mask defines the layout), got "
            f"{type(optimizer).__name__}"
        )
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise UsageError(
            f"state_dict has {len(saved_groups)} param groups, the optimizer {len(optimizer.param_groups)}"
        )
    for saved, group in zip(saved_groups, optimizer.param_groups):
        if len(saved["params"]) != len(group["params"]):
            raise UsageError(
                f"a param group of state_dict has {len(saved['params'])} parameters, the optimizer's "
                f"{len(group['params'])}"
            )
        for index, p in zip(saved["params"], group["params"]):
            if index in state_dict["state"]:  # (FSDP2: the layout of this rank's local shard)
                yield to_local(p), optimizer._words_for(p), state_dict["state"][index]


def compact_to_dense_state(state_dict: dict, optimizer) -> dict:
    """A copy of `state_dict` (compact layout, saved by `optimizer` or one with the same mask and parameters) with
    every per-entry state tensor unpacked to its parameter's shape (0 at non-salient entries): the layout of
    state="dense" and of torch.optim.SGD / Adam / AdamW, which load it."""
    out = copy.deepcopy(state_dict)
    for p, words, state in _param_states(out, optimizer):
        if words is None:
            continue
        digest = state.pop(DIGEST_KEY, None)
        if digest is not None and digest != mask_digest(words, p.numel()):
            raise UsageError(
                "state_dict was packed under another mask than optimizer's: pass the optimizer it came from"
            )
        for key in PACKED_KEYS:
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.shape != p.shape:
                state[key] = unpack(value, words, p)
    return out


def dense_to_compact_state(state_dict: dict, optimizer) -> dict:
    """A copy of `state_dict` (dense layout: state="dense", or torch.optim's own) with every per-entry state tensor
    packed under `optimizer`'s mask (its non-salient entries dropped: a strict step never reads them), ready for
    `optimizer.load_state_dict` with state="compact"."""
    out = copy.deepcopy(state_dict)
    for p, words, state in _param_states(out, optimizer):
        if words is None:
            continue
        for key in PACKED_KEYS:
            value = state.get(key)
            if isinstance(value, torch.Tensor) and to_local(value).shape == p.shape:
                state[key] = pack(to_local(value), words)
        state[DIGEST_KEY] = mask_digest(words, p.numel())
    return out
