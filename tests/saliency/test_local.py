"""saliency_masks in one process: exactness against a concatenate-and-argsort oracle, every method, window fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import salun_ext
from salun_ext.saliency import ratio_to_k
from tests.helpers import DEVICES, VALUE_KINDS, flat_dense, id_formatter, nasty_list, oracle_exact_mask, oracle_keys

SIZES = [300, 1, 0, 4097, 33, 2000]
RATIOS = [0.0, 0.001, 0.1, 0.5, 0.9, 0.99, 1.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", VALUE_KINDS)
@pytest.mark.parametrize(
    "dtypes",
    [[torch.float32], [torch.bfloat16], [torch.float16], [torch.float32, torch.float16, torch.bfloat16]],
    ids=id_formatter("dtypes"),
)
def test_exact_k_equals_stable_argsort_ranks(device, kind, dtypes):
    tensors = nasty_list(SIZES, kind, dtypes, seed=11, device=device)
    masks = salun_ext.saliency_masks(tensors, RATIOS, nan="zero")
    total = sum(t.numel() for t in tensors)
    for ratio, mask in zip(RATIOS, masks):
        k = ratio_to_k(ratio, total)
        assert mask.k == k
        assert mask.count() == k
        got = flat_dense(mask)
        assert torch.equal(got, oracle_exact_mask(tensors, k)), (ratio, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["heavy", "zeros90", "ties", "narrow"])
def test_threshold_mode_selects_everything_at_or_above_the_kth(device, kind):
    tensors = nasty_list(SIZES, kind, [torch.float32], seed=5, device=device)
    keys = oracle_keys(tensors)
    for mask in salun_ext.saliency_masks(tensors, [0.1, 0.5, 0.9], exact_k=False):
        kth = torch.sort(keys, descending=True).values[mask.k - 1]
        got = flat_dense(mask)
        assert torch.equal(got, keys >= kth)
        assert mask.count() >= mask.k
        assert mask.threshold == pytest.approx(float(torch.tensor([int(kth)], dtype=torch.int32).view(torch.float32)))


def test_threshold_value_is_the_kth_largest_magnitude():
    g = {"a": torch.tensor([0.5, -3.0, 2.0]), "b": torch.tensor([[-1.0, 4.0]])}
    mask = salun_ext.saliency_masks(g, 0.4)  # k = 2 of 5 -> {4, -3}
    assert mask.k == 2
    assert mask.threshold == 3.0
    assert mask.dense("a").tolist() == [False, True, False]
    assert mask.dense("b").tolist() == [[False, True]]
    assert salun_ext.saliency_masks(g, 0.0).threshold == float("inf")


def test_ties_broken_by_parameter_order_then_flat_index():
    g = {"first": torch.tensor([1.0, 2.0, 1.0]), "second": torch.tensor([1.0, 1.0])}
    mask = salun_ext.saliency_masks(g, 0.6)  # k = 3: the 2.0, then the first two 1.0s in global order
    assert mask.dense("first").tolist() == [True, True, True]
    assert mask.dense("second").tolist() == [False, False]
    loose = salun_ext.saliency_masks(g, 0.6, exact_k=False)
    assert loose.count() == 5


def test_non_contiguous_views_rank_in_row_major_order():
    base = torch.randn(6, 8)
    view = base[:, ::2]  # non-contiguous
    mask = salun_ext.saliency_masks({"v": view}, 0.5)
    assert torch.equal(mask.dense("v").reshape(-1), oracle_exact_mask([view.contiguous()], 12))


def test_multi_ratio_equals_single_ratio_calls():
    tensors = nasty_list([500, 1000, 77], "heavy", [torch.float32], seed=2)
    ratios = [0.05, 0.3, 0.3, 0.75]
    together = salun_ext.saliency_masks(tensors, ratios)
    for r, mask in zip(ratios, together):
        assert mask.equal(salun_ext.saliency_masks(tensors, r))


def test_forced_reference_path_gives_the_same_mask(tmp_path):
    tensors = nasty_list([1000, 333, 4097], "zeros30", [torch.float32, torch.bfloat16], seed=9)
    path = tmp_path / "grads.pt"
    torch.save(tensors, path)
    expected = salun_ext.saliency_masks(tensors, [0.1, 0.5])
    script = (
        "import sys, torch, salun_ext\n"
        "assert not salun_ext.native.loaded and 'FORCE_REFERENCE' in salun_ext.native.reason\n"
        "t = torch.load(sys.argv[1], weights_only=True)\n"
        "for i, m in enumerate(salun_ext.saliency_masks(t, [0.1, 0.5])):\n"
        "    m.save(sys.argv[2] + f'.{i}')\n"
    )
    env = dict(os.environ, SALUN_EXT_FORCE_REFERENCE="1")
    subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "m")], check=True, env=env)
    for i, mask in enumerate(expected):
        assert salun_ext.SaliencyMask.load(tmp_path / f"m.{i}").equal(mask)


@pytest.mark.slow
def test_more_than_2_pow_32_elements_exact_with_ties_beyond_32_bit_indices():
    # 4 x 2^30 bf16 zeros + a small tensor of distinct values: the threshold sits on 0, the tie quota ends at a
    # global index above 2^32 (torch.topk returns wrong indices past 2^32 elements). ~9 GB of memory.
    zeros = [torch.zeros(2**30, dtype=torch.bfloat16) for _ in range(4)]
    tail = torch.arange(1, 1025, dtype=torch.float32).to(torch.bfloat16)
    grads = [*zeros, tail]
    total = 2**32 + 1024
    ratio = 0.999  # k = floor(0.999 * total): all 1024 values plus most of the zeros
    mask = salun_ext.saliency_masks(grads, ratio)
    k = ratio_to_k(ratio, total)
    assert mask.count() == k
    ties_taken = k - 1024
    for i in range(4):
        expected = min(2**30, max(0, ties_taken - i * 2**30))
        assert mask.count(str(i)) == expected
    assert mask.count("4") == 1024
    last = mask.dense("3")
    cut = ties_taken - 3 * 2**30
    assert bool(last[:cut].all()) and not bool(last[cut:].any())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", VALUE_KINDS)
@pytest.mark.parametrize("method", ["window", "histogram"])
def test_every_method_is_exact(device, kind, method):
    tensors = nasty_list([70_000, 1, 40_000, 333], kind, [torch.float32, torch.bfloat16], seed=8, device=device)
    masks = salun_ext.saliency_masks(tensors, RATIOS, nan="zero", method=method)
    for mask in masks:
        assert torch.equal(flat_dense(mask), oracle_exact_mask(tensors, mask.k))
    loose = salun_ext.saliency_masks(tensors, [0.1, 0.5], nan="zero", method=method, exact_k=False)
    keys = oracle_keys(tensors)
    for mask in loose:
        kth = torch.sort(keys, descending=True).values[mask.k - 1]
        assert torch.equal(flat_dense(mask), keys >= kth)


def test_window_falls_back_to_histograms_when_the_bracket_misses(monkeypatch, caplog):
    from salun_ext.saliency import local as saliency

    tensors = nasty_list([100_000, 50_000], "zeros30", [torch.float32], seed=12)
    expected = salun_ext.saliency_masks(tensors, [0.2, 0.6], method="histogram")
    monkeypatch.setitem(saliency.WINDOW_CAPACITY, "cpu", 10)  # every window exceeds the buffer budget
    with caplog.at_level("DEBUG", logger="salun_ext"):
        got = salun_ext.saliency_masks(tensors, [0.2, 0.6], method="window")
    assert "exceeds the buffer budget" in caplog.text
    for g, e in zip(got, expected):
        assert g.equal(e) and g.threshold == e.threshold
    monkeypatch.setitem(saliency.WINDOW_CAPACITY, "cpu", 1 << 20)
    monkeypatch.setattr(saliency, "WINDOW_HEADROOM", 0.0)  # buffers of WINDOW_SLACK candidates overflow
    monkeypatch.setattr(saliency, "WINDOW_SLACK", 8)
    caplog.clear()
    with caplog.at_level("DEBUG", logger="salun_ext"):
        got = salun_ext.saliency_masks(tensors, [0.2, 0.6], method="window")
    assert "window select missed" in caplog.text
    for g, e in zip(got, expected):
        assert g.equal(e) and g.threshold == e.threshold
    monkeypatch.setattr(saliency, "WINDOW_HEADROOM", 2.0)
    monkeypatch.setattr(saliency, "WINDOW_SLACK", 1 << 14)
    monkeypatch.setitem(saliency.WINDOW_CAPACITY, "cpu", 1 << 20)
    monkeypatch.setattr(saliency, "WINDOW_SIGMAS", 0.0)  # a bracket too narrow to hold the threshold, often
    for g, e in zip(salun_ext.saliency_masks(tensors, [0.2, 0.6], method="window"), expected):
        assert g.equal(e)


def test_window_buffers_sized_from_the_sample_hold_the_window(caplog):
    # the candidate buffer is sized per k from the sample (memory budget): it must still hold typical windows,
    # or every mask would silently pay for the histogram fallback
    tensors = nasty_list([400_000, 300_000, 5_000], "heavy", [torch.float32], seed=4)
    ratios = [0.001, 0.1, 0.5, 0.9, 0.999]
    with caplog.at_level("DEBUG", logger="salun_ext"):
        got = salun_ext.saliency_masks(tensors, ratios, method="window")
    assert "window select missed" not in caplog.text
    for g, e in zip(got, salun_ext.saliency_masks(tensors, ratios, method="histogram")):
        assert g.equal(e) and g.threshold == e.threshold


def test_window_nan_is_reported():
    g = {"w": torch.randn(100_000)}
    g["w"][77] = float("nan")
    with pytest.raises(ValueError, match=r"w \(1 NaN\)"):
        salun_ext.saliency_masks(g, 0.5, method="window")
    with pytest.raises(ValueError, match="method must be"):
        salun_ext.saliency_masks(g, 0.5, method="sort")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=id_formatter("dtype"))
def test_auto_takes_the_window_path_on_typical_gradients(device, dtype, monkeypatch):
    # typical gradients (no mass of ties at the threshold) must be selected by the one-pass window, with no
    # histogram pass: a silent fallback would stay exact but cost about four reads instead of one
    from salun_ext import ops

    sizes = [2_000_000, 1_000_000, 4097] if device == "cuda" else [300_000, 100_000, 4097]  # > the sample
    tensors = nasty_list(sizes, "heavy", [dtype], seed=31, device=device)
    ratios = [0.01, 0.1, 0.5, 0.9]
    calls = {"window_select": 0, "key_histogram": 0, "mask_words": 0}

    def spy(name):
        real = getattr(ops, name)

        def counted(*args, **kw):
            calls[name] += 1
            return real(*args, **kw)

        return counted

    for name in calls:
        monkeypatch.setattr(ops, name, spy(name))
    got = salun_ext.saliency_masks(tensors, ratios)  # method="auto"
    assert calls == {"window_select": len(ratios), "key_histogram": 0, "mask_words": 0}
    monkeypatch.undo()
    for mask, expected in zip(got, salun_ext.saliency_masks(tensors, ratios, method="histogram")):
        assert mask.equal(expected) and mask.threshold == expected.threshold and mask.count() == mask.k


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.parametrize("method", ["auto", "histogram"])
def test_more_than_2_31_elements_on_cuda_select_exactly_k(method):
    # ~2.4e9 fp32 elements (9.7 GB): 64-bit indexing in every pass. selected == k is asserted (the benchmark only
    # prints it), and the threshold is checked against counts torch takes itself
    gen = torch.Generator(device="cuda").manual_seed(7)
    sizes = [2**30, 2**30, 2**28 + 12_345]
    tensors = [torch.randn(n, device="cuda", generator=gen) for n in sizes]
    total = sum(sizes)
    assert total > 2**31
    ratios = [0.001, 0.5]
    for ratio, mask in zip(ratios, salun_ext.saliency_masks(tensors, ratios, method=method)):
        k = ratio_to_k(ratio, total)
        assert mask.k == k and mask.count() == k
        above = sum(int((t.abs() > mask.threshold).sum()) for t in tensors)
        at = sum(int((t.abs() == mask.threshold).sum()) for t in tensors)
        assert above < k <= above + at
        last = mask.dense(mask.names[-1]).to("cuda")  # past element 2^31 of the list
        assert torch.equal(last & (tensors[-1].abs() > mask.threshold), tensors[-1].abs() > mask.threshold)
