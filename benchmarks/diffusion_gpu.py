"""GPU figures of generation unlearning on an SD-sized UNet (859.5M parameters, SD v1.x config, random weights).

    python benchmarks/diffusion_gpu.py                       # on a GPU: the SD v1.4 UNet, bf16 autocast
    python benchmarks/diffusion_gpu.py --tiny --device cpu   # smoke test of this script with a tiny UNet

Measures, in one process, on the same model:
1. selection + mask: `saliency_masks(grads, 0.5)` right after a SalUn mask gradient pass (median of --reps, CUDA
   events), and the extra memory it allocates above the gradients (target: <= 5 ms, <= 1 bit/param + 64 MiB);
2. a SalUn unlearning step (forget: eps(x_t|c_f) vs sg(eps(x_t|c')), retain: eps-MSE, batch --batch of 64x64
   latents, fp32 master weights under bf16 autocast, Adam) with the mask vs the same step without one (target:
   within 5%); also torch.optim.Adam(fused=True) for reference;
3. the peak memory of that step (target: fits a 40 GB card), with and without gradient checkpointing.
No weights are downloaded: the UNet is built from its config; the text embeddings are random (77 x 768).
Prints a table and writes --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn, reps: int, warmup: int = 1) -> list[float]:
        """Milliseconds per call."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return times


def build(args, device):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from salun_ext.diffusion.core import DiffusionSet, DiffusionSpec, PromptConditioner
    from salun_ext.testing.diffusion import SD_V1_UNET, TINY_SD_UNET

    torch.manual_seed(0)
    config = TINY_SD_UNET if args.tiny else SD_V1_UNET
    unet = UNet2DConditionModel(**config).to(device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    width = config["cross_attention_dim"]
    prompts = ["", "a photo of a nude person", "a photo of a person wearing clothes"]
    cond = PromptConditioner(torch.randn(3, 77, width, device=device), prompts)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    spec = DiffusionSpec(cond, scheduler)
    size = config["sample_size"]
    n = max(2 * args.batch, 16)
    moments = torch.randn(n, 8, size, size)
    forget = DiffusionSet(moments, torch.full((n,), 1), torch.full((n,), 2), latent_scale=0.18215)
    retain = DiffusionSet(moments.clone(), torch.full((n,), 2), latent_scale=0.18215)
    return unet, spec, forget, retain


def measure_mask(unet, spec, forget, args, timer, device) -> dict:
    """Selection + mask time and extra memory after one SalUn mask gradient pass."""
    from salun_ext import saliency_masks
    from salun_ext.diffusion.saliency import guided_forget_loss, saliency_batches

    batch = next(saliency_batches(spec, forget, batch_size=args.batch, seed=0, device=device))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
        loss = guided_forget_loss(spec, 8.5)(unet, batch)
    loss.backward()
    grads = [(n, p.grad.abs_()) for n, p in unet.named_parameters()]
    numel = sum(g.numel() for _, g in grads)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    holder = {}

    def select():
        holder["mask"] = saliency_masks(grads, 0.5)

    times = timer(select, args.reps)
    extra = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else None
    unet.zero_grad(set_to_none=True)
    mask = holder["mask"]
    return {
        "numel": numel,
        "select_mask_ms_median": statistics.median(times),
        "select_mask_ms_min": min(times),
        "extra_bytes": extra,
        "mask_bytes": mask.words.numel() * 4,
        "bits_per_param": mask.words.numel() * 32 / numel,
        "target_ms": 5.0,
        "target_extra_bytes": numel / 8 + 64 * 2**20,
        "mask": mask,
    }


def measure_step(unet, spec, forget, retain, mask, args, timer, device, optimizer: str) -> dict:
    """A SalUn step on the Engine: with the mask (MaskedAdam), without (MaskedAdam, mask=None), or fused Adam."""
    from salun_ext.diffusion.tasks import SalUnTask
    from salun_ext.train import RunOptions, TrainRecipe, engine_config
    from salun_ext.train.engine import Engine, OptimConfig

    task = SalUnTask(
        spec, forget, retain, alpha=0.1, batch_size=args.batch, retain_cond_drop=0.0, retain_reduction="mean"
    )
    recipe = TrainRecipe(max_steps=10**9, optimizer=OptimConfig("adam", lr=1e-5, weight_decay=0.0))
    config = engine_config(recipe, RunOptions(device=str(device), amp=args.amp, progress=False))
    # the Engine itself (not train.fit): the benchmark times single train_step calls, not a whole fit
    engine = Engine(unet, config, mask=mask if optimizer == "masked" else None)
    if optimizer == "torch_fused":
        engine.optimizer = torch.optim.Adam(unet.parameters(), lr=1e-5, fused=device.type == "cuda")
    engine.scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda _: 1.0)
    batches = list(task.batches(0))
    it = iter(range(10**9))

    def step():
        engine.train_step(task, batches[next(it) % len(batches)])

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = timer(step, args.reps, warmup=2)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    engine.optimizer.state.clear()  # free the Adam moments before the next variant allocates its own
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"step_ms_median": statistics.median(times), "step_ms_min": min(times), "peak_bytes": peak}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny UNet (CPU smoke test of this script)")
    p.add_argument("--batch", type=int, default=8, help="latents per forget / retain batch (paper: 8)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--amp", choices=["bf16", "none"], default="bf16")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny --device cpu for a smoke test")
    timer = Timer(device)
    unet, spec, forget, retain = build(args, device)
    mask_row = measure_mask(unet, spec, forget, args, timer, device)
    mask = mask_row.pop("mask")
    rows = {
        name: measure_step(unet, spec, forget, retain, mask, args, timer, device, name)
        for name in ("unmasked", "masked", "torch_fused")
    }
    overhead = rows["masked"]["step_ms_median"] / rows["unmasked"]["step_ms_median"] - 1
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "unet": "tiny" if args.tiny else "SD v1.4 config (random init)",
        "batch": args.batch,
        "amp": args.amp,
        "gradient_checkpointing": args.gradient_checkpointing,
        "mask": mask_row,
        "steps": rows,
        "masked_step_overhead": overhead,
        "targets": {
            "select_mask_<=5ms": mask_row["select_mask_ms_median"] <= 5.0,
            "extra_memory_<=1bit+64MiB": None
            if mask_row["extra_bytes"] is None
            else mask_row["extra_bytes"] <= mask_row["target_extra_bytes"],
            "masked_step_within_5%": overhead <= 0.05,
            "peak_<=40GB": None if rows["masked"]["peak_bytes"] is None else rows["masked"]["peak_bytes"] <= 40e9,
        },
    }
    gib = 2**30
    print(
        f"{result['unet']}: {mask_row['numel'] / 1e6:.1f}M params on {result['device']}, batch {args.batch}, "
        f"amp {args.amp}, checkpointing {args.gradient_checkpointing}"
    )
    extra = "n/a" if mask_row["extra_bytes"] is None else f"{mask_row['extra_bytes'] / 2**20:.1f} MiB"
    print(
        f"select + mask: {mask_row['select_mask_ms_median']:.2f} ms (extra memory {extra}, "
        f"{mask_row['bits_per_param']:.3f} bit/param)"
    )
    for name, row in rows.items():
        peak = "n/a" if row["peak_bytes"] is None else f"{row['peak_bytes'] / gib:.2f} GiB"
        print(f"SalUn step, {name:12s}: {row['step_ms_median']:9.2f} ms (peak {peak})")
    print(f"masked step overhead: {100 * overhead:+.2f}%   targets: {result['targets']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
