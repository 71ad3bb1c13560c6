"""The one run-options type of every domain, a method's training recipe, and the one adapter to the Engine.

RunOptions    HOW a run executes (device, seed, precision, checkpoints, processes): the same for every
              domain's `unlearn` / `run`, whatever the method.
TrainRecipe   WHAT a method's training does (budget, optimizer, schedule, clipping): each method's defaults
              (defined in engine.py: EngineConfig extends it with the run fields).
fit(...)      recipe + options -> an Engine -> the fitted Task; the only place the two meet.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from salun_ext.mask import SaliencyMask
from salun_ext.train.engine import Engine, EngineConfig, FitResult, TrainRecipe
from salun_ext.utils.errors import check_choice

AMP_CHOICES = ("none", "bf16", "fp16")
DISTRIBUTED_CHOICES = ("none", "ddp", "fsdp")


@dataclasses.dataclass
class RunOptions:
    """How a run executes (not what it does): device, seed, precision, checkpoints, processes.

    amp: None keeps the recipe's precision (fp32 unless a recipe asks for bf16, as the Stable Diffusion ones do).
    distributed: under torchrun, "ddp" trains through DistributedDataParallel (each rank its share of every
    epoch's batches) and "fsdp" trains an FSDP2-sharded model; masks are then ranked over `process_group`
    (None: the default group), so every rank holds the one-process mask bit for bit.
    """

    device: str = "auto"
    seed: int = 0
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    checkpoint_dir: str | None = None  # Engine checkpoints: an interrupted run resumes from here
    checkpoint_every: int = 1  # epochs, or steps for step-bounded runs
    resume: bool = False
    progress: bool = True
    distributed: str = "none"
    process_group: Any = None

    def __post_init__(self) -> None:
        if self.amp is not None:
            check_choice("amp", self.amp, AMP_CHOICES)
        check_choice("distributed", self.distributed, DISTRIBUTED_CHOICES)

    def mask_group(self) -> Any:
        """The process group for compute_saliency: None in one process."""
        if self.distributed == "none":
            return None
        import torch.distributed as dist

        return self.process_group if self.process_group is not None else dist.group.WORLD


_RUN_FIELDS = ("device", "seed", "channels_last", "compile", "checkpoint_dir", "checkpoint_every", "resume")
_RUN_FIELDS += ("progress", "distributed")


def engine_config(recipe: TrainRecipe, options: RunOptions, *, desc: str = "train", **extra: Any) -> EngineConfig:
    """The EngineConfig of `recipe` run with `options` (`extra`: other EngineConfig fields, e.g. shard_batches)."""
    fields = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(TrainRecipe) if f.name != "amp"}
    fields.update({name: getattr(options, name) for name in _RUN_FIELDS})
    fields["amp"] = options.amp if options.amp is not None else recipe.amp
    return EngineConfig(**fields, desc=desc, **extra)


def fit(
    model: torch.nn.Module,
    task: Any,
    recipe: TrainRecipe,
    options: RunOptions,
    *,
    mask: SaliencyMask | None = None,
    params: list[tuple[str, torch.nn.Parameter]] | None = None,
    desc: str = "train",
    fingerprint: dict[str, Any] | None = None,
    **extra: Any,
) -> FitResult:
    """Train `task` on `model` with `recipe` and `options`: the one way every domain reaches the Engine.

    fingerprint: what else determines the result (method, hyperparameters, data): a resume from a checkpoint
    written with other values is refused (see train/checkpoint.py).
    """
    config = engine_config(recipe, options, desc=desc, **extra)
    return Engine(model, config, mask=mask, params=params, fingerprint=fingerprint).fit(task)
