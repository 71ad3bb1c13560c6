"""LMUnlearnConfig: what an LM unlearning run does (the method and its hyperparameters)."""

from __future__ import annotations

import dataclasses

from salun_ext.lm.methods import METHODS
from salun_ext.train import OptimConfig, TrainRecipe
from salun_ext.utils.errors import UsageError

RETAIN_LOSSES = ("nll", "kl")
KL_REFERENCES = ("cache", "copy")
SALIENCY_LOSSES = ("nll", "method")
OPTIMIZER_STATES = ("dense", "compact")


@dataclasses.dataclass
class LMUnlearnConfig:
    """What the method does. Defaults follow the TOFU / NPO recipes (AdamW 1e-5, wd 0.01, beta 0.1, gamma = alpha
    = 1). How it runs (seed, device, precision, checkpoints, processes) is the RunOptions'."""

    method: str = "npo"  # a name of lm.methods.METHODS
    mask_ratio: float | None = 0.5  # SalUn; None = the plain method
    beta: float | None = None  # NPO / SimNPO temperature; None = the method's default (NPO 0.1, SimNPO 2.5)
    forget_weight: float = 1.0  # gamma
    retain_weight: float = 1.0  # alpha (0 = no retain loss)
    lr: float = 1e-5
    weight_decay: float = 0.01
    epochs: int | None = 5
    max_steps: int | None = None
    warmup_steps: int = 0
    batch_size: int = 4
    max_length: int = 256
    grad_clip: float | None = 1.0
    saliency_batches: int | None = None  # forget batches used for the mask (None: all)
    saliency_loss: str = "nll"  # the mask's loss: "nll" (forget NLL) or "method" (the method's forget loss)
    retain_loss: str = "nll"  # retain term: "nll" or "kl" (KL(ref || theta) on retain examples)
    kl_reference: str = "cache"  # "kl": the reference's log-probs cached up front, or a frozen "copy" of the model
    margin: float = 0.0  # SimNPO's gamma, as the paper writes it (its authors' code subtracts beta * gamma)
    rmu_layer: int = 7  # RMU: the decoder layer whose output is steered
    rmu_coeff: float = 6.5  # RMU: steering coefficient c (forget activations -> c * u)
    rmu_params: str | None = None  # RMU: regex of the trained parameters (None: layers l-2..l mlp.down_proj)
    optimizer_state: str = "dense"  # "compact": AdamW moments of the salient entries only (needs the mask)

    def __post_init__(self) -> None:
        self.method = METHODS.key(self.method)
        if self.beta is None:
            self.beta = METHODS.get_class(self.method).default_beta
        if self.mask_ratio is not None and not 0 < self.mask_ratio <= 1:
            raise UsageError(f"mask_ratio must be in (0, 1] or None, got {self.mask_ratio}")
        if self.batch_size < 1 or self.max_length < 2:
            raise UsageError("batch_size must be >= 1 and max_length >= 2")
        for name, allowed in (
            ("retain_loss", RETAIN_LOSSES),
            ("kl_reference", KL_REFERENCES),
            ("saliency_loss", SALIENCY_LOSSES),
            ("optimizer_state", OPTIMIZER_STATES),
        ):
            if getattr(self, name) not in allowed:
                raise UsageError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.rmu_layer < 0:
            raise UsageError(f"rmu_layer must be >= 0, got {self.rmu_layer}")

    def recipe(self) -> TrainRecipe:
        return TrainRecipe(
            epochs=self.epochs,
            max_steps=self.max_steps,
            optimizer=OptimConfig("adamw", lr=self.lr, weight_decay=self.weight_decay, state=self.optimizer_state),
            schedule="constant",
            schedule_unit="step",
            warmup_steps=self.warmup_steps,
            grad_clip=self.grad_clip,
        )
