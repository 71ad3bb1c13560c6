"""The Tasks of diffusion training and unlearning: one objective each, all trained by the one loop (Engine).

    EpsTask      the standard eps-MSE (train an original model; Retrain = EpsTask on the retain set from scratch)
    SalUnTask    ||eps(x_t | c_f) - sg(eps(x_t | c'))||^2 on the forget set + alpha * eps-MSE on the retain set
    GATask       gradient ascent on the forget set's eps-MSE
    ESDTask      Erased Stable Diffusion: regress eps(x_t | c) onto the frozen model's negatively guided eps
    FMNTask      Forget-Me-Not attention re-steering: minimise the cross-attention mass on the concept's tokens

Every task draws its randomness (batches, t, noise, dropped labels, ESD's start noise) in `batches(epoch)` from
the "diffusion" stream's generator of (seed, epoch) (salun_ext.utils.epoch_generator), so checkpoints resume
exactly. Masks (SalUn's, or any other) are applied by the masked optimizers of the Engine: the same masks serve
every method. Which Task a method builds, and which parameters it trains, is in methods.py.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from salun_ext.diffusion.core import (
    DiffusionSet,
    DiffusionSpec,
    check_guidance,
    check_positive,
    check_steps,
    cycled_batches,
    denoise,
    eps_mse,
    noisy_batch,
)
from salun_ext.utils.errors import UsageError
from salun_ext.utils.seeding import epoch_generator

STREAM = "diffusion"  # the random stream of every diffusion Task's batches (salun_ext.utils.seeding.STREAMS)


class _EpochTask:
    """Shared bookkeeping: a fixed number of batches per epoch and the per-epoch generator."""

    seed: int

    def num_batches(self, epoch: int) -> int:
        return self.batches_per_epoch

    @property
    def batches_per_epoch(self) -> int:  # pragma: no cover - every task overrides it
        raise NotImplementedError

    def _generator(self, epoch: int) -> torch.Generator:
        return epoch_generator(self.seed, epoch, STREAM)


def _check_cond_drop(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise UsageError(f"cond_drop: expected a probability in [0, 1), got {p}")


# ---------------------------------------------------------------------------------------------------- eps-MSE


class EpsTask(_EpochTask):
    """Standard denoising training: MSE(eps(x_t | c), eps), c dropped to the null id with probability cond_drop.

    One epoch is one pass over `data` (the last batch is smaller). The paper's DDPM trains with cond_drop 0.1
    (classifier-free guidance needs the unconditional branch) and antithetic timesteps.
    """

    def __init__(
        self,
        spec: DiffusionSpec,
        data: DiffusionSet,
        *,
        batch_size: int = 128,
        cond_drop: float = 0.1,
        reduction: str = "mean",
        antithetic: bool = True,
        seed: int = 0,
    ) -> None:
        _check_cond_drop(cond_drop)
        eps_mse(torch.zeros(1, 1), torch.zeros(1, 1), reduction)  # validates the name early
        self.spec, self.data = spec, data
        self.batch_size, self.cond_drop, self.reduction = batch_size, cond_drop, reduction
        self.antithetic, self.seed = antithetic, seed

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def batches(self, epoch: int) -> Iterator[dict]:
        gen = self._generator(epoch)
        order = torch.randperm(len(self.data), generator=gen)
        for index in order.split(self.batch_size):
            yield noisy_batch(self.spec, self.data, index, gen, cond_drop=self.cond_drop, antithetic=self.antithetic)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return _eps_loss(self.spec, model, batch, self.reduction)


def _eps_loss(spec: DiffusionSpec, model, batch: dict, reduction: str, prefix: str = "") -> torch.Tensor:
    x_t = spec.add_noise(batch[prefix + "x0"], batch[prefix + "noise"], batch[prefix + "t"])
    pred = spec.eps(model, x_t, batch[prefix + "t"], batch[prefix + "ids"])
    return eps_mse(pred, batch[prefix + "noise"], reduction)


class _ForgetRetainTask(_EpochTask):
    """One epoch = one pass over the forget set (full batches, cycled); each step also takes a retain batch."""

    def __init__(
        self,
        spec: DiffusionSpec,
        forget: DiffusionSet,
        retain: DiffusionSet | None,
        *,
        batch_size: int,
        retain_batch_size: int | None,
        retain_cond_drop: float,
        seed: int,
    ) -> None:
        _check_cond_drop(retain_cond_drop)
        self.spec, self.forget, self.retain = spec, forget, retain
        self.batch_size = batch_size
        self.retain_batch_size = retain_batch_size or batch_size
        self.retain_cond_drop = retain_cond_drop
        self.seed = seed

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.forget) / self.batch_size)

    def batches(self, epoch: int) -> Iterator[dict]:
        gen = self._generator(epoch)
        steps = self.batches_per_epoch
        forget_idx = list(cycled_batches(len(self.forget), self.batch_size, steps, gen))
        retain_idx = (
            list(cycled_batches(len(self.retain), self.retain_batch_size, steps, gen))
            if self.retain
            else [None] * steps
        )
        for f_idx, r_idx in zip(forget_idx, retain_idx):
            batch = noisy_batch(self.spec, self.forget, f_idx, gen)
            if r_idx is not None:
                batch.update(
                    noisy_batch(self.spec, self.retain, r_idx, gen, cond_drop=self.retain_cond_drop, prefix="retain_")
                )
            yield batch


# ---------------------------------------------------------------------------------------------------- SalUn


def _retain_term(method: str, alpha: float, retain: DiffusionSet | None, reduction: str) -> DiffusionSet | None:
    """The retain set the task trains on (None when the retain term is off, alpha = 0), checked: alpha >= 0, a
    retain set whenever alpha > 0, and a known eps-MSE reduction (validated early, before any batch)."""
    check_positive(alpha, "alpha", allow_zero=True)
    if alpha > 0 and retain is None:
        raise UsageError(f"retain: {method}'s retain term (alpha = {alpha} > 0) needs a retain set (or pass "
                         "alpha=0), got None")  # fmt: skip
    eps_mse(torch.zeros(1, 1), torch.zeros(1, 1), reduction)
    return retain if alpha > 0 else None


class SalUnTask(_ForgetRetainTask):
    """SalUn for diffusion: MSE(eps(x_t | c_f), sg(eps(x_t | c'))) + alpha * eps-MSE(retain).

    The forget term pulls the forgotten class/concept's prediction onto a misaligned one (c' = `forget.target_ids`)
    at the same x_t and t, with the target from the model being trained, detached (computed without a graph: the
    paper's .detach() without the memory). Retain term: the standard eps loss with `retain_reduction` ("sum" over
    C,H,W as the paper's DDPM code, for which alpha = 1e-3 is tuned; "mean" for SD) and label dropout.
    """

    def __init__(
        self,
        spec: DiffusionSpec,
        forget: DiffusionSet,
        retain: DiffusionSet | None,
        *,
        alpha: float = 1e-3,
        batch_size: int = 128,
        retain_batch_size: int | None = None,
        retain_cond_drop: float = 0.1,
        retain_reduction: str = "sum",
        seed: int = 0,
    ) -> None:
        if forget.target_ids is None:
            raise UsageError("forget.target_ids: expected c' (the misaligned class / prompt of each example), got None")
        if torch.equal(forget.target_ids, forget.ids):
            raise UsageError("forget.target_ids: SalUn's c' equals c for every forget example (a zero forget loss)")
        super().__init__(
            spec,
            forget,
            _retain_term("SalUn", alpha, retain, retain_reduction),
            batch_size=batch_size,
            retain_batch_size=retain_batch_size,
            retain_cond_drop=retain_cond_drop,
            seed=seed,
        )
        self.alpha, self.retain_reduction = alpha, retain_reduction
        self.last_terms: dict[str, torch.Tensor] = {}  # the last batch's forget / retain terms

    def forget_loss(self, model, batch: dict) -> torch.Tensor:
        x_t = self.spec.add_noise(batch["x0"], batch["noise"], batch["t"])
        with torch.no_grad():
            target = self.spec.eps(model, x_t, batch["t"], batch["target_ids"])
        return F.mse_loss(self.spec.eps(model, x_t, batch["t"], batch["ids"]), target)

    def loss(self, model, batch: dict) -> torch.Tensor:
        loss = self.forget_loss(model, batch)
        # detached tensors, not floats: reading them would synchronise the GPU every step
        self.last_terms = {"forget": loss.detach()}
        if self.retain is not None:
            retain = _eps_loss(self.spec, model, batch, self.retain_reduction, prefix="retain_")
            self.last_terms["retain"] = retain.detach()
            loss = loss + self.alpha * retain
        return loss


# ---------------------------------------------------------------------------------------------------- GA


class GATask(_ForgetRetainTask):
    """Gradient ascent: maximise the forget set's eps-MSE (the baseline the paper shows to collapse the model).

    alpha > 0 adds alpha x the retain set's eps-MSE (the paper code's GA: -forget + alpha * retain); `reduction`:
    "mean" over every element, or "sum" over C, H, W then the batch mean (the paper's DDPM code).
    """

    def __init__(
        self,
        spec: DiffusionSpec,
        forget: DiffusionSet,
        retain: DiffusionSet | None = None,
        *,
        alpha: float = 0.0,
        batch_size: int = 128,
        reduction: str = "mean",
        retain_cond_drop: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            spec,
            forget,
            _retain_term("GA", alpha, retain, reduction),
            batch_size=batch_size,
            retain_batch_size=None,
            retain_cond_drop=retain_cond_drop,
            seed=seed,
        )
        self.alpha, self.reduction = alpha, reduction

    def loss(self, model, batch: dict) -> torch.Tensor:
        loss = -_eps_loss(self.spec, model, batch, self.reduction)
        if self.retain is not None:
            loss = loss + self.alpha * _eps_loss(self.spec, model, batch, self.reduction, prefix="retain_")
        return loss


# ---------------------------------------------------------------------------------------------------- ESD

ESD_VARIANTS = ("esd-x", "esd-u", "esd-x-strict", "esd-full")
ESD_SAMPLING = ("matched", "compvis")  # where x_t and the loss timestep come from (see ESDTask)


def esd_parameters(unet: torch.nn.Module, variant: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters ESD trains: weights and biases of Linear/Conv layers (never norms), selected by variant.

    esd-x: cross-attention (`attn2`) only; esd-u: everything but cross-attention; esd-x-strict: attn2.to_k/to_v;
    esd-full: every Linear/Conv layer.
    """
    if variant not in ESD_VARIANTS:
        raise UsageError(f"variant: unknown ESD variant {variant!r}; expected one of {ESD_VARIANTS}")
    layers = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
    chosen = []
    for mod_name, module in unet.named_modules():
        if not isinstance(module, layers):
            continue
        in_xattn = ".attn2." in f".{mod_name}."
        keep = {
            "esd-x": in_xattn,
            "esd-u": not in_xattn,
            "esd-x-strict": in_xattn and mod_name.split(".")[-1] in ("to_k", "to_v"),
            "esd-full": True,
        }[variant]
        if keep:
            chosen += [(f"{mod_name}.{n}", p) for n, p in module.named_parameters(recurse=False)]
    if not chosen:
        hint = " (this UNet has no cross-attention: use esd-u)" if variant.startswith("esd-x") else ""
        raise UsageError(f"ESD variant {variant!r} selects no parameter of this UNet{hint}")
    return chosen


class ESDTask(_EpochTask):
    """ESD: train eps(x_t | c) toward the frozen model's eps0(x_t) - eta (eps0(x_t | c) - eps0(x_t)).

    x_t (xt_source="sample", the ESD recipe): seeded noise denoised with guidance `guidance_scale` on c for
    run_till ~ U{0..sample_steps-1} DDIM steps. variant "matched" (rohitgandikota/erasing, the default): by the
    frozen model, and the loss is taken at the next step's timestep. variant "compvis" (the SalUn code's
    SD/train-scripts/train-esd.py): by the model being trained, and the loss at a DDPM timestep drawn from
    [round(k T / S), round((k + 1) T / S)) for k = run_till (which counts from the noise, so that timestep does not
    match x_t's noise level: the script's quirk, kept). xt_source="data": x_t = forget images noised at
    t ~ U{0..T-1} (cheaper, needs data).

    The frozen copy is made here (on the UNet's device, in `frozen_dtype`); nothing else of the model is copied.
    `concept_ids`: the ids to erase (class labels or prompt-table rows); each step draws one per sample.
    """

    def __init__(
        self,
        spec: DiffusionSpec,
        unet: torch.nn.Module,
        concept_ids: Sequence[int],
        sample_shape: Sequence[int],
        *,
        eta: float = 1.0,
        guidance_scale: float = 3.0,
        sample_steps: int = 50,
        batch_size: int = 1,
        steps_per_epoch: int = 50,
        xt_source: str = "sample",
        data: DiffusionSet | None = None,
        frozen_dtype: torch.dtype | None = None,
        variant: str = "matched",
        seed: int = 0,
    ) -> None:
        from diffusers import DDIMScheduler

        if variant not in ESD_SAMPLING:
            raise UsageError(f"variant: expected one of {', '.join(ESD_SAMPLING)}; got {variant!r}")
        if not concept_ids:
            raise UsageError(f"concept_ids: expected at least one concept id to erase, got {list(concept_ids)}")
        check_positive(eta, "eta")
        check_guidance(guidance_scale)
        check_steps(sample_steps, spec.num_train_timesteps, "sample_steps")
        if xt_source not in ("sample", "data"):
            raise UsageError(f"xt_source: expected 'sample' or 'data', got {xt_source!r}")
        if xt_source == "data" and data is None:
            raise UsageError("data: xt_source='data' needs the forget data, got None")
        self.spec, self.concept_ids = spec, torch.tensor(list(concept_ids), dtype=torch.long)
        self.sample_shape = tuple(sample_shape)
        self.eta, self.guidance_scale, self.sample_steps = eta, guidance_scale, sample_steps
        self.batch_size, self.steps_per_epoch, self.xt_source, self.data = batch_size, steps_per_epoch, xt_source, data
        self.seed, self.variant = seed, variant
        self.frozen = copy.deepcopy(unet).requires_grad_(False).eval()
        if frozen_dtype is not None:
            self.frozen.to(frozen_dtype)
        self.sampler = DDIMScheduler.from_config(spec.scheduler.config)

    @property
    def batches_per_epoch(self) -> int:
        return self.steps_per_epoch

    def batches(self, epoch: int) -> Iterator[dict]:
        gen = self._generator(epoch)
        for _ in range(self.steps_per_epoch):
            pick = torch.randint(0, len(self.concept_ids), (self.batch_size,), generator=gen)
            if self.xt_source == "sample":
                batch = {
                    "ids": self.concept_ids[pick],
                    "x_T": torch.randn((self.batch_size, *self.sample_shape), generator=gen),
                    "run_till": torch.randint(0, self.sample_steps, (), generator=gen),
                }
                if self.variant == "compvis":  # where in the step's interval the loss timestep lies
                    batch["t_pick"] = torch.rand((), generator=gen)
                yield batch
            else:
                index = torch.randint(0, len(self.data), (self.batch_size,), generator=gen)
                batch = noisy_batch(self.spec, self.data, index, gen)
                batch["ids"] = self.concept_ids[pick]
                yield batch

    @torch.no_grad()
    def _x_t(self, batch: dict, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if self.xt_source == "data":
            return self.spec.add_noise(batch["x0"], batch["noise"], batch["t"]), batch["t"]
        x_t, t_next = denoise(
            model if self.variant == "compvis" else self.frozen,
            self.spec,
            self.sampler,
            batch["x_T"],
            batch["ids"],
            guidance_scale=self.guidance_scale,
            num_inference_steps=self.sample_steps,
            stop_after=int(batch["run_till"]),
        )
        if self.variant == "matched":
            return x_t, t_next
        return x_t, self.compvis_timestep(int(batch["run_till"]), float(batch["t_pick"]), x_t)

    def compvis_timestep(self, run_till: int, pick: float, x_t: torch.Tensor) -> torch.Tensor:
        """The train-esd.py timestep: uniform in [round(k T / S), round((k + 1) T / S)) for k = run_till."""
        total = self.spec.num_train_timesteps
        lo = round(run_till / self.sample_steps * total)
        hi = max(lo + 1, round((run_till + 1) / self.sample_steps * total))
        t = min(total - 1, lo + int(pick * (hi - lo)))
        return torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)

    def loss(self, model, batch: dict) -> torch.Tensor:
        x_t, t = self._x_t(batch, model)
        ids = batch["ids"]
        with torch.no_grad():  # both frozen branches in one batched pass
            null = torch.full_like(ids, self.spec.null_id)
            e_c, e_null = self.spec.eps(
                self.frozen, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([ids, null])
            ).chunk(2)
            target = e_null - self.eta * (e_c - e_null)
        return F.mse_loss(self.spec.eps(model, x_t, t, ids), target)


# ---------------------------------------------------------------------------------------------------- FMN


class AttentionProbe:
    """Cross-attention processor that computes the attention probabilities explicitly and records the columns of
    chosen tokens (Forget-Me-Not's attention re-steering loss needs the post-softmax maps)."""

    def __init__(self, recorder: list[torch.Tensor], columns: torch.Tensor) -> None:
        self.recorder, self.columns = recorder, columns

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.dim() != 3:
            raise NotImplementedError("AttentionProbe supports the cross-attention of SD's transformer blocks only")
        if encoder_hidden_states is None:
            raise UsageError("AttentionProbe is installed on a self-attention layer; install it on attn2 only")
        batch, tokens, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (batch * heads) x queries x tokens
        self.recorder.append(probs[..., self.columns.to(probs.device)])
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def cross_attention_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """name -> every `attn2` (cross-attention) module of a UNet2DConditionModel."""
    return {name: m for name, m in unet.named_modules() if name.split(".")[-1] == "attn2"}


class FMNTask(_EpochTask):
    """Forget-Me-Not: minimise || A[:, :, concept tokens] ||_F over every cross-attention map of the UNet.

    Inputs: the concept's images (VAE latents) with the prompt "a photo of <concept>", noised at t ~ U{0..T-1};
    `columns`: the concept's token positions in that prompt (`StableDiffusion.token_columns`). The probes stay
    installed until `remove()` (the Engine's model must route attention through them); the optional stage 1
    (textual inversion of the concept) is left out: the prompt's own tokens are re-steered.
    """

    def __init__(
        self,
        spec: DiffusionSpec,
        unet: torch.nn.Module,
        forget: DiffusionSet,
        columns: Sequence[int],
        *,
        batch_size: int = 1,
        seed: int = 0,
    ) -> None:
        modules = cross_attention_modules(unet)
        if not modules:
            raise UsageError("unet: FMN expected a UNet with cross-attention (attn2: Stable Diffusion), got none")
        if not columns:
            raise UsageError(f"columns: FMN expected the concept's token columns, got {list(columns)}")
        self.spec, self.forget, self.batch_size, self.seed = spec, forget, batch_size, seed
        self.columns = torch.tensor(sorted(set(columns)), dtype=torch.long)
        self.recorded: list[torch.Tensor] = []
        self._previous = {name: m.processor for name, m in modules.items()}
        for m in modules.values():
            m.set_processor(AttentionProbe(self.recorded, self.columns))
        self._modules = modules

    def remove(self) -> None:
        """Restore the original attention processors."""
        for name, m in self._modules.items():
            m.set_processor(self._previous[name])

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.forget) / self.batch_size)

    def batches(self, epoch: int) -> Iterator[dict]:
        gen = self._generator(epoch)
        for index in cycled_batches(len(self.forget), self.batch_size, self.batches_per_epoch, gen):
            yield noisy_batch(self.spec, self.forget, index, gen)

    def loss(self, model, batch: dict) -> torch.Tensor:
        self.recorded.clear()
        x_t = self.spec.add_noise(batch["x0"], batch["noise"], batch["t"])
        self.spec.eps(model, x_t, batch["t"], batch["ids"])
        if not self.recorded:
            raise RuntimeError("FMN recorded no attention map: the model does not route through the installed probes")
        loss = torch.sqrt(sum(a.float().pow(2).sum() for a in self.recorded))
        self.recorded.clear()
        return loss
