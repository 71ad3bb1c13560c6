"""Classifier builders and checkpoints."""

from __future__ import annotations

import pytest
import torch

from salun_ext.models import (
    MODELS,
    ModelSpec,
    build_model,
    last_linear,
    load_classifier,
    load_weights,
    read_spec,
    reinitialize,
    save_classifier,
)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 32)])
def test_models_take_the_datasets_shape(name, channels, size):
    model = build_model(name, channels, 7, size).eval()
    assert model(torch.rand(2, channels, size, size)).shape == (2, 7)
    assert last_linear(model)[1].out_features == 7


def test_small_cnn_width_option_and_bad_options():
    narrow = build_model("small_cnn", 1, 10, 28, width=8)
    assert sum(p.numel() for p in narrow.parameters()) < sum(
        p.numel() for p in build_model("small_cnn", 1, 10, 28).parameters()
    )
    with pytest.raises(ValueError, match="does not take options"):
        build_model("resnet18", 3, 10, 32, width=8)
    with pytest.raises(ValueError, match="unknown model 'resnet7'"):
        build_model("resnet7", 3, 10, 32)


def test_reinitialize_is_seeded():
    a, b = build_model("small_cnn", 1, 3, 8), build_model("small_cnn", 1, 3, 8)
    reinitialize(a, seed=5)
    reinitialize(b, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    reinitialize(b, seed=6)
    assert not torch.equal(a[1].weight, b[1].weight)


def test_checkpoint_round_trip_and_wrong_architecture(tmp_path):
    spec = ModelSpec("small_cnn", 1, 10, 8, {"width": 8})
    model = spec.build()
    path = tmp_path / "m.safetensors"
    save_classifier(path, model, spec, extra={"dataset": "digits"})
    loaded, loaded_spec, extra = load_classifier(path)
    assert loaded_spec == spec and extra == {"dataset": "digits"}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert read_spec(path)[0].describe() == "small_cnn (1 channel(s), 10 classes, 8px, width=8)"
    with pytest.raises(ValueError, match=r"the checkpoint is a small_cnn .* not a resnet18"):
        load_classifier(path, expect_arch="resnet18")
    other = build_model("small_cnn", 1, 10, 8)  # width 32: same names, other shapes
    with pytest.raises(ValueError, match="does not fit this Sequential: shape mismatch"):
        load_weights(other, path)
    torch.save({"x": 1}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="not a readable safetensors checkpoint"):
        load_classifier(tmp_path / "pickle.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_classifier(tmp_path / "missing.safetensors")
