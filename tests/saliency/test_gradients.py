"""compute_saliency: gradients accumulated over batches (abs_of_sum, sum_of_abs, clipping), parameter selection."""

from __future__ import annotations

import pytest
import torch

import salun_ext


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 3)
    )


def _batches(n=3):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 1, 6, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)) for _ in range(n)]


def _neg_ce(model, batch):
    x, y = batch
    return -torch.nn.functional.cross_entropy(model(x), y)


def _manual_grads(model, batches, transform):
    model.eval()
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for b in batches:
        model.zero_grad()
        _neg_ce(model, b).backward()
        for n, p in model.named_parameters():
            acc[n] += transform(p.grad)
    return acc


def test_compute_saliency_abs_of_sum_matches_manual():
    model, batches = _tiny_model(), _batches()
    manual = _manual_grads(model, batches, lambda g: g.clone())
    expected = salun_ext.saliency_masks({n: g.abs() for n, g in manual.items()}, [0.2, 0.5])
    model.train()
    got = salun_ext.compute_saliency(model, _neg_ce, batches, [0.2, 0.5], progress=False)
    assert model.training, "the model's mode is restored"
    assert all(p.grad is None for p in model.parameters())
    for g, e in zip(got, expected):
        assert g.equal(e)


def test_compute_saliency_sum_of_abs_and_clipping():
    model, batches = _tiny_model(), _batches()
    manual = _manual_grads(model, batches, lambda g: g.abs())
    expected = salun_ext.saliency_masks(manual, 0.3)
    got = salun_ext.compute_saliency(model, _neg_ce, batches, 0.3, reduction="sum_of_abs", progress=False)
    assert got.equal(expected)


def test_compute_saliency_clips_each_batch_before_summing():
    # one batch with 50x larger inputs dominates the unclipped sum; clipping every batch to the same norm
    # (the DDPM recipe) must give the other batches an equal say, so the mask changes
    model, batches = _tiny_model(), _batches()
    batches[0] = (batches[0][0] * 50, batches[0][1])
    model.eval()
    params = list(model.parameters())
    clipped_sum = [torch.zeros_like(p) for p in params]
    for b in batches:
        model.zero_grad()
        _neg_ce(model, b).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1e-3)
        assert norm > 1e-3, "the test needs every batch to be clipped"
        for acc, p in zip(clipped_sum, params):
            acc += p.grad
    names = [n for n, _ in model.named_parameters()]
    expected = salun_ext.saliency_masks({n: g.abs() for n, g in zip(names, clipped_sum)}, 0.3)
    got = salun_ext.compute_saliency(model, _neg_ce, batches, 0.3, clip_grad_norm=1e-3, progress=False)
    assert got.equal(expected)
    unclipped = salun_ext.compute_saliency(model, _neg_ce, batches, 0.3, progress=False)
    assert not got.equal(unclipped), "clipping had no effect on the mask"


def test_compute_saliency_parameter_selection():
    model, batches = _tiny_model(), _batches(1)
    mask = salun_ext.compute_saliency(model, _neg_ce, batches, 0.5, params="conv_linear", progress=False)
    assert mask.names == ("0.weight", "4.weight")
    mask = salun_ext.compute_saliency(
        model, _neg_ce, batches, 0.5, params=lambda n, p: n.startswith("4."), progress=False
    )
    assert mask.names == ("4.weight", "4.bias")
    with pytest.raises(ValueError, match="unknown parameter preset"):
        salun_ext.compute_saliency(model, _neg_ce, batches, 0.5, params="weights", progress=False)
    with pytest.raises(ValueError, match="unknown or frozen"):
        salun_ext.compute_saliency(model, _neg_ce, batches, 0.5, params=["nope"], progress=False)


def test_compute_saliency_bad_input():
    model = _tiny_model()
    with pytest.raises(ValueError, match="yielded no batch"):
        salun_ext.compute_saliency(model, _neg_ce, [], 0.5, progress=False)
    with pytest.raises(ValueError, match="reduction"):
        salun_ext.compute_saliency(model, _neg_ce, _batches(1), 0.5, reduction="mean", progress=False)
    with pytest.raises(TypeError, match="scalar"):
        salun_ext.compute_saliency(model, lambda m, b: m(b[0]), _batches(1), 0.5, progress=False)
