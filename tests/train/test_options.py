"""RunOptions + TrainRecipe -> the Engine: one adapter for every domain; the method registries."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from salun_ext.train import EngineConfig, OptimConfig, Registry, RunOptions, TrainRecipe, engine_config, fit
from salun_ext.utils import UsageError


def test_engine_config_takes_what_from_the_recipe_and_how_from_the_options():
    recipe = TrainRecipe(epochs=3, optimizer=OptimConfig("adam", lr=0.5), schedule="cosine", grad_clip=2.0, amp="bf16")
    options = RunOptions(device="cpu", seed=9, checkpoint_dir="ck", checkpoint_every=4, resume=True, progress=False)
    cfg = engine_config(recipe, options, desc="x")
    assert isinstance(cfg, EngineConfig)
    assert (cfg.epochs, cfg.optimizer.lr, cfg.schedule, cfg.grad_clip) == (3, 0.5, "cosine", 2.0)
    assert (cfg.seed, cfg.device, cfg.checkpoint_dir, cfg.checkpoint_every, cfg.resume) == (9, "cpu", "ck", 4, True)
    assert cfg.amp == "bf16" and cfg.desc == "x" and cfg.progress is False
    assert engine_config(recipe, dataclasses.replace(options, amp="none")).amp == "none"  # options win when set
    # every EngineConfig field comes from one of the two (or is the adapter's own): nothing is silently dropped
    own = {"desc", "shard_batches"}
    covered = {f.name for f in dataclasses.fields(TrainRecipe)} | {f.name for f in dataclasses.fields(RunOptions)}
    assert {f.name for f in dataclasses.fields(EngineConfig)} - own <= covered


def test_recipe_replace_reaches_the_optimizer():
    recipe = TrainRecipe(max_steps=5).replace(lr=0.25, max_steps=7, weight_decay=0.0)
    assert recipe.max_steps == 7 and recipe.optimizer.lr == 0.25 and recipe.optimizer.weight_decay == 0.0


def test_run_options_check_their_values():
    with pytest.raises(UsageError, match="amp: expected one of none, bf16, fp16; got 'fp8'"):
        RunOptions(amp="fp8")
    with pytest.raises(UsageError, match="distributed: expected one of none, ddp, fsdp"):
        RunOptions(distributed="dp")


def test_fit_trains_through_the_engine():
    model = torch.nn.Linear(3, 1)
    before = model.weight.detach().clone()

    class Task:
        def batches(self, epoch):
            return [torch.ones(2, 3)] * 2

        def loss(self, m, batch):
            return m(batch).pow(2).mean()

    result = fit(model, Task(), TrainRecipe(epochs=2, optimizer=OptimConfig("sgd", lr=0.1)), RunOptions(device="cpu"))
    assert result.steps == 4 and not torch.equal(model.weight.detach(), before)


def test_registry_names_aliases_and_errors():
    reg: Registry[type] = Registry("widget")

    @reg.register
    class Alpha:
        name = "alpha_one"

    reg.alias(a1="alpha_one")
    assert reg.key("Alpha-One") == "alpha_one" and reg.key("a1") == "alpha_one" and reg.get_class("a1") is Alpha
    assert list(reg) == ["alpha_one"] and len(reg) == 1
    with pytest.raises(UsageError, match="unknown widget 'beta'; available: alpha_one"):
        reg.key("beta")
    with pytest.raises(RuntimeError, match="registered twice"):
        reg.register(Alpha)
