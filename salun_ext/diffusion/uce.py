"""UCE (Unified Concept Editing, Gandikota et al., WACV 2024): erase concepts from Stable Diffusion in closed form.

UCE trains nothing. For every cross-attention key and value projection W (`attn2.to_k`, `attn2.to_v`) it solves

    W* = argmin_W  sum_e s_e |W c_e - W_old g_e|^2  +  sum_p s_p |W c_p - W_old c_p|^2  +  lam |W - W_old|_F^2

    W* = (lam W_old + s_e sum_e W_old g_e c_e^T + s_p sum_p W_old c_p c_p^T)
         (lam I     + s_e sum_e c_e c_e^T       + s_p sum_p c_p c_p^T)^-1

where c_e are the text-encoder states of an erased concept, g_e those of its guide concept (what the concept
should look like afterwards; "" is the unconditional prompt), and c_p those of the concepts to preserve.

Which states, and the defaults, follow the code of the paper's published results (rohitgandikota/
unified-concept-editing, train-scripts/train_erase.py, technique "replace"): an erased concept contributes every
position from its last word token to the end of the padded sequence (the end-of-text / padding states carry the
prompt's meaning in CLIP), paired position by position with its guide's states from the guide's last word token;
every preserved text, and always "", contributes all its positions; lam = 0.5, s_e = 1, s_p = max(0.1, 1 / the
number of preserved texts including ""); keys and values are both edited. The repository's later rewrite
(uce_sd_erase.py) uses only the last word token's state (and s_p = 1); those inputs are not offered here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from salun_ext.utils.errors import UsageError, usage_error

PUBLISHED_LAMBDA = 0.5
PUBLISHED_ERASE_SCALE = 1.0


@dataclasses.dataclass
class UCEConfig:
    """What UCE erases, towards what, what it preserves, and its regularisation (see the module docstring).

    guide: one guide per erased concept, or one for all (default "": the unconditional prompt).
    preserve_scale: None is the published max(0.1, 1 / (len(preserve) + 1)).
    """

    erase: Sequence[str]
    guide: Sequence[str] = ("",)
    preserve: Sequence[str] = ()
    erase_scale: float = PUBLISHED_ERASE_SCALE
    preserve_scale: float | None = None
    lamb: float = PUBLISHED_LAMBDA
    edit_keys: bool = True  # False: values only

    def __post_init__(self) -> None:
        self.erase, self.guide, self.preserve = list(self.erase), list(self.guide), list(self.preserve)
        if not self.erase or not all(isinstance(e, str) and e.strip() for e in self.erase):
            raise usage_error("erase (--uce-erase)", "at least one non-empty concept to erase", self.erase)
        if len(self.guide) == 1:
            self.guide = self.guide * len(self.erase)
        if len(self.guide) != len(self.erase):
            raise usage_error("guide (--uce-guide)", f"one guide concept or one per erased concept "
                              f"({len(self.erase)})", self.guide)  # fmt: skip
        for name in ("erase_scale", "lamb"):
            if not getattr(self, name) > 0:
                raise usage_error(name, "a number > 0", getattr(self, name))
        if self.preserve_scale is not None and not self.preserve_scale > 0:
            raise usage_error("preserve_scale", "a number > 0 (or None: the published default)", self.preserve_scale)

    @property
    def preserve_texts(self) -> list[str]:
        """The preserved texts the solve uses: "" always (as the published code), then the given ones."""
        return [""] + [p for p in self.preserve if p != ""]

    @property
    def effective_preserve_scale(self) -> float:
        if self.preserve_scale is not None:
            return float(self.preserve_scale)
        return max(0.1, 1.0 / len(self.preserve_texts))


def uce_solve(
    weight: torch.Tensor,
    erase_inputs: torch.Tensor,
    guide_inputs: torch.Tensor,
    preserve_inputs: torch.Tensor,
    *,
    erase_scale: float,
    preserve_scale: float,
    lamb: float,
) -> torch.Tensor:
    """The closed-form W* of the module docstring for one projection `weight` (out x in), in `weight`'s dtype.

    erase_inputs / guide_inputs: paired rows (n_e x in); preserve_inputs: n_p x in. Solved in float64.
    """
    if erase_inputs.shape != guide_inputs.shape:
        raise UsageError(f"erase and guide inputs must pair up, got {tuple(erase_inputs.shape)} and "
                         f"{tuple(guide_inputs.shape)}")  # fmt: skip
    w = weight.detach().double()
    c_e, g_e, c_p = (t.detach().to(w.device, torch.float64) for t in (erase_inputs, guide_inputs, preserve_inputs))
    v_e = g_e @ w.T  # the guide's outputs under the original weights: the erased concept's new targets
    v_p = c_p @ w.T
    lhs = lamb * w + erase_scale * (v_e.T @ c_e) + preserve_scale * (v_p.T @ c_p)
    gram = lamb * torch.eye(w.shape[1], dtype=torch.float64, device=w.device)
    gram = gram + erase_scale * (c_e.T @ c_e) + preserve_scale * (c_p.T @ c_p)
    # W* = lhs gram^-1, and gram is symmetric: solve gram X = lhs^T instead of forming an inverse
    return torch.linalg.solve(gram, lhs.T).T.to(weight.dtype)


def cross_attention_projections(unet: torch.nn.Module, *, edit_keys: bool = True) -> list[tuple[str, Any]]:
    """(name, Linear) of every cross-attention value (and key) projection: what UCE edits."""
    wanted = ("to_k", "to_v") if edit_keys else ("to_v",)
    found = [
        (name, module)
        for name, module in unet.named_modules()
        if ".attn2." in f".{name}." and name.rsplit(".", 1)[-1] in wanted and isinstance(module, torch.nn.Linear)
    ]
    if not found:
        raise UsageError("the UNet has no cross-attention projections (attn2.to_k / to_v): UCE edits a "
                         "text-conditioned UNet (Stable Diffusion), not a class-conditional DDPM")  # fmt: skip
    return found


def last_word_position(tokenizer, text: str, max_length: int) -> int:
    """Index of the last word token of `text` in its padded sequence (0, the start token, for "")."""
    return len(tokenizer(text, truncation=True, max_length=max_length).input_ids) - 2


def erase_pairs(sd, erase: Sequence[str], guide: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The paired (erased, guide) text states of the published code: from each one's last word token to the end,
    trimmed at the end so both have the same number of positions."""
    states = sd.encode_prompts([*erase, *guide])
    inputs, targets = [], []
    length = sd.max_length
    for i, (e, g) in enumerate(zip(erase, guide)):
        start_e, start_g = last_word_position(sd.tokenizer, e, length), last_word_position(sd.tokenizer, g, length)
        count = length - max(start_e, start_g)
        inputs.append(states[i, start_e : start_e + count])
        targets.append(states[len(erase) + i, start_g : start_g + count])
    return torch.cat(inputs), torch.cat(targets)


@dataclasses.dataclass
class UCEResult:
    """What an edit changed: the projections' names, the solve's inputs, and its wall time."""

    edited: list[str]
    erase_rows: int
    preserve_rows: int
    seconds: float
    config: dict[str, Any]


@torch.no_grad()
def uce_edit(sd, config: UCEConfig) -> UCEResult:
    """Edit `sd`'s UNet (a salun_ext.diffusion.sd.StableDiffusion) in place with UCE; nothing else changes."""
    start = time.perf_counter()
    erase_inputs, guide_inputs = erase_pairs(sd, config.erase, config.guide)
    preserve_inputs = sd.encode_prompts(config.preserve_texts).flatten(0, 1)
    layers = cross_attention_projections(sd.unet, edit_keys=config.edit_keys)
    for _, layer in layers:
        layer.weight.copy_(uce_solve(layer.weight, erase_inputs, guide_inputs, preserve_inputs,
                                     erase_scale=config.erase_scale, preserve_scale=config.effective_preserve_scale,
                                     lamb=config.lamb))  # fmt: skip
    settings = dataclasses.asdict(config) | {"preserve_scale": config.effective_preserve_scale}
    return UCEResult([name for name, _ in layers], len(erase_inputs), len(preserve_inputs),
                     time.perf_counter() - start, settings)  # fmt: skip
