"""Diffusion unlearning methods, one small class each, found through `METHODS` (the CLI's --method choices).

A method says what differs from the others: the Task it builds (tasks.py) and the parameters it trains (None:
all of them). Everything else is shared: the paper's defaults come from recipes.py, how the run executes from the
caller's RunOptions, and every method trains through salun_ext.train.fit (the one Engine adapter).

    fit = unlearn("salun", "ddpm", model.unet, model.spec, forget, retain, mask=mask,
                  options=RunOptions(device="cuda", seed=0), max_steps=200, lr=1e-4)

    method    Task                         trains
    salun     SalUnTask (forget + retain)  all (the mask selects)
    ga        GATask                       all
    esd-x     ESDTask                      cross-attention (attn2) Linear/Conv weights
    esd-u     ESDTask                      every Linear/Conv weight outside cross-attention
    fmn       FMNTask                      all
    retrain   EpsTask on the retain set    all, re-initialised first (takes no mask)
    uce       none: a closed-form edit     cross-attention keys and values (uce.py; takes no mask, trains nothing)

Adding a method: one class here with `@METHODS.register`, its recipe lines in recipes.py (docs/diffusion.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from salun_ext.diffusion.core import DiffusionSet, DiffusionSpec
from salun_ext.diffusion.recipes import recipe
from salun_ext.diffusion.tasks import EpsTask, ESDTask, FMNTask, GATask, SalUnTask, esd_parameters
from salun_ext.mask import SaliencyMask
from salun_ext.train import Registry
from salun_ext.train.engine import FitResult
from salun_ext.train.options import RunOptions, TrainRecipe, fit
from salun_ext.utils.errors import UsageError

Params = list[tuple[str, torch.nn.Parameter]] | None


class DiffusionMethod:
    """The contract of a diffusion unlearning method (see the module docstring)."""

    name: ClassVar[str]
    takes_mask: ClassVar[bool] = True  # False: the method trains a fresh model, a mask has no meaning
    shardable: ClassVar[bool] = False  # True: runs on an FSDP2-sharded UNet (distributed="fsdp")
    closed_form: ClassVar[bool] = False  # True: edits the weights directly (no Task, no training loop)

    def build(
        self,
        spec: DiffusionSpec,
        unet: torch.nn.Module,
        forget: DiffusionSet,
        retain: DiffusionSet | None,
        task_kwargs: dict[str, Any],
        *,
        fmn_columns: Sequence[int] | None = None,
    ) -> tuple[Any, Params]:
        """The Task of this method and the parameters it trains (None: every parameter)."""
        raise NotImplementedError


METHODS: Registry[type[DiffusionMethod]] = Registry("diffusion method")


@METHODS.register
class SalUn(DiffusionMethod):
    name = "salun"
    shardable = True

    def build(self, spec, unet, forget, retain, task_kwargs, *, fmn_columns=None):
        return SalUnTask(spec, forget, retain, **task_kwargs), None


@METHODS.register
class GradientAscent(DiffusionMethod):
    name = "ga"
    shardable = True

    def build(self, spec, unet, forget, retain, task_kwargs, *, fmn_columns=None):
        return GATask(spec, forget, retain, **task_kwargs), None


class _ESD(DiffusionMethod):
    """ESD deep-copies the UNet as its frozen teacher: not written for a sharded UNet."""

    def build(self, spec, unet, forget, retain, task_kwargs, *, fmn_columns=None):
        concepts = sorted(set(forget.ids.tolist()))
        task = ESDTask(spec, unet, concepts, forget.sample_shape, data=forget, **task_kwargs)
        return task, esd_parameters(unet, self.name)


@METHODS.register
class ESDx(_ESD):
    name = "esd-x"


@METHODS.register
class ESDu(_ESD):
    name = "esd-u"


@METHODS.register
class ForgetMeNot(DiffusionMethod):
    name = "fmn"  # not run under FSDP2 by any test (it needs Stable Diffusion)

    def build(self, spec, unet, forget, retain, task_kwargs, *, fmn_columns=None):
        if fmn_columns is None:
            raise UsageError(
                "fmn_columns: expected the concept's token columns (StableDiffusion.token_columns(prompt, concept)), "
                "got None"
            )
        return FMNTask(spec, unet, forget, fmn_columns, **task_kwargs), None


@METHODS.register
class Retrain(DiffusionMethod):
    """Re-initialise `unet` in place (same config, seeded) and train it on the retain set only."""

    name = "retrain"
    takes_mask = False

    def build(self, spec, unet, forget, retain, task_kwargs, *, fmn_columns=None):
        if retain is None:
            raise UsageError("retain: expected the retain set (retrain trains on it), got None")
        torch.manual_seed(task_kwargs["seed"])
        unet.load_state_dict(type(unet).from_config(unet.config).state_dict())
        return EpsTask(spec, retain, **task_kwargs), None


@METHODS.register
class UCE(DiffusionMethod):
    """Unified Concept Editing: a closed-form edit of the cross-attention keys and values (diffusion/uce.py)."""

    name = "uce"
    takes_mask = False
    closed_form = True

    def build(self, spec, unet, forget, retain, task_kwargs, *, fmn_columns=None):
        raise UsageError(CLOSED_FORM_HINT.format(name=self.name))


CLOSED_FORM_HINT = (
    "method: {name} is a closed-form edit with no training Task; run it with salun_ext.diffusion.uce.uce_edit(sd, "
    "UCEConfig(...)) or `salun-ext diffusion unlearn --method {name}` (Stable Diffusion pipelines only)"
)

METHODS.alias(esd_x="esd-x", esd_u="esd-u")  # "esd_x" / "ESD-X" find the hyphenated names


def method_names() -> list[str]:
    return list(METHODS)


def shardable_methods() -> list[str]:
    """The methods that run on an FSDP2-sharded UNet."""
    return [name for name, cls in METHODS.items() if cls.shardable]


def check_shardable(method: str) -> None:
    """UsageError unless `method` runs on an FSDP2-sharded UNet."""
    if not METHODS.get_class(method).shardable:
        names = " / ".join(shardable_methods())
        raise UsageError(f"--fsdp supports --method {names}, not {method!r}; use DDP (drop --fsdp)")


def make_task(
    method: str,
    spec: DiffusionSpec,
    unet: torch.nn.Module,
    forget: DiffusionSet,
    retain: DiffusionSet | None,
    task_kwargs: dict[str, Any],
    *,
    fmn_columns: Sequence[int] | None = None,
    seed: int = 0,
) -> tuple[Any, Params]:
    """The Task of `method` and the parameters it trains (None: every parameter); `seed` unless task_kwargs has one."""
    kw = dict(task_kwargs)
    kw.setdefault("seed", seed)
    return METHODS.get_class(method)().build(spec, unet, forget, retain, kw, fmn_columns=fmn_columns)


def run_task(
    unet: torch.nn.Module,
    task: Any,
    train: TrainRecipe,
    options: RunOptions,
    *,
    mask: SaliencyMask | None = None,
    params: Params = None,
    on_done: Callable[[], None] | None = None,
    desc: str = "train",
    fingerprint: dict[str, Any] | None = None,
) -> FitResult:
    """Fit `task` on `unet` (salun_ext.train.fit): only `params` (default: all) train, the rest are frozen for the run.

    fingerprint: what else determines the result (method, task keywords, data): checked when a run resumes.

    A mask over the whole UNet is restricted to the trained parameters, so one SalUn mask serves ESD-x as well.
    """
    named = params if params is not None else [(n, p) for n, p in unet.named_parameters()]
    trained = {id(p) for _, p in named}
    saved = {n: p.requires_grad for n, p in unet.named_parameters()}
    for _, p in unet.named_parameters():
        p.requires_grad_(id(p) in trained)
    if mask is not None:
        mask = mask.subset([n for n, _ in named if n in mask])
    try:
        return fit(unet, task, train, options, mask=mask, params=named, desc=desc, fingerprint=fingerprint)
    finally:
        for n, p in unet.named_parameters():
            p.requires_grad_(saved[n])
        if on_done is not None:
            on_done()


def unlearn(
    method: str,
    setting: str,
    unet: torch.nn.Module,
    spec: DiffusionSpec,
    forget: DiffusionSet,
    retain: DiffusionSet | None,
    *,
    options: RunOptions | None = None,
    mask: SaliencyMask | None = None,
    lr: float | None = None,
    max_steps: int | None = None,
    epochs: int | None = None,
    recipe_overrides: dict[str, Any] | None = None,
    task_overrides: dict[str, Any] | None = None,
    fmn_columns: Sequence[int] | None = None,
    protocol: str = "default",
) -> FitResult:
    """Run `method` with the paper's recipe for `setting` ("ddpm", "sd", "sd-nsfw"), overridden where given.

    protocol="paper": the paper code's recipe where it differs (recipes.PAPER_RECIPES: GA with its retain term).

    options: how the run executes (device, seed, amp: None keeps the recipe's, checkpoints, distributed).
    lr / max_steps / epochs / recipe_overrides (other TrainRecipe or optimizer fields): the recipe's training;
    when max_steps or epochs is given, both replace the recipe's budget. task_overrides: the Task's keywords.
    Overrides with value None are not given. `mask`: any SaliencyMask over the UNet (SalUn's, or one shared by
    the baselines); it is restricted to the parameters the method trains.
    """
    options = options if options is not None else RunOptions()
    name = METHODS.key(method)
    if METHODS[name].closed_form:
        raise UsageError(CLOSED_FORM_HINT.format(name=name))
    if mask is not None and not METHODS[name].takes_mask:
        raise UsageError(f"mask: {name} trains a fresh model: it takes no mask (got one)")
    r = recipe(setting, name, protocol)
    r.task.update(_given(task_overrides))
    train = r.train.replace(**_given({**(recipe_overrides or {}), "lr": lr}))
    if max_steps is not None or epochs is not None:
        train = train.replace(max_steps=max_steps, epochs=epochs)
    task, params = make_task(name, spec, unet, forget, retain, r.task, fmn_columns=fmn_columns, seed=options.seed)
    on_done = getattr(task, "remove", None)  # FMN's attention probes
    fingerprint = None
    if options.checkpoint_dir:  # a resume must match the method, its setting and task keywords, and the data
        data = [forget.digest(), retain.digest() if retain is not None else None, list(fmn_columns or [])]
        fingerprint = {"method": [name, setting, protocol], "task": r.task, "data": data}
    return run_task(unet, task, train, options, mask=mask, params=params, on_done=on_done, desc=name,
                    fingerprint=fingerprint)  # fmt: skip


def _given(values: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (values or {}).items() if v is not None}
