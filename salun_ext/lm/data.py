"""Forget / retain text sets for language-model unlearning: files -> examples -> token ids -> padded batches.

Files:
  *.jsonl   one JSON object per line: {"text": ...} or a prompt/answer pair under any of the key pairs
            (prompt, completion), (question, answer), (prompt, response), (instruction, output)
  *.json    a list of such objects (or {"data": [...]})
  other     plain text: one example per non-empty line
A pair is trained on its answer only (prompt labels are -100), as TOFU / open-unlearning do; a plain text is
trained on every token.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import torch

from salun_ext.utils.errors import MissingFileError, UsageError

IGNORE_INDEX = -100
PAIR_KEYS = (("prompt", "completion"), ("question", "answer"), ("prompt", "response"), ("instruction", "output"))


@dataclasses.dataclass(frozen=True)
class TextExample:
    """One item of a text set: `prompt` is "" for plain text (every token is a target)."""

    answer: str
    prompt: str = ""


@dataclasses.dataclass
class Encoded:
    """Token ids of one example; the first `prompt_len` tokens are context, the rest are targets."""

    input_ids: list[int]
    prompt_len: int

    @property
    def target_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def load_texts(path: str | os.PathLike) -> list[TextExample]:
    """Read a forget/retain set (see the module docstring for the formats)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"text set not found: {path}")
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if path.endswith(".jsonl"):
        records = []
        for line_no, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        examples = [_record(r, f"{path}: record {i + 1}") for i, r in enumerate(records)]
    elif path.endswith(".json"):
        try:
            data = json.loads(content)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise UsageError(
                f"{path}: expected a JSON list of records (or {{'data': [...]}}), got {type(data).__name__}"
            )
        examples = [_record(r, f"{path}: record {i + 1}") for i, r in enumerate(data)]
    else:
        examples = [TextExample(answer=line.strip()) for line in content.splitlines() if line.strip()]
    if not examples:
        raise UsageError(f"{path}: the text set is empty")
    return examples


def _record(record: object, where: str) -> TextExample:
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "text" in record:
        return TextExample(answer=_string(record["text"], where, "text"))
    for prompt_key, answer_key in PAIR_KEYS:
        if prompt_key in record and answer_key in record:
            return TextExample(
                answer=_string(record[answer_key], where, answer_key),
                prompt=_string(record[prompt_key], where, prompt_key),
            )
    pairs = ", ".join(f"({a}, {b})" for a, b in PAIR_KEYS)
    raise UsageError(f"{where}: needs a 'text' key or one of the key pairs {pairs}; found keys {sorted(record)}")


def _string(value: object, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def encode(examples: Sequence[TextExample], tokenizer, max_length: int) -> list[Encoded]:
    """Tokenize: prompt (with the tokenizer's special tokens) + answer + EOS, truncated to max_length tokens."""
    if max_length < 2:
        raise UsageError(f"max_length must be at least 2, got {max_length}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for ex in examples:
        if ex.prompt:
            prompt_ids = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
            answer_ids = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + eos
        else:
            prompt_ids = []
            answer_ids = tokenizer(ex.answer, add_special_tokens=True)["input_ids"] + eos
        ids = (prompt_ids + answer_ids)[:max_length]
        prompt_len = min(len(prompt_ids), len(ids))
        if len(ids) - prompt_len == 0:
            raise UsageError(
                f"an example has no target token within max_length={max_length} (prompt of {len(prompt_ids)} "
                f"tokens): raise max_length or shorten the prompt: {ex.prompt[:60]!r}"
            )
        out.append(Encoded(ids, prompt_len))
    return out


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE_INDEX on the prompt and the padding)."""
    longest = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(items), longest), dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, e.prompt_len : n] = ids[row, e.prompt_len : n]
        attention[row, :n] = 1
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


IDK_ANSWERS = (
    "I don't know.",
    "I'm not sure.",
    "I have no information about that.",
    "I can't answer that.",
    "That is not something I know about.",
    "I'm afraid I don't have an answer to that.",
)


def relabel(
    forget: Sequence[Encoded],
    replacements: Sequence[list[int]],
    *,
    seed: int,
    max_length: int,
) -> list[Encoded]:
    """Forget examples with their targets replaced by a randomly drawn replacement answer (token ids).

    IDK relabelling draws from "I don't know"-style answers, random-label relabelling from the retain set's
    answers. A plain text (no prompt) keeps its first half as the prompt.
    """
    if not replacements:
        raise UsageError("relabel: no replacement answers")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for e in forget:
        prompt_len = e.prompt_len if e.prompt_len > 0 else max(1, len(e.input_ids) // 2)
        choice = list(replacements[int(torch.randint(len(replacements), (1,), generator=gen))])
        prompt = e.input_ids[:prompt_len][: max_length - 1]  # keep room for at least one target token
        out.append(Encoded((prompt + choice)[:max_length], len(prompt)))
    return out


def answer_ids(examples: Sequence[Encoded]) -> list[list[int]]:
    """The target tokens of each example (the random-label pool)."""
    return [e.input_ids[e.prompt_len :] for e in examples]
