"""Classification commands: `train`, `mask`, `unlearn`, `evaluate`, `reproduce`.

    salun-ext train --dataset cifar10 --data-root ~/data --model resnet18 --out runs/c10/model.safetensors
    salun-ext mask --checkpoint runs/c10/model.safetensors --dataset cifar10 --forget-ratio 0.1 --ratios 0.5
    salun-ext unlearn --checkpoint runs/c10/model.safetensors --dataset cifar10 --forget-ratio 0.1 --method salun
    salun-ext evaluate --checkpoint runs/c10/unlearn-salun/model.safetensors --dataset cifar10 --forget-ratio 0.1
    salun-ext reproduce                       # the embedded digits, all ten paper methods, table + plot

Every option can also come from a YAML/JSON file (`--config run.yaml`, keys = option names with '_' or '-';
cli/config.py); flags given on the command line win over the file, the file wins over the defaults. Method
hyperparameters: `--set lr=0.01` (unlearn) or `--set salun.lr=0.013` (reproduce), repeatable, or a `set:`
mapping in the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path
from typing import Any

from salun_ext.cli.config import add_config_flag, parse_assignments, parse_sweeps
from salun_ext.cli.distributed_args import add_distributed_args, distributed_session, single_process_only

# The defaults of every classification command (set on each parser; a --config file replaces them, flags win).
DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "data_root": None,
    "download": False,
    "split_seed": 2,
    "val_fraction": 0.1,
    "batch_size": None,
    "train_subset": None,
    "augment": "auto",
    "forget_ratio": None,
    "forget_class": None,
    "forget_seed": 1,
    "forget_indices": None,
    "device": "auto",
    "seed": 1,
    "amp": "none",
    "channels_last": False,
    "compile": False,
    "progress": True,
    "resume": False,
    "threads": None,
    "model": None,
    "model_option": [],
    "epochs": None,
    "lr": None,
    "out": None,
    "checkpoint": None,
    "ratios": [0.5],
    "method": None,
    "set": [],
    "mask": None,
    "evaluate": True,
    "retrain": None,
    "mia_shadow_size": None,
    "methods": ["paper"],
    "seeds": [1],
    "tune_seeds": [],
    "sweep": [],
    "preset": "auto",
    "original_epochs": None,
    "original_lr": None,
    "save_models": False,
    "protocol": "default",
}
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {"reproduce": {"ratios": [0.1, 0.5]}}  # the paper's two columns
UNLEARN_OUTPUTS = ("model.safetensors", "run.json", "mask.safetensors")  # what `unlearn` writes into --out


# ------------------------------------------------------------------------------------------------ options
def _add_common(p: argparse.ArgumentParser, command: str) -> None:
    add_config_flag(p)
    p.set_defaults(**{**DEFAULTS, **COMMAND_DEFAULTS.get(command, {})})
    g = p.add_argument_group("runtime")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    g.add_argument("--seed", type=int, help="seed of the training / unlearning randomness (default 1)")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], help="mixed precision (default none)")
    g.add_argument("--channels-last", action="store_const", const=True, help="channels_last memory format")
    g.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bars")
    g.add_argument("--resume", action="store_const", const=True, help="continue an interrupted run in --out")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    g.add_argument(
        "--protocol",
        choices=["default", "paper"],
        help="'paper': the paper code's behaviours (docs/protocols.md), 'default' (default): this library's fixes",
    )


def _add_data(p: argparse.ArgumentParser, forget: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="digits (default, embedded), fashion_mnist, cifar10, cifar100, svhn, tinyimagenet")
    g.add_argument(
        "--data-root", help="folder holding the dataset files (default: $SALUN_EXT_DATA, ./data, ~/datasets)"
    )
    g.add_argument("--download", action="store_const", const=True, help="download the dataset into --data-root")
    g.add_argument("--split-seed", type=int, help="seed of the per-class train/val hold-out (default 2, the paper's)")
    g.add_argument("--val-fraction", type=float, help="share of each class held out for validation (default 0.1)")
    g.add_argument("--batch-size", type=int, help="batch size (default: the dataset preset's, else 256)")
    g.add_argument("--train-subset", type=int, help="use a seeded class-balanced subset of this many training images")
    g.add_argument("--augment", choices=["auto", "none", "crop_flip"], help="training augmentation (default auto)")
    if forget:
        f = p.add_argument_group("forget set (one of)")
        f.add_argument("--forget-ratio", type=float, help="random forgetting: this share of the training split")
        f.add_argument("--forget-class", type=int, nargs="+", help="class-wise forgetting of these classes")
        f.add_argument("--forget-indices", help="a JSON file with a list of indices into the training split")
        f.add_argument("--forget-seed", type=int, help="seed of the random forget set (default 1)")


def register(sub) -> None:
    p = sub.add_parser("train", help="train an original classifier on a dataset's training split")
    _add_common(p, "train")
    _add_data(p, forget=False)
    p.add_argument("--model", help="small_cnn, resnet18, resnet50, vgg16_bn (default: the dataset preset's)")
    p.add_argument("--model-option", action="append", help="builder option KEY=VALUE, e.g. width=16")
    p.add_argument("--epochs", type=int, help="epochs (default: the preset's, else the paper's 182)")
    p.add_argument("--lr", type=float, help="learning rate (default 0.1, x0.1 at 50%% and 75%% of the epochs)")
    p.add_argument("--out", help="checkpoint path (default runs/train-<dataset>-<model>/model.safetensors)")
    add_distributed_args(p)
    p.set_defaults(handler=run_train)

    p = sub.add_parser("mask", help="compute SalUn saliency masks for a forget set")
    _add_common(p, "mask")
    _add_data(p, forget=True)
    p.add_argument("--checkpoint", help="the original model (salun_ext safetensors checkpoint)")
    p.add_argument("--ratios", type=float, nargs="+", help="mask ratios (default 0.5)")
    p.add_argument("--out", help="folder for with_<ratio>.safetensors (default: masks/ next to the checkpoint)")
    add_distributed_args(p)
    p.set_defaults(handler=run_mask)

    p = sub.add_parser("unlearn", help="run one unlearning method on a checkpoint")
    _add_common(p, "unlearn")
    _add_data(p, forget=True)
    p.add_argument("--checkpoint", help="the original model (salun_ext safetensors checkpoint)")
    p.add_argument("--method", help="retrain, ft, rl, ga, iu, be, bs, l1_sparse, salun, salun_soft, scrub, ...")
    p.add_argument("--set", action="append", help="method hyperparameter KEY=VALUE (repeatable), e.g. lr=0.013")
    p.add_argument("--mask", help="a saliency mask file (SalUn computes one when left out)")
    p.add_argument("--no-evaluate", dest="evaluate", action="store_const", const=False, help="skip UA/RA/TA/MIA")
    p.add_argument("--mia-shadow-size", type=int, help="subsample the MIA's shadow sets to this size")
    p.add_argument("--out", help="output folder (default runs/unlearn-<method>-<timestamp>)")
    add_distributed_args(p)
    p.set_defaults(handler=run_unlearn)

    p = sub.add_parser("evaluate", help="UA, RA, TA, MIA-Efficacy of a checkpoint (and gaps to a Retrain one)")
    _add_common(p, "evaluate")
    _add_data(p, forget=True)
    p.add_argument("--checkpoint", help="the model to evaluate")
    p.add_argument("--retrain", help="a Retrain checkpoint: also report the gaps and the Avg. Gap")
    p.add_argument("--mia-shadow-size", type=int, help="subsample the MIA's shadow sets to this size")
    p.add_argument("--out", help="JSON file for the metrics (default: print only)")
    p.set_defaults(handler=run_evaluate)

    p = sub.add_parser("reproduce", help="methods x seeds x forgetting ratios -> the paper's Table 1 and Figure 1")
    _add_common(p, "reproduce")
    _add_data(p, forget=False)
    p.add_argument("--model", help="architecture (default: the dataset preset's)")
    p.add_argument("--model-option", action="append", help="builder option KEY=VALUE, e.g. width=16")
    p.add_argument("--methods", nargs="+", help="method names, or 'paper' (the ten of Table 1, default) / 'all'")
    p.add_argument("--ratios", type=float, nargs="+", help="random forgetting ratios (default 0.1 0.5)")
    p.add_argument("--forget-class", type=int, nargs="+", help="also a class-wise scenario for these classes")
    p.add_argument("--seeds", type=int, nargs="+", help="evaluation seeds (trials; default 1)")
    p.add_argument("--tune-seeds", type=int, nargs="+", help="seeds for --sweep only (must differ from --seeds)")
    p.add_argument("--sweep", action="append", help="METHOD.PARAM=V1,V2,...: pick the best on --tune-seeds")
    p.add_argument("--set", action="append", help="METHOD.PARAM=VALUE hyperparameter override (repeatable)")
    p.add_argument("--preset", help="'auto' (the dataset's settings, default), a preset name, or 'none' (the paper's)")
    p.add_argument("--original-epochs", type=int, help="epochs of the original model (default: the preset's)")
    p.add_argument("--original-lr", type=float, help="lr of the original model (default 0.1)")
    p.add_argument("--mia-shadow-size", type=int, help="subsample the MIA's shadow sets (CPU budgets)")
    p.add_argument("--save-models", action="store_const", const=True, help="keep every unlearned model")
    p.add_argument("--out", help="output folder (default runs/reproduce-<dataset>-<timestamp>)")
    p.set_defaults(handler=run_reproduce)


# ------------------------------------------------------------------------------------------------ helpers
def _threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _options(args: argparse.Namespace, checkpoint_dir: Path | None = None, ctx=None):
    """RunOptions from the flags; under torchrun (ctx distributed) the rank's device, DDP and the mask group."""
    from salun_ext.train import RunOptions

    distributed = ctx is not None and ctx.is_distributed
    return RunOptions(
        device=str(ctx.device) if ctx is not None else args.device,
        distributed=ctx.engine_mode if distributed else "none",
        process_group=ctx.group if distributed else None,
        seed=args.seed,
        amp=args.amp,
        channels_last=bool(args.channels_last),
        compile=bool(args.compile),
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        resume=bool(args.resume),
        progress=bool(args.progress),
    )


def _protocol(args: argparse.Namespace):
    from salun_ext.classification.protocols import get_protocol

    return get_protocol(args.protocol)


def _preset(args: argparse.Namespace) -> dict:
    from salun_ext.classification.presets import preset_for
    from salun_ext.data import dataset_key

    return preset_for(dataset_key(args.dataset))


def _load_data(args: argparse.Namespace):
    """The training and test sets; the training set cut to --train-subset (default: the dataset preset's)."""
    from salun_ext.classification.workflows import load_train_test

    subset = args.train_subset if args.train_subset is not None else _preset(args).get("train_subset")
    return load_train_test(args.dataset, args.data_root, download=bool(args.download), train_subset=subset)


def _load_split(args: argparse.Namespace, spec=None):
    """The forget split the options describe (the checkpoint's model must fit the data)."""
    from salun_ext.classification.workflows import check_spec_fits, forget_split, read_forget_indices

    train, test = _load_data(args)
    if spec is not None:
        check_spec_fits(spec, train)
    indices = read_forget_indices(args.forget_indices) if args.forget_indices is not None else None
    return forget_split(
        train,
        test,
        ratio=args.forget_ratio,
        classes=args.forget_class,
        indices=indices,
        forget_seed=args.forget_seed,
        split_seed=args.split_seed,
        val_fraction=args.val_fraction,
    )


def _augment(args: argparse.Namespace):
    from salun_ext.data import resolve_augment

    return resolve_augment(args.augment, args.dataset)


def _output_folder(folder: Path, ctx=None):
    """The run's output folder, checked and locked on rank 0 (the rank that writes); other ranks only wait."""
    import contextlib

    from salun_ext.utils import OutputFolder

    if ctx is not None and not ctx.is_main:
        return contextlib.nullcontext()
    return OutputFolder(folder, what="--out")


def _timestamp() -> str:
    import datetime

    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _print_metrics(metrics: dict[str, float]) -> None:
    print("  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))


# ------------------------------------------------------------------------------------------------ handlers
def run_train(args: argparse.Namespace) -> int:
    _threads(args)
    with distributed_session(args) as ctx, _output_folder(_train_out(args).parent, ctx):
        return _train(args, ctx)


def _train_out(args: argparse.Namespace) -> Path:
    from salun_ext.data import dataset_key

    model_name = args.model or _preset(args).get("model", "resnet18")
    return Path(args.out or f"runs/train-{dataset_key(args.dataset)}-{model_name}/model.safetensors")


def _train(args: argparse.Namespace, ctx) -> int:
    from salun_ext.classification import OriginalData, OriginalTrainConfig, train_original
    from salun_ext.data import dataset_key, train_val_split
    from salun_ext.models import ModelSpec, save_classifier
    from salun_ext.utils import write_json

    preset, protocol = _preset(args), _protocol(args)
    train_full, test = _load_data(args)
    split_seed = protocol.original_split_seed or args.split_seed  # paper: its original trains on the seed-1 split
    train_idx, val_idx = train_val_split(train_full.labels, args.val_fraction, split_seed)
    model_name = args.model or preset.get("model", "resnet18")
    options = parse_assignments(args.model_option or [], qualified=False, what="--model-option") or preset.get(
        "model_options", {}
    )
    options = {**protocol.model_options(dataset_key(args.dataset)), **options}
    spec = ModelSpec(model_name, train_full.channels, train_full.num_classes, train_full.image_size, options)
    config = OriginalTrainConfig(
        **{
            "batch_size": args.batch_size or preset.get("batch_size", 256),
            **preset.get("original", {}),
            **protocol.original_overrides,
            **({"epochs": args.epochs} if args.epochs else {}),
            **({"lr": args.lr} if args.lr else {}),
        }
    )
    out = _train_out(args)
    data = OriginalData(train_full.subset(train_idx), train_full.subset(val_idx), test)
    model, trained = train_original(
        spec, data, config, _options(args, out.parent / "ckpt", ctx), augment=_augment(args), evaluate=ctx.is_main
    )
    if not ctx.is_main:  # rank 0 evaluates and writes; the others wait for it (the group closes together)
        ctx.barrier()
        return 0
    record = {
        "dataset": dataset_key(args.dataset),
        "model": dataclasses.asdict(spec),
        **trained,
        "split_seed": split_seed,
        "val_fraction": args.val_fraction,
        "protocol": protocol.name,
        "seed": args.seed,
    }
    save_classifier(out, model, spec, extra={"dataset": record["dataset"]})
    write_json(record, out.with_suffix(".json"))
    shutil.rmtree(out.parent / "ckpt", ignore_errors=True)
    print(
        f"trained {spec.describe()} in {record['seconds']:.1f} s: train {record['train_accuracy']:.2f}%, test "
        f"{record['test_accuracy']:.2f}% -> {out}"
    )
    ctx.barrier()
    return 0


def _model_and_split(args: argparse.Namespace, device=None):
    """The --checkpoint model (on `device`, default --device), its spec, and the forget split the options describe."""
    from salun_ext.models import load_classifier
    from salun_ext.utils import UsageError, resolve_device

    if not args.checkpoint:
        raise UsageError(f"`{args.command}` needs --checkpoint (a model written by `salun-ext train`)")
    model, spec, _ = load_classifier(args.checkpoint)
    split = _load_split(args, spec)
    device = resolve_device(args.device) if device is None else device
    return model.to(device), spec, split, device


def run_mask(args: argparse.Namespace) -> int:
    from salun_ext.classification import forget_saliency
    from salun_ext.data import Batches

    _threads(args)
    with distributed_session(args) as ctx, _output_folder(_mask_folder(args), ctx):
        model, _, split, device = _model_and_split(args, ctx.device)
        forget = split.forget.to(device)
        # the paper code's mask loader shuffles and augments; by default the mask sees the data itself
        augmented = _protocol(args).for_method("salun").get("mask_batches") == "augmented"
        augment = _augment(args) if augmented else None
        batches = Batches(forget.images, forget.labels, batch_size=args.batch_size or 256, shuffle=augmented,
                          augment=augment, seed=args.seed, stream="rl.forget")  # fmt: skip
        # under torchrun every rank takes the whole forget set and the ranking is shared: the one-process mask
        group = ctx.group if ctx.is_distributed else None
        masks = forget_saliency(
            model, batches, [float(r) for r in args.ratios], progress=bool(args.progress), process_group=group
        )
        if ctx.is_main:
            _write_masks(args, split, masks)
        ctx.barrier()
    return 0


def _mask_folder(args: argparse.Namespace) -> Path:
    from salun_ext.utils import UsageError

    if not args.out and not args.checkpoint:
        raise UsageError("`mask` needs --checkpoint (a model written by `salun-ext train`)")
    return Path(args.out or Path(args.checkpoint).parent / "masks")


def _write_masks(args: argparse.Namespace, split, masks) -> None:
    from salun_ext.utils import write_json

    out = _mask_folder(args)
    for ratio, mask in zip(args.ratios, masks):
        mask.save(out / f"with_{ratio:g}.safetensors")
        print(
            f"ratio {ratio:g}: {mask.count()} of {mask.numel} weights salient -> {out / f'with_{ratio:g}.safetensors'}"
        )
    write_json(
        {"checkpoint": str(args.checkpoint), "split": split.describe(), "ratios": list(args.ratios)}, out / "mask.json"
    )


def run_unlearn(args: argparse.Namespace) -> int:
    from salun_ext.utils import UsageError

    _threads(args)
    if not args.method:
        raise UsageError("`unlearn` needs --method (e.g. salun)")
    if not args.out:
        args.out = f"runs/unlearn-{args.method}-{_timestamp()}"
    with distributed_session(args) as ctx:
        with _output_folder(Path(args.out), ctx):
            code = _unlearn(args, ctx)
        ctx.barrier()  # the other ranks wait while rank 0 evaluates and writes
    return code


def _unlearn(args: argparse.Namespace, ctx) -> int:
    from salun_ext.classification import UnlearnData, get_method, method_key, unlearn_and_evaluate
    from salun_ext.mask import SaliencyMask
    from salun_ext.models import save_classifier
    from salun_ext.utils import write_json

    model, spec, split, _ = _model_and_split(args, ctx.device)
    preset = _preset(args)
    name = method_key(args.method)
    protocol = _protocol(args)  # preset < protocol < --set
    params = {**preset.get("methods", {}).get(name, {}), **protocol.for_method(name)}
    method = get_method(name, **{**params, **parse_assignments(args.set or [], qualified=False)})
    mask = None
    if args.mask:
        mask = SaliencyMask.load(args.mask)
        mask.check_compatible(model, what=f"checkpoint {args.checkpoint}", require_all=False)
    out = Path(args.out)
    data = UnlearnData(
        split.forget,
        split.retain,
        num_classes=spec.num_classes,
        batch_size=args.batch_size or preset.get("batch_size", 256),
        augment=_augment(args),
    )
    result, outcome = unlearn_and_evaluate(
        method,
        model,
        split,
        data,
        _options(args, out / "ckpt", ctx),
        mask=mask,
        evaluate=bool(args.evaluate) and ctx.is_main,
        mia_shadow_size=args.mia_shadow_size,
    )
    if not ctx.is_main:
        return 0
    record = {**outcome, "checkpoint": str(args.checkpoint), "mask": args.mask, "seed": args.seed}
    record["protocol"] = protocol.name
    if "shadow_class" in result.info:  # the paper protocol's BE keeps its (C+1)-way head: the checkpoint says so
        spec = dataclasses.replace(spec, num_classes=spec.num_classes + 1)
    print(f"{method.label}: unlearned in {result.seconds:.2f} s ({result.minutes:.3f} min)")
    if "metrics" in record:
        _print_metrics(record["metrics"])
    save_classifier(out / "model.safetensors", model, spec, extra={"method": name})
    written = ["model.safetensors", "run.json"]
    if result.mask is not None:  # the mask the method computed (SalUn without --mask)
        result.mask.save(out / "mask.safetensors")
        written.append("mask.safetensors")
    write_json(record, out / "run.json")
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    stale = [p for p in UNLEARN_OUTPUTS if p not in written and (out / p).is_file()]
    for name in stale:  # an earlier run's file in a reused folder must not pass for this run's
        (out / name).unlink()
    print(f"-> {out}/{', '.join(written)}" + (f" (removed the earlier run's {', '.join(stale)})" if stale else ""))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from salun_ext.classification.evaluation import avg_gap, evaluate_unlearning, gaps
    from salun_ext.models import load_classifier
    from salun_ext.utils import write_json
    from salun_ext.utils.files import check_output_folder

    single_process_only("evaluate")
    _threads(args)
    if args.out:  # before the work: a folder that cannot take the file fails now, not after the evaluation
        check_output_folder(Path(args.out).parent, what="--out")
    model, spec, split, device = _model_and_split(args)
    metrics = evaluate_unlearning(
        model, split.forget, split.retain, split.test, mia_shadow_size=args.mia_shadow_size, seed=args.seed
    )
    record: dict[str, Any] = {"checkpoint": str(args.checkpoint), "split": split.describe(), "metrics": metrics}
    _print_metrics(metrics)
    if args.retrain:
        reference, _, _ = load_classifier(args.retrain, expect=spec)
        ref = evaluate_unlearning(
            reference.to(device),
            split.forget,
            split.retain,
            split.test,
            mia_shadow_size=args.mia_shadow_size,
            seed=args.seed,
        )
        record["retrain_metrics"] = ref
        record["gap"] = gaps(metrics, ref)
        record["avg_gap"] = avg_gap(record["gap"])
        print(
            "gap to Retrain: "
            + "  ".join(f"{k} {v:.2f}" for k, v in record["gap"].items())
            + f"  Avg. Gap {record['avg_gap']:.2f}"
        )
    if args.out:
        write_json(record, args.out)
    return 0


def build_experiment_config(args: argparse.Namespace):
    """An ExperimentConfig from resolved `reproduce` options."""
    from salun_ext.classification import EXTRA_METHODS, PAPER_METHODS
    from salun_ext.classification.experiment import ExperimentConfig

    methods: list[str] = []
    for m in args.methods:
        methods += PAPER_METHODS if m == "paper" else [*PAPER_METHODS, *EXTRA_METHODS] if m == "all" else [m]
    original = {}
    if args.original_epochs:
        original["epochs"] = args.original_epochs
    if args.original_lr:
        original["lr"] = args.original_lr
    model_options = (
        parse_assignments(args.model_option, qualified=False, what="--model-option") if args.model_option else None
    )
    return ExperimentConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        download=bool(args.download),
        model=args.model,
        model_options=model_options,
        methods=list(dict.fromkeys(methods)),
        ratios=[float(r) for r in args.ratios],
        forget_classes=args.forget_class,
        seeds=list(args.seeds),
        split_seed=args.split_seed,
        val_fraction=args.val_fraction,
        train_subset=args.train_subset,
        batch_size=args.batch_size,
        augment=args.augment,
        original=original,
        method_overrides=parse_assignments(args.set or [], qualified=True),
        preset=args.preset,
        tune_seeds=list(args.tune_seeds or []),
        sweeps=parse_sweeps(args.sweep or []),
        mia_shadow_size=args.mia_shadow_size,
        save_models=bool(args.save_models),
        out_dir=args.out,
        protocol=args.protocol,
        run=_options(args),
    )


def run_reproduce(args: argparse.Namespace) -> int:
    from salun_ext.classification.experiment import reproduce

    single_process_only("reproduce")
    _threads(args)
    reproduce(build_experiment_config(args))
    return 0
