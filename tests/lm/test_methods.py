"""SimNPO, GradDiff with a KL retain term, RMU: their losses by hand, short SalUn-masked runs on the tiny Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from salun_ext.lm import (
    LMUnlearnConfig,
    LMUnlearnTask,
    TextExample,
    encode,
    kl_to_reference,
    load_causal_lm,
    simnpo_loss,
    text_loss,
    unlearn_lm,
)
from salun_ext.lm.data import collate
from salun_ext.train import RunOptions
from tests.lm_fixtures import FORGET, RETAIN


def _sets(tokenizer):
    forget = encode([TextExample(r["answer"], r["question"]) for r in FORGET], tokenizer, 64)
    retain = encode([TextExample(t) for t in RETAIN], tokenizer, 64)
    return forget, retain


def test_simnpo_loss_by_hand():
    # log pi = -6 over 3 tokens and -2 over 2 tokens: per token -2 and -1; beta 2.5, margin 0:
    # -(2/2.5) * mean(log sigmoid(5), log sigmoid(2.5)), log sigmoid(x) = -log(1 + e^-x)
    logps, counts = torch.tensor([-6.0, -2.0]), torch.tensor([3, 2])
    expected = 0.8 * (math.log1p(math.exp(-5.0)) + math.log1p(math.exp(-2.5))) / 2
    assert float(simnpo_loss(logps, counts, 2.5)) == pytest.approx(expected, rel=1e-6)
    # margin 1: log sigmoid(5 - 1) and log sigmoid(2.5 - 1)
    expected = 0.8 * (math.log1p(math.exp(-4.0)) + math.log1p(math.exp(-1.5))) / 2
    assert float(simnpo_loss(logps, counts, 2.5, margin=1.0)) == pytest.approx(expected, rel=1e-6)
    assert LMUnlearnConfig(method="simnpo").beta == 2.5 and LMUnlearnConfig(method="npo").beta == 0.1


def test_kl_to_reference_by_hand():
    # p_ref = (1/2, 1/2), p_theta = (1/4, 3/4): 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3)
    ref = torch.tensor([[0.5, 0.5]]).log()
    theta = torch.tensor([[0.25, 0.75]]).log()
    assert float(kl_to_reference(ref, theta)) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert float(kl_to_reference(ref, ref)) == pytest.approx(0.0, abs=1e-7)


def test_kl_retain_term_cache_and_copy_agree(lm_dir):
    model, tokenizer = load_causal_lm(str(lm_dir), dtype="fp32")
    forget, retain = _sets(tokenizer)
    pad = tokenizer.pad_token_id
    kw = {"method": "graddiff", "batch_size": 2, "pad_id": pad, "forget_weight": 0.0, "retain_loss": "kl"}
    cached = LMUnlearnTask(forget, retain, kl_reference="cache", **kw)
    copied = LMUnlearnTask(forget, retain, kl_reference="copy", **kw)
    cached.prepare(model)
    copied.prepare(model)
    assert [t.shape[0] for t in cached.retain_reference] == [e.target_len - 1 for e in retain]  # plain texts
    batch = next(iter(cached.batches(0)))
    with torch.no_grad():
        assert float(cached.loss(model, batch)) == pytest.approx(0.0, abs=1e-6)  # theta = ref at the start
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        moved_cache, moved_copy = float(cached.loss(model, batch)), float(copied.loss(model, batch))
    assert moved_cache > 1e-3 and moved_cache == pytest.approx(moved_copy, rel=1e-5)


def test_rmu_loss_by_hand(lm_dir):
    model, tokenizer = load_causal_lm(str(lm_dir), dtype="fp32")
    forget, retain = _sets(tokenizer)
    task = LMUnlearnTask(
        forget, retain, method="rmu", batch_size=2, pad_id=tokenizer.pad_token_id, rmu_layer=0, rmu_coeff=3.0, seed=5
    )
    task.prepare(model)
    u = torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(task.rmu_target, 3.0 * u / u.norm()) and float(task.rmu_target.norm()) == pytest.approx(3.0)
    batch = next(iter(task.batches(0)))
    n = batch["index"].numel()
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        h = hidden.hidden_states[1]  # the output of decoder layer 0
        targets = batch["labels"] != -100
        forget_mse = ((h[:n][targets[:n]] - task.rmu_target) ** 2).mean()
        loss = task.loss(model, batch)  # the retain activations equal the cached original ones: retain term 0
    assert float(loss) == pytest.approx(float(forget_mse), rel=1e-5)
    names = [n for n, _ in task.impl.trainable(model, task)]
    assert names == ["model.layers.0.mlp.down_proj.weight"]


def _forget_nll(model, tokenizer, forget):
    return text_loss(model, forget, batch_size=4, pad_id=tokenizer.pad_token_id)["loss"]


@pytest.mark.parametrize(
    ("method", "extra"), [("simnpo", {}), ("graddiff", {"retain_loss": "kl"}), ("graddiff", {"kl_reference": "copy"})]
)
def test_simnpo_and_graddiff_kl_unlearn_under_a_mask(memorized, method, extra):
    folder, forget, retain = memorized
    model, tokenizer = load_causal_lm(str(folder), dtype="fp32")
    encoded = encode(forget, tokenizer, 64)
    before = _forget_nll(model, tokenizer, encoded)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    extra = {"retain_loss": "kl", **extra}
    config = LMUnlearnConfig(method=method, mask_ratio=0.5, lr=5e-3, epochs=3, batch_size=2, **extra)
    result = unlearn_lm(model, tokenizer, forget, retain, config, RunOptions(progress=False))
    assert _forget_nll(model, tokenizer, encoded) > before + 0.5  # the forget answers became less likely
    for name, p in model.named_parameters():
        frozen = ~result.mask.dense(name)
        assert torch.equal(p.detach()[frozen], initial[name][frozen]), f"{name}: a non-salient weight moved"


def test_rmu_steers_its_layer_and_trains_only_it_under_a_method_mask(memorized):
    folder, forget, retain = memorized
    model, tokenizer = load_causal_lm(str(folder), dtype="fp32")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = LMUnlearnConfig(
        method="rmu", rmu_layer=0, rmu_coeff=4.0, mask_ratio=0.05, saliency_loss="method", lr=1e-2, epochs=4,
        batch_size=2,
    )  # fmt: skip
    encoded, retain_ids = _sets(tokenizer)
    pad = tokenizer.pad_token_id
    probe = LMUnlearnTask(encoded, retain_ids, method="rmu", batch_size=4, pad_id=pad, rmu_layer=0, rmu_coeff=4.0)
    probe.prepare(model)  # the same u as the run's (seed 0)
    forget_batch = collate(encoded, tokenizer.pad_token_id)
    index = torch.arange(len(encoded))
    with torch.no_grad():
        before = float(probe.impl.forget_term(model, forget_batch, index, probe))
    result = unlearn_lm(model, tokenizer, forget, retain, config, RunOptions(progress=False))
    with torch.no_grad():
        after = float(probe.impl.forget_term(model, forget_batch, index, probe))
    assert after < before  # layer-0 forget activations moved towards c * u
    mask = result.mask
    # the RMU loss of layer 0 does not depend on layer 1 or the head: their gradients are 0, never salient
    assert not mask.dense("lm_head.weight").any() and not mask.dense("model.layers.1.mlp.down_proj.weight").any()
    trained = "model.layers.0.mlp.down_proj.weight"
    for name, p in model.named_parameters():
        if name != trained:
            assert torch.equal(p.detach(), initial[name]), f"{name} moved but RMU trains {trained} only"
    frozen = ~mask.dense(trained)
    assert torch.equal(model.get_parameter(trained).detach()[frozen], initial[trained][frozen])
    assert not torch.equal(model.get_parameter(trained).detach(), initial[trained])


def test_cli_new_method_flags(lm_dir, text_files, tmp_path):
    from salun_ext.cli import main

    forget, retain = text_files
    out = tmp_path / "rmu"
    argv = ["lm", "unlearn", "--model", str(lm_dir), "--forget", str(forget), "--retain", str(retain)]
    argv += ["--dtype", "fp32", "--out", str(out), "--method", "rmu", "--rmu-layer", "0", "--rmu-coeff", "2"]
    argv += ["--saliency-loss", "method", "--max-steps", "1", "--eval", "none", "--no-progress", "--batch-size", "2"]
    assert main(argv) == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert (config["method"], config["rmu_layer"], config["rmu_coeff"], config["saliency_loss"]) == (
        "rmu",
        0,
        2.0,
        "method",
    )
    assert config["beta"] == 0.1  # the default of a method without its own
