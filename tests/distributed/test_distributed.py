"""Distributed saliency masks, masked steps, mask files, engine and LM CLI over gloo on CPU (2 and 4 processes).

Process start-up dominates, so each world size is ONE spawn that runs every check on a shared process group
(tests/dist_workers.py); the tests below only read that session's per-check outcome.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests import dist_workers

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)

WORLD2_CHECKS = [
    "replicated",
    "per_rank",
    "dtensor_shards",
    "uneven_shards_ties",
    "disagreement",
    "compute_saliency",
    "fsdp_masked_steps",
    "mask_files",
    "engine_resume",
    "lm_cli_ddp",
    "classification_cli_ddp",
    "diffusion_cli_ddp",
    "diffusion_cli_fsdp",  # after diffusion_cli_ddp: it reuses that model and mask
    "timeout",
    "peer_crash",  # last: rank 1 dies
]
WORLD4_CHECKS = ["replicated", "dtensor_shards", "mesh_2d", "uneven_shards_ties", "per_rank", "fsdp_masked_steps"]


SESSION_DIRS: dict = {}  # world size -> the session's output folder (for checks compared in the parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session(world: int, checks: list[str], tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp(f"world{world}")
    # imported once here and inherited by the forked workers (each would otherwise pay seconds of imports)
    import torch.distributed.checkpoint.state_dict
    import torch.distributed.fsdp
    import torch.distributed.tensor  # noqa: F401

    import salun_ext.distributed  # noqa: F401

    if "lm_cli_ddp" in checks:
        import transformers  # noqa: F401

    # fork: the workers inherit the imported torch / salun_ext instead of paying ~10 s of imports each
    mp.start_processes(
        dist_workers.run_session,
        args=(world, _free_port(), str(out), checks),
        nprocs=world,
        join=True,
        start_method="fork",
    )
    SESSION_DIRS[world] = out
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    timing = {k.split(":")[0]: v for k, v in results[0].items() if k.endswith(":seconds")}
    print(f"world {world} check seconds (rank 0): {timing}")
    return results


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _session(2, WORLD2_CHECKS, tmp_path_factory)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _session(4, WORLD4_CHECKS, tmp_path_factory)


def _assert_ok(results: list[dict], check: str) -> None:
    for rank, res in enumerate(results):
        assert check in res, f"rank {rank} never reached check {check!r}"
        assert res[check] == "ok", f"rank {rank}, check {check!r}:\n{res[check]}"


@pytest.mark.parametrize("check", WORLD2_CHECKS)
def test_two_processes(world2, check):
    _assert_ok(world2, check)


@pytest.mark.parametrize("check", WORLD4_CHECKS)
def test_four_processes(world4, check):
    _assert_ok(world4, check)


@pytest.fixture
def workers_thread_count():
    """The one-process reference runs with the workers' single thread: CPU convolution backward sums in an order
    that depends on the thread count, and bit-exact masks need bit-exact gradients."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_classification_cli_masks_under_ddp_equal_the_one_process_masks(world2, tmp_path, workers_thread_count):
    """The 2-process `mask` and SalUn `unlearn` masks (every rank takes the whole forget set) = one process's."""
    from salun_ext import SaliencyMask
    from salun_ext.cli import main

    _assert_ok(world2, "classification_cli_ddp")
    cls = SESSION_DIRS[2] / "cls"
    model = str(cls / "orig" / "model.safetensors")
    fast = dist_workers.CLS_FAST
    assert main(["mask", "--checkpoint", model, "--out", str(tmp_path / "masks"), *fast]) == 0
    argv = ["unlearn", "--checkpoint", model, "--method", "salun", "--set", "epochs=1", "--no-evaluate", *fast]
    assert main([*argv, "--out", str(tmp_path / "salun")]) == 0
    for one, two in [("masks/with_0.5.safetensors",) * 2, ("salun/mask.safetensors",) * 2]:
        a, b = SaliencyMask.load(tmp_path / one), SaliencyMask.load(cls / two)
        assert a.equal(b) and (a.k, a.threshold) == (b.k, b.threshold), one


def test_diffusion_cli_mask_under_ddp_equals_the_one_process_mask(world2, tmp_path, workers_thread_count):
    from salun_ext import SaliencyMask
    from salun_ext.cli import main

    _assert_ok(world2, "diffusion_cli_ddp")
    _assert_ok(world2, "diffusion_cli_fsdp")
    ddpm = SESSION_DIRS[2] / "ddpm"
    argv = ["diffusion", "mask", "--model", str(ddpm / "orig"), *dist_workers.DDPM_MASK]
    assert main([*argv, "--out", str(tmp_path / "mask.safetensors")]) == 0
    a, b = SaliencyMask.load(tmp_path / "mask.safetensors"), SaliencyMask.load(ddpm / "mask.safetensors")
    assert a.equal(b) and (a.k, a.threshold) == (b.k, b.threshold)
    # FSDP2 shards: the same mask up to the rounding of the sharded clip norm
    dist_workers.assert_same_mask_but_for_clip_rounding(SaliencyMask.load(ddpm / "mask_fsdp.safetensors"), a)
