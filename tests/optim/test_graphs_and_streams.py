"""Masked steps and CUDA graphs, streams and host scalars: tables never uploaded or freed under a graph, host
lr / grad_scale / found_inf read without a copy (and refused inside a capture), replays equal to eager steps."""

from __future__ import annotations

import copy

import pytest
import torch

import salun_ext
from salun_ext import ops
from salun_ext.optim import MaskedAdamW, MaskedSGD
from salun_ext.optim._base import on_device
from tests.helpers import DEVICES

LR = 2.0**-7  # exactly a float32: a float lr and a float32 lr tensor then step identically


def _model(device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3)).to(device)


def _mask(model, ratio=0.5, seed=2):
    gen = torch.Generator().manual_seed(seed)
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    return salun_ext.saliency_masks(grads, ratio)


def _grads(model, step):
    """Fixed gradients of one step (the same for a model and its copy)."""
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(p.device) for p in model.parameters()]


def _set_grads(model, grads):
    """Gradients written in place once they exist: a captured graph reads them at fixed addresses."""
    for p, g in zip(model.parameters(), grads):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def test_on_device_leaves_cpu_scalars_on_the_cpu():
    # the CUDA kernels read a CPU scalar on the host; a copy to the GPU would synchronise the stream every step
    cpu = torch.tensor(0.5)
    assert on_device(cpu, torch.device("cuda", 0)) is cpu
    assert on_device(cpu, torch.device("cpu")) is cpu
    assert on_device(None, torch.device("cuda", 0)) is None
    meta = torch.tensor(0.5, device="meta")
    assert on_device(meta, torch.device("meta")) is meta


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_class", [MaskedSGD, MaskedAdamW], ids=lambda c: c.__name__)
def test_a_cpu_lr_tensor_steps_like_the_float(device, opt_class):
    with_tensor, with_float = _model(device), _model(device)
    mask = _mask(with_tensor)
    extra = dict(momentum=0.9) if opt_class is MaskedSGD else {}
    opt_t = opt_class(with_tensor.named_parameters(), lr=torch.tensor(LR), mask=mask, **extra)  # on the CPU
    opt_f = opt_class(with_float.named_parameters(), lr=LR, mask=mask, **extra)
    for step in range(3):
        for model, opt in ((with_tensor, opt_t), (with_float, opt_f)):
            _set_grads(model, _grads(model, step))
            opt.step()
    for a, b in zip(with_tensor.parameters(), with_float.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(with_tensor.parameters()), next(_model(device).parameters()))  # it did step


def _adam_lists(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = [300, 5, 4097]
    lists = [[torch.randn(n, generator=gen).to(device) for n in sizes] for _ in range(4)]
    lists[3] = [t.abs() for t in lists[3]]  # exp_avg_sq >= 0
    words = [ops.pack_bits(torch.rand(n, generator=gen) < 0.5).to(device) for n in sizes]
    steps = [torch.tensor(3.0, device=device) for _ in sizes]
    return lists, words, steps


@pytest.mark.parametrize("device", DEVICES)
def test_cpu_grad_scale_and_found_inf_match_device_ones(device):
    """CPU grad_scale / found_inf / lr_tensor give the same bits as tensors on the parameters' device."""
    results = []
    for where in ("cpu", device):
        (params, grads, m, v), words, steps = _adam_lists(device)
        scalars = dict(
            lr_tensor=torch.tensor(3e-3, device=where),
            grad_scale=torch.tensor(512.0, device=where),
            found_inf=torch.tensor(0.0, device=where),
        )
        ops.masked_adam_(params, grads, m, v, [], steps, words, lr=1e-3, weight_decay=1e-2, **scalars)
        results.append(params + m + v)
    for got, want in zip(*results):
        assert torch.equal(got, want)
    assert not torch.equal(results[0][0], _adam_lists(device)[0][0][0])  # the step did move the parameters
    (params, grads, m, v), words, steps = _adam_lists(device)
    before = [t.clone() for t in params + m + v]
    ops.masked_adam_(params, grads, m, v, [], steps, words, lr=1e-3, found_inf=torch.tensor(1.0))  # CPU: skip
    ops.masked_sgd_(params, grads, m, words, lr=0.1, momentum=0.9, found_inf=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(params + m + v, before))


# --------------------------------------------------------------------------------------------------- CUDA graphs


class _Pair:
    """A model and an exact copy (the eager twin), each with MaskedAdamW (a device lr tensor: capturable)."""

    def __init__(self):
        self.model = _model("cuda")
        self.twin = copy.deepcopy(self.model)
        self.mask = _mask(self.model)
        self.theta0 = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.opt, self.opt_e = (
            MaskedAdamW(m.named_parameters(), lr=torch.tensor(LR, device="cuda"), weight_decay=1e-2, mask=self.mask)
            for m in (self.model, self.twin)
        )

    def step_on_a_new_stream(self, step=0):
        """One eager step on a new side stream (as the warm-up torch.cuda.graph asks for: state and kernel table are
        then created outside the capture)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _set_grads(self.model, _grads(self.model, step))
            self.opt.step()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.opt.step()
        return graph

    def replay(self, graph, steps):
        for step in steps:
            _set_grads(self.model, _grads(self.model, step))
            graph.replay()

    def check_against_eager(self, steps: int):
        """The twin takes steps 0..steps-1 eagerly; the model must then hold the same bits, state included."""
        for step in range(steps):
            _set_grads(self.twin, _grads(self.twin, step))
            self.opt_e.step()
        torch.cuda.synchronize()
        for (name, p), q in zip(self.model.named_parameters(), self.twin.parameters()):
            assert torch.equal(p, q), name  # salient values too: the replays are the eager steps, bit for bit
            salient = self.mask.dense(name).cuda()
            assert torch.equal(p.detach()[~salient], self.theta0[name][~salient])
            if salient.any():
                assert not torch.equal(p.detach()[salient], self.theta0[name][salient])
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(self.opt.state[p][key], self.opt_e.state[q][key]), (name, key)
            assert self.opt.state[p]["step"].item() == steps


@pytest.mark.cuda
def test_graph_replays_equal_eager_steps():
    pair = _Pair()
    pair.step_on_a_new_stream()
    pair.replay(pair.capture(), range(1, 6))
    pair.check_against_eager(6)


@pytest.mark.cuda
def test_a_capture_that_would_upload_a_table_is_refused():
    pair = _Pair()
    pair.step_on_a_new_stream()
    for p in pair.model.parameters():  # new gradient tensors: the cached lists still hold, the kernel table does not
        p.grad = p.grad.clone()
    with pytest.raises(RuntimeError, match="never stepped outside the CUDA graph"):
        pair.capture()
    # nothing ran in the failed capture; an eager step uploads the new table, then the capture works
    _set_grads(pair.model, _grads(pair.model, 1))
    pair.opt.step()
    pair.replay(pair.capture(), [2])
    pair.check_against_eager(3)


@pytest.mark.cuda
def test_a_graph_keeps_its_table_when_later_steps_evict_the_cache():
    pair = _Pair()
    pair.step_on_a_new_stream()
    graph = pair.capture()
    # 40 other tensor lists (> the cache's 32 entries): each is uploaded, and evicts the least recently used
    for i in range(40):
        p, g = torch.zeros(64 + i, device="cuda"), torch.ones(64 + i, device="cuda")
        ops.masked_sgd_([p], [g], [], [torch.empty(0, dtype=torch.int32, device="cuda")], lr=1.0)
        assert p.min().item() == -1.0
    pair.replay(graph, range(1, 4))
    pair.check_against_eager(4)


@pytest.mark.cuda
def test_a_cached_table_is_used_safely_from_another_stream():
    pair = _Pair()
    for step in range(4):  # the table is uploaded on the first step's stream, then used from other streams
        pair.step_on_a_new_stream(step)
    pair.check_against_eager(4)


@pytest.mark.cuda
def test_a_cpu_scalar_tensor_is_refused_inside_a_capture():
    pair = _Pair()
    pair.step_on_a_new_stream()
    pair.opt.param_groups[0]["lr"] = torch.tensor(LR)  # on the CPU: the graph would freeze its current value
    with pytest.raises(RuntimeError, match="'lr_tensor' is a CPU tensor inside a CUDA graph capture"):
        pair.capture()
