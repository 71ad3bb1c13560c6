"""Evaluation of an unlearned language model: loss and perplexity on forget / retain, and verbatim completion.

Verbatim completion asks whether the model still reproduces forget text: from each forget example's context
(its prompt, or the first `prompt_tokens` tokens of a plain text) the model greedily generates up to
`completion_tokens` tokens, compared with the true continuation token by token. Under torchrun every rank
evaluates its share of the examples and the sums are all-reduced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from salun_ext.distributed.runtime import current_world, sum_over_ranks
from salun_ext.lm.data import Encoded, collate
from salun_ext.lm.losses import target_logprobs


def _autocast(device: torch.device, amp: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded batch (ids, attention mask): generation then continues every row at the end."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, tokens in enumerate(rows):
        ids[row, longest - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
        attention[row, longest - len(tokens) :] = 1
    return ids, attention


def _my_share(items: Sequence, rank: int, world: int) -> list:
    return [x for i, x in enumerate(items) if i % world == rank]


@torch.no_grad()
def sequence_logps(
    model: torch.nn.Module, examples: Sequence[Encoded], *, batch_size: int, pad_id: int, amp: str = "none"
) -> torch.Tensor:
    """Sum of target-token log-probs of every example (eval mode, no grad): NPO's reference log-probs."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
            with _autocast(device, amp):
                logps, _ = target_logprobs(model, batch)
            out.append(logps.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def text_loss(
    model: torch.nn.Module, examples: Sequence[Encoded], *, batch_size: int, pad_id: int, amp: str = "none"
) -> dict[str, float]:
    """Token-level mean NLL and perplexity over all target tokens of `examples` (all ranks together)."""
    rank, world = current_world()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0.0
    for start in range(0, len(mine := _my_share(examples, rank, world)), batch_size):
        batch = {k: v.to(device) for k, v in collate(mine[start : start + batch_size], pad_id).items()}
        with _autocast(device, amp):
            logps, counts = target_logprobs(model, batch)
        total_nll -= float(logps.float().sum())
        total_tokens += float(counts.sum())
    total_nll, total_tokens = sum_over_ranks([total_nll, total_tokens], device)
    loss = total_nll / max(total_tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(total_tokens)}


@torch.no_grad()
def verbatim_completion(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Encoded],
    *,
    prompt_tokens: int = 32,
    completion_tokens: int = 32,
    batch_size: int = 8,
    amp: str = "none",
    samples: int = 3,
) -> dict:
    """Greedy continuation of each forget context vs the true continuation (exact match, token accuracy)."""
    rank, world = current_world()
    device = next(model.parameters()).device
    cases = []
    for e in examples:
        context_len = e.prompt_len if e.prompt_len > 0 else min(prompt_tokens, len(e.input_ids) // 2)
        target = e.input_ids[context_len : context_len + completion_tokens]
        if context_len > 0 and target:
            cases.append((e.input_ids[:context_len], target))
    mine = _my_share(cases, rank, world)
    exact, matched, total, shown = 0.0, 0.0, 0.0, []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            ids, attention = left_padded([context for context, _ in chunk], tokenizer.pad_token_id)
            with _autocast(device, amp):
                generated = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max(len(t) for _, t in chunk),
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )[:, ids.shape[1] :].cpu()
            for row, (context, target) in enumerate(chunk):
                got = generated[row, : len(target)].tolist()  # shorter when every row stopped at EOS early
                hits = sum(int(a == b) for a, b in zip(got, target))
                matched += hits
                total += len(target)
                exact += float(hits == len(target))
                if rank == 0 and len(shown) < samples:
                    shown.append(
                        {
                            "context": tokenizer.decode(context, skip_special_tokens=True),
                            "expected": tokenizer.decode(target, skip_special_tokens=True),
                            "generated": tokenizer.decode(got, skip_special_tokens=True),
                        }
                    )
    finally:
        model.train(was_training)
    exact, matched, total, count = sum_over_ranks([exact, matched, total, float(len(mine))], device)
    return {
        "examples": int(count),
        "exact_match": exact / count if count else float("nan"),
        "token_accuracy": matched / total if total else float("nan"),
        "samples": shown,
    }


def evaluate_lm(
    model: torch.nn.Module,
    tokenizer,
    forget: Sequence[Encoded],
    retain: Sequence[Encoded] | None = None,
    *,
    batch_size: int = 8,
    amp: str = "none",
    prompt_tokens: int = 32,
    completion_tokens: int = 32,
) -> dict:
    """Forget/retain loss and perplexity plus the verbatim-completion check on the forget set."""
    pad = tokenizer.pad_token_id
    result = {"forget": text_loss(model, forget, batch_size=batch_size, pad_id=pad, amp=amp)}
    if retain:
        result["retain"] = text_loss(model, retain, batch_size=batch_size, pad_id=pad, amp=amp)
    result["forget_verbatim"] = verbatim_completion(
        model,
        tokenizer,
        forget,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        batch_size=batch_size,
        amp=amp,
    )
    return result
