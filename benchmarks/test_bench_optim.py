"""pytest-benchmark: masked optimizer steps vs torch's optimizers + grad.mul_(mask) (the paper code's recipe).

For GB/s as % of copy bandwidth and mask memory see optim_table.py.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.grad_lists import list_shapes
from benchmarks.optim_table import make_problem


def _setup(spec, density, algo, method, device):
    from salun_ext.optim import MaskedAdamW, MaskedSGD

    params, mask = make_problem(list_shapes(spec), density, device)
    named = [(str(i), p) for i, p in enumerate(params)]
    if method == "salun_ext":
        opt = (
            MaskedSGD(named, lr=1e-3, momentum=0.9, weight_decay=5e-4, mask=mask)
            if algo == "sgd"
            else MaskedAdamW(named, lr=1e-3, weight_decay=1e-2, mask=mask)
        )
        return opt.step
    kw = {"fused": True} if device == "cuda" else {"foreach": True}
    opt = (
        torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4, **kw)
        if algo == "sgd"
        else torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, **kw)
    )
    dense = [mask.dense(str(i)).float() for i in range(len(params))]

    def step():
        torch._foreach_mul_([p.grad for p in params], dense)
        opt.step()

    return step


def _bench(benchmark, spec, density, algo, method, device):
    step = _setup(spec, density, algo, method, device)
    fn = step
    if device == "cuda":

        def fn():
            step()
            torch.cuda.synchronize()

    benchmark.extra_info.update(list=spec, density=density, device=device)
    benchmark.pedantic(fn, rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("method", ["salun_ext", "torch+mask"])
@pytest.mark.parametrize("algo", ["sgd", "adamw"])
@pytest.mark.parametrize("density", [0.01, 0.5])
def test_optim_cpu(benchmark, density, algo, method):
    _bench(benchmark, "resnet18_cifar", density, algo, method, "cpu")


@pytest.mark.cuda
@pytest.mark.gpu_bench
@pytest.mark.parametrize("method", ["salun_ext", "torch+mask"])
@pytest.mark.parametrize("algo", ["sgd", "adamw"])
@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("spec", ["resnet18_cifar", "sd15_unet"])
def test_optim_cuda(benchmark, spec, density, algo, method):
    _bench(benchmark, spec, density, algo, method, "cuda")
