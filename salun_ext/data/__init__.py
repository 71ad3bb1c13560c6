"""Datasets as in-memory image tensors (uint8, N x C x H x W) with integer labels.

Every dataset of the suite loads into an `ImageDataset`, so training can keep whole datasets on the device and
augment there (`Batches`: no DataLoader-bound epochs). Embedded default: sklearn's digits (no download, no set-up).
The paper's splits: `make_unlearning_split` (seeded per-class val hold-out, random or class-wise forget set).
"""

from __future__ import annotations

from salun_ext.data.datasets import DATASETS, ImageDataset, dataset_key, default_roots, load_dataset
from salun_ext.data.loader import Augment, Batches
from salun_ext.data.splits import (
    UnlearningSplit,
    class_balanced_subset,
    make_unlearning_split,
    select_forget,
    train_val_split,
)
from salun_ext.utils.errors import UsageError

# The paper's training transform (random crop, padding 4, + horizontal flip) for the natural-image datasets. The
# paper code trains SVHN without augmentation; the small grey-scale sets train without it too (they converge in a
# few epochs, and flipping digits changes their meaning).
DEFAULT_AUGMENT: dict[str, Augment | None] = {
    "cifar10": Augment(pad=4, flip=True),
    "cifar100": Augment(pad=4, flip=True),
    "tinyimagenet": Augment(pad=4, flip=True),
    "svhn": None,
    "fashion_mnist": None,
    "digits": None,
}


def default_augment(name: str) -> Augment | None:
    return DEFAULT_AUGMENT[dataset_key(name)]


def resolve_augment(choice: str, dataset: str) -> Augment | None:
    """'auto' (the dataset's default), 'none', or 'crop_flip' (padding 4 + horizontal flip)."""
    if choice == "auto":
        return default_augment(dataset)
    if choice == "none":
        return None
    if choice == "crop_flip":
        return Augment(pad=4, flip=True)
    raise UsageError(f"augment must be 'auto', 'none' or 'crop_flip', got {choice!r}")


__all__ = [
    "DATASETS",
    "DEFAULT_AUGMENT",
    "Augment",
    "Batches",
    "ImageDataset",
    "UnlearningSplit",
    "class_balanced_subset",
    "dataset_key",
    "default_augment",
    "default_roots",
    "load_dataset",
    "make_unlearning_split",
    "resolve_augment",
    "select_forget",
    "train_val_split",
]
