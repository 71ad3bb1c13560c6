"""The data of a diffusion run, from what a user names: the model, the forget / retain sets, the training set.

    source = ModelSource(model="runs/ddpm")                  # or ModelSource(pipeline="CompVis/...")
    owner = source.load(device)                              # a ClassConditionalDDPM or a StableDiffusion
    sets = unlearning_sets(owner, ForgetData(forget_class=["3"]), seed=0)
    sets.spec, sets.forget, sets.retain                      # what every method and the mask take

DDPM: the forget classes of its training dataset (c' = the next class, or a random one). Stable Diffusion: a named
concept (nudity), or a forget and a retain prompt, with their images read from folders or generated (and kept in
`data_dir`), or class-wise root/<class>/ folders ("an image of a {class}").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from salun_ext.data import ImageDataset, load_dataset
from salun_ext.diffusion.core import DiffusionSet, DiffusionSpec
from salun_ext.diffusion.ddpm import ClassConditionalDDPM, dataset_to_set, forget_retain_sets, resize_images
from salun_ext.utils import resolve_device
from salun_ext.utils.errors import UsageError, usage_error


@dataclasses.dataclass
class ModelSource:
    """A class-conditional DDPM folder (`model`) or a Stable Diffusion pipeline folder / hub id (`pipeline`)."""

    model: str | None = None
    pipeline: str | None = None
    dtype: str = "fp32"  # SD: the frozen components' dtype
    gradient_checkpointing: bool = False
    attention_slicing: bool = False

    def __post_init__(self) -> None:
        if (self.model is None) == (self.pipeline is None):
            raise UsageError(f"model / pipeline: expected exactly one, got model={self.model!r}, "
                             f"pipeline={self.pipeline!r}")  # fmt: skip

    @property
    def kind(self) -> str:
        """ "ddpm" or "sd" (the key of recipes.MASK_DEFAULTS / SAMPLE_GUIDANCE)."""
        return "ddpm" if self.model is not None else "sd"

    def load(self, device: torch.device | str = "auto") -> Any:
        """The ClassConditionalDDPM or the StableDiffusion, on `device`."""
        if self.model is not None:
            return ClassConditionalDDPM.from_pretrained(self.model, resolve_device(str(device)))
        from salun_ext.diffusion.sd import StableDiffusion

        return StableDiffusion.from_pretrained(
            self.pipeline,
            dtype=self.dtype,
            device=str(device),
            gradient_checkpointing=self.gradient_checkpointing,
            attention_slicing=self.attention_slicing,
        )


@dataclasses.dataclass
class ForgetData:
    """What to forget (the CLI's data flags). DDPM: dataset + forget_class; SD: concept, prompts or class_root."""

    dataset: str | None = None  # DDPM: default the model's
    data_root: str | None = None
    forget_class: Sequence[str] = ()
    target: str = "next"  # DDPM: c' = the next class or a random one
    concept: str | None = None
    forget_prompt: str | None = None
    retain_prompt: str | None = None
    forget_images: str | None = None
    retain_images: str | None = None
    class_root: str | None = None
    num_images: int = 800
    data_dir: str | None = None  # SD: where generated forget / retain images are kept


@dataclasses.dataclass
class UnlearningSets:
    """What every method and the mask take; `forget_prompt` (SD) is where FMN finds the concept's tokens."""

    spec: DiffusionSpec
    forget: DiffusionSet
    retain: DiffusionSet | None
    forget_prompt: str | None = None


# ---------------------------------------------------------------------------------------------------- DDPM


def ddpm_dataset(model: ClassConditionalDDPM, name: str | None, root: str | None = None, *, train: bool = True):
    """The DDPM's dataset: `name`, else the one its folder records; UsageError when neither names one."""
    name = name or model.dataset
    if not name:
        raise usage_error("dataset (--dataset)", "a dataset name (the model folder does not record its dataset)", name)
    return load_dataset(name, root, train=train)


def resized_dataset(dataset: ImageDataset, size: int) -> ImageDataset:
    """The dataset's images at size x size, still uint8 (what salun_ext.train.classifier trains on)."""
    images = resize_images(dataset.images, size).mul_(255.0).round_().to(torch.uint8)
    return ImageDataset(images, dataset.labels, dataset.classes, dataset.name)


def ddpm_training_set(
    model: ClassConditionalDDPM,
    dataset: ImageDataset,
    *,
    exclude_classes: Sequence[int | str] = (),
    subset: int | None = None,
    seed: int = 0,
) -> tuple[DiffusionSet, list[int]]:
    """(the DDPM's training data, the excluded class ids): every class but `exclude_classes` (Retrain), optionally
    `subset` random examples only (quick runs)."""
    excluded = [model.class_id(c) for c in exclude_classes]
    kept = [c for c in range(model.num_classes) if c not in excluded]
    data = dataset_to_set(model, dataset, classes=kept if excluded else None)
    if subset is not None:
        if subset < 1:
            raise usage_error("subset (--subset)", "a number of examples >= 1", subset)
        data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:subset])
    return data, excluded


def ddpm_sets(model: ClassConditionalDDPM, data: ForgetData, *, seed: int = 0) -> UnlearningSets:
    """The forget classes' images (c' as target ids) and every other image of the DDPM's dataset."""
    if not data.forget_class:
        raise usage_error("forget_class (--forget-class)", "at least one class to forget for a DDPM", data.forget_class)
    dataset = ddpm_dataset(model, data.dataset, data.data_root)
    forget, retain = forget_retain_sets(model, dataset, data.forget_class, target=data.target, seed=seed)
    return UnlearningSets(model.spec, forget, retain)


# ---------------------------------------------------------------------------------------------------- SD


def _prompts(data: ForgetData) -> tuple[str, str]:
    from salun_ext.diffusion.sd import concept_prompts

    if data.concept:
        return concept_prompts(data.concept)
    if not data.forget_prompt or not data.retain_prompt:
        raise UsageError(
            "Stable Diffusion needs --concept, or --forget-prompt and --retain-prompt, or --class-root; got "
            f"concept={data.concept!r}, forget_prompt={data.forget_prompt!r}, retain_prompt={data.retain_prompt!r}"
        )
    return data.forget_prompt, data.retain_prompt


def sd_sets(sd, data: ForgetData, *, seed: int = 0, progress: bool = True) -> UnlearningSets:
    """From a concept / prompts / class folders; images read from folders, else generated (cached in data_dir)."""
    from salun_ext.diffusion.sd import (
        PromptedImages,
        class_folders,
        class_wise_sets,
        concept_sets,
        generate_prompt_set,
        load_image_folder,
    )

    if data.class_root:
        if len(data.forget_class) != 1:
            raise usage_error("forget_class (--forget-class)", "exactly one class for SD class-wise forgetting",
                              list(data.forget_class))  # fmt: skip
        folders = class_folders(data.class_root)
        spec, forget, retain = class_wise_sets(sd, folders, data.forget_class[0], limit=data.num_images)
        return UnlearningSets(spec, forget, retain, spec.conditioner.prompts[int(forget.ids[0])])
    forget_prompt, retain_prompt = _prompts(data)

    def images(folder: str | None, prompt: str, name: str) -> PromptedImages:
        if folder:
            return PromptedImages(load_image_folder(folder, sd.resolution, limit=data.num_images), prompt)
        cache = Path(data.data_dir) / name if data.data_dir else None
        return generate_prompt_set(sd, prompt, data.num_images, cache, seed=seed, progress=progress)

    forget = images(data.forget_images, forget_prompt, "forget")
    retain = images(data.retain_images, retain_prompt, "retain")
    spec, f, r = concept_sets(sd, forget, [retain], target_prompt=retain_prompt)
    return UnlearningSets(spec, f, r, forget_prompt)


def unlearning_sets(owner, data: ForgetData, *, seed: int = 0, progress: bool = True, ctx=None) -> UnlearningSets:
    """The sets of a DDPM or a Stable Diffusion `owner`.

    ctx (a DistContext under torchrun): rank 0 builds the SD sets first (it generates and caches missing images in
    data_dir), then the others, which read that cache instead of writing the same files at the same time.
    """
    if isinstance(owner, ClassConditionalDDPM):
        return ddpm_sets(owner, data, seed=seed)
    if ctx is None or not ctx.is_distributed:
        return sd_sets(owner, data, seed=seed, progress=progress)
    if not ctx.is_main:
        ctx.barrier()
    sets = sd_sets(owner, data, seed=seed, progress=progress)
    if ctx.is_main:
        ctx.barrier()
    return sets
