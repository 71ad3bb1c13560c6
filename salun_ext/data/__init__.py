"""Datasets as in-memory image tensors (uint8, N x C x H x W) with integer labels.

Every dataset of the suite loads into an `ImageDataset`, so training can keep whole datasets on the device and
augment there (no DataLoader-bound epochs). Embedded default: sklearn's digits (no download, no set-up).
"""

from __future__ import annotations

from salun_ext.data.datasets import DATASETS, ImageDataset, load_dataset

__all__ = ["DATASETS", "ImageDataset", "load_dataset"]
