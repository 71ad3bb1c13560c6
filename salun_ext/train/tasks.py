"""Tasks every domain shares: a Task over one `Batches` source, and cross-entropy on (x, y) batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from salun_ext.data import Batches


class LoaderTask:
    """A Task over one Batches source; remembers the current epoch (for epoch-dependent losses)."""

    def __init__(self, source: Batches) -> None:
        self.source = source
        self.epoch = 0

    def batches(self, epoch: int) -> Iterator:
        self.epoch = epoch
        return self.source.epoch(epoch)

    def num_batches(self, epoch: int) -> int:
        return len(self.source)


class CrossEntropyTask(LoaderTask):
    """Cross-entropy on (x, y) batches, with `sign=-1` for gradient ascent."""

    def __init__(self, source: Batches, sign: float = 1.0) -> None:
        super().__init__(source)
        self.sign = sign

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return self.sign * nn.functional.cross_entropy(model(x), y)
