"""_threshold: find_thresholds, ratio_to_k, the NaN policy and the normalisation of `grads` (clear errors)."""

from __future__ import annotations

import pytest
import torch

import salun_ext
from salun_ext import ops
from salun_ext.saliency import DIGIT_WIDTHS, find_thresholds, ratio_to_k
from tests.helpers import DEVICES, flat_dense, oracle_exact_mask, oracle_keys


def test_find_thresholds_accepts_channels_last_transposed_and_strided_tensors():
    # the soft-threshold step of SalUn-soft ranks theta - theta_0, which is channels_last for conv weights
    gen = torch.Generator().manual_seed(5)
    conv = torch.randn(4, 3, 5, 5, generator=gen).to(memory_format=torch.channels_last)
    tensors = [conv, torch.randn(7, 9, generator=gen).t(), torch.randn(40, generator=gen)[::3]]
    assert not any(t.is_contiguous() for t in tensors)
    total = sum(t.numel() for t in tensors)
    ks = [1, 17, total // 2, total]
    got = [th.value for th in find_thresholds(tensors, ks)]
    expected = [th.value for th in find_thresholds([t.contiguous() for t in tensors], ks)]
    assert got == expected
    ordered = torch.cat([t.reshape(-1).abs() for t in tensors]).sort(descending=True).values
    assert got == [ordered[k - 1].item() for k in ks]


def test_ratio_to_k_reads_the_ratio_as_written():
    assert ratio_to_k(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996 in binary floating point
    assert ratio_to_k(0.5, 7) == 3
    assert ratio_to_k(1.0, 7) == 7
    assert ratio_to_k(0.0, 7) == 0
    assert ratio_to_k(1, 7) == 7


def test_accepts_mapping_named_parameters_and_lists():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model(torch.randn(5, 4)).sum().backward()
    from_params = salun_ext.saliency_masks(model.named_parameters(), 0.5)
    from_dict = salun_ext.saliency_masks({n: p.grad for n, p in model.named_parameters()}, 0.5)
    from_list = salun_ext.saliency_masks([p.grad for p in model.parameters()], 0.5)
    assert from_params.equal(from_dict)
    assert from_params.names == tuple(n for n, _ in model.named_parameters())
    assert torch.equal(from_list.words, from_dict.words)
    assert from_list.names == tuple(str(i) for i in range(4))


def test_nan_raises_naming_the_tensor_unless_treated_as_zero():
    g = {"ok": torch.ones(4), "bad.weight": torch.tensor([1.0, float("nan"), 2.0])}
    with pytest.raises(ValueError, match=r"bad\.weight \(1 NaN\)"):
        salun_ext.saliency_masks(g, 0.5)
    mask = salun_ext.saliency_masks(g, 0.5, nan="zero")
    assert mask.dense("bad.weight")[1].item() is False
    with pytest.raises(ValueError, match="nan must be"):
        salun_ext.saliency_masks(g, 0.5, nan="ignore")


@pytest.mark.parametrize(
    "grads, ratios, error, message",
    [
        ({}, 0.5, ValueError, "no gradients"),
        ({"a": torch.zeros(0)}, 0.5, ValueError, "0 elements"),
        ({"a": torch.ones(3)}, 1.5, ValueError, r"ratio must be in \[0, 1\], got 1.5"),
        ({"a": torch.ones(3)}, -0.1, ValueError, r"ratio must be in \[0, 1\]"),
        ({"a": torch.ones(3)}, [], ValueError, "empty sequence"),
        ({"a": torch.ones(3)}, "half", TypeError, "ratio must be a float"),
        ({"a": torch.ones(3, dtype=torch.float64)}, 0.5, TypeError, r"'a' has dtype torch.float64.*\.float\(\)"),
        ({"a": torch.ones(3, dtype=torch.int64)}, 0.5, TypeError, "expected float32"),
        ({"a": torch.ones(3), "b": torch.ones(2, device="meta")}, 0.5, ValueError, "one device"),
        ({"a": "not a tensor"}, 0.5, TypeError, "'a' is a str"),
    ],
    ids=[
        "empty",
        "zero_elements",
        "ratio_high",
        "ratio_low",
        "no_ratios",
        "ratio_str",
        "fp64",
        "int",
        "devices",
        "str",
    ],
)
def test_bad_input_is_a_clear_error(grads, ratios, error, message):
    with pytest.raises(error, match=message):
        salun_ext.saliency_masks(grads, ratios)


def test_parameter_without_grad_is_named():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"parameter 'weight' has no \.grad"):
        salun_ext.saliency_masks(model.named_parameters(), 0.5)


@pytest.mark.parametrize("form", ["list", "tuple", "dict", "pairs", "named_parameters", "parameter_dict"])
def test_plain_inputs_take_the_one_pass_path_with_the_checked_paths_result(form, monkeypatch):
    from salun_ext.saliency import _threshold

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net(torch.randn(5, 3)).sum().backward()
    named = list(net.named_parameters())
    plain = [p.grad for _, p in named]
    grads = {
        "list": plain,
        "tuple": tuple(plain),
        "dict": {n: p.grad for n, p in named},
        "pairs": [(n, p.grad) for n, p in named],
        "named_parameters": named,
        "parameter_dict": dict(named),
    }[form]
    monkeypatch.setattr(_threshold, "_named_gradient", lambda *a: pytest.fail("took the per-tensor path"))
    names, tensors = _threshold.named_tensors(grads)
    assert names == (list(map(str, range(4))) if form in ("list", "tuple") else [n for n, _ in named])
    assert all(a is b for a, b in zip(tensors, plain)) and len(tensors) == 4


def test_tensors_that_require_grad_are_detached_by_the_one_pass_path():
    from salun_ext.saliency import _threshold

    x = torch.randn(3, requires_grad=True)
    names, tensors = _threshold.named_tensors([x, torch.randn(2)])
    assert names == ["0", "1"] and not tensors[0].requires_grad and tensors[0].data_ptr() == x.data_ptr()


@pytest.mark.parametrize("device", DEVICES)
def test_more_ratios_than_one_histogram_call_takes(device, monkeypatch):
    # the CUDA key_histogram takes at most ops.MAX_HISTOGRAM_PREFIXES prefixes per call: more ratios (distinct
    # prefixes) are split into several calls, on every device, with the thresholds of the unsplit select
    gen = torch.Generator().manual_seed(21)
    heavy = [torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 4) for n in (9000, 7)]
    tensors = [t.to(device) for t in heavy]
    total = sum(t.numel() for t in tensors)
    ks = [round(total * (i + 0.5) / 150) for i in range(150)]
    calls = []
    real = ops.key_histogram

    def spy(grads, **kw):
        calls.append(len(kw["prefixes"]))
        assert len(kw["prefixes"]) <= ops.MAX_HISTOGRAM_PREFIXES
        return real(grads, **kw)

    monkeypatch.setattr(ops, "key_histogram", spy)
    got = find_thresholds(tensors, ks)
    assert max(calls) == ops.MAX_HISTOGRAM_PREFIXES and len(calls) > len(DIGIT_WIDTHS)  # the split happened
    ordered = oracle_keys(tensors).sort(descending=True).values
    assert [th.key for th in got] == [int(ordered[k - 1]) for k in ks]
    monkeypatch.setattr(ops, "key_histogram", real)
    for mask in salun_ext.saliency_masks(tensors, [k / total for k in ks], method="histogram"):
        assert torch.equal(flat_dense(mask), oracle_exact_mask(tensors, mask.k))
