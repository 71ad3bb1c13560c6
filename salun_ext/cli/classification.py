"""Classification commands: `train`, `mask`, `unlearn`, `evaluate`, `reproduce`.

    salun-ext train --dataset cifar10 --data-root ~/data --model resnet18 --out runs/c10/model.safetensors
    salun-ext mask --checkpoint runs/c10/model.safetensors --dataset cifar10 --forget-ratio 0.1 --ratios 0.5
    salun-ext unlearn --checkpoint runs/c10/model.safetensors --dataset cifar10 --forget-ratio 0.1 --method salun
    salun-ext evaluate --checkpoint runs/c10/unlearn-salun/model.safetensors --dataset cifar10 --forget-ratio 0.1
    salun-ext reproduce                       # the embedded digits, all ten paper methods, table + plot

Every option can also come from a YAML/JSON file (`--config run.yaml`, keys = option names with '_' or '-');
flags given on the command line win over the file, the file wins over the defaults. Method hyperparameters:
`--set lr=0.01` (unlearn) or `--set salun.lr=0.013` (reproduce), repeatable, or a `set:` mapping in the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from salun_ext.cli.distributed_args import add_distributed_args, distributed_session, single_process_only

# Real defaults live here, not in argparse: an option left out (None) falls back to the config file, then to these.
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
}
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {"reproduce": {"ratios": [0.1, 0.5]}}  # the paper's two columns


# ------------------------------------------------------------------------------------------------ parsing
def parse_value(text: str) -> Any:
    """'3' -> 3, '1e-4' -> 1e-4, 'true' -> True, 'none' -> None, '[1, 2]' -> [1, 2], else the string."""
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if text[:1] in "[{(":
        import yaml

        return yaml.safe_load(text.replace("(", "[").replace(")", "]"))
    return text


def parse_assignments(items: list[str] | dict, *, qualified: bool, what: str = "--set") -> dict:
    """['salun.lr=0.01', ...] -> {'salun': {'lr': 0.01}} (qualified) or ['lr=0.01'] -> {'lr': 0.01}."""
    if isinstance(items, dict):  # from a config file
        return {k: dict(v) for k, v in items.items()} if qualified else dict(items)
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} {item!r}: expected KEY=VALUE")
        key = key.strip()
        if qualified:
            method, dot, param = key.partition(".")
            if not dot or not param:
                raise ValueError(f"{what} {item!r}: expected METHOD.PARAM=VALUE (e.g. salun.lr=0.013)")
            out.setdefault(method, {})[param] = parse_value(value)
        else:
            out[key] = parse_value(value)
    return out


def parse_sweeps(items: list[str] | dict) -> dict[str, dict[str, list]]:
    """['ga.lr=1e-5,1e-4'] -> {'ga': {'lr': [1e-5, 1e-4]}}."""
    if isinstance(items, dict):
        return {m: {p: list(v) for p, v in grid.items()} for m, grid in items.items()}
    out: dict[str, dict[str, list]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        method, dot, param = key.strip().partition(".")
        if not sep or not dot or not values:
            raise ValueError(f"--sweep {item!r}: expected METHOD.PARAM=V1,V2,... (e.g. ga.lr=1e-5,1e-4,1e-3)")
        out.setdefault(method, {})[param] = [parse_value(v) for v in values.split(",")]
    return out


def load_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON mapping of option names to values."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    text = p.read_text()
    if p.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill options left out on the command line from the config file, then from DEFAULTS."""
    from_file = load_config_file(args.config) if getattr(args, "config", None) else {}
    known = set(vars(args))
    unknown = sorted(set(from_file) - known)
    if unknown:
        raise ValueError(f"{args.config}: unknown option(s) {unknown} for `{args.command}`")
    defaults = {**DEFAULTS, **COMMAND_DEFAULTS.get(args.command, {})}
    for key in known:
        if getattr(args, key) is None:
            if key in from_file:
                setattr(args, key, from_file[key])
            elif key in defaults:
                setattr(args, key, defaults[key])
    return args


# ------------------------------------------------------------------------------------------------ options
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/JSON file with option values (flags win over it)")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    g.add_argument("--seed", type=int, help="seed of the training / unlearning randomness (default 1)")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], help="mixed precision (default none)")
    g.add_argument("--channels-last", action="store_const", const=True, help="channels_last memory format")
    g.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bars")
    g.add_argument("--resume", action="store_const", const=True, help="continue an interrupted run in --out")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


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
    _add_common(p)
    _add_data(p, forget=False)
    p.add_argument("--model", help="small_cnn, resnet18, resnet50, vgg16_bn (default: the dataset preset's)")
    p.add_argument("--model-option", action="append", help="builder option KEY=VALUE, e.g. width=16")
    p.add_argument("--epochs", type=int, help="epochs (default: the preset's, else the paper's 182)")
    p.add_argument("--lr", type=float, help="learning rate (default 0.1, x0.1 at 50%% and 75%% of the epochs)")
    p.add_argument("--out", help="checkpoint path (default runs/train-<dataset>-<model>/model.safetensors)")
    add_distributed_args(p)
    p.set_defaults(handler=run_train)

    p = sub.add_parser("mask", help="compute SalUn saliency masks for a forget set")
    _add_common(p)
    _add_data(p, forget=True)
    p.add_argument("--checkpoint", help="the original model (salun_ext safetensors checkpoint)")
    p.add_argument("--ratios", type=float, nargs="+", help="mask ratios (default 0.5)")
    p.add_argument("--out", help="folder for with_<ratio>.safetensors (default: masks/ next to the checkpoint)")
    add_distributed_args(p)
    p.set_defaults(handler=run_mask)

    p = sub.add_parser("unlearn", help="run one unlearning method on a checkpoint")
    _add_common(p)
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
    _add_common(p)
    _add_data(p, forget=True)
    p.add_argument("--checkpoint", help="the model to evaluate")
    p.add_argument("--retrain", help="a Retrain checkpoint: also report the gaps and the Avg. Gap")
    p.add_argument("--mia-shadow-size", type=int, help="subsample the MIA's shadow sets to this size")
    p.add_argument("--out", help="JSON file for the metrics (default: print only)")
    p.set_defaults(handler=run_evaluate)

    p = sub.add_parser("reproduce", help="methods x seeds x forgetting ratios -> the paper's Table 1 and Figure 1")
    _add_common(p)
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
def _setup(args: argparse.Namespace) -> argparse.Namespace:
    args = resolve(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args


def _options(args: argparse.Namespace, checkpoint_dir: Path | None = None, ctx=None):
    """RunOptions from the flags; under torchrun (ctx distributed) the rank's device, DDP and the mask group."""
    from salun_ext.unlearn import RunOptions

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


def _preset(args: argparse.Namespace) -> dict:
    from salun_ext.data import dataset_key
    from salun_ext.unlearn.presets import preset_for

    return preset_for(dataset_key(args.dataset))


def _load_data(args: argparse.Namespace):
    """(training set, test set) of --dataset, the training set cut to --train-subset when given."""
    from salun_ext.data import class_balanced_subset, load_dataset

    train = load_dataset(args.dataset, args.data_root, train=True, download=bool(args.download))
    test = load_dataset(args.dataset, args.data_root, train=False, download=bool(args.download))
    if args.train_subset:
        train = train.subset(class_balanced_subset(train.labels, args.train_subset))
    return train, test


def _load_split(args: argparse.Namespace, spec=None):
    """Datasets and the forget split the options describe; checks the checkpoint fits the data."""
    from salun_ext.data import make_unlearning_split

    train, test = _load_data(args)
    if spec is not None:
        shape = (train.channels, train.num_classes, train.image_size)
        if (spec.in_channels, spec.num_classes, spec.image_size) != shape:
            raise ValueError(
                f"the checkpoint is a {spec.describe()}, but {train.name} has {train.channels} channel(s), "
                f"{train.num_classes} classes and {train.image_size}px images"
            )
    given = [args.forget_ratio is not None, bool(args.forget_class), args.forget_indices is not None]
    if sum(given) != 1:
        raise ValueError("give exactly one of --forget-ratio, --forget-class, --forget-indices")
    indices = None
    if args.forget_indices is not None:
        indices = json.loads(Path(args.forget_indices).read_text())
        if not isinstance(indices, list):
            raise ValueError(f"{args.forget_indices}: expected a JSON list of indices")
    return make_unlearning_split(
        train,
        test,
        ratio=args.forget_ratio,
        classes=args.forget_class or None,
        forget_seed=args.forget_seed,
        split_seed=args.split_seed,
        val_fraction=args.val_fraction,
        forget_idx=indices,
    )


def _augment(args: argparse.Namespace):
    from salun_ext.data import resolve_augment

    return resolve_augment(args.augment, args.dataset)


def _timestamp() -> str:
    import datetime

    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _print_metrics(metrics: dict[str, float]) -> None:
    print("  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))


# ------------------------------------------------------------------------------------------------ handlers
def _clean_errors(handler):
    """Bad input (ValueError, FileNotFoundError, ...) -> one 'error:' line on stderr and exit status 2."""
    import functools

    @functools.wraps(handler)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ValueError, FileNotFoundError, TypeError, KeyError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"salun-ext {args.command}: error: {message}", file=sys.stderr)
            return 2

    return wrapped


@_clean_errors
def run_train(args: argparse.Namespace) -> int:

    args = _setup(args)
    with distributed_session(args) as ctx:
        return _train(args, ctx)


def _train(args: argparse.Namespace, ctx) -> int:
    from salun_ext.data import dataset_key, train_val_split
    from salun_ext.evaluation import accuracy, write_json
    from salun_ext.models import ModelSpec, save_classifier
    from salun_ext.unlearn import OriginalTrainConfig, train_classifier

    preset = _preset(args)
    train_full, test = _load_data(args)
    train_idx, val_idx = train_val_split(train_full.labels, args.val_fraction, args.split_seed)
    model_name = args.model or preset.get("model", "resnet18")
    options = parse_assignments(args.model_option or [], qualified=False, what="--model-option") or preset.get(
        "model_options", {}
    )
    spec = ModelSpec(model_name, train_full.channels, train_full.num_classes, train_full.image_size, options)
    config = OriginalTrainConfig(
        **{
            "batch_size": args.batch_size or preset.get("batch_size", 256),
            **preset.get("original", {}),
            **({"epochs": args.epochs} if args.epochs else {}),
            **({"lr": args.lr} if args.lr else {}),
        }
    )
    out = Path(args.out or f"runs/train-{dataset_key(args.dataset)}-{model_name}/model.safetensors")
    model = spec.build()
    info = train_classifier(
        model, train_full.subset(train_idx), config, _options(args, out.parent / "ckpt", ctx), augment=_augment(args)
    )
    if not ctx.is_main:  # rank 0 evaluates and writes; the others wait for it (the group closes together)
        ctx.barrier()
        return 0
    record = {
        "dataset": dataset_key(args.dataset),
        "model": dataclasses.asdict(spec),
        "config": dataclasses.asdict(config),
        "seconds": info["seconds"],
        "train_accuracy": accuracy(model, train_full.subset(train_idx)),
        "val_accuracy": accuracy(model, train_full.subset(val_idx)) if len(val_idx) else None,
        "test_accuracy": accuracy(model, test),
        "split_seed": args.split_seed,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
    }
    save_classifier(out, model, spec, extra={"dataset": record["dataset"]})
    write_json(record, out.with_suffix(".json"))
    shutil.rmtree(out.parent / "ckpt", ignore_errors=True)
    print(
        f"trained {spec.describe()} in {info['seconds']:.1f} s: train {record['train_accuracy']:.2f}%, test "
        f"{record['test_accuracy']:.2f}% -> {out}"
    )
    ctx.barrier()
    return 0


def _model_and_split(args: argparse.Namespace, device=None):
    """The --checkpoint model (on `device`, default --device), its spec, and the forget split the options describe."""
    from salun_ext.models import load_classifier
    from salun_ext.utils import resolve_device

    if not args.checkpoint:
        raise ValueError(f"`{args.command}` needs --checkpoint (a model written by `salun-ext train`)")
    model, spec, _ = load_classifier(args.checkpoint)
    split = _load_split(args, spec)
    device = resolve_device(args.device) if device is None else device
    return model.to(device), spec, split, device


@_clean_errors
def run_mask(args: argparse.Namespace) -> int:
    from salun_ext.data import Batches
    from salun_ext.unlearn import forget_saliency

    args = _setup(args)
    with distributed_session(args) as ctx:
        model, _, split, device = _model_and_split(args, ctx.device)
        forget = split.forget.to(device)
        batches = Batches(forget.images, forget.labels, batch_size=args.batch_size or 256, shuffle=False)
        # under torchrun every rank takes the whole forget set and the ranking is shared: the one-process mask
        group = ctx.group if ctx.is_distributed else None
        masks = forget_saliency(
            model, batches, [float(r) for r in args.ratios], progress=bool(args.progress), process_group=group
        )
        if ctx.is_main:
            _write_masks(args, split, masks)
        ctx.barrier()
    return 0


def _write_masks(args: argparse.Namespace, split, masks) -> None:
    from salun_ext.evaluation import write_json

    out = Path(args.out or Path(args.checkpoint).parent / "masks")
    out.mkdir(parents=True, exist_ok=True)
    for ratio, mask in zip(args.ratios, masks):
        mask.save(out / f"with_{ratio:g}.safetensors")
        print(
            f"ratio {ratio:g}: {mask.count()} of {mask.numel} weights salient -> {out / f'with_{ratio:g}.safetensors'}"
        )
    write_json(
        {"checkpoint": str(args.checkpoint), "split": split.describe(), "ratios": list(args.ratios)}, out / "mask.json"
    )


@_clean_errors
def run_unlearn(args: argparse.Namespace) -> int:

    args = _setup(args)
    if not args.method:
        raise ValueError("`unlearn` needs --method (e.g. salun)")
    with distributed_session(args) as ctx:
        code = _unlearn(args, ctx)
        ctx.barrier()  # the other ranks wait while rank 0 evaluates and writes
    return code


def _unlearn(args: argparse.Namespace, ctx) -> int:
    from salun_ext.evaluation import evaluate_unlearning, write_json
    from salun_ext.mask import SaliencyMask
    from salun_ext.models import save_classifier
    from salun_ext.unlearn import UnlearnData, get_method, method_key

    model, spec, split, _ = _model_and_split(args, ctx.device)
    preset = _preset(args)
    name = method_key(args.method)
    params = {**preset.get("methods", {}).get(name, {}), **parse_assignments(args.set or [], qualified=False)}
    method = get_method(name, **params)
    mask = None
    if args.mask:
        mask = SaliencyMask.load(args.mask)
        mask.check_compatible(model, what=f"checkpoint {args.checkpoint}", require_all=False)
    out = Path(args.out or f"runs/unlearn-{name}-{_timestamp()}")
    data = UnlearnData(
        split.forget,
        split.retain,
        num_classes=spec.num_classes,
        batch_size=args.batch_size or preset.get("batch_size", 256),
        augment=_augment(args),
    )
    result = method.run(model, data, _options(args, out / "ckpt", ctx), mask=mask)
    if not ctx.is_main:
        return 0
    record = {
        "method": name,
        "label": method.label,
        "config": dataclasses.asdict(method.config),
        "checkpoint": str(args.checkpoint),
        "mask": args.mask,
        "split": split.describe(),
        "seed": args.seed,
        "rte_seconds": result.seconds,
        "info": {k: v for k, v in result.info.items() if k != "history"},
        "history": result.info.get("history"),
    }
    print(f"{method.label}: unlearned in {result.seconds:.2f} s ({result.minutes:.3f} min)")
    if args.evaluate:
        record["metrics"] = evaluate_unlearning(
            model, split.forget, split.retain, split.test, mia_shadow_size=args.mia_shadow_size, seed=args.seed
        )
        _print_metrics(record["metrics"])
    save_classifier(out / "model.safetensors", model, spec, extra={"method": name})
    written = "model.safetensors, run.json"
    if result.mask is not None:  # the mask the method computed (SalUn without --mask)
        result.mask.save(out / "mask.safetensors")
        written += ", mask.safetensors"
    write_json(record, out / "run.json")
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    print(f"-> {out}/{written}")
    return 0


@_clean_errors
def run_evaluate(args: argparse.Namespace) -> int:
    from salun_ext.evaluation import avg_gap, evaluate_unlearning, gaps, write_json
    from salun_ext.models import load_classifier

    single_process_only("evaluate")
    args = _setup(args)
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
    from salun_ext.experiment import ExperimentConfig
    from salun_ext.unlearn import EXTRA_METHODS, PAPER_METHODS

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
        device=args.device,
        amp=args.amp,
        channels_last=bool(args.channels_last),
        compile=bool(args.compile),
        progress=bool(args.progress),
        resume=bool(args.resume),
    )


@_clean_errors
def run_reproduce(args: argparse.Namespace) -> int:
    from salun_ext.experiment import reproduce

    single_process_only("reproduce")
    args = _setup(args)
    reproduce(build_experiment_config(args))
    return 0
