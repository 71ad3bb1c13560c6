"""Protocols: which of the paper code's behaviours a classification run follows (docs/protocols.md lists each).

    "default"  this library's choices where the paper's code is buggy or unexplained (see docs/protocols.md)
    "paper"    what OPTML-Group/Unlearn-Saliency's Classification/ code did for Table 1: the original model trained on
               its seed-1 split, lr milestones at epochs 91 / 136 whatever the length, per-dataset input
               normalisation, SalUn's grad *= mask with a mask from shuffled, augmented forget batches, BE evaluated
               as its (C+1)-way model, and its argument defaults (BE / BS lr 0.01, l1-sparse alpha 0.2)

A protocol changes method hyperparameters (between the preset's and the user's: `--set` still wins), the model's
input normalisation and the original model's split; it is part of every fingerprint, so `--resume` never mixes two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from salun_ext.utils import UsageError

# The paper code's NormalizeByChannelMeanStd statistics (Classification/utils.py, setup_model_dataset).
PAPER_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1201, 0.1231, 0.1052)),
    "tinyimagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
PAPER_MILESTONES = (91, 136)  # --decreasing_lr "91,136": MultiStepLR for every run, original and unlearning


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    original_split_seed: int | None = None  # None: the unlearning split's seed
    normalization: str = "half"  # "half" (0.5 / 0.5 for every dataset) or "dataset" (PAPER_NORMALIZATION)
    original_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # OriginalTrainConfig fields
    method_overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def for_method(self, method: str) -> dict[str, Any]:
        """The protocol's hyperparameters of one method (empty when it keeps the method's own)."""
        return dict(self.method_overrides.get(method, {}))

    def model_options(self, dataset: str) -> dict[str, Any]:
        """Builder options the protocol adds (the input normalisation)."""
        if self.normalization == "dataset" and dataset in PAPER_NORMALIZATION:
            mean, std = PAPER_NORMALIZATION[dataset]
            return {"mean": list(mean), "std": list(std)}
        return {}

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PAPER_SCHEDULE = {"milestones": (), "milestone_epochs": PAPER_MILESTONES}

PROTOCOLS: dict[str, Protocol] = {
    "default": Protocol("default"),
    "paper": Protocol(
        "paper",
        original_split_seed=1,
        normalization="dataset",
        original_overrides=_PAPER_SCHEDULE,
        method_overrides={
            "retrain": _PAPER_SCHEDULE,
            "salun": {"mask_mode": "compat", "mask_batches": "augmented"},
            "be": {"keep_shadow": True, "lr": 0.01},
            "bs": {"lr": 0.01},
            "l1_sparse": {"alpha": 0.2},
        },
    ),
}


def get_protocol(name: str | Protocol | None) -> Protocol:
    """A protocol by name ("default" when None)."""
    if isinstance(name, Protocol):
        return name
    key = name or "default"
    if key not in PROTOCOLS:
        raise UsageError(f"protocol (--protocol): expected one of {', '.join(PROTOCOLS)}; got {name!r}")
    return PROTOCOLS[key]
