"""`salun-ext lm unlearn|evaluate`: language-model unlearning with transformers causal LMs (runs under torchrun)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from salun_ext.cli.config import add_config_flag
from salun_ext.cli.distributed_args import add_distributed_args, distributed_session


def lm_methods():
    from salun_ext.lm.methods import METHODS

    return METHODS


def register(sub) -> None:
    lm = sub.add_parser("lm", help="language-model unlearning (transformers causal LMs)")
    lm_sub = lm.add_subparsers(dest="lm_command", required=True, metavar="ACTION")

    un = lm_sub.add_parser("unlearn", help="SalUn-masked unlearning of a causal LM (GA, NPO, SimNPO, RMU, ...)")
    _data_args(un)
    un.add_argument("--out", required=True, help="output folder: model/, mask.safetensors, metrics.json, checkpoints/")
    un.add_argument("--method", choices=list(lm_methods()), default="npo")
    mask = un.add_mutually_exclusive_group()
    mask.add_argument("--mask-ratio", type=float, default=0.5, help="SalUn: fraction of weights that train (0.5)")
    mask.add_argument("--no-mask", action="store_true", help="the plain method: every weight trains")
    mask.add_argument("--mask", metavar="FILE", help="use a saved mask (.safetensors) instead of computing one")
    un.add_argument("--beta", type=float, default=None, help="NPO / SimNPO temperature (NPO 0.1, SimNPO 2.5)")
    un.add_argument("--margin", type=float, default=0.0, help="SimNPO's margin gamma (0)")
    un.add_argument(
        "--retain-loss", choices=["nll", "kl"], default="nll", help="retain term: NLL or KL(ref || theta) (nll)"
    )
    un.add_argument(
        "--kl-reference",
        choices=["cache", "copy"],
        default="cache",
        help="KL retain: the reference's log-probs cached up front (CPU memory) or a frozen model copy (device)",
    )
    _method_args(un)
    un.add_argument("--forget-weight", type=float, default=1.0, help="gamma: weight of the forget loss (1)")
    un.add_argument("--retain-weight", type=float, default=1.0, help="alpha: weight of the retain NLL (1; 0 = none)")
    un.add_argument("--lr", type=float, default=1e-5)
    un.add_argument("--weight-decay", type=float, default=0.01)
    un.add_argument("--epochs", type=int, default=5)
    un.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    un.add_argument("--warmup-steps", type=int, default=0)
    un.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0 = off)")
    un.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (saves memory)")
    un.add_argument("--saliency-batches", type=int, default=None, help="forget batches for the mask (default all)")
    un.add_argument("--seed", type=int, default=0)
    un.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints (same world size)")
    un.add_argument("--checkpoint-every", type=int, default=50, help="optimizer steps between checkpoints")
    un.add_argument("--eval", choices=["after", "both", "none"], default="after", help="evaluate after/before+after")
    un.set_defaults(handler=run_unlearn)

    ev = lm_sub.add_parser(
        "evaluate", help="forget/retain loss and perplexity, verbatim completion on forget; or TOFU / MUSE metrics"
    )
    _data_args(ev, forget_required=False)
    ev.add_argument("--out", default=None, help="write the metrics to this JSON file")
    ev.add_argument("--benchmark", choices=["tofu", "muse"], default=None, help="TOFU or MUSE metrics on --data")
    ev.add_argument("--data", default=None, help="folder of the benchmark's files (see docs/lm.md)")
    ev.add_argument("--forget-split", default="forget10", help="TOFU: reads FORGET_SPLIT_perturbed.json (forget10)")
    ev.add_argument("--retain-results", default=None, help="JSON of the retain model's truth ratios / Min-K%% AUC")
    ev.add_argument("--retain-model", default=None, help="or the retain model's folder (scored on the same files)")
    ev.add_argument(
        "--truth-ratio-mean",
        choices=["arithmetic", "geometric"],
        default="arithmetic",
        help="TOFU: mean of the perturbed answers' probs (paper) or of their log-probs (reference code)",
    )
    ev.add_argument(
        "--question-template",
        default="{question}",
        help="TOFU: the prompt of a question, e.g. '[INST] {question} [/INST]' ({question} by default)",
    )
    ev.add_argument("--max-new-tokens", type=int, default=200, help="TOFU: tokens of a greedy answer (200)")
    ev.add_argument("--verbmem-tokens", type=int, default=128, help="MUSE: tokens of a verbmem continuation")
    ev.add_argument("--knowmem-tokens", type=int, default=32, help="MUSE: tokens of a knowmem answer")
    ev.add_argument("--min-k", type=float, default=0.4, help="MUSE privleak: Min-K%% fraction (0.4)")
    ev.set_defaults(handler=run_evaluate)


def _method_args(un: argparse.ArgumentParser) -> None:
    """RMU's, the optimizer state's and the mask loss's flags of `lm unlearn`."""
    un.add_argument("--rmu-layer", type=int, default=7, help="RMU: decoder layer whose output is steered (7)")
    un.add_argument("--rmu-coeff", type=float, default=6.5, help="RMU: steering coefficient c (6.5)")
    un.add_argument(
        "--rmu-params", default=None, help="RMU: regex of the trained parameters (default layers l-2..l down_proj)"
    )
    un.add_argument(
        "--optimizer-state",
        choices=["dense", "compact"],
        default="dense",
        help="compact: AdamW moments for the salient entries only (at mask ratio 0.1, 10%% of the dense state; "
        "the same trajectory bit for bit)",
    )
    un.add_argument(
        "--saliency-loss",
        choices=["nll", "method"],
        default="nll",
        help="SalUn mask from the forget NLL (default) or from the method's own forget loss",
    )


def _data_args(p: argparse.ArgumentParser, *, forget_required: bool = True) -> None:
    add_config_flag(p)
    p.add_argument("--model", required=True, help="local model folder (save_pretrained layout) or hub id")
    p.add_argument(
        "--forget",
        required=forget_required,
        help="forget set: .jsonl / .json records or a text file (a line each)",
    )
    p.add_argument("--retain", default=None, help="retain set (same formats)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256, help="tokens per example (truncated)")
    p.add_argument(
        "--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto", help="weights (auto: bf16 on GPU)"
    )
    p.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast (for fp32 weights)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="verbatim check: context tokens of plain texts")
    p.add_argument("--completion-tokens", type=int, default=32, help="verbatim check: tokens to complete")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    add_distributed_args(p)


def _source(args) -> Any:
    from salun_ext.lm.workflows import TextSource

    return TextSource(
        args.model,
        args.forget,
        args.retain,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        gradient_checkpointing=getattr(args, "gradient_checkpointing", False),
    )


def _evaluation(args) -> Any:
    from salun_ext.lm.workflows import Evaluation

    return Evaluation(args.eval_batch_size, args.max_length, args.amp, args.prompt_tokens, args.completion_tokens)


def _print_metrics(title: str, metrics: dict) -> None:
    from salun_ext.distributed import main_print

    main_print(title)
    for split in ("forget", "retain"):
        if split in metrics:
            m = metrics[split]
            main_print(f"  {split:<7} loss {m['loss']:.4f}  perplexity {m['perplexity']:.2f}  ({m['tokens']} tokens)")
    v = metrics["forget_verbatim"]
    main_print(
        f"  verbatim completion on forget: exact match {v['exact_match']:.3f}, token accuracy "
        f"{v['token_accuracy']:.3f} ({v['examples']} examples)"
    )


def _config(args):
    from salun_ext.lm import LMUnlearnConfig

    return LMUnlearnConfig(
        method=args.method,
        mask_ratio=None if (args.no_mask or args.mask) else args.mask_ratio,
        beta=args.beta,
        forget_weight=args.forget_weight,
        retain_weight=args.retain_weight,
        lr=args.lr,
        weight_decay=args.weight_decay,
        epochs=None if args.max_steps is not None and args.epochs is None else args.epochs,
        max_steps=args.max_steps,
        warmup_steps=args.warmup_steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        grad_clip=args.grad_clip or None,
        saliency_batches=args.saliency_batches,
        saliency_loss=args.saliency_loss,
        retain_loss=args.retain_loss,
        kl_reference=args.kl_reference,
        margin=args.margin,
        rmu_layer=args.rmu_layer,
        rmu_coeff=args.rmu_coeff,
        rmu_params=args.rmu_params,
        optimizer_state=args.optimizer_state,
    )


def run_unlearn(args: argparse.Namespace) -> int:
    from salun_ext.distributed import main_print
    from salun_ext.lm.workflows import unlearn_folder
    from salun_ext.train import RunOptions

    with distributed_session(args) as ctx:
        options = RunOptions(
            device=str(ctx.device),
            seed=args.seed,
            amp=args.amp,
            checkpoint_dir=os.path.join(args.out, "checkpoints"),
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            progress=not args.no_progress,
            distributed=ctx.engine_mode,
        )
        unlearn_folder(
            _source(args),
            _config(args),
            options,
            args.out,
            evaluation=_evaluation(args),
            mask_file=args.mask,
            evaluate=args.eval,
            ctx=ctx,
            report=_print_metrics,
        )
        main_print(f"unlearned model, mask and metrics written to {args.out}")
    return 0


def _print_benchmark(metrics: dict) -> None:
    from salun_ext.distributed import main_print

    main_print(f"{metrics['model']} on {metrics['benchmark']} ({metrics['data']}):")
    for key, value in metrics.items():
        if isinstance(value, dict):
            shown = {k: v for k, v in value.items() if isinstance(v, (int, float)) or v is None}
            main_print(
                f"  {key:<16} " + "  ".join(f"{k} {v:.4g}" if v is not None else f"{k} -" for k, v in shown.items())
            )
        elif key in ("forget_quality", "model_utility"):
            main_print(f"  {key:<16} {value:.4g}" if value is not None else f"  {key:<16} - (not computed)")


def run_evaluate(args: argparse.Namespace) -> int:
    from salun_ext.lm.workflows import evaluate_texts
    from salun_ext.utils import UsageError, write_json

    if args.benchmark:
        return _run_benchmark(args)
    if not args.forget:
        raise UsageError("lm evaluate: give --forget (loss / verbatim evaluation) or --benchmark tofu|muse --data DIR")
    with distributed_session(args) as ctx:
        model, tokenizer, forget, retain = _source(args).load(ctx.device)
        metrics = evaluate_texts(model, tokenizer, forget, retain, _evaluation(args))
        _print_metrics(f"{args.model}:", metrics)
        if args.out and ctx.is_main:
            write_json(metrics, args.out)
    return 0


def _run_benchmark(args: argparse.Namespace) -> int:
    from salun_ext.lm.benchmarks import BenchmarkOptions
    from salun_ext.lm.workflows import BenchmarkSpec, evaluate_benchmark
    from salun_ext.utils import UsageError, write_json

    if not args.data:
        raise UsageError(f"--benchmark {args.benchmark} needs --data DIR (the benchmark's files)")
    options = BenchmarkOptions(
        batch_size=args.eval_batch_size,
        max_length=args.max_length,
        amp=args.amp,
        max_new_tokens=args.max_new_tokens,
        perturbed_mean=args.truth_ratio_mean,
        verbmem_tokens=args.verbmem_tokens,
        knowmem_tokens=args.knowmem_tokens,
        min_k=args.min_k,
        question_template=args.question_template,
    )
    spec = BenchmarkSpec(
        args.benchmark, args.data, args.forget_split, args.retain_results, args.retain_model, options=options
    )
    with distributed_session(args) as ctx:  # every rank scores everything; rank 0 writes
        metrics = evaluate_benchmark(
            args.model, spec, device=ctx.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code
        )
        _print_benchmark(metrics)
        if args.out and ctx.is_main:
            write_json(metrics, args.out)
    return 0
