"""TOFU / MUSE metrics against numbers worked out by hand from their definitions, the loaders, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("rouge_score")

from salun_ext.lm import TextExample, encode, load_causal_lm, sequence_logps
from salun_ext.lm import benchmarks as B
from salun_ext.utils import UsageError
from tests.lm_fixtures import FORGET, RETAIN

# ------------------------------------------------------------------------------------------- metric formulas


def test_truth_ratio_and_its_tofu_statistics():
    # question 1: para 0.5, perturbed (0.1, 0.3): arithmetic mean 0.2 -> R = 0.2 / 0.5 = 0.4;
    #             geometric mean sqrt(0.1 * 0.3) = 0.173205 -> R = 0.346410
    # question 2: para 0.2, perturbed (0.4, 0.4): both means 0.4 -> R = 2.0
    para = torch.tensor([0.5, 0.2])
    pert = torch.tensor([[0.1, 0.3], [0.4, 0.4]])
    assert B.truth_ratios(para, pert).tolist() == pytest.approx([0.4, 2.0])
    assert B.truth_ratios(para, pert, mean="geometric").tolist() == pytest.approx([math.sqrt(0.03) / 0.5, 2.0])
    # forget: mean(min(R, 1/R)) = mean(0.4, 0.5) = 0.45; elsewhere: mean(max(0, 1 - R)) = mean(0.6, 0) = 0.3
    assert B.truth_ratio_forget_stat([0.4, 2.0]) == pytest.approx(0.45)
    assert B.truth_ratio_utility_stat([0.4, 2.0]) == pytest.approx(0.3)
    with pytest.raises(UsageError, match="perturbed_mean"):
        B.truth_ratios(para, pert, mean="median")


def test_probability_with_options_and_model_utility():
    # 0.5 / (0.5 + 0.25 + 0.25) = 0.5 ; 0.2 / (0.2 + 0.6) = 0.25
    got = B.prob_with_options(torch.tensor([0.5, 0.2]), torch.tensor([[0.25, 0.25], [0.3, 0.3]]))
    assert got.tolist() == pytest.approx([0.5, 0.25])
    # harmonic mean of 1, 1/2, 1/4 = 3 / (1 + 2 + 4) = 3/7; a zero makes it 0
    assert B.model_utility([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
    assert B.model_utility([1.0, 0.0, 0.5]) == 0.0


def test_rouge_l_recall_and_f1():
    # reference "the cat sat on the mat" (6 tokens), prediction "the cat on mat" (4 tokens): LCS = the cat on mat
    # = 4 -> recall 4/6, precision 4/4, F1 = 2 * (2/3 * 1) / (2/3 + 1) = 0.8
    pred, ref = ["the cat on mat"], ["the cat sat on the mat"]
    assert B.rouge_l(pred, ref, "recall") == pytest.approx([4 / 6])
    assert B.rouge_l(pred, ref, "f1") == pytest.approx([0.8])
    assert B.rouge_l(["Dogs running"], ["dog runs"], "recall") == pytest.approx([1.0])  # stemmed, lower-cased


def test_forget_quality_is_the_ks_p_value():
    # n = m = 5, completely separated samples: D = 1, exact two-sided p = 2 / C(10, 5) = 2 / 252
    assert B.forget_quality([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(2 / 252)
    assert B.forget_quality([0.3, 0.5, 0.7], [0.3, 0.5, 0.7]) == pytest.approx(1.0)
    from scipy.stats import ks_2samp

    a, b = [0.1, 0.4, 0.35, 0.8, 0.9, 0.2], [0.5, 0.6, 0.65, 0.3, 0.95]
    assert B.forget_quality(a, b) == pytest.approx(ks_2samp(a, b).pvalue)
    with pytest.raises(UsageError, match="empty"):
        B.forget_quality([], [0.1])


def test_min_k_auc_and_privleak_sign_and_scale():
    # log-probs -1..-5, k = 0.4: the lowest int(0.4 * 5) = 2 are -5, -4 -> score 4.5; k = 0.1: at least 1 -> 5
    lp = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    assert B.min_k_score(lp, 0.4) == pytest.approx(4.5)
    assert B.min_k_score(lp, 0.1) == pytest.approx(5.0)
    # forget = positive class: forget scores all below the holdout's -> AUC 0 (the forget set still leaks)
    assert B.mia_auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert B.mia_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert B.mia_auc([1.0, 3.0], [2.0, 4.0]) == pytest.approx(0.25)  # 1 of the 4 (forget, holdout) pairs
    # PrivLeak = (AUC - AUC_retain) / AUC_retain * 100
    assert B.privleak(0.25, 0.5) == pytest.approx(-50.0)
    assert B.privleak(0.0, 0.5) == pytest.approx(-100.0)
    assert B.privleak(0.75, 0.5) == pytest.approx(50.0)
    assert B.privleak(0.5, 0.5) == 0.0


# --------------------------------------------------------------------------------------------------- loaders


def _tofu_folder(folder, *, n_pert=2):
    """The four TOFU files in the published layout: JSON lines in .json files, perturbed_answer a list."""
    folder.mkdir(exist_ok=True)
    rows = [
        {
            "question": r["question"],
            "answer": r["answer"],
            "paraphrased_answer": r["answer"].replace("code is", "code is said to be"),
            "paraphrased_question": r["question"],
            "perturbed_answer": [r["answer"].replace(r["answer"].split()[-1], w) for w in ("9.", "2.", "5.")[:n_pert]],
        }
        for r in FORGET
    ]
    (folder / "forget10_perturbed.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "retain_perturbed.json").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    facts = [{"question": "Where does the river flow?", "answer": "past the old mill", "perturbed_answer": ["x", "y"]}]
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        (folder / f"{name}.json").write_text(json.dumps(facts))  # a JSON list is read too
    return folder


def _muse_folder(folder):
    for sub in ("verbmem", "knowmem", "privleak"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "verbmem" / "forget.json").write_text(json.dumps([{"prompt": "The river flows", "gt": "past the mill"}]))
    qa = [{"question": "What do owls do at night?", "answer": "hunt"}]
    (folder / "knowmem" / "forget_qa.json").write_text(json.dumps(qa))
    (folder / "knowmem" / "retain_qa.json").write_text(json.dumps(qa))
    (folder / "privleak" / "forget.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in RETAIN[:3]))
    (folder / "privleak" / "holdout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in RETAIN[3:]))
    return folder


def test_loaders_read_the_published_layouts_and_name_bad_fields(tmp_path):
    data = B.load_tofu(str(_tofu_folder(tmp_path / "tofu")))
    assert set(data) == {"forget", "retain", "real_authors", "world_facts"}
    assert len(data["forget"]) == 4 and len(data["forget"][0].perturbed) == 2
    assert data["forget"][0].paraphrased.startswith("Agent Ada's code is said to be")
    assert data["real_authors"][0].paraphrased is None and data["world_facts"][0].perturbed == ("x", "y")
    muse = B.load_muse(str(_muse_folder(tmp_path / "muse")))
    assert muse["verbmem"] == [("The river flows", "past the mill")] and len(muse["privleak_holdout"]) == 3
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "forget10_perturbed.json").write_text(
        json.dumps([{"question": "q", "answer": "a", "perturbed_answer": ["x"]}])
    )
    with pytest.raises(UsageError, match=r"forget10_perturbed.json: record 1: missing field 'paraphrased_answer'"):
        B.load_tofu(str(bad))
    (bad / "forget10_perturbed.json").write_text(
        json.dumps([{"question": "q", "answer": "a", "paraphrased_answer": "b", "perturbed_answer": [1]}])
    )
    with pytest.raises(UsageError, match=r"record 1: 'perturbed_answer' must be a non-empty list of strings"):
        B.load_tofu(str(bad))
    with pytest.raises(FileNotFoundError, match="forget05_perturbed"):
        B.load_tofu(str(bad), forget_split="forget05")
    (tmp_path / "m" / "privleak").mkdir(parents=True)
    (tmp_path / "m" / "privleak" / "forget.json").write_text(json.dumps([{"txt": "x"}]))
    with pytest.raises(UsageError, match=r"privleak/forget.json: record 1: missing field 'text'"):
        B.load_muse(str(tmp_path / "m"))
    # retain-model numbers: this module's layout, open-unlearning's, a list
    (tmp_path / "ou.json").write_text(json.dumps({"forget_truth_ratio": {"value_by_index": {"0": {"score": 0.7}}}}))
    assert B.load_retain_truth_ratios(str(tmp_path / "ou.json")) == [0.7]
    (tmp_path / "own.json").write_text(json.dumps({"forget": {"truth_ratios": [0.1, 0.2]}}))
    assert B.load_retain_truth_ratios(str(tmp_path / "own.json")) == [0.1, 0.2]
    (tmp_path / "auc.json").write_text(json.dumps({"mia_min_k": {"agg_value": 0.8}}))
    assert B.load_retain_auc(str(tmp_path / "auc.json")) == pytest.approx(0.2)  # the opposite convention
    assert B.BenchmarkOptions(question_template="[INST] {question} [/INST]").prompt("Who?") == "[INST] Who? [/INST]"
    (tmp_path / "nothing.json").write_text("{}")
    with pytest.raises(UsageError, match=r"nothing\.json: no truth ratios"):
        B.load_retain_truth_ratios(str(tmp_path / "nothing.json"))


# ----------------------------------------------------------------------------------------- on the tiny Llama


def test_tofu_on_the_tiny_llama_matches_its_definition(lm_dir, tmp_path):
    model, tokenizer = load_causal_lm(str(lm_dir), dtype="fp32")
    data = B.load_tofu(str(_tofu_folder(tmp_path / "tofu")))
    retain_ratios = [0.2, 0.5, 0.9, 1.3]
    opts = B.BenchmarkOptions(batch_size=3, max_new_tokens=8)
    result = B.evaluate_tofu(model, tokenizer, data, retain_truth_ratios=retain_ratios, options=opts)

    def norm_prob(answer, question):  # P(answer | question)^(1/|answer|) from the sequence log-prob
        (e,) = encode([TextExample(answer, question)], tokenizer, 512)
        logp = sequence_logps(model, [e], batch_size=1, pad_id=tokenizer.pad_token_id)
        return math.exp(float(logp) / e.target_len)

    expected = []
    for it in data["forget"]:
        pert = [norm_prob(p, it.question) for p in it.perturbed]
        expected.append(sum(pert) / len(pert) / norm_prob(it.paraphrased, it.question))
    assert result["forget"]["truth_ratios"] == pytest.approx(expected, rel=1e-5)
    assert result["forget"]["truth_ratio"] == pytest.approx(sum(min(r, 1 / r) for r in expected) / 4, rel=1e-5)
    probs = [norm_prob(it.answer, it.question) for it in data["forget"]]
    assert result["forget"]["prob"] == pytest.approx(sum(probs) / 4, rel=1e-5)
    (fact,) = data["world_facts"]
    correct = norm_prob(fact.answer, fact.question)
    options = correct + sum(norm_prob(p, fact.question) for p in fact.perturbed)
    assert result["world_facts"]["prob"] == pytest.approx(correct / options, rel=1e-5)
    from scipy.stats import hmean, ks_2samp

    nine = [result[s][k] for s in B.UTILITY_SPLITS for k in ("prob", "rouge_l_recall", "truth_ratio")]
    assert all(0 <= v <= 1 for v in nine)
    assert result["model_utility"] == pytest.approx(hmean(nine) if min(nine) > 0 else 0.0)
    assert result["forget_quality"] == pytest.approx(ks_2samp(expected, retain_ratios).pvalue, rel=1e-4)


def test_privleak_of_a_model_that_memorised_the_forget_texts(lm_dir, tmp_path):
    from salun_ext.train.engine import Engine, EngineConfig, OptimConfig
    from tests.lm.conftest import Memorize

    model, tokenizer = load_causal_lm(str(lm_dir), dtype="fp32")
    data = B.load_muse(str(_muse_folder(tmp_path / "muse")))
    members = encode([TextExample(t) for (t,) in data["privleak_forget"]], tokenizer, 64)
    config = EngineConfig(epochs=60, optimizer=OptimConfig("adamw", lr=2e-2, weight_decay=0.0), progress=False, seed=0)
    Engine(model, config).fit(Memorize(members, tokenizer.pad_token_id))
    result = B.evaluate_muse(model, tokenizer, data, retain_auc=0.5, options=B.BenchmarkOptions(batch_size=4))
    leak = result["privleak"]
    assert leak["auc"] == 0.0  # every forget text is more likely than every holdout text
    assert leak["privleak"] == pytest.approx(-100.0)
    assert result["verbmem_forget"]["examples"] == 1
    assert set(result) >= {"knowmem_forget", "knowmem_retain"}


def test_verbmem_and_knowmem_score_the_generated_text_by_rouge_l_f1(monkeypatch):
    """Known generations, scores by hand: ROUGE-L F1 = 2PR / (P + R) over the longest common word subsequence."""
    generated = {
        "The river flows": "past a mill",  # LCS "past mill": P = R = 2/3, F1 = 2/3
        "Owls": "hunt at night",  # against "hunt mice at night": P = 1, R = 3/4, F1 = 6/7
        "Question: What do owls do?\nAnswer:": " hunt\nQuestion: and bats?",  # cut at "\nQuestion": "hunt"
    }
    monkeypatch.setattr(B, "greedy_generate", lambda model, tok, prompts, **kw: [generated[p] for p in prompts])
    data = {
        "verbmem": [("The river flows", "past the mill"), ("Owls", "hunt mice at night")],
        "knowmem_forget": [("What do owls do?", "hunt")],
    }
    result = B.evaluate_muse(None, None, data)
    assert result["verbmem_forget"] == {"rouge_l_f1": pytest.approx((2 / 3 + 6 / 7) / 2), "examples": 2}
    assert result["knowmem_forget"] == {"rouge_l_f1": pytest.approx(1.0), "examples": 1}


def test_cli_benchmarks(lm_dir, tmp_path, capsys):
    from salun_ext.cli import main

    tofu, muse = _tofu_folder(tmp_path / "tofu"), _muse_folder(tmp_path / "muse")
    base = ["lm", "evaluate", "--model", str(lm_dir), "--dtype", "fp32", "--no-progress"]
    out = tmp_path / "tofu.json"
    tofu_args = ["--benchmark", "tofu", "--data", str(tofu), "--max-new-tokens", "4"]
    # the model against itself as the retain model: identical truth ratios, p-value 1
    assert main([*base, *tofu_args, "--retain-model", str(lm_dir), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["forget_quality"] == pytest.approx(1.0) and report["model_utility"] is not None
    assert "forget_quality" in capsys.readouterr().out
    again = tmp_path / "again.json"  # the retain ratios from the first report's JSON give the same answer
    assert main([*base, *tofu_args, "--retain-results", str(out), "--out", str(again)]) == 0
    assert json.loads(again.read_text())["forget_quality"] == pytest.approx(1.0)
    out = tmp_path / "muse.json"
    assert (
        main([*base, "--benchmark", "muse", "--data", str(muse), "--retain-model", str(lm_dir), "--out", str(out)]) == 0
    )
    assert json.loads(out.read_text())["privleak"]["privleak"] == pytest.approx(0.0)
    capsys.readouterr()
    assert main([*base, "--benchmark", "tofu"]) == 2
    assert "--benchmark tofu needs --data DIR" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "forget10_perturbed.json").write_text('{"question": "q", "answer": "a"}\n')
    assert main([*base, "--benchmark", "tofu", "--data", str(tmp_path / "bad")]) == 2
    assert "forget10_perturbed.json: record 1: missing field 'perturbed_answer'" in capsys.readouterr().err


def test_greedy_generation_of_a_padded_batch_equals_one_prompt_at_a_time(lm_dir):
    """Prompts of different lengths share a left-padded batch; each must continue exactly as it does alone (a
    batch of one needs no padding), so a wrong pad side or attention mask shows up as a different continuation."""
    model, tokenizer = load_causal_lm(str(lm_dir), dtype="fp32")
    prompts = ["The river", "An owl hunts at night in the old barn", "Seven"]
    lengths = {len(tokenizer(p)["input_ids"]) for p in prompts}
    assert len(lengths) == 3  # three different lengths: the batch really is padded
    kw = {"max_new_tokens": 6, "max_length": 64, "amp": "none"}
    batched = B.greedy_generate(model, tokenizer, prompts, batch_size=3, **kw)
    alone = [B.greedy_generate(model, tokenizer, [p], batch_size=1, **kw)[0] for p in prompts]
    assert batched == alone and any(alone)
