"""Language-model unlearning methods, one small class each, found through `METHODS` (the CLI's choices).

A method says what differs from the others: how the forget set is prepared (relabelled or not), whether the
frozen initial model's log-probs are needed, and the forget loss of a batch. Everything else (the retain term,
batching, masks, the loop) is shared by LMUnlearnTask and unlearn_lm.

    method        forget loss L_f                                         (L = gamma L_f + alpha NLL_retain)
    ga            -NLL(forget)                                             gradient ascent (GradDiff with alpha > 0)
    npo           -(2/beta) mean log sigmoid(-beta (log pi - log pi_ref))  reference: the initial model
    idk           NLL(forget prompts -> "I don't know"-style answers)
    random_label  NLL(forget prompts -> random retain answers)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from salun_ext.lm.data import IDK_ANSWERS, Encoded, answer_ids, relabel
from salun_ext.lm.losses import mean_nll, npo_loss
from salun_ext.train import Registry
from salun_ext.utils.errors import UsageError


class LMMethod:
    """The contract of an LM unlearning method (see the module docstring)."""

    name: ClassVar[str]
    needs_reference: ClassVar[bool] = False  # NPO: the initial model's sequence log-probs on the forget set

    def prepare_forget(
        self, forget: list[Encoded], retain: list[Encoded], tokenizer: Any, *, seed: int, max_length: int
    ) -> list[Encoded]:
        """The forget examples the loss trains on (the original ones unless the method relabels them)."""
        return forget

    def forget_loss(self, logps: torch.Tensor, counts: torch.Tensor, index: torch.Tensor, task: Any) -> torch.Tensor:
        """The forget term of one batch from its per-sequence target log-probs and token counts."""
        raise NotImplementedError


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


def method_names() -> Sequence[str]:
    return tuple(METHODS)
