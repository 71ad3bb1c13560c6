"""Token log-probabilities and the forget / retain losses of language-model unlearning."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from salun_ext.lm.data import IGNORE_INDEX


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(target token) per sequence [B], number of target tokens per sequence [B])."""
    shifted = labels[:, 1:]
    # cross_entropy upcasts bf16 logits to fp32 internally (also under autocast); no [B, T, V] fp32 copy here
    token_nll = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none"
    )  # [B, T-1]
    targets = shifted != IGNORE_INDEX
    return -(token_nll * targets).sum(dim=1), targets.sum(dim=1)


def target_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(target token) per sequence [B], number of target tokens per sequence [B])."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logprobs_from_logits(logits, batch["labels"])


def target_log_softmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log-softmax (fp32) of the predictions of every target token [N, V], row by row, position by position."""
    selected = labels[:, 1:] != IGNORE_INDEX
    return F.log_softmax(logits[:, :-1][selected].float(), dim=-1)


def mean_nll(logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Token-level mean negative log-likelihood (the usual LM loss) of a group of sequences."""
    return -logps.sum() / counts.sum().clamp_min(1)


def npo_loss(logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO: -(2 / beta) * mean log sigmoid(-beta * (log pi_theta(y|x) - log pi_ref(y|x))), sequence log-probs."""
    log_ratio = logps.float() - reference_logps.to(logps.device, torch.float32)
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def simnpo_loss(logps: torch.Tensor, counts: torch.Tensor, beta: float, margin: float = 0.0) -> torch.Tensor:
    """SimNPO: -(2 / beta) * mean log sigmoid(-(beta / |y|) log pi_theta(y|x) - margin) (no reference model)."""
    per_token = logps.float() / counts.clamp_min(1).to(logps.device, torch.float32)
    return -(2.0 / beta) * F.logsigmoid(-beta * per_token - margin).mean()


def kl_to_reference(reference_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(ref || theta) = sum_v p_ref(v) (log p_ref(v) - log p_theta(v)); both [N, V] log-probs."""
    reference_logp = reference_logp.to(logp.device, torch.float32)
    return (reference_logp.exp() * (reference_logp - logp)).sum(dim=-1).mean()
