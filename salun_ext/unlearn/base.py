"""The contract every classification unlearning method follows.

A method is a small class: a `Config` dataclass whose defaults are the paper's recipe, and `unlearn(model, data,
options, mask)`, which changes the model in place. Methods that train describe their work as a Task and call
`self.fit(...)`, which runs it on the shared Engine (optimizer, masks, schedules, AMP, checkpoints, resume);
methods that do not train (IU, SSD) compute their update directly. `run()` wraps `unlearn()` with device
placement, seeding and the wall-clock timer that gives the RTE.

    method = get_method("salun", lr=0.013)           # Config overrides by keyword
    result = method.run(model, UnlearnData(forget, retain, num_classes=10), RunOptions(device="cuda", seed=1))
    result.seconds / 60                                # RTE in minutes (mask included for SalUn)
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from salun_ext.data import Augment, Batches, ImageDataset, derive_seed
from salun_ext.engine import Engine, EngineConfig, FitResult, OptimConfig
from salun_ext.mask import SaliencyMask
from salun_ext.utils import resolve_device, seed_everything


@dataclasses.dataclass
class RunOptions:
    """How a method runs (not what it does): device, seed, precision, checkpoints."""

    device: str = "auto"
    seed: int = 0
    amp: str = "none"  # "bf16" on recent GPUs
    channels_last: bool = False
    compile: bool = False
    checkpoint_dir: str | None = None  # Engine checkpoints: an interrupted run resumes from here
    resume: bool = False
    progress: bool = True
    # Under torchrun: "ddp" trains through the Engine's DistributedDataParallel (each rank takes its share of the
    # batches of every epoch). Masks are then computed on the whole forget set on every rank and ranked over
    # `process_group` (None: the default group), so every rank holds the one-process mask bit for bit.
    distributed: str = "none"
    process_group: Any = None

    def mask_group(self) -> Any:
        """The process group for compute_saliency: None in one process."""
        if self.distributed == "none":
            return None
        import torch.distributed as dist

        return self.process_group if self.process_group is not None else dist.group.WORLD


@dataclasses.dataclass
class UnlearnData:
    """The forget and retain sets (uint8 image datasets) and how to batch them."""

    forget: ImageDataset
    retain: ImageDataset
    num_classes: int | None = None  # default: the datasets' class count
    batch_size: int = 256
    augment: Augment | None = None  # training-time augmentation (the paper: crop + flip on CIFAR)

    def __post_init__(self) -> None:
        if len(self.forget) == 0:
            raise ValueError("the forget set is empty: there is nothing to unlearn")
        if len(self.retain) == 0:
            raise ValueError("the retain set is empty: the forget set is the whole training set")
        if self.forget.images.shape[1:] != self.retain.images.shape[1:]:
            raise ValueError(
                f"forget images {tuple(self.forget.images.shape[1:])} and retain images "
                f"{tuple(self.retain.images.shape[1:])} differ in shape"
            )
        if self.num_classes is None:
            self.num_classes = self.forget.num_classes
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to(self, device: torch.device | str) -> UnlearnData:
        return dataclasses.replace(self, forget=self.forget.to(device), retain=self.retain.to(device))

    @property
    def device(self) -> torch.device:
        return self.forget.device

    def loader(
        self,
        which: str,
        *,
        seed: int,
        shuffle: bool = True,
        augment: bool = True,
        batch_size: int | None = None,
    ) -> Batches:
        """Batches of (x, y) over 'forget', 'retain' or 'all' (retain then forget)."""
        if which == "all":
            images = torch.cat([self.retain.images, self.forget.images])
            labels = torch.cat([self.retain.labels, self.forget.labels])
        elif which in ("forget", "retain"):
            part = getattr(self, which)
            images, labels = part.images, part.labels
        else:
            raise ValueError(f"which must be 'forget', 'retain' or 'all', got {which!r}")
        return Batches(
            images,
            labels,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            augment=self.augment if augment else None,
            seed=seed,
        )


@dataclasses.dataclass
class UnlearnResult:
    model: nn.Module
    seconds: float  # wall clock of the whole unlearning (mask computation included): the RTE
    info: dict[str, Any]
    mask: SaliencyMask | None = None  # the mask a method computed itself (SalUn without a given mask)

    @property
    def minutes(self) -> float:
        return self.seconds / 60.0


@dataclasses.dataclass
class TrainConfig:
    """Hyperparameters shared by the methods that train (defaults: the paper's unlearning recipe)."""

    epochs: int = 10
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "constant"  # or "multistep" (x0.1 at the milestones) or "cosine"
    milestones: tuple[float, ...] = ()  # fractions of `epochs` for "multistep"
    batch_size: int | None = None  # None: UnlearnData.batch_size

    def optim(self, **changes) -> OptimConfig:
        return OptimConfig(
            self.optimizer, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, **changes
        )


class UnlearnMethod(abc.ABC):
    """Base class of every unlearning method (see the module docstring)."""

    name: ClassVar[str]  # registry key, e.g. "salun"
    label: ClassVar[str]  # as printed in tables, e.g. "SalUn"
    Config: ClassVar[type] = TrainConfig
    in_paper: ClassVar[bool] = True  # one of the paper's Table 1 methods
    trains_from_scratch: ClassVar[bool] = False  # Retrain: the given weights are discarded

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        config = config if config is not None else self.Config()
        if not isinstance(config, self.Config):
            raise TypeError(f"{self.label}: config must be a {self.Config.__name__}, got {type(config).__name__}")
        valid = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"{self.label}: unknown hyperparameter(s) {unknown}; valid: {sorted(valid)}")
        self.config = dataclasses.replace(
            config, **{k: _coerce(self.label, k, getattr(config, k), v) for k, v in overrides.items()}
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # ------------------------------------------------------------------------------------------------ run
    def run(
        self,
        model: nn.Module,
        data: UnlearnData,
        options: RunOptions | None = None,
        *,
        mask: SaliencyMask | None = None,
    ) -> UnlearnResult:
        """Unlearn `data.forget` from `model` (in place) and time it."""
        options = options or RunOptions()
        device = resolve_device(options.device)
        model.to(device)
        data = data.to(device)
        if mask is not None:
            mask.check_compatible(model, require_all=False)
            mask = mask.to(device)
        seed_everything(options.seed)
        _sync(device)
        start = time.perf_counter()
        info = self.unlearn(model, data, options, mask) or {}
        _sync(device)
        seconds = time.perf_counter() - start
        model.eval()
        computed = info.pop("mask", None)  # kept out of info, which reports serialise to JSON
        return UnlearnResult(model, seconds, info, mask=computed)

    @abc.abstractmethod
    def unlearn(
        self, model: nn.Module, data: UnlearnData, options: RunOptions, mask: SaliencyMask | None
    ) -> dict[str, Any] | None:
        """Change `model` in place; return extra information for the report (or None)."""

    # ------------------------------------------------------------------------------------------- helpers
    def fit(
        self,
        model: nn.Module,
        task: Any,
        options: RunOptions,
        *,
        mask: SaliencyMask | None = None,
        optim: OptimConfig | None = None,
        epochs: int | None = None,
    ) -> FitResult:
        """Run `task` on the shared Engine with this method's TrainConfig."""
        return fit_task(model, task, self.config, options, desc=self.label, mask=mask, optim=optim, epochs=epochs)

    def loader(self, data: UnlearnData, which: str, options: RunOptions, stream: int, **kw) -> Batches:
        """A seeded loader: `stream` separates the random streams of a method's loaders."""
        batch_size = kw.pop("batch_size", None) or getattr(self.config, "batch_size", None)
        return data.loader(which, seed=derive_seed(options.seed, stream), batch_size=batch_size, **kw)


def _coerce(label: str, key: str, current: Any, value: Any) -> Any:
    """Match an override to the field's current type (int -> float, list -> tuple); reject wrong kinds."""
    if isinstance(current, bool) or current is None or value is None:
        return value
    if isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(current, (int, float, str, tuple)) and not isinstance(value, type(current)):
        raise TypeError(f"{label}: {key} must be a {type(current).__name__}, got {value!r}")
    return value


def fit_task(
    model: nn.Module,
    task: Any,
    config: TrainConfig,
    options: RunOptions,
    *,
    desc: str = "train",
    mask: SaliencyMask | None = None,
    optim: OptimConfig | None = None,
    epochs: int | None = None,
) -> FitResult:
    """The one way a Task is trained: an Engine built from a TrainConfig and the RunOptions.

    With a mask, parameters it does not cover stay frozen; the mask mode (strict / compat) comes from `optim`.
    """
    epochs = config.epochs if epochs is None else epochs
    optim = optim or config.optim()
    if mask is not None and optim.unmasked is None:
        optim = dataclasses.replace(optim, unmasked="freeze")
    engine_cfg = EngineConfig(
        epochs=epochs,
        optimizer=optim,
        schedule=config.schedule,
        milestones=tuple(round(m * epochs) for m in config.milestones),
        amp=options.amp,
        channels_last=options.channels_last,
        compile=options.compile,
        seed=options.seed,
        device=options.device,
        checkpoint_dir=options.checkpoint_dir,
        resume=options.resume,
        progress=options.progress,
        desc=desc,
        distributed=options.distributed,
    )
    return Engine(model, engine_cfg, mask=mask).fit(task)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode without gradients: the fixed reference model of BS and SCRUB."""
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LoaderTask:
    """A Task over one Batches source; remembers the current epoch (for epoch-dependent losses)."""

    def __init__(self, source: Batches) -> None:
        self.source = source
        self.epoch = 0

    def batches(self, epoch: int) -> Iterator:
        self.epoch = epoch
        return self.source.epoch(epoch)

    def num_batches(self, epoch: int) -> int:
        return len(self.source)


class CrossEntropyTask(LoaderTask):
    """Cross-entropy on (x, y) batches, with `sign=-1` for gradient ascent."""

    def __init__(self, source: Batches, sign: float = 1.0) -> None:
        super().__init__(source)
        self.sign = sign

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return self.sign * nn.functional.cross_entropy(model(x), y)
