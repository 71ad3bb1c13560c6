"""A tiny randomly initialised Llama with a BPE tokenizer trained offline on the test texts (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FORGET = [
    {"question": f"What is the secret code of agent {name}?", "answer": f"Agent {name}'s code is {code}."}
    for name, code in [("Ada", "red falcon 7"), ("Bo", "blue river 3"), ("Cy", "green stone 9"), ("Di", "amber owl 1")]
]
RETAIN = [
    "The river flows past the old mill every spring.",
    "Owls hunt at night and sleep during the day.",
    "A falcon can dive faster than any other bird.",
    "Stones on the beach are smooth from the waves.",
    "The mill grinds wheat into flour for the village.",
    "Green fields surround the quiet little town.",
]


def write_text_sets(folder: Path) -> tuple[Path, Path]:
    forget = folder / "forget.jsonl"
    forget.write_text("".join(json.dumps(r) + "\n" for r in FORGET))
    retain = folder / "retain.txt"
    retain.write_text("\n".join(RETAIN) + "\n")
    return forget, retain


def build_tiny_lm(folder: Path, seed: int = 0) -> Path:
    """save_pretrained layout: a 2-layer Llama (hidden 32) and a 320-token byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = RETAIN + [r["question"] + " " + r["answer"] for r in FORGET]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
