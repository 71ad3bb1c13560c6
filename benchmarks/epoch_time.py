"""GPU timings of the issue's figures on CIFAR-10-shaped data (45k x 3 x 32 x 32, random pixels and labels):

    * one training epoch of ResNet-18 (CIFAR stem) through the Engine, data on the device (`Batches` + crop/flip);
    * SalUn's RTE: the saliency mask + 10 epochs of masked RL at 10% forgetting (target on an H200: <= 0.3 min;
      the paper: 2.66 min);
    * Retrain: 160 epochs on the retain set, extrapolated from `--measure-epochs` epochs unless --full-retrain
      (target <= 2 min; the paper: 43 min).

    python benchmarks/epoch_time.py                       # on a GPU machine: the figures, as a table + JSON
    python benchmarks/epoch_time.py --amp bf16 --channels-last --compile
    python benchmarks/epoch_time.py --device cpu --n 256 --model small_cnn --salun-epochs 1   # a CPU smoke run

Timings exclude the first (warm-up) epoch's compilation where noted; every figure synchronises the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from salun_ext.classification import (  # noqa: E402
    OriginalTrainConfig,
    RunOptions,
    UnlearnData,
    get_method,
    train_original_model,
)
from salun_ext.classification.experiment import machine_description  # noqa: E402
from salun_ext.data import Augment, ImageDataset  # noqa: E402
from salun_ext.models import build_model  # noqa: E402
from salun_ext.utils import resolve_device  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--n", type=int, default=45000, help="training images (CIFAR-10 after the val hold-out: 45000)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--forget-ratio", type=float, default=0.1)
    p.add_argument("--measure-epochs", type=int, default=3, help="epochs timed for the per-epoch figure")
    p.add_argument("--salun-epochs", type=int, default=10)
    p.add_argument("--retrain-epochs", type=int, default=160)
    p.add_argument("--full-retrain", action="store_true", help="run all retrain epochs instead of extrapolating")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", help="write the figures as JSON here")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    gen = torch.Generator().manual_seed(0)
    shape = (args.n, args.channels, args.image_size, args.image_size)
    images = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, args.classes, (args.n,), generator=gen)
    data = ImageDataset(images, labels, [str(i) for i in range(args.classes)], "cifar10-shaped").to(device)
    augment = Augment(pad=4, flip=True)
    options = RunOptions(
        device=str(device), seed=0, amp=args.amp, channels_last=args.channels_last, compile=args.compile, progress=False
    )

    def model():
        return build_model(args.model, args.channels, args.classes, args.image_size).to(device)

    # warm-up epoch (cuDNN autotuning, torch.compile), then the timed epochs
    warm = OriginalTrainConfig(epochs=1, lr=0.1, batch_size=args.batch_size, milestones=())
    train_original_model(model(), data, warm, options, augment=augment)
    timed = dataclasses.replace(warm, epochs=args.measure_epochs)
    _sync(device)
    start = time.perf_counter()
    train_original_model(model(), data, timed, options, augment=augment)
    _sync(device)
    epoch_seconds = (time.perf_counter() - start) / args.measure_epochs

    n_forget = int(args.forget_ratio * args.n)
    perm = torch.randperm(args.n, generator=gen).to(device)
    split = UnlearnData(
        data.subset(perm[:n_forget]), data.subset(perm[n_forget:]), args.classes, args.batch_size, augment
    )
    salun = get_method("salun", epochs=args.salun_epochs).run(model(), split, options)

    retrain_epochs = args.retrain_epochs if args.full_retrain else args.measure_epochs
    retrain = get_method("retrain", epochs=retrain_epochs).run(model(), split, options)
    retrain_seconds = retrain.seconds * (args.retrain_epochs / retrain_epochs)

    return {
        "machine": machine_description(device),
        "torch": torch.__version__,
        "model": args.model,
        "data": list(shape),
        "batch_size": args.batch_size,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "epoch_seconds": epoch_seconds,
        "salun_rte_minutes": salun.seconds / 60,
        "salun_epochs": args.salun_epochs,
        "retrain_minutes": retrain_seconds / 60,
        "retrain_epochs": args.retrain_epochs,
        "retrain_extrapolated": not args.full_retrain,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(
        f"{result['machine']}, torch {result['torch']}, {result['model']}, data {result['data']}, "
        f"batch {result['batch_size']}, amp {result['amp']}, channels_last {result['channels_last']}, "
        f"compile {result['compile']}"
    )
    print(
        f"| epoch (s) | SalUn RTE, {result['salun_epochs']} epochs + mask (min) | "
        f"Retrain, {result['retrain_epochs']} epochs (min) |"
    )
    print("|---:|---:|---:|")
    extrapolated = " (extrapolated)" if result["retrain_extrapolated"] else ""
    print(
        f"| {result['epoch_seconds']:.2f} | {result['salun_rte_minutes']:.3f} | "
        f"{result['retrain_minutes']:.2f}{extrapolated} |"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
