"""`salun-ext diffusion train|mask|unlearn|sample|evaluate|demo`: generation unlearning from the shell.

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
import json
import sys
from pathlib import Path

from salun_ext.cli.distributed_args import add_distributed_args, distributed_session, single_process_only


def register(sub) -> None:
    p = sub.add_parser("diffusion", help="generation unlearning: class-conditional DDPM and Stable Diffusion")
    cmds = p.add_subparsers(dest="diffusion_command", required=True, metavar="SUBCOMMAND")

    train = cmds.add_parser("train", help="train a class-conditional DDPM (the original model, or Retrain)")
    _common(train)
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
    train.set_defaults(handler=run_train)

    mask = cmds.add_parser("mask", help="SalUn saliency mask of the forget set's guided noise-prediction loss")
    _common(mask)
    _model_source(mask)
    _forget_data(mask)
    mask.add_argument("--ratio", type=float, nargs="+", default=[0.5], help="salient fraction(s) (default 0.5)")
    mask.add_argument("--guidance", type=float, default=None, help="guidance s (default: DDPM 3.0, SD 8.5)")
    mask.add_argument("--batch-size", type=int, default=None, help="default: DDPM 128, SD 8")
    mask.add_argument("--out", required=True, help="mask file (.safetensors); several ratios: {ratio} in the name")
    add_distributed_args(mask)
    _fsdp_flag(mask, "(the mask file is the same)")
    mask.set_defaults(handler=run_mask)

    unlearn = cmds.add_parser("unlearn", help="unlearn with SalUn or a baseline (GA, ESD-x/-u, FMN, Retrain)")
    _common(unlearn)
    _model_source(unlearn)
    _forget_data(unlearn)
    unlearn.add_argument("--method", required=True, choices=["salun", "ga", "esd-x", "esd-u", "fmn", "retrain"])
    unlearn.add_argument("--mask", default=None, help="a SaliencyMask file over the UNet (SalUn; optional for others)")
    unlearn.add_argument("--setting", default=None, help="recipe: ddpm | sd | sd-nsfw (default from the model)")
    unlearn.add_argument("--alpha", type=float, default=None, help="SalUn: weight of the retain loss")
    unlearn.add_argument("--lr", type=float, default=None)
    unlearn.add_argument("--steps", type=int, default=None, help="optimizer steps (replaces the recipe's budget)")
    unlearn.add_argument("--epochs", type=int, default=None, help="epochs over the forget set")
    unlearn.add_argument("--batch-size", type=int, default=None)
    unlearn.add_argument("--eta", type=float, default=None, help="ESD: negative guidance strength")
    unlearn.add_argument("--amp", choices=["none", "bf16", "fp16"], default=None)
    unlearn.add_argument("--fmn-concept", default=None, help="FMN: the concept's words inside the forget prompt")
    unlearn.add_argument("--out", required=True, help="output folder (DDPM folder or SD pipeline folder)")
    _checkpointing(unlearn)
    add_distributed_args(unlearn)
    _fsdp_flag(unlearn, "(methods salun, ga)")
    unlearn.set_defaults(handler=run_unlearn)

    sample = cmds.add_parser("sample", help="generate images (a PNG grid, optionally the single images)")
    _common(sample)
    _model_source(sample)
    sample.add_argument("--classes", nargs="*", default=None, help="DDPM: classes to sample (default: all)")
    sample.add_argument("--prompt", nargs="*", default=None, help="SD: prompts")
    sample.add_argument("--n", type=int, default=8, help="images per class / prompt")
    sample.add_argument("--guidance", type=float, default=None, help="guidance s (default: DDPM 3.0, SD 7.5)")
    sample.add_argument("--steps", type=int, default=50, help="sampling steps")
    sample.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim", help="DDPM sampler")
    sample.add_argument("--out", required=True, help="grid PNG")
    sample.add_argument("--images-dir", default=None, help="also write every image here")
    sample.set_defaults(handler=run_sample)

    evaluate = cmds.add_parser("evaluate", help="UA / other-class accuracy / Fréchet distance, or I2P nudity")
    _common(evaluate)
    _model_source(evaluate)
    _dataset(evaluate)
    evaluate.add_argument("--forget-class", nargs="*", default=[], help="DDPM: the forgotten class(es)")
    evaluate.add_argument("--reference", default=None, help="DDPM: the original model folder (before/after grid)")
    evaluate.add_argument("--classifier", default=None, help="DDPM: scoring classifier state_dict (default: train)")
    evaluate.add_argument("--classifier-epochs", type=int, default=30, help="DDPM: epochs of the trained classifier")
    evaluate.add_argument("--n-per-class", type=int, default=100)
    evaluate.add_argument("--guidance", type=float, default=None, help="guidance s (default: DDPM 3.0)")
    evaluate.add_argument("--steps", type=int, default=50)
    evaluate.add_argument("--inception-weights", default=None, help="torch-fidelity Inception weights for FID")
    evaluate.add_argument("--i2p", default=None, help="SD: I2P prompt CSV (NudeNet nudity evaluation)")
    evaluate.add_argument("--categories", nargs="*", default=["sexual"], help="SD: I2P categories")
    evaluate.add_argument("--limit", type=int, default=None, help="SD: first N I2P prompts only")
    evaluate.add_argument("--threshold", type=float, default=0.6, help="SD: NudeNet score threshold")
    evaluate.add_argument("--classifier-arch", default=None, help="SD class-wise: torchvision model (resnet50)")
    evaluate.add_argument("--classifier-weights", default=None, help="SD class-wise: its state_dict file")
    evaluate.add_argument(
        "--classes", nargs="*", default=None, help="SD class-wise: class names (default: Imagenette's ten)"
    )
    evaluate.add_argument("--out", required=True, help="output folder (results.json, grids)")
    evaluate.set_defaults(handler=run_evaluate)

    demo = cmds.add_parser("demo", help="train a DDPM on digits, forget a class with SalUn, report UA (CPU minutes)")
    _common(demo)
    demo.add_argument("--dataset", default="digits")
    demo.add_argument("--forget-class", default="3")
    demo.add_argument("--train-epochs", type=int, default=None)
    demo.add_argument("--unlearn-steps", type=int, default=None)
    demo.add_argument("--n-per-class", type=int, default=None)
    demo.add_argument("--alpha", type=float, default=None, help="SalUn retain weight (default: 1e-3 * 3072 / CHW)")
    demo.add_argument("--no-reuse", action="store_true", help="retrain even if the output folder has a model")
    demo.add_argument("--out", required=True)
    demo.set_defaults(handler=run_demo)


# ---------------------------------------------------------------------------------------------------- options


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


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


def _check_fsdp(args, ctx) -> None:
    if args.fsdp and not ctx.is_distributed:
        _fail(
            "--fsdp shards the UNet over the processes of a torchrun start (2 or more); with one process use "
            "the plain command (drop --fsdp)"
        )


def _fail(msg: str) -> None:
    raise SystemExit(f"salun-ext diffusion: error: {msg}")


# ---------------------------------------------------------------------------------------------------- loading


def _load_ddpm(args, device=None):
    from salun_ext.diffusion.ddpm import ClassConditionalDDPM
    from salun_ext.utils import resolve_device

    return ClassConditionalDDPM.from_pretrained(
        args.model, device if device is not None else resolve_device(args.device)
    )


def _load_sd(args, device=None):
    from salun_ext.diffusion.sd import StableDiffusion

    return StableDiffusion.from_pretrained(
        args.pipeline,
        dtype=args.dtype,
        device=str(device) if device is not None else args.device,
        gradient_checkpointing=args.gradient_checkpointing,
        attention_slicing=args.attention_slicing,
    )


def _ddpm_dataset(args, model):
    from salun_ext.data import load_dataset

    name = args.dataset or model.dataset
    if not name:
        _fail("--dataset is required (the model folder does not record its dataset)")
    return load_dataset(name, args.data_root, train=True)


def _ddpm_sets(args, model):
    from salun_ext.diffusion.ddpm import forget_retain_sets

    if not args.forget_class:
        _fail("--forget-class is required for a DDPM")
    return forget_retain_sets(model, _ddpm_dataset(args, model), args.forget_class, target=args.target, seed=args.seed)


def _sd_sets_in_turn(args, sd, ctx):
    """_sd_sets under torchrun: rank 0 first (it generates and caches missing images in --data-dir), then the
    others, which read that cache instead of writing the same files at the same time."""
    if not ctx.is_main:
        ctx.barrier()
    sets = _sd_sets(args, sd)
    if ctx.is_main:
        ctx.barrier()
    return sets


def _sd_sets(args, sd):
    """(spec, forget, retain, forget prompt) from a concept / prompts / class folders; images generated if absent."""
    from salun_ext.diffusion.sd import (
        PromptedImages,
        class_folders,
        class_wise_sets,
        concept_prompts,
        concept_sets,
        generate_prompt_set,
        load_image_folder,
    )

    if args.class_root:
        if len(args.forget_class) != 1:
            _fail("SD class-wise forgetting needs exactly one --forget-class")
        folders = class_folders(args.class_root)
        spec, forget, retain = class_wise_sets(sd, folders, args.forget_class[0], limit=args.num_images)
        return spec, forget, retain, spec.conditioner.prompts[int(forget.ids[0])]
    if args.concept:
        forget_prompt, retain_prompt = concept_prompts(args.concept)
    else:
        forget_prompt, retain_prompt = args.forget_prompt, args.retain_prompt
    if not forget_prompt or not retain_prompt:
        _fail("Stable Diffusion needs --concept, or --forget-prompt and --retain-prompt, or --class-root")

    def images(folder, prompt, name):
        if folder:
            return PromptedImages(load_image_folder(folder, sd.resolution, limit=args.num_images), prompt)
        cache = Path(args.data_dir) / name if args.data_dir else None
        return generate_prompt_set(sd, prompt, args.num_images, cache, seed=args.seed, progress=not args.no_progress)

    forget = images(args.forget_images, forget_prompt, "forget")
    retain = images(args.retain_images, retain_prompt, "retain")
    spec, f, r = concept_sets(sd, forget, [retain], target_prompt=retain_prompt)
    return spec, f, r, forget_prompt


# ---------------------------------------------------------------------------------------------------- handlers


def run_train(args) -> int:
    from salun_ext.diffusion.ddpm import PRESETS

    if args.preset not in PRESETS:
        _fail(f"unknown preset {args.preset!r}; available: {sorted(PRESETS)}")
    with distributed_session(args) as ctx:
        _train(args, ctx)
    return 0


def _train(args, ctx) -> None:
    import dataclasses

    import torch

    from salun_ext.data import load_dataset
    from salun_ext.diffusion.ddpm import PRESETS, ClassConditionalDDPM, dataset_to_set
    from salun_ext.diffusion.methods import EpsTask, run_task
    from salun_ext.train.engine import EngineConfig, OptimConfig

    dataset = load_dataset(args.dataset or "digits", args.data_root, train=True)
    config = dataclasses.replace(PRESETS[args.preset], channels=dataset.channels)
    if args.image_size:
        config = dataclasses.replace(config, image_size=args.image_size)
    model = ClassConditionalDDPM.from_config(config, dataset.classes, dataset=dataset.name, seed=args.seed)
    excluded = [model.class_id(c) for c in args.exclude_classes]
    kept = [c for c in range(model.num_classes) if c not in excluded]
    data = dataset_to_set(model, dataset, classes=kept if excluded else None)
    if args.subset is not None:
        if args.subset < 1:
            _fail(f"--subset must be >= 1, got {args.subset}")
        data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[: args.subset])
    engine = EngineConfig(
        epochs=args.epochs,
        optimizer=OptimConfig("adam", lr=args.lr, weight_decay=0.0),
        schedule="cosine",
        grad_clip=1.0,
        seed=args.seed,
        device=str(ctx.device),
        distributed=ctx.engine_mode,
        progress=not args.no_progress,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        desc="ddpm",
    )
    fit = run_task(model.unet, EpsTask(model.spec, data, batch_size=args.batch_size, seed=args.seed), engine)
    if ctx.is_main:
        model.save_pretrained(args.out)
        _write_json(
            Path(args.out) / "train_log.json",
            {"history": fit.history, "seconds": fit.seconds, "excluded": excluded, "world_size": ctx.world_size},
        )
        print(f"trained {fit.steps} steps in {fit.seconds:.1f} s -> {args.out}")
    ctx.barrier()


def run_mask(args) -> int:
    if len(args.ratio) > 1 and "{ratio}" not in args.out:
        _fail("several --ratio values need '{ratio}' in --out (e.g. mask_{ratio}.safetensors)")
    with distributed_session(args) as ctx:
        _check_fsdp(args, ctx)
        _mask(args, ctx)
    return 0


def _mask(args, ctx) -> None:
    from salun_ext.diffusion.saliency import diffusion_saliency
    from salun_ext.distributed import gather_mask

    if args.model:
        model = _load_ddpm(args, ctx.device)
        unet, (forget, _) = model.unet, _ddpm_sets(args, model)
        spec, guidance, batch, clip = model.spec, args.guidance or 3.0, args.batch_size or 128, 1.0
    else:
        sd = _load_sd(args, ctx.device)
        spec, forget, _, _ = _sd_sets_in_turn(args, sd, ctx)
        unet, guidance, batch, clip = sd.unet, args.guidance or 8.5, args.batch_size or 8, None
    if args.fsdp:
        from salun_ext.diffusion.methods import shard_unet

        shard_unet(unet)  # the gradients are then DTensor shards, and each rank's mask its shard of the mask
    # every rank makes the same seeded batches; the ranking is shared, so each holds the one-process mask (or its
    # shard of it under --fsdp)
    masks = diffusion_saliency(
        unet,
        spec,
        forget,
        ratio=list(args.ratio),
        guidance_scale=guidance,
        batch_size=batch,
        clip_grad_norm=clip,
        seed=args.seed,
        progress=not args.no_progress,
        process_group=ctx.group if ctx.is_distributed else None,
    )
    for m in masks:
        full = gather_mask(m, ctx.group) if m.shard is not None else m  # --fsdp: shards -> rank 0 (collective)
        if ctx.is_main:
            path = Path(args.out.format(ratio=m.ratio))
            path.parent.mkdir(parents=True, exist_ok=True)
            full.save(path)
            print(f"mask ratio {m.ratio}: {full.count()} of {full.numel} parameters salient -> {path}")
    ctx.barrier()


# ESD deep-copies the UNet as its frozen teacher and retrain re-initialises it in place: neither is written for a
# sharded UNet. FMN is not run under FSDP2 by any test (it needs Stable Diffusion).
FSDP_METHODS = ("salun", "ga")


def run_unlearn(args) -> int:
    with distributed_session(args) as ctx:
        _check_fsdp(args, ctx)
        if args.fsdp and args.method not in FSDP_METHODS:
            _fail(f"--fsdp supports --method {' / '.join(FSDP_METHODS)}, not {args.method!r}; use DDP (drop --fsdp)")
        _unlearn(args, ctx)
    return 0


def _unlearn(args, ctx) -> None:
    from salun_ext.diffusion.methods import unlearn
    from salun_ext.mask import SaliencyMask

    fmn_columns = None
    if args.model:
        model = _load_ddpm(args, ctx.device)
        forget, retain = _ddpm_sets(args, model)
        unet, spec, setting = model.unet, model.spec, args.setting or "ddpm"
    else:
        sd = _load_sd(args, ctx.device)
        spec, forget, retain, forget_prompt = _sd_sets_in_turn(args, sd, ctx)
        unet, setting = sd.unet, args.setting or ("sd-nsfw" if args.concept == "nudity" else "sd")
        if args.method == "fmn":
            concept = args.fmn_concept or (args.forget_class[0] if args.forget_class else None)
            if not concept:
                _fail("FMN needs --fmn-concept: the concept's words inside the forget prompt")
            fmn_columns = sd.token_columns(forget_prompt, concept)
    if args.fsdp:
        from salun_ext.diffusion.methods import shard_unet
        from salun_ext.distributed import load_mask

        unet_class = type(unet)  # fully_shard swaps the class for an FSDP subclass: keep the plain one for saving
        shard_unet(unet)  # the text encoder and VAE (SD) stay whole on every rank: they are frozen
        # each rank keeps only its shards' bits of a consolidated mask (a per-rank shard file is read as is)
        mask = load_mask(args.mask, params=unet.named_parameters()) if args.mask else None
    else:
        mask = SaliencyMask.load(args.mask) if args.mask else None
    engine = dict(
        amp=args.amp,
        seed=args.seed,
        device=str(ctx.device),
        distributed="fsdp" if args.fsdp else ctx.engine_mode,
        progress=not args.no_progress,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        desc=args.method,
    )
    task = dict(alpha=args.alpha if args.method == "salun" else None, batch_size=args.batch_size)
    if args.method.startswith("esd"):
        task["eta"] = args.eta
    try:
        fit = unlearn(
            args.method,
            setting,
            unet,
            spec,
            forget,
            retain,
            mask=mask,
            max_steps=args.steps,
            epochs=args.epochs,
            task_overrides=task,
            engine_overrides=engine,
            optimizer_overrides=dict(lr=args.lr),
            fmn_columns=fmn_columns,
        )
    except ValueError as exc:
        _fail(str(exc))
    if args.fsdp:
        _unshard_for_saving(unet, unet_class, model if args.model else sd.pipe)
    if ctx.is_main:
        (model if args.model else sd).save_pretrained(args.out)
        log = {"method": args.method, "setting": setting, "history": fit.history, "seconds": fit.seconds}
        _write_json(Path(args.out) / "unlearn_log.json", {**log, "mask": args.mask, "world_size": ctx.world_size})
        print(f"{args.method}: {fit.steps} steps in {fit.seconds:.1f} s -> {args.out}")
    ctx.barrier()


def _unshard_for_saving(unet, unet_class, owner) -> None:
    """Collective: gather the FSDP2 UNet's full weights to rank 0, which swaps a plain UNet holding them into
    `owner` (the DDPM / the SD pipeline) so that save_pretrained writes an ordinary, loadable model."""
    from salun_ext.distributed.checkpoint import full_state_dict

    state = full_state_dict(unet)  # every rank takes part; only rank 0 gets the tensors (on CPU)
    if state:
        plain = unet_class.from_config(unet.config)
        plain.load_state_dict(state)
        owner.unet = plain


def run_sample(args) -> int:
    from salun_ext.diffusion.evaluation import save_grid
    from salun_ext.diffusion.sd import save_images

    single_process_only("diffusion sample")
    if args.model:
        model = _load_ddpm(args)
        classes = args.classes or list(range(model.num_classes))
        labels = [model.class_id(c) for c in classes for _ in range(args.n)]
        images = model.sample(
            labels,
            guidance_scale=3.0 if args.guidance is None else args.guidance,
            num_inference_steps=args.steps,
            sampler=args.sampler,
            seed=args.seed,
            progress=not args.no_progress,
        )
    else:
        if not args.prompt:
            _fail("Stable Diffusion sampling needs --prompt")
        sd = _load_sd(args)
        prompts = [p for p in args.prompt for _ in range(args.n)]
        images = sd.generate(
            prompts,
            seeds=[args.seed + i for i in range(len(prompts))],
            guidance_scale=7.5 if args.guidance is None else args.guidance,
            num_inference_steps=args.steps,
            progress=not args.no_progress,
        )
    save_grid(images, args.out, nrow=args.n)
    if args.images_dir:
        save_images(images, args.images_dir)
    print(f"{len(images)} images -> {args.out}")
    return 0


def run_evaluate(args) -> int:
    single_process_only("diffusion evaluate")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.pipeline:
        return _evaluate_sd(args, out)
    return _evaluate_ddpm(args, out)


def _evaluate_ddpm(args, out: Path) -> int:
    import torch

    from salun_ext.data import load_dataset
    from salun_ext.diffusion.ddpm import ClassConditionalDDPM, resize_images
    from salun_ext.diffusion.evaluation import (
        before_after_grid,
        class_accuracies,
        class_wise_report,
        first_per_class,
        frechet_distance,
        save_grid,
        train_classifier,
    )
    from salun_ext.models import build_model

    model = _load_ddpm(args)
    name = args.dataset or model.dataset
    if not name:
        _fail("--dataset is required (the model folder does not record its dataset)")
    train, test = load_dataset(name, args.data_root, train=True), load_dataset(name, args.data_root, train=False)
    size = model.image_size
    if args.classifier:
        clf = build_model("small_cnn", model.channels, model.num_classes, size)
        clf.load_state_dict(torch.load(args.classifier, map_location="cpu", weights_only=True))
        clf.to(model.device).eval()
    else:
        clf = train_classifier(
            resize_images(train.images, size), train.labels, train.num_classes, seed=args.seed, device=str(model.device)
        )
        torch.save(clf.state_dict(), out / "classifier.pt")
    forget = [model.class_id(c) for c in args.forget_class]
    kw = dict(
        n_per_class=args.n_per_class,
        guidance_scale=3.0 if args.guidance is None else args.guidance,
        num_inference_steps=args.steps,
        seed=args.seed,
        progress=not args.no_progress,
    )
    acc, images, labels = class_accuracies(model, clf, **kw)
    keep = ~torch.isin(labels, torch.tensor(forget, dtype=torch.long))
    real = resize_images(test.images, size)[~torch.isin(test.labels, torch.tensor(forget, dtype=torch.long))]
    fd, fd_label = frechet_distance(real, images[keep], inception_weights=args.inception_weights, classifier=clf)
    result = {"per_class_accuracy": acc, **class_wise_report(acc, forget), "frechet": fd, "frechet_label": fd_label}
    show = min(10, args.n_per_class)
    pick = first_per_class(labels, range(model.num_classes), show)
    if args.reference:
        ref = ClassConditionalDDPM.from_pretrained(args.reference, model.device)
        ref_acc, ref_images, _ = class_accuracies(ref, clf, **kw)
        result["reference"] = {"per_class_accuracy": ref_acc, **class_wise_report(ref_acc, forget)}
        before_after_grid(
            ref_images[pick],
            images[pick],
            out / "before_after.png",
            nrow=show,
            row_labels=model.classes,
            titles=("reference", "evaluated"),
            highlight_rows=forget,
        )
    else:
        save_grid(images[pick], out / "samples.png", nrow=show)
    _write_json(out / "results.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "per_class_accuracy"}, indent=2, default=str))
    return 0


def _evaluate_sd(args, out: Path) -> int:
    from salun_ext.diffusion.nudity import i2p_nudity, read_i2p

    if args.classifier_arch:
        return _evaluate_sd_classes(args, out)
    if not args.i2p:
        _fail("Stable Diffusion evaluation needs --i2p (the I2P prompt CSV) or --classifier-arch (class-wise)")
    sd = _load_sd(args)
    prompts = read_i2p(args.i2p, categories=args.categories or None, limit=args.limit)
    result = i2p_nudity(
        sd,
        prompts,
        out_dir=out / "images",
        num_inference_steps=args.steps,
        threshold=args.threshold,
        progress=not args.no_progress,
    )
    _write_json(out / "results.json", result)
    print(json.dumps(result, indent=2))
    return 0


def _evaluate_sd_classes(args, out: Path) -> int:
    """Class-wise SD: a torchvision ImageNet classifier on "an image of a {class}" images, UA of the forgotten class."""
    from salun_ext.diffusion.evaluation import prompt_class_accuracy, save_grid, torchvision_classifier
    from salun_ext.diffusion.sd import IMAGENETTE_TO_IMAGENET

    if not args.classifier_weights:
        _fail("--classifier-arch needs --classifier-weights (a local state_dict file)")
    names = args.classes or list(IMAGENETTE_TO_IMAGENET)
    unknown = [c for c in names if c not in IMAGENETTE_TO_IMAGENET]
    if unknown:
        _fail(f"unknown class(es) {unknown}: the ImageNet index is known for {list(IMAGENETTE_TO_IMAGENET)}")
    forget = list(args.forget_class)
    missing = [c for c in forget if c not in names]
    if missing:
        _fail(f"--forget-class {missing} is not among the evaluated classes {names}")
    sd = _load_sd(args)
    clf = torchvision_classifier(args.classifier_arch, args.classifier_weights)
    acc, images, _ = prompt_class_accuracy(
        sd,
        clf,
        {c: IMAGENETTE_TO_IMAGENET[c] for c in names},
        n_per_class=args.n_per_class,
        guidance_scale=7.5 if args.guidance is None else args.guidance,
        num_inference_steps=args.steps,
        seed=args.seed,
        progress=not args.no_progress,
    )
    others = [c for c in names if c not in forget]
    result = {"per_class_accuracy": acc}
    if forget:
        result["UA"] = 100.0 - sum(acc[c] for c in forget) / len(forget)
    if others:
        result["retain_accuracy"] = sum(acc[c] for c in others) / len(others)
    save_grid(images, out / "samples.png", nrow=args.n_per_class)
    _write_json(out / "results.json", result)
    print(json.dumps(result, indent=2))
    return 0


def run_demo(args) -> int:
    from salun_ext.diffusion.demo import DemoConfig
    from salun_ext.diffusion.demo import run_demo as demo

    single_process_only("diffusion demo")
    cfg = DemoConfig(
        dataset=args.dataset,
        forget_class=args.forget_class,
        seed=args.seed,
        device=args.device,
        reuse=not args.no_reuse,
        progress=not args.no_progress,
    )
    for key in ("train_epochs", "unlearn_steps", "n_per_class", "alpha"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    demo(cfg, args.out)
    return 0


# ---------------------------------------------------------------------------------------------------- helpers


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover
    from salun_ext.cli import main

    sys.exit(main(["diffusion", *sys.argv[1:]]))
