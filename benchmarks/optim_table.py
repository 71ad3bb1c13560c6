"""Masked optimizer step benchmark: salun_ext's fused masked steps vs torch + grad.mul_(mask), same run.

    python benchmarks/optim_table.py --device cpu --threads 1 --lists unet686x16,resnet18_cifar
    python benchmarks/optim_table.py --device cuda --lists resnet18_cifar,sd15_unet --densities 0.01,0.1,0.5,0.9

Baselines, same parameters, same run: the paper code's recipe, grad.mul_(mask) with a dense float mask per
parameter (one torch._foreach_mul_), then torch's own optimizer: fused (`fused=True`, the speed-up column's
reference, CPU and CUDA) and foreach. Reports the median step time, effective bandwidth of the bytes a masked step
must move (SGD-momentum 20.125 B/param, AdamW 28.125 B/param) as % of the copy bandwidth measured in the same run,
the ratio to the fused baseline, and the memory of the masks (1 bit vs 32 bits/param). `unet686x16` (686 tensors
of 16 elements) measures what a step costs besides moving bytes. --jsonl appends each row the moment it exists.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.grad_lists import list_shapes

BYTES_PER_PARAM = {"sgd": 20.125, "adamw": 28.125}


def _timer(device: str):
    def once(fn) -> float:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def timed(fns, reps: int):
        """Median ms of fn, or {name: median ms} of a dict of them timed round robin (fn1, fn2, ..., fn1, ...):
        every method sees the same moments of a busy machine, so their ratio is fair even when the load moves."""
        many = isinstance(fns, dict)
        fns = fns if many else {"": fns}
        for fn in fns.values():
            for _ in range(3):  # warm-up: lazy state, the masked optimizers' cached lists
                fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times: dict = {name: [] for name in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                times[name].append(once(fn))
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        return medians if many else medians[""]

    return timed


def copy_bandwidth(device: str, timed) -> float:
    n = 2**28 if device == "cuda" else 2**24
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), 10)
    return 2 * 4 * n / (ms * 1e-3) / 1e9


def make_problem(shapes, density: float, device: str, seed: int = 0):
    import salun_ext

    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device)
    scores = {str(i): torch.rand(p.shape, generator=gen, device=device) for i, p in enumerate(params)}
    mask = salun_ext.saliency_masks(scores, density)
    return params, mask


BASELINES = {"torch_fused+mask": {"fused": True}, "torch_foreach+mask": {"foreach": True}}
REFERENCE = "torch_fused+mask"  # the speed-up column's baseline


def optimizers(algo: str, params, named, mask) -> dict:
    """method -> optimizer over the same parameters: ours and torch's (fused, foreach)."""
    from salun_ext.optim import MaskedAdamW, MaskedSGD

    if algo == "sgd":
        out = {"salun_ext": MaskedSGD(named, lr=1e-3, momentum=0.9, weight_decay=5e-4, mask=mask)}
        for label, kw in BASELINES.items():
            out[label] = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4, **kw)
    else:
        out = {"salun_ext": MaskedAdamW(named, lr=1e-3, weight_decay=1e-2, mask=mask)}
        for label, kw in BASELINES.items():
            out[label] = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, **kw)
    return out


def bench_list(spec: str, densities, device: str, reps: int, bandwidth: float, timed, emit=None) -> list[dict]:
    shapes = list_shapes(spec)
    n = sum(math.prod(s) for s in shapes)
    rows = []
    for density in densities:
        params, mask = make_problem(shapes, density, device)
        named = [(str(i), p) for i, p in enumerate(params)]
        dense_masks = [mask.dense(str(i)).float() for i in range(len(params))]
        grads = [p.grad for p in params]
        for algo in ("sgd", "adamw"):
            steps = {}
            for label, opt in optimizers(algo, params, named, mask).items():
                if label == "salun_ext":
                    steps[label] = opt.step
                else:

                    def baseline(opt=opt, grads=grads, masks=dense_masks):
                        torch._foreach_mul_(grads, masks)  # the paper code's grad *= mask
                        opt.step()

                    steps[label] = baseline
            medians = timed(steps, reps)
            reference_ms = medians[REFERENCE]
            for label in (REFERENCE, *[m for m in steps if m != REFERENCE]):
                ms = medians[label]
                row = dict(
                    list=spec,
                    n=n,
                    tensors=len(shapes),
                    density=density,
                    algo=algo,
                    method=label,
                    ms=ms,
                    gbps=BYTES_PER_PARAM[algo] * n / (ms * 1e-3) / 1e9,
                )
                row["pct_copy"] = 100 * row["gbps"] / bandwidth
                row["mask_mib"] = (mask.words.numel() * 4 if label == "salun_ext" else 4 * n) / 2**20
                row["baseline"], row["baseline_ms"] = REFERENCE, reference_ms
                row["ratio_to_baseline"] = ms / reference_ms  # < 1: faster than torch fused + mask
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if emit is not None:
                    emit(row)
            del steps
        del params, mask, dense_masks, grads
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lists", default="unet686x16,resnet18_cifar")
    p.add_argument("--densities", default="0.01,0.1,0.5,0.9")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--jsonl", help="append each row to this file as one JSON line, the moment it is measured")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    timed = _timer(args.device)
    bandwidth = copy_bandwidth(args.device, timed)
    densities = [float(d) for d in args.densities.split(",")]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    context = {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(), "copy_gbps": bandwidth}
    emit = None
    if args.jsonl:

        def emit(row):
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({"bench": "optim", **context, **row}) + "\n")

    rows = []
    for spec in args.lists.split(","):
        rows += bench_list(spec, densities, args.device, args.reps, bandwidth, timed, emit)
    print(
        f"\nMasked optimizer step, {name}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"copy bandwidth {bandwidth:.0f} GB/s; ratio = ms / ms of torch fused + mask (same run; < 1 is faster)"
    )
    print("| list | density | step | method | ms | GB/s | % of copy | ratio to fused+mask | mask MiB |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['list']} | {r['density']} | {r['algo']} | {r['method']} | {r['ms']:.3f} | {r['gbps']:.1f} | "
            f"{r['pct_copy']:.0f}% | {r['ratio_to_baseline']:.2f}x | {r['mask_mib']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({**context, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
