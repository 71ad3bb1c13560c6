"""Fault injection, as a demanding user would try it: killed and interrupted runs, two runs on one folder, a full
disk, an output that is a file, inflated or truncated files, malicious pickles, a big mask's load memory.

Every case ends with a clear error (exit 2, one line) or an exact resume; nothing is lost and nothing executes.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from salun_ext.cli import main
from salun_ext.models import ModelSpec, save_classifier
from salun_ext.utils import OutputFolder

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--no-progress", "--device", "cpu", "--threads", "1"]
TRAIN = ["train", "--model", "small_cnn", "--model-option", "width=8", "--batch-size", "64", *FAST]


def _cli(args: list[str], *, env_extra: dict | None = None, setup: str = "", **kw) -> subprocess.Popen:
    """`salun-ext ARGS` in a fresh interpreter (optionally after a few lines of `setup`)."""
    code = f"import sys\n{setup}\nfrom salun_ext.cli import main\nsys.exit(main({args!r}))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


EPOCHS = 100


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_an_interrupted_training_resumes_bit_identical(tmp_path, how):
    # an epoch takes ~30 ms here: 100 of them leave the signal seconds to land after the first checkpoint, so the
    # run cannot finish before it is interrupted (6 epochs took 0.1 s, close to the polling interval)
    whole = tmp_path / "whole" / "model.safetensors"
    assert main([*TRAIN, "--epochs", str(EPOCHS), "--out", str(whole)]) == 0

    out = tmp_path / "cut" / "model.safetensors"
    # Ctrl-C as at a terminal: a shell that starts the tests in the background (CI, `make test &`) passes SIGINT
    # down ignored, and Python then never raises KeyboardInterrupt, as nohup intends
    ctrl_c = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)"
    proc = _cli([*TRAIN, "--epochs", str(EPOCHS), "--out", str(out)], setup=ctrl_c)
    _wait_for(out.parent / "ckpt" / "last.pt", proc)  # the first epoch's checkpoint
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=120)
    if how == "SIGINT":  # one line saying where it stopped, and that --resume continues it
        assert proc.returncode == 130, err
        assert err.count("\n") == 1 and "interrupted at epoch" in err and "resume with --resume" in err, err
        assert "Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and (out.parent / "ckpt" / "last.pt").exists()
    if how == "SIGINT":  # Python saw the interruption, so no write is left half-done
        assert not list(out.parent.glob("**/.*.tmp")), "a temporary file was left behind"
    # (a SIGKILL in the middle of a checkpoint write leaves its temporary file: the next run removes it)
    assert main([*TRAIN, "--epochs", str(EPOCHS), "--out", str(out), "--resume"]) == 0
    assert not list(out.parent.glob("**/.*.tmp")), "the resumed run left a temporary file"
    resumed, reference = _weights(out), _weights(whole)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference), "the resumed run differs"


def test_sigterm_ends_the_run_with_143(tmp_path):
    out = tmp_path / "t" / "model.safetensors"
    proc = _cli([*TRAIN, "--epochs", "1000", "--out", str(out)])  # ~30 s: it must still run when the signal lands
    _wait_for(out.parent / "ckpt" / "last.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "interrupted at epoch" in err and err.count("\n") == 1, err


def test_two_runs_on_one_folder_refuse(tmp_path, capsys):
    out = tmp_path / "shared"
    with OutputFolder(out):
        assert main([*TRAIN, "--epochs", "1", "--out", str(out / "model.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "is in use by another run (pid" in err and err.count("\n") == 1, err
    assert not (out / "model.safetensors").exists()


def test_an_output_that_is_a_file_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    started = time.perf_counter()
    assert main([*TRAIN, "--epochs", "30", "--out", str(blocker / "model.safetensors")]) == 2
    assert "expected a folder, but it is a file" in capsys.readouterr().err
    assert time.perf_counter() - started < 20  # refused up front, not after 30 epochs


def test_a_full_disk_gives_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "full" / "model.safetensors"
    setup = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))"  # a 20 kB 'disk'
    proc = _cli([*TRAIN, "--epochs", "1", "--out", str(out)], setup=setup)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "could not be written" in err and "nothing was replaced" in err and err.count("\n") == 1, err
    assert not out.exists() and not list(out.parent.glob(".*.tmp")), list(out.parent.iterdir())


def test_inflated_checkpoint_metadata_is_refused_before_allocating(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    spec = ModelSpec("small_cnn", 1, 10, 8, {"width": 8})
    save_classifier(tmp_path / "ok.safetensors", spec.build(), spec)
    with safe_open(str(tmp_path / "ok.safetensors"), "pt") as f:
        metadata = f.metadata()
    metadata["spec"] = json.dumps({**json.loads(metadata["spec"]), "options": {"width": 50_000}})  # ~180 GB
    save_file(load_file(str(tmp_path / "ok.safetensors")), str(tmp_path / "bomb.safetensors"), metadata=metadata)
    args = ["evaluate", "--checkpoint", str(tmp_path / "bomb.safetensors"), "--forget-ratio", "0.1", *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the file's tensors do not match it" in err and err.count("\n") == 1, err


def test_truncated_files_are_refused_in_one_line(tmp_path, capsys):
    spec = ModelSpec("small_cnn", 1, 10, 8, {"width": 8})
    save_classifier(tmp_path / "m.safetensors", spec.build(), spec)
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["evaluate", "--checkpoint", str(tmp_path / "cut.safetensors"), "--forget-ratio", "0.1", *FAST]) == 2
    assert "not a readable safetensors checkpoint" in capsys.readouterr().err

    import salun_ext

    mask = salun_ext.saliency_masks({"w": torch.randn(4096)}, 0.5)
    mask.save(tmp_path / "mask.safetensors")
    cut = (tmp_path / "mask.safetensors").read_bytes()
    (tmp_path / "mask_cut.safetensors").write_bytes(cut[: len(cut) - 100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        salun_ext.SaliencyMask.load(tmp_path / "mask_cut.safetensors")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickles_never_execute(tmp_path):
    """Every loader that accepts a .pt file reads it with weights_only=True."""
    import salun_ext
    from salun_ext.diffusion.evaluation import torchvision_classifier

    marker = tmp_path / "executed"
    evil = tmp_path / "with_0.5.pt"
    with open(evil, "wb") as f:
        pickle.dump({"w": _Payload(marker)}, f)
    with pytest.raises(ValueError, match="not a readable PyTorch mask file"):
        salun_ext.SaliencyMask.from_upstream(evil)
    with pytest.raises(ValueError, match="not a readable file of tensors"):
        torchvision_classifier("resnet18", evil)
    from salun_ext.data import load_dataset
    from salun_ext.diffusion.evaluation import scoring_classifier
    from salun_ext.train import RunOptions

    with pytest.raises(ValueError, match=r"classifier .*not a readable file of tensors"):
        scoring_classifier(load_dataset("digits"), 8, RunOptions(device="cpu"), load=evil)
    assert not marker.exists(), "a pickle executed code"


def test_a_big_mask_loads_in_about_its_file_size(tmp_path):
    """2^29 elements (a 64 MiB file): the load's peak memory growth stays under 2 x file + 128 MiB."""
    n = 1 << 29
    words = torch.randint(-(2**31), 2**31 - 1, (n // 32,), dtype=torch.int32)
    from salun_ext import SaliencyMask

    SaliencyMask(words, ["w"], [(n,)], ratio=0.5).save(tmp_path / "big.safetensors")
    del words
    size = (tmp_path / "big.safetensors").stat().st_size
    probe = (
        "import resource, salun_ext, torch\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"m = salun_ext.SaliencyMask.load({str(tmp_path / 'big.safetensors')!r})\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, m.numel)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    growth, numel = (int(v) for v in done.stdout.split())
    assert numel == n
    assert growth <= 2 * size + (128 << 20), f"loading a {size >> 20} MiB mask grew memory by {growth >> 20} MiB"
