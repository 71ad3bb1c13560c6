"""Worker processes of tests/test_distributed.py: one spawn per world size runs every check on one process group.

Each check is a function (rank, world, ctx) -> None that asserts; its outcome ("ok" or the traceback) lands in
a JSON file per rank, and the tests in test_distributed.py look the outcomes up by check name. A failing check
does not stop the others (the group's 60 s timeout bounds any mismatch it leaves behind).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

GROUP_TIMEOUT_S = 60


def run_session(rank: int, world: int, port: int, out_dir: str, checks: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    ctx = {"out": Path(out_dir), "side": dist.new_group(backend="gloo")}
    results: dict[str, str] = {}
    path = Path(out_dir) / f"rank{rank}.json"
    for name in checks:
        start = time.perf_counter()
        try:
            globals()[f"check_{name}"](rank, world, ctx)
            results[name] = "ok"
        except BaseException:
            results[name] = traceback.format_exc()
        results[f"{name}:seconds"] = f"{time.perf_counter() - start:.2f}"
        path.write_text(json.dumps(results))
        if ctx.get("exit"):  # a check that simulates a crashed rank
            os._exit(0)
    dist.barrier()
    dist.destroy_process_group()


# -------------------------------------------------------------------------------------------------------------
# Gradient lists


def assert_same_mask_but_for_clip_rounding(a, b, max_swaps: int = 4) -> None:
    """An FSDP mask against the unsharded one. The gradient-norm clip sums the shard norms in another order, so its
    scale (and the k-th |g|) differs by rounding, which can swap an element at the threshold with its neighbour in
    rank: same tensors and k, a threshold equal to 1e-5, and at most `max_swaps` swapped pairs (a wrong shard order
    or offset would move thousands of bits)."""
    assert a.names == b.names and a.shapes == b.shapes and a.k == b.k, (a, b)
    assert abs(a.threshold - b.threshold) <= 1e-5 * abs(b.threshold), (a.threshold, b.threshold)
    differ = sum(int((a.dense(n) != b.dense(n)).sum()) for n in a.names)
    assert differ <= 2 * max_swaps, f"{differ} mask bits differ"


def _grads(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Named gradients of mixed shapes and dtypes; zeros90 puts the threshold on 0 with massive ties."""
    from tests.helpers import nasty_list

    shapes = [(33, 7), (5,), (40, 25), (17, 3, 4), (3, 5), (1, 64)]
    sizes = [torch.Size(s).numel() for s in shapes]
    tensors = nasty_list(sizes, kind, [torch.float32, torch.bfloat16, torch.float32], seed=seed)
    return {f"p{i}": t.view(s) for i, (t, s) in enumerate(zip(tensors, shapes))}


RATIOS = [0.5, 0.05, 0.93, 0.0, 1.0]
KINDS = ["zeros90", "heavy", "ties"]


def _assert_same(reference, got, what):
    for a, b in zip(reference, got):
        assert a.equal(b), f"{what}: ratio {a.ratio}: {a.count()} vs {b.count()} salient"
        assert (a.k, a.threshold, a.exact_k) == (b.k, b.threshold, b.exact_k), what


def _distribute(named, mesh, placements_for):
    from torch.distributed.tensor import distribute_tensor

    return {n: distribute_tensor(g, mesh, placements_for(g)) for n, g in named.items()}


# -------------------------------------------------------------------------------------------------------------
# Masks


def check_replicated(rank, world, ctx):
    import salun_ext

    paths = set()
    for kind in KINDS:
        named = _grads(kind)
        stats: dict = {}
        got = salun_ext.saliency_masks(named, RATIOS, process_group=dist.group.WORLD)
        from salun_ext.saliency.distributed import distributed_saliency_masks

        distributed_saliency_masks(named, RATIOS, process_group=dist.group.WORLD, stats=stats)
        paths.update(stats["tie_paths"])
        _assert_same(salun_ext.saliency_masks(named, RATIOS), got, f"replicated {kind}")
        assert all(m.shard is None for m in got)
        assert stats["bytes_sent"] < 256 * 1024, stats
        loose = salun_ext.saliency_masks(named, RATIOS, process_group=dist.group.WORLD, exact_k=False)
        _assert_same(salun_ext.saliency_masks(named, RATIOS, exact_k=False), loose, f"replicated {kind} loose")
    assert "contiguous quota" in paths, paths  # the tie quota crossed the ranks' shares of a tensor


def check_per_rank(rank, world, ctx):
    import salun_ext
    from salun_ext.distributed import gather_mask

    for kind in KINDS:
        named = _grads(kind)
        names = list(named)
        mine = {n: named[n] for i, n in enumerate(names) if i % world == rank}
        order = [n for r in range(world) for i, n in enumerate(names) if i % world == r]
        reference = salun_ext.saliency_masks({n: named[n] for n in order}, RATIOS)
        got = salun_ext.saliency_masks(mine, RATIOS, process_group=dist.group.WORLD, layout="per_rank")
        for a, b in zip(reference, got):
            assert b.shard is not None and b.shard.layout == "per_rank"
            assert list(b.names) == list(mine)
            full = gather_mask(b)
            if rank == 0:
                assert a.equal(full), f"per_rank {kind} ratio {a.ratio}"
            else:
                assert full is None


def check_dtensor_shards(rank, world, ctx):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    import salun_ext
    from salun_ext.distributed import gather_mask, shard_mask
    from salun_ext.saliency.distributed import distributed_saliency_masks

    mesh = init_device_mesh("cpu", (world,))
    paths = set()
    for kind in KINDS if world == 2 else ["zeros90"]:  # world 4: the tie-heavy case only (time)
        named = _grads(kind)
        reference = salun_ext.saliency_masks(named, RATIOS)
        for dim in (0, 1):
            sharded = _distribute(named, mesh, lambda g, d=dim: [Shard(d if g.dim() > d else 0)])
            stats: dict = {}
            got = distributed_saliency_masks(sharded, RATIOS, process_group=dist.group.WORLD, stats=stats)
            paths.update(stats["tie_paths"])
            assert [m.shard is not None for m in got] == [True] * len(got)
            for a, b in zip(reference, got):
                assert b.equal(shard_mask(a, sharded)), f"Shard({dim}) {kind} ratio {a.ratio}: local shard differs"
                full = gather_mask(b)
                if rank == 0:
                    assert a.equal(full), f"Shard({dim}) {kind} ratio {a.ratio}"
    assert {"contiguous quota", "box quota"} <= paths, paths


def check_mesh_2d(rank, world, ctx):
    """HSDP-style [Replicate, Shard(0)] and 2-D [Shard(0), Shard(1)] meshes (world 4)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    import salun_ext
    from salun_ext.distributed import gather_mask

    mesh = init_device_mesh("cpu", (2, world // 2))
    for kind in ["zeros90", "ties"]:
        named = _grads(kind, seed=1)
        reference = salun_ext.saliency_masks(named, RATIOS)
        for placements in ([Replicate(), Shard(0)], [Shard(0), Shard(1)], [Shard(1), Shard(1)]):
            sharded = _distribute(named, mesh, lambda g, p=placements: p if g.dim() > 1 else [Replicate(), Shard(0)])
            got = salun_ext.saliency_masks(sharded, RATIOS)
            for a, b in zip(reference, got):
                full = gather_mask(b)
                if rank == 0:
                    assert a.equal(full), f"{placements} {kind} ratio {a.ratio}"


def check_uneven_shards_ties(rank, world, ctx):
    """A tensor of zeros sharded so that some ranks hold nothing: the quota crosses ranks and empty shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    import salun_ext
    from salun_ext.distributed import gather_mask

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(5)
    named = {
        "big": torch.randn(8, 16, generator=g),
        "zeros": torch.zeros(world * 3 - 1, 9),  # every element ties at 0
        "tiny": torch.zeros(world - 1, 2),  # fewer rows than ranks: the last rank's shard is empty
        "rest": torch.randn(5, generator=g),
    }
    n = sum(t.numel() for t in named.values())
    ratios = [(128 + 5 + k) / n for k in (1, 7, 9 * world, 9 * world + 1, 9 * (world * 3 - 1) + 1)]
    reference = salun_ext.saliency_masks(named, ratios)
    for placements_dim in (0, 1):
        sharded = _distribute(named, mesh, lambda t, d=placements_dim: [Shard(d if t.dim() > d else 0)])
        for a, b in zip(reference, salun_ext.saliency_masks(sharded, ratios)):
            full = gather_mask(b)
            if rank == 0:
                assert a.equal(full), f"dim {placements_dim} ratio {a.ratio}"
    replicated = salun_ext.saliency_masks(named, ratios, process_group=dist.group.WORLD)
    _assert_same(reference, replicated, "replicated zeros")


def check_disagreement(rank, world, ctx):
    import salun_ext
    from salun_ext.distributed import DistributedError

    named = _grads("heavy")

    def expect(exc_type, words, **kwargs):
        start = time.perf_counter()
        try:
            salun_ext.saliency_masks(kwargs.pop("grads", named), kwargs.pop("ratios", 0.5), **kwargs)
        except exc_type as exc:
            for w in words:
                assert w in str(exc), f"{w!r} not in {exc}"
        else:
            raise AssertionError(f"no {exc_type.__name__} raised for {words}")
        assert time.perf_counter() - start < 20, "detection took too long"

    group = dist.group.WORLD
    expect(DistributedError, ["disagree on ratios"], ratios=0.5 if rank == 0 else 0.25, process_group=group)
    dropped = dict(list(named.items())[: -1 if rank == world - 1 else None])
    expect(DistributedError, ["disagree on parameter list", "tensors"], grads=dropped, process_group=group)
    renamed = {(f"x{n}" if rank == 0 else n): g for n, g in named.items()}
    expect(DistributedError, ["parameter list"], grads=renamed, process_group=group)
    if rank == 1:
        bad = {**named, "p0": named["p0"].to(torch.int32)}
        expect(TypeError, ["dtype"], grads=bad, process_group=group)
    else:
        expect(DistributedError, ["rank 1", "dtype"], process_group=group)
    nan = {n: g.clone() for n, g in named.items()}
    nan["p2"].view(-1)[-1] = float("nan")  # in the last rank's share of the replicated tensor
    expect(ValueError, ["NaN"], grads=nan, process_group=group)
    expect(DistributedError, ["layout"], layout="per_rank" if rank == 0 else "replicated", process_group=group)
    # compute_saliency compares the parameter lists before it all-reduces any gradient
    model = torch.nn.Linear(3, 2 if rank == 0 else 4)
    try:
        salun_ext.compute_saliency(model, lambda m, x: m(x).sum(), [torch.ones(1, 3)], 0.5, process_group=group)
    except DistributedError as exc:
        assert "parameter list" in str(exc), exc
    else:
        raise AssertionError("compute_saliency accepted different models on the ranks")


def check_compute_saliency(rank, world, ctx):
    """Each rank iterates its share of the batches; integer-valued gradients make the sums exact."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    import salun_ext
    from salun_ext.distributed import gather_mask

    class Linear(torch.nn.Module):
        """Output linear in every weight: integer inputs give integer gradients, exact in any summation order."""

        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(6, 10)
            self.b = torch.nn.Linear(10, 4, bias=False)

        def forward(self, x):
            return self.a(x).sum() + self.b.weight.sum() * x.sum()

    def model_fn():
        torch.manual_seed(0)
        return Linear()

    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(-3, 4, (2, 6), generator=g).float() for _ in range(4)]

    def loss_fn(model, x):
        return model(x)

    reference = salun_ext.compute_saliency(model_fn(), loss_fn, batches, RATIOS, progress=False)
    mine = batches[rank::world]
    plain = salun_ext.compute_saliency(model_fn(), loss_fn, mine, RATIOS, process_group=dist.group.WORLD)
    _assert_same(reference, plain, "plain module, rank shares")
    sums = salun_ext.compute_saliency(
        model_fn(), loss_fn, mine, RATIOS, reduction="sum_of_abs", process_group=dist.group.WORLD
    )
    _assert_same(salun_ext.compute_saliency(model_fn(), loss_fn, batches, RATIOS, reduction="sum_of_abs"), sums, "soa")
    # replicated batches: ranked as copies (no sum over ranks), and rank 0's sums win even when a rank's differ
    # (as non-deterministic kernels could make them): every rank gets the one-process mask of rank 0's data
    got = salun_ext.compute_saliency(
        model_fn(), loss_fn, batches, RATIOS, process_group=dist.group.WORLD, replicated_batches=True
    )
    _assert_same(reference, got, "replicated batches")
    skewed = [b + rank * torch.linspace(0, 5, 6) for b in batches]  # rank 1's gradients differ
    got = salun_ext.compute_saliency(
        model_fn(), loss_fn, skewed, RATIOS, process_group=dist.group.WORLD, replicated_batches=True
    )
    _assert_same(reference, got, "replicated batches, rank 0's sums broadcast")
    ddp = DistributedDataParallel(model_fn())
    # identical batches on every rank: DDP's average equals each rank's gradient
    got = salun_ext.compute_saliency(ddp, loss_fn, batches, RATIOS, process_group=dist.group.WORLD)
    _assert_same(reference, got, "DDP")
    assert got[0].names == reference[0].names  # unwrapped names (no "module.")
    fsdp = model_fn()
    fully_shard(fsdp)
    got = salun_ext.compute_saliency(fsdp, loss_fn, batches, RATIOS, process_group=dist.group.WORLD)
    for a, b in zip(reference, got):
        full = gather_mask(b)
        if rank == 0:
            assert a.equal(full), f"FSDP2 ratio {a.ratio}"


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    )


def _fsdp_mlp():
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def check_fsdp_masked_steps(rank, world, ctx):
    """FSDP2 masked steps == single-process masked steps, bit for bit (same data on every rank)."""
    import salun_ext
    from salun_ext.distributed import shard_mask
    from salun_ext.optim import MaskedAdam, MaskedAdamW, MaskedSGD

    g = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 6, generator=g) for _ in range(3)]
    grads = {n: torch.randn(p.shape, generator=g) for n, p in _mlp().named_parameters()}
    mask = salun_ext.saliency_masks(grads, 0.4)
    setups = [
        (MaskedSGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)),
        (MaskedAdam, dict(lr=0.01, amsgrad=True)),
        (MaskedAdamW, dict(lr=0.01, weight_decay=0.1)),
        (MaskedAdamW, dict(lr=0.01, mode="compat")),
        (MaskedSGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01, state="compact")),  # each rank packs its shard
        (MaskedAdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True, state="compact")),
    ]
    for cls, kwargs in setups:
        reference = _mlp()
        initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
        opt = cls(reference.named_parameters(), mask=mask, **kwargs)
        for x in data:
            reference(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        for which in ("global mask", "sharded mask"):
            model = _fsdp_mlp()
            local = mask if which == "global mask" else shard_mask(mask, model.named_parameters())
            opt2 = cls(model.named_parameters(), mask=local, **kwargs)
            for x in data:
                model(x).pow(2).sum().backward()
                opt2.step()
                opt2.zero_grad()
            if which == "sharded mask" and cls is MaskedSGD:
                from salun_ext.optim import masked

                try:
                    masked(torch.optim.SGD(model.named_parameters(), lr=0.1), mask)
                except NotImplementedError as exc:
                    assert "FSDP2" in str(exc)
                else:
                    raise AssertionError("masked() accepted DTensor parameters")
            for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
                full = b.full_tensor()
                assert torch.equal(a.detach(), full), f"{cls.__name__} {kwargs} {which} {name}"
                if kwargs.get("mode") != "compat":
                    frozen = ~mask.dense(name)
                    assert torch.equal(full[frozen], initial[name][frozen]), f"{name}: a non-salient weight moved"
        if kwargs.get("state") == "compact":
            _compact_resume_check(cls, kwargs, model, local, opt2, reference, opt, data[0])


def _compact_resume_check(cls, kwargs, model, local, opt, reference, reference_opt, x):
    """FSDP2 + state="compact": every state tensor is a plain local tensor packed from the rank's shard; a fresh
    optimizer that loads opt.state_dict() takes the next step exactly as the single-process optimizer."""
    import copy

    from salun_ext.distributed.shards import to_local

    packed = []  # (salient entries, shard size) of every parameter with state on this rank
    for name, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            if key in opt.state[p]:
                value = opt.state[p][key]
                assert not hasattr(value, "placements") and value.shape == (local.count(name),), (name, key)
                packed.append((local.count(name), to_local(p).numel()))
    # a real packing: on some rank some shard's mask is partial (with 4 ranks a rank's shards may all be empty)
    partial = torch.tensor([int(any(0 < count < numel for count, numel in packed))])
    dist.all_reduce(partial, op=dist.ReduceOp.MAX)
    assert partial.item() == 1, packed
    resumed = cls(model.named_parameters(), mask=local, **kwargs)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for net, o in ((model, resumed), (reference, reference_opt)):
        net(x).pow(2).sum().backward()
        o.step()
        o.zero_grad()
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
        assert torch.equal(a.detach(), b.full_tensor()), f"resumed compact {cls.__name__} {name}"


def check_mask_files(rank, world, ctx):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    import salun_ext
    from salun_ext.distributed import load_mask, save_mask, shard_mask

    out = ctx["out"]
    named = _grads("zeros90")
    reference = salun_ext.saliency_masks(named, 0.3)
    mesh = init_device_mesh("cpu", (world,))
    sharded = _distribute(named, mesh, lambda g: [Shard(0)])
    local = salun_ext.saliency_masks(sharded, 0.3)
    save_mask(local, out / "consolidated.safetensors")
    assert salun_ext.SaliencyMask.load(out / "consolidated.safetensors").equal(reference)
    written = save_mask(local, out / "sharded.safetensors", sharded=True)
    assert written.endswith(f".rank{rank}-of-{world}.safetensors"), written
    dist.barrier()
    again = load_mask(out / "sharded.safetensors")
    assert again.equal(local) and again.shard == local.shard and again.k == reference.k
    from_full = load_mask(out / "consolidated.safetensors", params=sharded)
    assert from_full.equal(shard_mask(reference, sharded))
    # a per-shard file of another world size is refused with a message that says so
    if rank == 0:
        (out / f"other.rank0-of-{world + 1}.safetensors").write_bytes(b"")
    dist.barrier()
    try:
        load_mask(out / "other.safetensors")
    except ValueError as exc:
        assert f"{world + 1}-process run" in str(exc), exc
    else:
        raise AssertionError("a shard file of another world size was accepted")
    # replicated (DDP) masks are global: rank 0 writes one file
    replicated = salun_ext.saliency_masks(named, 0.3, process_group=dist.group.WORLD)
    save_mask(replicated, out / "ddp.safetensors")
    assert salun_ext.SaliencyMask.load(out / "ddp.safetensors").equal(reference)


class _Task:
    def __init__(self, crash_rank: int | None = None, crash_at: int | None = None, exception=KeyboardInterrupt):
        g = torch.Generator().manual_seed(0)
        self.data = [(torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(8)]
        self.calls = 0
        self.crash_rank, self.crash_at, self.exception = crash_rank, crash_at, exception

    def batches(self, epoch):
        return self.data

    def loss(self, model, batch):
        self.calls += 1
        if self.crash_rank in (None, dist.get_rank()) and self.calls == self.crash_at:  # never when crash_at is None
            raise self.exception("simulated crash")
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)


def check_engine_resume(rank, world, ctx):
    """DDP and FSDP2 Engine runs: interrupted + resumed == uninterrupted, bit for bit; world size recorded."""
    import salun_ext
    from salun_ext.train.engine import Engine, EngineConfig, OptimConfig

    grads = {n: torch.randn(p.shape) for n, p in _mlp().named_parameters()}
    mask = salun_ext.saliency_masks(grads, 0.5)
    for mode, build in (("ddp", _mlp), ("fsdp", _fsdp_mlp)):

        def engine(mode=mode, build=build, **kw):
            cfg = EngineConfig(
                max_steps=4, optimizer=OptimConfig("adamw", lr=0.01), distributed=mode, progress=False, **kw
            )
            return Engine(build(), cfg, mask=mask)

        straight = engine()
        result = straight.fit(_Task())
        assert result.steps == 4
        expected = {k: _full(v).clone() for k, v in straight.model.state_dict().items()}
        folder = str(ctx["out"] / f"ckpt_{mode}")
        with contextlib.suppress(KeyboardInterrupt):
            engine(checkpoint_dir=folder, checkpoint_every=1).fit(_Task(crash_at=3))
        resumed = engine(checkpoint_dir=folder, checkpoint_every=1, resume=True)
        resumed.fit(_Task())
        for k, v in resumed.model.state_dict().items():
            assert torch.equal(expected[k], _full(v)), f"{mode}: {k} differs after resume"
        if mode == "ddp":
            assert torch.load(os.path.join(folder, "last.pt"), weights_only=True)["world_size"] == world
        else:
            assert os.path.exists(os.path.join(folder, f"last.rank{rank}-of-{world}.pt"))


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check_lm_cli_ddp(rank, world, ctx):
    """`salun-ext lm unlearn` with the torchrun environment (RANK/WORLD_SIZE/... are set): DDP end to end."""
    from salun_ext.cli import main
    from tests.lm_fixtures import build_tiny_lm, write_text_sets

    out = ctx["out"]
    if rank == 0:
        build_tiny_lm(out / "lm")
        write_text_sets(out)
    dist.barrier()
    argv = ["lm", "unlearn", "--model", str(out / "lm"), "--forget", str(out / "forget.jsonl")]
    argv += ["--retain", str(out / "retain.txt"), "--out", str(out / "lm_out"), "--method", "npo", "--epochs", "2"]
    argv += ["--batch-size", "1", "--lr", "1e-3", "--dtype", "fp32", "--no-progress", "--max-length", "48"]
    assert main(argv) == 0
    metrics = json.loads((out / "lm_out" / "metrics.json").read_text())
    assert metrics["world_size"] == world
    assert metrics["train"]["steps"] == 2 * (4 // world)  # 4 forget examples, batch 1, shared out over the ranks
    mask = __import__("salun_ext").SaliencyMask.load(out / "lm_out" / "mask.safetensors")
    assert mask.count() == mask.k and mask.shard is None
    # RMU trains one layer (its loss leaves later layers without gradients: DDP must not wait for them) and
    # GradDiff's KL retain term reads the cached reference on every rank
    for method, extra in (
        ("rmu", ["--rmu-layer", "0", "--saliency-loss", "method"]),
        ("graddiff", ["--retain-loss", "kl"]),
    ):
        run = [*argv[: argv.index("--out") + 1], str(out / f"lm_{method}"), *argv[argv.index("--out") + 2 :]]
        run[run.index("--method") + 1] = method
        assert main([*run, "--max-steps", "1", "--eval", "none", *extra]) == 0
        assert json.loads((out / f"lm_{method}" / "metrics.json").read_text())["train"]["steps"] == 1


CLS_FAST = ["--no-progress", "--device", "cpu", "--forget-ratio", "0.1"]


def check_classification_cli_ddp(rank, world, ctx):
    """`salun-ext train|mask|unlearn --method salun` with the torchrun environment set: DDP, rank-0 files.

    test_distributed.py compares the masks with one-process runs of the same commands.
    """
    from salun_ext.cli import main

    out = ctx["out"] / "cls"
    model = out / "orig" / "model.safetensors"
    assert main(["train", "--epochs", "1", "--out", str(model), "--no-progress", "--device", "cpu"]) == 0
    assert main(["mask", "--checkpoint", str(model), "--out", str(out / "masks"), *CLS_FAST]) == 0
    argv = ["unlearn", "--checkpoint", str(model), "--method", "salun", "--set", "epochs=1", *CLS_FAST]
    assert main([*argv, "--out", str(out / "salun"), "--mia-shadow-size", "50"]) == 0
    for path in ("orig/model.json", "masks/with_0.5.safetensors", "salun/mask.safetensors", "salun/run.json"):
        assert (out / path).exists(), path  # rank 0 wrote, the others waited for it
    assert not (out / "salun" / "ckpt").exists()
    # single-process commands refuse a torchrun start at once instead of racing or hanging
    for argv in (["reproduce", "--out", str(out / "r")], ["diffusion", "demo", "--out", str(out / "d")]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(argv)
        assert code == 2, f"{argv[:2]} ran under WORLD_SIZE={world}"
        assert "runs in one process only" in err.getvalue() and f"WORLD_SIZE={world}" in err.getvalue(), err


DDPM_MASK = ["--forget-class", "3", "--batch-size", "32", "--no-progress", "--device", "cpu"]


def check_diffusion_cli_ddp(rank, world, ctx):
    """`salun-ext diffusion train|mask|unlearn --method salun` with the torchrun environment set (DDP)."""
    from salun_ext.cli import main
    from salun_ext.diffusion.ddpm import ClassConditionalDDPM
    from salun_ext.mask import SaliencyMask

    out = ctx["out"] / "ddpm"
    fast = ["--no-progress", "--device", "cpu"]
    train = ["--dataset", "digits", "--image-size", "8", "--epochs", "1", "--subset", "64", "--batch-size", "16"]
    assert main(["diffusion", "train", *train, "--out", str(out / "orig"), *fast]) == 0
    model = ["--model", str(out / "orig")]
    assert main(["diffusion", "mask", *model, *DDPM_MASK, "--out", str(out / "mask.safetensors")]) == 0
    argv = ["diffusion", "unlearn", "--method", "salun", *model, "--forget-class", "3", "--steps", "2"]
    argv += ["--batch-size", "8", "--mask", str(out / "mask.safetensors"), "--out", str(out / "salun"), *fast]
    assert main(argv) == 0
    assert json.loads((out / "salun" / "unlearn_log.json").read_text())["world_size"] == world
    mask = SaliencyMask.load(out / "mask.safetensors")
    before = ClassConditionalDDPM.from_pretrained(out / "orig").unet.named_parameters()
    after = dict(ClassConditionalDDPM.from_pretrained(out / "salun").unet.named_parameters())
    for n, p in before:  # masked DDP steps: only salient weights moved
        assert torch.equal(p[~mask.dense(n)], after[n][~mask.dense(n)]), n


def check_diffusion_cli_fsdp(rank, world, ctx):
    """`salun-ext diffusion mask|unlearn --fsdp` (FSDP2 UNet) on check_diffusion_cli_ddp's model and mask."""
    from salun_ext.cli import main
    from salun_ext.diffusion.ddpm import ClassConditionalDDPM
    from salun_ext.mask import SaliencyMask

    out = ctx["out"] / "ddpm"
    # the mask of the sharded UNet (DTensor gradients -> each rank's shard, consolidated on rank 0) = the DDP run's,
    # which test_distributed.py compares with one process's
    argv = ["diffusion", "mask", "--model", str(out / "orig"), *DDPM_MASK, "--fsdp"]
    assert main([*argv, "--out", str(out / "mask_fsdp.safetensors")]) == 0
    a, b = SaliencyMask.load(out / "mask_fsdp.safetensors"), SaliencyMask.load(out / "mask.safetensors")
    assert a.shard is None
    assert_same_mask_but_for_clip_rounding(a, b)
    fast = ["--no-progress", "--device", "cpu"]
    model = ["--model", str(out / "orig"), "--forget-class", "3", "--batch-size", "8", "--fsdp", *fast]
    argv = [
        "diffusion",
        "unlearn",
        "--method",
        "salun",
        *model,
        "--steps",
        "2",
        "--mask",
        str(out / "mask.safetensors"),
    ]
    assert main([*argv, "--out", str(out / "salun_fsdp")]) == 0
    mask = SaliencyMask.load(out / "mask.safetensors")
    before = dict(ClassConditionalDDPM.from_pretrained(out / "orig").unet.named_parameters())
    after = dict(ClassConditionalDDPM.from_pretrained(out / "salun_fsdp").unet.named_parameters())  # rank 0 wrote
    ddp = dict(ClassConditionalDDPM.from_pretrained(out / "salun").unet.named_parameters())
    assert before.keys() == after.keys()
    moved = 0
    for n, p in before.items():  # masked steps on the local shards: only salient weights moved
        keep = ~mask.dense(n)
        assert torch.equal(p[keep], after[n][keep]), n
        moved += int((p != after[n]).sum())
        # the same batches and averaged gradients as the DDP run, sharded: the same weights up to rounding
        torch.testing.assert_close(after[n], ddp[n], rtol=1e-4, atol=1e-6, msg=n)
    assert moved > 0
    # GA (no mask) shards too; one step is enough to see it train and save
    ga = ["diffusion", "unlearn", "--method", "ga", *model, "--steps", "1", "--out", str(out / "ga_fsdp")]
    assert main(ga) == 0
    ga_after = dict(ClassConditionalDDPM.from_pretrained(out / "ga_fsdp").unet.named_parameters())
    assert any(not torch.equal(before[n], ga_after[n]) for n in before)
    err = io.StringIO()  # ESD would deep-copy the sharded UNet: refused before anything is loaded
    with contextlib.redirect_stderr(err):
        code = main(["diffusion", "unlearn", "--method", "esd-x", *model, "--out", str(out / "esd_fsdp")])
    assert code == 2 and "--fsdp supports --method salun / ga" in err.getvalue(), err.getvalue()


def check_timeout(rank, world, ctx):
    """A rank that never joins: the others raise DistributedError after the timeout instead of hanging."""
    import salun_ext
    from salun_ext.distributed import DistributedError

    if rank == 0:
        start = time.perf_counter()
        try:
            salun_ext.saliency_masks(_grads("heavy"), 0.5, process_group=ctx["side"], timeout_s=2)
        except DistributedError as exc:
            assert "saliency_masks" in str(exc) and "rank 0" in str(exc), exc
        else:
            raise AssertionError("no error although rank 1 never joined")
        elapsed = time.perf_counter() - start
        assert elapsed < 15, elapsed
    dist.barrier()  # the main group still works (the stale collective sits in the side group)


def check_peer_crash(rank, world, ctx):
    """Rank 1 dies inside a DDP training step: rank 0 fails with DistributedError, not a hang."""
    from salun_ext.distributed import DistributedError
    from salun_ext.train.engine import Engine, EngineConfig, OptimConfig

    engine = Engine(_mlp(), EngineConfig(max_steps=6, optimizer=OptimConfig("sgd"), distributed="ddp", progress=False))
    if rank == 1:
        try:
            engine.fit(_Task(crash_rank=1, crash_at=2, exception=RuntimeError))
        except RuntimeError:
            ctx["exit"] = True  # the worker records this check, then the process exits without cleanup
            return
        raise AssertionError("rank 1 did not crash")
    start = time.perf_counter()
    try:
        engine.fit(_Task())
    except DistributedError as exc:
        assert "training step" in str(exc) and "lost the other processes" in str(exc), exc
    else:
        raise AssertionError("rank 0 finished although rank 1 died")
    assert time.perf_counter() - start < GROUP_TIMEOUT_S
    ctx["exit"] = True
