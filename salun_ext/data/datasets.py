"""Dataset loaders. Each returns an ImageDataset; missing files raise an error that says where they were looked
for and how to get them."""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


@dataclasses.dataclass
class ImageDataset:
    """Images (uint8, N x C x H x W) and labels (int64, N), fully in memory."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(
                f"{self.name}: images must be uint8 N x C x H x W, got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"{self.name}: {self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def subset(self, index: torch.Tensor) -> ImageDataset:
        return ImageDataset(self.images[index], self.labels[index], self.classes, self.name)

    def float_images(self) -> torch.Tensor:
        """Images as float32 in [0, 1]."""
        return self.images.float().div_(255.0)


def _digits(root: str | None, train: bool) -> ImageDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    # no official split: a fixed, stratified 80/20 split (20% of every class, seeded) serves as the test set
    gen = torch.Generator().manual_seed(0)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test[idx[: len(idx) // 5]] = True
    keep = ~test if train else test
    return ImageDataset(images[keep], labels[keep], [str(i) for i in range(10)], "digits")


FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_DEFAULT_ROOTS = ["/usr/share/datasets/fashion-mnist"]


def _read_idx(path: Path, offset: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def _find_idx_file(roots: list[Path], stem: str) -> Path | None:
    for root in roots:
        for folder in (root, root / "FashionMNIST" / "raw"):
            for name in (stem, stem + ".gz"):
                if (folder / name).exists():
                    return folder / name
    return None


def _fashion_mnist(root: str | None, train: bool) -> ImageDataset:
    roots = [Path(root)] if root else [Path(p) for p in FASHION_DEFAULT_ROOTS]
    prefix = "train" if train else "t10k"
    img_path = _find_idx_file(roots, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find_idx_file(roots, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lbl_path is None:
        raise FileNotFoundError(
            f"Fashion-MNIST files ({prefix}-images-idx3-ubyte[.gz], {prefix}-labels-idx1-ubyte[.gz]) not found in "
            f"{[str(r) for r in roots]} (also looked in <root>/FashionMNIST/raw). Get them with "
            "`apt-get install dataset-fashion-mnist` (Debian) or torchvision.datasets.FashionMNIST(root, download=True)"
        )
    images = torch.from_numpy(_read_idx(img_path, 16).copy()).view(-1, 1, 28, 28)
    labels = torch.from_numpy(_read_idx(lbl_path, 8).astype(np.int64))
    return ImageDataset(images, labels, list(FASHION_CLASSES), "fashion_mnist")


DATASETS: dict[str, Callable[[str | None, bool], ImageDataset]] = {
    "digits": _digits,
    "fashion_mnist": _fashion_mnist,
}


def load_dataset(name: str, root: str | os.PathLike | None = None, *, train: bool = True) -> ImageDataset:
    """Load a dataset by name ('digits', 'fashion_mnist', ...) from a local root (never downloads)."""
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {sorted(DATASETS)}")
    return DATASETS[key](os.fspath(root) if root is not None else None, train)
