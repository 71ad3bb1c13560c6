"""The paper's defaults for diffusion runs: what each (setting, method) trains with, and the per-model defaults.

    RECIPES[(setting, method)]   Recipe(train=TrainRecipe, task=Task keyword arguments)
    recipe(setting, method)      a copy of it (a clear UsageError for an unknown or inapplicable pair)
    PAPER_RECIPES                where the paper's code trains otherwise (`protocol="paper"`, docs/protocols.md)
    ddpm_training_recipe(...)    training a class-conditional DDPM (the original model, or Retrain from the CLI)
    MASK_DEFAULTS / SAMPLE_GUIDANCE / EVAL_GUIDANCE   guidance, batch and clipping per model kind ("ddpm", "sd")

Recipes say WHAT a method's training does (budget, optimizer, schedule, clipping, precision); HOW a run executes
(device, seed, checkpoints, processes) is the caller's RunOptions. Settings: "ddpm" (class-conditional DDPM,
CIFAR-10 in the paper), "sd" (Stable Diffusion, class-wise on Imagenette), "sd-nsfw" (Stable Diffusion, nudity).
Guidance is in diffusers' convention s = 1 + w of the paper's code (its w = 2 is s = 3 here).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from salun_ext.train.engine import OptimConfig
from salun_ext.train.options import TrainRecipe
from salun_ext.utils.errors import UsageError

MODEL_KINDS = ("ddpm", "sd")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The paper's defaults for one (setting, method): the training recipe and the Task's keyword arguments."""

    train: TrainRecipe
    task: dict[str, Any]


def _adam(lr: float) -> OptimConfig:
    return OptimConfig("adam", lr=lr, weight_decay=0.0)


_ESD_TASK = dict(eta=1.0, guidance_scale=3.0, sample_steps=50, batch_size=1)
_SD_SALUN_TASK = dict(batch_size=8, retain_cond_drop=0.0, retain_reduction="mean")

RECIPES: dict[tuple[str, str], Recipe] = {
    # class-conditional DDPM (CIFAR-10): Adam 1e-4, 1000 iterations, batch 128, clip 1
    ("ddpm", "salun"): Recipe(
        TrainRecipe(max_steps=1000, optimizer=_adam(1e-4), grad_clip=1.0),
        dict(alpha=1e-3, batch_size=128, retain_cond_drop=0.1, retain_reduction="sum"),
    ),
    ("ddpm", "ga"): Recipe(TrainRecipe(max_steps=1000, optimizer=_adam(1e-5), grad_clip=1.0), dict(batch_size=128)),
    ("ddpm", "esd-u"): Recipe(TrainRecipe(max_steps=1000, optimizer=_adam(1e-5), grad_clip=1.0), dict(_ESD_TASK)),
    ("ddpm", "retrain"): Recipe(
        TrainRecipe(epochs=100, optimizer=_adam(2e-4), grad_clip=1.0), dict(batch_size=128, cond_drop=0.1)
    ),
    # Stable Diffusion class-wise (Imagenette): alpha 0.5, lr 1e-5, 5 epochs, batch 8
    ("sd", "salun"): Recipe(
        TrainRecipe(epochs=5, optimizer=_adam(1e-5), amp="bf16"), dict(alpha=0.5, **_SD_SALUN_TASK)
    ),
    # Stable Diffusion NSFW: alpha 0.1, 1 epoch
    ("sd-nsfw", "salun"): Recipe(
        TrainRecipe(epochs=1, optimizer=_adam(1e-5), amp="bf16"), dict(alpha=0.1, **_SD_SALUN_TASK)
    ),
    ("sd", "ga"): Recipe(TrainRecipe(epochs=5, optimizer=_adam(1e-5), amp="bf16"), dict(batch_size=8)),
    # ESD (CompVis script): start guidance 3, eta 1, 1000 iterations, lr 1e-5, 50 DDIM steps, batch 1
    ("sd", "esd-x"): Recipe(TrainRecipe(max_steps=1000, optimizer=_adam(1e-5), amp="bf16"), dict(_ESD_TASK)),
    ("sd", "esd-u"): Recipe(TrainRecipe(max_steps=1000, optimizer=_adam(1e-5), amp="bf16"), dict(_ESD_TASK)),
    # Forget-Me-Not stage 2: AdamW lr 2e-6, wd 0.01, clip 1, batch 1, 35 steps, fp32
    ("sd", "fmn"): Recipe(
        TrainRecipe(max_steps=35, optimizer=OptimConfig("adamw", lr=2e-6, weight_decay=0.01), grad_clip=1.0),
        dict(batch_size=1),
    ),
}
for _method in ("ga", "esd-x", "esd-u", "fmn"):
    RECIPES[("sd-nsfw", _method)] = RECIPES[("sd", _method)]

SETTINGS = tuple(dict.fromkeys(s for s, _ in RECIPES))
PROTOCOLS = ("default", "paper")

# The paper code's GA (DDPM/runners/diffusion.py saliency_unlearn with --method ga; SD/train-scripts/
# gradient_ascent.py): -forget + alpha * retain; on the DDPM with the summed loss, lr 1e-4 and alpha 1e-3 of its
# saliency_unlearn config; on SD alpha 0.1, 10 epochs.
PAPER_RECIPES: dict[tuple[str, str], Recipe] = {
    ("ddpm", "ga"): Recipe(
        TrainRecipe(max_steps=1000, optimizer=_adam(1e-4), grad_clip=1.0),
        dict(alpha=1e-3, batch_size=128, reduction="sum", retain_cond_drop=0.1),
    ),
    ("sd", "ga"): Recipe(TrainRecipe(epochs=10, optimizer=_adam(1e-5), amp="bf16"), dict(alpha=0.1, batch_size=8)),
}
# The SalUn code's ESD (SD/train-scripts/train-esd.py, CompVis): x_t sampled by the model being trained, the loss
# at a timestep of the sampled step's interval (ESDTask variant "compvis"); same target, budget and lr.
for _setting in ("sd", "sd-nsfw"):
    for _esd in ("esd-x", "esd-u"):
        _base = RECIPES[(_setting, _esd)]
        PAPER_RECIPES[(_setting, _esd)] = Recipe(_base.train, {**_base.task, "variant": "compvis"})
PAPER_RECIPES[("sd-nsfw", "ga")] = PAPER_RECIPES[("sd", "ga")]


def recipe(setting: str, method: str, protocol: str = "default") -> Recipe:
    """A copy of the defaults (the paper code's under protocol="paper"); a UsageError naming the setting or
    method that has none."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"protocol (--protocol): expected one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    if setting not in SETTINGS:
        raise UsageError(f"setting: expected one of {', '.join(SETTINGS)}; got {setting!r} (unknown setting)")
    key = (setting, method)
    if key not in RECIPES:
        known = sorted({m for _, m in RECIPES})
        if method not in known:
            raise UsageError(f"method: expected one of {', '.join(known)}; got {method!r} (unknown method)")
        available = [m for s, m in RECIPES if s == setting]
        raise UsageError(f"method {method!r} does not apply to {setting!r}; available: {available}")
    r = PAPER_RECIPES.get(key, RECIPES[key]) if protocol == "paper" else RECIPES[key]
    return Recipe(copy.deepcopy(r.train), dict(r.task))


def default_setting(kind: str, concept: str | None = None) -> str:
    """The recipe setting of a model kind: "ddpm"; "sd-nsfw" for the nudity concept, else "sd"."""
    if kind == "ddpm":
        return "ddpm"
    return "sd-nsfw" if concept == "nudity" else "sd"


def ddpm_training_recipe(epochs: int, lr: float = 1e-3, *, warmup_steps: int = 0) -> TrainRecipe:
    """Training a class-conditional DDPM from scratch: Adam (no weight decay), cosine schedule, clip 1."""
    if epochs < 1:
        raise UsageError(f"epochs: expected >= 1, got {epochs}")
    return TrainRecipe(epochs=epochs, optimizer=_adam(lr), schedule="cosine", warmup_steps=warmup_steps, grad_clip=1.0)


# ------------------------------------------------------------------------------------- per-model-kind defaults


@dataclasses.dataclass(frozen=True)
class MaskDefaults:
    """SalUn's saliency mask: guidance s of the forget loss, batch size, per-batch gradient-norm clip (None: none),
    and the loss reduction ("mean" per element; "sum" over C, H, W then the batch mean: the paper's DDPM code)."""

    guidance_scale: float
    batch_size: int
    clip_grad_norm: float | None
    reduction: str = "mean"


# DDPM: s = 3.0 (w = 2), clip 1.0, batch 128; SD: s = 8.5 (w = 7.5), no clipping, batch 8
MASK_DEFAULTS: dict[str, MaskDefaults] = {"ddpm": MaskDefaults(3.0, 128, 1.0), "sd": MaskDefaults(8.5, 8, None)}
SAMPLE_GUIDANCE: dict[str, float] = {"ddpm": 3.0, "sd": 7.5}  # sampling and generation evaluation
EVAL_GUIDANCE = SAMPLE_GUIDANCE


def _kind(kind: str) -> str:
    if kind not in MODEL_KINDS:
        raise UsageError(f"kind: expected one of {', '.join(MODEL_KINDS)}; got {kind!r}")
    return kind


def mask_settings(
    kind: str, *, guidance_scale: float | None = None, batch_size: int | None = None, protocol: str = "default"
) -> MaskDefaults:
    """The mask settings of `kind` with the values given (None: not given, the kind's default; 0 is a value).

    protocol="paper": the DDPM mask's loss is summed over C, H, W before the per-batch clip, as the paper's code
    (DDPM/runners/diffusion.py generate_mask); the default's per-element mean makes the clip of norm 1 rarely fire.
    """
    d = MASK_DEFAULTS[_kind(kind)]
    reduction = "sum" if protocol == "paper" and kind == "ddpm" else d.reduction
    return MaskDefaults(
        d.guidance_scale if guidance_scale is None else guidance_scale,
        d.batch_size if batch_size is None else batch_size,
        d.clip_grad_norm,
        reduction,
    )


def sample_guidance(kind: str, guidance_scale: float | None = None) -> float:
    """The sampling guidance of `kind` unless one is given (None: not given)."""
    return SAMPLE_GUIDANCE[_kind(kind)] if guidance_scale is None else guidance_scale
