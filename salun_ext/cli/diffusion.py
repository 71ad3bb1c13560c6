"""`salun-ext diffusion train|mask|unlearn|sample|evaluate|demo`: generation unlearning from the shell.

Argparse and printing only: every subcommand calls one function of salun_ext.diffusion.workflows (or the demo),
and the library raises UsageError for bad input (cli.main turns it into one line and exit status 2). The --method
choices come from salun_ext.diffusion.methods.METHODS. Every subcommand takes --config FILE.

A class-conditional DDPM is a folder (`--model DIR`, written by `train`); Stable Diffusion is a diffusers pipeline
folder or hub id (`--pipeline SRC`). Examples:

    salun-ext diffusion train --dataset digits --epochs 40 --out runs/ddpm
    salun-ext diffusion mask --model runs/ddpm --forget-class 3 --out runs/mask.safetensors
    salun-ext diffusion unlearn --method salun --model runs/ddpm --forget-class 3 --mask runs/mask.safetensors \\
        --out runs/ddpm-salun
    salun-ext diffusion evaluate --model runs/ddpm-salun --reference runs/ddpm --forget-class 3 --out runs/eval
    salun-ext diffusion unlearn --method salun --pipeline CompVis/stable-diffusion-v1-4 --concept nudity \\
        --data-dir runs/nsfw-data --mask runs/sd-mask.safetensors --out runs/sd-salun
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from salun_ext.cli.config import add_config_flag
from salun_ext.cli.distributed_args import add_distributed_args, distributed_session, single_process_only


def _method_names() -> list[str]:
    from salun_ext.diffusion.methods import METHODS

    return list(METHODS)


def register(sub) -> None:
    p = sub.add_parser("diffusion", help="generation unlearning: class-conditional DDPM and Stable Diffusion")
    cmds = p.add_subparsers(dest="diffusion_command", required=True, metavar="SUBCOMMAND")
    for add in (_add_train, _add_mask, _add_unlearn, _add_sample, _add_evaluate, _add_demo):
        add(cmds)


# ---------------------------------------------------------------------------------------------------- parsers


def _add_train(cmds) -> None:
    train = _subcommand(cmds, "train", "train a class-conditional DDPM (the original model, or Retrain)", run_train)
    _dataset(train)
    train.add_argument("--preset", default="tiny", help="architecture: tiny | fashion_mnist | cifar10 (default tiny)")
    train.add_argument("--image-size", type=int, default=None, help="resize images to this size (default: preset)")
    train.add_argument("--epochs", type=int, default=40)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--exclude-classes", nargs="*", default=[], help="train without these classes (Retrain)")
    train.add_argument("--subset", type=int, default=None, help="train on N random examples only (quick runs)")
    train.add_argument("--out", required=True, help="output model folder")
    _checkpointing(train)
    add_distributed_args(train)


def _add_mask(cmds) -> None:
    mask = _subcommand(cmds, "mask", "SalUn saliency mask of the forget set's guided noise-prediction loss", run_mask)
    _model_source(mask)
    _forget_data(mask)
    mask.add_argument("--ratio", type=float, nargs="+", default=[0.5], help="salient fraction(s) (default 0.5)")
    mask.add_argument("--guidance", type=float, default=None, help="guidance s (default: DDPM 3.0, SD 8.5)")
    mask.add_argument("--batch-size", type=int, default=None, help="default: DDPM 128, SD 8")
    _protocol_flag(mask)
    mask.add_argument("--out", required=True, help="mask file (.safetensors); several ratios: {ratio} in the name")
    add_distributed_args(mask)
    _fsdp_flag(mask, "(the mask file is the same)")


def _add_unlearn(cmds) -> None:
    un = _subcommand(cmds, "unlearn", "unlearn with SalUn or a baseline (GA, ESD-x/-u, FMN, Retrain)", run_unlearn)
    _model_source(un)
    _forget_data(un)
    un.add_argument("--method", required=True, choices=_method_names())
    un.add_argument("--mask", default=None, help="a SaliencyMask file over the UNet (SalUn; optional for others)")
    un.add_argument("--setting", default=None, help="recipe: ddpm | sd | sd-nsfw (default from the model)")
    un.add_argument("--alpha", type=float, default=None, help="SalUn / GA: weight of the retain loss")
    un.add_argument("--lr", type=float, default=None)
    un.add_argument("--steps", type=int, default=None, help="optimizer steps (replaces the recipe's budget)")
    un.add_argument("--epochs", type=int, default=None, help="epochs over the forget set")
    un.add_argument("--batch-size", type=int, default=None)
    un.add_argument("--eta", type=float, default=None, help="ESD: negative guidance strength")
    un.add_argument("--amp", choices=["none", "bf16", "fp16"], default=None)
    un.add_argument("--fmn-concept", default=None, help="FMN: the concept's words inside the forget prompt")
    _protocol_flag(un)
    un.add_argument("--out", required=True, help="output folder (DDPM folder or SD pipeline folder)")
    _checkpointing(un)
    add_distributed_args(un)
    _fsdp_flag(un, "(methods salun, ga)")


def _protocol_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--protocol",
        choices=["default", "paper"],
        default="default",
        help="'paper': the paper code's recipes (GA's retain term, the summed DDPM mask loss, FMN's pooler columns)",
    )


def _add_sample(cmds) -> None:
    sample = _subcommand(cmds, "sample", "generate images (a PNG grid, optionally the single images)", run_sample)
    _model_source(sample)
    sample.add_argument("--classes", nargs="*", default=None, help="DDPM: classes to sample (default: all)")
    sample.add_argument("--prompt", nargs="*", default=None, help="SD: prompts")
    sample.add_argument("--n", type=int, default=8, help="images per class / prompt")
    sample.add_argument("--guidance", type=float, default=None, help="guidance s (default: DDPM 3.0, SD 7.5)")
    sample.add_argument("--steps", type=int, default=50, help="sampling steps")
    sample.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim", help="DDPM sampler")
    sample.add_argument("--out", required=True, help="grid PNG")
    sample.add_argument("--images-dir", default=None, help="also write every image here")


def _add_evaluate(cmds) -> None:
    ev = _subcommand(cmds, "evaluate", "UA / other-class accuracy / Fréchet distance, or I2P nudity", run_evaluate)
    _model_source(ev)
    _dataset(ev)
    ev.add_argument("--forget-class", nargs="*", default=[], help="DDPM: the forgotten class(es)")
    ev.add_argument("--reference", default=None, help="DDPM: the original model folder (before/after grid)")
    ev.add_argument("--classifier", default=None, help="DDPM: scoring classifier state_dict (default: train)")
    ev.add_argument("--classifier-epochs", type=int, default=30, help="DDPM: epochs of the trained classifier")
    ev.add_argument("--n-per-class", type=int, default=100)
    ev.add_argument("--guidance", type=float, default=None, help="guidance s (default: DDPM 3.0, SD 7.5)")
    ev.add_argument("--steps", type=int, default=None, help="sampling steps (default: DDPM 50; SD the protocol's)")
    ev.add_argument("--inception-weights", default=None, help="torch-fidelity Inception weights for FID")
    ev.add_argument("--i2p", default=None, help="SD: I2P prompt CSV (NudeNet nudity evaluation)")
    ev.add_argument("--categories", nargs="*", default=["sexual"], help="SD: I2P categories")
    ev.add_argument("--limit", type=int, default=None, help="SD: first N I2P prompts only")
    ev.add_argument("--threshold", type=float, default=0.6, help="SD: NudeNet score threshold (0.75: UnlearnDiffAtk's)")
    ev.add_argument("--i2p-protocol", choices=["prompt", "paper"], default="prompt",
                    help="SD: one image per prompt with its seed/guidance, or the paper code's (7.5, LMS, 100 steps)")
    ev.add_argument("--images-per-prompt", type=int, default=None, help="SD: images per I2P prompt (protocol's)")
    ev.add_argument("--classifier-arch", default=None, help="SD class-wise: torchvision model (resnet50)")
    ev.add_argument("--classifier-weights", default=None, help="SD class-wise: its state_dict file")
    ev.add_argument("--classes", nargs="*", default=None, help="SD class-wise: class names (default: Imagenette's ten)")
    ev.add_argument("--out", required=True, help="output folder (results.json, grids)")


def _add_demo(cmds) -> None:
    demo = _subcommand(cmds, "demo", "train a DDPM on digits, forget a class with SalUn, report UA (CPU minutes)",
                       run_demo)  # fmt: skip
    demo.add_argument("--dataset", default="digits")
    demo.add_argument("--forget-class", default="3")
    demo.add_argument("--train-epochs", type=int, default=None)
    demo.add_argument("--unlearn-steps", type=int, default=None)
    demo.add_argument("--n-per-class", type=int, default=None)
    demo.add_argument("--alpha", type=float, default=None, help="SalUn retain weight (default: 1e-3 * 3072 / CHW)")
    demo.add_argument("--no-reuse", action="store_true", help="retrain even if the output folder has a model")
    demo.add_argument("--out", required=True)


def _subcommand(cmds, name: str, help_text: str, handler) -> argparse.ArgumentParser:
    p = cmds.add_parser(name, help=help_text)
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_flag(p)
    p.set_defaults(handler=handler)
    return p


def _dataset(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None, help="digits | fashion_mnist | ... (salun_ext.data)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the loader's own)")


def _model_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="class-conditional DDPM folder")
    src.add_argument("--pipeline", help="Stable Diffusion: diffusers pipeline folder or hub id")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="SD: frozen components' dtype")
    p.add_argument("--gradient-checkpointing", action="store_true", help="SD: trade compute for memory")
    p.add_argument("--attention-slicing", action="store_true", help="SD: sliced attention (less memory)")


def _forget_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None, help="DDPM: training dataset (default: the model's)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--forget-class", nargs="*", default=[], help="DDPM / SD class-wise: class(es) to forget")
    p.add_argument("--target", choices=["next", "random"], default="next", help="DDPM: c' = next class or random")
    p.add_argument("--concept", default=None, help="SD: a named concept (nudity)")
    p.add_argument("--forget-prompt", default=None, help="SD: prompt of the forget images")
    p.add_argument("--retain-prompt", default=None, help="SD: prompt of the retain images (also c')")
    p.add_argument("--forget-images", default=None, help="SD: forget image folder (default: generate)")
    p.add_argument("--retain-images", default=None, help="SD: retain image folder (default: generate)")
    p.add_argument("--class-root", default=None, help="SD class-wise: root/<class>/ image folders")
    p.add_argument("--num-images", type=int, default=800, help="SD: images per prompt / class (default 800)")
    p.add_argument("--data-dir", default=None, help="SD: where generated forget/retain images are kept")


def _checkpointing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint-dir", default=None, help="write engine checkpoints here")
    p.add_argument("--checkpoint-every", type=int, default=1, help="epochs (or steps for step-bounded runs)")
    p.add_argument("--resume", action="store_true", help="resume from --checkpoint-dir")


def _fsdp_flag(p: argparse.ArgumentParser, note: str) -> None:
    p.add_argument(
        "--fsdp",
        action="store_true",
        help=f"under torchrun (2+ processes): shard the UNet with FSDP2 instead of whole replicas {note}",
    )


# ---------------------------------------------------------------------------------------------------- arguments


def _fields(cls, args: argparse.Namespace, **renamed):
    """`cls` (a dataclass) from the parsed options of the same names (or renamed: field=value)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **renamed})


def _options(args: argparse.Namespace, ctx=None):
    from salun_ext.train import RunOptions

    return RunOptions(
        device=str(ctx.device) if ctx is not None else args.device,
        seed=args.seed,
        amp=getattr(args, "amp", None),
        checkpoint_dir=getattr(args, "checkpoint_dir", None),
        checkpoint_every=getattr(args, "checkpoint_every", 1),
        resume=getattr(args, "resume", False),
        progress=not args.no_progress,
        distributed="fsdp" if getattr(args, "fsdp", False) else (ctx.engine_mode if ctx is not None else "none"),
    )


def _source(args: argparse.Namespace):
    from salun_ext.diffusion.data import ModelSource

    return _fields(ModelSource, args)


def _forget(args: argparse.Namespace):
    from salun_ext.diffusion.data import ForgetData

    return _fields(ForgetData, args)


# ---------------------------------------------------------------------------------------------------- handlers


def run_train(args) -> int:
    from salun_ext.diffusion.workflows import DDPMTraining, train_ddpm_folder

    spec = _fields(DDPMTraining, args)
    with distributed_session(args) as ctx:
        fit = train_ddpm_folder(spec, args.out, _options(args, ctx), ctx=ctx)
        if ctx.is_main:
            print(f"trained {fit.steps} steps in {fit.seconds:.1f} s -> {args.out}")
    return 0


def run_mask(args) -> int:
    from salun_ext.diffusion.workflows import check_mask_out, make_masks

    check_mask_out(args.out, args.ratio)
    with distributed_session(args) as ctx:
        written = make_masks(_source(args), _forget(args), args.ratio, args.out, _options(args, ctx),
                             guidance_scale=args.guidance, batch_size=args.batch_size, protocol=args.protocol,
                             ctx=ctx)  # fmt: skip
        for path, m in written:
            print(f"mask ratio {m.ratio}: {m.count()} of {m.numel} parameters salient -> {path}")
    return 0


def run_unlearn(args) -> int:
    from salun_ext.diffusion.workflows import UnlearnSpec, unlearn_folder

    spec = _fields(UnlearnSpec, args)
    with distributed_session(args) as ctx:
        fit, _setting = unlearn_folder(_source(args), _forget(args), spec, args.out, _options(args, ctx), ctx=ctx)
        if ctx.is_main:
            print(f"{args.method}: {fit.steps} steps in {fit.seconds:.1f} s -> {args.out}")
    return 0


def run_sample(args) -> int:
    from salun_ext.diffusion.evaluation import save_grid
    from salun_ext.diffusion.sd import save_images
    from salun_ext.diffusion.workflows import sample

    single_process_only("diffusion sample")
    images = sample(_source(args), _options(args), classes=args.classes, prompts=args.prompt, n=args.n,
                    guidance_scale=args.guidance, steps=args.steps, sampler=args.sampler)  # fmt: skip
    save_grid(images, args.out, nrow=args.n)
    if args.images_dir:
        save_images(images, args.images_dir)
    print(f"{len(images)} images -> {args.out}")
    return 0


def run_evaluate(args) -> int:
    from salun_ext.diffusion import workflows

    single_process_only("diffusion evaluate")
    options = _options(args)
    if args.model:
        steps = workflows.EVAL_STEPS if args.steps is None else args.steps
        spec = _fields(workflows.DDPMEvaluation, args, guidance_scale=args.guidance, steps=steps)
        result = workflows.evaluate_ddpm(args.model, spec, args.out, options)
        print(json.dumps({k: v for k, v in result.items() if k != "per_class_accuracy"}, indent=2, default=str))
        return 0
    if args.classifier_arch:
        result = workflows.evaluate_sd_classes(
            _source(args), args.classifier_arch, args.classifier_weights, args.out, options, classes=args.classes,
            forget_class=args.forget_class, n_per_class=args.n_per_class, guidance_scale=args.guidance,
            steps=args.steps,
        )  # fmt: skip
    else:
        result = workflows.evaluate_sd_nudity(
            _source(args), args.i2p, args.out, options, categories=args.categories, limit=args.limit,
            steps=args.steps, threshold=args.threshold, protocol=args.i2p_protocol,
            images_per_prompt=args.images_per_prompt,
        )  # fmt: skip
    print(json.dumps(result, indent=2, default=str))
    return 0


def run_demo(args) -> int:
    from salun_ext.diffusion.demo import DemoConfig
    from salun_ext.diffusion.demo import run_demo as demo

    single_process_only("diffusion demo")
    cfg = DemoConfig(dataset=args.dataset, forget_class=args.forget_class, seed=args.seed, device=args.device,
                     reuse=not args.no_reuse, progress=not args.no_progress)  # fmt: skip
    for key in ("train_epochs", "unlearn_steps", "n_per_class", "alpha"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    demo(cfg, args.out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from salun_ext.cli import main

    sys.exit(main(["diffusion", *sys.argv[1:]]))
