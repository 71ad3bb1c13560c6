"""pytest-benchmark: saliency masks, salun_ext vs the plain-torch baselines on the same gradient lists.

    make bench                                   (CPU lists)
    pytest benchmarks/test_bench_saliency.py -m "" --benchmark-enable   (adds the CUDA lists on a GPU)
For extra peak memory and a printable table see mask_table.py.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import baselines
from benchmarks.grad_lists import heavy_tailed_grads, list_shapes

CPU_LISTS = ["unet686x16", "synthetic:1e6:8", "synthetic:1e7:60", "resnet18_cifar"]
CUDA_LISTS = ["unet686x16", "resnet18_cifar", "sd15_unet", "synthetic:2e9:249"]
METHODS = ["salun_ext", "cat_topk", "radix_bincount", "upstream_argsort"]
CPU_METHODS = [*METHODS, "cat_partition"]  # numpy's introselect: a host baseline
_CACHE: dict = {}


def _grads(spec: str, device: str, dtype=torch.float32):
    key = (spec, device, dtype)
    if key not in _CACHE:
        _CACHE.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        _CACHE[key] = heavy_tailed_grads(list_shapes(spec), dtype, device)
    return _CACHE[key]


def _run(benchmark, spec, method, device, ratio=0.5):
    grads = _grads(spec, device)
    n = sum(g.numel() for g in grads)
    k = int(n * ratio)
    if method == "upstream_argsort" and n > 1.5e9:
        pytest.skip("argsort of more than 2^31 elements does not fit")
    if method == "salun_ext":
        import salun_ext

        fn = lambda: salun_ext.saliency_masks(grads, ratio)  # noqa: E731
    else:
        fn = lambda: baselines.METHODS[method](grads, k)  # noqa: E731
    if device == "cuda":

        def fn(inner=fn):
            out = inner()
            torch.cuda.synchronize()
            return out

    benchmark.extra_info.update(n=n, tensors=len(grads), device=device)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize("spec", CPU_LISTS)
def test_saliency_cpu(benchmark, spec, method):
    _run(benchmark, spec, method, "cpu")


@pytest.mark.cuda
@pytest.mark.gpu_bench
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", CUDA_LISTS)
def test_saliency_cuda(benchmark, spec, method):
    _run(benchmark, spec, method, "cuda")
