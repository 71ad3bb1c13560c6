"""`salun-ext diffusion train|mask|unlearn|sample|evaluate|attack|demo|train-text-digits|evaluate-text-digits|
text-digits-table`:
generation unlearning from the shell.

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
    for add in (
        _add_train,
        _add_mask,
        _add_unlearn,
        _add_sample,
        _add_evaluate,
        _add_attack,
        _add_demo,
        _add_text_digits,
        _add_evaluate_text_digits,
        _add_text_digits_table,
    ):
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
    un = _subcommand(cmds, "unlearn", "unlearn with SalUn or a baseline (GA, ESD-x/-u, FMN, UCE, Retrain)", run_unlearn)
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
    _uce_flags(un)
    _protocol_flag(un)
    un.add_argument("--out", required=True, help="output folder (DDPM folder or SD pipeline folder)")
    _checkpointing(un)
    add_distributed_args(un)
    _fsdp_flag(un, "(methods salun, ga)")


def _uce_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("UCE (closed-form edit; defaults: the published code's, docs/diffusion.md)")
    g.add_argument(
        "--uce-erase",
        nargs="+",
        default=None,
        help="concepts to erase (default: --concept, --forget-prompt or --forget-class)",
    )
    g.add_argument(
        "--uce-guide",
        nargs="+",
        default=None,
        help='what each erased concept becomes: one, or one per erased concept (default "")',
    )
    g.add_argument(
        "--uce-preserve",
        nargs="*",
        default=None,
        help="concepts to keep (default: the other classes of --class-root, else none)",
    )
    g.add_argument("--uce-lambda", type=float, default=None, help="regularisation towards the original weights")
    g.add_argument("--uce-erase-scale", type=float, default=None)
    g.add_argument("--uce-preserve-scale", type=float, default=None)


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
    ev.add_argument(
        "--i2p-protocol",
        choices=["prompt", "paper"],
        default="prompt",
        help="SD: one image per prompt with its seed/guidance, or the paper code's (7.5, LMS, 100 steps)",
    )
    ev.add_argument("--images-per-prompt", type=int, default=None, help="SD: images per I2P prompt (protocol's)")
    ev.add_argument("--classifier-arch", default=None, help="SD class-wise: torchvision model (resnet50)")
    ev.add_argument("--classifier-weights", default=None, help="SD class-wise: its state_dict file")
    ev.add_argument("--classes", nargs="*", default=None, help="SD class-wise: class names (default: Imagenette's ten)")
    ev.add_argument("--out", required=True, help="output folder (results.json, grids)")


def _add_attack(cmds) -> None:
    at = _subcommand(cmds, "attack", "UnlearnDiffAtk: adversarial prompt tokens against an unlearned SD; Pre-ASR / ASR",
                     run_attack)  # fmt: skip
    at.add_argument("--pipeline", required=True, help="the unlearned Stable Diffusion pipeline (folder or hub id)")
    at.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="frozen components' dtype")
    at.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    at.add_argument("--prompts", required=True, help="CSV with a 'prompt' column (I2P or the attack's prompt files)")
    at.add_argument("--categories", nargs="*", default=None, help="keep rows with one of these categories")
    at.add_argument("--limit", type=int, default=None, help="first N prompts only")
    targets = at.add_mutually_exclusive_group(required=True)
    targets.add_argument("--reference", help="the original pipeline: makes each prompt's target image")
    targets.add_argument("--target-images", help="folder of target images <case_number>.png")
    at.add_argument("--judge", choices=["nudity", "classifier"], default="nudity")
    at.add_argument("--threshold", type=float, default=None, help="nudity: NudeNet score (default 0.45, the attack's)")
    at.add_argument("--detector", default=None, help="nudity: NudeNet .onnx file (default: nudenet's own)")
    at.add_argument("--classifier", default=None, help="classifier: a salun-ext classifier checkpoint (.safetensors)")
    at.add_argument("--classifier-arch", default=None, help="classifier: or a torchvision model (resnet50)")
    at.add_argument("--classifier-weights", default=None, help="classifier: its local state_dict file")
    at.add_argument("--target-class", type=int, default=None, help="classifier: the class index to look for")
    at.add_argument("--k", type=int, default=None, help="adversarial tokens (default: nudity 5, classifier 3)")
    at.add_argument("--timesteps", type=int, default=None, help="sampled timesteps (default 50)")
    at.add_argument("--iterations", type=int, default=None, help="Adam steps per timestep (default 40)")
    at.add_argument("--lr", type=float, default=None, help="default 0.01")
    at.add_argument("--weight-decay", type=float, default=None, help="default 0.1")
    at.add_argument("--sampling-steps", type=int, default=None, help="LMS steps of each judged image (default 50)")
    at.add_argument("--target-steps", type=int, default=None, help="LMS steps of the target images (default 25)")
    at.add_argument("--out", required=True, help="output folder (resumes: finished prompts are skipped)")


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


def _add_text_digits(cmds) -> None:
    p = _subcommand(cmds, "train-text-digits", "train a tiny text-to-image Stable Diffusion pipeline on captioned "
                    "digits (CPU minutes)", run_train_text_digits)  # fmt: skip
    p.add_argument("--epochs", type=int, default=None, help="UNet epochs over every (image, caption) pair (10)")
    p.add_argument("--vae-epochs", type=int, default=None, help="VAE (autoencoder) epochs (10)")
    p.add_argument("--text-epochs", type=int, default=None, help="text-encoder epochs of 25 caption steps (4)")
    p.add_argument("--lr", type=float, default=None, help="UNet learning rate (1e-3)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of both phases (64)")
    p.add_argument("--subset", type=int, default=None, help="the first N training images only (quick runs)")
    p.add_argument("--no-evaluate", action="store_true", help="skip scoring the trained pipeline")
    _text_digits_scoring(p)
    p.add_argument("--out", required=True, help="output pipeline folder (save_pretrained) + text_digits.json")
    _checkpointing(p)


def _add_evaluate_text_digits(cmds) -> None:
    p = _subcommand(cmds, "evaluate-text-digits", "class accuracy / UA / Fréchet proxy / CLIP score of a digits "
                    "pipeline", run_evaluate_text_digits)  # fmt: skip
    p.add_argument("--pipeline", required=True, help="the digits pipeline folder (train-text-digits, or unlearned)")
    p.add_argument("--forget-class", nargs="*", default=[], help="forgotten digit(s): 3 or three")
    p.add_argument("--classifier", default=None, help="scoring classifier state_dict (default: train one)")
    p.add_argument("--inception-weights", default=None, help="torch-fidelity Inception weights (real FID)")
    p.add_argument("--clip-model", default=None, help="local CLIP model folder for the CLIP score")
    _text_digits_scoring(p)
    p.add_argument("--out", required=True, help="output folder (results.json, samples.png)")


def _add_text_digits_table(cmds) -> None:
    p = _subcommand(cmds, "text-digits-table", "forget a digit on the text-to-image digits model with SalUn, ESD-x, "
                    "FMN, UCE and GA; evaluate and attack each (resumable)", run_text_digits_table)  # fmt: skip
    p.add_argument("--pipeline", required=True, help="the trained digits pipeline folder (train-text-digits)")
    p.add_argument("--forget-images", required=True, help="folder of real images of the forgotten digit")
    p.add_argument("--retain-images", required=True, help="folder of real images of the retained digit")
    p.add_argument("--classifier", default=None, help="digits scoring classifier state_dict (default: "
                   "<pipeline>/classifier.pt)")  # fmt: skip
    p.add_argument("--forget-class", default="three", help="digit to forget: 3 or three (default three)")
    p.add_argument("--retain-class", default="four", help="digit of the retain / target prompt (default four)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--methods", nargs="+", default=None, help="default: salun esd-x fmn uce ga")
    p.add_argument("--lr-scale", type=float, default=None, help="every trained method: recipe lr x this (3)")
    p.add_argument("--max-steps", type=int, default=None, help="longer recipes are cut to this, lr raised (200)")
    p.add_argument("--n-per-class", type=int, default=None, help="evaluation images per class and phrasing (5)")
    p.add_argument("--eval-steps", type=int, default=None, help="DDIM steps of the evaluation (25)")
    p.add_argument("--attack-seeds", type=int, nargs="+", default=None, help="seeds of the attacked prompts (0 1)")
    p.add_argument("--attack-timesteps", type=int, default=None, help="attack timesteps (10; published 50)")
    p.add_argument("--attack-iterations", type=int, default=None, help="Adam steps per timestep (10; published 40)")
    p.add_argument("--attack-sampling-steps", type=int, default=None, help="LMS steps per judged image (25; 50)")
    p.add_argument("--work", required=True, help="folder of the unlearned models and attack runs (large)")
    p.add_argument("--out", required=True, help="results folder (small: README.md, summary.json, grids)")


def _text_digits_scoring(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-per-class", type=int, default=20, help="generated images per class and phrasing")
    p.add_argument("--guidance", type=float, default=None, help="guidance s (default 3.0)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (DDIM)")
    p.add_argument("--classifier-epochs", type=int, default=30, help="epochs of the trained scoring classifier")


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
    from salun_ext.diffusion.methods import METHODS
    from salun_ext.diffusion.workflows import UnlearnSpec, unlearn_folder

    spec = _fields(UnlearnSpec, args)
    with distributed_session(args) as ctx:
        fit, _setting = unlearn_folder(_source(args), _forget(args), spec, args.out, _options(args, ctx), ctx=ctx)
        if ctx.is_main:
            what = "closed-form edit" if METHODS.get_class(args.method).closed_form else f"{fit.steps} steps"
            print(f"{args.method}: {what} in {fit.seconds:.1f} s -> {args.out}")
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


def run_attack(args) -> int:
    from salun_ext.diffusion.workflows import AttackSpec, attack_folder

    single_process_only("diffusion attack")
    summary = attack_folder(_source(args), _fields(AttackSpec, args), args.out, _options(args))
    print(f"Pre-ASR {summary['pre_asr']:.2f}% ({summary['pre_successes']}/{summary['prompts']}), "
          f"ASR {summary['asr']:.2f}% ({summary['successes']}/{summary['prompts']}) -> {args.out}")  # fmt: skip
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


def _text_digits_evaluation(args, forget=()):
    from salun_ext.diffusion.text_digits import SAMPLE_GUIDANCE, TextDigitsEvaluation

    guidance = SAMPLE_GUIDANCE if args.guidance is None else args.guidance
    return TextDigitsEvaluation(n_per_class=args.n_per_class, guidance_scale=guidance, steps=args.steps,
                                forget_classes=list(forget), classifier_epochs=args.classifier_epochs,
                                seed=args.seed)  # fmt: skip


def _print_scores(result: dict) -> None:
    shown = {k: v for k, v in result.items() if k in ("mean_accuracy", "UA", "retain_accuracy", "chance_accuracy")}
    print(
        json.dumps(
            {
                **shown,
                "per_class_accuracy": result["per_class_accuracy"],
                "frechet": result["frechet"]["value"],
                "frechet_label": result["frechet"]["label"],
                **({"clip_score": result["clip"]["clip_score"]} if "clip" in result else {}),
            },
            indent=2,
        )
    )


def run_train_text_digits(args) -> int:
    from salun_ext.diffusion.text_digits import TextDigitsTraining, train_text_digits_folder

    single_process_only("diffusion train-text-digits")
    given = {k: getattr(args, k) for k in ("epochs", "vae_epochs", "text_epochs", "lr", "batch_size", "subset")}
    training = TextDigitsTraining(**{k: v for k, v in given.items() if v is not None})
    evaluation = None if args.no_evaluate else _text_digits_evaluation(args)
    summary = train_text_digits_folder(args.out, _options(args), training=training, evaluation=evaluation)
    print(f"trained in {summary['train_seconds']} s -> {args.out}")
    if "evaluation" in summary:
        _print_scores(summary["evaluation"])
    return 0


def run_evaluate_text_digits(args) -> int:
    from salun_ext.diffusion.text_digits import evaluate_text_digits_folder

    single_process_only("diffusion evaluate-text-digits")
    ev = _text_digits_evaluation(args, args.forget_class)
    result = evaluate_text_digits_folder(args.pipeline, args.out, _options(args), ev, classifier=args.classifier,
                                         inception_weights=args.inception_weights,
                                         clip_model=args.clip_model)  # fmt: skip
    _print_scores(result)
    return 0


def run_text_digits_table(args) -> int:
    from salun_ext.diffusion.text_demo import TableConfig, run_text_digits_table

    single_process_only("diffusion text-digits-table")
    names = (
        "methods",
        "lr_scale",
        "max_steps",
        "n_per_class",
        "eval_steps",
        "attack_seeds",
        "attack_timesteps",
        "attack_iterations",
        "attack_sampling_steps",
    )
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    cfg = TableConfig(pipeline=args.pipeline, forget_images=args.forget_images, retain_images=args.retain_images,
                      classifier=args.classifier, forget_class=args.forget_class, retain_class=args.retain_class,
                      seeds=args.seeds, device="cpu" if args.device == "auto" else args.device,
                      progress=not args.no_progress, **given)  # fmt: skip
    summary = run_text_digits_table(cfg, args.out, args.work)
    for s in summary["methods"].values():
        cells = {m: s[m]["mean"] for m in ("UA", "retain_accuracy", "frechet", "pre_asr", "asr")}
        print(f"{s['label']}: " + ", ".join(f"{m} {v:.1f}" for m, v in cells.items() if v is not None))
    print(f"{summary['compute_seconds']['total']} s of compute -> {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from salun_ext.cli import main

    sys.exit(main(["diffusion", *sys.argv[1:]]))
