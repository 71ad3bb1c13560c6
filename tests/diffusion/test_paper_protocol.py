"""--protocol paper for generation: GA with the paper code's retain term, the summed DDPM mask loss, FMN's pooler
columns (docs/protocols.md)."""

from __future__ import annotations

import json

import pytest
import torch

from salun_ext.diffusion.ddpm import forget_retain_sets
from salun_ext.diffusion.recipes import mask_settings, recipe
from salun_ext.diffusion.saliency import diffusion_saliency
from salun_ext.diffusion.tasks import GATask
from salun_ext.utils import UsageError
from tests.diffusion_helpers import digits, load_tiny_sd, micro_ddpm


def test_paper_recipes_where_the_code_differs():
    default, paper = recipe("ddpm", "ga"), recipe("ddpm", "ga", "paper")
    assert default.train.optimizer.lr == 1e-5 and "alpha" not in default.task
    assert paper.train.optimizer.lr == 1e-4 and paper.task["alpha"] == 1e-3 and paper.task["reduction"] == "sum"
    sd = recipe("sd-nsfw", "ga", "paper")
    assert sd.train.epochs == 10 and sd.task["alpha"] == 0.1
    assert recipe("ddpm", "salun", "paper") == recipe("ddpm", "salun")  # same as ours where the code agrees
    with pytest.raises(UsageError, match="expected one of default, paper"):
        recipe("ddpm", "ga", "upstream")
    assert mask_settings("ddpm", protocol="paper").reduction == "sum" and mask_settings("ddpm").reduction == "mean"
    assert mask_settings("sd", protocol="paper").reduction == "mean"


def _eps_sum(unet, scheduler, x0, noise, t, ids) -> torch.Tensor:
    """sum over C, H, W of (eps - noise)^2, mean over the batch, written from the DDPM definition."""
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    eps = unet(x_t, t, class_labels=ids).sample
    return (eps - noise).pow(2).sum(dim=(1, 2, 3)).mean()


def test_ga_with_the_retain_term_is_minus_forget_plus_alpha_retain():
    model = micro_ddpm()
    forget, retain = forget_retain_sets(model, digits(), [3])
    task = GATask(model.spec, forget, retain, alpha=0.5, batch_size=4, reduction="sum", seed=1)
    batch = next(iter(task.batches(0)))
    want = -_eps_sum(model.unet, model.scheduler, batch["x0"], batch["noise"], batch["t"], batch["ids"])
    want = want + 0.5 * _eps_sum(
        model.unet, model.scheduler, batch["retain_x0"], batch["retain_noise"], batch["retain_t"], batch["retain_ids"]
    )
    assert torch.allclose(task.loss(model.unet, batch), want, rtol=1e-5)
    plain = GATask(model.spec, forget, batch_size=4, seed=1)  # the default: no retain term
    assert plain.retain is None and "retain_x0" not in next(iter(plain.batches(0)))
    with pytest.raises(UsageError, match="needs a retain set"):
        GATask(model.spec, forget, None, alpha=0.1)


def test_the_summed_mask_loss_lets_the_clip_fire():
    """The micro DDPM's per-batch gradient norms are ~10 with the per-element mean and ~660 with the sum over
    C, H, W (64 elements): a clip at 50 fires for the summed loss only, as the recipe's clip of 1 on CIFAR's 3072."""
    model = micro_ddpm()
    forget, _ = forget_retain_sets(model, digits(), [3])
    kw = dict(ratio=0.5, batch_size=32, seed=0, progress=False)

    def mask(reduction, clip):
        return diffusion_saliency(model.unet, model.spec, forget, reduction=reduction, clip_grad_norm=clip, **kw)

    assert mask("mean", 50.0).equal(mask("mean", None))  # the mean's clip never fires
    assert not mask("sum", 50.0).equal(mask("sum", None))  # the summed loss is clipped per batch
    assert not mask("sum", 50.0).equal(mask("mean", 50.0))


def test_fmn_pooler_columns_add_the_end_of_text_positions():
    sd = load_tiny_sd()
    prompt = "a photo of a nude person"
    plain = sd.token_columns(prompt, "nude")
    pooled = sd.token_columns(prompt, "nude", use_pooler=True)
    ids = sd.tokenize([prompt])[0].tolist()
    eos = [i for i, token in enumerate(ids) if token == sd.tokenizer.eos_token_id]
    # <|startoftext|> a photo of a nude person <|endoftext|>: 8 tokens, then SD v1 pads with end-of-text
    assert plain == [5] and pooled == [5, *eos] and eos == list(range(7, 77))


def test_cli_ga_under_the_paper_protocol(tmp_path):
    from salun_ext.cli import main

    model = micro_ddpm()
    model.save_pretrained(tmp_path / "orig")
    out = tmp_path / "ga"
    argv = ["diffusion", "unlearn", "--method", "ga", "--model", str(tmp_path / "orig"), "--forget-class", "3"]
    argv += ["--protocol", "paper", "--steps", "1", "--batch-size", "4", "--no-progress", "--device", "cpu"]
    assert main([*argv, "--out", str(out)]) == 0
    log = json.loads((out / "unlearn_log.json").read_text())
    assert log["protocol"] == "paper" and log["method"] == "ga"


def test_esd_compvis_variant_samples_with_the_trained_model_and_its_timestep_interval():
    from salun_ext.diffusion.tasks import ESDTask

    model = micro_ddpm()
    kw = dict(sample_steps=5, batch_size=2, steps_per_epoch=1, seed=3)
    matched = ESDTask(model.spec, model.unet, [3], (1, 8, 8), **kw)
    compvis = ESDTask(model.spec, model.unet, [3], (1, 8, 8), variant="compvis", **kw)
    assert recipe("sd", "esd-x", "paper").task["variant"] == "compvis" and "variant" not in recipe("sd", "esd-x").task
    # the timestep of train-esd.py: uniform in [round(k T / S), round((k + 1) T / S))
    assert int(compvis.compvis_timestep(0, 0.0, torch.zeros(2))[0]) == 0
    assert int(compvis.compvis_timestep(4, 0.5, torch.zeros(2))[0]) == 900  # [800, 1000): 800 + 100
    assert int(compvis.compvis_timestep(4, 0.9999, torch.zeros(2))[0]) == 999
    trained = micro_ddpm(seed=1)  # another model than the frozen copy
    batch = next(iter(compvis.batches(0)))
    batch["run_till"] = torch.tensor(2)
    x_frozen, _ = matched._x_t(batch, trained.unet)
    x_trained, t = compvis._x_t(batch, trained.unet)
    x_same, _ = compvis._x_t(batch, model.unet)
    # compvis samples with the model it is given (eval-mode frozen copy vs train-mode UNet: equal up to rounding)
    assert (x_frozen - x_trained).abs().max() > 1e-2 and torch.allclose(x_frozen, x_same, atol=1e-4)
    assert 400 <= int(t[0]) < 600
    with pytest.raises(UsageError, match="variant: expected one of matched, compvis"):
        ESDTask(model.spec, model.unet, [3], (1, 8, 8), variant="new", **kw)
