"""Language-model unlearning on a tiny randomly initialised Llama with an offline BPE tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch

import salun_ext

transformers = pytest.importorskip("transformers")

from salun_ext.lm import (  # noqa: E402
    LMUnlearnConfig,
    LMUnlearnTask,
    TextExample,
    collate,
    encode,
    evaluate_lm,
    load_causal_lm,
    load_texts,
    npo_loss,
    unlearn_lm,
)
from salun_ext.lm.data import IGNORE_INDEX, relabel  # noqa: E402
from salun_ext.train import RunOptions  # noqa: E402
from salun_ext.utils.errors import UsageError  # noqa: E402
from tests.lm_fixtures import FORGET, RETAIN  # noqa: E402

# ------------------------------------------------------------------------------------------------------ data


def test_load_texts_formats_and_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"question": "Q?", "answer": "A."}\n\n{"text": "plain"}\n')
    assert load_texts(tmp_path / "a.jsonl") == [TextExample("A.", "Q?"), TextExample("plain")]
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"prompt": "p", "completion": "c"}]}))
    assert load_texts(tmp_path / "b.json") == [TextExample("c", "p")]
    (tmp_path / "c.txt").write_text("one\n\n two \n")
    assert load_texts(tmp_path / "c.txt") == [TextExample("one"), TextExample("two")]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_texts(tmp_path / "bad.jsonl")
    (tmp_path / "keys.jsonl").write_text('{"q": "x"}\n')
    with pytest.raises(ValueError, match=r"record 1: needs a 'text' key .* found keys \['q'\]"):
        load_texts(tmp_path / "keys.jsonl")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_texts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        load_texts(tmp_path / "missing.jsonl")


def test_encode_collate_and_relabel(lm_dir):
    _, tokenizer = load_causal_lm(str(lm_dir), dtype="fp32")
    pair, plain = encode([TextExample("Agent Ada's code", "Who?"), TextExample("The river flows")], tokenizer, 64)
    assert pair.prompt_len == len(tokenizer("Who?")["input_ids"]) and pair.input_ids[-1] == tokenizer.eos_token_id
    assert plain.prompt_len == 0
    batch = collate([pair, plain], tokenizer.pad_token_id)
    labels = batch["labels"]
    assert (labels[0, : pair.prompt_len] == IGNORE_INDEX).all()  # prompt is context only
    assert labels[0, pair.prompt_len : len(pair.input_ids)].tolist() == pair.input_ids[pair.prompt_len :]
    assert (labels[1, len(plain.input_ids) :] == IGNORE_INDEX).all() and batch["attention_mask"].sum() == (
        len(pair.input_ids) + len(plain.input_ids)
    )
    short = encode([TextExample("a b c d e f g h i j k l")], tokenizer, 4)[0]
    assert len(short.input_ids) == 4
    with pytest.raises(ValueError, match="no target token"):
        encode([TextExample("x", "a very long prompt " * 10)], tokenizer, 8)
    idk = relabel([pair, plain], [[7, 8]], seed=0, max_length=64)
    assert idk[0].input_ids == [*pair.input_ids[: pair.prompt_len], 7, 8] and idk[0].prompt_len == pair.prompt_len
    assert idk[1].prompt_len == len(plain.input_ids) // 2  # a plain text keeps its first half as the prompt


def test_npo_loss_formula():
    logp = torch.tensor([-3.0, -5.0])
    ref = torch.tensor([-3.0, -4.0])
    beta = 0.1
    expected = -(2 / beta) * torch.nn.functional.logsigmoid(-beta * (logp - ref)).mean()
    assert torch.allclose(npo_loss(logp, ref, beta), expected)
    assert math.isclose(float(npo_loss(ref, ref, beta)), (2 / beta) * math.log(2), rel_tol=1e-6)  # at pi = pi_ref


def test_task_batches_are_seeded_and_paired(lm_dir):
    _, tokenizer = load_causal_lm(str(lm_dir), dtype="fp32")
    forget = encode([TextExample(r["answer"], r["question"]) for r in FORGET], tokenizer, 64)
    retain = encode([TextExample(t) for t in RETAIN], tokenizer, 64)
    task = LMUnlearnTask(forget, retain, method="ga", batch_size=3, pad_id=tokenizer.pad_token_id, seed=4)
    first, again = list(task.batches(1)), list(task.batches(1))
    assert task.num_batches(1) == len(first) == 2
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    assert sorted(torch.cat([b["index"] for b in first]).tolist()) == [0, 1, 2, 3]
    assert first[0]["input_ids"].shape[0] == 2 * first[0]["index"].numel()  # forget rows + as many retain rows
    with pytest.raises(ValueError, match="reference_logps"):
        LMUnlearnTask(forget, retain, method="npo", batch_size=2, pad_id=0)
    names = "ga, npo, idk, random_label, simnpo, graddiff, rmu"
    with pytest.raises(ValueError, match=f"unknown LM method 'dpo'; available: {names}"):
        LMUnlearnTask(forget, retain, method="dpo", batch_size=2, pad_id=0)


# ------------------------------------------------------------------------------------------------ unlearning


def test_salun_ga_unlearns_memorized_text_and_freezes_non_salient_weights(memorized):
    folder, forget, retain = memorized
    model, tokenizer = load_causal_lm(str(folder), dtype="fp32")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = evaluate_lm(model, tokenizer, encode(forget, tokenizer, 64), encode(retain, tokenizer, 64))
    assert before["forget_verbatim"]["token_accuracy"] > 0.9  # the fixture really memorised the answers
    config = LMUnlearnConfig(method="ga", mask_ratio=0.5, lr=5e-3, epochs=4, batch_size=2, retain_weight=1.0)
    result = unlearn_lm(model, tokenizer, forget, retain, config, RunOptions(progress=False))
    after = evaluate_lm(model, tokenizer, encode(forget, tokenizer, 64), encode(retain, tokenizer, 64))
    assert after["forget"]["loss"] > before["forget"]["loss"] + 1.0
    assert after["forget_verbatim"]["token_accuracy"] < before["forget_verbatim"]["token_accuracy"] - 0.3
    mask = result.mask
    total = sum(p.numel() for p in model.parameters())
    assert mask.k == total // 2 and mask.count() == mask.k
    for name, p in model.named_parameters():
        frozen = ~mask.dense(name)
        assert torch.equal(p.detach()[frozen], initial[name][frozen]), f"{name}: a non-salient weight moved"
    assert result.fit.steps == 4 * 2


def test_compact_optimizer_state_gives_the_dense_run_bit_for_bit(lm_dir):
    """optimizer_state="compact" (AdamW moments of the salient entries only): same weights as the dense-state run;
    without a mask it is refused, naming the option."""
    forget = [TextExample(r["answer"], r["question"]) for r in FORGET]
    retain = [TextExample(t) for t in RETAIN]
    weights = {}
    for state in ("dense", "compact"):
        model, tokenizer = load_causal_lm(str(lm_dir), dtype="fp32")
        config = LMUnlearnConfig(method="npo", mask_ratio=0.1, lr=1e-2, max_steps=3, epochs=None, batch_size=2,
                                 optimizer_state=state)  # fmt: skip
        unlearn_lm(model, tokenizer, forget, retain, config, RunOptions(progress=False))
        weights[state] = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(torch.equal(weights["dense"][n], weights["compact"][n]) for n in weights["dense"])
    from salun_ext.train.engine import build_optimizer

    named = list(model.named_parameters())  # the run's optimizer really was the compact one
    recipe = LMUnlearnConfig(optimizer_state="compact").recipe()
    mask = salun_ext.saliency_masks({n: p.detach() for n, p in named}, 0.1)
    optimizer = build_optimizer(named, recipe.optimizer, mask)
    assert recipe.optimizer.state == "compact" and optimizer.state_layout == "compact"
    config = LMUnlearnConfig(method="npo", mask_ratio=None, optimizer_state="compact")
    with pytest.raises(UsageError, match=r"optimizer_state .*needs a mask"):
        unlearn_lm(model, tokenizer, forget, retain, config, RunOptions(progress=False))
    with pytest.raises(UsageError, match="optimizer_state must be one of dense, compact, got 'packed'"):
        LMUnlearnConfig(optimizer_state="packed")


@pytest.mark.parametrize("method", ["npo", "idk", "random_label"])
def test_methods_run_with_bf16_weights_and_checkpointing(lm_dir, method):
    model, tokenizer = load_causal_lm(str(lm_dir), dtype="bf16", gradient_checkpointing=True)
    assert next(model.parameters()).dtype == torch.bfloat16 and model.is_activation_checkpointing
    forget = [TextExample(r["answer"], r["question"]) for r in FORGET]
    retain = [TextExample(t) for t in RETAIN]
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = LMUnlearnConfig(method=method, mask_ratio=0.25, lr=1e-2, max_steps=2, epochs=None, batch_size=2)
    result = unlearn_lm(model, tokenizer, forget, retain, config, RunOptions(progress=False))
    assert result.fit.steps == 2 and all(math.isfinite(h["loss"]) for h in result.fit.history)
    moved = sum(int((p.detach() != initial[n]).sum()) for n, p in model.named_parameters())
    assert 0 < moved <= result.mask.k


def test_cli_optimizer_state_flag_reaches_the_config():
    from salun_ext.cli import parse_args
    from salun_ext.cli.lm import _config

    base = ["lm", "unlearn", "--model", "m", "--forget", "f.txt", "--out", "o"]
    assert _config(parse_args(base)).optimizer_state == "dense"
    assert _config(parse_args([*base, "--optimizer-state", "compact"])).optimizer_state == "compact"


def test_cli_unlearn_resume_and_evaluate(lm_dir, text_files, tmp_path, capsys):
    from salun_ext.cli import main

    forget, retain = text_files
    common = ["--model", str(lm_dir), "--forget", str(forget), "--retain", str(retain), "--dtype", "fp32"]
    out = tmp_path / "run"
    argv = ["lm", "unlearn", *common, "--out", str(out), "--method", "npo", "--batch-size", "2", "--no-progress"]
    argv += ["--checkpoint-every", "1", "--lr", "1e-3", "--epochs", "2"]
    # an interrupted run: 1 of the 4 steps, its checkpoint and mask stay behind
    assert main([*argv, "--max-steps", "1", "--eval", "none"]) == 0
    assert (out / "checkpoints" / "last.pt").exists() and (out / "mask.safetensors").exists()
    assert main([*argv, "--resume", "--eval", "both"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 4 and metrics["world_size"] == 1
    assert metrics["mask"]["k"] == sum(p.numel() for p in load_causal_lm(str(lm_dir))[0].parameters()) // 2
    assert {"before", "after"} <= set(metrics) and metrics["after"]["forget_verbatim"]["examples"] == len(FORGET)
    assert (out / "model" / "model.safetensors").exists()
    report = tmp_path / "eval.json"
    evaluate = ["lm", "evaluate", "--model", str(out / "model"), "--forget", str(forget), "--retain", str(retain)]
    assert main([*evaluate, "--out", str(report)]) == 0
    evaluated = json.loads(report.read_text())
    assert evaluated["forget"]["loss"] == pytest.approx(metrics["after"]["forget"]["loss"], rel=1e-5)
    assert "verbatim completion on forget" in capsys.readouterr().out
    capsys.readouterr()
    assert main([*argv, "--resume", "--mask-ratio", "0.3"]) == 2  # one line on stderr, no traceback
    assert "saved for mask ratio 0.5, but --mask-ratio is 0.3" in capsys.readouterr().err


def test_left_padded_puts_every_row_at_the_end():
    from salun_ext.lm.evaluate import left_padded

    ids, attention = left_padded([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long
