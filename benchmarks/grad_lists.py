"""Realistic gradient lists for the benchmarks: real models' parameter shapes, heavy-tailed magnitudes.

Shapes come from JSON files in shapes/ (written from the real model definitions, so GPU machines without
diffusers/transformers can use them): ResNet-18 with the CIFAR stem (11.2M in 62 tensors), the Stable Diffusion
v1 UNet (860M in 686 tensors), Llama-2-7B (6.7B in 291 tensors). `synthetic:N:T` gives N elements in T tensors;
`unet686x16` the UNet's tensor count with 16 elements each (what a step costs besides moving bytes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

SHAPES_DIR = Path(__file__).parent / "shapes"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def list_shapes(spec: str) -> list[tuple[int, ...]]:
    """'resnet18_cifar', 'sd15_unet', 'llama7b', 'unet686x16' (686 tensors of 16 elements), or
    'synthetic:<elements>:<tensors>' (e.g. synthetic:1e7:60)."""
    if spec == "unet686x16":  # the SD-UNet's tensor count with 16 elements each: host overhead, not bandwidth
        return [(16,)] * 686
    if spec.startswith("synthetic:"):
        _, n, t = spec.split(":")
        total, tensors = int(float(n)), int(t)
        base = total // tensors
        sizes = [base] * tensors
        sizes[-1] += total - base * tensors
        return [(s,) for s in sizes]
    data = json.loads((SHAPES_DIR / f"{spec}.json").read_text())
    return [tuple(shape) for _, shape in data["tensors"]]


def heavy_tailed_grads(shapes, dtype=torch.float32, device="cpu", seed=0) -> list[torch.Tensor]:
    """normal * lognormal magnitudes (many decades, like real gradients), generated tensor by tensor."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for shape in shapes:
        g = torch.randn(shape, generator=gen, device=device)
        g.mul_(torch.randn(shape, generator=gen, device=device).mul_(2.0).exp_())
        out.append(g.to(dtype))
    return out


def numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)
