"""Loading and saving causal language models (transformers) for unlearning."""

from __future__ import annotations

import os

import torch

from salun_ext.utils.errors import MissingFileError, UsageError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' = bf16 on a CUDA device that supports it, else fp32."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be 'auto', 'bf16', 'fp16' or 'fp32', got {dtype!r}")
    return DTYPES[dtype]


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str = "auto",
    device: torch.device | str = "cpu",
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) from a local folder (config.json + weights + tokenizer files) or a hub id.

    The tokenizer gets a pad token (EOS) when it has none. Gradient checkpointing is the non-reentrant kind
    (works with DDP and frozen inputs) and turns the KV cache off.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    local = os.path.isdir(name_or_path)
    if not local and os.path.sep in name_or_path and not name_or_path.count("/") == 1:
        raise MissingFileError(f"model folder not found: {name_or_path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        where = "the local folder" if local else "the Hugging Face hub (or its cache)"
        raise UsageError(f"cannot load a causal LM from {name_or_path!r} ({where}): {exc}") from exc
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise UsageError(f"the tokenizer of {name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5.x
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tokenizer


def save_causal_lm(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike) -> None:
    """save_pretrained (safetensors) of the model and its tokenizer; call on the main process only."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
