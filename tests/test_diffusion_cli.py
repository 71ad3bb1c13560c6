"""`salun-ext diffusion ...` in-process: tiny runs in a temp dir, asserting the files produced and the errors."""

from __future__ import annotations

import json

import pytest
import torch

from salun_ext.cli import main, parse_args
from salun_ext.diffusion.ddpm import ClassConditionalDDPM
from salun_ext.diffusion.stable_diffusion import save_images
from salun_ext.mask import SaliencyMask
from tests.diffusion_helpers import random_images, tiny_pipeline_folder

Q = ["--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ddpm"
    rc = main(
        [
            "diffusion",
            "train",
            "--dataset",
            "digits",
            "--image-size",
            "8",
            "--epochs",
            "1",
            "--subset",
            "64",
            "--batch-size",
            "32",
            "--out",
            str(out),
            *Q,
        ]
    )
    assert rc == 0
    return out


def test_parser_knows_every_subcommand():
    for sub in ("train", "mask", "unlearn", "sample", "evaluate", "demo"):
        assert parse_args(["diffusion", sub, *_minimal(sub)]).handler


def _minimal(sub):
    return {
        "train": ["--out", "x"],
        "mask": ["--model", "m", "--out", "x"],
        "unlearn": ["--model", "m", "--method", "salun", "--out", "x"],
        "sample": ["--model", "m", "--out", "x"],
        "evaluate": ["--model", "m", "--out", "x"],
        "demo": ["--out", "x"],
    }[sub]


def test_ddpm_train_mask_unlearn_sample_evaluate(ddpm_dir, tmp_path):
    model = ClassConditionalDDPM.from_pretrained(ddpm_dir)
    assert model.image_size == 8 and model.dataset == "digits"
    assert json.loads((ddpm_dir / "train_log.json").read_text())["history"]

    mask_path = tmp_path / "mask_{ratio}.safetensors"
    assert (
        main(
            [
                "diffusion",
                "mask",
                "--model",
                str(ddpm_dir),
                "--forget-class",
                "3",
                "--ratio",
                "0.5",
                "0.1",
                "--batch-size",
                "64",
                "--out",
                str(mask_path),
                *Q,
            ]
        )
        == 0
    )
    mask = SaliencyMask.load(tmp_path / "mask_0.5.safetensors")
    mask.check_compatible(model.unet, require_all=True)
    assert (tmp_path / "mask_0.1.safetensors").exists()

    out = tmp_path / "salun"
    assert (
        main(
            [
                "diffusion",
                "unlearn",
                "--method",
                "salun",
                "--model",
                str(ddpm_dir),
                "--forget-class",
                "3",
                "--mask",
                str(tmp_path / "mask_0.5.safetensors"),
                "--steps",
                "2",
                "--batch-size",
                "16",
                "--out",
                str(out),
                *Q,
            ]
        )
        == 0
    )
    log = json.loads((out / "unlearn_log.json").read_text())
    assert log["setting"] == "ddpm" and len(log["history"]) >= 1
    after = ClassConditionalDDPM.from_pretrained(out)
    # only salient weights moved
    for n, p in after.unet.named_parameters():
        q = dict(model.unet.named_parameters())[n]
        assert torch.equal(p[~mask.dense(n)], q[~mask.dense(n)]), n

    assert (
        main(
            [
                "diffusion",
                "unlearn",
                "--method",
                "esd-u",
                "--model",
                str(ddpm_dir),
                "--forget-class",
                "3",
                "--steps",
                "1",
                "--out",
                str(tmp_path / "esd"),
                *Q,
            ]
        )
        == 0
    )

    grid = tmp_path / "grid.png"
    assert (
        main(
            [
                "diffusion",
                "sample",
                "--model",
                str(out),
                "--classes",
                "3",
                "4",
                "--n",
                "2",
                "--steps",
                "2",
                "--out",
                str(grid),
                "--images-dir",
                str(tmp_path / "imgs"),
                *Q,
            ]
        )
        == 0
    )
    assert grid.exists() and len(list((tmp_path / "imgs").glob("*.png"))) == 4

    ev = tmp_path / "eval"
    assert (
        main(
            [
                "diffusion",
                "evaluate",
                "--model",
                str(out),
                "--reference",
                str(ddpm_dir),
                "--forget-class",
                "3",
                "--n-per-class",
                "2",
                "--steps",
                "2",
                "--classifier-epochs",
                "2",
                "--out",
                str(ev),
                *Q,
            ]
        )
        == 0
    )
    result = json.loads((ev / "results.json").read_text())
    assert {"UA", "retain_accuracy", "frechet", "frechet_label", "reference"} <= set(result)
    assert (ev / "before_after.png").exists() and (ev / "classifier.pt").exists()


def test_ddpm_bad_input(ddpm_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown class 'cat'"):
        main(["diffusion", "mask", "--model", str(ddpm_dir), "--forget-class", "cat", "--out", "x", *Q])
    with pytest.raises(SystemExit, match="--forget-class is required"):
        main(["diffusion", "mask", "--model", str(ddpm_dir), "--out", "x", *Q])
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        main(
            ["diffusion", "sample", "--model", str(ddpm_dir), "--guidance", "-1", "--out", str(tmp_path / "g.png"), *Q]
        )
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        main(["diffusion", "sample", "--model", str(ddpm_dir), "--steps", "0", "--out", str(tmp_path / "g.png"), *Q])
    with pytest.raises(SystemExit, match="does not apply to 'ddpm'"):
        main(
            [
                "diffusion",
                "unlearn",
                "--method",
                "fmn",
                "--model",
                str(ddpm_dir),
                "--forget-class",
                "3",
                "--out",
                str(tmp_path / "f"),
                *Q,
            ]
        )
    with pytest.raises(FileNotFoundError, match="missing"):
        main(["diffusion", "sample", "--model", str(tmp_path), "--out", "x", *Q])


def test_train_checkpoint_and_resume(tmp_path):
    args = [
        "diffusion",
        "train",
        "--dataset",
        "digits",
        "--image-size",
        "8",
        "--subset",
        "32",
        "--batch-size",
        "16",
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        *Q,
    ]
    assert main([*args, "--epochs", "1", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "ck" / "last.pt").exists()
    assert main([*args, "--epochs", "2", "--resume", "--out", str(tmp_path / "b")]) == 0
    log = json.loads((tmp_path / "b" / "train_log.json").read_text())
    assert [h["epoch"] for h in log["history"]] == [0, 1]  # epoch 0 came from the checkpoint


def test_stable_diffusion_cli(tmp_path):
    pipe = str(tiny_pipeline_folder())
    save_images(random_images(2, seed=1), tmp_path / "nude")
    save_images(random_images(2, seed=2), tmp_path / "clothed")
    data = [
        "--concept",
        "nudity",
        "--forget-images",
        str(tmp_path / "nude"),
        "--retain-images",
        str(tmp_path / "clothed"),
    ]
    mask = tmp_path / "sd_mask.safetensors"
    assert main(["diffusion", "mask", "--pipeline", pipe, *data, "--batch-size", "2", "--out", str(mask), *Q]) == 0
    out = tmp_path / "sd-salun"
    assert (
        main(
            [
                "diffusion",
                "unlearn",
                "--method",
                "salun",
                "--pipeline",
                pipe,
                *data,
                "--mask",
                str(mask),
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--amp",
                "none",
                "--out",
                str(out),
                *Q,
            ]
        )
        == 0
    )
    assert (out / "model_index.json").exists() and (out / "unet").is_dir()
    assert json.loads((out / "unlearn_log.json").read_text())["setting"] == "sd-nsfw"
    assert (
        main(
            [
                "diffusion",
                "unlearn",
                "--method",
                "fmn",
                "--pipeline",
                pipe,
                *data,
                "--fmn-concept",
                "nude",
                "--steps",
                "1",
                "--out",
                str(tmp_path / "sd-fmn"),
                *Q,
            ]
        )
        == 0
    )
    grid = tmp_path / "sd.png"
    assert (
        main(
            [
                "diffusion",
                "sample",
                "--pipeline",
                str(out),
                "--prompt",
                "a photo of a cat",
                "--n",
                "2",
                "--steps",
                "2",
                "--out",
                str(grid),
                *Q,
            ]
        )
        == 0
    )
    assert grid.exists()
    from tests.test_diffusion_eval import I2P

    if I2P.exists():
        ev = tmp_path / "sd-eval"
        assert (
            main(
                [
                    "diffusion",
                    "evaluate",
                    "--pipeline",
                    str(out),
                    "--i2p",
                    str(I2P),
                    "--limit",
                    "1",
                    "--steps",
                    "2",
                    "--out",
                    str(ev),
                    *Q,
                ]
            )
            == 0
        )
        assert json.loads((ev / "results.json").read_text())["total_images"] == 1
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), weights)
    ev = tmp_path / "sd-classes"
    cls_args = ["diffusion", "evaluate", "--pipeline", str(out), "--classifier-arch", "resnet18",
                "--classifier-weights", str(weights), "--n-per-class", "1", "--steps", "2",
                "--out", str(ev), *Q]  # fmt: skip
    assert main([*cls_args, "--classes", "tench", "church", "--forget-class", "tench"]) == 0
    result = json.loads((ev / "results.json").read_text())
    assert {"UA", "retain_accuracy", "per_class_accuracy"} <= set(result)
    with pytest.raises(SystemExit, match="not among the evaluated classes"):
        main([*cls_args, "--classes", "tench", "--forget-class", "parachute"])
    with pytest.raises(SystemExit, match=r"unknown class\(es\) \['cat'\]"):
        main([*cls_args, "--classes", "cat"])
    with pytest.raises(SystemExit, match="needs --concept"):
        main(["diffusion", "mask", "--pipeline", pipe, "--out", str(mask), *Q])
    with pytest.raises(ValueError, match="unknown concept"):
        main(["diffusion", "mask", "--pipeline", pipe, "--concept", "gore", "--out", str(mask), *Q])
    with pytest.raises(FileNotFoundError, match="pipeline folder not found"):
        main(
            [
                "diffusion",
                "sample",
                "--pipeline",
                str(tmp_path / "nope" / "x" / "y"),
                "--prompt",
                "a",
                "--out",
                str(grid),
                *Q,
            ]
        )


def test_demo_pipeline_runs_end_to_end(tmp_path):
    """The demonstration's whole pipeline on a minimal budget (the real run is docs/results/diffusion-digits)."""
    from salun_ext.diffusion.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        image_size=8,
        train_epochs=1,
        classifier_epochs=1,
        n_per_class=2,
        n_forget=3,
        sample_steps=2,
        unlearn_steps=2,
        unlearn_batch_size=8,
        progress=False,
        device="cpu",
        subset=200,
    )
    result = run_demo(cfg, tmp_path)
    assert {"UA", "retain_accuracy", "frechet"} <= set(result["after"]) and result["forget_class"] == "3"
    for name in ("results.json", "results.md", "before_after.png", "classifier.pt"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "original" / "salun_ddpm.json").exists() and (tmp_path / "unlearned" / "unet").is_dir()
    assert "UA on the forgotten class" in (tmp_path / "results.md").read_text()
