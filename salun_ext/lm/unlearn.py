"""Language-model unlearning end to end: encode the text sets, SalUn's saliency mask, the method on the Engine.

    model, tokenizer = load_causal_lm("path/or/hub-id", dtype="bf16", device="cuda")
    forget, retain = load_texts("forget.jsonl"), load_texts("retain.jsonl")
    result = unlearn_lm(model, tokenizer, forget, retain, LMUnlearnConfig(method="npo"), RunOptions(seed=0))

SalUn for LMs: the saliency of every weight is |gradient of the forget NLL| summed over the forget set
(compute_saliency over the whole model); the `mask_ratio` most salient weights are the only ones the masked
AdamW updates. mask_ratio=None runs the plain method (every weight trains).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from salun_ext.lm.data import TextExample, collate, encode
from salun_ext.lm.evaluate import sequence_logps
from salun_ext.lm.losses import mean_nll, target_logprobs
from salun_ext.lm.methods import METHODS
from salun_ext.lm.tasks import LMUnlearnTask
from salun_ext.mask import SaliencyMask
from salun_ext.train import FitResult, OptimConfig, RunOptions, TrainRecipe, fit
from salun_ext.utils.errors import UsageError


@dataclasses.dataclass
class LMUnlearnConfig:
    """What the method does. Defaults follow the TOFU / NPO recipes (AdamW 1e-5, wd 0.01, beta 0.1, gamma = alpha
    = 1). How it runs (seed, device, precision, checkpoints, processes) is the RunOptions'."""

    method: str = "npo"  # a name of lm.methods.METHODS
    mask_ratio: float | None = 0.5  # SalUn; None = the plain method
    beta: float = 0.1  # NPO temperature
    forget_weight: float = 1.0  # gamma
    retain_weight: float = 1.0  # alpha (0 = no retain loss)
    lr: float = 1e-5
    weight_decay: float = 0.01
    epochs: int | None = 5
    max_steps: int | None = None
    warmup_steps: int = 0
    batch_size: int = 4
    max_length: int = 256
    grad_clip: float | None = 1.0
    saliency_batches: int | None = None  # forget batches used for the mask (None: all)

    def __post_init__(self) -> None:
        self.method = METHODS.key(self.method)
        if self.mask_ratio is not None and not 0 < self.mask_ratio <= 1:
            raise UsageError(f"mask_ratio must be in (0, 1] or None, got {self.mask_ratio}")
        if self.batch_size < 1 or self.max_length < 2:
            raise UsageError("batch_size must be >= 1 and max_length >= 2")

    def recipe(self) -> TrainRecipe:
        return TrainRecipe(
            epochs=self.epochs,
            max_steps=self.max_steps,
            optimizer=OptimConfig("adamw", lr=self.lr, weight_decay=self.weight_decay),
            schedule="constant",
            schedule_unit="step",
            warmup_steps=self.warmup_steps,
            grad_clip=self.grad_clip,
        )


@dataclasses.dataclass
class LMUnlearnResult:
    mask: SaliencyMask | None  # this rank's mask (global under DDP)
    fit: FitResult
    mask_seconds: float


def lm_saliency(
    model: torch.nn.Module,
    forget: Sequence,
    ratio: float,
    *,
    batch_size: int,
    pad_id: int,
    amp: str = "none",
    max_batches: int | None = None,
    process_group=None,
    progress: bool = True,
) -> SaliencyMask:
    """SalUn's mask for a causal LM: |sum of forget-NLL gradients| over the forget set, top `ratio` of all weights.

    With a process group each rank takes every world-th batch and the gradient sums are all-reduced once.
    """
    from salun_ext.distributed.runtime import current_world
    from salun_ext.saliency import compute_saliency

    rank, world = current_world() if process_group is not None else (0, 1)
    starts = list(range(0, len(forget), batch_size))[:max_batches]
    mine = starts[rank::world]
    device = next(model.parameters()).device
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def loss_fn(m, start):
        batch = {k: v.to(device) for k, v in collate(forget[start : start + batch_size], pad_id).items()}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logps, counts = target_logprobs(m, batch)
        return mean_nll(logps, counts)

    # with gradient checkpointing on, rank in train mode: HF models only checkpoint while training (the
    # Llama family has no dropout, so the gradients are those of eval mode)
    train_mode = bool(
        getattr(model, "is_activation_checkpointing", None) or getattr(model, "is_gradient_checkpointing", False)
    )
    return compute_saliency(
        model, loss_fn, mine, ratio, process_group=process_group, progress=progress, train_mode=train_mode
    )


def _prepare(tokenizer, forget, retain, cfg: LMUnlearnConfig, seed: int):
    """(training forget examples, retain examples, the method) with the method's relabelling applied."""
    method = METHODS.get_class(cfg.method)()
    forget_ids = encode(forget, tokenizer, cfg.max_length)
    retain_ids = encode(retain, tokenizer, cfg.max_length) if retain else []
    forget_ids = method.prepare_forget(forget_ids, retain_ids, tokenizer, seed=seed, max_length=cfg.max_length)
    return forget_ids, retain_ids, method


def unlearn_lm(
    model: torch.nn.Module,
    tokenizer,
    forget: Sequence[TextExample],
    retain: Sequence[TextExample] | None,
    config: LMUnlearnConfig,
    options: RunOptions | None = None,
    *,
    mask: SaliencyMask | None = None,
) -> LMUnlearnResult:
    """Run one LM unlearning method (SalUn-masked unless config.mask_ratio is None and no mask is given).

    options.distributed: "none" or "ddp" (the process group must exist: salun_ext.distributed.init_distributed()).
    Under DDP the saliency mask is computed across ranks (identical everywhere) and every rank trains on its
    share of the forget batches.
    """
    import time

    cfg, options = config, options or RunOptions()
    amp = options.amp or "none"
    pad = tokenizer.pad_token_id
    forget_ids, retain_ids, method = _prepare(tokenizer, forget, retain, cfg, options.seed)
    start = time.perf_counter()
    if mask is None and cfg.mask_ratio is not None:
        mask = lm_saliency(
            model,
            encode(forget, tokenizer, cfg.max_length),  # the original forget answers, also for relabelling methods
            cfg.mask_ratio,
            batch_size=cfg.batch_size,
            pad_id=pad,
            amp=amp,
            max_batches=cfg.saliency_batches,
            process_group=options.mask_group(),
            progress=options.progress,
        )
    mask_seconds = time.perf_counter() - start
    reference = None
    if method.needs_reference:  # the frozen initial model's log-probs: computed once, no second model in memory
        reference = sequence_logps(model, forget_ids, batch_size=cfg.batch_size, pad_id=pad, amp=amp)
    task = LMUnlearnTask(
        forget_ids,
        retain_ids,
        method=cfg.method,
        batch_size=cfg.batch_size,
        pad_id=pad,
        seed=options.seed,
        forget_weight=cfg.forget_weight,
        retain_weight=cfg.retain_weight if retain_ids else 0.0,
        beta=cfg.beta,
        reference_logps=reference,
    )
    # a resume must match the method, its hyperparameters and the texts (a larger step budget may continue it)
    hyper = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("epochs", "max_steps")}
    texts = {"forget": [(e.input_ids, e.prompt_len) for e in forget_ids], "retain": [e.input_ids for e in retain_ids]}
    fingerprint = {"method": hyper, "data": texts} if options.checkpoint_dir else None
    result = fit(model, task, cfg.recipe(), options, mask=mask, desc=f"lm {cfg.method}", fingerprint=fingerprint)
    return LMUnlearnResult(mask=mask, fit=result, mask_seconds=mask_seconds)
