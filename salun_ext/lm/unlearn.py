"""Language-model unlearning end to end: encode the text sets, SalUn's saliency mask, the method on the Engine.

    model, tokenizer = load_causal_lm("path/or/hub-id", dtype="bf16", device="cuda")
    forget, retain = load_texts("forget.jsonl"), load_texts("retain.jsonl")
    result = unlearn_lm(model, tokenizer, forget, retain, LMUnlearnConfig(method="npo"), RunOptions(seed=0))

SalUn for LMs: the saliency of every weight is |gradient of the forget NLL| summed over the forget set
(compute_saliency over the whole model); the `mask_ratio` most salient weights are the only ones the masked
AdamW updates. mask_ratio=None runs the plain method (every weight trains). saliency_loss="method" ranks the
weights by the gradient of the method's own forget loss instead (on the examples it trains on: relabelled ones
for idk / random_label, RMU's steering loss, NPO / SimNPO's loss at the initial model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from salun_ext.lm.config import LMUnlearnConfig
from salun_ext.lm.data import TextExample, collate, encode
from salun_ext.lm.evaluate import sequence_logps
from salun_ext.lm.losses import mean_nll, target_logprobs
from salun_ext.lm.methods import METHODS
from salun_ext.lm.tasks import LMUnlearnTask
from salun_ext.mask import SaliencyMask
from salun_ext.train import FitResult, RunOptions, fit
from salun_ext.utils.errors import UsageError

__all__ = ["LMUnlearnConfig", "LMUnlearnResult", "lm_saliency", "unlearn_lm"]


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
    forget_term=None,
) -> SaliencyMask:
    """SalUn's mask for a causal LM: |sum of forget-NLL gradients| over the forget set, top `ratio` of all weights.

    forget_term(model, batch, index) -> loss replaces the NLL (e.g. a method's forget_term).

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
            if forget_term is not None:
                index = torch.arange(start, min(start + batch_size, len(forget)))
                return forget_term(m, batch, index)
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


def _task(forget_ids, retain_ids, cfg: LMUnlearnConfig, pad: int, seed: int, reference) -> LMUnlearnTask:
    return LMUnlearnTask(
        forget_ids,
        retain_ids,
        method=cfg.method,
        batch_size=cfg.batch_size,
        pad_id=pad,
        seed=seed,
        forget_weight=cfg.forget_weight,
        retain_weight=cfg.retain_weight if retain_ids else 0.0,
        beta=cfg.beta,
        reference_logps=reference,
        margin=cfg.margin,
        retain_loss=cfg.retain_loss,
        kl_reference=cfg.kl_reference,
        rmu_layer=cfg.rmu_layer,
        rmu_coeff=cfg.rmu_coeff,
        rmu_params=cfg.rmu_params,
    )


def _fit_trainable(model, task, params, cfg: LMUnlearnConfig, options: RunOptions, mask, fingerprint) -> FitResult:
    """fit() on `params` (None: every parameter), the mask restricted to them (RMU trains its layers only)."""
    trained_mask = mask.subset([n for n, _ in params]) if mask is not None and params is not None else mask
    # the other parameters stop requiring grad during the run: no wasted gradients, and DDP does not wait for
    # the gradients of layers after RMU's (unused by its loss); restored afterwards
    chosen = {id(p) for _, p in params} if params is not None else None
    frozen = [p for p in model.parameters() if chosen is not None and id(p) not in chosen and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        return fit(
            model,
            task,
            cfg.recipe(),
            options,
            mask=trained_mask,
            params=params,
            desc=f"lm {cfg.method}",
            fingerprint=fingerprint,
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)


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
    if cfg.optimizer_state == "compact" and mask is None and cfg.mask_ratio is None:
        raise UsageError("optimizer_state (--optimizer-state): 'compact' keeps state for the salient entries only, "
                         "so it needs a mask (mask_ratio or a mask file); got neither")  # fmt: skip
    amp = options.amp or "none"
    pad = tokenizer.pad_token_id
    forget_ids, retain_ids, method = _prepare(tokenizer, forget, retain, cfg, options.seed)
    reference = None
    if method.needs_reference:  # the frozen initial model's log-probs: computed once, no second model in memory
        reference = sequence_logps(model, forget_ids, batch_size=cfg.batch_size, pad_id=pad, amp=amp)
    task = _task(forget_ids, retain_ids, cfg, pad, options.seed, reference)
    task.prepare(model, amp=amp)  # KL reference, RMU targets: on the initial model
    start = time.perf_counter()
    if mask is None and cfg.mask_ratio is not None:
        by_method = cfg.saliency_loss == "method"
        mask = lm_saliency(
            model,
            # the NLL of the original forget answers (also for relabelling methods), or the method's own loss
            task.forget if by_method else encode(forget, tokenizer, cfg.max_length),
            cfg.mask_ratio,
            batch_size=cfg.batch_size,
            pad_id=pad,
            amp=amp,
            max_batches=cfg.saliency_batches,
            process_group=options.mask_group(),
            progress=options.progress,
            forget_term=(lambda m, b, i: method.forget_term(m, b, i, task)) if by_method else None,
        )
    mask_seconds = time.perf_counter() - start
    # a resume must match the method, its hyperparameters and the texts (a larger step budget may continue it)
    hyper = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("epochs", "max_steps")}
    texts = {"forget": [(e.input_ids, e.prompt_len) for e in forget_ids], "retain": [e.input_ids for e in retain_ids]}
    fingerprint = {"method": hyper, "data": texts} if options.checkpoint_dir else None
    result = _fit_trainable(model, task, method.trainable(model, task), cfg, options, mask, fingerprint)
    return LMUnlearnResult(mask=mask, fit=result, mask_seconds=mask_seconds)
