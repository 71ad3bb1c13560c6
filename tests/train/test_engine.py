"""The shared training engine: optimizers, schedules, masks, AMP, checkpoint + resume, bad config."""

from __future__ import annotations

import copy

import pytest
import torch

import salun_ext
from salun_ext.train.engine import Engine, EngineConfig, OptimConfig


class RegressionTask:
    def __init__(self, n_batches=4, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.data = [(torch.randn(8, 5, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(n_batches)]
        self.steps_seen = 0

    def batches(self, epoch):
        return list(self.data)

    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    def on_step_end(self, engine, step):
        self.steps_seen += 1


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _cfg(**kw):
    base = dict(epochs=3, optimizer=OptimConfig("sgd", lr=0.05), device="cpu", progress=False)
    base.update(kw)
    return EngineConfig(**base)


def test_fit_reduces_the_loss_and_counts_steps():
    task = RegressionTask()
    engine = Engine(_model(), _cfg(epochs=5))
    result = engine.fit(task)
    assert result.steps == 20 and result.epochs == 5 and task.steps_seen == 20
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.seconds > 0


def test_max_steps_caps_the_run():
    engine = Engine(_model(), _cfg(epochs=None, max_steps=6))
    assert engine.fit(RegressionTask()).steps == 6


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_masked_training_never_moves_non_salient_weights(name):
    model = _model()
    task = RegressionTask()
    task.loss(model, task.data[0]).backward()
    mask = salun_ext.saliency_masks(model.named_parameters(), 0.3)
    model.zero_grad()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    Engine(model, _cfg(optimizer=OptimConfig(name, lr=0.01, weight_decay=0.1)), mask=mask).fit(task)
    for n, p in model.named_parameters():
        frozen = ~mask.dense(n)
        assert torch.equal(p.detach()[frozen], theta0[n][frozen])
        if (~frozen).any():
            assert not torch.equal(p.detach()[~frozen], theta0[n][~frozen])


def test_multistep_schedule_and_warmup():
    engine = Engine(_model(), _cfg(epochs=4, schedule="multistep", milestones=(2,), gamma=0.1))
    engine.fit(RegressionTask())
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.1)
    engine = Engine(_model(), _cfg(epochs=1, schedule_unit="step", warmup_steps=8))
    engine.fit(RegressionTask())
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 5 / 8)


def test_bf16_autocast_and_grad_clip_run_on_cpu():
    result = Engine(_model(), _cfg(amp="bf16", grad_clip=0.5)).fit(RegressionTask())
    assert result.steps == 12


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    full_model = _model()
    Engine(full_model, _cfg(epochs=4, seed=1)).fit(RegressionTask())

    class Interrupt(RegressionTask):
        def on_step_end(self, engine, step):
            if step == 10:  # mid-epoch 3
                engine.save_checkpoint(self)
                raise KeyboardInterrupt

    ckpt = str(tmp_path / "ckpt")
    model = _model()
    with pytest.raises(KeyboardInterrupt):
        Engine(model, _cfg(epochs=4, seed=1, checkpoint_dir=ckpt)).fit(Interrupt())
    resumed_model = _model()
    result = Engine(resumed_model, _cfg(epochs=4, seed=1, checkpoint_dir=ckpt, resume=True)).fit(RegressionTask())
    assert result.steps == 16 and result.epochs == 4
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_resume_refuses_a_checkpoint_of_another_architecture(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    Engine(_model(), _cfg(epochs=1, checkpoint_dir=ckpt)).fit(RegressionTask())
    other = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"other settings \(differ: initial weights, parameters\)"):
        Engine(other, _cfg(epochs=2, checkpoint_dir=ckpt, resume=True)).fit(RegressionTask())


def test_non_finite_loss_is_reported():
    class Exploding(RegressionTask):
        def loss(self, model, batch):
            return model(batch[0]).sum() * float("inf")

    with pytest.raises(FloatingPointError, match="non-finite loss"):
        Engine(_model(), _cfg()).fit(Exploding())


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(epochs=None, max_steps=None), "epochs or max_steps"),
        (dict(epochs=-1), "epochs must be >= 0"),
        (dict(amp="fp8"), "amp must be"),
        (dict(amp="fp16"), "needs a CUDA device"),
        (dict(grad_clip=0.0), "grad_clip must be positive"),
        (dict(optimizer=OptimConfig("lion")), "unknown optimizer"),
        (dict(schedule="poly"), "unknown schedule"),
        (dict(device="cuda:3"), "CUDA is not available"),
    ],
)
def test_bad_config_is_a_clear_error(kw, message):
    if kw.get("device") == "cuda:3" and torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match=message):
        Engine(_model(), _cfg(**kw)).fit(RegressionTask())


def test_mask_for_another_model_is_refused():
    other = torch.nn.Linear(5, 2)
    other(torch.randn(1, 5)).sum().backward()
    mask = salun_ext.saliency_masks(other.named_parameters(), 0.5)
    with pytest.raises(ValueError, match="does not match"):
        Engine(_model(), _cfg(), mask=mask)


def test_engine_does_not_copy_the_model():
    model = _model()
    engine = Engine(model, _cfg(epochs=1))
    before = copy.deepcopy(model.state_dict())
    engine.fit(RegressionTask())
    assert engine.model is model
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
