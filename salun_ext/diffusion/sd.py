"""Stable Diffusion on diffusers, prepared for unlearning.

    sd = StableDiffusion.from_pretrained("CompVis/stable-diffusion-v1-4", dtype="bf16", gradient_checkpointing=True)
    forget = generate_prompt_set(sd, "a photo of a nude person", 800, "data/nude")       # or load_image_folder(...)
    retain = generate_prompt_set(sd, "a photo of a person wearing clothes", 800, "data/clothed")
    spec, forget_set, retain_set = concept_sets(sd, forget, [retain], target_prompt=retain.prompt)

Precision: the frozen parts (VAE, text encoder) run in `dtype`; the UNet that is trained keeps fp32 master weights
and trains under bf16/fp16 autocast (the Engine's `amp`). Pure-bf16 weights would silently drop Adam updates of
lr 1e-5 (below bf16's resolution at typical weight magnitudes). Prompts are encoded once (the text encoder is
frozen in every method); images are encoded once to VAE posterior moments, and each step samples a latent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from salun_ext.diffusion.core import DiffusionSet, DiffusionSpec, PromptConditioner, check_guidance, check_steps
from salun_ext.utils import resolve_device
from salun_ext.utils.errors import MissingFileError, UsageError

PathLike = str | os.PathLike
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# The paper's settings: the NSFW concept (forget / retain prompts), and class-wise forgetting on Imagenette.
CONCEPTS: dict[str, tuple[str, str]] = {
    "nudity": ("a photo of a nude person", "a photo of a person wearing clothes"),
}
CLASS_PROMPT = "an image of a {}"
IMAGENETTE_CLASSES = [
    "tench",
    "English springer",
    "cassette player",
    "chain saw",
    "church",
    "French horn",
    "garbage truck",
    "gas pump",
    "golf ball",
    "parachute",
]
IMAGENETTE_TO_IMAGENET = dict(zip(IMAGENETTE_CLASSES, [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]))


def concept_prompts(concept: str) -> tuple[str, str]:
    """(forget prompt, retain/target prompt) of a named concept; a clear error for an unknown one."""
    if concept not in CONCEPTS:
        raise UsageError(
            f"unknown concept {concept!r}; known concepts: {sorted(CONCEPTS)} (or give the prompts directly)"
        )
    return CONCEPTS[concept]


def check_pipeline_folder(folder: Path) -> None:
    """Raise MissingFileError naming every missing component of a local diffusers pipeline folder."""
    if not (folder / "model_index.json").is_file():
        raise MissingFileError(
            f"{folder} is not a diffusers pipeline folder: model_index.json is missing "
            f"(expected model_index.json and the components {list(REQUIRED_COMPONENTS)})"
        )
    missing = [c for c in REQUIRED_COMPONENTS if not (folder / c).is_dir() or not any((folder / c).iterdir())]
    if missing:
        raise MissingFileError(
            f"pipeline folder {folder} is missing component(s) {missing} "
            f"(a Stable Diffusion pipeline needs {list(REQUIRED_COMPONENTS)})"
        )


def load_pipeline(
    source: PathLike,
    *,
    dtype: str = "fp32",
    device: str = "auto",
    gradient_checkpointing: bool = False,
    attention_slicing: bool = False,
):
    """A StableDiffusionPipeline from a local folder or a hub id (no safety checker: the evaluation measures nudity).

    dtype: "fp32" | "bf16" | "fp16" for every component. A local folder is checked first, naming any missing
    component; a hub id goes through diffusers' cache (offline machines need it downloaded beforehand).
    """
    from diffusers import StableDiffusionPipeline

    if dtype not in DTYPES:
        raise UsageError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    device = resolve_device(device)
    if dtype == "fp16" and device.type != "cuda":
        raise UsageError(f"dtype: 'fp16' needs a CUDA device, got device {str(device)!r} (use 'bf16' or 'fp32')")
    text = os.fspath(source)
    path = Path(text).expanduser()
    looks_local = path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1
    if looks_local:
        if not path.is_dir():
            raise MissingFileError(f"pipeline folder not found: {path} (and {text!r} is not a hub id 'owner/name')")
        check_pipeline_folder(path)
    kwargs = dict(torch_dtype=DTYPES[dtype], safety_checker=None, requires_safety_checker=False)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(path) if looks_local else text, **kwargs)
    except (OSError, ValueError) as exc:
        where = f"folder {path}" if looks_local else f"hub id {text!r} (not in the local cache and no network?)"
        raise OSError(f"could not load a Stable Diffusion pipeline from {where}: {exc}") from exc
    pipe.to(device)
    if gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    if attention_slicing:
        pipe.enable_attention_slicing()
    return pipe


@dataclasses.dataclass
class PromptedImages:
    """Images that show `prompt`: float [0, 1] N x 3 x H x W, or an image folder read (up to `limit` files) only
    when encoded, so a class-wise dataset is never held in memory as pixels all at once."""

    images: torch.Tensor | Path
    prompt: str
    limit: int | None = None

    def load(self, size: int) -> torch.Tensor:
        if isinstance(self.images, torch.Tensor):
            return self.images
        return load_image_folder(self.images, size, limit=self.limit)


class StableDiffusion:
    """A StableDiffusionPipeline with the pieces unlearning needs. See the module docstring."""

    def __init__(self, pipe, *, train_unet_fp32: bool = True) -> None:
        self.pipe = pipe
        self.dtype = pipe.text_encoder.dtype
        if train_unet_fp32 and pipe.unet.dtype != torch.float32:
            pipe.unet.to(torch.float32)
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, source: PathLike, **kwargs) -> StableDiffusion:
        """`load_pipeline(source, **kwargs)` wrapped (keywords: dtype, device, gradient_checkpointing, ...)."""
        return cls(load_pipeline(source, **kwargs))

    # ------------------------------------------------------------------ components
    @property
    def unet(self):
        return self.pipe.unet

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def training_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipe.scheduler.config)

    # ------------------------------------------------------------------ prompts
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids (P x max_length), padded; prompts over the tokenizer's limit are truncated with a warning."""
        if isinstance(prompts, str):
            prompts = [prompts]
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}")
            n = len(self.tokenizer(p, truncation=False, verbose=False).input_ids)
            if n > self.max_length:
                warnings.warn(
                    f"prompt has {n} tokens (with start/end), over the tokenizer's limit of {self.max_length}: "
                    f"truncated to its first {self.max_length - 2} tokens: {p[:80]!r}...",
                    stacklevel=2,
                )
        return self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Text-encoder hidden states (P x max_length x D) in the encoder's dtype, on the pipeline's device."""
        ids = self.tokenize(prompts).to(self.pipe.text_encoder.device)
        return torch.cat([self.pipe.text_encoder(chunk)[0] for chunk in ids.split(batch_size)])

    def conditioner(self, prompts: Sequence[str]) -> PromptConditioner:
        """A PromptConditioner over "" + the distinct prompts (in first-seen order)."""
        table = [""] + [p for p in dict.fromkeys(prompts) if p != ""]
        return PromptConditioner(self.encode_prompts(table), table)

    def spec(self, prompts: Sequence[str]) -> DiffusionSpec:
        return DiffusionSpec(self.conditioner(prompts), self.training_scheduler())

    def token_columns(self, prompt: str, concept: str, *, use_pooler: bool = False) -> list[int]:
        """Positions of `concept`'s tokens inside `prompt`'s token sequence (FMN re-steers attention there).

        use_pooler: also every end-of-text position (on SD v1 the padding is end-of-text too), as FMN's default
        config does (`use_pooler`).
        """
        full = self.tokenize([prompt])[0].tolist()
        sub = self.tokenizer(concept, add_special_tokens=False).input_ids
        if not sub:
            raise UsageError(f"concept {concept!r} has no tokens")
        for start in range(len(full) - len(sub) + 1):
            if full[start : start + len(sub)] == sub:
                columns = list(range(start, start + len(sub)))
                if use_pooler:
                    eos = self.tokenizer.eos_token_id
                    columns += [i for i, token in enumerate(full) if token == eos and i not in columns]
                return columns
        raise UsageError(f"concept {concept!r} does not occur in prompt {prompt!r} (as tokens)")

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """VAE posterior moments (N x 2C x h x w: mean, log-variance; float32 on the CPU) of [0, 1] images."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise UsageError(f"images must be N x 3 x H x W in [0, 1], got shape {tuple(images.shape)}")
        vae = self.pipe.vae
        out = []
        for chunk in images.split(batch_size):
            x = (chunk.to(self.device, vae.dtype) * 2 - 1).clamp(-1, 1)
            out.append(vae.encode(x).latent_dist.parameters.float().cpu())
        return torch.cat(out)

    def latent_scale(self) -> float:
        return float(self.pipe.vae.config.scaling_factor)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int],
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        batch_size: int = 4,
        progress: bool = False,
        latents: torch.Tensor | None = None,
        scheduler: str | None = None,
    ) -> torch.Tensor:
        """Images (float [0, 1], N x 3 x H x W, CPU) of prompts[i] from the noise of seeds[i].

        latents: the initial latents themselves (N x latent_shape; then seeds only name the images).
        scheduler: None (the pipeline's) or "lms" (an LMSDiscreteScheduler with the pipeline's noise schedule).
        """
        check_guidance(guidance_scale)
        check_steps(num_inference_steps, int(self.pipe.scheduler.config.num_train_timesteps))
        if len(prompts) != len(seeds):
            raise UsageError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        if latents is not None and tuple(latents.shape) != (len(prompts), *self.latent_shape):
            raise UsageError(f"latents: expected {(len(prompts), *self.latent_shape)}, got {tuple(latents.shape)}")
        with self._sampling_scheduler(scheduler):
            return self._generate(prompts, seeds, guidance_scale, num_inference_steps, batch_size, progress, latents)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """C x h x w of the UNet's input for this pipeline's resolution."""
        side = int(self.pipe.unet.config.sample_size)
        return (int(self.pipe.unet.config.in_channels), side, side)

    @contextlib.contextmanager
    def _sampling_scheduler(self, name: str | None):
        if name is None:
            yield
            return
        if name != "lms":
            raise UsageError(f"scheduler: expected None or 'lms', got {name!r}")
        from diffusers import LMSDiscreteScheduler

        previous = self.pipe.scheduler
        self.pipe.scheduler = LMSDiscreteScheduler.from_config(previous.config)
        try:
            yield
        finally:
            self.pipe.scheduler = previous

    def _generate(self, prompts, seeds, guidance_scale, num_inference_steps, batch_size, progress, latents):
        self.pipe.set_progress_bar_config(disable=not progress)
        unet_dtype = self.unet.dtype
        negative = self.encode_prompts([""]).to(unet_dtype)
        out = []
        device = self.device
        autocast = unet_dtype != self.dtype  # fp32 UNet next to bf16/fp16 VAE and text encoder
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            embeds = self.encode_prompts(chunk).to(unet_dtype)
            gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]]
            given = None if latents is None else latents[start : start + batch_size].to(device, unet_dtype)
            with torch.autocast(device.type, dtype=self.dtype, enabled=autocast):
                images = self.pipe(
                    prompt_embeds=embeds,
                    negative_prompt_embeds=negative.expand(len(chunk), -1, -1),
                    guidance_scale=guidance_scale,
                    num_inference_steps=num_inference_steps,
                    generator=gens,
                    latents=given,
                    output_type="pt",
                ).images
            out.append(images.float().cpu())
        return torch.cat(out)

    def save_pretrained(self, folder: PathLike) -> Path:
        """The whole pipeline (the unlearned UNet with the original VAE, text encoder, tokenizer, scheduler)."""
        self.pipe.save_pretrained(folder)
        return Path(folder)


# ---------------------------------------------------------------------------------------------------- image sets


def load_image_folder(folder: PathLike, size: int, *, limit: int | None = None) -> torch.Tensor:
    """Every image file of a folder (sorted by name) as float [0, 1] RGB, resized (shorter side) + centre-cropped."""
    from PIL import Image
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UsageError(f"image folder {folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    files = files[:limit] if limit is not None else files
    images = []
    for p in files:
        with Image.open(p) as img:
            x = pil_to_tensor(img.convert("RGB"))
        images.append(center_crop(resize(x, size, antialias=True), [size, size]))
    return torch.stack(images).float().div_(255.0)


def class_folders(root: PathLike, classes: Sequence[str] | None = None) -> dict[str, Path]:
    """root/<class name>/ image folders (all of them, or the given classes in that order); a clear error for a
    class without a folder."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"class folder root not found: {root}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not found:
        raise UsageError(f"{root} has no class folder (expected root/<class name>/*.png|jpg)")
    classes = found if classes is None else list(classes)
    missing = [c for c in classes if c not in found]
    if missing:
        raise UsageError(f"unknown class(es) {missing}: {root} has class folders {found}")
    return {c: root / c for c in classes}


def load_class_folders(
    root: PathLike, classes: Sequence[str], size: int, *, limit: int | None = None
) -> dict[str, torch.Tensor]:
    """The images of root/<class name>/ folders, loaded (see `class_folders`)."""
    return {c: load_image_folder(p, size, limit=limit) for c, p in class_folders(root, classes).items()}


def save_images(images: torch.Tensor, folder: PathLike, prefix: str = "") -> list[Path]:
    """Write float [0, 1] images as numbered PNGs."""
    from torchvision.utils import save_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(folder / f"{prefix}{i:05d}.png")
        save_image(img, paths[-1])
    return paths


def generate_prompt_set(
    sd: StableDiffusion,
    prompt: str,
    n: int,
    folder: PathLike | None = None,
    *,
    seed: int = 0,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    batch_size: int = 4,
    progress: bool = True,
) -> PromptedImages:
    """n images of `prompt` generated by the pipeline itself (the paper's forget/retain sets: 800 each).

    With a folder, the PNGs are written there, and a folder that already holds n images is read instead.
    """
    if folder is not None and Path(folder).is_dir():
        existing = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if len(existing) >= n:
            return PromptedImages(load_image_folder(folder, sd.resolution, limit=n), prompt)
    images = sd.generate(
        [prompt] * n,
        seeds=[seed + i for i in range(n)],
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        batch_size=batch_size,
        progress=progress,
    )
    if folder is not None:
        save_images(images, folder)
    return PromptedImages(images, prompt)


def concept_sets(
    sd: StableDiffusion,
    forget: PromptedImages | Sequence[PromptedImages],
    retain: Sequence[PromptedImages],
    *,
    target_prompt: str,
    batch_size: int = 8,
) -> tuple[DiffusionSpec, DiffusionSet, DiffusionSet | None]:
    """Encode forget/retain images (VAE moments) and prompts (one table) into a spec and two DiffusionSets.

    target_prompt: c' of SalUn's forget loss (NSFW: "a photo of a person wearing clothes"; class-wise: the prompt
    of class (k + 1) % 10, as the paper's code).
    """
    forget = [forget] if isinstance(forget, PromptedImages) else list(forget)
    if not forget:
        raise UsageError("no forget images given")
    prompts = [f.prompt for f in forget] + [target_prompt] + [r.prompt for r in retain]
    spec = sd.spec(prompts)
    cond = spec.conditioner
    scale = sd.latent_scale()

    def encode(items: Sequence[PromptedImages], with_target: bool) -> DiffusionSet:
        moments = [sd.encode_images(it.load(sd.resolution), batch_size) for it in items]
        x0 = torch.cat(moments)
        ids = torch.cat(
            [torch.full((len(m),), cond.id_of(it.prompt), dtype=torch.long) for m, it in zip(moments, items)]
        )
        target = torch.full_like(ids, cond.id_of(target_prompt)) if with_target else None
        return DiffusionSet(x0, ids, target, latent_scale=scale)

    return spec, encode(forget, True), (encode(retain, False) if retain else None)


def class_wise_sets(
    sd: StableDiffusion,
    images_by_class: dict[str, torch.Tensor | Path],
    forget_class: str,
    *,
    template: str = CLASS_PROMPT,
    limit: int | None = None,
    batch_size: int = 8,
) -> tuple[DiffusionSpec, DiffusionSet, DiffusionSet | None]:
    """Class-wise forgetting (prompts "an image of a {class}"): c' = the next class's prompt, as the paper's code.

    images_by_class: class name -> images or an image folder (read lazily, up to `limit` images per class).
    """
    classes = list(images_by_class)
    if forget_class not in images_by_class:
        raise UsageError(f"unknown class {forget_class!r}; classes: {classes}")
    k = classes.index(forget_class)
    target = template.format(classes[(k + 1) % len(classes)])
    forget = PromptedImages(images_by_class[forget_class], template.format(forget_class), limit)
    retain = [PromptedImages(v, template.format(c), limit) for c, v in images_by_class.items() if c != forget_class]
    return concept_sets(sd, forget, retain, target_prompt=target, batch_size=batch_size)
