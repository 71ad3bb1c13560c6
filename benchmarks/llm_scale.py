"""Large-model unlearning on one GPU: a 7B-class Llama built from its config (random weights, nothing downloaded).

    python benchmarks/llm_scale.py --jsonl results.jsonl     # GPU: the Llama-2-7B shape (6.74B), bf16, checkpointing
    python benchmarks/llm_scale.py --tiny --device cpu       # rehearsal of this script on a tiny Llama

One process, one model, one forget batch (random tokens) throughout:
1. the SalUn mask: one backward of the forget loss (gradient ascent's -NLL), then the exact global top --ratio
   mask over every parameter (`salun_ext.saliency_masks`, bf16 gradients): its time and the memory it allocates
   above the gradients;
2. full unlearning steps (forward + backward + optimizer step, gradient checkpointing) with the mask through
   MaskedAdamW in each optimizer-state layout ("compact": moments for the salient entries only; "dense": moments
   the size of the model), beside torch's fused AdamW (dense state, no mask: the
   strongest baseline) in the same run: optimizer-state bytes, median step time over --reps after a warm-up, and
   the peak memory of each variant (reset between variants; the previous variant's state is freed first).
Issue 15's figure: the compact-state step fits 40 GB. Every row is appended to --jsonl the moment it is measured.
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
from benchmarks.compact_state import state_bytes

LLAMA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=32000, max_position_embeddings=4096,
)  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    vocab_size=512, max_position_embeddings=256,
)  # fmt: skip
GIB = 2**30


def build_model(args, device: torch.device):
    """The Llama in bf16 straight on `device` (no fp32 copy of 27 GB first), gradient checkpointing on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(TINY if args.tiny else LLAMA_7B), use_cache=False)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # the newer name where transformers has it
    model.train()
    return model


def forget_batch(args, vocab: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_reset(device: torch.device) -> int:
    """Reset the peak counter; the bytes allocated now (0 on the CPU, where nothing is tracked)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def forget_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on the forget batch: -NLL (the sign does not change memory or time)."""
    return -model(input_ids=ids, labels=ids).loss


def measure_mask(model, ids, args, device) -> tuple[object, dict]:
    from salun_ext import saliency_masks

    forget_loss(model, ids).backward()
    grads = [(n, p.grad.abs_()) for n, p in model.named_parameters()]
    base = peak_reset(device)
    t = time.perf_counter()
    mask = saliency_masks(grads, args.ratio)
    sync(device)
    seconds = time.perf_counter() - t
    top = peak(device)
    model.zero_grad(set_to_none=True)
    numel = sum(g.numel() for _, g in grads)
    row = {"case": "mask", "algo": "mask", "density": args.ratio, "method": "salun_ext", "numel": numel,
           "selected": mask.count(), "ms": seconds * 1e3, "mask_bytes": mask.words.numel() * 4,
           "extra_bytes": None if top is None else top - base}  # fmt: skip
    return mask, row


def make_optimizer(model, variant: str, mask, lr: float):
    from salun_ext.optim import MaskedAdamW

    if variant == "torch_fused":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    return MaskedAdamW(list(model.named_parameters()), lr=lr, weight_decay=0.0, mask=mask, state=variant)


def measure_step(model, ids, mask, variant: str, args, device) -> dict:
    """Median time of a whole unlearning step and the variant's peak memory (its state freed afterwards)."""
    base = peak_reset(device)
    optimizer = make_optimizer(model, variant, mask, args.lr)
    times = []
    for i in range(args.reps + 1):  # the first step allocates the state: a warm-up, not timed
        sync(device)
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        forget_loss(model, ids).backward()
        optimizer.step()
        sync(device)
        if i:
            times.append((time.perf_counter() - t) * 1e3)
    row = {"case": "step", "algo": "adamw_step", "density": args.ratio, "method": variant,
           "ms": statistics.median(times), "state_bytes": state_bytes(optimizer), "peak_bytes": peak(device),
           "base_bytes": base}  # fmt: skip
    optimizer.zero_grad(set_to_none=True)
    optimizer.state.clear()
    del optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def emit(row: dict, args, context: dict) -> dict:
    row = {"bench": "llm_scale", "list": context["model"], **context, **row}
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny Llama (rehearsal of this script)")
    p.add_argument("--ratio", type=float, default=0.1, help="mask density (issue 15's figure: 0.1)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--variants", default=None, help="comma list of compact,dense,torch_fused (default: all three)")
    p.add_argument("--jsonl", default=None, help="append each row here as one JSON line, the moment it is measured")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny --device cpu to rehearse")
    model = build_model(args, device)
    context = {"model": "tiny-llama" if args.tiny else "llama-7b-config", "device": _device_name(device),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime()), "seq": args.seq,
               "batch": args.batch}  # fmt: skip
    ids = forget_batch(args, model.config.vocab_size, device)
    mask, mask_row = measure_mask(model, ids, args, device)
    rows = [emit(mask_row, args, context)]
    variants = args.variants.split(",") if args.variants else ["torch_fused", "compact", "dense"]
    baseline = None  # the fused AdamW row, measured first so that every masked row carries it
    for variant in variants:
        row = measure_step(model, ids, mask, variant, args, device)
        if variant == "torch_fused":
            baseline = row["ms"]
        elif baseline is not None:
            row.update(baseline="torch_fused", baseline_ms=baseline, ratio_to_baseline=row["ms"] / baseline)
        rows.append(emit(row, args, context))
    _print(rows)
    return rows


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _print(rows: list[dict]) -> None:
    mask = rows[0]
    print(f"{mask['model']} on {mask['device']}: {mask['numel'] / 1e6:.1f}M parameters, mask density "
          f"{mask['density']}: {mask['ms']:.1f} ms, {mask['selected']} selected")  # fmt: skip
    for r in rows[1:]:
        top = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / GIB:.1f} GiB"
        ratio = f" ({r['ratio_to_baseline']:.2f}x fused AdamW)" if "ratio_to_baseline" in r else ""
        print(f"  {r['method']:12s} step {r['ms']:9.1f} ms{ratio}  state {r['state_bytes'] / GIB:7.3f} GiB  "
              f"peak {top}")  # fmt: skip


if __name__ == "__main__":
    main()
