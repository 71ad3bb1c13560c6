"""Evaluation of generation unlearning: a classifier's verdict on generated images (UA), Fréchet distances, grids.

- `scoring_classifier` / `train_scoring_classifier`: the scoring classifier for DDPM datasets (the suite's small
  CNN, trained by salun_ext.train.classifier.train_classifier at the DDPM's resolution).
- `class_accuracies` / `class_wise_report`: generate n images per class with guidance, classify them; UA = the share
  of forgotten-class images NOT classified as that class (the paper: 500 samples, guidance w = 2 -> s = 3).
- `frechet_distance`: FID through torchmetrics when Inception weights exist locally (and torch-fidelity is
  installed), otherwise the same Fréchet distance on the scoring classifier's penultimate features, labelled so.
- `fid_report` / `image_folder_fid`: the same with the implementation and version (tensors or local folders).
- `clip_score`: torchmetrics' CLIP score with a local CLIP model folder (refused without one).
- `save_grid`, `before_after_grid`: PNG image grids.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from salun_ext.data import Augment, ImageDataset
from salun_ext.diffusion.data import resized_dataset
from salun_ext.diffusion.ddpm import resize_images
from salun_ext.models import build_model
from salun_ext.train.classifier import predict, train_classifier
from salun_ext.train.engine import OptimConfig
from salun_ext.train.options import RunOptions, TrainRecipe
from salun_ext.utils import atomic_save, resolve_device
from salun_ext.utils.errors import MissingFileError, UsageError
from salun_ext.utils.files import read_tensor_file

PathLike = str | os.PathLike

# ---------------------------------------------------------------------------------------------------- classifier

CLASSIFIER_STREAM = "classifier"  # the scoring classifier's batches (salun_ext.utils.seeding.STREAMS)
SHIFT = Augment(pad=1, flip=False)  # +-1 px random shifts: robust to generated images, digits keep their sense


def scoring_recipe(epochs: int = 30, lr: float = 1e-3) -> TrainRecipe:
    """The scoring classifier's training: Adam (no weight decay), cosine schedule."""
    return TrainRecipe(epochs=epochs, optimizer=OptimConfig("adam", lr=lr, weight_decay=0.0), schedule="cosine")


def train_scoring_classifier(
    dataset: ImageDataset,
    image_size: int,
    options: RunOptions,
    *,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 128,
    arch: str = "small_cnn",
) -> torch.nn.Module:
    """A classifier of the suite (salun_ext.models) trained on `dataset` (uint8) at the DDPM's resolution.

    Through salun_ext.train.classifier.train_classifier: seeded initial weights, the "classifier" stream's batches
    with small random shifts, Adam + cosine; returned in eval mode on options.device.
    """
    data = resized_dataset(dataset, image_size)
    model = build_model(arch, data.channels, data.num_classes, image_size)
    train_classifier(model, data, scoring_recipe(epochs, lr), options, batch_size=batch_size, augment=SHIFT,
                     stream=CLASSIFIER_STREAM, desc="classifier")  # fmt: skip
    return model


def scoring_classifier(
    dataset: ImageDataset,
    image_size: int,
    options: RunOptions,
    *,
    load: PathLike | None = None,
    save: PathLike | None = None,
    epochs: int = 30,
    arch: str = "small_cnn",
) -> torch.nn.Module:
    """The scoring classifier: read from `load` (a state_dict file), else trained (and written to `save`)."""
    if load is not None:
        path = Path(load)
        if not path.is_file():
            raise MissingFileError(f"classifier: expected a state_dict file, got {str(path)!r} (not found)")
        clf = build_model(arch, dataset.channels, dataset.num_classes, image_size)
        clf.load_state_dict(read_tensor_file(path, "classifier"))
        return clf.to(resolve_device(options.device)).eval()
    clf = train_scoring_classifier(dataset, image_size, options, epochs=epochs, arch=arch)
    if save is not None:
        atomic_save(clf.state_dict(), save)
    return clf


def class_accuracies(
    model,
    classifier: torch.nn.Module,
    *,
    classes: Sequence[int] | None = None,
    n_per_class: int | dict[int, int] = 100,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 50,
    seed: int = 0,
    batch_size: int = 500,
    progress: bool = False,
) -> tuple[dict[int, float], torch.Tensor, torch.Tensor]:
    """Per-class accuracy (%) of `classifier` on images the class-conditional `model` generates for each class.

    n_per_class: a count for every class, or class -> count (e.g. more samples of the forgotten class).
    Returns (accuracy by class, images, their class labels); the same seed gives the same starting noise to
    every model, so before/after numbers are paired.
    """
    classes = list(range(model.num_classes)) if classes is None else [model.class_id(c) for c in classes]
    counts = n_per_class if isinstance(n_per_class, dict) else dict.fromkeys(classes, n_per_class)
    if any(counts.get(c, 0) < 1 for c in classes):
        raise UsageError(f"n_per_class: expected >= 1 for every class, got {n_per_class}")
    labels = torch.cat([torch.full((counts[c],), c, dtype=torch.long) for c in classes])
    images = model.sample(
        labels,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    pred = predict(classifier, images)
    acc = {c: 100.0 * float((pred[labels == c] == c).float().mean()) for c in classes}
    return acc, images, labels


def class_wise_report(accuracy: dict[int, float], forget_classes: Sequence[int]) -> dict[str, float]:
    """UA (100 - accuracy on the forgotten classes' generated images) and the other classes' mean accuracy."""
    forget = [c for c in accuracy if c in set(forget_classes)]
    others = [c for c in accuracy if c not in set(forget_classes)]
    report = {}
    if forget:
        report["forget_accuracy"] = sum(accuracy[c] for c in forget) / len(forget)
        report["UA"] = 100.0 - report["forget_accuracy"]
    if others:
        report["retain_accuracy"] = sum(accuracy[c] for c in others) / len(others)
    return report


@dataclasses.dataclass
class Sampling:
    """How a class-forgetting evaluation generates: n images per class (n_forget for the forgotten classes)."""

    n_per_class: int = 100
    n_forget: int | None = None  # None: n_per_class (UA >= 99% needs >= 100 to mean anything)
    guidance_scale: float = 3.0  # the paper's w = 2.0
    num_inference_steps: int = 50
    seed: int = 0  # the same seed gives every model the same starting noise: paired before / after numbers
    progress: bool = False

    def counts(self, num_classes: int, forget: Sequence[int]) -> dict[int, int]:
        n_forget = self.n_per_class if self.n_forget is None else self.n_forget
        return {c: n_forget if c in set(forget) else self.n_per_class for c in range(num_classes)}

    def grid_columns(self) -> int:
        return min(10, self.n_per_class, self.n_per_class if self.n_forget is None else self.n_forget)


def score_generations(
    model,
    classifier: torch.nn.Module,
    real: ImageDataset,
    forget: Sequence[int],
    sampling: Sampling,
    *,
    inception_weights: PathLike | None = None,
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(report, images, labels) of one class-conditional model: per-class accuracy, UA / retain accuracy, and the
    Fréchet distance of the other classes' generated images to `real` (test) images of those classes."""
    acc, images, labels = class_accuracies(
        model,
        classifier,
        n_per_class=sampling.counts(model.num_classes, forget),
        guidance_scale=sampling.guidance_scale,
        num_inference_steps=sampling.num_inference_steps,
        seed=sampling.seed,
        progress=sampling.progress,
    )
    forgotten = torch.tensor(list(forget), dtype=torch.long)
    real_keep = resize_images(real.images, model.image_size)[~torch.isin(real.labels, forgotten)]
    keep = ~torch.isin(labels, forgotten)
    fd, label = frechet_distance(real_keep, images[keep], inception_weights=inception_weights, classifier=classifier)
    report = {"per_class_accuracy": acc, **class_wise_report(acc, forget), "frechet": fd, "frechet_label": label}
    return report, images, labels


def evaluate_class_forgetting(
    model,
    classifier: torch.nn.Module,
    real: ImageDataset,
    forget_classes: Sequence[int | str],
    sampling: Sampling,
    *,
    reference=None,
    out: PathLike | None = None,
    titles: tuple[str, str] = ("reference", "evaluated"),
    inception_weights: PathLike | None = None,
) -> dict:
    """The one DDPM class-forgetting evaluation (`salun-ext diffusion evaluate` and the demo).

    Generates from `model` (and, when given, from `reference`, the model before unlearning, from the same noise),
    classifies the images, and measures UA, the other classes' accuracy and their Fréchet distance to `real`.
    With `out`: a before/after grid (before_after.png) with a reference, else samples.png. Returns the evaluated
    model's report, with the reference's under "reference".
    """
    forget = [model.class_id(c) for c in forget_classes]
    result, images, labels = score_generations(
        model, classifier, real, forget, sampling, inception_weights=inception_weights
    )
    show = sampling.grid_columns()
    pick = first_per_class(labels, range(model.num_classes), show)
    if reference is not None:
        ref, ref_images, _ = score_generations(
            reference, classifier, real, forget, sampling, inception_weights=inception_weights
        )
        result["reference"] = ref
        if out is not None:
            before_after_grid(ref_images[pick], images[pick], Path(out) / "before_after.png", nrow=show,
                              row_labels=model.classes, titles=titles, highlight_rows=forget)  # fmt: skip
    elif out is not None:
        save_grid(images[pick], Path(out) / "samples.png", nrow=show)
    return result


# ---------------------------------------------------------------------------------------------------- Fréchet


class PenultimateFeatures(torch.nn.Module):
    """A classifier's input to its last Linear layer, as a feature extractor (float [0, 1] images in)."""

    def __init__(self, classifier: torch.nn.Module) -> None:
        super().__init__()
        linears = [m for m in classifier.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise UsageError("classifier: expected a Linear layer to take penultimate features from, got none")
        self.classifier = classifier.eval()
        self.head = linears[-1]
        self.num_features = self.head.in_features

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        captured = []
        handle = self.head.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
        try:
            self.classifier(x.float())
        finally:
            handle.remove()
        return captured[0].flatten(1).double()


def find_inception_weights(path: PathLike | None = None) -> Path | None:
    """torch-fidelity's Inception-v3 FID weights: the given file, or the torch hub cache; None when absent."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"Inception weights not found: {path}")
        return path
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(cache.glob("weights-inception-2015-12-05-*.pth")) if cache.is_dir() else []
    return found[0] if found else None


def frechet_distance(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    inception_weights: PathLike | None = None,
    classifier: torch.nn.Module | None = None,
    batch_size: int = 250,
) -> tuple[float, str]:
    """(value, label): FID when Inception weights are available, else the classifier-feature Fréchet distance.

    Images are float [0, 1], N x C x H x W (grey images are repeated to RGB for Inception).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    weights = find_inception_weights(inception_weights)
    if weights is not None:
        try:
            import torch_fidelity  # noqa: F401
        except ImportError as exc:
            raise ImportError("FID with Inception weights needs `pip install torch-fidelity`") from exc
        metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights))
        label = "FID (Inception-v3, torchmetrics)"

        def prep(x):
            return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
    else:
        if classifier is None:
            raise UsageError(
                "no Inception weights found (pass inception_weights= or put torch-fidelity's "
                "weights-inception-2015-12-05-*.pth in the torch hub cache), and no classifier for the fallback"
            )
        features = PenultimateFeatures(classifier)
        metric = FrechetInceptionDistance(feature=features, reset_real_features=True)
        label = f"classifier-feature Fréchet distance ({features.num_features}-d penultimate features; NOT FID)"

        def prep(x):
            return x.to(next(classifier.parameters()).device)

    for chunk in real.split(batch_size):
        metric.update(prep(chunk), real=True)
    for chunk in fake.split(batch_size):
        metric.update(prep(chunk), real=False)
    return float(metric.compute()), label


FID_IMPLEMENTATION = "torchmetrics.image.fid.FrechetInceptionDistance"


def fid_report(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    inception_weights: PathLike | None = None,
    classifier: torch.nn.Module | None = None,
) -> dict:
    """`frechet_distance` with what produced it: the value, its label (FID, or the classifier-feature proxy that
    is NOT FID), the implementation and its version, and the image counts."""
    import torchmetrics

    value, label = frechet_distance(real, fake, inception_weights=inception_weights, classifier=classifier)
    return {"value": value, "label": label, "implementation": FID_IMPLEMENTATION,
            "implementation_version": f"torchmetrics {torchmetrics.__version__}", "num_real": len(real),
            "num_fake": len(fake)}  # fmt: skip


def image_folder_fid(
    real: PathLike,
    fake: PathLike,
    size: int,
    *,
    inception_weights: PathLike | None = None,
    classifier: torch.nn.Module | None = None,
) -> dict:
    """`fid_report` of two local image folders (every PNG / JPEG, RGB, resized and centre-cropped to `size`)."""
    from salun_ext.diffusion.sd import load_image_folder

    report = fid_report(load_image_folder(real, size), load_image_folder(fake, size),
                        inception_weights=inception_weights, classifier=classifier)  # fmt: skip
    return {**report, "real": str(real), "fake": str(fake)}


class GreyscaleInput(torch.nn.Module):
    """A single-channel classifier that takes RGB images (the channel mean), e.g. the digits scoring classifier
    on a text-to-image pipeline's RGB output."""

    def __init__(self, classifier: torch.nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.mean(dim=1, keepdim=True) if x.shape[1] == 3 else x)


# ---------------------------------------------------------------------------------------------------- CLIP score

CLIP_SCORE_IMPLEMENTATION = "torchmetrics.multimodal.CLIPScore"


def _pooled(features):
    """transformers >= 5 returns a model output from get_*_features; torchmetrics 1.9 expects the tensor."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class _CLIPFeatures(torch.nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return tensors on every transformers version."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _pooled(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _pooled(self.model.get_text_features(*args, **kwargs))


def check_clip_model(model_path: PathLike | None) -> Path:
    """The local CLIP model folder of the CLIP score; a UsageError naming --clip-model when none is given or it
    is not a model folder (nothing is downloaded)."""
    if model_path is None:
        raise UsageError("clip_model (--clip-model): expected a local CLIP model folder (CLIPModel + CLIPProcessor "
                         "saved with save_pretrained, e.g. a downloaded openai/clip-vit-large-patch14), got None: "
                         "the CLIP score needs one and none is downloaded")  # fmt: skip
    path = Path(model_path)
    if not (path / "config.json").is_file():
        why = "no config.json in it" if path.is_dir() else "not found"
        raise MissingFileError(f"clip_model (--clip-model): expected a CLIP model folder with config.json, got "
                               f"{str(path)!r} ({why})")  # fmt: skip
    return path


def clip_score(
    images: torch.Tensor, prompts: Sequence[str], model_path: PathLike | None, *, batch_size: int = 32
) -> dict:
    """CLIP score (torchmetrics: 100 * mean cosine of image and text embeddings, floored at 0) of float [0, 1]
    RGB images against their prompts, with a local CLIP model folder (a transformers CLIPModel and CLIPProcessor
    saved with save_pretrained, e.g. openai/clip-vit-large-patch14). Nothing is downloaded: no folder, no score."""
    import torchmetrics
    from torchmetrics.multimodal.clip_score import CLIPScore

    path = check_clip_model(model_path)
    if images.dim() != 4 or images.shape[1] != 3 or len(images) != len(prompts):
        raise UsageError(f"images / prompts: expected N x 3 x H x W images and N prompts, got images of shape "
                         f"{tuple(images.shape)} and {len(prompts)} prompts")  # fmt: skip

    def load():
        from transformers import CLIPModel, CLIPProcessor

        return _CLIPFeatures(CLIPModel.from_pretrained(path).eval()), CLIPProcessor.from_pretrained(path)

    metric = CLIPScore(model_name_or_path=load)
    pixels = images.clamp(0, 1).mul(255).round().to(torch.uint8)  # the processor rescales uint8 pixels itself
    for start in range(0, len(prompts), batch_size):
        metric.update(pixels[start : start + batch_size], list(prompts[start : start + batch_size]))
    return {"clip_score": float(metric.compute()), "implementation": CLIP_SCORE_IMPLEMENTATION,
            "implementation_version": f"torchmetrics {torchmetrics.__version__}", "model": str(path),
            "num_images": len(prompts)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- grids


def save_grid(images: torch.Tensor, path: PathLike, nrow: int) -> Path:
    """A PNG grid of float [0, 1] images, `nrow` images per row."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.float().clamp(0, 1), path, nrow=nrow, padding=1, pad_value=1.0)
    return path


def first_per_class(labels: torch.Tensor, classes: Sequence[int], show: int) -> torch.Tensor:
    """Indices of the first `show` images of each class, class after class (one grid row per class)."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:show] for c in classes])


def before_after_grid(
    before: torch.Tensor,
    after: torch.Tensor,
    path: PathLike,
    *,
    nrow: int,
    row_labels: Sequence[str] | None = None,
    titles: tuple[str, str] = ("before", "after"),
    highlight_rows: Sequence[int] = (),
) -> Path:
    """Two grids side by side (same layout: rows of `nrow` images) with titles and row labels, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = math.ceil(len(before) / nrow)
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.5 * nrow * 2, 1 + 0.5 * rows), squeeze=False)
    for ax, imgs, title in zip(axes[0], (before, after), titles):
        grid = make_grid(imgs.float().clamp(0, 1), nrow=nrow, padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).cpu().numpy(), cmap="gray", interpolation="nearest")
        ax.set_title(title)
        ax.set_xticks([])
        cell = grid.shape[1] / rows
        ax.set_yticks([cell * (r + 0.5) for r in range(rows)])
        labels = list(row_labels) if row_labels is not None else [str(r) for r in range(rows)]
        ax.set_yticklabels(labels[:rows])
        for r in highlight_rows:
            ax.get_yticklabels()[r].set_color("red")
            ax.get_yticklabels()[r].set_fontweight("bold")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------- SD class-wise

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageNetClassifier(torch.nn.Module):
    """A torchvision ImageNet classifier taking float [0, 1] images of any size (resize + normalise inside)."""

    def __init__(self, net: torch.nn.Module, size: int = 224) -> None:
        super().__init__()
        self.net, self.size = net, size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float(), size=(self.size, self.size), mode="bilinear", antialias=True)
        return self.net((x - self.mean) / self.std)


def torchvision_classifier(arch: str, weights: PathLike, *, num_classes: int = 1000) -> ImageNetClassifier:
    """A user-supplied torchvision classifier (e.g. resnet50) from a local state_dict file (read weights_only)."""
    import torchvision

    if not hasattr(torchvision.models, arch):
        raise UsageError(f"arch: unknown torchvision model {arch!r} (expected e.g. resnet50, vit_b_16)")
    path = Path(weights)
    if not path.is_file():
        raise MissingFileError(f"weights: classifier weights not found: {path}")
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    state = read_tensor_file(path, "weights")
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(f"{path} does not hold {arch} weights with {num_classes} classes: {exc}") from exc
    return ImageNetClassifier(net).eval()


def prompt_class_accuracy(
    sd,
    classifier: torch.nn.Module,
    class_indices: dict[str, int],
    *,
    template: str = "an image of a {}",
    n_per_class: int = 10,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, float], torch.Tensor, list[str]]:
    """Top-1 accuracy (%) of `classifier` on SD images of each class prompt (paper: 10 per prompt, CFG 7.5).

    `class_indices`: class name -> the classifier's output index (Imagenette: stable_diffusion.IMAGENETTE_TO_IMAGENET).
    Returns (accuracy by class, images, their class names); for the forgotten class, UA = 100 - its accuracy.
    """
    names = [c for c in class_indices for _ in range(n_per_class)]
    images = sd.generate(
        [template.format(c) for c in names],
        seeds=[seed + i for i in range(len(names))],
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        progress=progress,
    )
    pred = predict(classifier.to(images.device), images, batch_size=16)
    hits = {c: [] for c in class_indices}
    for name, p in zip(names, pred.tolist()):
        hits[name].append(p == class_indices[name])
    return {c: 100.0 * sum(h) / len(h) for c, h in hits.items()}, images, names
