"""Token log-probabilities and the forget losses of language-model unlearning (GA, NPO, relabelling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from salun_ext.lm.data import IGNORE_INDEX


def target_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(target token) per sequence [B], number of target tokens per sequence [B])."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    # cross_entropy upcasts bf16 logits to fp32 internally (also under autocast); no [B, T, V] fp32 copy here
    token_nll = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )  # [B, T-1]
    targets = labels != IGNORE_INDEX
    return -(token_nll * targets).sum(dim=1), targets.sum(dim=1)


def mean_nll(logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Token-level mean negative log-likelihood (the usual LM loss) of a group of sequences."""
    return -logps.sum() / counts.sum().clamp_min(1)


def npo_loss(logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO: -(2 / beta) * mean log sigmoid(-beta * (log pi_theta(y|x) - log pi_ref(y|x))), sequence log-probs."""
    log_ratio = logps.float() - reference_logps.to(logps.device, torch.float32)
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()
