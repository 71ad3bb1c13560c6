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


def tiny_clip_folder(folder: Path) -> Path:
    """A random CLIPModel + CLIPProcessor (with the real CLIP tokenizer) saved like a downloaded CLIP folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from salun_ext.diffusion.clip_tokenizer import write_clip_tokenizer

    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tok"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder / "clip")
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder / "clip")
    return folder / "clip"
