"""Mini-batches from tensors that live on the device, with on-device augmentation.

A DataLoader decodes and augments on the CPU, one sample at a time; for datasets that fit in device memory
(CIFAR-10: 138 MB as uint8) that makes a GPU epoch CPU-bound. `Batches` keeps the uint8 images on the device,
draws the permutation and the augmentation parameters from the generator of (seed, stream, epoch) (so a resumed
epoch replays exactly), and converts to float [0, 1] per batch.

    batches = Batches(images_u8, labels, batch_size=256, augment=Augment(pad=4, flip=True), seed=0, stream="retain")
    for x, y in batches.epoch(3): ...
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from salun_ext.utils.errors import UsageError
from salun_ext.utils.seeding import epoch_generator


@dataclasses.dataclass(frozen=True)
class Augment:
    """Random crop with zero padding `pad` (0: none) and random horizontal flips: the CIFAR training transform."""

    pad: int = 4
    flip: bool = True

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.pad > 0:
            # per-sample crop offsets in [0, 2 pad]; one gather instead of a Python loop over samples
            offsets = torch.randint(0, 2 * self.pad + 1, (2, b), generator=gen).to(x.device)
            padded = F.pad(x, (self.pad,) * 4)
            rows = (torch.arange(h, device=x.device)[None, :] + offsets[0][:, None])[:, None, :, None]
            cols = (torch.arange(w, device=x.device)[None, :] + offsets[1][:, None])[:, None, None, :]
            batch = torch.arange(b, device=x.device)[:, None, None, None]
            chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            x = padded[batch, chan, rows, cols]
        if self.flip:
            flips = (torch.rand(b, generator=gen) < 0.5).to(x.device)
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        return x


class Batches:
    """Seeded mini-batches (x float [0, 1], *extra tensors) of uint8 images held on their device.

    `seed` is the run's seed and `stream` the name of this source's random stream (salun_ext.utils.seeding).
    """

    def __init__(
        self,
        images: torch.Tensor,
        *tensors: torch.Tensor,
        batch_size: int = 256,
        shuffle: bool = True,
        augment: Augment | None = None,
        seed: int = 0,
        stream: str = "batches",
        drop_last: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise UsageError(f"images must be uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}")
        for t in tensors:
            if t.shape[0] != images.shape[0]:
                raise UsageError(f"every tensor needs {images.shape[0]} rows, got {tuple(t.shape)}")
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        self.images = images
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.stream = stream
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def num_samples(self) -> int:
        return self.images.shape[0]

    def epoch(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """The batches of one epoch (the same for the same (seed, stream, epoch))."""
        n = self.images.shape[0]
        gen = epoch_generator(self.seed, epoch, self.stream)
        order = torch.randperm(n, generator=gen).to(self.images.device) if self.shuffle else None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min(n, (i + 1) * self.batch_size))
            idx = order[sl] if order is not None else sl
            x = self.images[idx].float().div_(255.0)
            if self.augment is not None:
                x = self.augment(x, gen)
            yield (x, *(t[idx] for t in self.tensors))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self.epoch(0)
