"""Test helpers: devices, dtypes, readable ids, and generators of nasty gradient lists."""

from __future__ import annotations

import os

import pytest
import torch

# `make test` sets SALUN_EXT_REQUIRE_NATIVE=1: the compiled kernels must have loaded
REQUIRE_NATIVE = os.environ.get("SALUN_EXT_REQUIRE_NATIVE") == "1"

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
KEY_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def describe_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(
        dtype, str(dtype)
    )


def id_formatter(label: str):
    def fmt(value):
        if isinstance(value, torch.dtype):
            value = describe_dtype(value)
        return f"{label}={value}"

    return fmt


VALUE_KINDS = [
    "heavy",  # normal * lognormal over many decades
    "zeros30",  # 30% exact zeros
    "zeros90",  # 90% exact zeros: the threshold sits on 0, massive ties
    "ties",  # a handful of distinct values
    "denormal",  # subnormal magnitudes mixed with tiny normals
    "signed_zero",  # +0 / -0 mixed with a few values
    "inf",  # +-Inf mixed in
    "narrow",  # [1, 1.00003]: all keys in one top bucket
]


def nasty_values(n: int, kind: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    def randn(m):
        return torch.randn(m, generator=gen)

    if kind == "heavy":
        x = randn(n) * torch.exp(randn(n) * 4)
    elif kind in ("zeros30", "zeros90"):
        x = randn(n) * torch.exp(randn(n) * 2)
        frac = 0.3 if kind == "zeros30" else 0.9
        x[torch.rand(n, generator=gen) < frac] = 0.0
    elif kind == "ties":
        choices = torch.tensor([0.0, 0.5, -0.5, 1.0, 2.0, -2.0])
        x = choices[torch.randint(0, len(choices), (n,), generator=gen)]
    elif kind == "denormal":
        tiny = torch.finfo(dtype).tiny
        x = randn(n) * tiny * torch.rand(n, generator=gen)
        x[torch.rand(n, generator=gen) < 0.2] = tiny * 4
    elif kind == "signed_zero":
        x = torch.zeros(n)
        x[torch.rand(n, generator=gen) < 0.5] = -0.0
        pick = torch.rand(n, generator=gen) < 0.1
        x[pick] = randn(int(pick.sum()))
    elif kind == "inf":
        x = randn(n)
        x[torch.rand(n, generator=gen) < 0.05] = float("inf")
        x[torch.rand(n, generator=gen) < 0.05] = float("-inf")
    elif kind == "narrow":
        x = 1.0 + torch.rand(n, generator=gen) * 3e-5
    else:
        raise ValueError(kind)
    return x.to(dtype)


def nasty_list(
    sizes: list[int], kind: str, dtypes: list[torch.dtype], seed: int = 0, device: str = "cpu"
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [nasty_values(n, kind, dtypes[i % len(dtypes)], gen).to(device) for i, n in enumerate(sizes)]


def oracle_keys(tensors: list[torch.Tensor], nan_as_zero: bool = True) -> torch.Tensor:
    """int64 keys of the concatenation (test oracle only: concatenation is exactly what the library avoids)."""
    from salun_ext.ops import _reference

    return torch.cat([_reference.keys(t.cpu(), nan_as_zero) for t in tensors])


def oracle_exact_mask(tensors: list[torch.Tensor], k: int, nan_as_zero: bool = True) -> torch.Tensor:
    """Flat bool mask: the ranks of a stable descending argsort of the concatenated keys below k."""
    keys = oracle_keys(tensors, nan_as_zero)
    order = torch.argsort(-keys, stable=True)
    mask = torch.zeros(keys.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def flat_dense(mask) -> torch.Tensor:
    return (
        torch.cat([mask.dense(n).reshape(-1).cpu() for n in mask.names])
        if mask.names
        else torch.zeros(0, dtype=torch.bool)
    )
