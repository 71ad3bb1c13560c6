"""SalUn's weight saliency for diffusion models: gradients of the forget set's guided noise-prediction loss.

    mask = diffusion_saliency(model.unet, model.spec, forget, guidance_scale=3.0, ratio=0.5)

loss = -MSE(eps, eps_hat(x_t | c_f)) with eps_hat = eps(null) + s (eps(c_f) - eps(null)), x_t from forget images
at t ~ U{0..T-1}; gradients summed over batches (each clipped to norm 1 first in the DDPM recipe), then |.|; the
global top `ratio` over every UNet parameter is salient. The ranking runs through salun_ext.compute_saliency (the
exact histogram select, 1 bit per parameter), never through a concatenation or int64 ranks.

Recipes (guidance in diffusers' convention s = 1 + w of the paper's code):
    DDPM: s = 3.0 (w = 2), per-batch clip 1.0, ratio 0.5, batch 128
    SD:   s = 8.5 (w = 7.5), no clipping, ratio 0.5, batch 8, one pass over the forget set
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from salun_ext.diffusion.core import DiffusionSet, DiffusionSpec, check_guidance, noisy_batch
from salun_ext.mask import SaliencyMask
from salun_ext.saliency import compute_saliency
from salun_ext.train.engine import to_device
from salun_ext.utils.seeding import epoch_generator


def saliency_batches(
    spec: DiffusionSpec, forget: DiffusionSet, *, batch_size: int, seed: int, device: torch.device
) -> Iterator[dict]:
    """One pass over the forget set with fresh t and noise (the "diffusion" stream, epoch 0), on `device`."""
    gen = epoch_generator(seed, 0, "diffusion")
    for index in torch.randperm(len(forget), generator=gen).split(batch_size):
        yield to_device(noisy_batch(spec, forget, index, gen), device)


def guided_forget_loss(spec: DiffusionSpec, guidance_scale: float, reduction: str = "mean"):
    """(unet, batch) -> -MSE(noise, guided eps) of a noised forget batch (the sign is irrelevant to |g|)."""
    check_guidance(guidance_scale)

    def loss_fn(unet: torch.nn.Module, batch: dict) -> torch.Tensor:
        x_t = spec.add_noise(batch["x0"], batch["noise"], batch["t"])
        eps_hat = spec.guided_eps(unet, x_t, batch["t"], batch["ids"], guidance_scale)
        err = (eps_hat - batch["noise"]).pow(2)
        return -(err.flatten(1).sum(1).mean() if reduction == "sum" else err.mean())

    return loss_fn


def diffusion_saliency(
    unet: torch.nn.Module,
    spec: DiffusionSpec,
    forget: DiffusionSet,
    *,
    ratio: float | Sequence[float] = 0.5,
    guidance_scale: float = 3.0,
    batch_size: int = 128,
    clip_grad_norm: float | None = 1.0,
    reduction: str = "mean",
    seed: int = 0,
    progress: bool = True,
    process_group: Any = None,
) -> SaliencyMask | list[SaliencyMask]:
    """Saliency mask(s) over every parameter of `unet` from one pass over the forget set (see the module doc).

    process_group: every rank makes the same seeded batches and the ranking is shared over the group, so every
    rank gets the one-process mask (compute_saliency's replicated_batches).
    """
    device = next(unet.parameters()).device
    batches = list(saliency_batches(spec, forget, batch_size=batch_size, seed=seed, device=device))
    return compute_saliency(
        unet,
        guided_forget_loss(spec, guidance_scale, reduction),
        batches,
        ratio,
        params="all",
        clip_grad_norm=clip_grad_norm,
        progress=progress,
        process_group=process_group,
        replicated_batches=process_group is not None,
    )
