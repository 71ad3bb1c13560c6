"""Class-conditional DDPM: model, sampling, save/load, training task, checkpoint + resume, bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from salun_ext.diffusion.core import DiffusionSet, check_guidance, check_steps, cycled_batches, eps_mse
from salun_ext.diffusion.ddpm import (
    PRESETS,
    ClassConditionalDDPM,
    dataset_to_set,
    forget_retain_sets,
    next_other_class,
    resize_images,
)
from salun_ext.diffusion.methods import run_task
from salun_ext.diffusion.tasks import EpsTask
from salun_ext.train import RunOptions, TrainRecipe
from salun_ext.train.engine import OptimConfig
from tests.diffusion_helpers import MICRO, digits, micro_ddpm


def _fixed_loss(model, data, n=64, seed=123):
    """eps-MSE of the model on a fixed noised batch (no dropout): the quantity training must lower."""
    task = EpsTask(model.spec, data, batch_size=n, cond_drop=0.0, seed=seed)
    batch = next(iter(task.batches(0)))
    with torch.no_grad():
        return float(task.loss(model.unet, batch))


def test_unet_has_class_embeddings_plus_null_class():
    model = micro_ddpm()
    assert model.unet.config.num_class_embeds == 11
    assert model.null_class == 10 and model.spec.null_id == 10
    x = torch.randn(3, 1, 8, 8)
    out = model.spec.eps(model.unet, x, torch.tensor([1, 500, 999]), torch.tensor([0, 9, 10]))
    assert out.shape == x.shape
    # the class label changes the prediction (the embedding is wired in)
    a = model.spec.eps(model.unet, x, torch.tensor([5, 5, 5]), torch.tensor([1, 1, 1]))
    b = model.spec.eps(model.unet, x, torch.tensor([5, 5, 5]), torch.tensor([2, 2, 2]))
    assert not torch.allclose(a, b)


def test_guided_eps_matches_the_cfg_formula():
    model = micro_ddpm()
    x, t, ids = torch.randn(4, 1, 8, 8), torch.tensor([10, 20, 30, 40]), torch.tensor([0, 1, 2, 3])
    cond = model.spec.eps(model.unet, x, t, ids)
    uncond = model.spec.eps(model.unet, x, t, torch.full_like(ids, 10))
    guided = model.spec.guided_eps(model.unet, x, t, ids, 3.0)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.spec.guided_eps(model.unet, x, t, ids, 1.0), cond, rtol=1e-4, atol=1e-5)


def test_presets_build(tmp_path):
    for name in ("tiny", "fashion_mnist"):
        m = ClassConditionalDDPM.from_config(name, [str(i) for i in range(10)])
        assert m.image_size == PRESETS[name].image_size
    cifar = PRESETS["cifar10"]
    assert cifar.block_out_channels == (128, 256, 256, 256) and cifar.layers_per_block == 2 and cifar.dropout == 0.1


def test_sampling_is_paired_by_seed_and_reacts_to_guidance():
    model = micro_ddpm()
    a = model.sample([0, 1, 2], num_inference_steps=4, seed=7)
    b = model.sample([0, 1, 2], num_inference_steps=4, seed=7, batch_size=2)  # batch size does not change noise
    c = model.sample([0, 1, 2], num_inference_steps=4, seed=7, guidance_scale=0.0)
    assert a.shape == (3, 1, 8, 8) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    d = model.sample(["3"], num_inference_steps=3, sampler="ddpm", seed=1)
    assert d.shape == (1, 1, 8, 8)


def test_save_load_round_trip(tmp_path):
    model = micro_ddpm(seed=3)
    folder = model.save_pretrained(tmp_path / "ddpm")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    meta = json.loads((folder / "salun_ddpm.json").read_text())
    assert meta["classes"] == model.classes and meta["dataset"] == "digits"
    loaded = ClassConditionalDDPM.from_pretrained(folder)
    for (n, p), (_, q) in zip(model.unet.named_parameters(), loaded.unet.named_parameters()):
        assert torch.equal(p, q), n
    torch.testing.assert_close(
        model.sample([4, 5], num_inference_steps=3, seed=2), loaded.sample([4, 5], num_inference_steps=3, seed=2)
    )


def test_bad_input_errors(tmp_path):
    model = micro_ddpm()
    with pytest.raises(ValueError, match="unknown class 'cat'"):
        model.class_id("cat")
    with pytest.raises(ValueError, match="out of range"):
        model.sample([10])
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        model.sample([1], guidance_scale=-1.0)
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\]"):
        model.sample([1], num_inference_steps=0)
    with pytest.raises(ValueError, match="sampler"):
        model.sample([1], sampler="euler")
    with pytest.raises(ValueError):
        check_guidance(float("nan"))
    with pytest.raises(ValueError):
        check_steps(1001, 1000)
    with pytest.raises(FileNotFoundError, match="not found"):
        ClassConditionalDDPM.from_pretrained(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "salun_ddpm.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"missing \['unet', 'scheduler'\]"):
        ClassConditionalDDPM.from_pretrained(tmp_path / "half")
    with pytest.raises(ValueError, match="unknown DDPM preset"):
        ClassConditionalDDPM.from_config("huge", ["a"])
    with pytest.raises(ValueError, match="12 class embeddings but 10 classes"):
        ClassConditionalDDPM(
            ClassConditionalDDPM.from_config("tiny", list("abcdefghijk")).unet, None, list("0123456789")
        )


def test_data_preparation_and_forget_retain_split():
    ds = digits()
    model = micro_ddpm()
    data = dataset_to_set(model, ds)
    assert data.x0.shape[1:] == (1, 8, 8) and data.x0.min() >= -1 and data.x0.max() <= 1
    assert resize_images(ds.images[:2], 16).shape == (2, 1, 16, 16)
    forget, retain = forget_retain_sets(model, ds, ["3"])
    assert set(forget.ids.tolist()) == {3} and 3 not in set(retain.ids.tolist())
    assert len(forget) + len(retain) == len(ds)
    assert set(forget.target_ids.tolist()) == {4}  # c' = (c + 1) % 10
    assert next_other_class(torch.tensor([3, 9]), [3, 4, 0], 10).tolist() == [5, 1]
    forget_r, _ = forget_retain_sets(model, ds, [3], target="random", seed=1)
    assert 3 not in set(forget_r.target_ids.tolist()) and len(set(forget_r.target_ids.tolist())) > 1
    with pytest.raises(ValueError, match="nothing is left"):
        forget_retain_sets(model, ds, list(range(10)))


def test_batches_and_losses_helpers():
    gen = torch.Generator().manual_seed(0)
    batches = list(cycled_batches(5, 3, 4, gen))
    assert [len(b) for b in batches] == [3, 3, 3, 3]
    assert all(int(i) < 5 for b in batches for i in b)
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert float(eps_mse(pred, target, "mean")) == 1.0 and float(eps_mse(pred, target, "sum")) == 4.0
    with pytest.raises(ValueError, match="reduction"):
        eps_mse(pred, target, "max")
    with pytest.raises(ValueError, match="empty"):
        DiffusionSet(torch.zeros(0, 1, 2, 2), torch.zeros(0, dtype=torch.long))


def test_training_lowers_the_eps_loss():
    model = micro_ddpm(seed=0)
    data = dataset_to_set(model, digits())
    before = _fixed_loss(model, data)
    train = TrainRecipe(max_steps=40, optimizer=OptimConfig("adam", lr=2e-3, weight_decay=0.0))
    run_task(model.unet, EpsTask(model.spec, data, batch_size=64), train, RunOptions(progress=False))
    after = _fixed_loss(model, data)
    assert after < 0.7 * before, (before, after)


def test_checkpoint_resume_is_exact(tmp_path):
    data = dataset_to_set(micro_ddpm(), digits()).subset(torch.arange(96))

    def run(epochs, resume, ckpt):
        model = micro_ddpm(seed=5)
        train = TrainRecipe(epochs=epochs, optimizer=OptimConfig("adam", lr=1e-3, weight_decay=0.0))
        options = RunOptions(checkpoint_dir=str(ckpt) if ckpt else None, resume=resume, progress=False, seed=1)
        run_task(model.unet, EpsTask(model.spec, data, batch_size=32, seed=9), train, options)
        return model

    straight = run(2, False, None)
    run(1, False, tmp_path / "ck")
    resumed = run(2, True, tmp_path / "ck")
    for (n, p), (_, q) in zip(straight.unet.named_parameters(), resumed.unet.named_parameters()):
        assert torch.equal(p, q), n


def test_fashion_mnist_class_names_and_resizing():
    from salun_ext.data import load_dataset

    try:
        ds = load_dataset("fashion_mnist", train=False)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST files are not installed")
    ds = ds.subset(torch.arange(300))
    model = ClassConditionalDDPM.from_config(
        dataclasses.replace(MICRO, image_size=8), ds.classes, dataset="fashion_mnist"
    )
    forget, retain = forget_retain_sets(model, ds, ["Trouser"])
    assert 1 not in set(retain.ids.tolist())
    assert forget.x0.shape[1:] == (1, 8, 8) and set(forget.ids.tolist()) == {1}
    assert set(forget.target_ids.tolist()) == {2}  # c' = Pullover
    assert model.sample(["Ankle boot"], num_inference_steps=2).shape == (1, 1, 8, 8)
