"""The classification workflows, written once: the CLI (`train`, `unlearn`) and `reproduce` both call these.

load_train_test(dataset, ...)                       -> the training and test sets
forget_split(train, test, ...)                      -> the unlearning split (random, class-wise or given)
train_original(spec, data, config, options)         -> (model, record): train + the accuracies
unlearn_and_evaluate(method, model, split, ...)     -> (result, record): unlearn + UA/RA/TA/MIA
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from salun_ext.classification.evaluation import evaluate_unlearning
from salun_ext.classification.evaluation.metrics import accuracy
from salun_ext.classification.methods.base import UnlearnData, UnlearnMethod, UnlearnResult
from salun_ext.classification.methods.finetune import OriginalTrainConfig, train_original_model
from salun_ext.data import (
    Augment,
    ImageDataset,
    UnlearningSplit,
    class_balanced_subset,
    load_dataset,
    make_unlearning_split,
)
from salun_ext.mask import SaliencyMask
from salun_ext.models import ModelSpec
from salun_ext.train import RunOptions
from salun_ext.utils.errors import MissingFileError, UsageError

LOG = logging.getLogger("salun_ext")


def load_train_test(
    dataset: str, data_root: str | None = None, *, download: bool = False, train_subset: int | None = None
) -> tuple[ImageDataset, ImageDataset]:
    """(training set, test set) of `dataset`, the training set cut to a class-balanced `train_subset`."""
    train = load_dataset(dataset, data_root, train=True, download=download)
    test = load_dataset(dataset, data_root, train=False, download=download)
    if train_subset:
        train = train.subset(class_balanced_subset(train.labels, train_subset))
    return train, test


def read_forget_indices(path: str) -> list[int]:
    """A JSON file holding a list of indices into the training split."""
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(f"--forget-indices: file not found: {path}")
    try:
        indices = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"--forget-indices {path}: not valid JSON ({exc})") from None
    if not isinstance(indices, list):
        raise UsageError(f"--forget-indices {path}: expected a JSON list of indices, got {type(indices).__name__}")
    bad = next((v for v in indices if isinstance(v, bool) or not isinstance(v, int)), None)
    if bad is not None:  # 0.5 or true would silently become index 0 or 1
        raise UsageError(f"--forget-indices {path}: expected integer indices, got {bad!r}")
    unique = list(dict.fromkeys(indices))
    if len(unique) != len(indices):
        LOG.warning("--forget-indices %s: %d duplicate index(es) ignored", path, len(indices) - len(unique))
    return unique


def check_spec_fits(spec: ModelSpec, data: ImageDataset) -> None:
    """UsageError unless a checkpoint's model takes `data`'s images and classes."""
    shape = (data.channels, data.num_classes, data.image_size)
    if (spec.in_channels, spec.num_classes, spec.image_size) != shape:
        raise UsageError(
            f"the checkpoint is a {spec.describe()}, but {data.name} has {data.channels} channel(s), "
            f"{data.num_classes} classes and {data.image_size}px images"
        )


def forget_split(
    train: ImageDataset,
    test: ImageDataset,
    *,
    ratio: float | None = None,
    classes: Sequence[int] | None = None,
    indices: Sequence[int] | None = None,
    forget_seed: int = 1,
    split_seed: int = 2,
    val_fraction: float = 0.1,
) -> UnlearningSplit:
    """The unlearning split of exactly one of: a random `ratio`, class-wise `classes`, or given `indices`."""
    given = [ratio is not None, bool(classes), indices is not None]
    if sum(given) != 1:
        raise UsageError("give exactly one of --forget-ratio, --forget-class, --forget-indices")
    return make_unlearning_split(
        train,
        test,
        ratio=ratio,
        classes=list(classes) if classes else None,
        forget_seed=forget_seed,
        split_seed=split_seed,
        val_fraction=val_fraction,
        forget_idx=list(indices) if indices is not None else None,
    )


@dataclasses.dataclass
class OriginalData:
    """What the original model sees: it trains on `train`, and is scored on all three."""

    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset


def train_original(
    spec: ModelSpec,
    data: OriginalData,
    config: OriginalTrainConfig,
    options: RunOptions,
    *,
    augment: Augment | None = None,
    evaluate: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh `spec` model trained on `data.train`; the record holds the time, the config and (when `evaluate`)
    the train / val / test accuracies (%)."""
    model = spec.build()
    info = train_original_model(model, data.train, config, options, augment=augment)
    record: dict[str, Any] = {"seconds": info["seconds"], "config": dataclasses.asdict(config)}
    if evaluate:
        record["train_accuracy"] = accuracy(model, data.train)
        record["val_accuracy"] = accuracy(model, data.val) if data.val is not None and len(data.val) else None
        record["test_accuracy"] = accuracy(model, data.test)
    return model, record


def unlearn_and_evaluate(
    method: UnlearnMethod,
    model: nn.Module,
    split: UnlearningSplit,
    data: UnlearnData,
    options: RunOptions,
    *,
    mask: SaliencyMask | None = None,
    evaluate: bool = True,
    mia_shadow_size: int | None = None,
) -> tuple[UnlearnResult, dict[str, Any]]:
    """Run `method` on `model` (in place) and, when `evaluate`, score it on the split (UA, RA, TA, MIA).

    The record holds what every report needs: method, label, config, RTE, info, history, split, metrics.
    """
    result = method.run(model, data, options, mask=mask)
    record: dict[str, Any] = {
        "method": method.name,
        "label": method.label,
        "config": dataclasses.asdict(method.config),
        "rte_seconds": result.seconds,
        "info": {k: v for k, v in result.info.items() if k != "history"},
        "history": result.info.get("history"),
        "split": split.describe(),
    }
    if evaluate:
        record["metrics"] = evaluate_unlearning(
            model, split.forget, split.retain, split.test, mia_shadow_size=mia_shadow_size, seed=options.seed
        )
    return result, record
