"""Engine checkpoints that cannot lie: resume refuses other settings, run time accumulates over resumed segments,
non-finite state is never checkpointed, and a corrupt or malicious checkpoint is refused in one line."""

from __future__ import annotations

import pickle
import time

import pytest
import torch

from salun_ext.classification import RunOptions, UnlearnData, get_method
from salun_ext.data import ImageDataset
from salun_ext.train import Engine, EngineConfig, OptimConfig
from salun_ext.utils import UsageError


class Regression:
    """4 batches per epoch; optionally slow (to see the time of each segment) or interrupted at a step."""

    def __init__(self, sleep: float = 0.0, stop_at: int | None = None, poison_at: int | None = None):
        gen = torch.Generator().manual_seed(0)
        self.data = [(torch.randn(8, 5, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(4)]
        self.sleep, self.stop_at, self.poison_at = sleep, stop_at, poison_at

    def batches(self, epoch):
        return list(self.data)

    def loss(self, model, batch):
        time.sleep(self.sleep)
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    def on_step_end(self, engine, step):
        if step == self.stop_at:
            raise KeyboardInterrupt("simulated kill")
        if step == self.poison_at:  # what a diverging BatchNorm does to its running variance
            engine.model[1].running_var.fill_(float("inf"))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))


def _cfg(folder, **kw):
    base = dict(epochs=4, optimizer=OptimConfig("sgd", lr=0.05), seed=0, progress=False, device="cpu")
    return EngineConfig(**{**base, "checkpoint_dir": str(folder), **kw})


def test_resume_with_another_lr_or_seed_is_refused_naming_the_fields(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        Engine(_model(), _cfg(tmp_path)).fit(Regression(stop_at=6))
    for changed, field in ((dict(optimizer=OptimConfig("sgd", lr=0.5)), "recipe"), (dict(seed=1), "seed")):
        with pytest.raises(UsageError, match=rf"differ: {field}\)"):
            Engine(_model(), _cfg(tmp_path, resume=True, **changed)).fit(Regression())
    other_start = _model()
    with torch.no_grad():
        other_start[0].weight.add_(1e-3)  # another base model: same architecture, other weights
    with pytest.raises(UsageError, match=r"differ: initial weights\)"):
        Engine(other_start, _cfg(tmp_path, resume=True)).fit(Regression())
    # a larger budget is fine for a constant schedule: the interrupted run continues
    result = Engine(_model(), _cfg(tmp_path, resume=True, epochs=5)).fit(Regression())
    assert result.steps == 20 and result.resumed


def test_run_time_accumulates_over_resumed_segments(tmp_path):
    step = 0.03
    with pytest.raises(KeyboardInterrupt):
        Engine(_model(), _cfg(tmp_path)).fit(Regression(sleep=step, stop_at=10))  # checkpoint at step 8
    result = Engine(_model(), _cfg(tmp_path, resume=True)).fit(Regression(sleep=step))
    assert result.steps == 16 and len(result.segments) == 2 and result.resumed
    # the first segment trained 8 checkpointed steps, the second the other 8: both count
    assert result.segments[0] >= 8 * step and result.segments[1] >= 8 * step
    assert result.seconds == pytest.approx(sum(result.segments)) and result.seconds >= 16 * step


def test_non_finite_state_is_never_checkpointed(tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite values in 1\.running_var at step 8") as err:
        Engine(_model(), _cfg(tmp_path)).fit(Regression(poison_at=6))  # poisoned in epoch 2
    assert "last good checkpoint is" in str(err.value) and "(step 4)" in str(err.value)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] == 4 and torch.isfinite(state["model"]["1.running_var"]).all()


def test_corrupt_and_malicious_checkpoints_are_refused_in_one_line(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(UsageError, match=r"last\.pt: not a readable engine checkpoint") as err:
        Engine(_model(), _cfg(tmp_path, resume=True)).fit(Regression())
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)

    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "last.pt", "wb") as f:
        pickle.dump({"format": "salun_ext.engine_checkpoint.v2", "model": Payload()}, f)
    with pytest.raises(UsageError, match="not a readable engine checkpoint"):
        Engine(_model(), _cfg(tmp_path, resume=True)).fit(Regression())
    assert not marker.exists(), "a checkpoint executed code"


def _data():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.arange(40) % 4
    full = ImageDataset(images, labels, [str(c) for c in range(4)], "toy")
    return UnlearnData(full.subset(torch.arange(8)), full.subset(torch.arange(8, 40)), batch_size=8)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))


def test_a_method_resume_checks_method_hyperparameters_and_data(tmp_path):
    options = RunOptions(device="cpu", seed=1, checkpoint_dir=str(tmp_path), progress=False)
    first = get_method("rl", epochs=2).run(_net(), _data(), options)
    resume = RunOptions(device="cpu", seed=1, checkpoint_dir=str(tmp_path), resume=True, progress=False)
    with pytest.raises(UsageError, match="differ: config, recipe"):
        get_method("rl", epochs=2, lr=0.05).run(_net(), _data(), resume)
    with pytest.raises(UsageError, match="differ: config, method"):
        get_method("ga", epochs=2).run(_net(), _data(), resume)
    other = _data()
    other.forget.labels[0] = (other.forget.labels[0] + 1) % 4
    with pytest.raises(UsageError, match=r"differ: data\)"):
        get_method("rl", epochs=2).run(_net(), other, resume)
    again = get_method("rl", epochs=2).run(_net(), _data(), resume)  # the finished run: nothing left to train
    assert again.info["resumed"] and again.seconds >= first.seconds - 0.05
