"""The classification CLI, in-process, on tiny configs in a temp dir: the files it writes and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from salun_ext.classification.presets import PRESETS
from salun_ext.cli import main, parse_args
from salun_ext.cli.config import parse_assignments, parse_sweeps, parse_value

FAST = ["--no-progress", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_value_and_assignment_parsing():
    assert parse_value("3") == 3 and parse_value("1e-4") == 1e-4 and parse_value("true") is True
    assert parse_value("none") is None and parse_value("[0.5, 0.75]") == [0.5, 0.75] and parse_value("mixed") == "mixed"
    assert parse_assignments(["salun.lr=0.01", "salun.order=mixed", "ga.epochs=3"], qualified=True) == {
        "salun": {"lr": 0.01, "order": "mixed"},
        "ga": {"epochs": 3},
    }
    assert parse_sweeps(["ga.lr=1e-5,1e-4"]) == {"ga": {"lr": [1e-5, 1e-4]}}
    with pytest.raises(ValueError, match=r"METHOD\.PARAM=VALUE"):
        parse_assignments(["lr=0.1"], qualified=True)


def test_flags_win_over_the_config_file_which_wins_over_defaults(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("seeds: [4, 5]\nratios: [0.2]\nmethods: [salun, ga]\nset:\n  salun: {lr: 0.02}\n")
    args = parse_args(["reproduce", "--config", str(config), "--ratios", "0.3"])
    assert args.seeds == [4, 5] and args.ratios == [0.3] and args.methods == ["salun", "ga"]
    assert args.set == {"salun": {"lr": 0.02}} and args.dataset == "digits" and args.split_seed == 2
    assert parse_args(["reproduce"]).ratios == [0.1, 0.5]  # reproduce's own default
    assert parse_args(["mask"]).ratios == [0.5]
    (tmp_path / "bad.json").write_text(json.dumps({"sedes": [1]}))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sedes'\]"):
        parse_args(["reproduce", "--config", str(tmp_path / "bad.json")])


def test_train_mask_unlearn_evaluate(tmp_path, capsys):
    model = tmp_path / "orig" / "model.safetensors"
    assert main(["train", "--epochs", "2", "--out", str(model), *FAST]) == 0
    assert model.exists() and json.loads(model.with_suffix(".json").read_text())["test_accuracy"] > 20
    assert not (model.parent / "ckpt").exists()

    forget = ["--forget-ratio", "0.1"]
    assert main(["mask", "--checkpoint", str(model), *forget, "--ratios", "0.2", "0.5", *FAST]) == 0
    masks = model.parent / "masks"
    assert (masks / "with_0.2.safetensors").exists() and (masks / "with_0.5.safetensors").exists()

    out = tmp_path / "salun"
    argv = ["unlearn", "--checkpoint", str(model), *forget, "--method", "salun", "--set", "epochs=1"]
    assert main([*argv, "--mask", str(masks / "with_0.5.safetensors"), "--out", str(out), *FAST]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "salun" and run["config"]["epochs"] == 1 and run["rte_seconds"] > 0
    assert set(run["metrics"]) >= {"UA", "RA", "TA", "MIA", "MIA_entropy", "MIA_m_entropy"}
    assert run["split"]["forget"] == 45  # 10% of the digits preset's 450-image training split (500 - val)

    retrain = tmp_path / "retrain"
    argv = ["unlearn", "--checkpoint", str(model), *forget, "--method", "retrain", "--set", "epochs=2"]
    assert main([*argv, "--out", str(retrain), "--no-evaluate", *FAST]) == 0
    capsys.readouterr()
    report = tmp_path / "eval.json"
    argv = ["evaluate", "--checkpoint", str(out / "model.safetensors"), *forget, "--retrain"]
    assert main([*argv, str(retrain / "model.safetensors"), "--out", str(report), *FAST]) == 0
    result = json.loads(report.read_text())
    assert result["metrics"] == pytest.approx(run["metrics"])  # same model, same split
    assert result["avg_gap"] == pytest.approx(sum(result["gap"].values()) / 4)
    assert "Avg. Gap" in capsys.readouterr().out


def test_bad_input_gives_one_clear_error(tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    assert main(["train", "--epochs", "1", "--out", str(model), *FAST]) == 0
    capsys.readouterr()
    cases = [
        (["unlearn", "--checkpoint", str(model), "--forget-ratio", "0.1", "--method", "unlearn_all"], "unknown method"),
        (["unlearn", "--checkpoint", str(model), "--forget-ratio", "0.0", "--method", "ga"], "forget set is empty"),
        (
            ["unlearn", "--checkpoint", str(model), "--forget-class", "3", "--forget-ratio", "0.1", "--method", "ga"],
            "exactly one of",
        ),
        (
            [
                "evaluate",
                "--checkpoint",
                str(model),
                "--dataset",
                "cifar10",
                "--data-root",
                str(tmp_path),
                "--forget-ratio",
                "0.1",
            ],
            "cifar-10-batches-py",
        ),
        (
            ["evaluate", "--checkpoint", str(tmp_path / "nope.safetensors"), "--forget-ratio", "0.1"],
            "checkpoint not found",
        ),
        (["reproduce", "--dataset", "imagenet22k"], "unknown dataset"),
        (
            [
                "reproduce",
                "--seeds",
                "1",
                "--tune-seeds",
                "1",
                "--sweep",
                "ga.lr=1e-4,1e-3",
                "--out",
                str(tmp_path / "r"),
            ],
            "also evaluation seeds",
        ),
    ]
    for argv, message in cases:
        assert main([*argv, *FAST]) == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and message in err, (argv, err)


def test_checkpoint_or_mask_for_another_model(tmp_path, capsys):
    from salun_ext.models import ModelSpec, save_classifier

    # a Fashion-MNIST-shaped checkpoint used on digits
    big = tmp_path / "fmnist.safetensors"
    save_classifier(big, ModelSpec("small_cnn", 1, 10, 28).build(), ModelSpec("small_cnn", 1, 10, 28))
    assert main(["evaluate", "--checkpoint", str(big), "--forget-ratio", "0.1", *FAST]) == 2
    assert "but digits has 1 channel(s), 10 classes and 8px" in capsys.readouterr().err
    # a mask computed for a narrower model
    narrow_spec = ModelSpec("small_cnn", 1, 10, 8, {"width": 8})
    narrow = tmp_path / "narrow.safetensors"
    save_classifier(narrow, narrow_spec.build(), narrow_spec)
    assert main(["mask", "--checkpoint", str(narrow), "--forget-ratio", "0.1", "--out", str(tmp_path), *FAST]) == 0
    wide = tmp_path / "wide.safetensors"
    wide_spec = ModelSpec("small_cnn", 1, 10, 8)
    save_classifier(wide, wide_spec.build(), wide_spec)
    argv = ["unlearn", "--checkpoint", str(wide), "--forget-ratio", "0.1", "--method", "salun"]
    assert main([*argv, "--mask", str(tmp_path / "with_0.5.safetensors"), *FAST]) == 2
    assert "does not match the checkpoint" in capsys.readouterr().err


def test_reproduce_writes_table_plot_json_and_resumes(tmp_path, capsys):
    out = tmp_path / "rep"
    argv = [
        "reproduce", "--methods", "ft", "ga", "salun", "--seeds", "1", "--original-epochs", "3",
        "--set", "retrain.epochs=3", "--set", "ft.epochs=1", "--set", "salun.epochs=1", "--out", str(out), *FAST,
    ]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "| SalUn |" in first and "random 10%: UA" in first
    summary = json.loads((out / "summary.json").read_text())
    assert [s["scenario"] for s in summary["scenarios"]] == ["random 10%", "random 50%"]
    assert set(summary["scenarios"][0]["methods"]) == {"retrain", "ft", "ga", "salun"}
    # every Avg. Gap is the mean |method - Retrain| over UA, RA, TA, MIA of the per-run results (one seed)
    runs = out / "runs" / "random_10" / "seed1"
    metrics = {
        m: json.loads((runs / m / "result.json").read_text())["metrics"] for m in ("retrain", "ft", "ga", "salun")
    }
    for m in ("ft", "ga", "salun"):
        want = sum(abs(metrics[m][k] - metrics["retrain"][k]) for k in ("UA", "RA", "TA", "MIA")) / 4
        assert summary["scenarios"][0]["methods"][m]["avg_gap"] == pytest.approx(want)
    assert any(summary["scenarios"][0]["methods"][m]["avg_gap"] > 0 for m in ("ft", "ga", "salun"))
    assert summary["original"][0]["seed"] == 1 and summary["machine"]
    table = (out / "table.md").read_text()
    assert "| Methods |" in table and "Original model:" in table and "MIA (m-entropy)" in table
    assert (out / "gaps.png").read_bytes()[:4] == b"\x89PNG"
    run = json.loads((out / "runs" / "random_10" / "seed1" / "salun" / "result.json").read_text())
    preset_lr = PRESETS["digits"]["methods"]["salun@0.1"]["lr"]  # --set epochs wins over the preset, lr from it
    assert run["config"]["epochs"] == 1 and run["config"]["lr"] == preset_lr and run["split"]["forget"] == 45
    # resume: nothing is recomputed, the numbers are the same
    assert main([*argv, "--resume"]) == 0
    second = capsys.readouterr().out
    assert second.count("(cached)") == 8 and "reusing" not in second  # the original was never needed
    assert json.loads((out / "summary.json").read_text())["scenarios"] == summary["scenarios"]
    # a changed hyperparameter is recomputed, not taken from the stale result
    assert main([*argv, "--set", "salun.lr=0.02", "--resume"]) == 0
    third = capsys.readouterr().out
    assert third.count("(cached)") == 6


def test_reproduce_sweep_tunes_on_separate_seeds(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [
        "reproduce", "--methods", "ga", "--ratios", "0.1", "--seeds", "1", "--tune-seeds", "7",
        "--sweep", "ga.lr=1e-5,1e-2", "--original-epochs", "2", "--set", "retrain.epochs=2", "--out", str(out), *FAST,
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    (tuning,) = summary["tuning"]
    assert (
        tuning["method"] == "ga"
        and tuning["tune_seeds"] == [7]
        and [s["value"] for s in tuning["scores"]] == [1e-5, 1e-2]
    )
    best = min(tuning["scores"], key=lambda s: s["avg_gap"])["value"]
    run = json.loads((out / "runs" / "random_10" / "seed1" / "ga" / "result.json").read_text())
    assert run["config"]["lr"] == best
    assert (out / "tune" / "random_10" / "seed7" / "retrain" / "result.json").exists()
    assert "Tuning (on seeds never used for evaluation)" in (out / "table.md").read_text()


def test_reproduce_class_wise_scenario(tmp_path):
    from salun_ext.classification.experiment import ExperimentConfig, reproduce
    from salun_ext.train import RunOptions

    config = ExperimentConfig(
        methods=["ga"],
        ratios=[],
        forget_classes=[3],
        original={"epochs": 3},
        method_overrides={"retrain": {"epochs": 3}},
        out_dir=str(tmp_path / "cw"),
        run=RunOptions(device="cpu", progress=False),
        verbose=False,
    )
    summary = reproduce(config)
    (scenario,) = summary["scenarios"]
    assert scenario["scenario"] == "class 3" and scenario["classes"] == [3] and scenario["ratio"] is None
    retrain = scenario["methods"]["retrain"]["mean"]
    assert retrain["UA"] > 90  # a model that never saw class 3 does not predict it
    run = json.loads((tmp_path / "cw" / "runs" / "class_3" / "seed1" / "ga" / "result.json").read_text())
    assert run["split"]["classes"] == [3] and run["split"]["test"] < 359  # class 3 left the test set
    assert not (tmp_path / "cw" / "gaps.png").exists()  # no ratio axis to plot


def test_presets_by_name():
    from salun_ext.classification.presets import preset_for

    assert preset_for("fashion_mnist", "fashion_mnist_5k")["train_subset"] == 5000
    assert preset_for("digits", "none") == {} and preset_for("digits")["model"] == "small_cnn"
    with pytest.raises(ValueError, match="is for fashion_mnist, not digits"):
        preset_for("digits", "fashion_mnist_5k")
    with pytest.raises(ValueError, match="unknown preset"):
        preset_for("digits", "tiny")
