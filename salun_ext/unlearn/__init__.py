"""Classification unlearning methods, each a small class on the shared Engine.

    from salun_ext.unlearn import get_method, UnlearnData, RunOptions
    result = get_method("salun").run(model, UnlearnData(forget, retain), RunOptions(seed=1))

Paper (Table 1): retrain, ft, rl, ga, iu, be, bs, l1_sparse, salun, salun_soft. Beyond: scrub, neggrad_plus, ssd.
Every method's Config dataclass documents its defaults (the paper's recipe for CIFAR-10 / ResNet-18).
"""

from __future__ import annotations

from salun_ext.unlearn.base import (
    CrossEntropyTask,
    LoaderTask,
    RunOptions,
    TrainConfig,
    UnlearnData,
    UnlearnMethod,
    UnlearnResult,
    fit_task,
)
from salun_ext.unlearn.finetune import OriginalTrainConfig, train_classifier
from salun_ext.unlearn.random_label import forget_saliency, random_other_labels
from salun_ext.unlearn.registry import ALIASES, EXTRA_METHODS, METHODS, PAPER_METHODS, get_method, method_key

__all__ = [
    "ALIASES",
    "EXTRA_METHODS",
    "METHODS",
    "PAPER_METHODS",
    "CrossEntropyTask",
    "LoaderTask",
    "OriginalTrainConfig",
    "RunOptions",
    "TrainConfig",
    "UnlearnData",
    "UnlearnMethod",
    "UnlearnResult",
    "fit_task",
    "forget_saliency",
    "get_method",
    "method_key",
    "random_other_labels",
    "train_classifier",
]
