"""The paper's splits: a seeded, per-class train/val hold-out, and the forget set (random p% or whole classes).

    train_full, test = load_dataset("cifar10"), load_dataset("cifar10", train=False)
    split = make_unlearning_split(train_full, test, ratio=0.1, forget_seed=1)   # 45k train, 5k val, 4.5k forget
    split.forget, split.retain, split.test                                      # ImageDatasets

Every choice is drawn from a NumPy RandomState with an explicit seed, so the same arguments give the same
indices on every machine; the forget and retain index sets are disjoint and cover the training split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from salun_ext.data.datasets import ImageDataset
from salun_ext.saliency import ratio_to_k
from salun_ext.utils.errors import UsageError

DEFAULT_SPLIT_SEED = 2  # the paper code's default seed
DEFAULT_VAL_FRACTION = 0.1  # CIFAR-10: 50k -> 45k train + 5k val


def train_val_split(
    labels: torch.Tensor, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = DEFAULT_SPLIT_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out floor(val_fraction * n_c) samples of every class c (seeded). Returns sorted (train, val) indices."""
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels_np = labels.cpu().numpy()
    rng = np.random.RandomState(seed)
    val = [
        rng.choice(idx, int(val_fraction * len(idx)), replace=False)
        for c in np.unique(labels_np)
        for idx in [np.flatnonzero(labels_np == c)]
    ]
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    keep = np.ones(len(labels_np), dtype=bool)
    keep[val_idx] = False
    return torch.from_numpy(np.flatnonzero(keep)), torch.from_numpy(val_idx.astype(np.int64))


def class_balanced_subset(labels: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a seeded subset with size // C samples of each of the C classes (a smaller training set)."""
    labels_np = labels.cpu().numpy()
    classes = np.unique(labels_np)
    per_class = size // len(classes)
    if per_class < 1:
        raise UsageError(f"a subset of {size} samples cannot hold one sample of each of {len(classes)} classes")
    rng = np.random.RandomState(seed)
    chosen = []
    for c in classes:
        idx = np.flatnonzero(labels_np == c)
        if len(idx) < per_class:
            raise UsageError(f"class {c} has {len(idx)} samples, fewer than the {per_class} the subset needs")
        chosen.append(rng.choice(idx, per_class, replace=False))
    return torch.from_numpy(np.sort(np.concatenate(chosen)).astype(np.int64))


def select_forget(
    labels: torch.Tensor,
    *,
    ratio: float | None = None,
    classes: Sequence[int] | None = None,
    seed: int = 1,
) -> torch.Tensor:
    """Sorted indices of the forget set: a random `ratio` of all samples (seeded) or every sample of `classes`.

    Raises ValueError for an empty forget set or one that is the whole training set.
    """
    n = int(labels.numel())
    if (ratio is None) == (classes is None):
        raise UsageError("give exactly one of ratio= (random forgetting) or classes= (class-wise forgetting)")
    if ratio is not None:
        count = ratio_to_k(ratio, n)
        chosen = np.sort(np.random.RandomState(seed).choice(n, count, replace=False)) if count else np.zeros(0)
        what = f"random forgetting with ratio {ratio} of {n} training samples"
    else:
        classes = [int(c) for c in classes]
        present = set(labels.unique().tolist())
        missing = [c for c in classes if c not in present]
        if missing:
            raise UsageError(
                f"class-wise forgetting: class(es) {missing} have no training sample (labels: {sorted(present)})"
            )
        chosen = np.flatnonzero(np.isin(labels.cpu().numpy(), classes))
        what = f"class-wise forgetting of class(es) {classes}"
    if len(chosen) == 0:
        raise UsageError(f"the forget set is empty ({what}); choose a larger ratio or another class")
    if len(chosen) == n:
        raise UsageError(f"the forget set is the whole training set ({what}): nothing would be retained")
    return torch.from_numpy(chosen.astype(np.int64))


@dataclasses.dataclass
class UnlearningSplit:
    """Train/val/test datasets and the forget/retain partition of the training split."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset  # class-wise forgetting: without the forgotten classes
    forget_idx: torch.Tensor  # indices into `train`
    retain_idx: torch.Tensor
    ratio: float | None = None
    classes: tuple[int, ...] | None = None
    forget_seed: int = 1
    split_seed: int = DEFAULT_SPLIT_SEED

    def __post_init__(self) -> None:
        n = len(self.train)
        both = torch.cat([self.forget_idx, self.retain_idx])
        if both.numel() != n or not torch.equal(both.sort().values, torch.arange(n)):
            raise UsageError("forget_idx and retain_idx must be disjoint and cover the training split")
        if self.forget_idx.numel() == 0:
            raise UsageError("the forget set is empty")
        if self.retain_idx.numel() == 0:
            raise UsageError("the forget set is the whole training set: nothing would be retained")

    @property
    def forget(self) -> ImageDataset:
        return self.train.subset(self.forget_idx)

    @property
    def retain(self) -> ImageDataset:
        return self.train.subset(self.retain_idx)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def describe(self) -> dict:
        return {
            "dataset": self.train.name,
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            "forget": int(self.forget_idx.numel()),
            "retain": int(self.retain_idx.numel()),
            "ratio": self.ratio,
            "classes": list(self.classes) if self.classes is not None else None,
            "forget_seed": self.forget_seed,
            "split_seed": self.split_seed,
        }


def make_unlearning_split(
    train_full: ImageDataset,
    test: ImageDataset,
    *,
    ratio: float | None = None,
    classes: Sequence[int] | None = None,
    forget_seed: int = 1,
    split_seed: int = DEFAULT_SPLIT_SEED,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    forget_idx: torch.Tensor | None = None,
) -> UnlearningSplit:
    """The paper's protocol: per-class val hold-out from the official training set, then the forget set drawn
    from what remains (random `ratio`, or whole `classes`, or explicit `forget_idx` into the training split).
    Class-wise forgetting removes the forgotten classes from the test set."""
    train_idx, val_idx = train_val_split(train_full.labels, val_fraction, split_seed)
    train, val = train_full.subset(train_idx), train_full.subset(val_idx)
    if forget_idx is not None:
        forget_idx = torch.as_tensor(forget_idx, dtype=torch.int64).unique()
        if forget_idx.numel() and (forget_idx.min() < 0 or forget_idx.max() >= len(train)):
            raise UsageError(f"forget indices must lie in [0, {len(train)}) (the training split)")
        if forget_idx.numel() == 0:
            raise UsageError("the forget set is empty (no forget indices given)")
        if forget_idx.numel() == len(train):
            raise UsageError("the forget set is the whole training set: nothing would be retained")
    else:
        forget_idx = select_forget(train.labels, ratio=ratio, classes=classes, seed=forget_seed)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[forget_idx] = False
    retain_idx = torch.nonzero(keep).flatten()
    if classes is not None:
        test = test.subset(torch.nonzero(~torch.isin(test.labels, torch.tensor(list(classes)))).flatten())
    return UnlearningSplit(
        train,
        val,
        test,
        forget_idx,
        retain_idx,
        ratio=ratio,
        classes=tuple(int(c) for c in classes) if classes is not None else None,
        forget_seed=forget_seed,
        split_seed=split_seed,
    )
