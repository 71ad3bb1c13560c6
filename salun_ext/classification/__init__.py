"""Classification unlearning: the paper's methods, metrics, workflows and `reproduce` (Table 1, Figure 1).

from salun_ext.classification import RunOptions, UnlearnData, get_method
result = get_method("salun").run(model, UnlearnData(forget, retain), RunOptions(seed=1))

methods/       one class per method (+ base.py: the contract every method follows)
registry.py    name -> method class (the CLI's choices), aliases
presets.py     per-dataset settings of `reproduce`
evaluation/    UA / RA / TA / MIA, Avg. Gap, Table-1 Markdown, Figure-1 PNG
workflows.py   train_original, unlearn_and_evaluate: what the CLI and `reproduce` both call
experiment.py  reproduce(): methods x seeds x scenarios, cached on disk, resumable
"""

from __future__ import annotations

from salun_ext.classification.methods.base import TrainConfig, UnlearnData, UnlearnMethod, UnlearnResult
from salun_ext.classification.methods.finetune import OriginalTrainConfig, train_original_model
from salun_ext.classification.methods.random_label import forget_saliency, random_other_labels
from salun_ext.classification.registry import ALIASES, EXTRA_METHODS, METHODS, PAPER_METHODS, get_method, method_key
from salun_ext.classification.workflows import OriginalData, train_original, unlearn_and_evaluate
from salun_ext.train import CrossEntropyTask, LoaderTask, RunOptions

__all__ = [
    "ALIASES",
    "EXTRA_METHODS",
    "METHODS",
    "PAPER_METHODS",
    "CrossEntropyTask",
    "LoaderTask",
    "OriginalData",
    "OriginalTrainConfig",
    "RunOptions",
    "TrainConfig",
    "UnlearnData",
    "UnlearnMethod",
    "UnlearnResult",
    "forget_saliency",
    "get_method",
    "method_key",
    "random_other_labels",
    "train_original",
    "train_original_model",
    "unlearn_and_evaluate",
]
