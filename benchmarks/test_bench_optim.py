"""pytest-benchmark: masked optimizer steps vs torch's optimizers + grad.mul_(mask) (the paper code's recipe).

Baselines: torch's fused optimizer (`fused=True`, CPU and CUDA) and its foreach one, each after one
torch._foreach_mul_ of the dense float masks. `unet686x16` (the SD-UNet's 686 tensors, 16 elements each) measures
host overhead. For GB/s as % of copy bandwidth, ratios and mask memory see optim_table.py; compact vs dense
state (bytes, step time): compact_state.py.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.grad_lists import list_shapes
from benchmarks.optim_table import BASELINES, make_problem, optimizers

METHODS = ["salun_ext", *BASELINES]


def _setup(spec, density, algo, method, device):
    params, mask = make_problem(list_shapes(spec), density, device)
    named = [(str(i), p) for i, p in enumerate(params)]
    opt = optimizers(algo, params, named, mask)[method]
    if method == "salun_ext":
        return opt.step
    dense = [mask.dense(str(i)).float() for i in range(len(params))]
    grads = [p.grad for p in params]

    def step():
        torch._foreach_mul_(grads, dense)
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
    benchmark.pedantic(fn, rounds=10, warmup_rounds=3)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("algo", ["sgd", "adamw"])
@pytest.mark.parametrize("density", [0.01, 0.5])
@pytest.mark.parametrize("spec", ["unet686x16", "resnet18_cifar"])
def test_optim_cpu(benchmark, spec, density, algo, method):
    _bench(benchmark, spec, density, algo, method, "cpu")


@pytest.mark.cuda
@pytest.mark.gpu_bench
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("algo", ["sgd", "adamw"])
@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("spec", ["unet686x16", "resnet18_cifar", "sd15_unet"])
def test_optim_cuda(benchmark, spec, density, algo, method):
    _bench(benchmark, spec, density, algo, method, "cuda")


@pytest.mark.parametrize("state", ["dense", "compact"])
@pytest.mark.parametrize("algo", ["sgd", "adamw"])
@pytest.mark.parametrize("density", [0.01, 0.1, 0.5])
def test_compact_state_cpu(benchmark, density, algo, state):
    """Masked steps with state="compact" vs "dense" (strict mode); state bytes: compact_state.py."""
    from benchmarks.compact_state import make_optimizer

    params, mask = make_problem(list_shapes("resnet18_cifar"), density, "cpu")
    benchmark.extra_info.update(list="resnet18_cifar", density=density, state=state)
    benchmark.pedantic(make_optimizer(algo, params, mask, state).step, rounds=10, warmup_rounds=3)
