"""The text-to-image digits pipeline: captions, the real tokenizer, training through the SD adapter, save / load as
a plain StableDiffusionPipeline folder, resume, the digits evaluation (accuracy, UA / kept classes, Fréchet proxy)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from salun_ext.diffusion.evaluation import GreyscaleInput
from salun_ext.diffusion.sd import StableDiffusion
from salun_ext.diffusion.text_digits import (
    PHRASINGS,
    AutoencoderTask,
    TextDigitsArch,
    TextDigitsEvaluation,
    TextDigitsTraining,
    build_text_digits_pipeline,
    caption,
    caption_set,
    class_captions,
    class_index,
    digit_images,
    evaluate_text_digits,
    train_text_digits,
)
from salun_ext.train import RunOptions
from tests.diffusion_helpers import digits, tiny_clip_folder

QUICK = TextDigitsTraining(vae_epochs=2, text_epochs=2, epochs=1, batch_size=32, subset=64)
CPU = RunOptions(device="cpu", progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A pipeline trained a handful of steps (VAE: 2 epochs of 2 batches; text encoder: 2 x 25 steps; UNet: 1 epoch
    of 6 batches), saved."""
    folder = tmp_path_factory.mktemp("text-digits") / "pipe"
    sd, fits = train_text_digits(build_text_digits_pipeline(seed=0), QUICK, CPU)
    sd.save_pretrained(folder)
    return sd, fits, folder


def test_captions_and_class_names():
    assert caption(3) == "a handwritten digit three"
    assert class_captions(7) == ["a handwritten digit seven", "a picture of the number seven",
                                 "the digit 7 written by hand"]  # fmt: skip
    assert [class_index(v) for v in (3, "3", "three", " Nine ")] == [3, 3, 3, 9]
    for bad in (10, "ten", -1, True):
        with pytest.raises(ValueError, match="forget_class"):
            class_index(bad)
    with pytest.raises(ValueError, match="phrasing"):
        caption(1, len(PHRASINGS))
    with pytest.raises(ValueError, match="image_size"):
        TextDigitsArch(image_size=10)
    with pytest.raises(ValueError, match="epochs"):
        TextDigitsTraining(epochs=0)


def test_trained_pipeline_is_a_plain_stable_diffusion_folder(trained):
    from diffusers import StableDiffusionPipeline

    sd, fits, folder = trained
    assert [h["epoch"] for h in fits["vae"].history] == [0, 1] and fits["unet"].steps == 6  # 64 images x 3 / 32
    assert fits["vae"].history[1]["loss"] < fits["vae"].history[0]["loss"]  # the autoencoder learns
    assert fits["text"].steps == 50 and fits["text"].history[1]["loss"] < fits["text"].history[0]["loss"]
    plain = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    loaded = StableDiffusion.from_pretrained(folder, device="cpu")
    for name, value in sd.unet.state_dict().items():
        assert torch.equal(plain.unet.state_dict()[name], value) and torch.equal(loaded.unet.state_dict()[name], value)
    assert loaded.resolution == 16 and loaded.latent_shape == (4, 8, 8)
    # the real CLIP tokenizer of SD v1
    assert loaded.tokenize(["a photo of a cat"])[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    # the saved scaling factor gives unit-variance latent means on the training images (its definition)
    images = digit_images(digits().subset(torch.arange(64)), 16)
    with torch.no_grad():
        means = plain.vae.encode(images * 2 - 1).latent_dist.mean
    assert float((means * plain.vae.config.scaling_factor).std()) == pytest.approx(1.0, abs=1e-4)
    out = plain(["a handwritten digit three"], num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, 16, 16)


def test_trained_text_encoder_tells_the_classes_apart(trained):
    """After the caption phase, each class's other phrasings lie nearest to its own first phrasing."""
    sd = trained[0]
    first = sd.encode_prompts([caption(c, 0) for c in range(10)]).flatten(1)
    for p in (1, 2):
        other = sd.encode_prompts([caption(c, p) for c in range(10)]).flatten(1)
        assert torch.cdist(other, first).argmin(dim=1).tolist() == list(range(10)), p
    untrained = StableDiffusion(build_text_digits_pipeline(seed=0))
    first = untrained.encode_prompts([caption(c, 0) for c in range(10)]).flatten(1)
    other = untrained.encode_prompts([caption(c, 2) for c in range(10)]).flatten(1)
    assert torch.cdist(other, first).argmin(dim=1).tolist() != list(range(10))  # not so before training


def test_caption_set_pairs_every_image_with_each_phrasing(trained):
    sd = trained[0]
    ds = digits().subset(torch.arange(5))
    spec, data = caption_set(sd, digit_images(ds, 16), ds.labels)
    assert len(data) == 5 * len(PHRASINGS) and data.latent_scale == sd.latent_scale()
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    want = [f"a handwritten digit {words[c]}" for c in ds.labels.tolist()]
    want += [f"a picture of the number {words[c]}" for c in ds.labels.tolist()]
    want += [f"the digit {c} written by hand" for c in ds.labels.tolist()]
    assert [spec.conditioner.prompts[i] for i in data.ids.tolist()] == want
    assert spec.conditioner.prompts[0] == ""  # the null prompt of classifier-free guidance
    assert torch.equal(data.x0[:5], data.x0[5:10])  # the same image moments under each phrasing


def test_the_build_is_seeded_and_leaves_the_global_generator_alone():
    state = torch.random.get_rng_state()
    a = build_text_digits_pipeline(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.rand(100)  # another global state: the same seed still gives the same weights
    b, c = build_text_digits_pipeline(seed=0), build_text_digits_pipeline(seed=1)
    for part in ("unet", "vae", "text_encoder"):
        first, again, other = (getattr(pipe, part).state_dict() for pipe in (a, b, c))
        assert all(torch.equal(first[n], again[n]) for n in first), part
        assert not all(torch.equal(first[n], other[n]) for n in first), part


def test_autoencoder_task_draws_reproducible_batches():
    images = torch.rand(10, 3, 16, 16) * 2 - 1
    task = AutoencoderTask(images, (4, 8, 8), batch_size=4, seed=3)
    first, again = list(task.batches(0)), list(task.batches(0))
    assert task.num_batches(0) == 3 and [len(b["x"]) for b in first] == [4, 4, 2]
    assert all(torch.equal(a["noise"], b["noise"]) and torch.equal(a["x"], b["x"]) for a, b in zip(first, again))
    assert not torch.equal(next(iter(task.batches(1)))["noise"], first[0]["noise"])  # another epoch, other draws
    assert first[0]["noise"].shape == (4, 4, 8, 8)


@pytest.mark.slow  # ~12 s: trains twice; make test-all runs it
def test_resume_reuses_a_finished_phase_and_gives_the_same_model(tmp_path):
    options = dataclasses.replace(CPU, checkpoint_dir=str(tmp_path / "ck"))
    straight, _ = train_text_digits(build_text_digits_pipeline(seed=0), QUICK, CPU)
    checkpointed, _ = train_text_digits(build_text_digits_pipeline(seed=0), QUICK, options)
    assert (tmp_path / "ck" / "vae").is_dir() and (tmp_path / "ck" / "unet").is_dir()
    import shutil

    shutil.rmtree(tmp_path / "ck" / "unet")  # as if stopped after the VAE phase
    resumed, fits = train_text_digits(build_text_digits_pipeline(seed=0), QUICK,
                                      dataclasses.replace(options, resume=True))  # fmt: skip
    assert fits["vae"].resumed and fits["text"].resumed and not fits["unet"].resumed
    for model in (checkpointed, resumed):
        assert model.latent_scale() == straight.latent_scale()
        for name, value in straight.unet.state_dict().items():
            assert torch.equal(model.unet.state_dict()[name], value), name


class _Always(torch.nn.Module):
    """A grey-image classifier that answers one class (and records the channels it was given)."""

    def __init__(self, answer: int) -> None:
        super().__init__()
        self.answer, self.channels = answer, set()
        self.head = torch.nn.Linear(1, 10)

    def forward(self, x):
        self.channels.add(x.shape[1])
        out = torch.zeros(len(x), 10) + 0 * self.head(x.mean((1, 2, 3))[:, None])
        out[:, self.answer] = 1.0
        return out


def test_evaluation_counts_per_class_ua_and_kept_classes(trained):
    sd = trained[0]
    real = digits().subset(torch.arange(100))
    stub = _Always(3)
    ev = TextDigitsEvaluation(n_per_class=1, steps=2, phrasings=[0, 2], forget_classes=["three"])
    report, gen = evaluate_text_digits(sd, stub, real, ev)
    assert stub.channels == {1}  # RGB generations reach the grey classifier as one channel
    assert report["per_class_accuracy"] == {str(c): (100.0 if c == 3 else 0.0) for c in range(10)}
    assert report["UA"] == 0.0 and report["retain_accuracy"] == 0.0 and report["mean_accuracy"] == 10.0
    assert set(report["per_phrasing_accuracy"]) == {"a handwritten digit {}", "the digit {} written by hand"}
    assert gen.images.shape == (20, 3, 16, 16) and gen.prompts[3] == "a handwritten digit three"
    assert gen.prompts[13] == "the digit 3 written by hand" and gen.labels[13] == 3
    report5, _ = evaluate_text_digits(sd, stub, real, dataclasses.replace(ev, forget_classes=[5]))
    assert report5["UA"] == 100.0 and report5["retain_accuracy"] == pytest.approx(100.0 / 9)
    fd = report["frechet"]
    assert "NOT FID" in fd["label"] and fd["num_fake"] == 18  # the kept classes' images only
    assert fd["num_real"] == int((real.labels != 3).sum())


def test_greyscale_input_averages_the_channels():
    seen = []
    wrapped = GreyscaleInput(lambda x: seen.append(x) or x)
    x = torch.rand(2, 3, 4, 4)
    wrapped(x)
    assert torch.allclose(seen[0], (x[:, 0:1] + x[:, 1:2] + x[:, 2:3]) / 3)


def test_cli_trains_saves_and_every_sd_method_runs_on_it(tmp_path, capsys):
    from salun_ext.diffusion.sd import save_images
    from tests.cli.test_diffusion_cli import fails, run

    out = tmp_path / "pipe"
    quick = "--subset 64 --vae-epochs 1 --text-epochs 1 --epochs 1 --batch-size 32 --n-per-class 2 --steps 2 " \
            "--classifier-epochs 1"  # fmt: skip
    assert run(f"train-text-digits {quick} --out {out}") == 0
    summary = json.loads((out / "text_digits.json").read_text())
    assert {"per_class_accuracy", "UA", "frechet"} - set(summary["evaluation"]) == {"UA"}  # nothing forgotten
    assert summary["evaluation"]["frechet"]["implementation"].startswith("torchmetrics")
    for name in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "samples.png"):
        assert (out / name).exists(), name
    ds = digits()
    save_images(digit_images(ds.subset(torch.nonzero(ds.labels == 3).flatten()[:4]), 16), tmp_path / "three")
    save_images(digit_images(ds.subset(torch.nonzero(ds.labels == 4).flatten()[:4]), 16), tmp_path / "four")
    data = (f"--pipeline {out} --forget-prompt 'a handwritten digit three' --retain-prompt 'a handwritten digit four'"
            f" --forget-images {tmp_path}/three --retain-images {tmp_path}/four")  # fmt: skip
    mask = tmp_path / "mask.safetensors"
    assert run(f"mask {data} --batch-size 2 --out {mask}") == 0
    assert run(f"unlearn --method salun {data} --mask {mask} --steps 2 --batch-size 2 --amp none "
               f"--out {tmp_path}/salun") == 0  # fmt: skip
    assert run(f"unlearn --method esd-x {data} --steps 1 --amp none --out {tmp_path}/esd") == 0
    assert run(f"unlearn --method fmn {data} --fmn-concept three --steps 1 --out {tmp_path}/fmn") == 0
    ev = tmp_path / "eval"
    clip = tiny_clip_folder(tmp_path)
    assert run(f"evaluate-text-digits --pipeline {tmp_path}/salun --forget-class three --classifier "
               f"{out}/classifier.pt --n-per-class 1 --steps 2 --clip-model {clip} --out {ev}") == 0  # fmt: skip
    result = json.loads((ev / "results.json").read_text())
    assert result["forget_classes"] == ["3"] and {"UA", "retain_accuracy"} <= set(result)
    assert result["clip"]["num_images"] == 30 and result["clip"]["model"] == str(clip)
    fails(capsys, f"evaluate-text-digits --pipeline {out} --forget-class ten --out {ev}", "forget_class")
    # refused before any image is generated
    fails(
        capsys,
        f"evaluate-text-digits --pipeline {out} --clip-model {tmp_path}/none --out {ev}",
        "expected a CLIP model folder",
    )
    fails(capsys, f"train-text-digits --epochs 0 --out {tmp_path}/x", "epochs: expected an integer >= 1")


@pytest.mark.parametrize("sub, base", [("train-text-digits", []), ("evaluate-text-digits", ["--pipeline", "p"])])
def test_text_digits_commands_take_a_config_file(sub, base, tmp_path):
    from salun_ext.cli import parse_args

    config = tmp_path / "c.yaml"
    config.write_text("seed: 5\nn_per_class: 3\n")
    args = parse_args(["diffusion", sub, *base, "--out", "x", "--config", str(config), "--seed", "1"])
    assert (args.seed, args.n_per_class) == (1, 3)  # the file fills in, the command line wins


@pytest.mark.slow
def test_trained_model_generates_the_captioned_digit(tmp_path):
    """The default recipe (a few CPU minutes): the classifier recognises the captioned class well above chance."""
    torch.set_num_threads(1)
    from salun_ext.diffusion.text_digits import train_text_digits_folder

    ev = TextDigitsEvaluation(n_per_class=10)
    summary = train_text_digits_folder(tmp_path / "pipe", CPU, evaluation=ev)
    accuracy = summary["evaluation"]["per_class_accuracy"]
    assert summary["evaluation"]["mean_accuracy"] > 70.0, accuracy  # chance: 10%
    assert all(a > 30.0 for a in accuracy.values()), accuracy  # every class, not a few that are easy
