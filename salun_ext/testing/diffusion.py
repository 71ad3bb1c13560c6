"""Tiny, randomly initialised diffusion models that build and run on a CPU in seconds, with no download.

They exercise every code path of the diffusion suite (tests, the GPU benchmark's CPU smoke mode, trying the Stable
Diffusion workflow before fetching 4 GB of weights). The CLIP tokenizer is the real one: its BPE vocabulary ships
inside `open_clip_torch`, so token ids match Stable Diffusion v1's exactly.
"""

from __future__ import annotations

import os

from salun_ext.diffusion.clip_tokenizer import open_clip_bpe_path, write_clip_tokenizer  # noqa: F401 (re-exported)

PathLike = str | os.PathLike


def tiny_ddpm_unet_config(image_size: int = 16, channels: int = 1, num_classes: int = 10) -> dict:
    """UNet2DModel kwargs of a ~1M-parameter class-conditional UNet (one attention level) for 16x16 images."""
    return dict(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=num_classes + 1,  # + the null class of classifier-free guidance
    )


# UNet2DConditionModel configs: a tiny one (64x64 images -> 8x8x4 latents, cross-attention width 32) and the
# SD v1.x architecture (859.5M parameters; random weights when built from it, for memory/speed measurements).
TINY_SD_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
SD_V1_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)


def build_tiny_stable_diffusion(folder: PathLike | None = None, *, seed: int = 0):
    """A StableDiffusionPipeline with tiny random UNet/VAE/text encoder and the real CLIP tokenizer.

    64x64 images -> 8x8x4 latents; cross-attention width 32. Saved with `save_pretrained(folder)` when a folder
    is given (the on-disk layout of a real SD checkpoint: model_index.json + one folder per component).
    """
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SD_UNET)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if folder is not None:
        pipe.save_pretrained(folder)
    return pipe
