"""What every diffusion model of the suite shares: conditioning, noising, classifier-free guidance, batches.

Conditioning is always a tensor of integer ids, so one Task serves a class-conditional DDPM and Stable Diffusion:
- `ClassConditioner`: ids are class labels; id `num_classes` is the null class (the unconditional input of
  classifier-free guidance).
- `PromptConditioner`: ids index a table of text-encoder outputs; id 0 is the empty prompt "".

Guidance follows diffusers: eps = eps(x, null) + s * (eps(x, c) - eps(x, null)). The paper's DDPM code writes
(1 + w) eps(x, c) - w eps(x, null), which is the same with s = 1 + w (its w = 2.0 is s = 3.0 here).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from salun_ext.utils.errors import UsageError

# ---------------------------------------------------------------------------------------------------- validation


def check_guidance(scale: float, name: str = "guidance_scale") -> float:
    """A classifier-free guidance scale s >= 0 (0: unconditional, 1: conditional, > 1: guided)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale < 0:
        raise UsageError(f"{name} must be a finite number >= 0 (diffusers' convention, 7.5 for SD), got {scale}")
    return float(scale)


def check_steps(steps: int, num_train_timesteps: int, name: str = "num_inference_steps") -> int:
    """A number of sampling steps in [1, num_train_timesteps]."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"{name} must be an int, got {type(steps).__name__}")
    if not 1 <= steps <= num_train_timesteps:
        raise UsageError(f"{name} must be in [1, {num_train_timesteps}] (the training timesteps), got {steps}")
    return steps


def check_positive(value: float, name: str, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        raise UsageError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value}")


# ---------------------------------------------------------------------------------------------------- conditioning


def _param_dtype(unet: torch.nn.Module) -> torch.dtype:
    return next(unet.parameters()).dtype


class ClassConditioner:
    """Class-label conditioning of a `UNet2DModel` built with `num_class_embeds = num_classes + 1`."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.null_id = num_classes

    def __call__(self, unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return unet(x_t.to(_param_dtype(unet)), t, class_labels=ids).sample.float()


class PromptConditioner:
    """Prompt conditioning of a `UNet2DConditionModel`: ids index `embeddings` (P x L x D), row 0 = "".

    The text encoder is frozen in every method here, so prompts are encoded once; the table moves to each
    device once (not every step).
    """

    null_id = 0

    def __init__(self, embeddings: torch.Tensor, prompts: Sequence[str]) -> None:
        if embeddings.dim() != 3 or embeddings.shape[0] != len(prompts):
            raise UsageError(
                f"embeddings must be P x L x D with P = len(prompts) = {len(prompts)}, got {tuple(embeddings.shape)}"
            )
        if prompts[0] != "":
            raise UsageError(f"row 0 of a PromptConditioner must be the empty prompt, got {prompts[0]!r}")
        self.embeddings = embeddings.detach()
        self.prompts = list(prompts)
        self._by_device: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def id_of(self, prompt: str) -> int:
        try:
            return self.prompts.index(prompt)
        except ValueError:
            raise KeyError(
                f"prompt {prompt!r} is not in this conditioner's table ({len(self.prompts)} prompts)"
            ) from None

    def table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._by_device:
            self._by_device[key] = self.embeddings.to(device=device, dtype=dtype)
        return self._by_device[key]

    def __call__(self, unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        dtype = _param_dtype(unet)
        context = self.table(x_t.device, dtype)[ids]
        return unet(x_t.to(dtype), t, encoder_hidden_states=context).sample.float()


Conditioner = ClassConditioner | PromptConditioner


@dataclasses.dataclass
class DiffusionSpec:
    """How to noise and query one diffusion model: its conditioner and its training noise schedule."""

    conditioner: Conditioner
    scheduler: object  # a diffusers scheduler with add_noise + config.num_train_timesteps (the training schedule)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def null_id(self) -> int:
        return self.conditioner.null_id

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def eps(self, unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.conditioner(unet, x_t, t, ids)

    def guided_eps(
        self, unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """eps(null) + s (eps(c) - eps(null)), with both branches in one batched forward pass."""
        n = x_t.shape[0]
        if t.shape != (n,):
            raise UsageError(f"t must hold one timestep per sample ({n}), got shape {tuple(t.shape)}")
        both = self.eps(
            unet, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([ids, torch.full_like(ids, self.null_id)])
        )
        cond, uncond = both[:n], both[n:]
        return uncond + scale * (cond - uncond)


def eps_mse(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The standard eps loss. "mean": over every element; "sum": over C, H, W, then the mean over the batch
    (the paper's DDPM code; its alpha = 1e-3 is tuned for that scale)."""
    if reduction == "mean":
        return F.mse_loss(pred, target)
    if reduction == "sum":
        return (pred - target).pow(2).flatten(1).sum(1).mean()
    raise UsageError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")


@torch.no_grad()
def denoise(
    unet: torch.nn.Module,
    spec: DiffusionSpec,
    scheduler,
    x: torch.Tensor,
    ids: torch.Tensor,
    *,
    guidance_scale: float,
    num_inference_steps: int,
    stop_after: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the reverse process from `x` (noise at t = T) with classifier-free guidance.

    Returns (x, t_next): the sample after all steps (t_next None), or after `stop_after` steps together with the
    timestep of the next step (ESD takes its loss there). `scheduler` is a sampling scheduler (DDIM, DDPM, ...);
    its state is reset here.
    """
    scale = check_guidance(guidance_scale)
    check_steps(num_inference_steps, spec.num_train_timesteps)
    scheduler.set_timesteps(num_inference_steps, device=x.device)
    x = x * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        if stop_after is not None and i >= stop_after:
            return x, t.reshape(1).expand(x.shape[0])
        model_in = scheduler.scale_model_input(x, t)
        eps = spec.guided_eps(unet, model_in, t.reshape(1).expand(x.shape[0]), ids, scale)
        x = scheduler.step(eps.to(x.dtype), t, x, generator=generator).prev_sample
    return x, None


# ---------------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class DiffusionSet:
    """Examples in the UNet's input space with their conditioning ids.

    x0: images in [-1, 1] (pixel diffusion), or VAE posterior moments (mean and log-variance stacked on the channel
        axis) when `latent_scale` is set: each draw samples a fresh latent, like diffusers' training scripts.
    ids: conditioning ids (class labels or prompt-table rows).
    target_ids: c' for SalUn's forget loss (the misaligned class / prompt), or None.
    """

    x0: torch.Tensor
    ids: torch.Tensor
    target_ids: torch.Tensor | None = None
    latent_scale: float | None = None

    def __post_init__(self) -> None:
        if self.x0.dim() != 4:
            raise UsageError(f"DiffusionSet.x0 must be N x C x H x W, got shape {tuple(self.x0.shape)}")
        if self.ids.shape != (self.x0.shape[0],):
            raise UsageError(f"DiffusionSet: {self.x0.shape[0]} examples but ids of shape {tuple(self.ids.shape)}")
        if self.target_ids is not None and self.target_ids.shape != self.ids.shape:
            raise UsageError(f"DiffusionSet.target_ids: expected the shape of ids {tuple(self.ids.shape)}, got "
                             f"{tuple(self.target_ids.shape)}")  # fmt: skip
        if len(self) == 0:
            raise UsageError("DiffusionSet: expected at least one example, got none (the set is empty)")

    def __len__(self) -> int:
        return self.ids.numel()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        c, h, w = self.x0.shape[1:]
        return (c // 2, h, w) if self.latent_scale is not None else (c, h, w)

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = self.x0[index]
        if self.latent_scale is None:
            return x.float()
        mean, logvar = x.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return (mean + std * torch.randn(mean.shape, generator=generator)) * self.latent_scale

    def digest(self) -> str:
        """What identifies these examples (contents of x0, ids, target ids; the latent scale)."""
        from salun_ext.utils.fingerprint import digest, state_digest

        parts = [("x0", self.x0), ("ids", self.ids)]
        if self.target_ids is not None:
            parts.append(("target_ids", self.target_ids))
        return digest([state_digest(parts), self.latent_scale])

    def subset(self, keep: torch.Tensor) -> DiffusionSet:
        return DiffusionSet(
            self.x0[keep],
            self.ids[keep],
            None if self.target_ids is None else self.target_ids[keep],
            self.latent_scale,
        )


def cycled_batches(n: int, batch_size: int, count: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`count` index batches of min(batch_size, n) from a stream of fresh permutations of range(n)."""
    size = min(batch_size, n)
    pool = torch.empty(0, dtype=torch.long)
    for _ in range(count):
        while pool.numel() < size:
            pool = torch.cat([pool, torch.randperm(n, generator=generator)])
        yield pool[:size]
        pool = pool[size:]


def sample_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator, antithetic: bool = False):
    """t ~ U{0..T-1}; antithetic pairs (t, T-1-t) as the paper's DDPM code (lower-variance loss estimates)."""
    if not antithetic:
        return torch.randint(0, num_train_timesteps, (n,), generator=generator)
    half = torch.randint(0, num_train_timesteps, ((n + 1) // 2,), generator=generator)
    return torch.cat([half, num_train_timesteps - 1 - half])[:n]


def noisy_batch(
    spec: DiffusionSpec,
    data: DiffusionSet,
    index: torch.Tensor,
    generator: torch.Generator,
    *,
    cond_drop: float = 0.0,
    antithetic: bool = False,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """x0, ids (null with probability cond_drop), target ids, t and noise of one batch (all drawn on the CPU)."""
    x0 = data.draw(index, generator)
    ids = data.ids[index].clone()
    if cond_drop > 0:
        ids[torch.rand(ids.shape, generator=generator) < cond_drop] = spec.null_id
    out = {
        prefix + "x0": x0,
        prefix + "ids": ids,
        prefix + "t": sample_timesteps(len(index), spec.num_train_timesteps, generator, antithetic),
        prefix + "noise": torch.randn(x0.shape, generator=generator),
    }
    if data.target_ids is not None:
        out[prefix + "target_ids"] = data.target_ids[index]
    return out
