"""The workflows the CLI and `reproduce` share, and their input checks."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from salun_ext.classification import OriginalData, OriginalTrainConfig, RunOptions, get_method, train_original
from salun_ext.classification.methods.base import UnlearnData
from salun_ext.classification.workflows import forget_split, load_train_test, read_forget_indices, unlearn_and_evaluate
from salun_ext.models import ModelSpec
from salun_ext.utils import UsageError


def test_forget_indices_must_be_unique_integers(tmp_path, caplog):
    path = tmp_path / "idx.json"
    for bad, shown in (([0.5, 1], "0.5"), ([True, 2], "True"), ({"a": 1}, "dict")):
        path.write_text(json.dumps(bad))
        with pytest.raises(UsageError, match=shown):
            read_forget_indices(str(path))
    path.write_text("[3, 1, 3, 2, 1]")
    with caplog.at_level(logging.WARNING, logger="salun_ext"):
        assert read_forget_indices(str(path)) == [3, 1, 2]
    assert "2 duplicate index(es) ignored" in caplog.text
    path.write_text("[1, 2")
    with pytest.raises(UsageError, match="not valid JSON"):
        read_forget_indices(str(path))
    with pytest.raises(UsageError, match="file not found"):
        read_forget_indices(str(tmp_path / "none.json"))


def test_the_cli_and_reproduce_share_one_record(tmp_path):
    """unlearn_and_evaluate's record is what both write: the same keys and metrics for the same inputs."""
    train, test = load_train_test("digits")
    split = forget_split(train, test, ratio=0.1, forget_seed=1)
    spec = ModelSpec("small_cnn", train.channels, train.num_classes, train.image_size, {"width": 8})
    options = RunOptions(device="cpu", seed=1, progress=False)
    model, record = train_original(
        spec, OriginalData(split.train, split.val, split.test), OriginalTrainConfig(epochs=2, lr=0.1), options
    )
    assert {"seconds", "config", "train_accuracy", "val_accuracy", "test_accuracy"} <= set(record)
    assert record["train_accuracy"] > 50  # two epochs learn digits well above chance (10%)
    data = UnlearnData(split.forget, split.retain, batch_size=128)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    records = []
    for _ in range(2):
        model.load_state_dict(state)
        _, out = unlearn_and_evaluate(
            get_method("ga", epochs=1, lr=0.01), model, split, data, options, mia_shadow_size=50
        )
        records.append(out)
    assert set(records[0]) == {"method", "label", "config", "rte_seconds", "info", "history", "split", "metrics"}
    assert records[0]["metrics"] == records[1]["metrics"]  # the same inputs give the same numbers
    assert records[0]["split"]["forget"] == len(split.forget) and torch.is_tensor(split.forget.labels)


def test_a_model_with_nan_weights_is_refused_before_the_mia():
    from salun_ext.classification.evaluation import evaluate_unlearning

    train, test = load_train_test("digits")
    split = forget_split(train, test, ratio=0.1, forget_seed=1)
    model = ModelSpec("small_cnn", 1, 10, 8, {"width": 8}).build()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    name = next(n for n, _ in model.named_parameters())
    with pytest.raises(UsageError, match=rf"'{name}' holds NaN or Inf"):
        evaluate_unlearning(model, split.forget, split.retain, split.test)
