"""SaliencyMask: layout, dense views, safetensors and upstream round trips, corrupted and foreign files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import salun_ext
from salun_ext import SaliencyMask
from salun_ext.ops import _mask_layout


def _mask(ratio=0.5):
    gen = torch.Generator().manual_seed(0)
    grads = {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=gen),
        "conv.bias": torch.randn(4, generator=gen),
        "fc.weight": torch.randn(10, 200, generator=gen),
        "empty": torch.randn(0, generator=gen),
    }
    return salun_ext.saliency_masks(grads, ratio), grads


def test_layout_segments_are_padded_to_128_bits():
    mask, _ = _mask()
    assert mask.segment("conv.bias").numel() == 4  # 4 elements -> one 128-bit segment
    assert mask.segment("conv.weight").numel() == 4  # 108 elements
    assert mask.segment("fc.weight").numel() == 64  # 2000 elements -> 16 segments of 4 words
    assert mask.segment("empty").numel() == 0
    assert mask.word_offset("fc.weight") == 8
    assert mask.words.numel() == 72


def test_dense_views_and_counts():
    mask, grads = _mask(0.25)
    dense = mask.to_dense()
    assert set(dense) == set(grads)
    for name, g in grads.items():
        assert dense[name].shape == g.shape and dense[name].dtype == torch.bool
        assert mask.count(name) == int(dense[name].sum())
    assert mask.count() == mask.k == int(0.25 * 2112)
    assert mask.density == pytest.approx(mask.k / 2112)
    assert mask["fc.weight"].shape == (10, 200)
    assert "conv.bias" in mask and "nope" not in mask
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        mask.dense("nope")


def test_pack_unpack_round_trip_random_bits():
    for n in (0, 1, 31, 32, 33, 127, 128, 129, 1000):
        bits = torch.rand(n) < 0.5
        words = _mask_layout.pack_bits(bits)
        assert words.numel() == _mask_layout.segment_words(n)
        assert torch.equal(_mask_layout.unpack_bits(words, n), bits)
        assert _mask_layout.popcount(words) == int(bits.sum())


def test_save_load_round_trip(tmp_path):
    mask, _ = _mask()
    path = tmp_path / "mask.safetensors"
    mask.save(path)
    loaded = SaliencyMask.load(path)
    assert loaded.equal(mask)
    assert (loaded.ratio, loaded.k, loaded.threshold, loaded.exact_k) == (mask.ratio, mask.k, mask.threshold, True)
    zero = salun_ext.saliency_masks({"a": torch.ones(3)}, 0.0)
    zero.save(path)
    assert SaliencyMask.load(path).threshold == float("inf")


def test_load_rejects_missing_corrupted_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="mask file not found"):
        SaliencyMask.load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        SaliencyMask.load(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.ones(3)}, str(foreign))
    with pytest.raises(ValueError, match="not a salun_ext saliency mask"):
        SaliencyMask.load(foreign)

    mask, _ = _mask()
    good = tmp_path / "good.safetensors"
    mask.save(good)
    meta = {
        "format": "salun_ext.saliency_mask",
        "version": "1",
        "names": json.dumps(list(mask.names)),
        "shapes": json.dumps([list(s) for s in mask.shapes]),
        "ratio": "0.5",
        "k": json.dumps(mask.k),
        "threshold": "1.0",
        "exact_k": "true",
    }
    truncated = tmp_path / "truncated.safetensors"
    save_file({"words": mask.words[:-4].clone()}, str(truncated), metadata=meta)
    with pytest.raises(ValueError, match="corrupted mask"):
        SaliencyMask.load(truncated)
    flipped = mask.words.clone()
    flipped[0] ^= 1
    wrong_count = tmp_path / "wrong_count.safetensors"
    save_file({"words": flipped}, str(wrong_count), metadata=meta)
    with pytest.raises(ValueError, match="salient entries but k"):
        SaliencyMask.load(wrong_count)
    padded = mask.words.clone()
    padded[mask.word_offset("conv.bias")] |= 1 << 10  # conv.bias has 4 elements: bit 10 is padding
    padding = tmp_path / "padding.safetensors"
    save_file({"words": padded}, str(padding), metadata=dict(meta, k="null"))
    with pytest.raises(ValueError, match="padding bits"):
        SaliencyMask.load(padding)
    future = tmp_path / "future.safetensors"
    save_file({"words": mask.words}, str(future), metadata=dict(meta, version="99"))
    with pytest.raises(ValueError, match="unsupported mask format version"):
        SaliencyMask.load(future)


def test_upstream_round_trip(tmp_path):
    mask, _ = _mask()
    upstream = mask.to_upstream()
    assert all(v.dtype == torch.int64 for v in upstream.values())
    path = tmp_path / "with_0.5.pt"
    torch.save(upstream, path)
    back = SaliencyMask.from_upstream(path)
    assert back.equal(mask)
    assert back.ratio == 0.5 and back.k == mask.k
    as_float = {n: v.float() for n, v in upstream.items()}
    assert SaliencyMask.from_upstream(as_float).equal(mask)
    as_bool = {n: v.bool() for n, v in upstream.items()}
    assert SaliencyMask.from_upstream(as_bool).equal(mask)


def test_upstream_rejects_non_binary_and_non_dicts(tmp_path):
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        SaliencyMask.from_upstream({"w": torch.tensor([0.0, 0.5])})
    with pytest.raises(ValueError, match="dict name -> tensor"):
        SaliencyMask.from_upstream([torch.ones(2)])
    with pytest.raises(TypeError, match="expected a tensor"):
        SaliencyMask.from_upstream({"w": [1, 0]})
    with pytest.raises(ValueError, match="empty"):
        SaliencyMask.from_upstream({})
    bad = tmp_path / "with_0.5.pt"
    bad.write_bytes(b"definitely not a zip")
    with pytest.raises(ValueError, match="not a readable PyTorch mask file"):
        SaliencyMask.from_upstream(bad)


def test_upstream_file_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "with_0.5.pt"
    torch.save({"w": Evil()}, path)
    with pytest.raises(ValueError, match="not a readable PyTorch mask file"):
        SaliencyMask.from_upstream(path)


def test_check_compatible_names_the_differences():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model(torch.randn(2, 4)).sum().backward()
    mask = salun_ext.saliency_masks(model.named_parameters(), 0.5)
    mask.check_compatible(model)
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"shape mismatch.*0\.weight: mask \(3, 4\) vs model \(5, 4\)"):
        mask.check_compatible(other)
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"not covered by the mask: 2\.weight"):
        bigger.requires_grad_(True)
        mask.check_compatible(bigger)
    mask.check_compatible(bigger, require_all=False)
    with pytest.raises(ValueError, match="missing from the model"):
        mask.check_compatible(torch.nn.Linear(4, 3))


def test_to_device_and_repr():
    mask, _ = _mask()
    moved = mask.to("cpu")
    assert moved.equal(mask) and moved.device.type == "cpu"
    assert "ratio=0.5" in repr(mask)


def test_constructor_validation():
    with pytest.raises(ValueError, match="duplicate"):
        SaliencyMask(torch.zeros(8, dtype=torch.int32), ["a", "a"], [(3,), (3,)])
    with pytest.raises(ValueError, match="shapes need 4"):
        SaliencyMask(torch.zeros(8, dtype=torch.int32), ["a"], [(3,)])
    with pytest.raises(TypeError, match="int32"):
        SaliencyMask(torch.zeros(4, dtype=torch.int64), ["a"], [(3,)])


def test_subset_of_a_shard_keeps_each_tensors_box():
    """A rank's shard restricted to some tensors (ESD-x's parameters, ...) keeps their global shapes and offsets."""
    from salun_ext.mask import MaskShard

    shard = MaskShard(1, 2, (torch.Size([4]), torch.Size([4, 2])), ((2,), (2, 0)))
    bits = torch.tensor([True, False, True, True, False, False])
    mask = SaliencyMask(
        torch.cat([_mask_layout.pack_bits(bits[:2]), _mask_layout.pack_bits(bits[2:])]),
        ["a", "b"],
        [(2,), (2, 2)],
        k=5,
        shard=shard,
    )
    sub = mask.subset(["b"])
    assert sub.shard.global_shapes == (torch.Size([4, 2]),) and sub.shard.offsets == ((2, 0),)
    assert torch.equal(sub.dense("b"), bits[2:].view(2, 2))
    assert sub.k is None  # the subset's global count would need the other ranks
