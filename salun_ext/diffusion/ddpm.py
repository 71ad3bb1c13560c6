"""Class-conditional DDPM on diffusers: a `UNet2DModel` with class embeddings plus a null class for classifier-free
guidance, a DDPM training schedule, DDIM or DDPM sampling, and `save_pretrained` / `from_pretrained` folders.

    model = ClassConditionalDDPM.from_config(DDPMConfig(), classes=dataset.classes)
    train_ddpm(model, dataset_to_set(model, dataset), ddpm_training_recipe(40), RunOptions())   # workflows, recipes
    images = model.sample([3] * 16, guidance_scale=3.0, num_inference_steps=50, seed=0)   # floats in [0, 1]
    model.save_pretrained("ddpm-digits")

Folder layout: unet/ (UNet2DModel), scheduler/ (DDPMScheduler), salun_ddpm.json (class names, dataset).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from salun_ext.diffusion.core import ClassConditioner, DiffusionSet, DiffusionSpec, check_guidance, check_steps, denoise
from salun_ext.utils.errors import MissingFileError, UsageError
from salun_ext.utils.files import write_json

PathLike = str | os.PathLike
CONFIG_NAME = "salun_ddpm.json"
FORMAT_NAME = "salun_ext.class_conditional_ddpm"


@dataclasses.dataclass
class DDPMConfig:
    """Architecture and noise schedule. Defaults: a ~1M-parameter UNet for 16x16 single-channel images."""

    image_size: int = 16
    channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, True, False)  # self-attention per resolution level
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_head_dim: int | None = 8  # None: one head as wide as the block
    dropout: float = 0.0
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02


# The paper's CIFAR-10 model: ch 128, mult [1, 2, 2, 2], 2 res blocks, attention at 16x16, dropout 0.1.
PRESETS: dict[str, DDPMConfig] = {
    "tiny": DDPMConfig(),
    "fashion_mnist": DDPMConfig(image_size=28, block_out_channels=(32, 64, 128), attention_levels=(False, False, True)),
    "cifar10": DDPMConfig(
        image_size=32,
        channels=3,
        block_out_channels=(128, 256, 256, 256),
        attention_levels=(False, True, False, False),
        layers_per_block=2,
        norm_num_groups=32,
        attention_head_dim=None,
        dropout=0.1,
    ),
}


def unet_kwargs(config: DDPMConfig, num_classes: int) -> dict:
    levels = len(config.block_out_channels)
    if len(config.attention_levels) != levels:
        raise UsageError(
            f"attention_levels has {len(config.attention_levels)} entries but block_out_channels has {levels}"
        )
    if config.image_size % (2 ** (levels - 1)):
        raise UsageError(f"image_size {config.image_size} must be divisible by 2^{levels - 1} ({levels} levels)")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels))
    return dict(
        sample_size=config.image_size,
        in_channels=config.channels,
        out_channels=config.channels,
        block_out_channels=tuple(config.block_out_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        attention_head_dim=config.attention_head_dim,
        dropout=config.dropout,
        num_class_embeds=num_classes + 1,  # + the null class
    )


class ClassConditionalDDPM:
    """A class-conditional UNet2DModel + its DDPM noise schedule + the class names. See the module docstring."""

    def __init__(self, unet, scheduler, classes: Sequence[str], dataset: str | None = None) -> None:
        classes = [str(c) for c in classes]
        embeds = unet.config.num_class_embeds
        if embeds != len(classes) + 1:
            raise UsageError(
                f"the UNet has {embeds} class embeddings but {len(classes)} classes were given "
                "(expected num_classes + 1: the last embedding is the null class of classifier-free guidance)"
            )
        self.unet = unet
        self.scheduler = scheduler
        self.classes = classes
        self.dataset = dataset

    @classmethod
    def from_config(
        cls, config: DDPMConfig | str, classes: Sequence[str], *, dataset: str | None = None, seed: int | None = None
    ) -> ClassConditionalDDPM:
        from diffusers import DDPMScheduler, UNet2DModel

        if isinstance(config, str):
            if config not in PRESETS:
                raise UsageError(f"config: unknown DDPM preset {config!r}; expected one of {sorted(PRESETS)}")
            config = PRESETS[config]
        if seed is not None:
            torch.manual_seed(seed)
        unet = UNet2DModel(**unet_kwargs(config, len(classes)))
        scheduler = DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            clip_sample=True,
        )
        return cls(unet, scheduler, classes, dataset)

    # ------------------------------------------------------------------ properties
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def spec(self) -> DiffusionSpec:
        return DiffusionSpec(ClassConditioner(self.num_classes), self.scheduler)

    def to(self, device: torch.device | str) -> ClassConditionalDDPM:
        self.unet.to(device)
        return self

    def class_id(self, cls: int | str) -> int:
        """Index of a class given by index or name; a clear error for an unknown one."""
        if isinstance(cls, int) and not isinstance(cls, bool):
            if not 0 <= cls < self.num_classes:
                raise UsageError(f"class index {cls} is out of range: this model has classes 0..{self.num_classes - 1}")
            return cls
        if isinstance(cls, str):
            if cls in self.classes:
                return self.classes.index(cls)
            if cls.isdigit() and 0 <= int(cls) < self.num_classes:
                return int(cls)
        raise UsageError(f"class: unknown class {cls!r}; expected one of this model's classes {self.classes}")

    # ------------------------------------------------------------------ sampling
    def sampling_scheduler(self, sampler: str = "ddim"):
        from diffusers import DDIMScheduler, DDPMScheduler

        if sampler == "ddim":
            return DDIMScheduler.from_config(self.scheduler.config)  # eta = 0: deterministic given the noise
        if sampler == "ddpm":
            return DDPMScheduler.from_config(self.scheduler.config)
        raise UsageError(f"sampler: expected 'ddim' or 'ddpm', got {sampler!r}")

    @torch.no_grad()
    def sample(
        self,
        labels: Sequence[int | str] | torch.Tensor,
        *,
        guidance_scale: float = 3.0,
        num_inference_steps: int = 50,
        sampler: str = "ddim",
        seed: int = 0,
        batch_size: int = 500,
        progress: bool = False,
    ) -> torch.Tensor:
        """Images (float, [0, 1], N x C x H x W on the CPU) of the given classes with classifier-free guidance.

        Sample i starts from the noise of (seed, i) whatever the batch size, so two models sampled with the same
        seed start from the same noise: before/after comparisons are paired (exactly so with the deterministic
        DDIM sampler; the DDPM sampler also draws noise at every step, seeded per batch).
        """
        from tqdm.auto import tqdm

        check_guidance(guidance_scale)
        check_steps(num_inference_steps, self.spec.num_train_timesteps)
        if isinstance(labels, torch.Tensor):
            labels = labels.tolist()
        ids = torch.tensor([self.class_id(c) for c in labels], dtype=torch.long)
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(ids), self.channels, self.image_size, self.image_size), generator=gen)
        scheduler = self.sampling_scheduler(sampler)
        was_training = self.unet.training
        self.unet.eval()
        out = []
        try:
            for start in tqdm(range(0, len(ids), batch_size), desc="sample", disable=not progress, leave=False):
                x, _ = denoise(
                    self.unet,
                    self.spec,
                    scheduler,
                    noise[start : start + batch_size].to(self.device),
                    ids[start : start + batch_size].to(self.device),
                    guidance_scale=guidance_scale,
                    num_inference_steps=num_inference_steps,
                    generator=torch.Generator().manual_seed(seed + 1 + start),
                )
                out.append(x.float().cpu())
        finally:
            self.unet.train(was_training)
        return ((torch.cat(out) + 1) / 2).clamp_(0, 1) if out else noise[:0]

    # ------------------------------------------------------------------ files
    def save_pretrained(self, folder: PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet")
        self.scheduler.save_pretrained(folder / "scheduler")
        meta = {"format": FORMAT_NAME, "classes": self.classes, "dataset": self.dataset}
        write_json(meta, folder / CONFIG_NAME)  # last: a folder with this file is complete
        return folder

    @classmethod
    def from_pretrained(cls, folder: PathLike, device: torch.device | str = "cpu") -> ClassConditionalDDPM:
        from diffusers import DDPMScheduler, UNet2DModel

        folder = Path(folder)
        if not folder.is_dir():
            raise MissingFileError(f"DDPM folder not found: {folder}")
        missing = [p for p in (CONFIG_NAME, "unet", "scheduler") if not (folder / p).exists()]
        if missing:
            raise MissingFileError(
                f"{folder} is not a salun_ext class-conditional DDPM folder: missing {missing} "
                "(written by ClassConditionalDDPM.save_pretrained / `salun-ext diffusion train`)"
            )
        meta = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_NAME:
            raise UsageError(f"{folder / CONFIG_NAME}: not a salun_ext DDPM config (format={meta.get('format')!r})")
        unet = UNet2DModel.from_pretrained(folder / "unet")  # safetensors: no code runs
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        return cls(unet, scheduler, meta["classes"], meta.get("dataset")).to(device)


# ---------------------------------------------------------------------------------------------------- data


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 or [0, 1] float images -> float [0, 1] at size x size (bilinear, antialiased)."""
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
    return x


def dataset_to_set(model: ClassConditionalDDPM, dataset, classes: Sequence[int] | None = None) -> DiffusionSet:
    """An ImageDataset (uint8 N x C x H x W + labels) as DDPM training data in [-1, 1] at the model's size."""
    if dataset.channels != model.channels:
        raise UsageError(f"dataset {dataset.name!r} has {dataset.channels} channels, the model {model.channels}")
    if dataset.num_classes != model.num_classes:
        raise UsageError(f"dataset {dataset.name!r} has {dataset.num_classes} classes, the model {model.num_classes}")
    keep = torch.ones(len(dataset), dtype=torch.bool)
    if classes is not None:
        keep = torch.isin(dataset.labels, torch.tensor(list(classes), dtype=torch.long))
    x0 = resize_images(dataset.images[keep], model.image_size) * 2 - 1
    return DiffusionSet(x0, dataset.labels[keep].clone())


def next_other_class(labels: torch.Tensor, forget_classes: Sequence[int], num_classes: int) -> torch.Tensor:
    """c' of SalUn's forget loss as the paper's code: (c + 1) % C, skipping other forgotten classes."""
    if len(set(forget_classes)) >= num_classes:
        raise UsageError(f"forget_classes: every class is forgotten ({sorted(set(forget_classes))}); SalUn needs at "
                         "least one remaining class as c'")  # fmt: skip
    out = (labels + 1) % num_classes
    forgotten = torch.tensor(list(forget_classes), dtype=torch.long)
    while bool(torch.isin(out, forgotten).any()):
        bump = torch.isin(out, forgotten)
        out[bump] = (out[bump] + 1) % num_classes
    return out


def random_other_class(
    labels: torch.Tensor, forget_classes: Sequence[int], num_classes: int, generator: torch.Generator
) -> torch.Tensor:
    """c' drawn uniformly from the remaining classes, per example (the paper's text: any c' != c)."""
    remaining = torch.tensor([c for c in range(num_classes) if c not in set(forget_classes)], dtype=torch.long)
    if remaining.numel() == 0:
        raise UsageError(f"forget_classes: every class is forgotten ({sorted(set(forget_classes))}); SalUn needs at "
                         "least one remaining class as c'")  # fmt: skip
    return remaining[torch.randint(0, remaining.numel(), labels.shape, generator=generator)]


def forget_retain_sets(
    model: ClassConditionalDDPM,
    dataset,
    forget_classes: Sequence[int | str],
    *,
    target: str = "next",
    seed: int = 0,
) -> tuple[DiffusionSet, DiffusionSet]:
    """Class-wise forgetting data: the forget classes' images (with c' as target_ids) and every other image."""
    ids = sorted({model.class_id(c) for c in forget_classes})
    if not ids:
        raise UsageError(f"forget_classes: expected at least one class, got {list(forget_classes)}")
    full = dataset_to_set(model, dataset)
    is_forget = torch.isin(full.ids, torch.tensor(ids))
    if bool(is_forget.all()):
        raise UsageError(f"forget_classes: nothing is left to retain: every class is forgotten, got {ids}")
    if not bool(is_forget.any()):
        raise UsageError(f"forget_classes: the dataset has no example of {[model.classes[i] for i in ids]}")
    forget, retain = full.subset(is_forget), full.subset(~is_forget)
    if target == "next":
        forget.target_ids = next_other_class(forget.ids, ids, model.num_classes)
    elif target == "random":
        forget.target_ids = random_other_class(forget.ids, ids, model.num_classes, torch.Generator().manual_seed(seed))
    else:
        raise UsageError(f"target: expected 'next' or 'random', got {target!r}")
    return forget, retain
