"""Saliency-mask benchmark table: salun_ext vs the plain-PyTorch baselines, same gradients, same run.

    python benchmarks/mask_table.py --device cpu --threads 1 --lists unet686x16,synthetic:1e7:60,resnet18_cifar
    python benchmarks/mask_table.py --device cuda --lists resnet18_cifar,sd15_unet,synthetic:2e9:249

Reports the median time, its ratio to cat+topk and to cat+partition (same run), extra peak memory (CUDA:
max_memory_allocated above the gradients; CPU: peak RSS growth, each method in a fresh process) and the selected
count vs k. Baselines that cannot run (out of memory, > 2^31 elements for argsort) are reported as such.
--jsonl appends each row the moment it is measured, with the same-run baseline (cat+topk) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import baselines
from benchmarks.grad_lists import DTYPES, heavy_tailed_grads, list_shapes, numel

# salun_ext = saliency_masks' default (method="auto": the window select above 64k elements); the _histogram and
# _window rows force one path, so both are measured where it matters
SALUN_EXT_PATHS = {"salun_ext": "auto", "salun_ext_histogram": "histogram", "salun_ext_window": "window"}
METHOD_ORDER = [*SALUN_EXT_PATHS, "cat_topk", "cat_partition", "radix_bincount", "upstream_argsort"]
DEFAULT_METHODS = [
    "salun_ext",
    "salun_ext_histogram",
    "cat_topk",
    "cat_partition",
    "radix_bincount",
    "upstream_argsort",
]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _count(result) -> int:
    if isinstance(result, list):
        return sum(int(m.sum().item()) if m.dtype == torch.bool else int(m.count_nonzero().item()) for m in result)
    return result.count()


def run_method(method: str, grads, ratio: float, device: str, reps: int) -> dict:
    from salun_ext.saliency import ratio_to_k

    k = ratio_to_k(ratio, sum(g.numel() for g in grads))
    if method in SALUN_EXT_PATHS:
        import salun_ext

        def fn():
            return salun_ext.saliency_masks(grads, ratio, method=SALUN_EXT_PATHS[method])
    else:
        base_fn = baselines.METHODS[method]

        def fn():
            return base_fn(grads, k)

    row = {"method": method, "k": k}
    try:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result = fn()
        _sync(device)
        if device == "cuda":
            row["extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            row["extra_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**20
        row["selected"] = _count(result)
        row["threshold"] = getattr(result, "threshold", None)
        del result
        times = []
        for _ in range(reps):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                out = fn()
                times.append((time.perf_counter() - t0) * 1e3)
            del out
        row["ms"] = statistics.median(times)
    except (RuntimeError, MemoryError) as exc:  # OOM, argsort size limits
        row["error"] = str(exc).splitlines()[0][:100]
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def child_main(args) -> None:
    shapes = list_shapes(args.child_list)
    grads = heavy_tailed_grads(shapes, DTYPES[args.dtype], args.device)
    print(json.dumps(run_method(args.child_method, grads, args.ratio, args.device, args.reps)))


BASELINE_PREFERENCE = ("cat_topk", "radix_bincount")  # the ratio column's baseline: the first that ran


def _child_row(spec: str, method: str, args) -> dict:
    """One method in a fresh process, so peak RSS belongs to that method alone (CPU)."""
    cmd = [sys.executable, __file__, "--device", "cpu", "--dtype", args.dtype, "--ratio", str(args.ratio)]
    cmd += ["--reps", str(args.reps), "--child-list", spec, "--child-method", method]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"method": method, "error": (out.stderr.strip().splitlines() or ["failed"])[-1][:100]}


def _ordered(methods: list[str]) -> list[str]:
    """The baseline first, so every later row can carry the baseline of the same run; the rest as given (ours
    before the slow baselines, so a run cut short has measured ours)."""
    first = [m for m in BASELINE_PREFERENCE if m in methods][:1]
    return first + [m for m in methods if m not in first]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lists", default="unet686x16,synthetic:1e6:8,synthetic:1e7:60,resnet18_cifar")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"any of {', '.join(METHOD_ORDER)}")
    p.add_argument("--skip-upstream-above", type=float, default=1.5e9, help="argsort of > 2^31 elements fails")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--jsonl", help="append each row to this file as one JSON line, the moment it is measured")
    p.add_argument("--child-list", help=argparse.SUPPRESS)
    p.add_argument("--child-method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_list:
        child_main(args)
        return
    context = {"device": _device_name(args.device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    rows = []
    for spec in args.lists.split(","):
        shapes = list_shapes(spec)
        n = numel(shapes)
        grads = heavy_tailed_grads(shapes, DTYPES[args.dtype], args.device) if args.device == "cuda" else None
        baseline = None
        for method in _ordered(args.methods.split(",")):
            if method == "upstream_argsort" and n > args.skip_upstream_above:
                row = {"method": method, "error": "skipped (argsort size / memory)"}
            elif args.device == "cuda":
                row = run_method(method, grads, args.ratio, "cuda", args.reps)
            else:
                row = _child_row(spec, method, args)
            row.update(list=spec, n=n, tensors=len(shapes), dtype=args.dtype, device=args.device)
            if baseline is None and method in BASELINE_PREFERENCE and "ms" in row:
                baseline = row
            if baseline is not None and "ms" in row:
                row.update(baseline=baseline["method"], baseline_ms=baseline["ms"])
                row["ratio_to_baseline"] = row["ms"] / baseline["ms"]  # < 1: faster than the baseline
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps({"bench": "mask", **context, **row}) + "\n")
        del grads
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps({**context, "rows": rows}, indent=1))


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"


def print_table(rows, args) -> None:
    print(
        f"\nSaliency mask, ratio {args.ratio}, {args.dtype}, {_device_name(args.device)}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print("time ratios: ms / ms of the baseline in the same run (< 1 is faster)")
    print(
        "| list | N | tensors | method | ms | / cat+topk | / cat+partition | extra peak MiB | N/8 MiB | selected == k |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---|")
    by_list: dict[str, dict] = {}
    for r in rows:
        by_list.setdefault(r["list"], {})[r["method"]] = r
    for spec, methods in by_list.items():
        refs = [methods.get(b, {}).get("ms") for b in ("cat_topk", "cat_partition")]
        for name in METHOD_ORDER:
            r = methods.get(name)
            if r is None:
                continue
            if "error" in r:
                print(f"| {spec} | {r['n']:.3g} | {r['tensors']} | {name} | - | - | - | - | - | {r['error']} |")
                continue
            ratios = " | ".join(f"{r['ms'] / ref:.2f}x" if ref else "-" for ref in refs)
            exact = "yes" if r["selected"] == r["k"] else f"{r['selected']} (ties kept)"
            print(
                f"| {spec} | {r['n']:.3g} | {r['tensors']} | {name} | {r['ms']:.2f} | {ratios} | "
                f"{r['extra_mib']:.1f} | {r['n'] / 8 / 2**20:.1f} | {exact} |"
            )


if __name__ == "__main__":
    main()
