"""LLM unlearning benchmarks: TOFU and MUSE metrics on local copies of their published files.

TOFU (Maini et al., 2024), per split (forget, retain, real_authors, world_facts):
  prob         forget / retain: mean of P(answer | question)^(1/|answer|);
               real authors / world facts: P(answer)^(1/|a|) / (that + sum over perturbed answers of the same)
  rouge        mean ROUGE-L recall of the greedy answer against the answer (rouge-score, stemmed)
  truth ratio  R = mean_k P(perturbed_k)^(1/|p_k|) / P(paraphrased)^(1/|para|) per question (real authors /
               world facts: the answer in place of the paraphrase); reported as mean(min(R, 1/R)) on the forget
               set and mean(max(0, 1 - R)) elsewhere
  forget_quality  p-value of the two-sample KS test of the forget set's R against a retain model's R
  model_utility   harmonic mean of the 9 numbers prob / rouge / truth ratio of retain, real authors, world facts
perturbed_mean="geometric" averages the per-token log-probs of the perturbed answers instead
(exp(mean_k log P(p_k)^(1/|p_k|))), as open-unlearning's and TOFU's code do.

MUSE (Shi et al., 2024):
  verbmem   mean ROUGE-L F1 of the greedy continuation of each forget prefix against the true continuation
  knowmem   mean ROUGE-L F1 of the greedy answer to "Question: q\\nAnswer:" (forget QA and retain QA)
  privleak  Min-K% Prob membership attack, score = -(mean of the lowest k fraction of the text's token log-probs,
            the first token and the EOS left out);
            AUC = roc_auc_score(forget = 1, holdout = 0) of that score (MUSE's convention: a model that still
            knows the forget texts has AUC near 0, the retain model about 0.5);
            PrivLeak = (AUC - AUC_retain) / AUC_retain * 100 (negative: the forget set still leaks)

Files (a folder; .json as a JSON list, {"data": [...]} or JSON lines, or .jsonl):
  TOFU  {forget_split}_perturbed, retain_perturbed, real_authors_perturbed, world_facts_perturbed with the
        fields question, answer, paraphrased_answer (forget / retain), perturbed_answer (a list of strings)
  MUSE  verbmem/forget (prompt, gt), knowmem/forget_qa and knowmem/retain_qa (question, answer),
        privleak/forget and privleak/holdout (text); flat names verbmem_forget, ... are accepted too
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from salun_ext.lm.data import IGNORE_INDEX, Encoded, TextExample, collate, encode
from salun_ext.lm.evaluate import _autocast, left_padded
from salun_ext.utils.errors import MissingFileError, UsageError

TOFU_SPLITS = ("forget", "retain", "real_authors", "world_facts")
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
MUSE_FILES = {
    "verbmem": ("verbmem/forget", ("prompt", "gt")),
    "knowmem_forget": ("knowmem/forget_qa", ("question", "answer")),
    "knowmem_retain": ("knowmem/retain_qa", ("question", "answer")),
    "privleak_forget": ("privleak/forget", ("text",)),
    "privleak_holdout": ("privleak/holdout", ("text",)),
}
KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")


# ------------------------------------------------------------------------------------------------ the metrics


def truth_ratios(paraphrased: torch.Tensor, perturbed: torch.Tensor, *, mean: str = "arithmetic") -> torch.Tensor:
    """R per question [N] from length-normalised probs: paraphrased [N], perturbed [N, K]."""
    paraphrased, perturbed = paraphrased.double(), perturbed.double()
    if mean == "arithmetic":
        wrong = perturbed.mean(dim=1)
    elif mean == "geometric":
        wrong = perturbed.log().mean(dim=1).exp()
    else:
        raise UsageError(f"perturbed_mean must be 'arithmetic' or 'geometric', got {mean!r}")
    return wrong / paraphrased


def truth_ratio_forget_stat(ratios: Sequence[float] | torch.Tensor) -> float:
    """TOFU's forget-set statistic: mean of min(R, 1/R) (1 = the true and false answers are equally likely)."""
    r = torch.as_tensor(ratios, dtype=torch.float64)
    return float(torch.minimum(r, 1 / r).mean())


def truth_ratio_utility_stat(ratios: Sequence[float] | torch.Tensor) -> float:
    """TOFU's statistic elsewhere: mean of max(0, 1 - R) (1 = the true answer far more likely than the false)."""
    r = torch.as_tensor(ratios, dtype=torch.float64)
    return float((1 - r).clamp_min(0).mean())


def prob_with_options(correct: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """Real authors / world facts: correct / (correct + sum of the perturbed), length-normalised probs [N]."""
    return correct.double() / (correct.double() + perturbed.double().sum(dim=1))


def forget_quality(forget_ratios: Sequence[float], retain_ratios: Sequence[float]) -> float:
    """p-value of the two-sample KS test of the unlearned and retain models' forget-set truth ratios."""
    from scipy.stats import ks_2samp

    if len(forget_ratios) == 0 or len(retain_ratios) == 0:
        raise UsageError("forget quality needs truth ratios of both models (one of them is empty)")
    return float(ks_2samp(list(forget_ratios), list(retain_ratios)).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean (0 when any value is 0)."""
    values = [float(v) for v in values]
    if any(v < 0 or math.isnan(v) for v in values):
        raise UsageError(f"model utility: values must be >= 0, got {values}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def rouge_l(predictions: Sequence[str], references: Sequence[str], kind: str = "recall") -> list[float]:
    """ROUGE-L (rouge-score, Porter stemming) of each prediction against its reference: 'recall' or 'f1'."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    field = {"recall": "recall", "f1": "fmeasure"}[kind]
    return [getattr(scorer.score(ref, pred)["rougeL"], field) for pred, ref in zip(predictions, references)]


def min_k_score(token_logps: torch.Tensor, k: float) -> float:
    """Min-K% Prob: -(mean of the lowest max(1, int(k * n)) token log-probs) (higher = less member-like)."""
    if token_logps.numel() == 0:
        return 0.0
    count = max(1, int(token_logps.numel() * k))
    return -float(token_logps.double().sort().values[:count].mean())


def mia_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """AUC of the attack score with forget = 1, holdout = 0 (MUSE's convention: ~0 = the forget set leaks)."""
    from sklearn.metrics import roc_auc_score

    if not forget_scores or not holdout_scores:
        raise UsageError("privleak needs forget and holdout texts")
    labels = [1] * len(forget_scores) + [0] * len(holdout_scores)
    return float(roc_auc_score(labels, [*forget_scores, *holdout_scores]))


def privleak(auc: float, retain_auc: float) -> float:
    """MUSE's PrivLeak in percent: (AUC_unlearned - AUC_retain) / AUC_retain * 100."""
    if not retain_auc > 0:
        raise UsageError(f"privleak: the retain model's AUC must be positive, got {retain_auc}")
    return (auc - retain_auc) / retain_auc * 100.0


# ------------------------------------------------------------------------------------------------ the files


def read_records(path: str) -> list[dict]:
    """A JSON list / {"data": [...]} / JSON lines file of objects (.json may hold JSON lines, as TOFU's do)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"benchmark file not found: {path}")
    with open(path, encoding="utf-8") as f:
        content = f.read()
    data: Any = None
    if not path.endswith(".jsonl"):
        try:
            data = json.loads(content)
        except json.JSONDecodeError:
            data = None
    if data is None:
        data = []
        for line_no, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict):  # {"data": [...]}, or JSON lines of one record
        data = data["data"] if isinstance(data.get("data"), list) else [data]
    if not isinstance(data, list) or not data:
        raise UsageError(f"{path}: expected a non-empty list of records")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise UsageError(f"{path}: record {i + 1}: expected a JSON object, got {type(record).__name__}")
    return data


def _field(record: dict, key: str, path: str, i: int, *, is_list: bool = False) -> Any:
    where = f"{path}: record {i + 1}"
    if key not in record:
        raise UsageError(f"{where}: missing field '{key}' (found {sorted(record)})")
    value = record[key]
    if is_list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise UsageError(f"{where}: '{key}' must be a non-empty list of strings")
        return value
    if not isinstance(value, str):
        raise UsageError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _find(folder: str, stem: str, *, required: bool = True) -> str | None:
    candidates = [stem, stem.replace("/", "_")]
    for name in candidates:
        for ext in (".json", ".jsonl"):
            path = os.path.join(folder, name + ext)
            if os.path.isfile(path):
                return path
    if required:
        raise MissingFileError(f"{folder}: no {' or '.join(c + '.json(l)' for c in candidates)}")
    return None


@dataclasses.dataclass(frozen=True)
class TofuItem:
    question: str
    answer: str
    perturbed: tuple[str, ...]
    paraphrased: str | None = None  # forget / retain; real authors / world facts compare the answer itself


def load_tofu_split(path: str, *, paraphrased: bool) -> list[TofuItem]:
    items = []
    for i, r in enumerate(read_records(path)):
        items.append(
            TofuItem(
                question=_field(r, "question", path, i),
                answer=_field(r, "answer", path, i),
                perturbed=tuple(_field(r, "perturbed_answer", path, i, is_list=True)),
                paraphrased=_field(r, "paraphrased_answer", path, i) if paraphrased else None,
            )
        )
    return items


def load_tofu(folder: str, *, forget_split: str = "forget10") -> dict[str, list[TofuItem]]:
    """The TOFU splits found in `folder` ({forget_split}_perturbed is required, the utility splits optional)."""
    if not os.path.isdir(folder):
        raise MissingFileError(f"--data: TOFU folder not found: {folder}")
    data = {"forget": load_tofu_split(_find(folder, f"{forget_split}_perturbed"), paraphrased=True)}
    for split in UTILITY_SPLITS:
        path = _find(folder, f"{split}_perturbed", required=False)
        if path:
            data[split] = load_tofu_split(path, paraphrased=split == "retain")
    return data


def load_muse(folder: str) -> dict[str, list[tuple[str, ...]]]:
    """MUSE's verbmem / knowmem / privleak files found in `folder` (each part optional, at least one)."""
    if not os.path.isdir(folder):
        raise MissingFileError(f"--data: MUSE folder not found: {folder}")
    data = {}
    for part, (stem, keys) in MUSE_FILES.items():
        path = _find(folder, stem, required=False)
        if path:
            data[part] = [tuple(_field(r, k, path, i) for k in keys) for i, r in enumerate(read_records(path))]
    if not data:
        stems = ", ".join(stem for stem, _ in MUSE_FILES.values())
        raise MissingFileError(f"{folder}: none of the MUSE files ({stems}; .json or .jsonl)")
    if ("privleak_forget" in data) != ("privleak_holdout" in data):
        raise UsageError(f"{folder}: privleak needs both privleak/forget and privleak/holdout")
    return data


def _read_results_json(path: str) -> Any:
    """A retain model's results file (JSON), or one UsageError line naming it."""
    if not os.path.isfile(path):
        raise MissingFileError(f"retain results not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc.msg})") from None


def load_retain_truth_ratios(path: str) -> list[float]:
    """A retain model's forget-set truth ratios from JSON: this module's results (forget.truth_ratios),
    open-unlearning's TOFU_EVAL.json (forget_truth_ratio.value_by_index.*.score) or a plain list of numbers."""
    data = _read_results_json(path)
    values: Any = None
    if isinstance(data, list):
        values = data
    elif isinstance(data, dict):
        if isinstance(data.get("forget"), dict) and "truth_ratios" in data["forget"]:
            values = data["forget"]["truth_ratios"]
        for key in ("forget_truth_ratio", "forget_Truth_Ratio"):
            if values is None and isinstance(data.get(key), dict) and "value_by_index" in data[key]:
                values = [v["score"] if isinstance(v, dict) else v for v in data[key]["value_by_index"].values()]
    if values is None:
        raise UsageError(
            f"{path}: no truth ratios (expected forget.truth_ratios, forget_truth_ratio.value_by_index or a list)"
        )
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UsageError(f"{path}: the truth ratios must be a non-empty list of numbers")
    return [float(v) for v in values]


def load_retain_auc(path: str) -> float:
    """A retain model's MUSE Min-K% AUC from JSON: this module's results (privleak.auc), open-unlearning's
    MUSE_EVAL.json (mia_min_k.agg_value, the opposite convention: 1 - it) or a number."""
    data = _read_results_json(path)
    value: Any = None
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        value = data
    elif isinstance(data, dict):
        if isinstance(data.get("privleak"), dict):
            value = data["privleak"].get("auc")
        elif isinstance(data.get("mia_min_k"), dict) and "agg_value" in data["mia_min_k"]:
            value = 1.0 - float(data["mia_min_k"]["agg_value"])
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise UsageError(f"{path}: no retain AUC (expected privleak.auc, mia_min_k.agg_value or a number)")
    return float(value)


# ------------------------------------------------------------------------------------------------ model scoring


@torch.no_grad()
def token_logprobs(
    model: torch.nn.Module, examples: Sequence[Encoded], *, batch_size: int, pad_id: int, amp: str = "none"
) -> list[torch.Tensor]:
    """log p of every target token of every example (eval mode, no grad), one 1-D tensor each."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
            with _autocast(device, amp):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            for row in range(labels.shape[0]):
                out.append(picked[row][labels[row] != IGNORE_INDEX].cpu())
    finally:
        model.train(was_training)
    return out


def normalized_probs(model, tokenizer, pairs: Sequence[TextExample], *, batch_size, max_length, amp) -> torch.Tensor:
    """P(answer | prompt)^(1/|answer|) of every pair [N] (float64)."""
    encoded = encode(pairs, tokenizer, max_length)
    logps = token_logprobs(model, encoded, batch_size=batch_size, pad_id=tokenizer.pad_token_id, amp=amp)
    return torch.stack([t.double().mean().exp() for t in logps])


@torch.no_grad()
def greedy_generate(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int, max_length: int, amp: str
) -> list[str]:
    """The greedy continuation of each prompt (left-padded batches; cut at EOS), decoded."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    out: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            texts = prompts[start : start + batch_size]
            chunk = [tokenizer(p, add_special_tokens=True)["input_ids"][-max_length:] for p in texts]
            ids, attention = left_padded(chunk, tokenizer.pad_token_id)
            with _autocast(device, amp):
                generated = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )[:, ids.shape[1] :].cpu()
            for row in generated.tolist():
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return out


@dataclasses.dataclass
class BenchmarkOptions:
    batch_size: int = 8
    max_length: int = 512
    amp: str = "none"
    max_new_tokens: int = 200  # TOFU answers (MUSE: verbmem_tokens / knowmem_tokens)
    perturbed_mean: str = "arithmetic"  # TOFU truth ratio: "arithmetic" (the paper) or "geometric" (the code)
    verbmem_tokens: int = 128
    knowmem_tokens: int = 32
    min_k: float = 0.4
    question_template: str = "{question}"  # TOFU: how a question becomes the prompt (e.g. a chat format)

    def prompt(self, question: str) -> str:
        return self.question_template.replace("{question}", question)


def tofu_truth_ratios(model, tokenizer, items: Sequence[TofuItem], opts: BenchmarkOptions) -> dict[str, Any]:
    """The probabilities and truth ratios of one TOFU split (no generation)."""
    kw = {"batch_size": opts.batch_size, "max_length": opts.max_length, "amp": opts.amp}
    q = opts.prompt
    correct = normalized_probs(model, tokenizer, [TextExample(it.answer, q(it.question)) for it in items], **kw)
    para = (
        normalized_probs(model, tokenizer, [TextExample(it.paraphrased, q(it.question)) for it in items], **kw)
        if items[0].paraphrased is not None
        else correct
    )
    flat = [TextExample(p, q(it.question)) for it in items for p in it.perturbed]
    flat_probs = normalized_probs(model, tokenizer, flat, **kw)
    rows = flat_probs.split([len(it.perturbed) for it in items])  # each question's own perturbed answers
    ratios = torch.stack(
        [truth_ratios(para[i : i + 1], row.unsqueeze(0), mean=opts.perturbed_mean)[0] for i, row in enumerate(rows)]
    )
    perturbed_sum = torch.stack([row.sum() for row in rows])
    return {"correct": correct, "ratios": ratios, "perturbed_sum": perturbed_sum}


def evaluate_tofu(
    model,
    tokenizer,
    data: dict[str, list[TofuItem]],
    *,
    retain_truth_ratios: Sequence[float] | None = None,
    options: BenchmarkOptions | None = None,
) -> dict[str, Any]:
    """TOFU's metrics on every split of `data` (see the module docstring)."""
    opts = options or BenchmarkOptions()
    result: dict[str, Any] = {"benchmark": "tofu", "perturbed_mean": opts.perturbed_mean}
    for split in TOFU_SPLITS:
        if split not in data:
            continue
        items = data[split]
        scored = tofu_truth_ratios(model, tokenizer, items, opts)
        correct, ratios = scored["correct"], scored["ratios"]
        if split in ("real_authors", "world_facts"):
            prob = float((correct / (correct + scored["perturbed_sum"])).mean())
        else:
            prob = float(correct.mean())
        answers = greedy_generate(
            model,
            tokenizer,
            [opts.prompt(it.question) for it in items],
            max_new_tokens=opts.max_new_tokens,
            batch_size=opts.batch_size,
            max_length=opts.max_length,
            amp=opts.amp,
        )
        rouge = rouge_l(answers, [it.answer for it in items], "recall")
        stat = truth_ratio_forget_stat(ratios) if split == "forget" else truth_ratio_utility_stat(ratios)
        result[split] = {
            "examples": len(items),
            "prob": prob,
            "rouge_l_recall": sum(rouge) / len(rouge),
            "truth_ratio": stat,
            "truth_ratios": [float(r) for r in ratios],
            "samples": [
                {"question": it.question, "answer": it.answer, "generated": g} for it, g in zip(items, answers)
            ][:3],
        }
    result["forget_quality"] = (
        forget_quality(result["forget"]["truth_ratios"], retain_truth_ratios) if retain_truth_ratios else None
    )
    if all(s in result for s in UTILITY_SPLITS):
        values = [result[s][k] for s in UTILITY_SPLITS for k in ("prob", "rouge_l_recall", "truth_ratio")]
        result["model_utility"] = model_utility(values)
    else:
        result["model_utility"] = None  # needs retain, real_authors and world_facts
    return result


def evaluate_muse(
    model,
    tokenizer,
    data: dict[str, list[tuple[str, ...]]],
    *,
    retain_auc: float | None = None,
    options: BenchmarkOptions | None = None,
) -> dict[str, Any]:
    """MUSE's VerbMem, KnowMem and PrivLeak on the parts of `data` given (see the module docstring)."""
    opts = options or BenchmarkOptions()
    gen = {"batch_size": opts.batch_size, "max_length": opts.max_length, "amp": opts.amp}
    result: dict[str, Any] = {"benchmark": "muse"}
    if "verbmem" in data:
        prompts, truths = zip(*data["verbmem"])
        outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens=opts.verbmem_tokens, **gen)
        scores = rouge_l(outputs, truths, "f1")
        result["verbmem_forget"] = {"rouge_l_f1": sum(scores) / len(scores), "examples": len(scores)}
    for part in ("knowmem_forget", "knowmem_retain"):
        if part in data:
            questions, answers = zip(*data[part])
            outputs = greedy_generate(
                model,
                tokenizer,
                [f"Question: {q}\nAnswer:" for q in questions],
                max_new_tokens=opts.knowmem_tokens,
                **gen,
            )
            outputs = [_cut(o, KNOWMEM_STOPS) for o in outputs]
            scores = rouge_l(outputs, answers, "f1")
            result[part] = {"rouge_l_f1": sum(scores) / len(scores), "examples": len(scores)}
    if "privleak_forget" in data:
        scores = {}
        for part in ("privleak_forget", "privleak_holdout"):
            texts = [TextExample(t) for (t,) in data[part]]
            encoded = [_without_eos(e, tokenizer.eos_token_id) for e in encode(texts, tokenizer, opts.max_length)]
            logps = token_logprobs(
                model,
                encoded,
                batch_size=opts.batch_size,
                pad_id=tokenizer.pad_token_id,
                amp=opts.amp,
            )
            scores[part] = [min_k_score(t, opts.min_k) for t in logps]
        auc = mia_auc(scores["privleak_forget"], scores["privleak_holdout"])
        result["privleak"] = {
            "auc": auc,
            "retain_auc": retain_auc,
            "privleak": privleak(auc, retain_auc) if retain_auc is not None else None,
            "k": opts.min_k,
        }
    return result


def _without_eos(e: Encoded, eos: int | None) -> Encoded:
    """The text's own tokens: the attack scores the text, not the EOS that encode() appends."""
    if eos is not None and len(e.input_ids) > 2 and e.input_ids[-1] == eos:
        return Encoded(e.input_ids[:-1], e.prompt_len)
    return e


def _cut(text: str, stops: Sequence[str]) -> str:
    for stop in stops:
        if stop in text:
            text = text[: text.index(stop)]
    return text.strip()
