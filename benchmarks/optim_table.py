"""Masked optimizer step benchmark: salun_ext's fused masked steps vs torch + grad.mul_(mask), same run.

    python benchmarks/optim_table.py --device cpu --lists resnet18_cifar
    python benchmarks/optim_table.py --device cuda --lists resnet18_cifar,sd15_unet --densities 0.01,0.1,0.5,0.9

Baselines: the paper code's recipe (grad.mul_(mask) with a dense float mask per parameter, then torch's
optimizer: fused where the device has it, else foreach). Reports the median step time, effective bandwidth of the
bytes a masked step must move (SGD-momentum 20.125 B/param, AdamW 28.125 B/param) as % of the copy bandwidth
measured in the same run, the speed-up over the baseline, and peak memory of the masks (1 bit vs 32 bits/param).
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
    def timed(fn, reps: int) -> float:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

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


def bench_list(spec: str, densities, device: str, reps: int, bandwidth: float, timed) -> list[dict]:
    from salun_ext.optim import MaskedAdamW, MaskedSGD

    shapes = list_shapes(spec)
    n = sum(math.prod(s) for s in shapes)
    rows = []
    for density in densities:
        params, mask = make_problem(shapes, density, device)
        named = [(str(i), p) for i, p in enumerate(params)]
        dense_masks = [mask.dense(str(i)).float() for i in range(len(params))]
        torch_kw = {"fused": True} if device == "cuda" else {"foreach": True}
        for algo in ("sgd", "adamw"):
            if algo == "sgd":
                ours = MaskedSGD(named, lr=1e-3, momentum=0.9, weight_decay=5e-4, mask=mask)
                theirs = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4, **torch_kw)
            else:
                ours = MaskedAdamW(named, lr=1e-3, weight_decay=1e-2, mask=mask)
                theirs = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, **torch_kw)

            grads = [p.grad for p in params]

            def baseline(opt=theirs, grads=grads, masks=dense_masks):
                torch._foreach_mul_(grads, masks)
                opt.step()

            for label, fn in (("salun_ext", ours.step), ("torch+mask", baseline)):
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                ms = timed(fn, reps)
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
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            del ours, theirs
        del params, mask, dense_masks
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lists", default="resnet18_cifar")
    p.add_argument("--densities", default="0.01,0.1,0.5,0.9")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    timed = _timer(args.device)
    bandwidth = copy_bandwidth(args.device, timed)
    densities = [float(d) for d in args.densities.split(",")]
    rows = []
    for spec in args.lists.split(","):
        rows += bench_list(spec, densities, args.device, args.reps, bandwidth, timed)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\nMasked optimizer step, {name}, torch {torch.__version__}, copy bandwidth {bandwidth:.0f} GB/s")
    print("| list | density | step | method | ms | GB/s | % of copy | speed-up | mask MiB |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        base = next(
            b
            for b in rows
            if b["list"] == r["list"]
            and b["density"] == r["density"]
            and b["algo"] == r["algo"]
            and b["method"] == "torch+mask"
        )
        speed = f"{base['ms'] / r['ms']:.2f}x" if r["method"] == "salun_ext" else "1.00x"
        print(
            f"| {r['list']} | {r['density']} | {r['algo']} | {r['method']} | {r['ms']:.2f} | {r['gbps']:.0f} | "
            f"{r['pct_copy']:.0f}% | {speed} | {r['mask_mib']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": name, "torch": torch.__version__, "copy_gbps": bandwidth, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
