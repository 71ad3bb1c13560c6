"""Distributed saliency masks: time per mask vs world size, and bytes each rank sends per mask.

CPU sweep (gloo, processes forked on this machine):
    python benchmarks/distributed_masks.py sweep --worlds 1,2,4 --lists synthetic:1e6:40,synthetic:1e7:60

GPU (NCCL, one process per GPU; the 7B-class bf16 list: 291 tensors, 6.7B elements):
    torchrun --nproc-per-node 8 benchmarks/distributed_masks.py run --list llama7b --dtype bf16 --layout shards
    torchrun --nproc-per-node 8 benchmarks/distributed_masks.py run --list llama7b --dtype bf16 --layout replicated
    python benchmarks/distributed_masks.py run --list llama7b --dtype bf16          # one GPU, no process group

layout "shards": every tensor is a DTensor sharded on dim 0 (FSDP2); each rank generates only its rows.
layout "replicated": every rank holds the full list (DDP gradients); each rank histograms its share.
Reported per row: median and max-over-ranks time per mask, bytes rank 0 sent (all-reduce / all-gather inputs:
the payload, not the algorithm's wire traffic), number of collectives, extra peak CUDA memory, tie path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.grad_lists import DTYPES, list_shapes, numel


def _local_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """torch.chunk / DTensor Shard(0) split: ceil(rows / world) rows per rank, the last ones possibly fewer."""
    size = math.ceil(rows / world)
    start = min(rows, rank * size)
    return start, min(rows, start + size)


def build_grads(shapes, dtype, layout, rank, world, device, seed=0):
    """Heavy-tailed gradients: the full list (replicated) or this rank's Shard(0) rows as DTensors."""
    gen = torch.Generator(device=device).manual_seed(seed + 1000 * rank)
    out = {}
    mesh = None
    if layout == "shards" and world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        mesh = init_device_mesh(device.type, (world,))
    for i, shape in enumerate(shapes):
        if mesh is not None:
            a, b = _local_rows(shape[0], rank, world)
            local_shape = (b - a, *shape[1:])
        else:
            local_shape = shape
        g = torch.randn(local_shape, generator=gen, device=device)
        g.mul_(torch.randn(local_shape, generator=gen, device=device).mul_(2.0).exp_())
        g = g.to(dtype)
        if mesh is not None:
            stride = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
            g = DTensor.from_local(g, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=tuple(stride))
        out[f"t{i}"] = g
    return out


def measure(spec: str, dtype: str, layout: str, ratio: float, reps: int, device: torch.device) -> dict | None:
    from salun_ext.saliency import saliency_masks
    from salun_ext.saliency.distributed import distributed_saliency_masks

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shapes = list_shapes(spec)
    grads = build_grads(shapes, DTYPES[dtype], layout, rank, world, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()

    stats: dict = {}

    def one():
        if world == 1:
            return saliency_masks(grads, ratio)
        return distributed_saliency_masks(grads, ratio, process_group=dist.group.WORLD, stats=stats)

    one()  # warm-up
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        mask = one()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del mask
    extra = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else None
    median = statistics.median(times)
    slowest = median
    if world > 1:
        t = torch.tensor([median], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        slowest = float(t.item())
    if rank != 0:
        return None
    n = numel(shapes)
    return {
        "list": spec,
        "elements": n,
        "tensors": len(shapes),
        "dtype": dtype,
        "layout": layout if world > 1 else "single",
        "world": world,
        "ratio": ratio,
        "median_ms": median * 1e3,
        "max_rank_ms": slowest * 1e3,
        "bytes_sent_rank0": stats.get("bytes_sent", 0),
        "collectives": stats.get("collectives", 0),
        "tie_paths": stats.get("tie_paths", []),
        "extra_cuda_bytes": extra,
        "mask_bytes": n / 8,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
    }


def _row(r: dict) -> str:
    extra = "-" if r["extra_cuda_bytes"] is None else f"{r['extra_cuda_bytes'] / 2**20:.0f} MiB"
    return (
        f"| {r['list']} | {r['elements']:.3g} | {r['dtype']} | {r['layout']} | {r['world']} | {r['median_ms']:.1f} | "
        f"{r['max_rank_ms']:.1f} | {r['bytes_sent_rank0'] / 1024:.1f} KiB | {r['collectives']} | {extra} |"
    )


HEADER = (
    "| list | elements | dtype | layout | world | median ms | slowest rank ms | sent by rank 0 | collectives | "
    "extra CUDA |\n|---|---|---|---|---|---|---|---|---|---|"
)


# -------------------------------------------------------------------------------------------------------------


def _sweep_worker(rank, world, port, jobs, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = [measure(*job, device=torch.device("cpu")) for job in jobs]
    if rank == 0:
        Path(out_file).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def sweep(args) -> list[dict]:
    import torch.multiprocessing as mp

    rows = []
    for world in [int(w) for w in args.worlds.split(",")]:
        jobs = [
            (spec, args.dtype, layout, args.ratio, args.reps)
            for spec in args.lists.split(",")
            for layout in (args.layouts.split(",") if world > 1 else ["single"])
        ]
        if world == 1:
            rows += [measure(*job, device=torch.device("cpu")) for job in jobs]
            continue
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = tempfile.mktemp(suffix=".json")
        mp.start_processes(_sweep_worker, args=(world, port, jobs, out), nprocs=world, start_method="fork")
        rows += json.loads(Path(out).read_text())
    return rows


def run(args) -> list[dict]:
    """Under torchrun (any backend) or as one process."""
    from salun_ext.distributed import init_distributed

    ctx = init_distributed(timeout_s=600, device=args.device)
    try:
        row = measure(args.list, args.dtype, args.layout, args.ratio, args.reps, ctx.device)
    finally:
        ctx.close()
    return [row] if row is not None else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    sw = sub.add_parser("sweep", help="CPU: fork gloo process groups of each world size on this machine")
    sw.add_argument("--worlds", default="1,2,4")
    sw.add_argument("--lists", default="synthetic:1e6:40,synthetic:1e7:60")
    sw.add_argument("--layouts", default="replicated,shards")
    r = sub.add_parser("run", help="one measurement in this process group (start with torchrun)")
    r.add_argument("--list", default="llama7b")
    r.add_argument("--layout", choices=["replicated", "shards"], default="shards")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    for p in (sw, r):
        p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
        p.add_argument("--ratio", type=float, default=0.5)
        p.add_argument("--reps", type=int, default=5)
        p.add_argument("--json", default=None, help="append the rows to this JSON file")
    args = parser.parse_args()
    rows = sweep(args) if args.mode == "sweep" else run(args)
    if rows:
        print(HEADER)
        for row in rows:
            print(_row(row))
        if args.json:
            path = Path(args.json)
            old = json.loads(path.read_text()) if path.exists() else []
            path.write_text(json.dumps(old + rows, indent=1))


if __name__ == "__main__":
    main()
