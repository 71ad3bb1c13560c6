"""--protocol paper: the paper code's behaviours, each reaching the run (docs/protocols.md)."""

from __future__ import annotations

import json

import pytest
import torch

from salun_ext.classification import RunOptions, UnlearnData, get_method
from salun_ext.classification.evaluation import evaluate_unlearning
from salun_ext.classification.methods.finetune import OriginalTrainConfig, RetrainConfig
from salun_ext.classification.protocols import PAPER_NORMALIZATION, PROTOCOLS, get_protocol
from salun_ext.classification.workflows import forget_split, load_train_test
from salun_ext.data import Augment
from salun_ext.models import ModelSpec, build_model, last_linear
from salun_ext.utils import UsageError

PAPER = PROTOCOLS["paper"]


def test_protocol_names_and_errors():
    assert get_protocol(None).name == "default" and get_protocol("paper") is PAPER
    with pytest.raises(UsageError, match="expected one of default, paper; got 'papr'"):
        get_protocol("papr")
    assert get_protocol("default").for_method("salun") == {} and get_protocol("default").model_options("cifar10") == {}


def test_paper_normalisation_is_the_per_dataset_statistics():
    options = PAPER.model_options("cifar10")
    model = ModelSpec("resnet18", 3, 10, 32, options).build()
    norm = model[0]
    assert torch.equal(norm.mean.flatten(), torch.tensor(PAPER_NORMALIZATION["cifar10"][0]))
    assert torch.equal(norm.std.flatten(), torch.tensor([0.2470, 0.2435, 0.2616]))
    assert PAPER.model_options("digits") == {}  # the paper's code has no digits: 0.5 / 0.5 stays
    with pytest.raises(UsageError, match="expected 3 values each"):
        build_model("resnet18", 3, 10, 32, mean=[0.5], std=[0.5])


def test_paper_milestones_are_absolute_epochs():
    retrain = RetrainConfig(**PAPER.for_method("retrain"))
    assert retrain.recipe().milestones == (91, 136)  # 160 epochs: the code's --decreasing_lr 91,136
    assert retrain.recipe(epochs=20).milestones == (91, 136)  # no decay within 20 epochs, as the code does
    assert RetrainConfig().recipe().milestones == (80, 120)  # the default: half and three quarters
    assert OriginalTrainConfig(**PAPER.original_overrides).recipe().milestones == (91, 136)


def _toy():
    train, test = load_train_test("digits", train_subset=300)
    split = forget_split(train, test, ratio=0.1, forget_seed=1)
    return split


def test_paper_salun_masks_augmented_batches_and_uses_grad_times_mask():
    salun = get_method("salun", **PAPER.for_method("salun"))
    assert salun.config.mask_mode == "compat" and salun.config.mask_batches == "augmented"
    split = _toy()
    data = UnlearnData(split.forget, split.retain, batch_size=16, augment=Augment(pad=1, flip=False))
    options = RunOptions(device="cpu", seed=1, progress=False)
    masks = {}
    for batches in ("plain", "augmented"):
        torch.manual_seed(0)
        model = ModelSpec("small_cnn", 1, 10, 8, {"width": 8}).build()
        result = get_method("salun", epochs=1, mask_batches=batches).run(model, data, options)
        masks[batches] = result.mask
    assert not masks["plain"].equal(masks["augmented"])  # the mask saw the augmented images
    with pytest.raises(UsageError, match="mask_batches must be"):
        get_method("salun", mask_batches="shuffled").run(ModelSpec("small_cnn", 1, 10, 8).build(), data, options)


def test_paper_be_is_evaluated_as_its_c_plus_1_way_model():
    split = _toy()
    data = UnlearnData(split.forget, split.retain, batch_size=16)
    torch.manual_seed(0)
    model = ModelSpec("small_cnn", 1, 10, 8, {"width": 8}).build()
    result = get_method("be", epochs=1, **PAPER.for_method("be")).run(model, data, RunOptions(device="cpu", seed=1))
    assert result.info["shadow_class"] == 10 and last_linear(model)[1].out_features == 11
    with torch.no_grad():  # a model that always answers the shadow class: every answer is wrong
        head = last_linear(model)[1]
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0] * 10 + [5.0]))
    metrics = evaluate_unlearning(model, split.forget, split.retain, split.test, mia_shadow_size=50)
    assert metrics["UA"] == 100.0 and metrics["RA"] == 0.0 and metrics["TA"] == 0.0
    default = ModelSpec("small_cnn", 1, 10, 8, {"width": 8}).build()
    get_method("be", epochs=1).run(default, data, RunOptions(device="cpu", seed=1))
    assert last_linear(default)[1].out_features == 10  # the default drops the shadow neuron


def test_reproduce_paper_protocol_reaches_every_piece(tmp_path):
    from salun_ext.classification.experiment import ExperimentConfig, reproduce

    config = ExperimentConfig(
        methods=["salun", "be"],
        ratios=[0.1],
        train_subset=300,
        original={"epochs": 2},
        method_overrides={"retrain": {"epochs": 2}, "salun": {"epochs": 1}, "be": {"epochs": 1}},
        protocol="paper",
        out_dir=str(tmp_path / "r"),
        run=RunOptions(device="cpu", progress=False),
        verbose=False,
    )
    summary = reproduce(config)
    original = json.loads((tmp_path / "r" / "original" / "seed1" / "original.json").read_text())
    assert original["split"]["split_seed"] == 1 and original["config"]["milestone_epochs"] == [91, 136]
    run = json.loads((tmp_path / "r" / "runs" / "random_10" / "seed1" / "salun" / "result.json").read_text())
    assert run["split"]["split_seed"] == 2 and run["config"]["mask_mode"] == "compat"
    be = json.loads((tmp_path / "r" / "runs" / "random_10" / "seed1" / "be" / "result.json").read_text())
    assert be["config"]["keep_shadow"] is True and be["info"]["shadow_class"] == 10
    assert summary["protocol"]["name"] == "paper" and "paper protocol" in summary["title"]


def test_cli_paper_protocol(tmp_path):
    from salun_ext.cli import main
    from salun_ext.models import read_spec

    fast = ["--no-progress", "--device", "cpu", "--train-subset", "300", "--protocol", "paper"]
    model = tmp_path / "orig" / "model.safetensors"
    assert main(["train", "--epochs", "1", "--out", str(model), *fast]) == 0
    trained = json.loads(model.with_suffix(".json").read_text())
    assert trained["split_seed"] == 1 and trained["protocol"] == "paper"
    assert trained["config"]["milestone_epochs"] == [91, 136]
    out = tmp_path / "be"
    args = ["unlearn", "--checkpoint", str(model), "--forget-ratio", "0.1", "--method", "be", "--set", "epochs=1"]
    assert main([*args, "--mia-shadow-size", "50", "--out", str(out), *fast]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["protocol"] == "paper" and run["config"]["keep_shadow"] and run["config"]["lr"] == 0.01
    assert read_spec(out / "model.safetensors")[0].num_classes == 11  # the (C+1)-way model, loadable as such
