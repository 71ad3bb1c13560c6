"""The cached kernel lists of the masked optimizers (optim/_plan.py): reused while they hold, rebuilt when anything
they depend on changes, and a cached step is bit-identical to an uncached one in every case."""

from __future__ import annotations

import copy

import pytest
import torch

import salun_ext
from salun_ext.optim import MaskedAdam, MaskedAdamW, MaskedSGD

CONFIGS = {
    "sgd_momentum": (MaskedSGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "sgd_plain": (MaskedSGD, dict(lr=0.05)),
    "adam_amsgrad": (MaskedAdam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True)),
    "adamw": (MaskedAdamW, dict(lr=1e-2, weight_decay=0.1)),
}


def _net(channels_last=False):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(4 * 16, 3), torch.nn.Linear(3, 2)
    )
    return net.to(memory_format=torch.channels_last) if channels_last else net


def _mask(net, ratio=0.4):
    gen = torch.Generator().manual_seed(3)
    return salun_ext.saliency_masks({n: torch.randn(p.shape, generator=gen) for n, p in net.named_parameters()}, ratio)


def _backward(net, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, 6, 6, generator=gen)
    if not next(net.parameters()).is_contiguous():
        x = x.to(memory_format=torch.channels_last)
    net(x).square().sum().backward()


class Counted:
    """A masked optimizer and its twin that never reuses its lists; `builds` counts the cached one's rebuilds."""

    def __init__(self, name, channels_last=False, groups=False):
        cls, kw = CONFIGS[name]
        self.nets = [_net(channels_last), _net(channels_last)]
        mask = _mask(self.nets[0])
        self.opts = []
        for net in self.nets:
            named = list(net.named_parameters())
            params = [{"params": [p for _, p in named[:2]], "param_names": [n for n, _ in named[:2]]}]
            params.append({"params": [p for _, p in named[2:]], "param_names": [n for n, _ in named[2:]]})
            self.opts.append(cls(params if groups else named, mask=mask, **kw))
        self.opts[1]._planned_grads = lambda group: None  # the uncached twin
        self.builds = 0
        cached = self.opts[0]
        build = cached._group_items

        def counting(group):
            self.builds += 1
            return build(group)

        cached._group_items = counting

    def step(self, seed, edit=None, set_to_none=True):
        """zero_grad, backward, `edit(net, opt)` on both, step both; then both must be bit-identical."""
        for net, opt in zip(self.nets, self.opts):
            opt.zero_grad(set_to_none=set_to_none)
            _backward(net, seed)
            if edit is not None:
                edit(net, opt)
            opt.step()
        self.assert_same()

    def assert_same(self):
        a, b = self.nets
        for (name, x), y in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(x, y), name
            assert x.stride() == y.stride(), name
        sa, sb = self.opts[0].state_dict()["state"], self.opts[1].state_dict()["state"]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].keys() == sb[key].keys()
            for field in sa[key]:
                assert torch.equal(sa[key][field], sb[key][field]), (key, field)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zeroed"])
def test_lists_are_built_once_and_reused_across_new_gradients(name, set_to_none):
    run = Counted(name, groups=True)
    for i in range(5):
        run.step(i, set_to_none=set_to_none)
    # one build per group; SGD momentum rebuilds once more after its first step (new buffers)
    assert run.builds == (4 if name == "sgd_momentum" else 2)


def test_a_step_without_any_gradient_changes_nothing():
    net = _net()
    before = copy.deepcopy(net.state_dict())
    opt = MaskedAdamW(net.named_parameters(), lr=0.1, mask=_mask(net))
    opt.step()
    opt.step()  # (the second one reuses the empty lists)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()) and not opt.state_dict()["state"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_that_disappear_and_reappear(name):
    run = Counted(name)

    def drop(which):
        def edit(net, opt):
            for index in which:
                list(net.parameters())[index].grad = None

        return edit

    run.step(0)
    run.step(1, drop([1]))
    run.step(2, drop([0, 3]))
    run.step(3)
    run.step(4, drop([0, 1, 2, 3, 4]))
    run.step(5, drop([0, 1, 2, 3, 4, 5]))  # no gradient at all: nothing moves
    run.step(6, drop([0, 1, 2, 3, 4, 5]))
    run.step(7)
    builds = run.builds
    run.step(8)
    assert run.builds == builds, "an unchanged step reuses the lists"


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_parameter_storage_replaced(name, channels_last):
    run = Counted(name, channels_last=channels_last)
    run.step(0)
    run.step(1)

    def replace(net, opt):  # what module.to(...) and `p.data = ...` do: same Parameter, new storage
        for p in net.parameters():
            p.data = p.data.clone(memory_format=torch.preserve_format) * 1.5

    run.step(2, replace)
    run.step(3)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_state_dict_and_replaced_state_tensors(name):
    run = Counted(name)
    run.step(0)
    run.step(1)
    saved = [copy.deepcopy(opt.state_dict()) for opt in run.opts]
    run.step(2)
    for opt, sd in zip(run.opts, saved):
        opt.load_state_dict(sd)
    run.step(3)
    if name == "sgd_plain":
        return

    def scale_tensors(net, opt):  # new tensor objects in the same per-parameter dicts
        for p in net.parameters():
            for key, value in opt.state[p].items():
                if value.dim():
                    opt.state[p][key] = value * 0.5

    def new_dicts(net, opt):  # new per-parameter dicts (with new tensors), the old ones untouched
        for p in net.parameters():
            opt.state[p] = {key: value * 0.5 if value.dim() else value for key, value in opt.state[p].items()}

    run.step(4, scale_tensors)
    run.step(5)
    run.step(6, new_dicts)
    run.step(7)


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw"])
def test_gradient_layout_changes(name):
    run = Counted(name)
    run.step(0)

    def transposed_grad(net, opt):  # same values, other strides: relaid out, as the uncached step does
        w = net[3].weight
        w.grad = w.grad.t().contiguous().t()

    run.step(1, transposed_grad)
    run.step(2)
    run.step(3, transposed_grad)


def test_hyperparameter_that_changes_the_state_rebuilds():
    run = Counted("sgd_plain")
    run.step(0)
    run.step(1)

    def momentum_on(net, opt):
        opt.param_groups[0]["momentum"] = 0.9

    run.step(2, momentum_on)
    run.step(3)


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize("bad", ["sparse", "shape", "dtype"])
def test_bad_gradients_after_cached_steps_raise_before_any_change(name, bad):
    run = Counted(name, groups=True)
    run.step(0)
    run.step(1)
    net, opt = run.nets[0], run.opts[0]
    opt.zero_grad()
    _backward(net, 2)
    before = copy.deepcopy((net.state_dict(), opt.state_dict()))
    last = net[4].bias  # in the second group: the first group must not have moved
    if bad == "sparse":
        last.grad = last.grad.to_sparse()
        message = r"sparse gradients \(4\.bias\)"
    elif bad == "shape":  # the same gradient object, new contents (torch refuses such a `.grad =`)
        last.grad.data = last.grad.data[:1].clone()
        message = r"gradient of 4\.bias has shape \(1,\)"
    else:
        last.grad.data = last.grad.data.double()
        message = r"gradient of 4\.bias has dtype torch.float64 on cpu, expected torch.float32"
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    after = (net.state_dict(), opt.state_dict())
    assert all(torch.equal(v, before[0][k]) for k, v in after[0].items())
    for key, fields in after[1]["state"].items():
        assert all(torch.equal(v, before[1]["state"][key][f]) for f, v in fields.items())


def test_adam_step_counts_stay_separate_tensors_in_the_state_dict(tmp_path):
    run = Counted("adamw")
    for i in range(3):
        run.step(i)
    opt = run.opts[0]
    steps = [s["step"] for s in opt.state.values()]
    assert all(t.dim() == 0 and t.dtype == torch.float32 and t.item() == 3.0 for t in steps)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt")
    first = next(iter(loaded["state"].values()))["step"]
    first.add_(10)  # a loaded count is its own tensor
    assert [s["step"].item() for s in loaded["state"].values()].count(13.0) == 1
    fresh = MaskedAdamW(run.nets[1].named_parameters(), lr=1e-2, weight_decay=0.1, mask=_mask(run.nets[1]))
    fresh.load_state_dict(opt.state_dict())
    assert all(s["step"].item() == 3.0 for s in fresh.state.values())
