"""`salun-ext diffusion ...` in-process: tiny runs in a temp dir, asserting the files produced and the errors."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from salun_ext.cli import main, parse_args
from salun_ext.diffusion.ddpm import ClassConditionalDDPM
from salun_ext.diffusion.sd import save_images
from salun_ext.mask import SaliencyMask
from salun_ext.utils import OutputFolder
from tests.diffusion_helpers import random_images, tiny_pipeline_folder


def run(command: str) -> int:
    """`salun-ext diffusion <command>` in-process, quiet, on the CPU (paths must not contain spaces)."""
    return main(["diffusion", *shlex.split(command), "--no-progress", "--device", "cpu"])


def fails(capsys, command: str, message: str) -> None:
    """The command exits with status 2 and ends stderr with one error line holding `message` (no traceback)."""
    capsys.readouterr()
    assert run(command) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # (SD: diffusers' loading bars come before it)
    assert line.startswith("salun-ext diffusion ") and ": error: " in line and message in line, err
    assert "Traceback" not in err, err


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ddpm"
    assert run(f"train --dataset digits --image-size 8 --epochs 1 --subset 64 --batch-size 32 --out {out}") == 0
    return out


@pytest.mark.parametrize(
    "command",
    [
        "train --out x",
        "mask --model m --out x",
        "unlearn --model m --method salun --out x",
        "sample --model m --out x",
        "evaluate --model m --out x",
        "attack --pipeline p --prompts c --reference r --out x",
        "demo --out x",
    ],
)
def test_parser_knows_every_subcommand(command):
    assert callable(parse_args(["diffusion", *command.split()]).handler)


def test_ddpm_train_mask_unlearn_sample_evaluate(ddpm_dir, tmp_path):
    model = ClassConditionalDDPM.from_pretrained(ddpm_dir)
    assert model.image_size == 8 and model.dataset == "digits"
    assert json.loads((ddpm_dir / "train_log.json").read_text())["history"]

    masks = tmp_path / "mask_{ratio}.safetensors"
    assert run(f"mask --model {ddpm_dir} --forget-class 3 --ratio 0.5 0.1 --batch-size 64 --out {masks}") == 0
    mask = SaliencyMask.load(tmp_path / "mask_0.5.safetensors")
    mask.check_compatible(model.unet, require_all=True)
    assert (tmp_path / "mask_0.1.safetensors").exists()

    out = tmp_path / "salun"
    common = f"--model {ddpm_dir} --forget-class 3"
    assert run(f"unlearn --method salun {common} --mask {tmp_path}/mask_0.5.safetensors --steps 2 "
               f"--batch-size 16 --out {out}") == 0  # fmt: skip
    log = json.loads((out / "unlearn_log.json").read_text())
    assert log["setting"] == "ddpm" and len(log["history"]) >= 1
    after = dict(ClassConditionalDDPM.from_pretrained(out).unet.named_parameters())
    for n, p in model.unet.named_parameters():  # only salient weights moved
        assert torch.equal(p[~mask.dense(n)], after[n][~mask.dense(n)]), n
    assert run(f"unlearn --method esd-u {common} --steps 1 --out {tmp_path}/esd") == 0
    assert run(f"unlearn --method ga {common} --steps 1 --out {tmp_path}/ga") == 0
    assert run(f"unlearn --method retrain {common} --steps 1 --out {tmp_path}/retrain") == 0

    grid = tmp_path / "grid.png"
    assert run(f"sample --model {out} --classes 3 4 --n 2 --steps 2 --out {grid} --images-dir {tmp_path}/imgs") == 0
    assert grid.exists() and len(list((tmp_path / "imgs").glob("*.png"))) == 4

    ev = tmp_path / "eval"
    assert run(f"evaluate --model {out} --reference {ddpm_dir} --forget-class 3 --n-per-class 2 --steps 2 "
               f"--classifier-epochs 2 --out {ev}") == 0  # fmt: skip
    result = json.loads((ev / "results.json").read_text())
    assert {"UA", "retain_accuracy", "frechet", "frechet_label", "reference"} <= set(result)
    assert (ev / "before_after.png").exists() and (ev / "classifier.pt").exists()
    # a saved classifier is reused
    assert run(f"evaluate --model {out} --forget-class 3 --n-per-class 1 --steps 1 --classifier {ev}/classifier.pt "
               f"--out {tmp_path}/eval2") == 0  # fmt: skip
    assert (tmp_path / "eval2" / "samples.png").exists()


def test_ddpm_bad_input(ddpm_dir, tmp_path, capsys):
    fails(capsys, f"mask --model {ddpm_dir} --forget-class cat --out x", "unknown class 'cat'")
    fails(capsys, f"mask --model {ddpm_dir} --out x", "forget_class (--forget-class): expected at least one class")
    fails(capsys, f"sample --model {ddpm_dir} --guidance -1 --out {tmp_path}/g.png",
          "guidance_scale must be a finite number >= 0")  # fmt: skip
    fails(capsys, f"sample --model {ddpm_dir} --steps 0 --out {tmp_path}/g.png", "num_inference_steps must be in")
    fails(capsys, f"unlearn --method fmn --model {ddpm_dir} --forget-class 3 --out {tmp_path}/f",
          "does not apply to 'ddpm'")  # fmt: skip
    fails(capsys, f"mask --model {ddpm_dir} --forget-class 3 --ratio 0.1 0.2 --out {tmp_path}/m.safetensors",
          "'{ratio}' in the name for several ratios")  # fmt: skip
    fails(capsys, f"sample --model {tmp_path} --out x", "missing")  # MissingFileError: a UsageError too
    fails(capsys, "train --preset huge --out x", "preset (--preset): expected one of")
    fails(capsys, "train --subset 0 --out x", "subset (--subset): expected a number of examples >= 1, got 0")
    assert not (tmp_path / "f").exists() and not (tmp_path / "g.png").exists()


def test_method_choices_come_from_the_registry(monkeypatch, capsys):
    """--method offers exactly the registered methods; registering one more class is all the CLI needs."""
    from salun_ext.diffusion import methods

    parser_choices = _method_choices()
    assert parser_choices == list(methods.METHODS) == ["salun", "ga", "esd-x", "esd-u", "fmn", "retrain", "uce"]

    class Extra(methods.DiffusionMethod):
        name = "extra"

    monkeypatch.setitem(methods.METHODS._items, "extra", Extra)
    assert _method_choices() == [*parser_choices, "extra"]
    assert parse_args(["diffusion", "unlearn", "--model", "m", "--method", "extra", "--out", "x"]).method == "extra"
    with pytest.raises(SystemExit):  # argparse refuses a name that is not registered
        parse_args(["diffusion", "unlearn", "--model", "m", "--method", "scrub", "--out", "x"])
    assert "invalid choice: 'scrub'" in capsys.readouterr().err


def _method_choices() -> list[str]:
    from salun_ext.cli import build_parser

    parser = build_parser()
    diffusion = next(a for a in parser._subparsers._group_actions[0].choices["diffusion"]._actions
                     if a.dest == "diffusion_command")  # fmt: skip
    unlearn = diffusion.choices["unlearn"]
    return list(next(a for a in unlearn._actions if a.dest == "method").choices)


@pytest.mark.parametrize("sub", ["train", "mask", "unlearn", "sample", "evaluate", "attack", "demo"])
def test_every_subcommand_takes_a_config_file(sub, tmp_path):
    """--config fills the options the command line leaves out, and the command line wins over the file."""
    config = tmp_path / "c.yaml"
    config.write_text("seed: 5\nno_progress: true\n")
    base = {"train": [], "demo": [], "evaluate": ["--model", "m"], "sample": ["--model", "m"],
            "mask": ["--model", "m"], "unlearn": ["--model", "m", "--method", "ga"],
            "attack": ["--pipeline", "p", "--prompts", "c", "--target-images", "t"]}[sub]  # fmt: skip
    base = [*base, "--out", "x"]
    assert (parse_args(["diffusion", sub, *base]).seed, parse_args(["diffusion", sub, *base]).no_progress) == (0, False)
    args = parse_args(["diffusion", sub, *base, "--config", str(config)])
    assert (args.seed, args.no_progress) == (5, True)
    assert parse_args(["diffusion", sub, *base, "--config", str(config), "--seed", "1"]).seed == 1


def test_train_checkpoint_and_resume(tmp_path, capsys):
    args = f"train --dataset digits --image-size 8 --subset 32 --batch-size 16 --checkpoint-dir {tmp_path}/ck"
    assert run(f"{args} --epochs 2 --out {tmp_path}/a") == 0
    assert (tmp_path / "ck" / "last.pt").exists()
    capsys.readouterr()
    # the cosine schedule spans the whole budget: a resume with another --epochs would mix two schedules
    assert run(f"{args} --epochs 3 --resume --out {tmp_path}/b") == 2
    assert "other settings (differ: budget)" in capsys.readouterr().err
    orphan = tmp_path / "ck" / ".last.pt.k3j9x0qa.tmp"  # what a run killed inside atomic_save leaves
    with OutputFolder(tmp_path / "ck"):  # a --checkpoint-dir outside --out is locked by the run too
        orphan.write_bytes(b"partial")
        assert run(f"{args} --epochs 2 --resume --out {tmp_path}/b") == 2
    assert f"--checkpoint-dir {tmp_path}/ck is in use by another run" in capsys.readouterr().err
    assert orphan.exists() and not (tmp_path / "b").exists()
    assert run(f"{args} --epochs 2 --resume --out {tmp_path}/b") == 0
    assert not orphan.exists() and (tmp_path / "ck" / "last.pt").exists()
    log = json.loads((tmp_path / "b" / "train_log.json").read_text())
    assert [h["epoch"] for h in log["history"]] == [0, 1]  # both epochs came from the checkpoint


def test_stable_diffusion_cli(tmp_path, capsys):
    pipe = tiny_pipeline_folder()
    save_images(random_images(2, seed=1), tmp_path / "nude")
    save_images(random_images(2, seed=2), tmp_path / "clothed")
    data = f"--pipeline {pipe} --concept nudity --forget-images {tmp_path}/nude --retain-images {tmp_path}/clothed"
    mask = tmp_path / "sd_mask.safetensors"
    assert run(f"mask {data} --batch-size 2 --out {mask}") == 0
    out = tmp_path / "sd-salun"
    assert run(f"unlearn --method salun {data} --mask {mask} --steps 1 --batch-size 2 --amp none --out {out}") == 0
    assert (out / "model_index.json").exists() and (out / "unet").is_dir()
    assert json.loads((out / "unlearn_log.json").read_text())["setting"] == "sd-nsfw"
    assert run(f"unlearn --method fmn {data} --fmn-concept nude --steps 1 --out {tmp_path}/sd-fmn") == 0
    assert run(f"unlearn --method esd-x {data} --steps 1 --amp none --out {tmp_path}/sd-esd") == 0

    for name in ("tench", "church", "parachute"):  # class-wise: root/<class>/ folders
        save_images(random_images(1, seed=5), tmp_path / "classes" / name)
    assert run(f"unlearn --method salun --pipeline {pipe} --class-root {tmp_path}/classes --forget-class tench "
               f"--steps 1 --batch-size 1 --amp none --out {tmp_path}/sd-tench") == 0  # fmt: skip
    assert json.loads((tmp_path / "sd-tench" / "unlearn_log.json").read_text())["setting"] == "sd"

    grid = tmp_path / "sd.png"
    assert run(f"sample --pipeline {out} --prompt 'a photo of a cat' --n 2 --steps 2 --out {grid}") == 0
    assert grid.exists()
    from tests.diffusion.test_diffusion_eval import I2P

    if I2P.exists():
        ev = tmp_path / "sd-eval"
        assert run(f"evaluate --pipeline {out} --i2p {I2P} --limit 1 --steps 2 --out {ev}") == 0
        assert json.loads((ev / "results.json").read_text())["total_images"] == 1

    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), weights)
    ev = tmp_path / "sd-classes"
    classify = f"evaluate --pipeline {out} --classifier-arch resnet18 --classifier-weights {weights} " \
               f"--n-per-class 1 --steps 2 --out {ev}"  # fmt: skip
    assert run(f"{classify} --classes tench church --forget-class tench") == 0
    assert {"UA", "retain_accuracy", "per_class_accuracy"} <= set(json.loads((ev / "results.json").read_text()))
    fails(capsys, f"{classify} --classes tench --forget-class parachute", "not among the evaluated classes")
    fails(capsys, f"{classify} --classes cat", "unknown class(es) ['cat']")
    fails(capsys, f"evaluate --pipeline {out} --out {ev}", "i2p (--i2p): expected the I2P prompt CSV")

    fails(capsys, f"mask --pipeline {pipe} --out {mask}", "needs --concept")
    fails(capsys, f"mask --pipeline {pipe} --concept gore --out {mask}", "unknown concept")
    fails(capsys, f"sample --pipeline {tmp_path}/nope/x/y --prompt a --out {grid}", "pipeline folder not found")
    fails(capsys, f"sample --pipeline {pipe} --out {grid}", "prompt (--prompt): expected at least one prompt")


def test_demo_pipeline_runs_end_to_end(tmp_path):
    """The demonstration's whole pipeline on a minimal budget (the real run is docs/results/diffusion-digits)."""
    from salun_ext.diffusion.demo import DemoConfig, run_demo

    cfg = DemoConfig(image_size=8, train_epochs=1, classifier_epochs=1, n_per_class=2, n_forget=3, sample_steps=2,
                     unlearn_steps=2, unlearn_batch_size=8, progress=False, device="cpu", subset=200)  # fmt: skip
    result = run_demo(cfg, tmp_path)
    assert {"UA", "retain_accuracy", "frechet"} <= set(result["after"]) and result["forget_class"] == "3"
    for name in ("results.json", "results.md", "before_after.png", "classifier.pt"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "original" / "salun_ddpm.json").exists() and (tmp_path / "unlearned" / "unet").is_dir()
    assert "UA on the forgotten class" in (tmp_path / "results.md").read_text()


def test_fsdp_needs_a_torchrun_start(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process: --fsdp is refused before anything is loaded
    message = "--fsdp shards the UNet over the processes of a torchrun start"
    fails(capsys, "unlearn --model m --method salun --fsdp --forget-class 3 --out x", message)
    fails(capsys, "mask --model m --fsdp --forget-class 3 --out x", message)
