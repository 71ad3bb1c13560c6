"""state="compact": optimizer state of the salient entries only; the trajectory is state="dense"'s, bit for bit."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import salun_ext
from salun_ext.optim import MaskedAdam, MaskedAdamW, MaskedSGD, compact_to_dense_state, dense_to_compact_state
from salun_ext.utils.errors import UsageError
from tests.helpers import id_formatter

CASES = {
    "adam_l2_amsgrad_maximize": (MaskedAdam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True, maximize=True)),
    "adamw": (MaskedAdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adamw_amsgrad": (MaskedAdamW, dict(lr=3e-3, weight_decay=0.05, amsgrad=True)),
    "sgd_momentum_nesterov_wd": (MaskedSGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "sgd_dampening_maximize": (MaskedSGD, dict(lr=0.05, momentum=0.5, dampening=0.3, maximize=True)),
    "sgd_plain": (MaskedSGD, dict(lr=0.05)),
}
PER_ENTRY = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 37), torch.nn.Tanh(), torch.nn.Linear(37, 3))
    return net.to(dtype)


def _mask(model, ratio, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return salun_ext.saliency_masks(
        {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}, ratio
    )


def _step(opt, model, i, scaler=None):
    gen = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x.to(model[0].weight.dtype)).float(), y)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def _run(opt, model, steps, start=0):
    for i in range(start, start + steps):
        _step(opt, model, i)


def _pair(name, dtype=torch.float32, ratio=0.3, **extra):
    cls, kw = CASES[name]
    dense_model, compact_model = _model(dtype), _model(dtype)
    mask = _mask(dense_model, ratio)
    dense = cls(dense_model.named_parameters(), mask=mask, **kw, **extra)
    compact = cls(compact_model.named_parameters(), mask=mask, state="compact", **kw, **extra)
    return mask, (dense_model, dense), (compact_model, compact)


def _same_params(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=id_formatter("dtype"))
def test_trajectory_is_bit_identical_to_dense_strict_mode(name, dtype):
    mask, (dense_model, dense), (compact_model, compact) = _pair(name, dtype)
    theta0 = _model(dtype)
    for i in range(60):
        _step(dense, dense_model, i)
        _step(compact, compact_model, i)
        assert _same_params(dense_model, compact_model), f"diverged at step {i + 1}"
    assert not _same_params(compact_model, theta0), "the steps moved nothing"
    for (n, p), q in zip(compact_model.named_parameters(), dense_model.parameters()):
        salient = mask.dense(n).reshape(-1)
        for key in PER_ENTRY:
            if key in compact.state[p]:
                packed, full = compact.state[p][key], dense.state[q][key]
                assert packed.shape == (int(salient.sum()),), (n, key)
                assert torch.equal(packed, full.reshape(-1)[salient]), (n, key)


def test_compact_state_bytes_follow_the_density():
    _, (dense_model, dense), (compact_model, compact) = _pair("adamw", ratio=0.1)
    _run(dense, dense_model, 2)
    _run(compact, compact_model, 2)

    def state_bytes(opt):
        return sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k in PER_ENTRY)

    total = sum(p.numel() for p in dense_model.parameters())
    assert state_bytes(dense) == 2 * 4 * total
    salient = sum(compact.state[p]["exp_avg"].numel() for p in compact_model.parameters())
    assert salient == round(0.1 * total)  # exact top-k: the mask holds 10% of the entries
    assert state_bytes(compact) == 2 * 4 * salient


@pytest.mark.parametrize("name", ["adam_l2_amsgrad_maximize", "sgd_momentum_nesterov_wd"])
def test_amp_grad_scaler_skips_and_unscales_alike(name):
    _, (dense_model, dense), (compact_model, compact) = _pair(name)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=2) for _ in range(2)]
    for i in range(8):
        _step(dense, dense_model, i, scalers[0])
        _step(compact, compact_model, i, scalers[1])
    assert _same_params(dense_model, compact_model)
    # a step with an inf gradient is skipped by both: nothing moves, Adam's step count does not count it
    before = copy.deepcopy(compact_model.state_dict())
    for model, opt, scaler in ((dense_model, dense, scalers[0]), (compact_model, compact, scalers[1])):
        opt.zero_grad()
        (model(torch.full((2, 6), float("inf"))).sum() * 0).backward()
        scaler.step(opt)
        scaler.update()
    assert all(torch.equal(v, before[k]) for k, v in compact_model.state_dict().items())
    _step(dense, dense_model, 9, scalers[0])
    _step(compact, compact_model, 9, scalers[1])
    assert _same_params(dense_model, compact_model)


@pytest.mark.parametrize("name", ["adamw_amsgrad", "sgd_dampening_maximize"])
def test_state_dict_round_trip_through_a_file(name):
    cls, kw = CASES[name]
    straight, resumed = _model(), _model()
    mask = _mask(straight, 0.4)
    opt = cls(straight.named_parameters(), mask=mask, state="compact", **kw)
    _run(opt, straight, 12)

    first = cls(resumed.named_parameters(), mask=mask, state="compact", **kw)
    _run(first, resumed, 5)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors and numbers: no unpickling of code
    second = cls(resumed.named_parameters(), mask=mask, state="compact", **kw)
    second.load_state_dict(saved)
    _run(second, resumed, 7, start=5)
    assert _same_params(straight, resumed)


@pytest.mark.parametrize("name", ["adam_l2_amsgrad_maximize", "sgd_momentum_nesterov_wd"])
def test_layout_conversion_both_ways(name):
    cls, kw = CASES[name]
    mask, (dense_model, dense), (compact_model, compact) = _pair(name)
    _run(dense, dense_model, 6)
    _run(compact, compact_model, 6)
    as_dense = compact_to_dense_state(compact.state_dict(), compact)
    reference = dense.state_dict()
    for index, state in reference["state"].items():
        for key, value in state.items():
            assert torch.equal(as_dense["state"][index][key], value), (index, key)
        assert "mask_digest" not in as_dense["state"][index]
    as_compact = dense_to_compact_state(reference, compact)
    for index, state in compact.state_dict()["state"].items():
        for key, value in state.items():
            got = as_compact["state"][index][key]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, (index, key)
    # a dense optimizer resumes from the converted state, a compact one from the dense state (packed on load)
    a_model, b_model = copy.deepcopy(compact_model), copy.deepcopy(compact_model)
    a = cls(a_model.named_parameters(), mask=mask, **kw)
    a.load_state_dict(as_dense)
    b = cls(b_model.named_parameters(), mask=mask, state="compact", **kw)
    b.load_state_dict(copy.deepcopy(reference))  # (torch shares loaded step tensors with the dict's)
    for opt, model in ((dense, dense_model), (a, a_model), (b, b_model)):
        _run(opt, model, 4, start=6)
    assert _same_params(dense_model, a_model) and _same_params(dense_model, b_model)


def test_torch_adamw_state_loads_into_a_compact_optimizer():
    theirs, ours = _model(), _model()
    torch_opt = torch.optim.AdamW(theirs.named_parameters(), lr=1e-2)
    _run(torch_opt, theirs, 3)
    mask = _mask(ours, 0.3)
    opt = MaskedAdamW(ours.named_parameters(), lr=1e-2, mask=mask, state="compact")
    opt.load_state_dict(torch_opt.state_dict())
    for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
        salient = mask.dense(n).reshape(-1)
        assert torch.equal(opt.state[p]["exp_avg"], torch_opt.state[q]["exp_avg"].reshape(-1)[salient])
    _run(opt, ours, 2)
    assert all(s["step"].item() == 5 for s in opt.state.values())


def test_state_packed_under_another_mask_is_refused():
    model = _model()
    mask_a = _mask(model, 0.3)
    mask_b = {n: mask_a.dense(n).reshape(-1).flip(0).reshape(mask_a.dense(n).shape) for n in mask_a.names}
    assert any(not torch.equal(mask_a.dense(n), mask_b[n]) for n in mask_a.names)  # the same counts, other bits
    a = MaskedAdamW(model.named_parameters(), lr=1e-2, mask=mask_a, state="compact")
    _run(a, model, 2)
    saved = a.state_dict()
    b = MaskedAdamW(model.named_parameters(), lr=1e-2, mask=mask_b, state="compact")
    with pytest.raises(UsageError, match="packed under another mask"):
        b.load_state_dict(saved)
    with pytest.raises(UsageError, match="another mask"):
        compact_to_dense_state(saved, b)
    # the documented way: unpack under the old mask, load the dense state (packed under the new one)
    c = MaskedAdamW(model.named_parameters(), lr=1e-2, mask=mask_b, state="compact")
    c.load_state_dict(compact_to_dense_state(saved, a))
    _run(c, model, 1)


def test_compact_state_of_another_length_is_refused():
    model = _model()
    a = MaskedSGD(model.named_parameters(), lr=0.1, momentum=0.9, mask=_mask(model, 0.3), state="compact")
    _run(a, model, 1)
    saved = a.state_dict()
    del saved["state"][0]["mask_digest"]
    saved["state"][0]["momentum_buffer"] = saved["state"][0]["momentum_buffer"][:-1]
    b = MaskedSGD(model.named_parameters(), lr=0.1, momentum=0.9, mask=_mask(model, 0.3), state="compact")
    with pytest.raises(UsageError, match=r"'momentum_buffer' of 0.weight has shape \(\d+,\), expected \(\d+,\)"):
        b.load_state_dict(saved)


def test_an_in_place_edit_of_the_mask_does_not_move_compact_state():
    edited_model, kept_model = _model(), _model()
    mask = _mask(edited_model, 0.3)
    words = mask.words.clone()
    edited = MaskedAdamW(edited_model.named_parameters(), lr=1e-2, mask=mask, state="compact")
    kept = MaskedAdamW(kept_model.named_parameters(), lr=1e-2, mask=_mask(kept_model, 0.3), state="compact")
    _run(edited, edited_model, 2)
    _run(kept, kept_model, 2)
    mask.words.copy_(torch.roll(words, 1))  # the caller's mask changes under the optimizer
    _run(edited, edited_model, 2, start=2)
    _run(kept, kept_model, 2, start=2)
    assert _same_params(edited_model, kept_model)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda m, k: MaskedAdamW(m.named_parameters(), mask=k, mode="compat", state="compact"), "needs mode='strict'"),
        (lambda m, k: MaskedSGD(m.named_parameters(), lr=0.1, mask=k, state="sparse"), "state must be"),
    ],
    ids=["compat", "unknown"],
)
def test_bad_compact_construction(build, message):
    model = _model()
    with pytest.raises(UsageError, match=message):
        build(model, _mask(model, 0.5))


def test_channels_last_parameters_are_refused_before_any_change():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.Flatten(), torch.nn.Linear(5 * 36, 2))
    net = net.to(memory_format=torch.channels_last)
    opt = MaskedAdamW(net.named_parameters(), lr=0.1, mask=_mask(net, 0.3), state="compact")
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(UsageError, match=r"needs contiguous parameters; 0.weight"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["adam_l2_amsgrad_maximize", "sgd_momentum_nesterov_wd"])
def test_cuda_trajectory_is_bit_identical_to_dense(name):
    cls, kw = CASES[name]
    dense_model, compact_model = _model().cuda(), _model().cuda()
    mask = _mask(dense_model, 0.3)
    dense = cls(dense_model.named_parameters(), mask=mask, **kw)
    compact = cls(compact_model.named_parameters(), mask=mask, state="compact", **kw)
    for i in range(30):
        for model, opt in ((dense_model, dense), (compact_model, compact)):
            gen = torch.Generator().manual_seed(100 + i)
            x, y = torch.randn(16, 6, generator=gen).cuda(), torch.randn(16, 3, generator=gen).cuda()
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    assert _same_params(dense_model, compact_model)
    for (n, p), q in zip(compact_model.named_parameters(), dense_model.parameters()):
        salient = mask.dense(n).reshape(-1).cuda()
        for key in PER_ENTRY:
            if key in compact.state[p]:
                assert torch.equal(compact.state[p][key], dense.state[q][key].reshape(-1)[salient]), (n, key)


@pytest.mark.parametrize("unmasked", ["train", "freeze"])
def test_parameters_the_mask_does_not_cover(unmasked):
    """unmasked="train": every entry salient, the compact state is the flat dense state; "freeze": no state."""
    dense_model, compact_model = _model(), _model()
    partial = _mask(dense_model, 0.3).subset(["0.weight", "2.bias"])
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True, mask=partial, unmasked=unmasked)
    dense = MaskedAdamW(dense_model.named_parameters(), **kw)
    compact = MaskedAdamW(compact_model.named_parameters(), state="compact", **kw)
    _run(dense, dense_model, 5)
    _run(compact, compact_model, 5)
    assert _same_params(dense_model, compact_model)
    uncovered = compact_model[0].bias
    if unmasked == "train":
        assert compact.state[uncovered]["exp_avg"].shape == (uncovered.numel(),)
        assert not torch.equal(uncovered, _model()[0].bias)
    else:
        assert uncovered not in compact.state and torch.equal(uncovered, _model()[0].bias)
