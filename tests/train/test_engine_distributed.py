"""Single-process checks of the engine's distributed options and of resuming a run cut by max_steps."""

from __future__ import annotations

import pytest
import torch

from salun_ext.train.engine import Engine, EngineConfig, OptimConfig


class _Task:
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.data = [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(4)]

    def batches(self, epoch):
        return self.data

    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def _cfg(**kw):
    return EngineConfig(optimizer=OptimConfig("adam", lr=0.01), progress=False, **kw)


def test_a_run_cut_by_max_steps_resumes_mid_epoch(tmp_path):
    straight = _model()
    Engine(straight, _cfg(epochs=2)).fit(_Task())
    ckpt = str(tmp_path / "ckpt")
    first = Engine(_model(), _cfg(epochs=2, max_steps=3, checkpoint_dir=ckpt)).fit(_Task())
    assert first.steps == 3 and first.epochs == 0  # epoch 0 is not finished: the run stopped at its 3rd batch
    resumed_model = _model()
    result = Engine(resumed_model, _cfg(epochs=2, checkpoint_dir=ckpt, resume=True)).fit(_Task())
    assert result.steps == 8 and result.epochs == 2
    for a, b in zip(straight.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_distributed_modes_need_a_process_group_and_a_known_world(tmp_path):
    with pytest.raises(ValueError, match="needs an initialised process group"):
        Engine(_model(), _cfg(epochs=1, distributed="ddp"))
    with pytest.raises(ValueError, match="distributed must be"):
        Engine(_model(), _cfg(epochs=1, distributed="deepspeed"))
    # a checkpoint written by a 4-process run is refused by a 1-process run
    ckpt = tmp_path / "ckpt"
    Engine(_model(), _cfg(epochs=1, checkpoint_dir=str(ckpt))).fit(_Task())
    state = torch.load(ckpt / "last.pt", weights_only=True)
    assert state["world_size"] == 1
    state["world_size"] = 4
    torch.save(state, ckpt / "last.pt")
    with pytest.raises(ValueError, match="written by a run of 4 process"):
        Engine(_model(), _cfg(epochs=2, checkpoint_dir=str(ckpt), resume=True)).fit(_Task())
    # per-rank (FSDP) checkpoint files of another world size are named in the error
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "last.rank0-of-2.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"sharded \(FSDP\) checkpoint was written by a run of 2"):
        Engine(_model(), _cfg(epochs=2, checkpoint_dir=str(sharded), resume=True)).fit(_Task())
