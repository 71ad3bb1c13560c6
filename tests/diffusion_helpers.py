"""Shared builders of the diffusion tests: tiny models built once per test session."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from salun_ext.diffusion.ddpm import ClassConditionalDDPM, DDPMConfig

# ~100k parameters: fast enough for dozens of optimizer steps in a test
MICRO = DDPMConfig(
    image_size=8, channels=1, block_out_channels=(16, 32), attention_levels=(False, True), norm_num_groups=8
)


def micro_ddpm(seed: int = 0, classes: int = 10) -> ClassConditionalDDPM:
    return ClassConditionalDDPM.from_config(MICRO, [str(i) for i in range(classes)], dataset="digits", seed=seed)


@lru_cache(maxsize=1)
def digits():
    from salun_ext.data import load_dataset

    return load_dataset("digits")


@lru_cache(maxsize=1)
def _session_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="salun_diffusion_tests_"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@lru_cache(maxsize=1)
def tiny_pipeline_folder() -> Path:
    """A saved tiny Stable Diffusion pipeline (random weights, real CLIP tokenizer); built once per session."""
    from salun_ext.testing.diffusion import build_tiny_stable_diffusion

    folder = _session_dir() / "tiny-sd"
    build_tiny_stable_diffusion(folder)
    return folder


def load_tiny_sd():
    from salun_ext.diffusion.sd import StableDiffusion

    return StableDiffusion.from_pretrained(tiny_pipeline_folder(), device="cpu")


def random_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(seed))


def params_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}
