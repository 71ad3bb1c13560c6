"""The one training loop of every domain, the one run-options type, seeding, shared Tasks, method registries.

    engine.py     Engine (optimizer, masks, schedules, AMP, checkpoints, resume, RTE), Task protocol
    options.py    RunOptions (how a run executes), TrainRecipe (a method's training), fit() (the adapter)
    tasks.py      LoaderTask, CrossEntropyTask
    registry.py   Registry: name -> method class, per domain
Seeding (named streams) lives in salun_ext.utils.seeding, below the data layer that also draws from it.
"""

from salun_ext.train.engine import (
    Engine,
    EngineConfig,
    FitResult,
    OptimConfig,
    Task,
    TrainRecipe,
    build_optimizer,
    build_scheduler,
    to_device,
)
from salun_ext.train.options import RunOptions, engine_config, fit
from salun_ext.train.registry import Registry
from salun_ext.train.tasks import CrossEntropyTask, LoaderTask
from salun_ext.utils.seeding import epoch_generator, seed_everything, stream_seed

__all__ = [
    "CrossEntropyTask",
    "Engine",
    "EngineConfig",
    "FitResult",
    "LoaderTask",
    "OptimConfig",
    "Registry",
    "RunOptions",
    "Task",
    "TrainRecipe",
    "build_optimizer",
    "build_scheduler",
    "engine_config",
    "epoch_generator",
    "fit",
    "seed_everything",
    "stream_seed",
    "to_device",
]
