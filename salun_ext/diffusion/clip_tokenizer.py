"""The real CLIP BPE tokenizer of Stable Diffusion v1, built offline from open_clip's bundled vocabulary.

`write_clip_tokenizer(folder)` writes the vocab.json + merges.txt that `transformers.CLIPTokenizer` reads, so a
pipeline trained here (text_digits) and the tiny test pipelines tokenize exactly as SD v1 does.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

PathLike = str | os.PathLike

# open_clip's BPE file holds 48894 merges after its header line (the CLIP vocabulary: 256 bytes, 256 bytes + </w>,
# the merges, and the two special tokens = 49408 tokens).
_NUM_MERGES = 49152 - 256 - 2


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def open_clip_bpe_path() -> Path:
    """open_clip's bundled `bpe_simple_vocab_16e6.txt.gz` (raises with an install hint when missing)."""
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("building a CLIP tokenizer offline needs `pip install open_clip_torch`") from exc
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():  # pragma: no cover
        raise FileNotFoundError(f"open_clip's BPE vocabulary is missing: {path}")
    return path


def write_clip_tokenizer(folder: PathLike) -> Path:
    """Write vocab.json + merges.txt (+ tokenizer config) of the CLIP ViT-L/14 tokenizer used by SD v1 to `folder`.

    `transformers.CLIPTokenizer.from_pretrained(folder)` then gives the standard ids, e.g.
    "a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407].
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(open_clip_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    config = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
