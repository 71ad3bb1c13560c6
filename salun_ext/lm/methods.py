"""Language-model unlearning methods, one small class each, found through `METHODS` (the CLI's choices).

A method says what differs from the others: how the forget set is prepared (relabelled or not), whether the
frozen initial model's log-probs are needed, and the forget loss of a batch. Everything else (the retain term,
batching, masks, the loop) is shared by LMUnlearnTask and unlearn_lm.

    method        forget loss L_f                                   (L = gamma L_f + alpha R, R = NLL or KL retain)
    ga            -NLL(forget)                                           gradient ascent
    npo           -(2/beta) mean log sigmoid(-beta (log pi - log pi_ref))  reference: the initial model
    idk           NLL(forget prompts -> "I don't know"-style answers)
    random_label  NLL(forget prompts -> random retain answers)
    simnpo        -(2/beta) mean log sigmoid(-(beta/|y|) log pi - margin)  reference-free, length-normalised
    graddiff      -NLL(forget), with the retain term R (retain_loss "nll" or "kl")
    rmu           mean ||h_l(forget) - c u||^2, R = mean ||h_l(retain) - h_l^orig(retain)||^2; layers l-2..l train

A method with sequence log-prob losses implements `forget_loss`; one that needs more (RMU: activations)
overrides `forget_term` (the forget loss of a forget-only batch: also SalUn's mask loss with
saliency_loss="method") and `loss` (one step's whole loss).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from salun_ext.lm.data import IDK_ANSWERS, IGNORE_INDEX, Encoded, answer_ids, collate, relabel
from salun_ext.lm.losses import logprobs_from_logits, mean_nll, npo_loss, simnpo_loss, target_logprobs
from salun_ext.train import Registry
from salun_ext.utils.errors import UsageError


class LMMethod:
    """The contract of an LM unlearning method (see the module docstring)."""

    name: ClassVar[str]
    needs_reference: ClassVar[bool] = False  # NPO: the initial model's sequence log-probs on the forget set
    default_beta: ClassVar[float] = 0.1

    def prepare_forget(
        self, forget: list[Encoded], retain: list[Encoded], tokenizer: Any, *, seed: int, max_length: int
    ) -> list[Encoded]:
        """The forget examples the loss trains on (the original ones unless the method relabels them)."""
        return forget

    def setup(self, model: torch.nn.Module, task: Any, *, amp: str = "none") -> None:
        """Work before the first step (the initial model is still untouched): RMU caches its targets here."""

    def trainable(self, model: torch.nn.Module, task: Any) -> list[tuple[str, torch.nn.Parameter]] | None:
        """The parameters that train (None: every parameter that requires grad)."""
        return None

    def forget_loss(self, logps: torch.Tensor, counts: torch.Tensor, index: torch.Tensor, task: Any) -> torch.Tensor:
        """The forget term of one batch from its per-sequence target log-probs and token counts."""
        raise NotImplementedError

    def forget_term(self, model: torch.nn.Module, batch: dict, index: torch.Tensor, task: Any) -> torch.Tensor:
        """The forget loss of a batch of forget examples only (SalUn's mask loss with saliency_loss="method")."""
        logps, counts = target_logprobs(model, batch)
        return self.forget_loss(logps, counts, index, task)

    def loss(self, model: torch.nn.Module, batch: dict, task: Any) -> torch.Tensor:
        """One step's loss: gamma * forget term + alpha * the task's retain term, from one forward pass."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, counts = logprobs_from_logits(logits, batch["labels"])
        n = batch["index"].numel()
        loss = task.forget_weight * self.forget_loss(logps[:n], counts[:n], batch["index"], task)
        if task.retain_weight > 0:
            loss = loss + task.retain_weight * task.retain_term(batch, logits[n:], logps[n:], counts[n:])
        return loss


METHODS: Registry[type[LMMethod]] = Registry("LM method")


@METHODS.register
class GradientAscent(LMMethod):
    name = "ga"

    def forget_loss(self, logps, counts, index, task) -> torch.Tensor:
        return -mean_nll(logps, counts)


@METHODS.register
class NPO(LMMethod):
    name = "npo"
    needs_reference = True

    def forget_loss(self, logps, counts, index, task) -> torch.Tensor:
        return npo_loss(logps, task.reference_logps[index.cpu()], task.beta)


@METHODS.register
class IDK(LMMethod):
    """Relabel every forget prompt with an "I don't know"-style answer and learn it."""

    name = "idk"

    def prepare_forget(self, forget, retain, tokenizer, *, seed: int, max_length: int) -> list[Encoded]:
        idk = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in IDK_ANSWERS]
        return relabel(forget, idk, seed=seed, max_length=max_length)

    def forget_loss(self, logps, counts, index, task) -> torch.Tensor:
        return mean_nll(logps, counts)


@METHODS.register
class RandomLabel(LMMethod):
    """Relabel every forget prompt with a random retain answer and learn it."""

    name = "random_label"

    def prepare_forget(self, forget, retain, tokenizer, *, seed: int, max_length: int) -> list[Encoded]:
        if not retain:
            raise UsageError("method 'random_label' draws the new answers from the retain set: give a retain set")
        return relabel(forget, answer_ids(retain), seed=seed, max_length=max_length)

    def forget_loss(self, logps, counts, index, task) -> torch.Tensor:
        return mean_nll(logps, counts)


@METHODS.register
class SimNPO(LMMethod):
    """NPO without the reference model: the length-normalised log-prob against a margin (Fan et al., 2024)."""

    name = "simnpo"
    default_beta = 2.5

    def forget_loss(self, logps, counts, index, task) -> torch.Tensor:
        return simnpo_loss(logps, counts, task.beta, task.margin)


@METHODS.register
class GradDiff(LMMethod):
    """Gradient difference: -NLL(forget) + alpha * (NLL or KL(ref || theta)) on retain (retain_loss)."""

    name = "graddiff"

    def forget_loss(self, logps, counts, index, task) -> torch.Tensor:
        return -mean_nll(logps, counts)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a transformers causal LM (Llama/Mistral/Qwen: model.model.layers; GPT-2: transformer.h)."""
    for wrapper in ("_orig_mod", "module"):  # torch.compile, then DistributedDataParallel
        model = getattr(model, wrapper, model)
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, torch.nn.ModuleList):
            return module
    raise UsageError(f"rmu: cannot find the decoder layers of {type(model).__name__}")


def layer_output(model: torch.nn.Module, layer: int, batch: dict) -> torch.Tensor:
    """The hidden states [B, T, H] that decoder layer `layer` outputs (a forward hook; the rest of the pass runs).

    `model` may be the Engine's DDP / compiled wrapper: the hook goes on the inner layer, the forward through it.
    """
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise UsageError(f"rmu_layer {layer} is out of range: the model has {len(layers)} decoder layers")
    captured: list[torch.Tensor] = []

    def hook(module, inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = layers[layer].register_forward_hook(hook)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    return captured[0]


def _target_rows(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The activations [N, H] at the target tokens (labels != -100), row by row."""
    return hidden[labels != IGNORE_INDEX].float()


@METHODS.register
class RMU(LMMethod):
    """Representation misdirection (Li et al., 2024, WMDP): forget activations of layer l -> c * u (u a fixed random
    unit vector), retain activations held to the frozen original's (cached up front: no second model)."""

    name = "rmu"

    def setup(self, model, task, *, amp: str = "none") -> None:
        from salun_ext.lm.evaluate import _autocast

        device = next(model.parameters()).device
        layers = len(decoder_layers(model))
        if not 0 <= task.rmu_layer < layers:
            raise UsageError(f"rmu_layer {task.rmu_layer} is out of range: the model has {layers} decoder layers")
        hidden = model.config.hidden_size
        gen = torch.Generator().manual_seed(task.seed)
        u = torch.rand(hidden, generator=gen)
        task.rmu_target = task.rmu_coeff * u / u.norm()
        task.rmu_retain = []
        if task.retain_weight > 0:  # the original model's layer-l activations on every retain example
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    for e in task.retain:
                        batch = {k: v.to(device) for k, v in collate([e], task.pad_id).items()}
                        with _autocast(device, amp):
                            out = layer_output(model, task.rmu_layer, batch)
                        task.rmu_retain.append(_target_rows(out, batch["labels"]).cpu())
            finally:
                model.train(was_training)

    def trainable(self, model, task):
        layer = task.rmu_layer
        chosen_layers = "|".join(str(i) for i in range(max(0, layer - 2), layer + 1))
        pattern = task.rmu_params or rf"(^|\.)(layers|h)\.({chosen_layers})\.mlp\.down_proj\.weight$"
        chosen = [(n, p) for n, p in model.named_parameters() if re.search(pattern, n) and p.requires_grad]
        if not chosen:
            raise UsageError(f"rmu: no parameter matches {pattern!r}")
        return chosen

    def forget_term(self, model, batch, index, task) -> torch.Tensor:
        out = _target_rows(layer_output(model, task.rmu_layer, batch), batch["labels"])
        return ((out - task.rmu_target.to(out.device)) ** 2).mean()

    def loss(self, model, batch, task) -> torch.Tensor:
        n = batch["index"].numel()
        hidden = layer_output(model, task.rmu_layer, batch)
        labels = batch["labels"]
        forget = _target_rows(hidden[:n], labels[:n])
        loss = task.forget_weight * ((forget - task.rmu_target.to(forget.device)) ** 2).mean()
        if task.retain_weight > 0:
            retain = _target_rows(hidden[n:], labels[n:])
            frozen = torch.cat([task.rmu_retain[i] for i in batch["retain_index"].tolist()]).to(retain.device)
            loss = loss + task.retain_weight * ((retain - frozen) ** 2).mean()
        return loss


def method_names() -> Sequence[str]:
    return tuple(METHODS)
