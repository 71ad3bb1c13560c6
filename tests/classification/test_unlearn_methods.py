"""Every unlearning method end to end on tiny data, plus the pieces with exact reference values."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import salun_ext
from salun_ext.classification import (
    EXTRA_METHODS,
    METHODS,
    PAPER_METHODS,
    OriginalTrainConfig,
    RunOptions,
    UnlearnData,
    forget_saliency,
    get_method,
    method_key,
    random_other_labels,
    train_original_model,
)
from salun_ext.classification.evaluation import accuracy
from salun_ext.classification.methods.influence import per_sample_gradients, woodfisher_inverse_product
from salun_ext.classification.methods.random_label import _SoftThreshold
from salun_ext.data import Batches, ImageDataset
from salun_ext.models import build_model
from salun_ext.utils import UsageError

OPTIONS = RunOptions(device="cpu", seed=0, progress=False)


@pytest.fixture(scope="module")
def memorized():
    """4 prototype classes of 8x8 images; 24 training samples carry a wrong label (y + 1) and form the forget set.

    The original model memorises them (forget accuracy on the wrong labels ~96%); unlearning must lower it.
    """
    g = torch.Generator().manual_seed(0)
    classes, per_class = 4, 60
    prototypes = torch.rand(classes, 1, 8, 8, generator=g)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = (prototypes[labels] + 0.25 * torch.randn(len(labels), 1, 8, 8, generator=g)).clamp(0, 1)
    images = (images * 255).round().to(torch.uint8)
    perm = torch.randperm(len(labels), generator=g)
    forget_idx, retain_idx = perm[:24], perm[24:]
    noisy = labels.clone()
    noisy[forget_idx] = (labels[forget_idx] + 1) % classes
    dataset = ImageDataset(images, noisy, [str(c) for c in range(classes)], "toy")
    model = build_model("small_cnn", 1, classes, 8, width=16)
    train_original_model(model, dataset, OriginalTrainConfig(epochs=15, lr=0.05, batch_size=32), OPTIONS)
    forget, retain = dataset.subset(forget_idx), dataset.subset(retain_idx)
    return model, UnlearnData(forget, retain, batch_size=32)


# Hyperparameters strong enough to act on 216 + 24 samples in a few steps (the paper's defaults are for CIFAR).
TINY = {
    "retrain": dict(epochs=15, lr=0.05),
    "ft": dict(epochs=5, lr=0.1),
    "rl": dict(epochs=2),
    "ga": dict(epochs=3, lr=0.05),
    "iu": dict(alpha=5.0),
    "be": dict(epochs=3, lr=0.05),
    "bs": dict(epochs=3, lr=0.05),
    "l1_sparse": dict(epochs=5, lr=0.1, alpha=1e-3),
    "salun": dict(epochs=2),
    "salun_soft": dict(epochs=2),
    "scrub": dict(lr=0.05, epochs=4, max_steps=3),
    "neggrad_plus": dict(epochs=3, lr=0.1, alpha=0.8),
    "ssd": dict(),
}


def test_every_method_is_registered_and_has_a_tiny_setting():
    assert set(TINY) == set(METHODS)
    assert PAPER_METHODS == ["retrain", "ft", "rl", "ga", "iu", "be", "bs", "l1_sparse", "salun", "salun_soft"]
    assert EXTRA_METHODS == ["scrub", "neggrad_plus", "ssd"]


@pytest.mark.parametrize("name", list(TINY))
def test_method_lowers_forget_accuracy(memorized, name):
    original, data = memorized
    before = accuracy(original, data.forget)
    assert before > 90
    model = copy.deepcopy(original)
    result = get_method(name, **TINY[name]).run(model, data, OPTIONS)
    after, retain = accuracy(model, data.forget), accuracy(model, data.retain)
    # seeded and deterministic; observed: every method drops the forget accuracy by >= 16 points (FT, SCRUB:
    # 95.8 -> 79.2; most reach <= 50) and keeps retain accuracy >= 89 (SSD 89.8, IU 93.1, the rest >= 99).
    # A no-op fails the first bound, a wrecked model (chance is 25) the second.
    assert after <= before - 15, f"{name}: forget accuracy {before:.1f} -> {after:.1f}"
    assert retain >= 85, f"{name}: retain accuracy {retain:.1f}"
    assert result.seconds > 0 and result.model is model and not model.training
    out = model(torch.zeros(1, 1, 8, 8))
    assert out.shape == (1, 4)  # BE removed its shadow neuron again (its head: test_method_objectives.py)


def test_retrain_ignores_the_given_weights(memorized):
    original, data = memorized
    a, b = copy.deepcopy(original), build_model("small_cnn", 1, 4, 8, width=16)
    get_method("retrain", epochs=1).run(a, data, OPTIONS)
    get_method("retrain", epochs=1).run(b, data, OPTIONS)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_salun_strict_keeps_non_salient_weights_exactly(memorized):
    original, data = memorized
    model = copy.deepcopy(original)
    forget = Batches(data.forget.images, data.forget.labels, batch_size=32, shuffle=False)
    mask = forget_saliency(model, forget, 0.5)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = get_method("salun", epochs=1).run(model, data, OPTIONS, mask=mask)
    moved = 0
    for n, p in model.named_parameters():
        frozen = ~mask.dense(n)
        assert torch.equal(p.detach()[frozen], theta0[n][frozen])
        moved += int((p.detach() != theta0[n])[~frozen].sum())
    assert moved > 0 and result.info["mask_density"] == pytest.approx(0.5, abs=1e-4)
    # compat (the paper code's grad *= mask): weight decay and momentum still move non-salient weights
    compat = copy.deepcopy(original)
    get_method("salun", epochs=1, mask_mode="compat").run(compat, data, OPTIONS, mask=mask)
    drift = sum(int((p.detach() != theta0[n])[~mask.dense(n)].sum()) for n, p in compat.named_parameters())
    assert drift > 0


def _reference_forget_mask(original, forget, ratio):
    """Independent: |sum over batches of d(-mean CE)/d theta| at theta_0 (eval mode), top `ratio` of all entries."""
    model = copy.deepcopy(original).eval()
    total = [torch.zeros_like(p) for p in model.parameters()]
    for x, y in forget:
        grads = torch.autograd.grad(-nn.functional.cross_entropy(model(x), y), list(model.parameters()))
        total = [t + g for t, g in zip(total, grads)]
    scores = torch.cat([t.abs().flatten() for t in total])
    k = int(scores.numel() * ratio)
    ranked = scores.sort(descending=True).values
    assert ranked[k - 1] > ranked[k]  # no tie at the cut: the top-k set is unique
    want = torch.zeros(scores.numel(), dtype=torch.bool)
    want[torch.topk(scores, k).indices] = True
    return want


def test_salun_mask_is_the_top_half_of_the_summed_forget_gradient(memorized):
    original, data = memorized
    names = [n for n, _ in original.named_parameters()]
    for batch_size in (10, 32):  # 3 batches (their gradients summed) and 1
        forget = Batches(data.forget.images, data.forget.labels, batch_size=batch_size, shuffle=False)
        mask = forget_saliency(copy.deepcopy(original), forget, 0.5)
        got = torch.cat([mask.dense(n).flatten() for n in names])
        assert int(got.sum()) == got.numel() // 2
        assert torch.equal(got, _reference_forget_mask(original, forget, 0.5)), batch_size
    # SalUn computes the same mask itself when none is given (data.batch_size = 32)
    a, b = copy.deepcopy(original), copy.deepcopy(original)
    result = get_method("salun", epochs=1).run(a, data, OPTIONS)  # mask computed inside
    get_method("salun", epochs=1).run(b, data, OPTIONS, mask=mask)
    assert result.mask is not None and result.mask.equal(mask)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_mask_for_another_model_is_refused(memorized):
    original, data = memorized
    other = build_model("small_cnn", 1, 4, 8, width=8)
    grads = {n: torch.ones_like(p) for n, p in other.named_parameters()}
    mask = salun_ext.saliency_masks(grads, 0.5)
    with pytest.raises(ValueError, match="does not match the model"):
        get_method("salun", epochs=1).run(copy.deepcopy(original), data, OPTIONS, mask=mask)


def test_random_labels_are_never_the_true_label_and_cover_the_others():
    labels = torch.arange(5).repeat(400)
    new = random_other_labels(labels, 5, torch.Generator().manual_seed(0))
    assert not (new == labels).any()
    for c in range(5):
        counts = torch.bincount(new[labels == c], minlength=5)
        assert counts[c] == 0 and (counts[torch.arange(5) != c] > 60).all()


def test_soft_threshold_matches_a_sorted_reference():
    torch.manual_seed(0)
    params = [torch.randn(7, 3), torch.randn(11)]
    prox = _SoftThreshold(params, ratio=0.5, total_steps=4)
    for p in params:
        p.add_(torch.randn_like(p) * 0.1)
    before = [p.clone() for p in params]
    threshold = prox(step=1)  # k = floor(0.5 * 3/4 * 32) = 12
    diffs = torch.cat([(b - t).flatten() for b, t in zip(before, prox.theta0)])
    expected = diffs.abs().sort().values[11]
    assert threshold == pytest.approx(float(expected))
    for p, b, t in zip(params, before, prox.theta0):
        d = b - t
        want = torch.where(d.abs() > expected, b - torch.sign(d) * expected, t)
        assert torch.allclose(p, want)
    assert sum(int((p == t).sum()) for p, t in zip(params, prox.theta0)) >= 12
    assert prox(step=4) == 0.0  # k reaches 0 at the end: no change


def test_l1_penalty_decays_linearly():
    from salun_ext.classification.methods.finetune import _L1Task

    task = _L1Task(None, [], alpha=1e-3, epochs=4, no_l1_epochs=1)
    values = []
    for epoch in range(4):
        task.epoch = epoch
        values.append(task.current_alpha())
    assert values == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3, 0.0])


def test_per_sample_gradients_and_woodfisher_match_loops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 1, 0])
    batched = per_sample_gradients(model, x, y)
    for i in range(5):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        loop = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert torch.allclose(batched[i], loop, atol=1e-6)
    v = torch.randn(batched.shape[1], dtype=torch.float64)
    g = batched.double()
    n = 10.0
    # the paper code's recursion keeps o parallel to the first gradient (o_i = c_i g_1), so every update of k is a
    # multiple of g_1: k - v lies on the line of g_1 (a structural property, not the recursion re-typed)
    k = woodfisher_inverse_product(v, g, damping=n)
    d = k - v
    assert float(d.norm()) > 1e-6
    assert torch.allclose(d, (d @ g[0]) / (g[0] @ g[0]) * g[0], atol=1e-10)
    # closed forms: one gradient leaves v unchanged; two give k = v - (v.g2 / (N + g1.g2)) g1
    assert torch.equal(woodfisher_inverse_product(v, g[:1], damping=n), v)
    two = v - (v @ g[1]) / (n + g[0] @ g[1]) * g[0]
    assert torch.allclose(woodfisher_inverse_product(v, g[:2], damping=n), two, atol=1e-12)


def test_interrupted_unlearning_resumes_exactly(memorized, tmp_path, monkeypatch):
    from salun_ext.train.engine import Engine

    original, data = memorized
    straight = copy.deepcopy(original)
    get_method("rl", epochs=3).run(straight, data, OPTIONS)
    steps_per_epoch = len(data.forget) // 32 + 1 + len(data.retain) // 32 + 1

    calls = []
    real_step = Engine.train_step

    def counting_step(self, task, batch):
        calls.append(1)
        if crash_at is not None and len(calls) == crash_at:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, task, batch)

    monkeypatch.setattr(Engine, "train_step", counting_step)
    options = dataclasses.replace(OPTIONS, checkpoint_dir=str(tmp_path / "ckpt"), resume=True)
    crash_at = 2 * steps_per_epoch + 3  # in the third epoch, after the checkpoint of the second
    with pytest.raises(KeyboardInterrupt):
        get_method("rl", epochs=3).run(copy.deepcopy(original), data, options)
    calls.clear()
    crash_at = None
    resumed = copy.deepcopy(original)  # a new process starts from the original weights again
    get_method("rl", epochs=3).run(resumed, data, options)
    assert len(calls) == steps_per_epoch  # only the third epoch was trained again
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_bad_hyperparameters_and_names():
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['lrr'\]"):
        get_method("ga", lrr=1.0)
    with pytest.raises(UsageError, match="lr must be a float"):  # --set lr=fast: the user's mistake, not a bug
        get_method("ga", lr="fast")
    assert get_method("salun", lr=1).config.lr == 1.0 and isinstance(get_method("salun", lr=1).config.lr, float)
    assert get_method("retrain", milestones=[0.3]).config.milestones == (0.3,)
    with pytest.raises(ValueError, match="unknown method 'sallun'"):
        get_method("sallun")
    assert method_key("SalUn-soft") == "salun_soft" and method_key("wfisher") == "iu"


def test_unlearn_data_rejects_empty_sets():
    ds = ImageDataset(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), ["a"], "x")
    empty = ds.subset(torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="forget set is empty"):
        UnlearnData(empty, ds)
    with pytest.raises(ValueError, match="whole training set"):
        UnlearnData(ds, empty)
