"""The one training loop of the library: original training, retraining, and every unlearning method.

A method never writes its own loop. It describes its work as a `Task` (which batches an epoch has, the loss of a
batch, optional hooks) and hands it to `Engine.fit`, which owns everything else: the (masked) optimizer, the lr
schedule, AMP, gradient clipping, channels_last, torch.compile, seeding, progress bars, checkpoints and resume,
and the wall-clock time (RTE).

    engine = Engine(model, EngineConfig(epochs=10, optimizer=OptimConfig("sgd", lr=0.01)), mask=mask)
    result = engine.fit(task)          # result.seconds, result.history
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from salun_ext.mask import SaliencyMask
from salun_ext.optim import MaskedAdam, MaskedAdamW, MaskedSGD
from salun_ext.train import checkpoint
from salun_ext.utils import is_main_process, resolve_device, seed_everything
from salun_ext.utils.errors import UsageError


@dataclasses.dataclass
class OptimConfig:
    """Optimizer hyperparameters. Defaults: the paper's classification recipe (SGD 0.9, wd 5e-4)."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    mask_mode: Literal["strict", "compat"] = "strict"  # compat: the paper code's grad *= mask
    unmasked: Literal["train", "freeze"] | None = None  # parameters the mask does not cover
    state: Literal["dense", "compact"] = "dense"  # compact: optimizer state of the salient entries only


@dataclasses.dataclass
class TrainRecipe:
    """What a method's training does (each method's defaults): exactly one of `epochs` / `max_steps` bounds it
    (max_steps may cap epochs)."""

    epochs: int | None = None
    max_steps: int | None = None
    optimizer: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: Literal["constant", "multistep", "cosine"] = "constant"
    milestones: tuple[int, ...] = ()  # in schedule units
    gamma: float = 0.1
    schedule_unit: Literal["epoch", "step"] = "epoch"
    warmup_steps: int = 0
    amp: Literal["none", "bf16", "fp16"] = "none"  # the recipe's precision; RunOptions.amp overrides it when set
    grad_clip: float | None = None

    def replace(self, **changes: Any) -> TrainRecipe:
        """A copy with `changes`; optimizer fields (lr, weight_decay, ...) may be given here too."""
        optim_fields = {f.name for f in dataclasses.fields(OptimConfig)}
        optim = {k: changes.pop(k) for k in list(changes) if k in optim_fields}
        out = dataclasses.replace(self, **changes)
        if optim:
            out.optimizer = dataclasses.replace(out.optimizer, **optim)
        return out


@dataclasses.dataclass
class EngineConfig(TrainRecipe):
    """Everything the loop needs: a recipe, and how to run it (train.options.engine_config builds one from a
    TrainRecipe and RunOptions; direct Engine users fill it themselves)."""

    channels_last: bool = False
    compile: bool = False
    seed: int | None = None
    device: str = "auto"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1  # epochs, or steps for max_steps-only runs
    resume: bool = False
    progress: bool = True
    desc: str = "train"
    # Multi-process training (start with torchrun; see salun_ext.distributed.init_distributed):
    #   "ddp": the engine wraps the model in DistributedDataParallel; "fsdp": the caller already sharded it with
    #   torch.distributed.fsdp.fully_shard (checkpoints are then written per rank). "none": one process.
    distributed: Literal["none", "ddp", "fsdp"] = "none"
    # with distributed != "none": rank r trains on batches r, r + W, r + 2W, ... of task.batches(epoch) (every rank
    # the same count). False when the task's batches(epoch) already yields this rank's share.
    shard_batches: bool = True


class Task(Protocol):
    """What a method tells the engine. Only `batches` and `loss` are required."""

    def batches(self, epoch: int) -> Iterable[Any]:
        """The batches of one epoch, in order (the engine moves tensors to the device).

        Resume replays the interrupted epoch's first batches without training on them, so for a bit-exact resume
        draw any randomness here from a generator seeded by (seed, epoch), not from the global RNG.
        """

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Scalar loss of one batch (called under autocast when AMP is on)."""


@dataclasses.dataclass
class FitResult:
    seconds: float  # wall-clock time of the whole training, over every resumed segment (for RTE)
    steps: int
    epochs: int
    history: list[dict]  # per-epoch (or per checkpoint interval) mean loss
    segments: list[float] = dataclasses.field(default_factory=list)  # seconds of each run that trained it

    @property
    def resumed(self) -> bool:
        """Whether the training continued an interrupted run's checkpoint."""
        return len(self.segments) > 1


def build_optimizer(
    named_params: list[tuple[str, torch.nn.Parameter]], cfg: OptimConfig, mask: SaliencyMask | None = None
) -> torch.optim.Optimizer:
    """A Masked{SGD,Adam,AdamW} over named parameters (with mask=None they behave as their torch twins)."""
    common = dict(mask=mask, unmasked=cfg.unmasked, mode=cfg.mask_mode, state=cfg.state)
    if cfg.name == "sgd":
        return MaskedSGD(
            named_params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
            **common,
        )
    if cfg.name == "adam":
        return MaskedAdam(
            named_params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **common
        )
    if cfg.name == "adamw":
        return MaskedAdamW(
            named_params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **common
        )
    raise UsageError(f"unknown optimizer {cfg.name!r}; expected 'sgd', 'adam' or 'adamw'")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: EngineConfig, total_units: int):
    """lr schedule stepped once per `schedule_unit`, with an optional linear warm-up over `warmup_steps` units."""
    if cfg.schedule == "constant":
        base = lambda unit: 1.0  # noqa: E731
    elif cfg.schedule == "multistep":
        base = lambda unit: cfg.gamma ** sum(unit >= m for m in cfg.milestones)  # noqa: E731
    elif cfg.schedule == "cosine":
        base = lambda unit: 0.5 * (1 + math.cos(math.pi * min(unit, total_units) / max(1, total_units)))  # noqa: E731
    else:
        raise UsageError(f"unknown schedule {cfg.schedule!r}; expected 'constant', 'multistep' or 'cosine'")

    def factor(unit: int) -> float:
        warm = min(1.0, (unit + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        return warm * base(unit)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move every tensor of a (nested) batch to the device; 4-D float tensors optionally to channels_last."""
    if isinstance(batch, torch.Tensor):
        out = batch.to(device, non_blocking=True)
        if channels_last and out.dim() == 4 and out.is_floating_point():
            out = out.contiguous(memory_format=torch.channels_last)
        return out
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


class Engine:
    """Runs Tasks on a model. See the module docstring."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: EngineConfig,
        *,
        mask: SaliencyMask | None = None,
        params: list[tuple[str, torch.nn.Parameter]] | None = None,
        fingerprint: dict[str, Any] | None = None,
    ) -> None:
        """fingerprint: what else determines the result (method, hyperparameters, data), checked on resume."""
        if (config.epochs is None) and (config.max_steps is None):
            raise UsageError("EngineConfig needs epochs or max_steps")
        for key in ("epochs", "max_steps"):
            value = getattr(config, key)
            if value is not None and value < 0:
                raise UsageError(f"{key} must be >= 0, got {value}")
        if config.amp not in ("none", "bf16", "fp16"):
            raise UsageError(f"amp must be 'none', 'bf16' or 'fp16', got {config.amp!r}")
        if config.grad_clip is not None and not config.grad_clip > 0:
            raise UsageError(f"grad_clip must be positive, got {config.grad_clip}")
        self.rank, self.world_size = _check_distributed(config)
        self.config = config
        self.device = resolve_device(config.device)
        if config.seed is not None:
            seed_everything(config.seed)
        self.model = model.to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        named = params if params is not None else [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if mask is not None:
            mask.check_compatible(named, require_all=False)
        self.mask = mask
        self.optimizer = build_optimizer(named, config.optimizer, mask)
        self.named_trained = named
        self._trained = [p for _, p in named]
        self._extra_fingerprint = fingerprint
        self.fingerprint: dict[str, str] = {}
        self.segments: list[float] = []  # seconds of the earlier runs of a resumed training
        self.segment_start = 0.0
        self.last_checkpoint: tuple[Path, int] | None = None  # (file, step) of the last checkpoint written/read
        self.forward_model = self.model
        if config.distributed == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.model, device_ids=device_ids)
        elif config.distributed == "fsdp":
            from salun_ext.distributed import is_dtensor

            if not any(is_dtensor(p) for p in self._trained):
                raise UsageError(
                    "distributed='fsdp' expects a model sharded with torch.distributed.fsdp.fully_shard (its "
                    "parameters are DTensors); for a replicated model use distributed='ddp'"
                )
            if config.amp == "fp16":
                raise UsageError("amp='fp16' (GradScaler) is not supported with distributed='fsdp'; use amp='bf16'")
        self.forward_model = torch.compile(self.forward_model) if config.compile else self.forward_model
        if config.amp == "fp16" and self.device.type != "cuda":
            raise UsageError("amp='fp16' needs a CUDA device; use amp='bf16' on CPU")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.step = 0
        self.epoch = 0
        self.batch_index = 0  # batches consumed in the current epoch (resume skips them)
        self.history: list[dict] = []
        self.scheduler = None
        self._epoch_finished = True

    # ----------------------------------------------------------------------------------------------------- fit
    def fit(self, task: Task) -> FitResult:
        cfg = self.config
        epochs = cfg.epochs if cfg.epochs is not None else math.inf
        total_units = (cfg.epochs or 1) if cfg.schedule_unit == "epoch" else (cfg.max_steps or 0)
        self.scheduler = build_scheduler(self.optimizer, cfg, total_units)
        if cfg.checkpoint_dir:  # of the weights the run starts from: before a checkpoint replaces them
            self.fingerprint = checkpoint.run_fingerprint(self, self._extra_fingerprint)
        if cfg.resume:
            self._load_checkpoint(task)
        start = self.segment_start = time.perf_counter()
        try:
            self._fit_epochs(task, epochs)
        except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM: say where, and whether --resume can continue
            raise type(exc)(self._interrupted_at()) from None
        if cfg.checkpoint_dir:
            self.save_checkpoint(task)
        segments = [*self.segments, time.perf_counter() - start]
        return FitResult(sum(segments), self.step, self.epoch, list(self.history), segments)

    def _fit_epochs(self, task: Task, epochs: float) -> None:
        cfg = self.config
        self.model.train()
        while self.epoch < epochs and not self._done():
            losses = self._run_epoch(task)
            self.history.append({"epoch": self.epoch, "step": self.step, "loss": self._global_mean(losses)})
            if not self._epoch_finished:  # max_steps hit mid-epoch: keep the position, a resume continues from it
                break
            self.epoch += 1
            self.batch_index = 0
            if cfg.schedule_unit == "epoch":
                self.scheduler.step()
            if hasattr(task, "on_epoch_end"):
                task.on_epoch_end(self, self.epoch)
            if cfg.checkpoint_dir and cfg.epochs is not None and self.epoch % cfg.checkpoint_every == 0:
                self.save_checkpoint(task)

    def _interrupted_at(self) -> str:
        where = f"interrupted at epoch {self.epoch + 1} step {self.step}"
        if self.last_checkpoint is None:
            return where + " (no checkpoint written yet: a rerun starts over)"
        path, step = self.last_checkpoint
        return f"{where}; the checkpoint {path} (step {step}) is intact: resume with --resume"

    def _done(self) -> bool:
        return self.config.max_steps is not None and self.step >= self.config.max_steps

    def _run_epoch(self, task: Task) -> list[float]:
        from tqdm.auto import tqdm

        cfg = self.config
        batches, total = self._epoch_batches(task)
        bar = tqdm(
            batches,
            total=total,
            desc=f"{cfg.desc} epoch {self.epoch + 1}",
            leave=False,
            disable=not (cfg.progress and is_main_process()),
        )
        losses: list[float] = []
        skip, self.batch_index = self.batch_index, 0
        self._epoch_finished = False
        for batch in bar:
            if self._done():
                break
            if self.batch_index < skip:  # resuming mid-epoch: these batches were trained before the interruption
                self.batch_index += 1
                continue
            self.batch_index += 1
            loss = self.train_step(task, batch)
            losses.append(loss)
            if len(losses) % 10 == 1:
                bar.set_postfix(loss=f"{loss:.4g}")
            if cfg.checkpoint_dir and cfg.epochs is None and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint(task)
        else:
            self._epoch_finished = True
        return losses

    def _epoch_batches(self, task: Task) -> tuple[Iterator, int | None]:
        """This rank's batches of the current epoch, and how many there are (None when unknown)."""
        batches = task.batches(self.epoch)
        total = getattr(task, "num_batches", lambda e: None)(self.epoch)
        if total is None and hasattr(batches, "__len__"):
            total = len(batches)
        if self.world_size == 1 or not self.config.shard_batches:
            return iter(batches), total
        if total is None:
            raise UsageError(
                f"{type(task).__name__}: with {self.world_size} processes the engine needs the number of batches "
                "of an epoch so that every rank takes the same number of steps: give the task num_batches(epoch) "
                "or return a sized iterable; or shard the batches in the task and set shard_batches=False"
            )
        per_rank = total // self.world_size
        if per_rank == 0:
            raise UsageError(f"an epoch has {total} batch(es), fewer than the {self.world_size} processes")
        return itertools.islice(batches, self.rank, per_rank * self.world_size, self.world_size), per_rank

    def _global_mean(self, losses: list[float]) -> float:
        """Mean loss of the epoch over every rank's batches."""
        if self.world_size == 1:
            return _mean(losses)
        from salun_ext.distributed.runtime import sum_over_ranks

        total, count = sum_over_ranks([sum(losses), len(losses)], self.device)
        return total / count if count > 0 else float("nan")

    def train_step(self, task: Task, batch: Any) -> float:
        """One optimizer step on one batch; returns the loss value."""
        if self.world_size == 1:
            return self._train_step(task, batch)
        from salun_ext.distributed.runtime import collective_failure, is_collective_failure

        try:
            return self._train_step(task, batch)
        except Exception as exc:
            if is_collective_failure(exc):  # a peer died or hung: say so instead of a bare socket error
                raise collective_failure(f"training step {self.step}", exc, self.rank, self.world_size) from exc
            raise

    def _train_step(self, task: Task, batch: Any) -> float:
        cfg = self.config
        batch = to_device(batch, self.device, cfg.channels_last)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = task.loss(self.forward_model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"{type(task).__name__}.loss must return a scalar tensor")
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(
                f"{type(task).__name__}: non-finite loss {loss.item()} at step {self.step} (lower the lr?); "
                + self._last_good()
            )
        self.scaler.scale(loss).backward()
        if cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._trained, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if cfg.schedule_unit == "step":
            self.scheduler.step()
        if hasattr(task, "on_step_end"):
            task.on_step_end(self, self.step)
        return float(loss.detach())

    # ----------------------------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        """last.pt; with distributed='fsdp' each rank's shard, last.rank{r}-of-{W}.pt."""
        if not self.config.checkpoint_dir:
            return None
        if self.config.distributed == "fsdp":
            return Path(self.config.checkpoint_dir) / f"last.rank{self.rank}-of-{self.world_size}.pt"
        return Path(self.config.checkpoint_dir) / "last.pt"

    def save_checkpoint(self, task: Task | None = None) -> None:
        """Write the checkpoint (every rank returns once it is complete). Non-finite weights or buffers are never
        written: FloatingPointError names them, the step, and the last good checkpoint, which stays as it was."""
        sharded = self.config.distributed == "fsdp"
        path = self.checkpoint_path
        if path is None:
            return
        bad = checkpoint.first_non_finite(self)
        if self.world_size > 1:  # one verdict for every rank (FSDP shards differ)
            from salun_ext.distributed.runtime import sum_over_ranks

            (flags,) = sum_over_ranks([1.0 if bad else 0.0], self.device)
            bad = bad or ("a parameter or buffer on another rank" if flags > 0 else None)
        if bad:
            message = f"non-finite values in {bad} at step {self.step}, not checkpointed; "
            raise FloatingPointError(message + self._last_good())
        if sharded or is_main_process():
            checkpoint.write(self, task, path, sharded)
        self.last_checkpoint = (path, self.step)
        if self.world_size > 1:  # every rank sees a complete checkpoint once this returns
            import torch.distributed as dist

            dist.barrier()

    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint of this run was written before"
        path, step = self.last_checkpoint
        return f"the last good checkpoint is {path} (step {step}): resume from it with a lower lr"

    def _load_checkpoint(self, task: Task) -> None:
        from salun_ext.distributed.checkpoint import check_world_size

        path = self.checkpoint_path
        if path is None:
            raise UsageError("resume=True needs checkpoint_dir")
        check_world_size(path, self.world_size)
        if not path.exists():
            return  # nothing to resume: a fresh start
        state = checkpoint.read(path)
        saved_world = state.get("world_size", 1)
        if saved_world != self.world_size:
            raise UsageError(
                f"{path}: the checkpoint was written by a run of {saved_world} process(es) but this run has "
                f"{self.world_size}: resume with the same number of processes (the data order, and with FSDP the "
                "parameter shards, depend on it)"
            )
        checkpoint.check_same_run(path, state["fingerprint"], self.fingerprint)
        checkpoint.restore(self, task, state, path)
        self.last_checkpoint = (path, self.step)


def _check_distributed(config: EngineConfig) -> tuple[int, int]:
    """(rank, world size) for config.distributed, with a clear error when no process group exists."""
    if config.distributed not in ("none", "ddp", "fsdp"):
        raise UsageError(f"distributed must be 'none', 'ddp' or 'fsdp', got {config.distributed!r}")
    if config.distributed == "none":
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError(
            f"distributed={config.distributed!r} needs an initialised process group: start with torchrun and call "
            "salun_ext.distributed.init_distributed() first"
        )
    return dist.get_rank(), dist.get_world_size()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
