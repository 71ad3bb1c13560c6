"""Masked optimizers: strict semantics over many steps, torch.optim equivalence, compat mode, state, AMP, errors."""

from __future__ import annotations

import copy

import pytest
import torch

import salun_ext
from salun_ext.optim import MaskedAdam, MaskedAdamW, MaskedSGD, masked, unmask
from tests.helpers import id_formatter

TOLERANCES = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-3, rtol=1e-2),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
}


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3)).to(dtype)


def _batch(dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=gen).to(dtype), torch.randn(16, 3, generator=gen).to(dtype)


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x).float(), y.float())


def _mask(model, ratio, seed=2):
    gen = torch.Generator().manual_seed(seed)
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    return salun_ext.saliency_masks(grads, ratio)


def _run(opt, model, steps, start=0):
    for i in range(start, start + steps):
        opt.zero_grad()
        _loss(model, _batch(seed=10 + i % 7)).backward()
        opt.step()


OPTIMIZERS = {
    "sgd_momentum_nesterov_wd": (
        MaskedSGD,
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    ),
    "sgd_dampening_maximize": (
        MaskedSGD,
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.5, dampening=0.3, weight_decay=1e-3, maximize=True),
    ),
    "sgd_plain": (MaskedSGD, torch.optim.SGD, dict(lr=0.05)),
    "adam_l2_amsgrad": (MaskedAdam, torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True)),
    "adamw": (MaskedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_strict_mode_keeps_non_salient_entries_and_state_bit_identical(name):
    cls, _, kw = OPTIMIZERS[name]
    model = _model()
    mask = _mask(model, 0.3)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = cls(model.named_parameters(), mask=mask, **kw)
    _run(opt, model, 1000)
    for n, p in model.named_parameters():
        frozen = ~mask.dense(n)
        assert torch.equal(p.detach()[frozen], theta0[n][frozen]), n
        if (~frozen).any():
            assert not torch.equal(p.detach()[~frozen], theta0[n][~frozen]), n
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                assert bool((value[frozen] == 0).all()), (n, key)
                if (~frozen).any():
                    assert bool((value[~frozen] != 0).any()), (n, key)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=id_formatter("dtype"))
def test_all_ones_mask_matches_torch_optim(name, dtype):
    cls, torch_cls, kw = OPTIMIZERS[name]
    ours, theirs = _model(dtype), _model(dtype)
    opt_ours = cls(ours.named_parameters(), mask=_mask(ours, 1.0), **kw)
    opt_theirs = torch_cls(theirs.parameters(), foreach=False, **kw)
    for i in range(20):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            _loss(model, _batch(dtype, seed=i)).backward()
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, **TOLERANCES[dtype])
        else:
            # torch's bf16 update rounds every intermediate to bf16, ours computes in fp32: both are within
            # bf16's own resolution of the fp32 trajectory
            ref = _model(torch.float32)
            ref.load_state_dict({k: v.float() for k, v in _model(dtype).state_dict().items()})
            torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_all_zeros_mask_changes_nothing(name):
    cls, _, kw = OPTIMIZERS[name]
    model = _model()
    before = copy.deepcopy(model.state_dict())
    opt = cls(model.named_parameters(), mask=_mask(model, 0.0), **kw)
    _run(opt, model, 5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_no_mask_equals_torch_optim_exactly_in_structure():
    model = _model()
    opt = MaskedSGD(model.named_parameters(), lr=0.1, momentum=0.9)
    _run(opt, model, 3)
    state = opt.state_dict()
    assert set(state["state"][0]) == {"momentum_buffer"}
    assert state["param_groups"][0]["param_names"][0] == "0.weight"


@pytest.mark.parametrize("name", ["sgd_momentum_nesterov_wd", "adam_l2_amsgrad", "adamw"])
def test_compat_mode_is_the_papers_recipe_bit_for_bit(name):
    cls, torch_cls, kw = OPTIMIZERS[name]
    ours, theirs = _model(), _model()
    mask = _mask(ours, 0.4)
    upstream = mask.to_upstream()  # the paper code's int64 masks
    opt_ours = cls(ours.named_parameters(), mask=mask, mode="compat", **kw)
    opt_theirs = torch_cls(theirs.parameters(), **kw)
    for i in range(15):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            _loss(model, _batch(seed=i)).backward()
            if opt is opt_theirs:
                for n, p in model.named_parameters():
                    p.grad *= upstream[n]
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    # and, unlike strict mode, weight decay moved non-salient weights
    theta0 = _model()
    moved = [
        not torch.equal(p[~mask.dense(n)], q[~mask.dense(n)])
        for (n, p), q in zip(ours.named_parameters(), theta0.parameters())
        if (~mask.dense(n)).any()
    ]
    assert any(moved)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_mid_run(name):
    cls, _, kw = OPTIMIZERS[name]
    straight, resumed = _model(), _model()
    mask = _mask(straight, 0.5)
    opt = cls(straight.named_parameters(), mask=mask, **kw)
    _run(opt, straight, 10)

    opt_a = cls(resumed.named_parameters(), mask=mask, **kw)
    _run(opt_a, resumed, 5)
    saved = copy.deepcopy(opt_a.state_dict())
    opt_b = cls(resumed.named_parameters(), mask=mask, **kw)
    opt_b.load_state_dict(saved)
    _run(opt_b, resumed, 5, start=5)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_torch_adam_state_dict_loads_into_masked_adam():
    model = _model()
    torch_opt = torch.optim.Adam(model.named_parameters(), lr=1e-3)
    _run(torch_opt, model, 3)
    opt = MaskedAdam(model.named_parameters(), lr=1e-3, mask=_mask(model, 0.5))
    opt.load_state_dict(torch_opt.state_dict())
    _run(opt, model, 2)
    assert all(s["step"].item() == 5 for s in opt.state.values())


def test_lr_scheduler_drives_the_lr():
    model = _model()
    opt = MaskedSGD(model.named_parameters(), lr=0.1, mask=_mask(model, 0.5))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(4):
        _run(opt, model, 1)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


@pytest.mark.parametrize("cls", [MaskedSGD, MaskedAdamW])
def test_amp_found_inf_skips_and_grad_scale_unscales(cls):
    kw = dict(lr=0.1, momentum=0.9) if cls is MaskedSGD else dict(lr=0.1)
    model, ref = _model(), _model()
    mask = _mask(model, 0.5)
    opt, opt_ref = cls(model.named_parameters(), mask=mask, **kw), cls(ref.named_parameters(), mask=mask, **kw)
    assert opt._step_supports_amp_scaling
    _loss(model, _batch()).mul(256.0).backward()
    _loss(ref, _batch()).backward()
    before = copy.deepcopy(model.state_dict())
    opt.grad_scale, opt.found_inf = torch.tensor(256.0), torch.tensor(1.0)
    opt.step()  # skipped
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if cls is MaskedAdamW:
        assert all(s["step"].item() == 0 for s in opt.state.values()), "a skipped step does not count"
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    opt_ref.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_lr_as_tensor():
    model, ref = _model(), _model()
    mask = _mask(model, 0.5)
    opt = MaskedSGD(model.named_parameters(), lr=torch.tensor(0.05), momentum=0.9, mask=mask)
    opt_ref = MaskedSGD(ref.named_parameters(), lr=0.05, momentum=0.9, mask=mask)
    _run(opt, model, 3)
    _run(opt_ref, ref, 3)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_unmasked_parameters_train_or_freeze_explicitly():
    model = _model()
    grads = {"0.weight": torch.randn(17, 6)}
    partial = salun_ext.saliency_masks(grads, 0.5)
    with pytest.raises(ValueError, match="not covered by the mask"):
        MaskedSGD(model.named_parameters(), lr=0.1, mask=partial)
    frozen_model, trained_model = _model(), _model()
    opt_f = MaskedSGD(frozen_model.named_parameters(), lr=0.1, mask=partial, unmasked="freeze")
    opt_t = MaskedSGD(trained_model.named_parameters(), lr=0.1, mask=partial, unmasked="train")
    _run(opt_f, frozen_model, 3)
    _run(opt_t, trained_model, 3)
    theta0 = _model()
    assert torch.equal(frozen_model[2].weight, theta0[2].weight)
    assert not torch.equal(trained_model[2].weight, theta0[2].weight)


def test_channels_last_parameters():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.Flatten(), torch.nn.Linear(5 * 36, 2))
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
    mask = _mask(net, 0.3)
    theta0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = MaskedAdamW(net.named_parameters(), lr=0.1, mask=mask)
    for _ in range(3):
        opt.zero_grad()
        net(x).square().sum().backward()
        opt.step()
    for n, p in net.named_parameters():
        frozen = ~mask.dense(n)
        assert torch.equal(p.detach()[frozen], theta0[n][frozen])
        if (~frozen).any():
            assert not torch.equal(p.detach()[~frozen], theta0[n][~frozen])
    assert not net[0].weight.is_contiguous(), "the layout is kept"


def test_per_parameter_mask_list_and_dense_dict():
    model = _model()
    mask = _mask(model, 0.5)
    dense = mask.to_dense()
    per_param = [dense[n] for n, _ in model.named_parameters()]
    a, b, c = _model(), _model(), _model()
    for net, spec, params in (
        (a, mask, a.named_parameters()),
        (b, dense, b.named_parameters()),
        (c, per_param, c.parameters()),
    ):
        opt = MaskedSGD(params, lr=0.1, momentum=0.9, mask=spec)
        _run(opt, net, 3)
    for x, y, z in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(x, y) and torch.equal(x, z)


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda m, k: MaskedSGD(m.parameters(), lr=0.1, mask=k), ValueError, "named_parameters"),
        (lambda m, k: MaskedSGD(m.named_parameters(), lr=float("nan"), mask=k), ValueError, "lr must be finite"),
        (lambda m, k: MaskedAdam(m.named_parameters(), betas=(0.9, float("inf")), mask=k), ValueError, "beta2"),
        (lambda m, k: MaskedSGD(m.named_parameters(), lr=0.1, mask=k, mode="fast"), ValueError, "mode must be"),
        (lambda m, k: MaskedSGD(m.named_parameters(), lr=0.1, mask=k, unmasked="maybe"), ValueError, "unmasked must"),
        (lambda m, k: MaskedSGD(m.named_parameters(), lr=0.1, mask=[torch.ones(2)] * 4), ValueError, "shape"),
        (lambda m, k: MaskedSGD(m.named_parameters(), lr=0.1, mask=[None] * 3), ValueError, "3 per-parameter"),
        (
            lambda m, k: MaskedSGD(
                m.named_parameters(), lr=0.1, mask={"0.weight": torch.full((17, 6), 2.0)}, unmasked="train"
            ),
            ValueError,
            "other than 0 and 1",
        ),
        (
            lambda m, k: MaskedSGD(torch.nn.Linear(6, 17).named_parameters(), lr=0.1, mask=k),
            ValueError,
            "does not have",
        ),
    ],
    ids=["unnamed", "nan_lr", "inf_beta", "mode", "unmasked", "list_shape", "list_length", "non_binary", "unknown"],
)
def test_bad_construction(build, error, message):
    model = _model()
    with pytest.raises(error, match=message):
        build(model, _mask(model, 0.5))


def test_mask_of_another_shape_is_refused():
    model = _model()
    other = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"mask for '0.weight' has shape \(5, 6\)"):
        MaskedSGD(model.named_parameters(), lr=0.1, mask=_mask(other, 0.5))


@pytest.mark.parametrize("cls", [MaskedSGD, MaskedAdamW])
def test_bad_gradients_raise_before_any_change(cls):
    model = _model()
    opt = cls(model.named_parameters(), lr=0.1, mask=_mask(model, 0.5))
    _loss(model, _batch()).backward()
    before = copy.deepcopy(model.state_dict())
    model[2].bias.grad = model[2].bias.grad.to_sparse()
    with pytest.raises(RuntimeError, match=r"sparse gradients \(2\.bias\)"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------- masked() wrapper


@pytest.mark.parametrize(
    "torch_cls, kw",
    [
        (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.9, weight_decay=0.1)),
        (torch.optim.Adagrad, dict(lr=0.1, weight_decay=0.1)),
        (torch.optim.AdamW, dict(lr=1e-2)),
    ],
)
def test_masked_wrapper_gives_any_optimizer_strict_semantics(torch_cls, kw):
    model = _model()
    mask = _mask(model, 0.3)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = masked(torch_cls(model.named_parameters(), **kw), mask)
    assert isinstance(opt, torch_cls)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.9)
    for i in range(30):
        opt.zero_grad()
        _loss(model, _batch(seed=i)).backward()
        opt.step()
        sched.step()
    for n, p in model.named_parameters():
        frozen = ~mask.dense(n)
        assert torch.equal(p.detach()[frozen], theta0[n][frozen])
        if (~frozen).any():
            assert not torch.equal(p.detach()[~frozen], theta0[n][~frozen])
        for value in opt.state[p].values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                init = 0.0
                assert bool((value[frozen] == init).all())
    unmask(opt)
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        masked(object(), mask)


def test_masked_wrapper_freezes_uncovered_parameters():
    model = _model()
    partial = salun_ext.saliency_masks({"0.weight": torch.randn(17, 6)}, 0.5)
    opt = masked(torch.optim.SGD(model.named_parameters(), lr=0.1, weight_decay=0.1), partial, unmasked="freeze")
    _run(opt, model, 3)
    assert torch.equal(model[2].weight, _model()[2].weight)
    assert model[2].weight.grad is not None, "the gradient is handed back after the step"


def test_step_under_torch_compile_matches_eager():
    eager, compiled = _model(), _model()
    mask = _mask(eager, 0.5)
    opt_e = MaskedSGD(eager.named_parameters(), lr=0.1, momentum=0.9, mask=mask)
    opt_c = MaskedSGD(compiled.named_parameters(), lr=0.1, momentum=0.9, mask=mask)
    step = torch.compile(opt_c.step)
    for i in range(3):
        for model, opt, fn in ((eager, opt_e, opt_e.step), (compiled, opt_c, step)):
            opt.zero_grad()
            _loss(model, _batch(seed=i)).backward()
            fn()
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert torch.equal(a, b)


def test_real_grad_scaler_on_cpu():
    scaled, plain = _model(), _model()
    mask = _mask(scaled, 0.5)
    opt_s = MaskedSGD(scaled.named_parameters(), lr=0.1, momentum=0.9, mask=mask)
    opt_p = MaskedSGD(plain.named_parameters(), lr=0.1, momentum=0.9, mask=mask)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for i in range(3):
        opt_s.zero_grad()
        scaler.scale(_loss(scaled, _batch(seed=i))).backward()
        scaler.step(opt_s)
        scaler.update()
        opt_p.zero_grad()
        _loss(plain, _batch(seed=i)).backward()
        opt_p.step()
    for a, b in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    model = _model().cuda()
    mask = _mask(model, 0.5)
    opt = MaskedAdamW(model.named_parameters(), lr=torch.tensor(1e-2, device="cuda"), mask=mask)
    x, y = (t.cuda() for t in _batch())
    static_loss = None

    def step():
        nonlocal static_loss
        opt.zero_grad(set_to_none=False)
        static_loss = torch.nn.functional.mse_loss(model(x), y)
        static_loss.backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: lazy state init and table upload happen outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    for n, p in model.named_parameters():
        frozen = ~mask.dense(n).cuda()
        assert torch.equal(p.detach()[frozen], theta[n][frozen])
    assert all(s["step"].item() >= 8 for s in opt.state.values())
