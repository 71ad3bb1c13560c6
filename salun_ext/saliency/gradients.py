"""Gradients of a model -> saliency masks: accumulate a loss's gradients -> share them over ranks -> rank them.

select_parameters   which named parameters take part (a preset, a predicate or a list of names)
compute_saliency    the three steps below, one function each:
  _accumulate       sum the gradients of `loss_fn` over the batches (optionally |g| per batch, clipped)
  _share            with a process group: agree on parameters and options, then make the sums global
  _rank             |sum| (or the sum of |g|) -> `saliency_masks`
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from salun_ext.mask import SaliencyMask
from salun_ext.saliency._threshold import HistogramReducer, NanPolicy, has_dtensor
from salun_ext.saliency.local import saliency_masks
from salun_ext.utils.devices import is_main_process
from salun_ext.utils.errors import UsageError

ParamSelector = str | Callable[[str, torch.nn.Parameter], bool] | Iterable[str]
REDUCTIONS = ("abs_of_sum", "sum_of_abs")
Named = list[tuple[str, torch.nn.Parameter]]


def select_parameters(model: torch.nn.Module, params: ParamSelector = "all") -> Named:
    """Named trainable parameters chosen by a preset, a predicate, or a list of names.

    Presets: "all" (every parameter with requires_grad: the paper's choice, BN and FC included) and
    "conv_linear" (the weights of Conv and Linear layers only).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(params, str):
        if params == "all":
            chosen = named
        elif params == "conv_linear":
            wanted = {
                f"{mod_name}.weight" if mod_name else "weight"
                for mod_name, mod in model.named_modules()
                if isinstance(mod, (torch.nn.modules.conv._ConvNd, torch.nn.Linear))
            }
            chosen = [(n, p) for n, p in named if n in wanted]
        else:
            raise UsageError(f"unknown parameter preset {params!r}; expected 'all' or 'conv_linear'")
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        wanted_names = list(params)
        index = dict(named)
        unknown = [n for n in wanted_names if n not in index]
        if unknown:
            raise UsageError(f"unknown or frozen parameter name(s): {unknown[:5]}")
        chosen = [(n, index[n]) for n in wanted_names]
    if not chosen:
        raise UsageError(f"parameter selection {params!r} matched no trainable parameter")
    return chosen


def compute_saliency(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    ratios: float | Sequence[float] = 0.5,
    *,
    reduction: str = "abs_of_sum",
    params: ParamSelector = "all",
    clip_grad_norm: float | None = None,
    exact_k: bool = True,
    nan: NanPolicy = "raise",
    train_mode: bool = False,
    progress: bool = True,
    reducer: HistogramReducer | None = None,
    process_group: Any = None,
    replicated_batches: bool = False,
    timeout_s: float | None = 300.0,
) -> SaliencyMask | list[SaliencyMask]:
    """Accumulate forget-loss gradients over `batches` and return the saliency mask(s).

    Args:
        loss_fn: (model, batch) -> scalar loss. SalUn's classification recipe uses -CE on the forget set (the
            sign does not matter: magnitudes are ranked).
        reduction: "abs_of_sum" (the paper: |sum_b g_b|) or "sum_of_abs" (sum_b |g_b|).
        params: which parameters are ranked (see `select_parameters`); the paper ranks all of them.
        clip_grad_norm: clip each batch's gradient to this norm before summing (the DDPM recipe uses 1.0).
        train_mode: run the model in train mode (the paper computes masks in eval mode).
        process_group: compute one global mask over a torch.distributed group, each rank iterating its own share
            of the batches. A DistributedDataParallel model (its gradients are already averaged) and FSDP2
            models (DTensor shards) are used as they are; for a plain module the summed gradients are
            all-reduced once before ranking. Names are the unwrapped module's. With DDP/FSDP a "batch" for
            sum_of_abs and clip_grad_norm is the global batch (all ranks' batches together).
        replicated_batches: with a plain module and `process_group`, every rank iterates the SAME batches, so its
            summed gradients already are the global ones: they are ranked as replicated tensors (each element
            counted once, the ranking work split over the ranks) without an all-reduce. The mask then equals the
            one-process mask bit for bit (no change of summation order) when the kernels are deterministic.
            Rank 0's sums are broadcast first, so the ranks always agree on one mask even when they are not.
    The parameters' `.grad` are cleared on return.
    """
    if reduction not in REDUCTIONS:
        raise UsageError(f"reduction must be 'abs_of_sum' or 'sum_of_abs', got {reduction!r}")
    if clip_grad_norm is not None and not (clip_grad_norm > 0 and math.isfinite(clip_grad_norm)):
        raise UsageError(f"clip_grad_norm must be a positive finite float, got {clip_grad_norm}")
    named = select_parameters(model.module if _is_ddp(model) else model, params)
    sums, count = _accumulate(model, named, loss_fn, batches, reduction, clip_grad_norm, train_mode, progress)
    options = repr((ratios, reduction, clip_grad_norm, exact_k, nan))
    _share(sums, count, named, model, process_group, replicated_batches, options, timeout_s)
    return _rank(
        sums,
        named,
        ratios,
        reduction,
        exact_k=exact_k,
        nan=nan,
        reducer=reducer,
        process_group=process_group,
        timeout_s=timeout_s,
    )


def _accumulate(
    model, named: Named, loss_fn, batches, reduction: str, clip_grad_norm, train_mode: bool, progress: bool
) -> tuple[dict[str, torch.Tensor], int]:
    """(name -> summed gradient, number of batches) of `loss_fn` over this process's batches.

    Gradients accumulate in .grad directly unless each batch must be transformed first (|g| or clipping: then
    in buffers of our own, no extra memory otherwise). A parameter the loss never reached sums to zeros: it
    still takes part in the ranking. The model's train/eval mode is restored.
    """
    from tqdm.auto import tqdm

    own_buffers = reduction == "sum_of_abs" or clip_grad_norm is not None
    accum = {n: torch.zeros_like(p) for n, p in named} if own_buffers else None
    was_training = model.training
    model.train(train_mode)
    for p in model.parameters():
        p.grad = None
    count = 0
    try:
        total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        bar = tqdm(batches, total=total, desc="saliency", disable=not (progress and is_main_process()), leave=False)
        for batch in bar:
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("loss_fn must return a scalar tensor")
            loss.backward()
            count += 1
            if own_buffers:
                _add_batch(accum, named, reduction, clip_grad_norm)
    finally:
        model.train(was_training)
    if own_buffers:
        return accum, count
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in named}, count


def _add_batch(accum: dict[str, torch.Tensor], named: Named, reduction: str, clip_grad_norm) -> None:
    """Add one batch's (clipped, |.|) gradients to `accum` and clear them."""
    # clip_grad_norm_ takes the parameters (it reads their .grad): given bare gradient tensors it would find no
    # .grad and silently clip nothing
    with_grad = [p for _, p in named if p.grad is not None]
    if clip_grad_norm is not None and with_grad:
        torch.nn.utils.clip_grad_norm_(with_grad, clip_grad_norm)
    for n, p in named:
        if p.grad is not None:
            accum[n].add_(p.grad.abs() if reduction == "sum_of_abs" else p.grad)
            p.grad = None


def _share(sums, count: int, named: Named, model, process_group, replicated_batches: bool, options: str, timeout_s):
    """With a process group: the same parameters and options everywhere, then the global sums in `sums`.

    DDP already all-reduced the gradients and DTensor shards are ranked where they are; the sums of a plain
    module are all-reduced (each rank summed its own batches) or, with `replicated_batches`, rank 0's are
    broadcast. Raises when no rank saw a batch.
    """
    if process_group is None:
        if count == 0:
            raise UsageError("compute_saliency: 'batches' yielded no batch")
        return
    from salun_ext.distributed.agreement import agree
    from salun_ext.distributed.runtime import Collectives

    comm = Collectives(process_group, timeout_s=timeout_s, what="compute_saliency")
    # same parameters and options everywhere before any gradient is all-reduced
    structure = repr([(n, tuple(p.shape), str(p.dtype)) for n, p in named])
    described = f"{len(named)} tensors, {sum(p.numel() for _, p in named):,} elements"
    agree(comm, error=None, fields={"parameter list": (structure, described), "ratios and options": (options, options)})
    count = int(comm.all_reduce(torch.tensor([count], dtype=torch.int64)).item())
    if count == 0:
        raise UsageError("compute_saliency: 'batches' yielded no batch on any rank")
    if _is_ddp(model) or has_dtensor(sums):
        return
    for g in sums.values():
        wire = g.float() if g.dtype == torch.bfloat16 else g  # gloo has no bf16 collectives
        if replicated_batches:
            # the ranks summed the same batches, but nothing guarantees bit-identical sums (non-deterministic
            # CUDA kernels, other thread counts): rank 0's sums, shared once, make every rank rank the same numbers
            g.copy_(comm.broadcast(wire).to(g.device, g.dtype))
        else:  # each rank summed its own batches: one all-reduce makes the global sum
            g.copy_(comm.all_reduce(wire).to(g.device, g.dtype))


def _rank(sums, named: Named, ratios, reduction: str, **select) -> SaliencyMask | list[SaliencyMask]:
    """The masks of the magnitudes (|sum|, in place, for abs_of_sum); the parameters' .grad are cleared first."""
    if reduction == "abs_of_sum":
        if has_dtensor(sums):
            for g in sums.values():
                g.abs_()
        else:  # one call for the whole list
            torch._foreach_abs_(list(sums.values()))
    magnitudes = sums
    for _, p in named:
        p.grad = None
    return saliency_masks(magnitudes, ratios, **select)


def _is_ddp(model: torch.nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)
