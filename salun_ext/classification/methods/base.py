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
from typing import Any, ClassVar

import torch
from torch import nn

from salun_ext.data import Augment, Batches, ImageDataset
from salun_ext.mask import SaliencyMask
from salun_ext.train import FitResult, OptimConfig, RunOptions, TrainRecipe, fit
from salun_ext.train.tasks import CrossEntropyTask, LoaderTask
from salun_ext.utils import UsageError, resolve_device, seed_everything
from salun_ext.utils.fingerprint import digest, state_digest

__all__ = [
    "CrossEntropyTask",
    "LoaderTask",
    "RunOptions",
    "TrainConfig",
    "UnlearnData",
    "UnlearnMethod",
    "UnlearnResult",
    "fit_task",
    "frozen_copy",
]


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
            raise UsageError("the forget set is empty: there is nothing to unlearn")
        if len(self.retain) == 0:
            raise UsageError("the retain set is empty: the forget set is the whole training set")
        if self.forget.images.shape[1:] != self.retain.images.shape[1:]:
            raise UsageError(
                f"forget images {tuple(self.forget.images.shape[1:])} and retain images "
                f"{tuple(self.retain.images.shape[1:])} differ in shape"
            )
        if self.num_classes is None:
            self.num_classes = self.forget.num_classes
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")

    def digest(self) -> str:
        """What identifies these sets for a resume: their contents, the batch size and the augmentation."""
        parts = [("forget images", self.forget.images), ("forget labels", self.forget.labels)]
        parts += [("retain images", self.retain.images), ("retain labels", self.retain.labels)]
        return digest([state_digest(parts), self.batch_size, repr(self.augment), self.num_classes])

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
        stream: str,
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
            raise UsageError(f"which must be 'forget', 'retain' or 'all', got {which!r}")
        return Batches(
            images,
            labels,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            augment=self.augment if augment else None,
            seed=seed,
            stream=stream,
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
    milestone_epochs: tuple[int, ...] = ()  # absolute epochs instead (the paper code's 91, 136 at any length)
    batch_size: int | None = None  # None: UnlearnData.batch_size

    def optim(self, **changes) -> OptimConfig:
        return OptimConfig(
            self.optimizer, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, **changes
        )

    def recipe(self, *, epochs: int | None = None, optim: OptimConfig | None = None) -> TrainRecipe:
        """The Engine recipe: these hyperparameters, milestones turned from fractions of the epochs into epochs."""
        epochs = self.epochs if epochs is None else epochs
        milestones = tuple(self.milestone_epochs) or tuple(round(m * epochs) for m in self.milestones)
        optim = optim or self.optim()
        return TrainRecipe(epochs=epochs, optimizer=optim, schedule=self.schedule, milestones=milestones)


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
            raise UsageError(f"{self.label}: unknown hyperparameter(s) {unknown}; valid: {sorted(valid)}")
        self.config = dataclasses.replace(
            config, **{k: _coerce(self.label, k, getattr(config, k), v) for k, v in overrides.items()}
        )
        self._fits: list[FitResult] = []  # the trainings of the current run() (for the RTE of resumed runs)
        self._data_digest: str | None = None

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
        self._fits = []
        _sync(device)
        start = time.perf_counter()
        self._data_digest = data.digest() if options.checkpoint_dir else None
        info = self.unlearn(model, data, options, mask) or {}
        _sync(device)
        seconds = time.perf_counter() - start
        # a resumed training: the earlier runs' training time counts too (the RTE of the whole unlearning)
        earlier = sum(sum(fit.segments[:-1]) for fit in self._fits)
        if earlier > 0:
            info.update(resumed=True, earlier_runs_seconds=earlier, this_run_seconds=seconds)
        model.eval()
        computed = info.pop("mask", None)  # kept out of info, which reports serialise to JSON
        return UnlearnResult(model, seconds + earlier, info, mask=computed)

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
        """Run `task` on the shared Engine with this method's TrainConfig (a resume must match the method, its
        hyperparameters and the data)."""
        fingerprint = {"method": self.name, "config": dataclasses.asdict(self.config), "data": self._data_digest}
        result = fit_task(
            model,
            task,
            self.config,
            options,
            desc=self.label,
            mask=mask,
            optim=optim,
            epochs=epochs,
            fingerprint=fingerprint,
        )
        self._fits.append(result)
        return result

    def loader(self, data: UnlearnData, which: str, options: RunOptions, stream: str, **kw) -> Batches:
        """A seeded loader: `stream` (a name of salun_ext.utils.seeding.STREAMS) separates a method's loaders."""
        batch_size = kw.pop("batch_size", None) or getattr(self.config, "batch_size", None)
        return data.loader(which, seed=options.seed, stream=stream, batch_size=batch_size, **kw)


def _coerce(label: str, key: str, current: Any, value: Any) -> Any:
    """Match an override to the field's current type (int -> float, list -> tuple); reject wrong kinds."""
    if isinstance(current, bool) or current is None or value is None:
        return value
    if isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(current, (int, float, str, tuple)) and not isinstance(value, type(current)):
        raise UsageError(f"{label}: {key} must be a {type(current).__name__}, got {value!r}")
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
    fingerprint: dict[str, Any] | None = None,
) -> FitResult:
    """Train a Task with a TrainConfig's recipe and the RunOptions on the shared Engine.

    With a mask, parameters it does not cover stay frozen; the mask mode (strict / compat) comes from `optim`.
    """
    optim = optim or config.optim()
    if mask is not None and optim.unmasked is None:
        optim = dataclasses.replace(optim, unmasked="freeze")
    recipe = config.recipe(epochs=epochs, optim=optim)
    return fit(model, task, recipe, options, mask=mask, desc=desc, fingerprint=fingerprint)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode without gradients: the fixed reference model of BS and SCRUB."""
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
