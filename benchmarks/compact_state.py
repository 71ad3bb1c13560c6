"""Compact vs dense optimizer state of the masked steps: state bytes and step time, same parameters, same run.

    python benchmarks/compact_state.py --device cpu --threads 1 --lists resnet18_cifar --densities 0.01,0.1,0.5
    python benchmarks/compact_state.py --device cuda --lists resnet18_cifar,sd15_unet

For each list, density and step (SGD with momentum, AdamW) two optimizers over copies of the same parameters and
gradients: MaskedSGD / MaskedAdamW with state="dense" (strict mode, the baseline) and with state="compact". Step
times are medians, the two timed round robin (each sees the same moments of a busy machine). Reports the bytes of
the per-entry state tensors (momentum buffer; exp_avg + exp_avg_sq) and the ratios compact / dense of both, and
checks after the timed steps that both trajectories are still bit-identical. --jsonl appends each row the moment
it is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.grad_lists import list_shapes
from benchmarks.optim_table import _timer, make_problem

PER_ENTRY = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def state_bytes(optimizer) -> int:
    """Bytes of the per-entry state tensors (step counts and mask digests are a few bytes per tensor)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for k, v in s.items() if k in PER_ENTRY)


def make_optimizer(algo: str, params, mask, state: str):
    from salun_ext.optim import MaskedAdamW, MaskedSGD

    named = [(str(i), p) for i, p in enumerate(params)]
    if algo == "sgd":
        return MaskedSGD(named, lr=1e-3, momentum=0.9, weight_decay=5e-4, mask=mask, state=state)
    return MaskedAdamW(named, lr=1e-3, weight_decay=1e-2, mask=mask, state=state)


def twin(params) -> list[torch.nn.Parameter]:
    """Copies of the parameters with copies of their gradients."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


def bench_case(spec: str, density: float, algo: str, device: str, reps: int, timed) -> dict:
    shapes = list_shapes(spec)
    params, mask = make_problem(shapes, density, device)
    copies = twin(params)
    dense, compact = make_optimizer(algo, params, mask, "dense"), make_optimizer(algo, copies, mask, "compact")
    medians = timed({"dense": dense.step, "compact": compact.step}, reps)
    identical = all(torch.equal(a, b) for a, b in zip(params, copies))
    row = dict(
        list=spec,
        n=sum(math.prod(s) for s in shapes),
        tensors=len(shapes),
        density=density,
        algo=algo,
        dense_ms=medians["dense"],
        compact_ms=medians["compact"],
        time_ratio=medians["compact"] / medians["dense"],  # < 1: the compact step is faster
        dense_state_mib=state_bytes(dense) / 2**20,
        compact_state_mib=state_bytes(compact) / 2**20,
        bit_identical=identical,
    )
    row["state_ratio"] = state_bytes(compact) / state_bytes(dense)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lists", default="resnet18_cifar")
    p.add_argument("--densities", default="0.01,0.1,0.5")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--jsonl", help="append each row to this file as one JSON line, the moment it is measured")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    timed = _timer(args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    context = {"bench": "compact_state", "device": name, "torch": torch.__version__, "threads": torch.get_num_threads()}
    rows = []
    for spec in args.lists.split(","):
        for density in (float(d) for d in args.densities.split(",")):
            for algo in ("sgd", "adamw"):
                row = bench_case(spec, density, algo, args.device, args.reps, timed)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if args.jsonl:  # (method / ms / baseline fields: the gpu_check summary table's columns)
                    table = dict(method="compact", ms=row["compact_ms"], baseline="state=dense")
                    table.update(baseline_ms=row["dense_ms"], ratio_to_baseline=row["time_ratio"])
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps({**context, **row, **table}) + "\n")
    print(
        f"\nCompact vs dense optimizer state, {name}, torch {torch.__version__}, {torch.get_num_threads()} "
        "thread(s); ratios = compact / dense of the same run"
    )
    print(
        "| list | density | step | dense ms | compact ms | time ratio | dense state MiB | compact MiB | state ratio |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['list']} | {r['density']} | {r['algo']} | {r['dense_ms']:.2f} | {r['compact_ms']:.2f} | "
            f"{r['time_ratio']:.2f}x | {r['dense_state_mib']:.1f} | {r['compact_state_mib']:.1f} | "
            f"{r['state_ratio']:.3f}x |" + ("" if r["bit_identical"] else " NOT BIT-IDENTICAL")
        )


if __name__ == "__main__":
    main()
