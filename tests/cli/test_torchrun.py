"""`salun-ext lm unlearn` under a real torchrun (gloo, 2 processes, CPU). Slow: two fresh interpreters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def test_lm_unlearn_under_torchrun_then_resume_with_another_world_size_fails(tmp_path):
    pytest.importorskip("transformers")
    from tests.lm_fixtures import build_tiny_lm, write_text_sets

    build_tiny_lm(tmp_path / "lm")
    forget, retain = write_text_sets(tmp_path)
    out = tmp_path / "out"
    args = ["-m", "salun_ext", "lm", "unlearn", "--model", str(tmp_path / "lm"), "--forget", str(forget)]
    args += ["--retain", str(retain), "--out", str(out), "--epochs", "2", "--batch-size", "1", "--dtype", "fp32"]
    args += ["--device", "cpu", "--dist-backend", "gloo", "--no-progress", "--checkpoint-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    run = subprocess.run(
        [*_torchrun(), "--standalone", "--nproc-per-node", "2", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train"]["steps"] == 4
    assert run.stdout.count("after unlearning:") == 1  # rank 0 alone prints
    # resuming the 2-process run with 1 process is refused with a clear message
    single = subprocess.run(
        [sys.executable, *args, "--resume", "--epochs", "3"], env=env, capture_output=True, text=True, timeout=600
    )
    assert single.returncode != 0
    assert "written by a run of 2 process(es) but this run has 1" in single.stderr


def test_classification_train_and_salun_unlearn_under_torchrun(tmp_path):
    """The classification CLI launched by a real torchrun: rank 0 alone prints and writes, the run completes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    common = ["--dataset", "digits", "--device", "cpu", "--no-progress", "--dist-backend", "gloo"]
    model = tmp_path / "orig" / "model.safetensors"
    train = ["train", "--epochs", "2", "--out", str(model)]
    unlearn = ["unlearn", "--checkpoint", str(model), "--method", "salun", "--forget-ratio", "0.1"]
    unlearn += ["--set", "epochs=1", "--out", str(tmp_path / "u")]
    for argv in (train, unlearn):
        run = subprocess.run(
            [*_torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "salun_ext", *argv, *common],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert run.stdout.count("-> ") == 1, run.stdout  # rank 0 alone reports (and writes)
    assert run.stdout.count("SalUn: unlearned") == 1, run.stdout
    assert model.exists()
    assert (tmp_path / "u" / "mask.safetensors").exists()
    assert not (tmp_path / "u" / "ckpt").exists()
