"""Supervised training of an image classifier: the original model of every classification experiment, Retrain's
recipe, and the scoring classifier of generation evaluation all train through `train_classifier`."""

from __future__ import annotations

import torch
from torch import nn

from salun_ext.data import Augment, Batches, ImageDataset
from salun_ext.models import reinitialize
from salun_ext.train.engine import FitResult
from salun_ext.train.options import RunOptions, TrainRecipe, fit
from salun_ext.train.tasks import CrossEntropyTask
from salun_ext.utils import resolve_device, stream_seed


def train_classifier(
    model: nn.Module,
    dataset: ImageDataset,
    recipe: TrainRecipe,
    options: RunOptions,
    *,
    batch_size: int = 256,
    augment: Augment | None = None,
    reinit: bool = True,
    stream: str = "retain",
    desc: str = "classifier",
) -> FitResult:
    """Train `model` with cross-entropy on `dataset` (uint8 images), in place; the model is left in eval mode.

    reinit: fresh weights from the run's "init" stream first (original training and Retrain start alike).
    stream: the random stream of the batches (salun_ext.utils.seeding).
    """
    device = resolve_device(options.device)
    if reinit:
        reinitialize(model, stream_seed(options.seed, "init"))
    model.to(device)
    dataset = dataset.to(device)
    source = Batches(
        dataset.images, dataset.labels, batch_size=batch_size, augment=augment, seed=options.seed, stream=stream
    )
    result = fit(model, CrossEntropyTask(source), recipe, options, desc=desc)
    model.eval()
    return result


@torch.no_grad()
def predict(classifier: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels (CPU int64) of float [0, 1] images N x C x H x W."""
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    out = [classifier(chunk.to(device)).argmax(1).cpu() for chunk in images.split(batch_size)]
    classifier.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
